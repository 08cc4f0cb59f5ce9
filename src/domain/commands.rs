//! The command queue: staff create commands, devices fetch them (HTTP poll now, MQTT push
//! later) and report results; expired commands time out.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{
    sea_query::{Expr, ExprTrait, OnConflict},
    ActiveModelTrait,
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Statement,
};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::{
    db::{
        entities::{command, telemetry_event},
        placeholder, Db,
    },
    domain::{
        devices::{self, AuthenticatedDevice},
        events::{Contact, Counters, Ingestor},
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
    let lifetime = new
        .expires_in
        .map(|d| {
            Duration::from_std(d)
                .ok()
                .filter(|d| *d <= Duration::days(3650))
                .ok_or_else(|| Error::invalid("invalid_expires_in", "expires_in is too large"))
        })
        .transpose()?;
    let txn = db.begin_write().await?;
    let now = Utc::now();
    let expires_at = lifetime.map(|l| now + l);
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
        lifetime_secs: Set(lifetime.map(|l| l.num_seconds())),
        late: Set(false),
    }
    .insert(&*txn)
    .await?;
    txn.commit().await?;
    metrics::counter!("ozone_commands_total", "status" => "created").increment(1);
    notifier.publish(Notification::CommandQueued {
        device: device.id,
        device_id: device.device_id,
        command_id: created.command_id.clone(),
    });
    Ok(created)
}

/// A device's HTTP poll: at most `limit` of its pending, unexpired commands, most urgent first
/// then oldest, marked `sent`. The contact is recorded through the event writer's batched
/// status path (even for an unassigned device, whose poll is then refused), so a poll that
/// finds nothing due writes nothing itself.
pub async fn poll(
    db: &Db,
    ingestor: &Ingestor,
    notifier: &Notifier,
    device: &AuthenticatedDevice,
    limit: u64,
) -> Result<Vec<command::Model>> {
    ingestor.touch(device.id, Contact::Poll, Utc::now());
    device.ensure_assigned()?;
    if !has_due(db.conn(), device.id, Utc::now()).await? {
        return Ok(Vec::new());
    }
    let txn = db.begin_write().await?;
    let sent = claim(&*txn, device.id, Channel::Http, limit, Utc::now()).await?;
    txn.commit().await?;
    announce(notifier, &sent);
    Ok(sent)
}

/// Whether a device has a pending, unexpired command it may be handed (it is bound to a
/// machine): a read, no write transaction.
pub async fn has_due(conn: &impl ConnectionTrait, device: i32, now: DateTime<Utc>) -> Result<bool> {
    Ok(command::Entity::find()
        .select_only()
        .column(command::Column::Id)
        .filter(command::Column::DeviceId.eq(device))
        .filter(command::Column::Status.eq(Status::Pending.as_str()))
        .filter(Expr::cust(ASSIGNED))
        .filter(
            command::Column::ExpiresAt
                .is_null()
                .or(command::Column::ExpiresAt.gt(now)),
        )
        .limit(1)
        .into_tuple::<i32>()
        .one(conn)
        .await?
        .is_some())
}

/// Marks up to `limit` of a device's due commands `sent` on `channel` and returns them in
/// delivery order. Only `pending` rows change, in one conditional statement: two polls at once
/// (in one process or two) never hand out the same command, and a command cancelled or timed
/// out a moment earlier stays as it is. PostgreSQL skips rows another poll has locked. A device
/// that is not bound to a machine (as the database says now, whatever a cache or a connection
/// remembers) gets nothing: its commands stay `pending` until it is assigned.
pub async fn claim(
    conn: &impl ConnectionTrait,
    device: i32,
    channel: Channel,
    limit: u64,
    now: DateTime<Utc>,
) -> Result<Vec<command::Model>> {
    let backend = conn.get_database_backend();
    let p = |n| placeholder(backend, n);
    let lock = match backend {
        DbBackend::Postgres => " FOR UPDATE SKIP LOCKED",
        _ => "",
    };
    let sql = format!(
        "UPDATE commands SET status = 'sent', sent_at = {}, channel = {} \
         WHERE id IN (SELECT id FROM commands WHERE device_id = {} AND status = 'pending' \
         AND (expires_at IS NULL OR expires_at > {}) AND {ASSIGNED} \
         ORDER BY priority DESC, created_at, id LIMIT {}{lock}) \
         AND status = 'pending' RETURNING *",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5)
    );
    let mut sent = command::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            backend,
            sql,
            [
                now.into(),
                channel.as_str().into(),
                device.into(),
                now.into(),
                i64::try_from(limit).unwrap_or(i64::MAX).into(),
            ],
        ))
        .all(conn)
        .await?;
    sent.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at.cmp(&b.created_at))
            .then(a.id.cmp(&b.id))
    });
    Ok(sent)
}

/// The condition "the command's device is bound to a machine", for statements on `commands`.
const ASSIGNED: &str =
    "EXISTS (SELECT 1 FROM devices WHERE devices.id = commands.device_id AND devices.assigned)";

fn announce(notifier: &Notifier, changed: &[command::Model]) {
    for c in changed {
        metrics::counter!("ozone_commands_total", "status" => c.status.clone()).increment(1);
        notifier.publish(Notification::CommandChanged {
            device: c.device_id,
            command_id: c.command_id.clone(),
            status: c.status.clone(),
        });
    }
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

/// Records a device's result. Only an open command (`pending`, `sent`, or `timeout` after it
/// was sent) takes a result, in one conditional update, so a result racing a cancel or another
/// result ends in one state. A result after `expires_at` for a command the device received is
/// still the device's truth: it is recorded and marked `late`. A successful `RESET` zeroes the
/// device's counters (or takes the reported ones), sets the reset point older events cannot
/// undo, and writes a `reset` entry into its machine's log.
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
    let txn = db.begin_write().await?;
    let now = Utc::now();
    let cmd = find(&*txn, reference).await?;
    if cmd.device_id != device.id {
        // Another device's command is, for this device, a command that does not exist.
        return Err(Error::not_found(Entity::Command, reference));
    }
    let contact = StatusReport::default();
    let expired = cmd.expires_at.is_some_and(|at| at <= now);
    let status = Status::parse(&cmd.status).unwrap_or(Status::Pending);
    let open = match status {
        Status::Pending | Status::Sent => true,
        Status::Timeout => cmd.sent_at.is_some(),
        _ => false,
    };
    if !open || (expired && cmd.sent_at.is_none()) {
        // Final, or expired before any device received it: nothing changes.
        let mut unchanged = cmd;
        if expired && !Status::parse(&unchanged.status).is_some_and(Status::is_final) {
            if let Some(timed_out) = guarded_update(
                &*txn,
                unchanged.id,
                &[Status::Pending],
                command::Entity::update_many().col_expr(
                    command::Column::Status,
                    Expr::value(Status::Timeout.as_str()),
                ),
            )
            .await?
            {
                unchanged = timed_out;
            }
        }
        status::record(&*txn, device.id, &contact, now).await?;
        txn.commit().await?;
        return Ok(unchanged);
    }
    let new_status = if result.success {
        Status::Executed
    } else {
        Status::Failed
    };
    let updated = guarded_update(
        &*txn,
        cmd.id,
        &[Status::Pending, Status::Sent, Status::Timeout],
        command::Entity::update_many()
            .col_expr(command::Column::Status, Expr::value(new_status.as_str()))
            .col_expr(command::Column::ExecutedAt, Expr::value(now))
            .col_expr(command::Column::ResponseData, Expr::value(response_data))
            .col_expr(
                command::Column::ErrorMessage,
                Expr::value(if result.success { None } else { message }),
            )
            .col_expr(
                command::Column::SentAt,
                Expr::value(cmd.sent_at.unwrap_or(now)),
            )
            .col_expr(command::Column::Late, Expr::value(expired)),
    )
    .await?;
    let Some(updated) = updated else {
        // Another result or a cancel got there first.
        status::record(&*txn, device.id, &contact, now).await?;
        txn.commit().await?;
        return find(db.conn(), &cmd.id.to_string()).await;
    };

    let is_reset = cmd.command_type.eq_ignore_ascii_case("RESET") && result.success;
    let report_counters = if is_reset {
        Some(counters.unwrap_or(Counters::ZERO))
    } else {
        counters
    };
    status::record(
        &*txn,
        device.id,
        &StatusReport {
            counters: report_counters,
            reset: is_reset,
            ..Default::default()
        },
        now,
    )
    .await?;

    if is_reset {
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
    announce(notifier, std::slice::from_ref(&updated));
    Ok(updated)
}

/// Applies `update` to command `id` only while it is in one of `from`; `None` when it was not
/// (another transition won).
async fn guarded_update(
    conn: &impl ConnectionTrait,
    id: i32,
    from: &[Status],
    update: sea_orm::UpdateMany<command::Entity>,
) -> Result<Option<command::Model>> {
    let mut rows = update
        .filter(command::Column::Id.eq(id))
        .filter(command::Column::Status.is_in(from.iter().map(|s| s.as_str())))
        .exec_with_returning(conn)
        .await?;
    Ok(rows.pop())
}

/// Moves `pending`/`sent` commands whose `expires_at` has passed to `timeout`. One conditional
/// statement: sweepers in several replicas never transition a command twice.
pub async fn sweep_expired(db: &Db, notifier: &Notifier, now: DateTime<Utc>) -> Result<u64> {
    let txn = db.begin_write().await?;
    let swept = command::Entity::update_many()
        .col_expr(
            command::Column::Status,
            Expr::value(Status::Timeout.as_str()),
        )
        .filter(command::Column::Status.is_in([Status::Pending.as_str(), Status::Sent.as_str()]))
        .filter(command::Column::ExpiresAt.lte(now))
        .exec_with_returning(&*txn)
        .await?;
    txn.commit().await?;
    announce(notifier, &swept);
    Ok(swept.len() as u64)
}

/// Puts a failed, timed-out or cancelled command back in the queue, at most `max_retries`
/// times, with a fresh lifetime as long as the one it was created with, counted from now.
pub async fn retry(
    db: &Db,
    notifier: &Notifier,
    reference: &str,
    max_retries: i32,
) -> Result<command::Model> {
    let txn = db.begin_write().await?;
    let now = Utc::now();
    let cmd = find(&*txn, reference).await?;
    let lifetime = cmd
        .lifetime_secs
        .map(Duration::seconds)
        .or_else(|| cmd.expires_at.map(|e| e - cmd.created_at));
    let retried = guarded_update(
        &*txn,
        cmd.id,
        &[Status::Failed, Status::Timeout, Status::Cancelled],
        command::Entity::update_many()
            .col_expr(
                command::Column::Status,
                Expr::value(Status::Pending.as_str()),
            )
            .col_expr(
                command::Column::SentAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(
                command::Column::ExecutedAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(
                command::Column::Channel,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                command::Column::ResponseData,
                Expr::value(Option::<Json>::None),
            )
            .col_expr(
                command::Column::ErrorMessage,
                Expr::value(Option::<String>::None),
            )
            .col_expr(command::Column::Late, Expr::value(false))
            .col_expr(
                command::Column::RetryCount,
                Expr::col(command::Column::RetryCount).add(1),
            )
            .col_expr(
                command::Column::ExpiresAt,
                Expr::value(lifetime.map(|l| now + l)),
            )
            .filter(command::Column::RetryCount.lt(max_retries)),
    )
    .await?;
    let Some(retried) = retried else {
        let current = find(&*txn, reference).await?;
        let retryable = matches!(
            Status::parse(&current.status),
            Some(Status::Failed | Status::Timeout | Status::Cancelled)
        );
        return Err(if retryable {
            Error::Conflict {
                code: "retry_limit_reached",
                detail: format!(
                    "command `{}` was retried {} times already; the limit is {max_retries}",
                    current.command_id, current.retry_count
                ),
            }
        } else {
            Error::Conflict {
                code: "command_not_retryable",
                detail: format!(
                    "command `{}` is {}; only failed, timed-out or cancelled commands can be retried",
                    current.command_id, current.status
                ),
            }
        });
    };
    let device = devices::find_by_pk(&*txn, retried.device_id).await?;
    txn.commit().await?;
    notifier.publish(Notification::CommandQueued {
        device: device.id,
        device_id: device.device_id,
        command_id: retried.command_id.clone(),
    });
    Ok(retried)
}

/// Cancels a command that has not reached a final state.
pub async fn cancel(db: &Db, notifier: &Notifier, reference: &str) -> Result<command::Model> {
    let txn = db.begin_write().await?;
    let cmd = find(&*txn, reference).await?;
    let cancelled = guarded_update(
        &*txn,
        cmd.id,
        &[Status::Pending, Status::Sent],
        command::Entity::update_many().col_expr(
            command::Column::Status,
            Expr::value(Status::Cancelled.as_str()),
        ),
    )
    .await?;
    let Some(cancelled) = cancelled else {
        let current = find(&*txn, reference).await?;
        return Err(Error::Conflict {
            code: "command_final",
            detail: format!(
                "command `{}` is already {}",
                current.command_id, current.status
            ),
        });
    };
    txn.commit().await?;
    announce(notifier, std::slice::from_ref(&cancelled));
    Ok(cancelled)
}

/// Runs [`sweep_expired`] every `interval` until `stop` turns true.
pub fn spawn_sweeper(
    db: Db,
    notifier: Notifier,
    interval: StdDuration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    match sweep_expired(&db, &notifier, Utc::now()).await {
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

/// What a push channel (MQTT) delivers to a connected device now, in delivery order (most
/// urgent first, then oldest): its due `pending` commands, claimed as `sent` on `channel` with
/// the same guarded statement as an HTTP poll (so two processes never both hand out one), and,
/// with `include_sent` (when the device subscribes), the `sent` ones still without a result.
/// Nothing while the device is not bound to a machine, as HTTP polls of such a device are
/// refused: its commands wait, `pending`, for its assignment.
pub async fn push_due(
    db: &Db,
    notifier: &Notifier,
    device: i32,
    channel: Channel,
    limit: u64,
    include_sent: bool,
) -> Result<Vec<command::Model>> {
    use sea_orm::QueryOrder;
    let now = Utc::now();
    let mut due = if include_sent {
        command::Entity::find()
            .filter(command::Column::DeviceId.eq(device))
            .filter(command::Column::Status.eq(Status::Sent.as_str()))
            .filter(Expr::cust(ASSIGNED))
            .filter(
                command::Column::ExpiresAt
                    .is_null()
                    .or(command::Column::ExpiresAt.gt(now)),
            )
            .order_by_asc(command::Column::Id)
            .limit(limit)
            .all(db.conn())
            .await?
    } else {
        Vec::new()
    };
    if has_due(db.conn(), device, now).await? {
        let txn = db.begin_write().await?;
        let claimed = claim(&*txn, device, channel, limit, now).await?;
        txn.commit().await?;
        announce(notifier, &claimed);
        due.extend(claimed);
    }
    due.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at.cmp(&b.created_at))
            .then(a.id.cmp(&b.id))
    });
    Ok(due)
}

/// Assigned devices that have `pending` commands: how commands queued by other processes (the
/// CLI, another replica), and those of a device assigned since they were queued, are noticed.
/// Reads the `(status, expires_at)` index.
pub async fn devices_with_pending(db: &Db) -> Result<Vec<i32>> {
    use sea_orm::QuerySelect;
    Ok(command::Entity::find()
        .select_only()
        .column(command::Column::DeviceId)
        .filter(command::Column::Status.eq(Status::Pending.as_str()))
        .filter(Expr::cust(ASSIGNED))
        .distinct()
        .into_tuple::<i32>()
        .all(db.conn())
        .await?)
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

// ---------------------------------------------------------------------------------------------
// Staff reads and bulk creation.

/// Filters of the command list.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// The device's `device_id` (or MAC).
    pub device_id: Option<String>,
    pub status: Option<Status>,
    pub command_type: Option<String>,
}

/// A command with its device's `device_id`.
#[derive(Debug, Clone)]
pub struct CommandView {
    pub command: command::Model,
    pub device_id: String,
}

/// Commands matching `filter`, newest first.
pub async fn list(
    db: &Db,
    filter: CommandFilter,
    page: crate::domain::queries::PageRequest,
) -> Result<crate::domain::queries::Page<CommandView>> {
    use crate::{db::entities::device, domain::queries};
    use sea_orm::QueryOrder;
    let mut query = command::Entity::find()
        .order_by_desc(command::Column::CreatedAt)
        .order_by_desc(command::Column::Id);
    if let Some(d) = &filter.device_id {
        let device = devices::find_by_device_id(db.conn(), d).await?;
        query = query.filter(command::Column::DeviceId.eq(device.id));
    }
    if let Some(s) = filter.status {
        query = query.filter(command::Column::Status.eq(s.as_str()));
    }
    if let Some(t) = &filter.command_type {
        query = query.filter(command::Column::CommandType.eq(t.trim().to_ascii_uppercase()));
    }
    let page = queries::paginate(db.conn(), query, page).await?;
    let mut ids: Vec<i32> = page.items.iter().map(|c| c.device_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let names: std::collections::HashMap<i32, String> = if ids.is_empty() {
        Default::default()
    } else {
        device::Entity::find()
            .filter(device::Column::Id.is_in(ids))
            .all(db.conn())
            .await?
            .into_iter()
            .map(|d| (d.id, d.device_id))
            .collect()
    };
    Ok(page.map(|command| CommandView {
        device_id: names.get(&command.device_id).cloned().unwrap_or_default(),
        command,
    }))
}

/// One command with its device's id.
pub async fn view(db: &Db, reference: &str) -> Result<CommandView> {
    let command = find(db.conn(), reference).await?;
    let device = crate::db::entities::device::Entity::find_by_id(command.device_id)
        .one(db.conn())
        .await?
        .ok_or_else(|| Error::not_found(Entity::Device, command.device_id.to_string()))?;
    Ok(CommandView {
        command,
        device_id: device.device_id,
    })
}

/// Whom a bulk command goes to.
#[derive(Debug, Clone)]
pub enum BulkTarget {
    Devices(Vec<String>),
    Machines(Vec<i32>),
    Outlet(i32),
}

/// A target a bulk command skipped, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The device id, `machine:<id>` or `outlet:<id>`.
    pub target: String,
    pub code: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct BulkOutcome {
    pub created: Vec<CommandView>,
    pub skipped: Vec<Skipped>,
}

/// Most devices one bulk request may address.
pub const BULK_MAX: usize = 1000;

/// Queues the same command for several devices (named directly, by machine, or every machine
/// of an outlet). Each is created like a single command, so connected devices get it at once;
/// targets that cannot take it are reported, not fatal.
pub async fn bulk(
    db: &Db,
    notifier: &Notifier,
    target: BulkTarget,
    new: NewCommand,
) -> Result<BulkOutcome> {
    use crate::db::entities::{device, machine, outlet};
    use sea_orm::QueryOrder;
    clean_command_type(&new.command_type)?;
    let mut outcome = BulkOutcome::default();
    let mut device_ids: Vec<String> = Vec::new();
    let machines = match target {
        BulkTarget::Devices(ids) => {
            device_ids = ids;
            Vec::new()
        }
        BulkTarget::Machines(ids) => {
            let found = machine::Entity::find()
                .filter(machine::Column::Id.is_in(ids.clone()))
                .all(db.conn())
                .await?;
            for id in ids {
                if !found.iter().any(|m| m.id == id) {
                    outcome.skipped.push(Skipped {
                        target: format!("machine:{id}"),
                        code: "machine_not_found",
                        detail: format!("machine `{id}` was not found"),
                    });
                }
            }
            found
        }
        BulkTarget::Outlet(id) => {
            if outlet::Entity::find_by_id(id)
                .one(db.conn())
                .await?
                .is_none()
            {
                return Err(Error::not_found(Entity::Outlet, id.to_string()));
            }
            machine::Entity::find()
                .filter(machine::Column::OutletId.eq(id))
                .order_by_asc(machine::Column::Id)
                .all(db.conn())
                .await?
        }
    };
    let bound: Vec<i32> = machines
        .iter()
        .filter_map(|m| m.current_device_id)
        .collect();
    let names: std::collections::HashMap<i32, String> = if bound.is_empty() {
        Default::default()
    } else {
        device::Entity::find()
            .filter(device::Column::Id.is_in(bound))
            .all(db.conn())
            .await?
            .into_iter()
            .map(|d| (d.id, d.device_id))
            .collect()
    };
    for m in &machines {
        match m.current_device_id.and_then(|d| names.get(&d)) {
            Some(name) => device_ids.push(name.clone()),
            None => outcome.skipped.push(Skipped {
                target: format!("machine:{}", m.id),
                code: "machine_has_no_device",
                detail: format!("machine {} ({}) carries no device", m.id, m.machine_code),
            }),
        }
    }
    let mut seen = std::collections::HashSet::new();
    device_ids.retain(|d| seen.insert(d.clone()));
    if device_ids.len() > BULK_MAX {
        return Err(Error::invalid(
            "too_many_targets",
            format!("a bulk command may address at most {BULK_MAX} devices"),
        ));
    }
    for device_id in device_ids {
        match create(db, notifier, &device_id, new.clone()).await {
            Ok(command) => outcome.created.push(CommandView { command, device_id }),
            Err(err @ Error::NotFound { .. }) => outcome.skipped.push(Skipped {
                target: device_id,
                code: err.code(),
                detail: err.to_string(),
            }),
            Err(err) => return Err(err),
        }
    }
    Ok(outcome)
}
