//! HTTP transport: the firmware shim and health endpoints. Handlers parse, call the domain,
//! and map its error once (see `error`).

mod error;
mod firmware;
mod health;
pub mod limits;
pub mod metrics;
pub mod tls;

use std::sync::Arc;

use poem::{
    middleware::{NormalizePath, TrailingSlash},
    Endpoint, EndpointExt, IntoResponse, Request, Response, Route,
};

use crate::state::AppState;

pub use error::error_response;

pub fn routes(state: Arc<AppState>) -> impl Endpoint {
    Route::new()
        .nest_no_strip("/api", firmware::routes())
        .at("/healthz", poem::get(health::healthz))
        .at("/readyz", poem::get(health::readyz))
        .at("/metrics", poem::get(metrics::metrics_endpoint))
        .with(NormalizePath::new(TrailingSlash::Trim))
        .data(state)
        .around(metrics::track)
        .catch_all_error(error::from_poem)
        .around(access_log)
}

/// The dedicated `metrics_addr` listener: `/metrics` and nothing else.
pub fn metrics_routes(state: Arc<AppState>) -> impl Endpoint {
    Route::new()
        .at("/metrics", poem::get(metrics::metrics_endpoint))
        .data(state)
        .data(metrics::OwnListener)
        .catch_all_error(error::from_poem)
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
