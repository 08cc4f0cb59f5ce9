//! The legacy firmware HTTP shim: the paths, bodies and responses that devices in the field
//! already use, unchanged. Trailing slashes are optional (see `NormalizePath` in `routes`).

use std::sync::Arc;

use chrono::Utc;
use poem::{
    get, handler,
    http::{header, HeaderMap},
    post,
    web::{Data, Json, Path},
    Body, Route,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    domain::{
        commands::{self, CommandResult},
        devices::{self, AuthenticatedDevice, Handshake, Mac},
        events::{self, DeviceEvent, LegacyReading, NewEvent},
        wire::{self, EventAck, WireCommand},
    },
    error::Error,
    state::AppState,
};

use super::limits::ClientAddr;

pub fn routes() -> Route {
    Route::new()
        .at("/api/handshake", post(handshake))
        .at("/api/device/events", post(device_events))
        .at("/api/events", post(device_events))
        .at("/api/device/:device_id/commands", get(poll_commands))
        .at(
            "/api/device/:device_id/commands/:command_id",
            post(command_result),
        )
        .at("/api/iot", post(legacy_iot))
}

type Result<T> = poem::Result<T>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .then_some(token.trim())
}

/// Authenticates a device, counting missing and invalid tokens against the client address: an
/// address over its budget is refused before the token is even looked up.
async fn authenticate(
    state: &AppState,
    client: ClientAddr,
    headers: &HeaderMap,
    fresh: bool,
) -> Result<AuthenticatedDevice> {
    let limiter = &state.limits.bad_tokens_per_addr;
    limiter.ensure_not_blocked(&client.0)?;
    match devices::authenticate(&state.db, &state.tokens, bearer(headers), fresh).await {
        Ok(device) => Ok(device),
        Err(err @ (Error::InvalidToken | Error::MissingToken)) => {
            metrics::counter!("ozone_auth_failures_total", "reason" => err.code()).increment(1);
            limiter.record_failure(&client.0)?;
            Err(err.into())
        }
        Err(err) => {
            if matches!(err, Error::DeviceMismatch(_) | Error::DeviceUnassigned(_)) {
                metrics::counter!("ozone_auth_failures_total", "reason" => err.code()).increment(1);
            }
            Err(err.into())
        }
    }
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>> {
    match body.into_bytes_limit(limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            Err(poem::Error::from_response(super::error_response(
                poem::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("request bodies are limited to {limit} bytes"),
            )))
        }
        Err(err) => Err(Error::Malformed {
            code: "unreadable_body",
            detail: err.to_string(),
        }
        .into()),
    }
}

fn parse_form<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let malformed = |e: serde_urlencoded::de::Error| Error::Malformed {
        code: "malformed_form",
        detail: format!("the form body cannot be read: {e}"),
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(bytes).map_err(malformed)?;
    if pairs
        .iter()
        .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Err(wire::nul_error().into());
    }
    Ok(serde_urlencoded::from_bytes(bytes).map_err(malformed)?)
}

#[derive(Debug, Deserialize)]
struct HandshakeBody {
    mac: Option<String>,
    firmware: Option<String>,
}

#[derive(Serialize)]
struct HandshakeResponse {
    device_id: String,
    token: String,
    assigned: bool,
}

/// `POST /api/handshake/`: `{mac, firmware}` as JSON or a form.
#[handler]
async fn handshake(
    state: Data<&Arc<AppState>>,
    client: ClientAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<HandshakeResponse>> {
    state.limits.handshakes_per_addr.check(&client.0)?;
    let bytes = read_body(body, state.settings.body_limit_bytes).await?;
    // Some clients label a JSON body as a form (curl's `-d` default): the body decides.
    let looks_like_json = bytes.trim_ascii_start().starts_with(b"{");
    let body: HandshakeBody = if is_form(headers) && !looks_like_json {
        parse_form(&bytes)?
    } else {
        wire::parse_json(&bytes)?.0
    };
    let mac = body
        .mac
        .ok_or_else(|| Error::invalid("missing_field", "mac is required"))?;
    // A malformed MAC is refused by the domain; only real ones have a budget.
    if let Ok(parsed) = Mac::parse(&mac) {
        state
            .limits
            .handshakes_per_mac
            .check(&parsed.as_str().to_owned())?;
    }
    let granted = devices::handshake(
        &state.db,
        &state.tokens,
        &state.notifier,
        state.settings.strict_handshake,
        &state.legacy,
        Handshake {
            mac,
            firmware: body.firmware,
            presented_token: bearer(headers).map(str::to_owned),
            client: Some(client.0),
        },
    )
    .await;
    let outcome = granted.as_ref().map_or_else(|e| e.code(), |_| "ok");
    metrics::counter!("ozone_handshakes_total", "outcome" => outcome).increment(1);
    let granted = granted?;
    Ok(Json(HandshakeResponse {
        device_id: granted.device_id,
        token: granted.token,
        assigned: granted.assigned,
    }))
}

/// `POST /api/device/events/` (and `/api/events/`): one event, idempotent on `event_id`.
#[handler]
async fn device_events(
    state: Data<&Arc<AppState>>,
    client: ClientAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<EventAck>> {
    let received_at = Utc::now();
    let device = authenticate(&state, client, headers, false).await?;
    let bytes = read_body(body, state.settings.body_limit_bytes).await?;
    let (event, _): (DeviceEvent, Value) = wire::parse_json(&bytes)?;
    // Valid JSON is valid UTF-8: the body is kept as the device sent it.
    let payload = String::from_utf8_lossy(&bytes).into_owned();
    let event = NewEvent::from_device(&device, event, payload, received_at)?;
    let event_id = event.event_id.clone();
    state.ingestor.submit(event).await?;
    Ok(Json(EventAck::stored(event_id)))
}

/// `GET /api/device/{device_id}/commands/`: pending commands, marked `sent`.
#[handler]
async fn poll_commands(
    state: Data<&Arc<AppState>>,
    client: ClientAddr,
    headers: &HeaderMap,
    Path(device_id): Path<String>,
) -> Result<Json<Value>> {
    let device = authenticate(&state, client, headers, true).await?;
    device.ensure_is(&device_id)?;
    let due = commands::poll(
        &state.db,
        &state.ingestor,
        &state.notifier,
        &device,
        state.settings.poll_max_commands,
    )
    .await?;
    let commands: Vec<WireCommand> = due.into_iter().map(WireCommand::from).collect();
    Ok(Json(json!({ "commands": commands })))
}

/// `POST /api/device/{device_id}/commands/{command_id}/`: the result of one command, named by
/// numeric `id` or `command_id`.
#[handler]
async fn command_result(
    state: Data<&Arc<AppState>>,
    client: ClientAddr,
    headers: &HeaderMap,
    Path((device_id, reference)): Path<(String, String)>,
    body: Body,
) -> Result<Json<Value>> {
    let device = authenticate(&state, client, headers, true).await?;
    device.ensure_is(&device_id)?;
    let bytes = read_body(body, state.settings.body_limit_bytes).await?;
    let (result, _): (CommandResult, Value) = wire::parse_json(&bytes)?;
    let cmd =
        commands::report_result(&state.db, &state.notifier, &device, &reference, result).await?;
    Ok(Json(json!({
        "ack": true,
        "command_id": cmd.command_id,
        "status": cmd.status,
    })))
}

/// `POST /api/iot/`: the legacy form-encoded reading, without authentication.
#[handler]
async fn legacy_iot(
    state: Data<&Arc<AppState>>,
    client: ClientAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<Value>> {
    state.limits.iot_per_addr.check(&client.0)?;
    let received_at = Utc::now();
    let bytes = read_body(body, state.settings.body_limit_bytes).await?;
    let reading: LegacyReading = if is_form(headers) || !bytes.trim_ascii_start().starts_with(b"{")
    {
        parse_form(&bytes)?
    } else {
        wire::parse_json(&bytes)?.0
    };
    events::ingest_legacy(
        &state.db,
        &state.ingestor,
        &state.legacy,
        Some(client.0),
        reading,
        received_at,
    )
    .await?;
    Ok(Json(json!({ "status": "ok" })))
}
