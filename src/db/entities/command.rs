//! Commands queued for devices. The database is their source of truth; HTTP polls and MQTT
//! pushes only deliver them.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "commands")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    #[sea_orm(unique)]
    pub command_id: String,
    pub device_id: i32,
    pub command_type: String,
    pub priority: i32,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub payload: Option<Json>,
    pub description: String,
    pub status: String,
    pub channel: Option<String>,
    pub created_at: DateTimeUtc,
    pub sent_at: Option<DateTimeUtc>,
    pub executed_at: Option<DateTimeUtc>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub response_data: Option<Json>,
    pub error_message: Option<String>,
    pub retry_count: i32,
    pub created_by: Option<String>,
    pub expires_at: Option<DateTimeUtc>,
    /// The lifetime asked for at creation, so a retry's expiry counts from the retry.
    pub lifetime_secs: Option<i64>,
    /// The result arrived after `expires_at`.
    pub late: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
