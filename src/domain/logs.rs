//! A machine's treatment log: its treatment and reset entries, newest first, each with the
//! device's cumulative Basic/Standard/Premium counters at that point, and a summary.
//!
//! The cumulative counters are computed here, walking the entries in the order they happened
//! (`occurred_epoch`, then arrival): an entry that carries the device's own counters (an event's
//! `current_counters`, the counts of a legacy `/api/iot/` reading, or the counters a reset
//! result reported — zero when it reported none) takes them as they are; any other treatment
//! adds one to the previous entry of the same device. The walk starts from the nearest earlier
//! entry that carries counters, so a page costs what lies between it and that entry.
//!
//! A machine shows only what was attributed to it: each device's entries for the time it was
//! bound there.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, EntityTrait, QueryResult, Statement, Value};
use serde::Serialize;

use crate::{
    db::{
        entities::{device, device_status, machine},
        placeholder, Db,
    },
    domain::{events::Counters, stats::devices_of_machine, stats::Totals},
    error::{Entity, Error, Result},
};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub id: i64,
    pub event_id: String,
    pub device_id: String,
    /// `treatment` or `reset`.
    pub event: String,
    pub treatment: Option<String>,
    /// The device's own treatment counter, when it sent one.
    pub counter: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// The device's counters after this entry.
    pub cumulative: Counters,
    /// Whether `cumulative` are counters the device (or its reset result) reported, rather
    /// than counted here.
    pub reported: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogSummary {
    /// Every treatment attributed to the machine, from the events.
    pub totals: Totals,
    /// The device the machine carries now, and its counters as its status last reported them.
    pub current_device_id: Option<String>,
    pub current_counters: Option<Counters>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineLogs {
    pub machine_id: i32,
    /// Entries in the whole log (not just this page).
    pub count: u64,
    pub entries: Vec<LogEntry>,
    pub summary: LogSummary,
}

/// Rows read per step of the backwards walk to the last reported counters.
const WALK_PAGE: u64 = 5000;

const COLUMNS: &str = "id, device_id, event_id, event, treatment, counter, occurred_epoch, \
    occurred_at, received_at, count_basic, count_standard, count_premium, \
    CAST(payload AS TEXT) AS payload";

struct Row {
    id: i64,
    device: i32,
    event_id: String,
    event: String,
    treatment: Option<String>,
    counter: Option<i64>,
    epoch: i64,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    reported: Option<Counters>,
}

impl Row {
    fn read(r: &QueryResult) -> Result<Row> {
        let event: String = r.try_get("", "event")?;
        let counts = (
            r.try_get::<Option<i64>>("", "count_basic")?,
            r.try_get::<Option<i64>>("", "count_standard")?,
            r.try_get::<Option<i64>>("", "count_premium")?,
        );
        let payload: Option<String> = r.try_get("", "payload")?;
        let reported = match counts {
            (Some(basic), Some(standard), Some(premium)) => Some(Counters {
                basic,
                standard,
                premium,
            }),
            _ if event == "reset" => {
                Some(payload_counters(payload.as_deref()).unwrap_or(Counters::ZERO))
            }
            _ => payload_counters(payload.as_deref()),
        };
        Ok(Row {
            id: r.try_get("", "id")?,
            device: r.try_get("", "device_id")?,
            event_id: r.try_get("", "event_id")?,
            event,
            treatment: r.try_get("", "treatment")?,
            counter: r.try_get("", "counter")?,
            epoch: r.try_get("", "occurred_epoch")?,
            occurred_at: r.try_get("", "occurred_at")?,
            received_at: r.try_get("", "received_at")?,
            reported,
        })
    }

    /// The counters after this row, given those before it.
    fn apply(&self, before: Counters) -> Counters {
        if let Some(c) = self.reported {
            return c;
        }
        let mut after = before;
        if self.event == "treatment" {
            match self.treatment.as_deref() {
                Some("BASIC") => after.basic += 1,
                Some("STANDARD") => after.standard += 1,
                Some("PREMIUM") => after.premium += 1,
                _ => {}
            }
        }
        after
    }
}

/// `current_counters` of a stored payload, when it is an object of counters.
fn payload_counters(payload: Option<&str>) -> Option<Counters> {
    let text = payload?;
    if !text.contains("current_counters") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let counters = value.get("current_counters")?;
    if !counters.is_object() {
        return None;
    }
    serde_json::from_value::<Counters>(counters.clone())
        .ok()
        .filter(|c| c.basic >= 0 && c.standard >= 0 && c.premium >= 0)
}

fn list(backend: sea_orm::DbBackend, from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| placeholder(backend, i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One page (`limit`, `offset`) of a machine's log, newest first, with its summary.
pub async fn machine_logs(
    db: &Db,
    machine_id: i32,
    limit: u64,
    offset: u64,
) -> Result<MachineLogs> {
    let conn = db.conn();
    let backend = conn.get_database_backend();
    let machine = machine::Entity::find_by_id(machine_id)
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Machine, machine_id.to_string()))?;
    let bound = devices_of_machine(conn, machine_id).await?;
    let names: HashMap<i32, String> = if bound.is_empty() {
        HashMap::new()
    } else {
        use sea_orm::{ColumnTrait, QueryFilter};
        device::Entity::find()
            .filter(device::Column::Id.is_in(bound.clone()))
            .all(conn)
            .await?
            .into_iter()
            .map(|d| (d.id, d.device_id))
            .collect()
    };
    let current_counters = match machine.current_device_id {
        Some(d) => device_status::Entity::find_by_id(d)
            .one(conn)
            .await?
            .map(|s| Counters {
                basic: s.current_count_basic,
                standard: s.current_count_standard,
                premium: s.current_count_premium,
            }),
        None => None,
    };
    let mut summary = LogSummary {
        totals: Totals::default(),
        current_device_id: machine
            .current_device_id
            .and_then(|d| names.get(&d).cloned()),
        current_counters,
    };
    if bound.is_empty() {
        return Ok(MachineLogs {
            machine_id,
            count: 0,
            entries: Vec::new(),
            summary,
        });
    }

    // The log's rows: attributed to this machine, of a device bound to it. The device ids
    // let the unique (device, event_id) index find them; events have no per-device time index
    // (it would cost ingest a page per device and commit), so a device's rows are sorted here,
    // and `+` keeps SQLite from walking the global time index instead.
    let where_sql = format!(
        "machine_id = {} AND device_id IN ({}) AND event IN ('treatment', 'reset')",
        placeholder(backend, 1),
        list(backend, 2, bound.len())
    );
    let mut base: Vec<Value> = vec![machine_id.into()];
    base.extend(bound.iter().map(|d| Value::from(*d)));
    let next = base.len() + 1;

    let count: i64 = conn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!("SELECT COUNT(*) AS n FROM telemetry_events WHERE {where_sql}"),
            base.clone(),
        ))
        .await?
        .map(|r| r.try_get("", "n"))
        .transpose()?
        .unwrap_or(0);

    for row in conn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT treatment, CAST(SUM(count) AS BIGINT) AS n FROM stats_hourly \
                 WHERE machine_id = {} AND device_id IN ({}) GROUP BY treatment",
                placeholder(backend, 1),
                list(backend, 2, bound.len())
            ),
            base.clone(),
        ))
        .await?
    {
        let n: i64 = row.try_get("", "n")?;
        match row.try_get::<i16>("", "treatment")? {
            0 => summary.totals.basic += n,
            1 => summary.totals.standard += n,
            2 => summary.totals.premium += n,
            _ => {}
        }
    }
    summary.totals.total = summary.totals.basic + summary.totals.standard + summary.totals.premium;

    let mut values = base.clone();
    values.push((limit as i64).into());
    values.push((offset as i64).into());
    let page: Vec<Row> = conn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT {COLUMNS} FROM telemetry_events WHERE {where_sql} \
                 ORDER BY +occurred_epoch DESC, +id DESC LIMIT {} OFFSET {}",
                placeholder(backend, next),
                placeholder(backend, next + 1)
            ),
            values,
        ))
        .await?
        .iter()
        .map(Row::read)
        .collect::<Result<_>>()?;

    // Each device's counters just before its oldest row on this page.
    let mut state: HashMap<i32, Counters> = HashMap::new();
    for row in page.iter().rev() {
        if state.contains_key(&row.device) {
            continue;
        }
        let before = counters_before(conn, machine_id, row).await?;
        state.insert(row.device, before);
    }
    let mut entries: Vec<LogEntry> = Vec::with_capacity(page.len());
    for row in page.into_iter().rev() {
        let before = state.get(&row.device).copied().unwrap_or(Counters::ZERO);
        let after = row.apply(before);
        state.insert(row.device, after);
        entries.push(LogEntry {
            id: row.id,
            event_id: row.event_id,
            device_id: names.get(&row.device).cloned().unwrap_or_default(),
            event: row.event,
            treatment: row.treatment,
            counter: row.counter,
            occurred_at: row.occurred_at,
            received_at: row.received_at,
            cumulative: after,
            reported: row.reported.is_some(),
        });
    }
    entries.reverse();
    Ok(MachineLogs {
        machine_id,
        count: count.max(0) as u64,
        entries,
        summary,
    })
}

/// The device's counters just before `row` in this machine's log: the nearest earlier entry
/// with reported counters, plus the treatments after it (zero when there is no such entry).
async fn counters_before(
    conn: &impl ConnectionTrait,
    machine_id: i32,
    row: &Row,
) -> Result<Counters> {
    let backend = conn.get_database_backend();
    let p = |n| placeholder(backend, n);
    let sql = format!(
        "SELECT {COLUMNS} FROM telemetry_events WHERE machine_id = {} AND device_id = {} \
         AND event IN ('treatment', 'reset') \
         AND (occurred_epoch < {} OR (occurred_epoch = {} AND id < {})) \
         ORDER BY +occurred_epoch DESC, +id DESC LIMIT {}",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    );
    let (mut epoch, mut id) = (row.epoch, row.id);
    let mut added = Counters::ZERO;
    loop {
        let rows = conn
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql.clone(),
                [
                    Value::from(machine_id),
                    row.device.into(),
                    epoch.into(),
                    epoch.into(),
                    id.into(),
                    (WALK_PAGE as i64).into(),
                ],
            ))
            .await?;
        let done = (rows.len() as u64) < WALK_PAGE;
        for r in &rows {
            let earlier = Row::read(r)?;
            if let Some(c) = earlier.reported {
                return Ok(Counters {
                    basic: c.basic + added.basic,
                    standard: c.standard + added.standard,
                    premium: c.premium + added.premium,
                });
            }
            added = earlier.apply(added);
            (epoch, id) = (earlier.epoch, earlier.id);
        }
        if done {
            return Ok(added);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_payloads_that_carry_them() {
        assert_eq!(
            payload_counters(Some(r#"{"current_counters": {"basic": 4, "premium": 1}}"#)),
            Some(Counters {
                basic: 4,
                standard: 0,
                premium: 1
            })
        );
        assert_eq!(
            payload_counters(Some(r#"{"current_counters": null}"#)),
            None
        );
        assert_eq!(payload_counters(Some(r#"{"counter": 3}"#)), None);
        assert_eq!(payload_counters(None), None);
    }
}
