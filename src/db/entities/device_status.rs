//! The latest known state of each device; `current_count_*` mirror the device's own counters.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "device_status")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub device_id: i32,
    pub wifi_connected: bool,
    pub rtc_available: Option<bool>,
    pub sd_card_available: Option<bool>,
    pub current_count_basic: i64,
    pub current_count_standard: i64,
    pub current_count_premium: i64,
    pub uptime_seconds: Option<i64>,
    pub last_seen: Option<DateTimeUtc>,
    pub last_poll: Option<DateTimeUtc>,
    pub device_timestamp: Option<String>,
    pub mqtt_connected: bool,
    pub updated_at: DateTimeUtc,
    /// When the report the counters came from happened (epoch ms, never after its arrival).
    pub counters_at: Option<i64>,
    /// When that report arrived (epoch ms): breaks ties between reports of the same time.
    pub counters_rx: Option<i64>,
    /// The same pair for the other reported fields.
    pub report_at: Option<i64>,
    pub report_rx: Option<i64>,
    /// The last successful reset (epoch ms): older reports cannot bring counters back.
    pub reset_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
