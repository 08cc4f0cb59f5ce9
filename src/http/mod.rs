//! HTTP transport: the firmware shim and health endpoints. Handlers parse, call the domain,
//! and map its error once (see `error`).

mod error;
mod firmware;
mod health;

use std::sync::Arc;

use poem::{
    middleware::{NormalizePath, TrailingSlash},
    Endpoint, EndpointExt, Route,
};

use crate::app::AppState;

pub use error::error_response;

pub fn routes(state: Arc<AppState>) -> impl Endpoint {
    Route::new()
        .nest_no_strip("/api", firmware::routes())
        .at("/healthz", poem::get(health::healthz))
        .at("/readyz", poem::get(health::readyz))
        .with(NormalizePath::new(TrailingSlash::Trim))
        .data(state)
        .catch_all_error(error::from_poem)
}
