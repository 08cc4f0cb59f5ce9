//! Device status: what devices report about themselves (counters, flags, last contact), and
//! presence — `online`, `idle` or `offline` from MQTT presence and the age of the last poll
//! (falling back to the last contact).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};
use serde::Serialize;

use crate::{
    db::{entities::device_status, padded_ids, placeholder},
    domain::{devices, events::Counters},
    error::Result,
};

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
}

impl StatusReport {
    /// Takes every field the newer report carries.
    pub fn merge(&mut self, newer: &StatusReport) {
        macro_rules! take {
            ($($f:ident),*) => { $( if newer.$f.is_some() { self.$f = newer.$f.clone(); } )* };
        }
        take!(
            firmware,
            counters,
            wifi_connected,
            rtc_available,
            sd_card_available,
            uptime_seconds,
            device_timestamp
        );
    }
}

/// Records contact from one device: its report, and that it was seen `now`.
pub async fn record(
    conn: &impl ConnectionTrait,
    device: i32,
    report: &StatusReport,
    now: DateTime<Utc>,
) -> Result<()> {
    record_many(conn, &[(device, report)], now, &DeviceMemo::default())
        .await
        .map(|_| ())
}

/// `devices.last_seen` is kept to this resolution; `device_status.last_seen` is exact.
const DEVICE_SEEN_RESOLUTION: Duration = Duration::seconds(60);

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

/// Records contact from many devices in two statements, whatever their number: one `UPDATE …
/// FROM (VALUES …)` for the status rows (fields a report lacks keep their value) and one for
/// `devices.last_seen`, skipping what `memo` says is already written; returns the writes
/// made, for the caller's memo once committed.
pub async fn record_many(
    conn: &impl ConnectionTrait,
    reports: &[(i32, &StatusReport)],
    now: DateTime<Utc>,
    memo: &DeviceMemo,
) -> Result<DeviceMemo> {
    let mut writes = DeviceMemo::default();
    if reports.is_empty() {
        return Ok(writes);
    }
    let backend = conn.get_database_backend();
    // Rows are padded to a power of two with copies of the last one (identical updates), so
    // that few statement shapes recur and stay prepared.
    let rows = reports.len().next_power_of_two();
    let mut values: Vec<Value> = vec![now.into(), now.into()];
    for i in 0..rows {
        let (device, r) = reports[i.min(reports.len() - 1)];
        values.extend([
            device.into(),
            r.counters.map(|c| c.basic).into(),
            r.counters.map(|c| c.standard).into(),
            r.counters.map(|c| c.premium).into(),
            r.wifi_connected.into(),
            r.rtc_available.into(),
            r.sd_card_available.into(),
            r.uptime_seconds.into(),
            r.device_timestamp.clone().into(),
        ]);
    }
    let sql = status_update_sql(backend, rows);
    let updated = conn
        .execute_raw(Statement::from_sql_and_values(backend, sql, values.clone()))
        .await?
        .rows_affected();
    if updated < reports.len() as u64 {
        // A device registered before it had a status row gets one, then the update again.
        for (device, _) in reports {
            devices::ensure_status(conn, *device, now).await?;
        }
        conn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
    }

    let ids: Vec<i32> = reports
        .iter()
        .map(|(d, _)| *d)
        .filter(|d| !memo.seen_recently(*d, now))
        .collect();
    if !ids.is_empty() {
        let mut values: Vec<Value> = vec![now.into()];
        values.extend(padded_ids(&ids).into_iter().map(Value::from));
        let sql = format!(
            "UPDATE devices SET last_seen = {} WHERE id IN ({})",
            placeholder(backend, 1),
            (2..values.len() + 1)
                .map(|n| placeholder(backend, n))
                .collect::<Vec<_>>()
                .join(", ")
        );
        conn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        writes.seen.extend(ids.iter().map(|d| (*d, now)));
    }

    for (device, report) in reports {
        let Some(firmware) = &report.firmware else {
            continue;
        };
        if memo.firmware_of(*device) == Some(firmware.as_str()) {
            continue;
        }
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE devices SET firmware = {} WHERE id = {}",
                placeholder(backend, 1),
                placeholder(backend, 2)
            ),
            [firmware.clone().into(), (*device).into()],
        ))
        .await?;
        writes.firmware.insert(*device, firmware.clone());
    }
    Ok(writes)
}

/// Columns of the `VALUES` rows, in order, with their SQL types; `column1` is the device.
const REPORT_COLUMNS: [(&str, &str); 8] = [
    ("current_count_basic", "BIGINT"),
    ("current_count_standard", "BIGINT"),
    ("current_count_premium", "BIGINT"),
    ("wifi_connected", "BOOLEAN"),
    ("rtc_available", "BOOLEAN"),
    ("sd_card_available", "BOOLEAN"),
    ("uptime_seconds", "BIGINT"),
    ("device_timestamp", "TEXT"),
];

/// `UPDATE … FROM (VALUES …)`: SQLite (3.33+) and PostgreSQL both name the columns of a
/// `VALUES` list `column1…N`, so one text serves both, placeholders aside.
fn status_update_sql(backend: DbBackend, rows: usize) -> &'static str {
    use std::sync::OnceLock;
    static SQLITE: OnceLock<std::sync::Mutex<HashMap<usize, &'static str>>> = OnceLock::new();
    static POSTGRES: OnceLock<std::sync::Mutex<HashMap<usize, &'static str>>> = OnceLock::new();
    let cell = match backend {
        DbBackend::Postgres => &POSTGRES,
        _ => &SQLITE,
    };
    let mut cache = cell
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry(rows)
        .or_insert_with(|| Box::leak(build_status_update_sql(backend, rows).into_boxed_str()))
}

fn build_status_update_sql(backend: DbBackend, rows: usize) -> String {
    let mut n = 0;
    let mut next = || {
        n += 1;
        placeholder(backend, n)
    };
    let mut sql = format!(
        "UPDATE device_status SET last_seen = {}, updated_at = {}",
        next(),
        next()
    );
    for (i, (column, _)) in REPORT_COLUMNS.iter().enumerate() {
        sql.push_str(&format!(
            ", {column} = COALESCE(v.column{}, device_status.{column})",
            i + 2
        ));
    }
    sql.push_str(" FROM (VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(CAST({} AS INTEGER)", next()));
        for (_, ty) in REPORT_COLUMNS {
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
    let Some(last) = status.last_poll.or(status.last_seen) else {
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
    fn thresholds_prefer_last_poll_over_last_seen() {
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
}
