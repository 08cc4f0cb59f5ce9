//! Ozone's integration tests: each test starts the real application on an ephemeral port with
//! a fresh SQLite database and talks to it over HTTP (and through the `ozone` CLI binary).

mod helpers;

mod cli;
mod commands;
mod compat;
mod concurrency;
mod dashboard;
mod events;
mod handshake;
mod legacy;
mod limits;
mod metrics;
mod mqtt;
mod operations;
mod ordering;
mod server;
mod staff_auth;
mod staff_commands;
mod staff_fleet;
mod staff_spec;
mod staff_stats;
mod stats;
mod tls;
