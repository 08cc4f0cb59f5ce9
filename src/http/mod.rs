//! HTTP transport: the firmware shim, the staff API (`staff`, with its spec and Swagger UI),
//! the staff dashboard (`dashboard`, with its live feed) and health endpoints. Handlers parse, call the domain, and map its error once (see
//! `error`).

mod csrf;
mod dashboard;
pub(crate) mod error;
mod firmware;
mod health;
pub mod limits;
pub mod metrics;
pub mod staff;
pub mod tls;

use std::sync::Arc;

use poem::{
    http::Method,
    middleware::{Cors, NormalizePath, TrailingSlash},
    Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route,
};

use crate::state::AppState;

pub use error::error_response;

pub fn routes(state: Arc<AppState>) -> impl Endpoint {
    // Browsers on other origins may call the API (with credentials) only when listed.
    let origins = state.settings.cors_allowed_origins.clone();
    let cors = Cors::new()
        .allow_origins(origins.iter().map(String::as_str))
        .allow_credentials(true);
    let api = ApiRouter {
        firmware: firmware::routes(),
        staff: staff::service().into_endpoint(),
    };
    dashboard::mount(Route::new())
        .nest_no_strip("/api", api)
        .at("/openapi.json", staff::spec_json_endpoint())
        .at("/openapi.yaml", staff::spec_yaml_endpoint())
        .at("/docs", staff::docs_endpoint())
        .at("/healthz", poem::get(health::healthz))
        .at("/readyz", poem::get(health::readyz))
        .at("/metrics", poem::get(metrics::metrics_endpoint))
        .with(NormalizePath::new(TrailingSlash::Trim))
        .around(csrf::same_origin)
        .data(state)
        .around(metrics::track)
        .with_if(!origins.is_empty(), cors)
        .catch_all_error(error::from_poem)
        .around(allow_on_405)
        .around(access_log)
}

/// A 405 says which methods the path does accept (`Allow`, RFC 9110), read from the spec.
async fn allow_on_405<E: Endpoint>(endpoint: Arc<E>, request: Request) -> poem::Result<Response> {
    let path = request.uri().path().to_owned();
    let mut response = endpoint.call(request).await?.into_response();
    if response.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED {
        if let Some(allow) =
            staff::allowed_methods(&path).and_then(|m| poem::http::HeaderValue::from_str(&m).ok())
        {
            response
                .headers_mut()
                .insert(poem::http::header::ALLOW, allow);
        }
    }
    Ok(response)
}

/// The dedicated `metrics_addr` listener: `/metrics` and nothing else.
pub fn metrics_routes(state: Arc<AppState>) -> impl Endpoint {
    Route::new()
        .at("/metrics", poem::get(metrics::metrics_endpoint))
        .data(state)
        .data(metrics::OwnListener)
        .catch_all_error(error::from_poem)
}

/// Sends the firmware contract's requests to the firmware shim and everything else under
/// `/api` to the staff API. Both use some of the same paths (`/api/events`: devices POST,
/// staff GET; `/api/device/{id}/commands/…`), so the split is by method and path shape.
struct ApiRouter<F, S> {
    firmware: F,
    staff: S,
}

fn is_firmware(method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "handshake"] | ["api", "iot"] | ["api", "device", "events"] => true,
        ["api", "events"] => method == Method::POST,
        ["api", "device", _, "commands"] => true,
        ["api", "device", _, "commands", command] => !matches!(*command, "create" | "status"),
        _ => false,
    }
}

impl<F: Endpoint, S: Endpoint> Endpoint for ApiRouter<F, S> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if is_firmware(req.method(), req.uri().path()) {
            self.firmware
                .call(req)
                .await
                .map(IntoResponse::into_response)
        } else {
            self.staff.call(req).await.map(IntoResponse::into_response)
        }
    }
}

/// One line per request at debug level (`OZONE_LOG=ozone::http=debug`): what firmware
/// developers need when a device misbehaves. Tokens are never logged.
async fn access_log<E: Endpoint>(endpoint: Arc<E>, request: Request) -> poem::Result<Response> {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return endpoint
            .call(request)
            .await
            .map(IntoResponse::into_response);
    }
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let peer = request.remote_addr().to_string();
    let response = endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response);
    let status = match &response {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    tracing::debug!(
        %method,
        path,
        status,
        micros = started.elapsed().as_micros() as u64,
        peer,
        "request"
    );
    response
}
