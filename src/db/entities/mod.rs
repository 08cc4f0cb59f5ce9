//! sea-orm entities, one per table of the migration crate.

pub mod api_token;
pub mod app_secret;
pub mod command;
pub mod device;
pub mod device_status;
pub mod machine;
pub mod machine_device;
pub mod machine_outlet;
pub mod outlet;
pub mod telemetry_event;
pub mod user;
pub mod user_session;
