//! Liveness and readiness.

use std::sync::Arc;

use poem::{handler, http::StatusCode, web::Data, web::Json, IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

/// Answers while the process lives.
#[handler]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Answers 200 once the database answers and the MQTT broker (when on) accepts connections.
#[handler]
pub async fn readyz(state: Data<&Arc<AppState>>) -> Response {
    if !state.broker.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "Service Unavailable", "code": "broker_unavailable", "detail": "the MQTT broker is not accepting connections" })),
        )
            .into_response();
    }
    match state.db.ping().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "Service Unavailable", "code": "database_unavailable", "detail": "the database does not answer" })),
            )
                .into_response()
        }
    }
}
