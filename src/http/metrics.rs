//! `GET /metrics` in the Prometheus text format, and the HTTP request metrics.
//!
//! One process-wide recorder (the `metrics` facade allows one), installed on first use; the
//! domain records with single `metrics::counter!`/`histogram!` lines, which cost a few atomic
//! operations. Gauges that need the database (device presence) are read when scraped.
//!
//! Access: with `metrics_token` set a scrape must present it as a bearer token; with
//! `metrics_addr` set `/metrics` is served on that listener only; with neither, only loopback
//! peers may scrape.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use poem::{
    handler,
    http::{header, StatusCode},
    web::Data,
    Endpoint, IntoResponse, PathPattern, Request, Response,
};
use subtle::ConstantTimeEq;
use tokio::{sync::watch, task::JoinHandle};

use crate::{domain::status, state::AppState};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// The process-wide recorder's handle; installs the recorder on first call.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("ozone_ingest_batch_size".into()),
                    BATCH_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics stays empty");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "ozone_http_requests_total",
        "HTTP requests by route template, method and status"
    );
    describe_histogram!(
        "ozone_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route template"
    );
    describe_counter!("ozone_events_ingested_total", "Events stored (new)");
    describe_counter!(
        "ozone_events_duplicate_total",
        "Events acknowledged as duplicates, storing nothing"
    );
    describe_histogram!(
        "ozone_ingest_batch_size",
        Unit::Count,
        "Events per group commit"
    );
    describe_histogram!(
        "ozone_ingest_commit_seconds",
        Unit::Seconds,
        "Duration of one group commit"
    );
    describe_counter!(
        "ozone_commands_total",
        "Command transitions: created, sent, executed, failed, timeout"
    );
    describe_counter!(
        "ozone_handshakes_total",
        "Handshakes by outcome (ok or the error code)"
    );
    describe_counter!(
        "ozone_auth_failures_total",
        "Refused device credentials by reason"
    );
    describe_counter!(
        "ozone_rate_limited_total",
        "Requests refused by an abuse limit, by limit"
    );
    describe_gauge!(
        "ozone_devices",
        "Devices by presence (online, idle, offline), at scrape time"
    );
    describe_gauge!(
        "ozone_db_pool_connections",
        "Database pool connections by state (in_use, idle)"
    );
}

/// Runs the recorder's upkeep (histogram buckets roll over) until `stop` changes.
pub fn spawn_upkeep(mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    let handle = handle();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = ticker.tick() => handle.run_upkeep(),
                _ = stop.changed() => break,
            }
        }
    })
}

/// Counts every request by its route template (never the raw path, which holds device ids)
/// and times it. Sits inside the error catcher so errors carry their route too.
pub async fn track<E: Endpoint>(endpoint: Arc<E>, request: Request) -> poem::Result<Response> {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let result = endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response);
    let (status, pattern) = match &result {
        Ok(r) => (r.status(), r.data::<PathPattern>()),
        Err(e) => (e.status(), e.data::<PathPattern>()),
    };
    let route: metrics::SharedString = match pattern {
        Some(p) => p.0.clone().into(),
        None => "unmatched".into(),
    };
    metrics::counter!(
        "ozone_http_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => status.as_str().to_owned()
    )
    .increment(1);
    metrics::histogram!("ozone_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    result
}

/// `GET /metrics`.
#[handler]
pub async fn metrics_endpoint(state: Data<&Arc<AppState>>, request: &Request) -> Response {
    let settings = &state.settings;
    let own_listener = request.data::<OwnListener>();
    let headers = request.headers();
    let remote = request.remote_addr();
    if settings.metrics_addr.is_some() && own_listener.is_none() {
        return super::error_response(StatusCode::NOT_FOUND, "not_found", "not found");
    }
    if let Some(expected) = &settings.metrics_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            return super::error_response(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "/metrics needs the metrics token as a bearer token",
            );
        }
    } else if own_listener.is_none()
        && !remote
            .as_socket_addr()
            .is_some_and(|a| a.ip().to_canonical().is_loopback())
    {
        return super::error_response(
            StatusCode::FORBIDDEN,
            "metrics_forbidden",
            "/metrics answers loopback clients only unless metrics_token or metrics_addr is set",
        );
    }
    refresh_gauges(&state).await;
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle().render())
}

/// Marks requests that arrived on the dedicated `metrics_addr` listener.
#[derive(Clone, Copy)]
pub struct OwnListener;

async fn refresh_gauges(state: &AppState) {
    let now = chrono::Utc::now();
    match status::count_presence(state.db.conn(), now, state.settings.thresholds()).await {
        Ok(counts) => {
            metrics::gauge!("ozone_devices", "presence" => "online").set(counts.online as f64);
            metrics::gauge!("ozone_devices", "presence" => "idle").set(counts.idle as f64);
            metrics::gauge!("ozone_devices", "presence" => "offline").set(counts.offline as f64);
        }
        Err(err) => tracing::warn!(error = %err, "counting devices for /metrics failed"),
    }
    let (in_use, idle) = state.db.pool_usage();
    metrics::gauge!("ozone_db_pool_connections", "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!("ozone_db_pool_connections", "state" => "idle").set(f64::from(idle));
}
