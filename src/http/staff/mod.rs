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

/// The whole spec (staff API and firmware contract). The firmware contract and the staff API
/// share a path (`/api/events`: devices POST, staff GET), and poem-openapi keeps only one
/// operation list per path, so the staff operations are merged back in method by method.
fn document() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc: serde_json::Value =
            serde_json::from_str(&documented().spec()).expect("poem-openapi emits JSON");
        let staff: serde_json::Value =
            serde_json::from_str(&service().spec()).expect("poem-openapi emits JSON");
        if let (Some(paths), Some(staff_paths)) =
            (doc["paths"].as_object_mut(), staff["paths"].as_object())
        {
            for (path, operations) in staff_paths {
                let merged = paths
                    .entry(path.clone())
                    .or_insert_with(|| serde_json::json!({}));
                if let (Some(merged), Some(operations)) =
                    (merged.as_object_mut(), operations.as_object())
                {
                    for (method, operation) in operations {
                        merged
                            .entry(method.clone())
                            .or_insert_with(|| operation.clone());
                    }
                }
            }
        }
        doc
    })
}

/// The whole spec as JSON: what `/openapi.json` serves, `ozone openapi` prints and
/// `openapi/openapi.json` holds.
pub fn spec_json() -> String {
    serde_json::to_string_pretty(document()).expect("a JSON value serialises")
}

/// The same spec as YAML.
pub fn spec_yaml() -> String {
    serde_yaml::to_string(document()).expect("a JSON value serialises as YAML")
}

/// The methods the spec gives a concrete path (`/api/devices/abc/`), as an `Allow` header
/// value, or `None` for a path it does not describe. Literal segments win over parameters, so
/// `/api/commands/bulk` is not taken for `/api/commands/{command_id}`.
pub fn allowed_methods(path: &str) -> Option<String> {
    static TABLE: std::sync::OnceLock<Vec<(Vec<String>, Vec<String>)>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let Some(paths) = document()["paths"].as_object() else {
            return Vec::new();
        };
        paths
            .iter()
            .map(|(template, ops)| {
                let segments = template
                    .trim_matches('/')
                    .split('/')
                    .map(str::to_owned)
                    .collect();
                let mut methods: Vec<String> = ops
                    .as_object()
                    .map(|o| o.keys().map(|m| m.to_uppercase()).collect())
                    .unwrap_or_default();
                if methods.iter().any(|m| m == "GET") {
                    methods.push("HEAD".into());
                }
                (segments, methods)
            })
            .collect()
    });
    let wanted: Vec<&str> = path.trim_matches('/').split('/').collect();
    table
        .iter()
        .filter(|(segments, _)| {
            segments.len() == wanted.len()
                && segments
                    .iter()
                    .zip(&wanted)
                    .all(|(s, w)| s.starts_with('{') || s == w)
        })
        .max_by_key(|(segments, _)| segments.iter().filter(|s| !s.starts_with('{')).count())
        .map(|(_, methods)| methods.join(", "))
}

/// Swagger UI that remembers the authorization across reloads.
fn swagger_html() -> String {
    let documented = documented();
    documented
        .swagger_ui_html()
        .replacen(&documented.spec(), &spec_json(), 1)
        .replacen(
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
