//! ESP32 controllers. Only a SHA-256 hash of the device token is stored.
use sea_orm::entity::prelude::*;

#[derive(Clone, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "devices")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    #[sea_orm(unique)]
    pub device_id: String,
    #[sea_orm(unique)]
    pub mac: String,
    pub token_hash: Option<String>,
    pub token_issued_at: Option<DateTimeUtc>,
    pub assigned: bool,
    pub firmware: String,
    pub last_seen: Option<DateTimeUtc>,
    pub notes: String,
    pub created_at: DateTimeUtc,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("device_id", &self.device_id)
            .field("mac", &self.mac)
            .field("assigned", &self.assigned)
            .field("firmware", &self.firmware)
            .field("last_seen", &self.last_seen)
            .finish_non_exhaustive()
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
