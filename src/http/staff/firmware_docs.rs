//! The legacy firmware HTTP contract, described for the spec. These operations are never
//! mounted: the real handlers are the plain poem ones in `http::firmware`, whose wire behaviour
//! stays byte for byte what devices in the field expect. Keep the two in step.

// Request types here only describe bodies; nothing reads them.
#![allow(dead_code)]

use chrono::{DateTime, Utc};
use poem_openapi::{
    param::Path,
    payload::{Form, Json},
    types::Any,
    ApiRequest, ApiResponse, Object, OpenApi, SecurityScheme,
};

use super::Tag;
use crate::error::Error;

/// The device token from the handshake, as `Authorization: Bearer <token>`.
#[derive(SecurityScheme)]
#[oai(rename = "deviceToken", ty = "bearer")]
pub struct DeviceToken(poem_openapi::auth::Bearer);

#[derive(Debug, Object, serde::Deserialize)]
pub struct HandshakeBody {
    /// The device's MAC in any common spelling.
    pub mac: String,
    #[oai(nullable)]
    pub firmware: Option<String>,
}

#[derive(ApiRequest)]
pub enum HandshakeRequest {
    Json(Json<HandshakeBody>),
    Form(Form<HandshakeBody>),
}

#[derive(Debug, Object)]
pub struct HandshakeReply {
    pub device_id: String,
    /// The device's token; send it as `Authorization: Bearer`.
    pub token: String,
    /// Whether an admin has bound the device to a machine (commands need it).
    pub assigned: bool,
}

#[derive(Debug, Object)]
pub struct CurrentCounters {
    pub basic: i64,
    pub standard: i64,
    pub premium: i64,
}

#[derive(Debug, Object)]
pub struct DeviceEventBody {
    pub device_id: String,
    #[oai(nullable)]
    pub firmware: Option<String>,
    /// Unique per device; a resend with the same id is acknowledged and stored once.
    pub event_id: String,
    /// `treatment`, `status` or `reset`.
    pub event: String,
    /// `BASIC`, `STANDARD` or `PREMIUM` (treatments).
    #[oai(nullable)]
    pub treatment: Option<String>,
    #[oai(nullable)]
    pub counter: Option<i64>,
    /// ISO 8601 or epoch seconds/milliseconds; implausible times fall back to receive time.
    #[oai(nullable)]
    pub ts: Option<Any<serde_json::Value>>,
    /// The device's own counters: when present they are its truth.
    #[oai(nullable)]
    pub current_counters: Option<CurrentCounters>,
}

#[derive(Debug, Object)]
pub struct EventAck {
    pub ack: bool,
    pub event_id: String,
}

/// A command as a device receives it (HTTP poll and MQTT).
#[derive(Debug, Object)]
pub struct WireCommand {
    pub id: i32,
    pub command_id: String,
    pub command_type: String,
    #[oai(nullable)]
    pub payload: Option<Any<serde_json::Value>>,
    pub priority: i32,
    pub description: String,
    pub created_at: DateTime<Utc>,
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Object)]
pub struct PollReply {
    /// Most urgent first, then oldest; they are marked `sent`.
    pub commands: Vec<WireCommand>,
}

#[derive(Debug, Object)]
pub struct CommandResultBody {
    pub success: bool,
    #[oai(nullable)]
    pub message: Option<String>,
    #[oai(nullable)]
    pub response_data: Option<Any<serde_json::Value>>,
    #[oai(nullable)]
    pub current_counters: Option<CurrentCounters>,
}

#[derive(Debug, Object)]
pub struct CommandResultAck {
    pub ack: bool,
    pub command_id: String,
    /// The command's status after the result.
    pub status: String,
}

/// The legacy `/api/iot/` form.
#[derive(Debug, Object, serde::Deserialize)]
pub struct LegacyIotForm {
    /// `BASIC`, `STANDARD`, `PREMIUM` or `status`.
    pub mode: String,
    pub macaddr: String,
    #[oai(nullable)]
    pub type1: Option<String>,
    #[oai(nullable)]
    pub type2: Option<String>,
    #[oai(nullable)]
    pub type3: Option<String>,
    #[oai(nullable)]
    pub count1: Option<String>,
    #[oai(nullable)]
    pub count2: Option<String>,
    #[oai(nullable)]
    pub count3: Option<String>,
    /// e.g. `2024-01-15 14:30:25`.
    #[oai(nullable)]
    pub timestamp: Option<String>,
    #[oai(nullable)]
    pub rtc_available: Option<String>,
    #[oai(nullable)]
    pub sd_available: Option<String>,
}

#[derive(Debug, Object)]
pub struct LegacyIotReply {
    /// Always `ok`.
    pub status: String,
}

#[derive(ApiResponse)]
pub enum FirmwareError {
    /// Unreadable body.
    #[oai(status = 400)]
    BadRequest(Json<super::ErrorBody>),
    /// Missing or invalid token (`invalid_token`), a device id that is not the token's
    /// (`device_mismatch`), or a command endpoint of an unassigned device
    /// (`device_unassigned`).
    #[oai(status = 401)]
    Unauthorized(Json<super::ErrorBody>),
    /// Re-handshake refused under `strict_handshake`.
    #[oai(status = 403)]
    Forbidden(Json<super::ErrorBody>),
    /// Unknown command.
    #[oai(status = 404)]
    NotFound(Json<super::ErrorBody>),
    /// Body larger than the server accepts.
    #[oai(status = 413)]
    PayloadTooLarge(Json<super::ErrorBody>),
    /// The body parsed but breaks a rule.
    #[oai(status = 422)]
    Unprocessable(Json<super::ErrorBody>),
    /// The server is shutting down.
    #[oai(status = 503)]
    Unavailable(Json<super::ErrorBody>),
}

impl From<Error> for FirmwareError {
    fn from(err: Error) -> Self {
        let (_, code, detail) = crate::http::error::parts(&err);
        FirmwareError::Unavailable(Json(super::ErrorBody {
            error: "Service Unavailable".into(),
            code: code.into(),
            detail,
        }))
    }
}

type FirmwareResult<T> = Result<T, FirmwareError>;

fn documentation_only<T>() -> FirmwareResult<T> {
    Err(Error::Internal("documentation-only operation".into()).into())
}

pub struct FirmwareApi;

#[OpenApi(tag = "Tag::Firmware")]
impl FirmwareApi {
    /// Device handshake
    ///
    /// Registers a device by MAC (JSON or form) and issues its token. A known MAC presenting
    /// its current token gets the same token back; without it a fresh token is issued.
    #[oai(
        path = "/api/handshake",
        method = "post",
        operation_id = "firmware_handshake"
    )]
    async fn handshake(&self, _body: HandshakeRequest) -> FirmwareResult<Json<HandshakeReply>> {
        documentation_only()
    }

    /// Device event
    ///
    /// A treatment, status or reset event; idempotent per `(device, event_id)`. Events need
    /// a valid token, not an assignment.
    #[oai(
        path = "/api/device/events",
        method = "post",
        operation_id = "firmware_device_events"
    )]
    async fn device_events(
        &self,
        _auth: DeviceToken,
        _body: Json<DeviceEventBody>,
    ) -> FirmwareResult<Json<EventAck>> {
        documentation_only()
    }

    /// Device event (alias)
    ///
    /// Same as `POST /api/device/events/`.
    #[oai(
        path = "/api/events",
        method = "post",
        operation_id = "firmware_events"
    )]
    async fn events(
        &self,
        _auth: DeviceToken,
        _body: Json<DeviceEventBody>,
    ) -> FirmwareResult<Json<EventAck>> {
        documentation_only()
    }

    /// Poll commands
    ///
    /// The device's pending commands, most urgent first then oldest; they are marked `sent`.
    /// Needs an assigned device.
    #[oai(
        path = "/api/device/:device_id/commands",
        method = "get",
        operation_id = "firmware_poll_commands"
    )]
    async fn poll(
        &self,
        _auth: DeviceToken,
        #[oai(name = "device_id")] _device_id: Path<String>,
    ) -> FirmwareResult<Json<PollReply>> {
        documentation_only()
    }

    /// Report a command result
    ///
    /// `command_id` may be the numeric `id` or the `command_id` string. A result for a
    /// command already in a final state changes nothing.
    #[oai(
        path = "/api/device/:device_id/commands/:command_id",
        method = "post",
        operation_id = "firmware_command_result"
    )]
    async fn result(
        &self,
        _auth: DeviceToken,
        #[oai(name = "device_id")] _device_id: Path<String>,
        #[oai(name = "command_id")] _command_id: Path<String>,
        _body: Json<CommandResultBody>,
    ) -> FirmwareResult<Json<CommandResultAck>> {
        documentation_only()
    }

    /// Legacy IoT reading
    ///
    /// The oldest firmware's form post (no token).
    #[oai(
        path = "/api/iot",
        method = "post",
        operation_id = "firmware_legacy_iot"
    )]
    async fn legacy_iot(&self, _body: Form<LegacyIotForm>) -> FirmwareResult<Json<LegacyIotReply>> {
        documentation_only()
    }
}
