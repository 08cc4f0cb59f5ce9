//! The command queue: staff create commands, devices fetch them (HTTP poll now, MQTT push
//! later) and report results; expired commands time out.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{
    sea_query::{Expr, ExprTrait, OnConflict},
    ActiveModelTrait,
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::{
    db::{
        entities::{command, device_status, telemetry_event},
        Db,
    },
    domain::{
        devices::{self, AuthenticatedDevice},
        events::Counters,
        fleet::Attribution,
        notify::{Notification, Notifier},
        status::{self, StatusReport},
    },
    error::{Entity, Error, Result},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Sent,
    Executed,
    Failed,
    Timeout,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Sent,
        Status::Executed,
        Status::Failed,
        Status::Timeout,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Executed => "executed",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No result or sweep changes a command in a final state.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Pending | Status::Sent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Http,
    Mqtt,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Http => "http",
            Channel::Mqtt => "mqtt",
        }
    }
}

/// `cmd-` and a time-ordered UUID: never all digits, so a path segment is unambiguously a
/// numeric `id` or a `command_id`.
pub fn new_command_id() -> String {
    format!("cmd-{}", uuid::Uuid::now_v7().simple())
}

#[derive(Debug, Clone, Default)]
pub struct NewCommand {
    pub command_type: String,
    pub payload: Option<Json>,
    pub priority: i32,
    pub description: String,
    pub expires_in: Option<StdDuration>,
    pub created_by: Option<String>,
}

const COMMAND_TYPE_MAX: usize = 64;

fn clean_command_type(raw: &str) -> Result<String> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(Error::invalid(
            "invalid_command_type",
            "command_type is required",
        ));
    }
    if t.len() > COMMAND_TYPE_MAX
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Error::invalid(
            "invalid_command_type",
            format!(
                "command_type `{t}` must be 1-{COMMAND_TYPE_MAX} letters, digits, `_`, `-` or `.`"
            ),
        ));
    }
    Ok(t.to_ascii_uppercase())
}

/// Queues a command for a device and announces it, so a connected device gets it at once.
pub async fn create(
    db: &Db,
    notifier: &Notifier,
    device_id: &str,
    new: NewCommand,
) -> Result<command::Model> {
    let command_type = clean_command_type(&new.command_type)?;
    let now = Utc::now();
    let expires_at = match new.expires_in {
        None => None,
        Some(d) => Some(
            now + Duration::from_std(d)
                .ok()
                .filter(|d| *d <= Duration::days(3650))
                .ok_or_else(|| Error::invalid("invalid_expires_in", "expires_in is too large"))?,
        ),
    };
    let txn = db.begin_write().await?;
    let device = devices::find_by_device_id(&*txn, device_id).await?;
    let created = command::ActiveModel {
        id: NotSet,
        command_id: Set(new_command_id()),
        device_id: Set(device.id),
        command_type: Set(command_type),
        priority: Set(new.priority),
        payload: Set(new.payload),
        description: Set(new.description),
        status: Set(Status::Pending.as_str().to_owned()),
        channel: Set(None),
        created_at: Set(now),
        sent_at: Set(None),
        executed_at: Set(None),
        response_data: Set(None),
        error_message: Set(None),
        retry_count: Set(0),
        created_by: Set(new.created_by),
        expires_at: Set(expires_at),
        lifetime_secs: Set(new.expires_in.map(|d| d.as_secs() as i64)),
        late: Set(false),
    }
    .insert(&*txn)
    .await?;
    txn.commit().await?;
    notifier.publish(Notification::CommandQueued {
        device: device.id,
        device_id: device.device_id,
        command_id: created.command_id.clone(),
    });
    Ok(created)
}

/// A device's HTTP poll: its pending, unexpired commands, most urgent first then oldest; they
/// are marked `sent` and the poll is recorded for presence.
pub async fn poll(
    db: &Db,
    notifier: &Notifier,
    device: &AuthenticatedDevice,
    limit: u64,
) -> Result<Vec<command::Model>> {
    let _ = (notifier, limit);
    device.ensure_assigned()?;
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let mut due = command::Entity::find()
        .filter(command::Column::DeviceId.eq(device.id))
        .filter(command::Column::Status.eq(Status::Pending.as_str()))
        .filter(
            command::Column::ExpiresAt
                .is_null()
                .or(command::Column::ExpiresAt.gt(now)),
        )
        .order_by_desc(command::Column::Priority)
        .order_by_asc(command::Column::CreatedAt)
        .order_by_asc(command::Column::Id)
        .all(&*txn)
        .await?;
    if !due.is_empty() {
        command::Entity::update_many()
            .col_expr(command::Column::Status, Expr::value(Status::Sent.as_str()))
            .col_expr(command::Column::SentAt, Expr::value(now))
            .col_expr(
                command::Column::Channel,
                Expr::value(Channel::Http.as_str()),
            )
            .filter(command::Column::Id.is_in(due.iter().map(|c| c.id)))
            .exec(&*txn)
            .await?;
        for c in &mut due {
            c.status = Status::Sent.as_str().to_owned();
            c.sent_at = Some(now);
            c.channel = Some(Channel::Http.as_str().to_owned());
        }
    }
    let touched = device_status::Entity::update_many()
        .col_expr(device_status::Column::LastPoll, Expr::value(now))
        .col_expr(device_status::Column::UpdatedAt, Expr::value(now))
        .filter(device_status::Column::DeviceId.eq(device.id))
        .exec(&*txn)
        .await?;
    if touched.rows_affected == 0 {
        devices::ensure_status(&*txn, device.id, now).await?;
    }
    txn.commit().await?;
    Ok(due)
}

/// What a device reports after executing a command.
#[derive(Debug, Clone, Deserialize)]
pub struct CommandResult {
    pub success: bool,
    pub message: Option<String>,
    pub response_data: Option<Json>,
    #[serde(default, deserialize_with = "crate::domain::events::counters_object")]
    pub current_counters: Option<Counters>,
}

/// Finds a command by numeric `id` or by `command_id`.
pub async fn find(conn: &impl ConnectionTrait, reference: &str) -> Result<command::Model> {
    let reference = reference.trim();
    let found = if !reference.is_empty() && reference.bytes().all(|b| b.is_ascii_digit()) {
        match reference.parse::<i32>() {
            Ok(id) => command::Entity::find_by_id(id).one(conn).await?,
            Err(_) => None,
        }
    } else {
        command::Entity::find()
            .filter(command::Column::CommandId.eq(reference))
            .one(conn)
            .await?
    };
    found.ok_or_else(|| Error::not_found(Entity::Command, reference))
}

/// Records a device's result. A command already in a final state is left as it is; a
/// successful `RESET` zeroes the device's counters (or takes the reported ones) and writes a
/// `reset` entry into its machine's log.
pub async fn report_result(
    db: &Db,
    notifier: &Notifier,
    device: &AuthenticatedDevice,
    reference: &str,
    result: CommandResult,
) -> Result<command::Model> {
    device.ensure_assigned()?;
    let counters = result
        .current_counters
        .map(Counters::validate)
        .transpose()?;
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let cmd = find(&*txn, reference).await?;
    if cmd.device_id != device.id {
        // Another device's command is, for this device, a command that does not exist.
        return Err(Error::not_found(Entity::Command, reference));
    }
    let status = Status::parse(&cmd.status).unwrap_or(Status::Pending);
    if status.is_final() {
        status::record(&*txn, device.id, &StatusReport::default(), now).await?;
        txn.commit().await?;
        return Ok(cmd);
    }
    if cmd.expires_at.is_some_and(|at| at <= now) {
        // Expired but not swept yet: the outcome must not depend on the sweeper's timing.
        let mut active: command::ActiveModel = cmd.into();
        active.status = Set(Status::Timeout.as_str().to_owned());
        let timed_out = active.update(&*txn).await?;
        status::record(&*txn, device.id, &StatusReport::default(), now).await?;
        txn.commit().await?;
        return Ok(timed_out);
    }
    let is_reset = cmd.command_type.eq_ignore_ascii_case("RESET");
    let new_status = if result.success {
        Status::Executed
    } else {
        Status::Failed
    };
    let message = result
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| m.chars().take(2000).collect::<String>());
    let response_data = match (result.response_data, &message) {
        (Some(data), _) => Some(data),
        (None, Some(m)) if result.success => Some(json!({ "message": m })),
        _ => None,
    };
    let mut active: command::ActiveModel = cmd.clone().into();
    active.status = Set(new_status.as_str().to_owned());
    active.executed_at = Set(Some(now));
    active.response_data = Set(response_data);
    active.error_message = Set(if result.success { None } else { message });
    if cmd.sent_at.is_none() {
        active.sent_at = Set(Some(now));
    }
    let updated = active.update(&*txn).await?;
    let _ = notifier;

    let report_counters = if is_reset && result.success {
        Some(counters.unwrap_or(Counters::ZERO))
    } else {
        counters
    };
    status::record(
        &*txn,
        device.id,
        &StatusReport {
            counters: report_counters,
            ..Default::default()
        },
        now,
    )
    .await?;

    if is_reset && result.success {
        let after = report_counters.unwrap_or(Counters::ZERO);
        let attribution = Attribution::load(&*txn, &[device.id], now).await?;
        let (machine, outlet) = attribution.at(device.id, now);
        telemetry_event::Entity::insert(telemetry_event::ActiveModel {
            id: NotSet,
            device_id: Set(device.id),
            event_id: Set(format!("reset-{}", cmd.command_id)),
            event: Set("reset".to_owned()),
            treatment: Set(None),
            counter: Set(None),
            event_type: Set(Some("reset".to_owned())),
            count_basic: Set(Some(after.basic)),
            count_standard: Set(Some(after.standard)),
            count_premium: Set(Some(after.premium)),
            occurred_at: Set(now),
            occurred_epoch: Set(now.timestamp()),
            device_timestamp: Set(None),
            received_at: Set(now),
            wifi_status: Set(None),
            payload: Set(Some(json!({
                "command_id": cmd.command_id,
                "current_counters": after,
            }))),
            machine_id: Set(machine),
            outlet_id: Set(outlet),
        })
        .on_conflict(
            OnConflict::columns([
                telemetry_event::Column::DeviceId,
                telemetry_event::Column::EventId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&*txn)
        .await?;
    }
    txn.commit().await?;
    Ok(updated)
}

/// Moves `pending`/`sent` commands whose `expires_at` has passed to `timeout`.
pub async fn sweep_expired(db: &Db, now: DateTime<Utc>) -> Result<u64> {
    let txn = db.begin_write().await?;
    let swept = command::Entity::update_many()
        .col_expr(
            command::Column::Status,
            Expr::value(Status::Timeout.as_str()),
        )
        .filter(command::Column::Status.is_in([Status::Pending.as_str(), Status::Sent.as_str()]))
        .filter(command::Column::ExpiresAt.lte(now))
        .exec(&*txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(swept)
}

/// Puts a failed, timed-out or cancelled command back in the queue, with a fresh lifetime as
/// long as its first one.
/// At most `max_retries` retries per command.
pub async fn retry(
    db: &Db,
    notifier: &Notifier,
    reference: &str,
    max_retries: i32,
) -> Result<command::Model> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let cmd = find(&*txn, reference).await?;
    let status = Status::parse(&cmd.status).unwrap_or(Status::Pending);
    if !matches!(status, Status::Failed | Status::Timeout | Status::Cancelled) {
        return Err(Error::Conflict {
            code: "command_not_retryable",
            detail: format!(
                "command `{}` is {}; only failed, timed-out or cancelled commands can be retried",
                cmd.command_id, cmd.status
            ),
        });
    }
    if cmd.retry_count >= max_retries {
        return Err(Error::Conflict {
            code: "retry_limit_reached",
            detail: format!(
                "command `{}` was retried {} times already; the limit is {max_retries}",
                cmd.command_id, cmd.retry_count
            ),
        });
    }
    let lifetime = cmd.expires_at.map(|e| e - cmd.created_at);
    let retry_count = cmd.retry_count + 1;
    let mut active: command::ActiveModel = cmd.into();
    active.status = Set(Status::Pending.as_str().to_owned());
    active.sent_at = Set(None);
    active.executed_at = Set(None);
    active.channel = Set(None);
    active.response_data = Set(None);
    active.error_message = Set(None);
    active.retry_count = Set(retry_count);
    active.expires_at = Set(lifetime.map(|l| now + l));
    let updated = active.update(&*txn).await?;
    txn.commit().await?;
    let _ = notifier;
    Ok(updated)
}

/// Cancels a command that has not reached a final state.
pub async fn cancel(db: &Db, notifier: &Notifier, reference: &str) -> Result<command::Model> {
    let _ = notifier;
    let txn = db.begin_write().await?;
    let cmd = find(&*txn, reference).await?;
    if Status::parse(&cmd.status).is_some_and(Status::is_final) {
        return Err(Error::Conflict {
            code: "command_final",
            detail: format!("command `{}` is already {}", cmd.command_id, cmd.status),
        });
    }
    let mut active: command::ActiveModel = cmd.into();
    active.status = Set(Status::Cancelled.as_str().to_owned());
    let updated = active.update(&*txn).await?;
    txn.commit().await?;
    Ok(updated)
}

/// Runs [`sweep_expired`] every `interval` until `stop` turns true.
pub fn spawn_sweeper(
    db: Db,
    interval: StdDuration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    match sweep_expired(&db, Utc::now()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(commands = n, "expired commands timed out"),
                        Err(err) => tracing::warn!(error = %err, "command sweep failed"),
                    }
                }
                _ = stop.changed() => break,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_are_never_all_digits() {
        let id = new_command_id();
        assert!(id.starts_with("cmd-"));
        assert!(!id.bytes().all(|b| b.is_ascii_digit()));
        assert!(new_command_id() > id, "ids are time-ordered");
    }

    #[test]
    fn command_types_are_validated_and_upper_cased() {
        assert_eq!(clean_command_type(" reset ").unwrap(), "RESET");
        assert!(clean_command_type("").is_err());
        assert!(clean_command_type("rm -rf /").is_err());
    }
}
