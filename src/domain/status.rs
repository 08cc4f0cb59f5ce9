//! Device status: what devices report about themselves (counters, flags, last contact), and
//! presence — `online`, `idle` or `offline` from MQTT presence and the age of the newest
//! contact.
//!
//! Device state never goes backwards: contact times only move forward, and counters and the
//! other reported fields change only for a report newer (by its own time, then its arrival)
//! than the one they came from. A successful reset is such a report, so events made before it
//! cannot bring old counters back.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};
use serde::Serialize;

use crate::{
    db::{entities::device_status, padded_ids, placeholder},
    domain::{devices, events::Counters},
    error::Result,
};

/// Orders reports about a device: the time a report describes (never later than its arrival:
/// a clock running ahead cannot make a report win), then its arrival, which breaks ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// Epoch milliseconds.
    pub at: i64,
    /// Epoch milliseconds.
    pub rx: i64,
}

impl Stamp {
    pub fn of(occurred: DateTime<Utc>, received: DateTime<Utc>) -> Stamp {
        Stamp {
            at: occurred.min(received).timestamp_millis(),
            rx: received.timestamp_millis(),
        }
    }
}

/// What a device tells about itself with an event or a command result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusReport {
    pub firmware: Option<String>,
    pub counters: Option<Counters>,
    pub wifi_connected: Option<bool>,
    pub rtc_available: Option<bool>,
    pub sd_card_available: Option<bool>,
    pub uptime_seconds: Option<i64>,
    pub device_timestamp: Option<String>,
    /// A successful reset: its counters also set the reset point.
    pub reset: bool,
}

impl StatusReport {
    fn has_fields(&self) -> bool {
        self.firmware.is_some()
            || self.wifi_connected.is_some()
            || self.rtc_available.is_some()
            || self.sd_card_available.is_some()
            || self.uptime_seconds.is_some()
            || self.device_timestamp.is_some()
    }
}

/// Everything one commit changes about one device: contact times, and the newest report of
/// each kind with its stamp. Reports older than what the status already holds change nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceUpdate {
    pub seen: Option<DateTime<Utc>>,
    pub polled: Option<DateTime<Utc>>,
    counters: Option<(Counters, Stamp)>,
    reset: Option<Stamp>,
    fields: Option<(StatusReport, Stamp)>,
}

fn later(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.max(b)))
}

impl DeviceUpdate {
    pub fn seen_at(&mut self, at: DateTime<Utc>) {
        self.seen = later(self.seen, at);
    }

    pub fn polled_at(&mut self, at: DateTime<Utc>) {
        self.polled = later(self.polled, at);
    }

    /// Takes in a report made at `stamp`; reports may come in any order.
    pub fn report(&mut self, report: &StatusReport, stamp: Stamp) {
        if let Some(counters) = report.counters {
            if self.counters.is_none_or(|(_, s)| stamp >= s) {
                self.counters = Some((counters, stamp));
            }
        }
        if report.reset && self.reset.is_none_or(|s| stamp > s) {
            self.reset = Some(stamp);
        }
        if report.has_fields() {
            match &mut self.fields {
                // Older than a report already taken: it would overwrite the stored values of
                // reports in between, so it changes nothing.
                Some((_, s)) if stamp < *s => {}
                Some((fields, s)) => {
                    macro_rules! take {
                        ($($f:ident),*) => { $( if report.$f.is_some() { fields.$f = report.$f.clone(); } )* };
                    }
                    take!(
                        firmware,
                        wifi_connected,
                        rtc_available,
                        sd_card_available,
                        uptime_seconds,
                        device_timestamp
                    );
                    *s = stamp;
                }
                None => {
                    self.fields = Some((
                        StatusReport {
                            counters: None,
                            reset: false,
                            ..report.clone()
                        },
                        stamp,
                    ))
                }
            }
        }
    }
}

/// Records contact from one device at `now`, and its report made at `now`.
pub async fn record(
    conn: &impl ConnectionTrait,
    device: i32,
    report: &StatusReport,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut update = DeviceUpdate::default();
    update.seen_at(now);
    update.report(report, Stamp::of(now, now));
    record_many(
        conn,
        &[(device, update)],
        now,
        &DeviceMemo::default(),
        crate::db::NETWORK_STATEMENT_BYTES,
    )
    .await
    .map(|_| ())
}

/// Parameter bytes of one status row, an upper bound (16 parameters, most of them 8 bytes).
const STATUS_ROW_BYTES: usize = 256;

/// `devices.last_seen` is kept to this resolution; `device_status.last_seen` is exact.
const DEVICE_SEEN_RESOLUTION: Duration = Duration::seconds(60);

/// Devices remembered by a [`DeviceMemo`]; beyond it the memo starts over, so memory stays
/// bounded whatever number of devices (or invented MACs) reports.
const MEMO_MAX_DEVICES: usize = 100_000;

/// What a caller last wrote to the `devices` row of each device, so that a stream of reports
/// skips redundant writes: the firmware only when it changes, `last_seen` at most once per
/// [`DEVICE_SEEN_RESOLUTION`].
#[derive(Debug, Default)]
pub struct DeviceMemo {
    firmware: HashMap<i32, String>,
    seen: HashMap<i32, DateTime<Utc>>,
}

impl DeviceMemo {
    /// Takes in the writes of a committed transaction.
    pub fn absorb(&mut self, writes: DeviceMemo) {
        if self.firmware.len() + writes.firmware.len() > MEMO_MAX_DEVICES {
            self.firmware = HashMap::new();
        }
        if self.seen.len() + writes.seen.len() > MEMO_MAX_DEVICES {
            self.seen = HashMap::new();
        }
        self.firmware.extend(writes.firmware);
        self.seen.extend(writes.seen);
    }

    pub fn firmware_of(&self, device: i32) -> Option<&str> {
        self.firmware.get(&device).map(String::as_str)
    }

    fn seen_recently(&self, device: i32, now: DateTime<Utc>) -> bool {
        self.seen
            .get(&device)
            .is_some_and(|at| now - *at < DEVICE_SEEN_RESOLUTION)
    }
}

/// Records many devices' updates in two statements, whatever their number: one `UPDATE …
/// FROM (VALUES …)` for the status rows, where every part only moves forward (contact times;
/// counters and other fields only from a report newer than the one they hold), and one for
/// `devices.last_seen`, skipping what `memo` says is already written; returns the writes made,
/// for the caller's memo once committed. On PostgreSQL a statement carries at most
/// `statement_bytes` of parameters (see `Db::statement_bytes`); more updates take several.
pub async fn record_many(
    conn: &impl ConnectionTrait,
    updates: &[(i32, DeviceUpdate)],
    now: DateTime<Utc>,
    memo: &DeviceMemo,
    statement_bytes: usize,
) -> Result<DeviceMemo> {
    record_many_carrying(conn, updates, now, memo, statement_bytes, None).await
}

/// Data-modifying `WITH` queries (PostgreSQL) that a status statement runs along, saving
/// them a round trip: `ctes` names its parameters `$1`… in the order of `values`.
pub struct Carried {
    pub ctes: &'static str,
    pub values: Vec<Value>,
}

impl Carried {
    /// Runs the queries in a statement of their own.
    pub async fn run(self, conn: &impl ConnectionTrait) -> Result<()> {
        conn.execute_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            format!("WITH {} SELECT 1", self.ctes),
            self.values,
        ))
        .await?;
        Ok(())
    }
}

/// [`record_many`], with `carried` run by the first status statement (PostgreSQL only: SQLite
/// has no data-modifying `WITH`).
pub async fn record_many_carrying(
    conn: &impl ConnectionTrait,
    updates: &[(i32, DeviceUpdate)],
    now: DateTime<Utc>,
    memo: &DeviceMemo,
    statement_bytes: usize,
    carried: Option<Carried>,
) -> Result<DeviceMemo> {
    let mut writes = DeviceMemo::default();
    let backend = conn.get_database_backend();
    if updates.is_empty() {
        if let Some(carried) = carried {
            carried.run(conn).await?;
        }
        return Ok(writes);
    }
    // Padded to a power of two below, so the largest statement is the largest power of two
    // that fits beside what it carries.
    let carried_bytes: usize = carried.as_ref().map_or(0, |c| {
        c.values
            .iter()
            .map(|v| match v {
                Value::String(Some(s)) => s.len(),
                _ => 8,
            })
            .sum()
    });
    let room = statement_bytes.saturating_sub(carried_bytes) / STATUS_ROW_BYTES;
    let max_rows = 1usize << room.max(1).ilog2();
    if backend == DbBackend::Postgres && updates.len() > max_rows {
        let mut carried = carried;
        for chunk in updates.chunks(max_rows) {
            let done = Box::pin(record_many_carrying(
                conn,
                chunk,
                now,
                memo,
                statement_bytes,
                carried.take(),
            ))
            .await?;
            writes.firmware.extend(done.firmware);
            writes.seen.extend(done.seen);
        }
        return Ok(writes);
    }
    // Rows are padded to a power of two with copies of the last one (identical updates, which
    // change nothing the second time), so that few statement shapes recur and stay prepared.
    let rows = updates.len().next_power_of_two();
    let (ctes, mut values) = match carried {
        Some(c) => (Some((c.ctes, c.values.len())), c.values),
        None => (None, Vec::new()),
    };
    let own = values.len();
    values.push(now.into());
    for i in 0..rows {
        let (device, u) = &updates[i.min(updates.len() - 1)];
        let counters = u.counters.map(|(c, _)| c);
        let fields = u.fields.as_ref().map(|(f, _)| f);
        values.extend([
            (*device).into(),
            u.seen.into(),
            u.polled.into(),
            counters.map(|c| c.basic).into(),
            counters.map(|c| c.standard).into(),
            counters.map(|c| c.premium).into(),
            u.counters.map(|(_, s)| s.at).into(),
            u.counters.map(|(_, s)| s.rx).into(),
            fields.and_then(|f| f.wifi_connected).into(),
            fields.and_then(|f| f.rtc_available).into(),
            fields.and_then(|f| f.sd_card_available).into(),
            fields.and_then(|f| f.uptime_seconds).into(),
            fields.and_then(|f| f.device_timestamp.clone()).into(),
            u.fields.as_ref().map(|(_, s)| s.at).into(),
            u.fields.as_ref().map(|(_, s)| s.rx).into(),
            u.reset.map(|s| s.at).into(),
        ]);
    }
    let sql = status_update_sql(backend, rows, ctes);
    let updated = conn
        .execute_raw(Statement::from_sql_and_values(backend, sql, values.clone()))
        .await?
        .rows_affected();
    if updated < updates.len() as u64 {
        // A device registered before it had a status row gets one, then the update again
        // (without what the first statement carried: that is done).
        for (device, _) in updates {
            devices::ensure_status(conn, *device, now).await?;
        }
        let own_values = values.split_off(own);
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            status_update_sql(backend, rows, None),
            own_values,
        ))
        .await?;
    }

    let ids: Vec<i32> = updates
        .iter()
        .filter(|(d, u)| u.seen.is_some() && !memo.seen_recently(*d, now))
        .map(|(d, _)| *d)
        .collect();
    if !ids.is_empty() {
        let mut values: Vec<Value> = vec![now.into(), now.into()];
        values.extend(padded_ids(&ids).into_iter().map(Value::from));
        let sql = format!(
            "UPDATE devices SET last_seen = {} WHERE (last_seen IS NULL OR last_seen < {}) \
             AND id IN ({})",
            placeholder(backend, 1),
            placeholder(backend, 2),
            (3..values.len() + 1)
                .map(|n| placeholder(backend, n))
                .collect::<Vec<_>>()
                .join(", ")
        );
        conn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        writes.seen.extend(ids.iter().map(|d| (*d, now)));
    }

    for (device, update) in updates {
        let Some((fields, stamp)) = &update.fields else {
            continue;
        };
        let Some(firmware) = &fields.firmware else {
            continue;
        };
        if memo.firmware_of(*device) == Some(firmware.as_str()) {
            continue;
        }
        // Only from a report at least as new as the one the status holds now.
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE devices SET firmware = {} WHERE id = {} AND NOT EXISTS \
                 (SELECT 1 FROM device_status s WHERE s.device_id = devices.id AND s.report_at > {})",
                placeholder(backend, 1),
                placeholder(backend, 2),
                placeholder(backend, 3)
            ),
            [firmware.clone().into(), (*device).into(), stamp.at.into()],
        ))
        .await?;
        writes.firmware.insert(*device, firmware.clone());
    }
    Ok(writes)
}

/// The columns of a `VALUES` row after the device (`column1`), with their SQL types.
const UPDATE_COLUMNS: [(&str, &str); 15] = [
    ("seen", "TIMESTAMP"),
    ("polled", "TIMESTAMP"),
    ("current_count_basic", "BIGINT"),
    ("current_count_standard", "BIGINT"),
    ("current_count_premium", "BIGINT"),
    ("counters_at", "BIGINT"),
    ("counters_rx", "BIGINT"),
    ("wifi_connected", "BOOLEAN"),
    ("rtc_available", "BOOLEAN"),
    ("sd_card_available", "BOOLEAN"),
    ("uptime_seconds", "BIGINT"),
    ("device_timestamp", "TEXT"),
    ("report_at", "BIGINT"),
    ("report_rx", "BIGINT"),
    ("reset_at", "BIGINT"),
];

/// `UPDATE … FROM (VALUES …)`: SQLite (3.33+) and PostgreSQL both name the columns of a
/// `VALUES` list `column1…N`, so one text serves both, placeholders and types aside. With
/// `ctes` (their text and number of parameters), the statement runs them first.
fn status_update_sql(
    backend: DbBackend,
    rows: usize,
    ctes: Option<(&'static str, usize)>,
) -> &'static str {
    use std::sync::OnceLock;
    type Shapes = std::sync::Mutex<HashMap<(usize, Option<&'static str>), &'static str>>;
    static SQLITE: OnceLock<Shapes> = OnceLock::new();
    static POSTGRES: OnceLock<Shapes> = OnceLock::new();
    let cell = match backend {
        DbBackend::Postgres => &POSTGRES,
        _ => &SQLITE,
    };
    let mut cache = cell
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry((rows, ctes.map(|(text, _)| text)))
        .or_insert_with(|| {
            let mut sql = build_status_update_sql(backend, rows, ctes.map_or(0, |(_, n)| n));
            if let Some((text, _)) = ctes {
                sql = format!("WITH {text} {sql}");
            }
            Box::leak(sql.into_boxed_str())
        })
}

/// The statement's own parameters are numbered from `first + 1`.
fn build_status_update_sql(backend: DbBackend, rows: usize, first: usize) -> String {
    let mut n = first;
    let mut next = || {
        n += 1;
        placeholder(backend, n)
    };
    // `vN` is the N-th column of the VALUES row; `s.` the stored status.
    let v = |name: &str| {
        let i = UPDATE_COLUMNS
            .iter()
            .position(|(c, _)| *c == name)
            .map_or(0, |i| i + 2);
        format!("v.column{i}")
    };
    let forward = |column: &str, value: String| {
        format!(
            "{column} = CASE WHEN {value} IS NOT NULL AND (device_status.{column} IS NULL \
             OR device_status.{column} < {value}) THEN {value} ELSE device_status.{column} END"
        )
    };
    let newer = |at: &str, rx: &str| {
        format!(
            "({vat} IS NOT NULL AND (device_status.{at} IS NULL OR {vat} > device_status.{at} \
             OR ({vat} = device_status.{at} AND {vrx} >= COALESCE(device_status.{rx}, 0))))",
            vat = v(at),
            vrx = v(rx)
        )
    };
    let newer_counters = newer("counters_at", "counters_rx");
    let newer_report = newer("report_at", "report_rx");
    let mut sets = vec![
        format!("updated_at = {}", next()),
        forward("last_seen", v("seen")),
        forward("last_poll", v("polled")),
        forward("reset_at", v("reset_at")),
    ];
    for column in [
        "current_count_basic",
        "current_count_standard",
        "current_count_premium",
        "counters_at",
        "counters_rx",
    ] {
        sets.push(format!(
            "{column} = CASE WHEN {newer_counters} THEN {} ELSE device_status.{column} END",
            v(column)
        ));
    }
    for column in [
        "wifi_connected",
        "rtc_available",
        "sd_card_available",
        "uptime_seconds",
        "device_timestamp",
    ] {
        sets.push(format!(
            "{column} = CASE WHEN {newer_report} THEN COALESCE({}, device_status.{column}) \
             ELSE device_status.{column} END",
            v(column)
        ));
    }
    for column in ["report_at", "report_rx"] {
        sets.push(format!(
            "{column} = CASE WHEN {newer_report} THEN {} ELSE device_status.{column} END",
            v(column)
        ));
    }
    let timestamp = match backend {
        DbBackend::Postgres => "TIMESTAMPTZ",
        // SQLite keeps times as RFC 3339 text in UTC, which sorts in time order.
        _ => "TEXT",
    };
    let mut sql = format!("UPDATE device_status SET {} FROM (VALUES ", sets.join(", "));
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(CAST({} AS INTEGER)", next()));
        for (_, ty) in UPDATE_COLUMNS {
            let ty = if ty == "TIMESTAMP" { timestamp } else { ty };
            sql.push_str(&format!(", CAST({} AS {ty})", next()));
        }
        sql.push(')');
    }
    sql.push_str(") AS v WHERE device_status.device_id = v.column1");
    sql
}

#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub online: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Online,
    Idle,
    Offline,
}

pub fn presence(status: &device_status::Model, now: DateTime<Utc>, t: Thresholds) -> Presence {
    if status.mqtt_connected {
        return Presence::Online;
    }
    // The newest contact of any kind: a poll, an event, a connection.
    let Some(last) = status.last_poll.max(status.last_seen) else {
        return Presence::Offline;
    };
    let age = now - last;
    if age <= t.online {
        Presence::Online
    } else if age <= t.idle {
        Presence::Idle
    } else {
        Presence::Offline
    }
}

/// How many devices are online, idle and offline now (for metrics and dashboards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceCounts {
    pub online: u64,
    pub idle: u64,
    pub offline: u64,
}

/// Counts devices by `presence`, in three counting queries rather than loading every row.
pub async fn count_presence(
    conn: &impl ConnectionTrait,
    now: DateTime<Utc>,
    t: Thresholds,
) -> Result<PresenceCounts> {
    use sea_orm::{ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter};

    use crate::db::entities::device;
    let contact_since = |since: DateTime<Utc>| {
        Condition::any()
            .add(device_status::Column::MqttConnected.eq(true))
            .add(device_status::Column::LastPoll.gte(since))
            .add(device_status::Column::LastSeen.gte(since))
    };
    let online = device_status::Entity::find()
        .filter(contact_since(now - t.online))
        .count(conn)
        .await?;
    let recent = device_status::Entity::find()
        .filter(contact_since(now - t.idle))
        .count(conn)
        .await?;
    let total = device::Entity::find().count(conn).await?;
    Ok(PresenceCounts {
        online,
        idle: recent.saturating_sub(online),
        offline: total.saturating_sub(recent),
    })
}

/// MQTT presence: devices whose connection opened (`true`) or closed (`false`). Sets
/// `mqtt_connected` and records the contact in `last_seen` (status row and device row).
pub async fn set_mqtt_presence(
    db: &crate::db::Db,
    notifier: &crate::domain::notify::Notifier,
    changes: &[(i32, bool)],
) -> Result<()> {
    use crate::db::entities::device;
    use sea_orm::{sea_query::Expr, ColumnTrait, EntityTrait, QueryFilter};
    let now = Utc::now();
    let txn = db.begin_write().await?;
    for connected in [true, false] {
        let ids: Vec<i32> = changes
            .iter()
            .filter(|(_, c)| *c == connected)
            .map(|(d, _)| *d)
            .collect();
        // Bounded statements: SQLite limits the number of parameters.
        for chunk in ids.chunks(500) {
            let update = || {
                device_status::Entity::update_many()
                    .col_expr(device_status::Column::MqttConnected, Expr::value(connected))
                    .col_expr(device_status::Column::LastSeen, Expr::value(now))
                    .col_expr(device_status::Column::UpdatedAt, Expr::value(now))
                    .filter(device_status::Column::DeviceId.is_in(chunk.iter().copied()))
            };
            if update().exec(&*txn).await?.rows_affected < chunk.len() as u64 {
                for device in chunk {
                    devices::ensure_status(&*txn, *device, now).await?;
                }
                update().exec(&*txn).await?;
            }
            device::Entity::update_many()
                .col_expr(device::Column::LastSeen, Expr::value(now))
                .filter(device::Column::Id.is_in(chunk.iter().copied()))
                .exec(&*txn)
                .await?;
        }
    }
    txn.commit().await?;
    for (device, _) in changes {
        notifier.publish(crate::domain::notify::Notification::DeviceChanged { device: *device });
    }
    Ok(())
}

/// Clears `mqtt_connected` of every device: at broker start (connections of a previous run are
/// gone) and at shutdown. Returns the devices that were marked connected.
pub async fn clear_mqtt_connected(db: &crate::db::Db) -> Result<u64> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let cleared = device_status::Entity::update_many()
        .col_expr(
            device_status::Column::MqttConnected,
            sea_orm::sea_query::Expr::value(false),
        )
        .col_expr(
            device_status::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(now),
        )
        .filter(device_status::Column::MqttConnected.eq(true))
        .exec(&*txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(cleared)
}

/// Records a status report a device sent on its own (MQTT `status` topic).
pub async fn report(
    db: &crate::db::Db,
    notifier: &crate::domain::notify::Notifier,
    device: i32,
    report: &StatusReport,
) -> Result<()> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    record(&*txn, device, report, now).await?;
    txn.commit().await?;
    notifier.publish(crate::domain::notify::Notification::DeviceChanged { device });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(last_poll: Option<i64>, last_seen: Option<i64>, mqtt: bool) -> device_status::Model {
        let now = Utc::now();
        device_status::Model {
            device_id: 1,
            wifi_connected: true,
            rtc_available: None,
            sd_card_available: None,
            current_count_basic: 0,
            current_count_standard: 0,
            current_count_premium: 0,
            uptime_seconds: None,
            last_seen: last_seen.map(|m| now - Duration::minutes(m)),
            last_poll: last_poll.map(|m| now - Duration::minutes(m)),
            device_timestamp: None,
            mqtt_connected: mqtt,
            updated_at: now,
            counters_at: None,
            counters_rx: None,
            report_at: None,
            report_rx: None,
            reset_at: None,
        }
    }

    #[test]
    fn presence_follows_the_newest_contact() {
        let t = Thresholds {
            online: Duration::minutes(16),
            idle: Duration::hours(1),
        };
        let now = Utc::now();
        assert_eq!(
            presence(&status(Some(15), None, false), now, t),
            Presence::Online
        );
        assert_eq!(
            presence(&status(Some(17), Some(1), false), now, t),
            Presence::Online,
            "an old poll does not hide a newer event"
        );
        assert_eq!(
            presence(&status(Some(30), Some(40), false), now, t),
            Presence::Idle
        );
        assert_eq!(
            presence(&status(None, Some(61), false), now, t),
            Presence::Offline
        );
        assert_eq!(
            presence(&status(None, None, false), now, t),
            Presence::Offline
        );
        assert_eq!(
            presence(&status(Some(600), None, true), now, t),
            Presence::Online
        );
    }

    fn counters(basic: i64) -> StatusReport {
        StatusReport {
            counters: Some(Counters {
                basic,
                standard: 0,
                premium: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_newest_report_wins_whatever_the_arrival_order() {
        let t0 = Utc::now();
        let mut update = DeviceUpdate::default();
        update.report(&counters(6), Stamp::of(t0, t0));
        update.report(
            &counters(5),
            Stamp::of(t0 - Duration::minutes(10), t0 + Duration::seconds(1)),
        );
        assert_eq!(update.counters.map(|(c, _)| c.basic), Some(6));
    }

    #[test]
    fn a_clock_ahead_of_arrival_does_not_win() {
        let t0 = Utc::now();
        let ahead = Stamp::of(t0 + Duration::hours(12), t0);
        let next = Stamp::of(t0 + Duration::seconds(1), t0 + Duration::seconds(1));
        assert!(next > ahead);
    }

    #[test]
    fn older_reports_do_not_change_fields() {
        let t0 = Utc::now();
        let mut update = DeviceUpdate::default();
        let newer = StatusReport {
            wifi_connected: Some(true),
            ..Default::default()
        };
        let older = StatusReport {
            wifi_connected: Some(false),
            uptime_seconds: Some(7),
            ..Default::default()
        };
        update.report(&newer, Stamp::of(t0, t0));
        update.report(&older, Stamp::of(t0 - Duration::minutes(1), t0));
        let (fields, _) = update.fields.unwrap();
        assert_eq!(fields.wifi_connected, Some(true));
        assert_eq!(fields.uptime_seconds, None);
    }
}
