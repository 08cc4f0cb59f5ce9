//! Commands: create for a device, follow its status, bulk, retry, cancel, list.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use poem::{web::Data, Request};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::Any,
    ApiResponse, Enum, Object, OpenApi,
};
use serde_json::Value;

use super::{
    common::{optional_text, page_request, text, ApiResult, Page},
    StaffAuth, Tag,
};
use crate::{
    domain::commands::{self, BulkTarget, CommandFilter, CommandView, NewCommand, Status},
    error::Error,
    state::AppState,
};

/// A command's state: `pending` → `sent` → `executed` | `failed`; `pending`/`sent` →
/// `timeout` when it expires; `cancelled` by staff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum CommandStatus {
    Pending,
    Sent,
    Executed,
    Failed,
    Timeout,
    Cancelled,
}

impl From<CommandStatus> for Status {
    fn from(s: CommandStatus) -> Self {
        match s {
            CommandStatus::Pending => Status::Pending,
            CommandStatus::Sent => Status::Sent,
            CommandStatus::Executed => Status::Executed,
            CommandStatus::Failed => Status::Failed,
            CommandStatus::Timeout => Status::Timeout,
            CommandStatus::Cancelled => Status::Cancelled,
        }
    }
}

impl From<Status> for CommandStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Pending => CommandStatus::Pending,
            Status::Sent => CommandStatus::Sent,
            Status::Executed => CommandStatus::Executed,
            Status::Failed => CommandStatus::Failed,
            Status::Timeout => CommandStatus::Timeout,
            Status::Cancelled => CommandStatus::Cancelled,
        }
    }
}

#[derive(Debug, Object)]
pub struct CommandDto {
    pub id: i32,
    /// `cmd-…`: usable wherever the numeric id is.
    pub command_id: String,
    pub device_id: String,
    pub command_type: String,
    /// Larger is more urgent.
    pub priority: i32,
    #[oai(nullable)]
    pub payload: Option<Any<Value>>,
    pub description: String,
    pub status: CommandStatus,
    /// How it was delivered: `http` or `mqtt`.
    #[oai(nullable)]
    pub channel: Option<String>,
    pub created_at: DateTime<Utc>,
    #[oai(nullable)]
    pub sent_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub executed_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub response_data: Option<Any<Value>>,
    #[oai(nullable)]
    pub error_message: Option<String>,
    pub retry_count: i32,
    /// The staff user who created it.
    #[oai(nullable)]
    pub created_by: Option<String>,
    /// The result arrived after the command had expired.
    pub late: bool,
}

impl From<CommandView> for CommandDto {
    fn from(v: CommandView) -> Self {
        let c = v.command;
        CommandDto {
            id: c.id,
            command_id: c.command_id,
            device_id: v.device_id,
            command_type: c.command_type,
            priority: c.priority,
            payload: c.payload.map(Any),
            description: c.description,
            status: Status::parse(&c.status).unwrap_or(Status::Pending).into(),
            channel: c.channel,
            created_at: c.created_at,
            sent_at: c.sent_at,
            executed_at: c.executed_at,
            expires_at: c.expires_at,
            response_data: c.response_data.map(Any),
            error_message: c.error_message,
            retry_count: c.retry_count,
            created_by: c.created_by,
            late: c.late,
        }
    }
}

#[derive(Debug, Object)]
pub struct NewCommandBody {
    /// e.g. `RESET`, `REBOOT` (letters, digits, `_`, `-`, `.`; stored upper-case).
    #[oai(deserialize_with = "text")]
    pub command_type: String,
    /// Any JSON the device understands.
    #[oai(nullable)]
    pub payload: Option<Any<Value>>,
    /// Larger is more urgent (default 0).
    #[oai(default)]
    pub priority: i32,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub description: Option<String>,
    /// Seconds until the command times out, at most ten years (or give `expires_at`).
    #[oai(
        nullable,
        validator(minimum(value = "1"), maximum(value = "315360000"))
    )]
    pub expires_in: Option<u64>,
    /// When the command times out.
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
}

fn lifetime(
    expires_in: Option<u64>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<Option<Duration>, Error> {
    match (expires_in, expires_at) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "invalid_expiry",
            "give expires_in or expires_at, not both",
        )),
        (Some(0), None) => Err(Error::invalid(
            "invalid_expiry",
            "expires_in must be at least 1 second",
        )),
        (Some(secs), None) => Ok(Some(Duration::from_secs(secs))),
        (None, Some(at)) => (at - Utc::now())
            .to_std()
            .ok()
            .filter(|d| d.as_secs() >= 1)
            .map(Some)
            .ok_or_else(|| Error::invalid("invalid_expiry", "expires_at must be in the future")),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, Object)]
pub struct BulkBody {
    /// Devices by id.
    #[oai(nullable)]
    pub device_ids: Option<Vec<String>>,
    /// Machines by id: their current devices.
    #[oai(nullable)]
    pub machine_ids: Option<Vec<i32>>,
    /// Every machine of an outlet.
    #[oai(nullable)]
    pub outlet_id: Option<i32>,
    #[oai(deserialize_with = "text")]
    pub command_type: String,
    #[oai(nullable)]
    pub payload: Option<Any<Value>>,
    #[oai(default)]
    pub priority: i32,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub description: Option<String>,
    /// Seconds until each command times out, at most ten years.
    #[oai(
        nullable,
        validator(minimum(value = "1"), maximum(value = "315360000"))
    )]
    pub expires_in: Option<u64>,
}

#[derive(Debug, Object)]
pub struct SkippedTarget {
    /// The device id, `machine:<id>` or `outlet:<id>`.
    pub target: String,
    pub code: String,
    pub detail: String,
}

#[derive(Debug, Object)]
pub struct BulkReply {
    pub success: bool,
    pub created_count: u64,
    pub created: Vec<CommandDto>,
    pub skipped: Vec<SkippedTarget>,
}

#[derive(ApiResponse)]
pub enum CommandCreated {
    /// The command is queued (and pushed at once to a device connected over MQTT).
    #[oai(status = 201)]
    Created(Json<CommandDto>),
}

#[derive(ApiResponse)]
pub enum BulkCreated {
    /// The commands that were queued, and the targets that were skipped with the reason.
    #[oai(status = 201)]
    Created(Json<BulkReply>),
}

pub struct CommandsApi;

#[OpenApi(tag = "Tag::Commands")]
impl CommandsApi {
    /// Send a command to a device
    #[oai(
        path = "/api/device/:device_id/commands/create",
        method = "post",
        operation_id = "commands_create"
    )]
    async fn create(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Path<String>,
        body: Json<NewCommandBody>,
    ) -> ApiResult<CommandCreated> {
        let who = auth.staff()?;
        let body = body.0;
        let new = NewCommand {
            command_type: body.command_type,
            payload: body.payload.map(|a| a.0),
            priority: body.priority,
            description: body.description.unwrap_or_default(),
            expires_in: lifetime(body.expires_in, body.expires_at)?,
            created_by: Some(who.username().to_owned()),
        };
        let created = commands::create(&state.db, &state.notifier, &device_id.0, new).await?;
        let view = commands::view(&state.db, &created.command_id).await?;
        Ok(CommandCreated::Created(Json(view.into())))
    }

    /// A device's commands
    ///
    /// Newest first, optionally only those in one state.
    #[oai(
        path = "/api/device/:device_id/commands/status",
        method = "get",
        operation_id = "commands_device_status"
    )]
    async fn device_status(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Path<String>,
        status: Query<Option<CommandStatus>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<CommandDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let filter = CommandFilter {
            device_id: Some(device_id.0),
            status: status.0.map(Into::into),
            command_type: None,
        };
        let page = commands::list(&state.db, filter, window).await?;
        Ok(Json(Page::from_domain(req, page, CommandDto::from)))
    }

    /// List commands
    #[oai(path = "/api/commands", method = "get", operation_id = "commands_list")]
    async fn list(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Only this device's commands.
        device_id: Query<Option<String>>,
        status: Query<Option<CommandStatus>>,
        command_type: Query<Option<String>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<CommandDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let filter = CommandFilter {
            device_id: device_id.0,
            status: status.0.map(Into::into),
            command_type: command_type.0,
        };
        let page = commands::list(&state.db, filter, window).await?;
        Ok(Json(Page::from_domain(req, page, CommandDto::from)))
    }

    /// One command
    #[oai(
        path = "/api/commands/:command_id",
        method = "get",
        operation_id = "commands_get"
    )]
    async fn get(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The numeric id or the `command_id`.
        command_id: Path<String>,
    ) -> ApiResult<Json<CommandDto>> {
        Ok(Json(commands::view(&state.db, &command_id.0).await?.into()))
    }

    /// Send a command to many devices
    ///
    /// Give exactly one of `device_ids`, `machine_ids` or `outlet_id`. Every target gets its
    /// own command; targets that cannot take one (unknown device, machine without a device)
    /// are listed in `skipped` with a code.
    #[oai(
        path = "/api/commands/bulk",
        method = "post",
        operation_id = "commands_bulk"
    )]
    async fn bulk(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        body: Json<BulkBody>,
    ) -> ApiResult<BulkCreated> {
        let who = auth.staff()?;
        let body = body.0;
        let target = match (body.device_ids, body.machine_ids, body.outlet_id) {
            (Some(d), None, None) => BulkTarget::Devices(d),
            (None, Some(m), None) => BulkTarget::Machines(m),
            (None, None, Some(o)) => BulkTarget::Outlet(o),
            _ => {
                return Err(Error::invalid(
                    "invalid_target",
                    "give exactly one of device_ids, machine_ids or outlet_id",
                )
                .into())
            }
        };
        let new = NewCommand {
            command_type: body.command_type,
            payload: body.payload.map(|a| a.0),
            priority: body.priority,
            description: body.description.unwrap_or_default(),
            expires_in: lifetime(body.expires_in, None)?,
            created_by: Some(who.username().to_owned()),
        };
        let outcome = commands::bulk(&state.db, &state.notifier, target, new).await?;
        Ok(BulkCreated::Created(Json(BulkReply {
            success: true,
            created_count: outcome.created.len() as u64,
            created: outcome.created.into_iter().map(Into::into).collect(),
            skipped: outcome
                .skipped
                .into_iter()
                .map(|s| SkippedTarget {
                    target: s.target,
                    code: s.code.to_owned(),
                    detail: s.detail,
                })
                .collect(),
        })))
    }

    /// Retry a command
    ///
    /// A failed, timed-out or cancelled command goes back to `pending` with `retry_count`
    /// + 1 and a fresh lifetime; 409 `command_not_retryable` in other states and
    /// `retry_limit_reached` past the server's `max_command_retries`.
    #[oai(
        path = "/api/commands/:command_id/retry",
        method = "post",
        operation_id = "commands_retry"
    )]
    async fn retry(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The numeric id or the `command_id`.
        command_id: Path<String>,
    ) -> ApiResult<Json<CommandDto>> {
        auth.staff()?;
        let retried = commands::retry(
            &state.db,
            &state.notifier,
            &command_id.0,
            state.settings.max_command_retries,
        )
        .await?;
        Ok(Json(
            commands::view(&state.db, &retried.command_id).await?.into(),
        ))
    }

    /// Cancel a command
    ///
    /// A pending or sent command becomes `cancelled`; 409 `command_final` when it already
    /// reached a final state.
    #[oai(
        path = "/api/commands/:command_id/cancel",
        method = "post",
        operation_id = "commands_cancel"
    )]
    async fn cancel(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The numeric id or the `command_id`.
        command_id: Path<String>,
    ) -> ApiResult<Json<CommandDto>> {
        auth.staff()?;
        let cancelled = commands::cancel(&state.db, &state.notifier, &command_id.0).await?;
        Ok(Json(
            commands::view(&state.db, &cancelled.command_id)
                .await?
                .into(),
        ))
    }
}
