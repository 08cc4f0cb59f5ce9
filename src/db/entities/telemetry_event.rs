//! Treatments, status reports and counter resets, each attributed at ingest to the machine and
//! outlet its device was bound to when it happened.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "telemetry_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub device_id: i32,
    pub event_id: String,
    pub event: String,
    pub treatment: Option<String>,
    pub counter: Option<i64>,
    pub event_type: Option<String>,
    pub count_basic: Option<i64>,
    pub count_standard: Option<i64>,
    pub count_premium: Option<i64>,
    pub occurred_at: DateTimeUtc,
    /// `occurred_at` as Unix seconds: time buckets are computed on it with the same SQL on every
    /// backend.
    pub occurred_epoch: i64,
    pub device_timestamp: Option<String>,
    pub received_at: DateTimeUtc,
    pub wifi_status: Option<bool>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub payload: Option<Json>,
    pub machine_id: Option<i32>,
    pub outlet_id: Option<i32>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
