//! Transport-free domain services: the firmware HTTP shim, the MQTT edge and the staff API are
//! thin adapters over these functions.

pub mod auth;
pub mod commands;
pub mod device_admin;
pub mod devices;
pub mod events;
pub mod export;
pub mod fleet;
pub mod logs;
pub mod machines;
pub mod notify;
pub mod outlets;
pub mod queries;
pub mod rollup;
pub mod stats;
pub mod status;
pub mod trust;
pub mod users;
pub mod wire;

/// Timestamps on the wire: ISO 8601, UTC, `Z`.
pub fn wire_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
