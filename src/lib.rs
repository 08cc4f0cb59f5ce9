//! Ozone: telemetry, command queue and MQTT backend for fleets of ESP32-controlled ozone
//! treatment machines.
//!
//! `domain` holds every behaviour, free of transports; `http` adapts it to the firmware HTTP
//! contract and `mqtt` to the MQTT contract (embedded broker); `db` owns the connection and
//! entities; `tls` holds the certificate both transports' TLS listeners serve; `app` wires
//! them; `cli` is the operator's command line.

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod http;
pub mod mqtt;
pub mod state;
pub mod tls;

pub use app::Application;
pub use config::Settings;
pub use error::{Error, Result};
pub use state::AppState;
