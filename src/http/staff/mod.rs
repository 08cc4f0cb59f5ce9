//! The staff API on poem-openapi, at the seed's paths: one file per resource, each an
//! `OpenApi` struct whose handlers parse, call one domain function and map the one error.
//! The spec (`/openapi.json`, `/openapi.yaml`, `ozone openapi`) also documents the firmware
//! shim, which stays plain poem handlers (see `firmware_docs`).

// An operation takes each query parameter as an argument of its own.
#![allow(clippy::too_many_arguments)]

pub mod auth;
pub mod commands;
pub mod common;
pub mod devices;
pub mod events;
mod firmware_docs;
pub mod machines;
pub mod outlets;
pub mod stats;

use poem::{web::Html, Endpoint, IntoResponse};
use poem_openapi::{OpenApiService, Tags};

pub use auth::{OptionalAuth, StaffAuth, UserDto};
pub use common::{page_request, ApiError, ApiResult, ErrorBody, Page};

/// Groups of operations in the spec and in Swagger UI.
#[derive(Tags)]
pub enum Tag {
    /// Login, logout, the current user, registration and API tokens.
    Auth,
    /// Outlets (shops) where machines stand.
    Outlets,
    /// Machines, their registration and which device each carries.
    Machines,
    /// ESP32 controllers: status, counters, notes and tokens.
    Devices,
    /// The command queue: create, follow, retry and cancel commands.
    Commands,
    /// Telemetry events and the latest state of devices.
    Telemetry,
    /// Usage statistics, machine logs, CSV exports and the telemetry flush.
    Analytics,
    /// The legacy firmware HTTP contract (documentation of what devices call).
    Firmware,
}

/// The operations the server mounts.
pub type StaffApi = (
    auth::AuthApi,
    outlets::OutletsApi,
    machines::MachinesApi,
    devices::DevicesApi,
    commands::CommandsApi,
    events::EventsApi,
    stats::StatsApi,
);

fn staff_api() -> StaffApi {
    (
        auth::AuthApi,
        outlets::OutletsApi,
        machines::MachinesApi,
        devices::DevicesApi,
        commands::CommandsApi,
        events::EventsApi,
        stats::StatsApi,
    )
}

const TITLE: &str = "Ozone";
const DESCRIPTION: &str = "Staff API and firmware contract of Ozone, the backend for fleets of \
ozone treatment machines. Staff endpoints accept the JWT from `POST /api/auth/login/` as \
`Authorization: Bearer <token>` or as the `ozone_token` cookie, or an API token as a bearer \
token. Reads need an active user, mutations and commands `is_staff`. Lists are paginated with \
`limit` (default 50, at most 1000) and `offset`, answered as `{count, next, previous, \
results}`; errors are `{error, code, detail}` with a stable `code`. Paths are matched with and \
without the trailing slash.";

/// The served staff operations (no spec endpoints of its own: see [`spec_json`]).
pub fn service() -> OpenApiService<StaffApi, ()> {
    OpenApiService::new(staff_api(), TITLE, env!("CARGO_PKG_VERSION")).description(DESCRIPTION)
}

fn documented() -> OpenApiService<(StaffApi, firmware_docs::FirmwareApi), ()> {
    OpenApiService::new(
        (staff_api(), firmware_docs::FirmwareApi),
        TITLE,
        env!("CARGO_PKG_VERSION"),
    )
    .description(DESCRIPTION)
}

/// The whole spec (staff API and firmware contract) as JSON: what `/openapi.json` serves,
/// `ozone openapi` prints and `openapi/openapi.json` holds.
pub fn spec_json() -> String {
    documented().spec()
}

/// The same spec as YAML.
pub fn spec_yaml() -> String {
    documented().spec_yaml()
}

/// Swagger UI that remembers the authorization across reloads.
fn swagger_html() -> String {
    documented().swagger_ui_html().replacen(
        "deepLinking: true,",
        "deepLinking: true,\n        persistAuthorization: true,\n        withCredentials: true,",
        1,
    )
}

/// `GET /openapi.json`.
pub fn spec_json_endpoint() -> impl Endpoint {
    let json = spec_json();
    poem::get(poem::endpoint::make_sync(move |_| {
        json.clone()
            .with_content_type("application/json; charset=utf-8")
    }))
}

/// `GET /openapi.yaml`.
pub fn spec_yaml_endpoint() -> impl Endpoint {
    let yaml = spec_yaml();
    poem::get(poem::endpoint::make_sync(move |_| {
        yaml.clone()
            .with_content_type("application/yaml; charset=utf-8")
    }))
}

/// `GET /docs`: Swagger UI.
pub fn docs_endpoint() -> impl Endpoint {
    let html = swagger_html();
    poem::get(poem::endpoint::make_sync(move |_| Html(html.clone())))
}
