//! Raw events as CSV, streamed from the database in pages (keyset on the event id), so memory
//! stays flat whatever the size; dropping the stream (a client that went away) stops the query
//! between pages. Also the admin flush that deletes telemetry.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use futures_util::stream::{self, BoxStream, StreamExt};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, QueryResult, Statement, Value};
use serde::Serialize;

use crate::{
    db::{
        entities::{device, machine, outlet},
        placeholder, Db,
    },
    domain::{rollup, stats},
    error::{Error, Result},
};

/// Events per page of an export.
pub const PAGE_ROWS: i64 = 5000;
/// The default `days` of an export.
pub const DEFAULT_DAYS: i64 = 30;

/// The export request as a client states it.
#[derive(Debug, Clone, Default)]
pub struct ExportParams {
    pub device_id: Option<String>,
    pub machine_id: Option<i32>,
    pub outlet_id: Option<i32>,
    pub days: Option<i64>,
    pub start: Option<String>,
    pub end: Option<String>,
}

/// A CSV download: its file name and its body, chunk by chunk.
pub struct CsvExport {
    pub file_name: String,
    pub body: BoxStream<'static, Result<Bytes>>,
}

const HEADER: [&str; 18] = [
    "id",
    "event_id",
    "device_id",
    "machine_id",
    "machine_code",
    "outlet_id",
    "outlet_name",
    "event",
    "treatment",
    "counter",
    "occurred_at",
    "received_at",
    "device_timestamp",
    "count_basic",
    "count_standard",
    "count_premium",
    "wifi_status",
    "payload",
];

const COLUMNS: &str = "id, event_id, device_id, machine_id, outlet_id, event, treatment, counter, \
    occurred_at, received_at, device_timestamp, count_basic, count_standard, count_premium, \
    wifi_status, CAST(payload AS TEXT) AS payload";

/// Names for the ids an event refers to, loaded once per export (fleets are small next to
/// their events).
#[derive(Default)]
struct Names {
    devices: HashMap<i32, String>,
    machines: HashMap<i32, String>,
    outlets: HashMap<i32, String>,
}

impl Names {
    async fn load(conn: &DatabaseConnection) -> Result<Names> {
        Ok(Names {
            devices: device::Entity::find()
                .all(conn)
                .await?
                .into_iter()
                .map(|d| (d.id, d.device_id))
                .collect(),
            machines: machine::Entity::find()
                .all(conn)
                .await?
                .into_iter()
                .map(|m| (m.id, m.machine_code))
                .collect(),
            outlets: outlet::Entity::find()
                .all(conn)
                .await?
                .into_iter()
                .map(|o| (o.id, o.name))
                .collect(),
        })
    }
}

struct Cursor {
    conn: DatabaseConnection,
    names: Names,
    /// The statement text and its values without the keyset value, which comes first.
    sql: String,
    values: Vec<Value>,
    after: i64,
    header: bool,
    done: bool,
}

/// Raw events matching the filters, oldest id first, as CSV. The time range is
/// `start`..`end` (UTC; a bare `end` date includes that day) or the last `days` (default 30);
/// unknown devices, machines and outlets are a 404 before anything is sent.
pub async fn export_events(db: &Db, p: &ExportParams, now: DateTime<Utc>) -> Result<CsvExport> {
    let tz = chrono_tz::Tz::UTC;
    let filter =
        stats::Filter::resolve(db, p.outlet_id, p.machine_id, p.device_id.as_deref()).await?;
    let days = p.days.unwrap_or(DEFAULT_DAYS);
    if !(1..=stats::MAX_DAYS).contains(&days) {
        return Err(Error::invalid(
            "invalid_days",
            format!("days must be between 1 and {}", stats::MAX_DAYS),
        ));
    }
    let end = match p.end.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(e) => {
            let (t, date) = stats::parse_time("end", e, tz)?;
            Some(if date { t + Duration::days(1) } else { t })
        }
        None => None,
    };
    let start = match p.start.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => stats::parse_time("start", s, tz)?.0,
        None => end.unwrap_or(now) - Duration::days(days),
    };
    if end.is_some_and(|e| e <= start) {
        return Err(Error::invalid("invalid_range", "start must be before end"));
    }

    let conn = db.conn().clone();
    let backend = conn.get_database_backend();
    let mut values: Vec<Value> = Vec::new();
    let mut bind = |v: Value| {
        values.push(v);
        // The keyset value is placeholder 1.
        placeholder(backend, values.len() + 1)
    };
    let mut sql = format!(
        "SELECT {COLUMNS} FROM telemetry_events WHERE id > {}",
        placeholder(backend, 1)
    );
    if let Some(d) = filter.device {
        sql.push_str(&format!(" AND device_id = {}", bind(d.into())));
    }
    if let Some(m) = filter.machine {
        sql.push_str(&format!(" AND machine_id = {}", bind(m.into())));
    }
    if let Some(o) = filter.outlet {
        sql.push_str(&format!(" AND outlet_id = {}", bind(o.into())));
    }
    sql.push_str(&format!(
        " AND occurred_epoch >= {}",
        bind(start.timestamp().into())
    ));
    if let Some(end) = end {
        sql.push_str(&format!(
            " AND occurred_epoch < {}",
            bind(end.timestamp().into())
        ));
    }
    sql.push_str(&format!(" ORDER BY id LIMIT {PAGE_ROWS}"));

    let names = Names::load(&conn).await?;
    let file_name = format!(
        "telemetry-{}-{}.csv",
        start.format("%Y%m%d"),
        end.unwrap_or(now).format("%Y%m%d")
    );
    let cursor = Cursor {
        conn,
        names,
        sql,
        values,
        after: 0,
        header: false,
        done: false,
    };
    let body = stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        match next_page(&mut c).await {
            Ok(Some(chunk)) => Some((Ok(chunk), c)),
            Ok(None) => None,
            Err(e) => {
                c.done = true;
                Some((Err(e), c))
            }
        }
    })
    .boxed();
    Ok(CsvExport { file_name, body })
}

async fn next_page(c: &mut Cursor) -> Result<Option<Bytes>> {
    let backend = c.conn.get_database_backend();
    let mut values = Vec::with_capacity(c.values.len() + 1);
    values.push(Value::from(c.after));
    values.extend(c.values.iter().cloned());
    let rows = c
        .conn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            c.sql.clone(),
            values,
        ))
        .await?;
    if (rows.len() as i64) < PAGE_ROWS {
        c.done = true;
    }
    if rows.is_empty() && c.header {
        return Ok(None);
    }
    let mut w = csv::WriterBuilder::new().from_writer(Vec::with_capacity(rows.len() * 160 + 256));
    if !c.header {
        w.write_record(HEADER).map_err(stats::csv_error)?;
        c.header = true;
    }
    for row in &rows {
        c.after = write_row(&mut w, row, &c.names)?;
    }
    let buf = w
        .into_inner()
        .map_err(|e| Error::Internal(format!("csv: {e}")))?;
    Ok(Some(Bytes::from(buf)))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn write_row(w: &mut csv::Writer<Vec<u8>>, r: &QueryResult, names: &Names) -> Result<i64> {
    let id: i64 = r.try_get("", "id")?;
    let device: i32 = r.try_get("", "device_id")?;
    let machine: Option<i32> = r.try_get("", "machine_id")?;
    let outlet: Option<i32> = r.try_get("", "outlet_id")?;
    let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let occurred: DateTime<Utc> = r.try_get("", "occurred_at")?;
    let received: DateTime<Utc> = r.try_get("", "received_at")?;
    let record: [String; 18] = [
        id.to_string(),
        r.try_get("", "event_id")?,
        names.devices.get(&device).cloned().unwrap_or_default(),
        opt(machine),
        opt(machine.and_then(|m| names.machines.get(&m).cloned())),
        opt(outlet),
        opt(outlet.and_then(|o| names.outlets.get(&o).cloned())),
        r.try_get("", "event")?,
        opt(r.try_get::<Option<String>>("", "treatment")?),
        opt(r.try_get::<Option<i64>>("", "counter")?),
        time(occurred),
        time(received),
        opt(r.try_get::<Option<String>>("", "device_timestamp")?),
        opt(r.try_get::<Option<i64>>("", "count_basic")?),
        opt(r.try_get::<Option<i64>>("", "count_standard")?),
        opt(r.try_get::<Option<i64>>("", "count_premium")?),
        opt(r.try_get::<Option<bool>>("", "wifi_status")?),
        opt(r.try_get::<Option<String>>("", "payload")?),
    ];
    w.write_record(&record).map_err(stats::csv_error)?;
    Ok(id)
}

/// The stats answer as a CSV download.
pub async fn export_stats(
    db: &Db,
    p: &stats::StatsParams,
    now: DateTime<Utc>,
) -> Result<CsvExport> {
    let answer = stats::stats(db, p, now).await?;
    let body = stats::stats_csv(&answer)?;
    Ok(CsvExport {
        file_name: stats::csv_file_name("stats", &answer),
        body: stream::once(async move { Ok(Bytes::from(body)) }).boxed(),
    })
}

// ---------------------------------------------------------------------------------------------
// Flush

/// What an admin must type to flush telemetry.
pub const FLUSH_CONFIRMATION: &str = "DELETE ALL TELEMETRY";

#[derive(Debug, Clone, Default)]
pub struct FlushRequest {
    pub confirm: Option<String>,
    /// Only events that happened before this time (a date is its midnight, UTC).
    pub before: Option<String>,
    /// Only this device's events.
    pub device_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flushed {
    pub deleted: u64,
    pub before: Option<String>,
    pub device_id: Option<String>,
}

/// Deletes telemetry events (all of them, or those before `before` and/or of one device) and
/// keeps the rollup exact, in one transaction. `actor` names who asked, for the log.
pub async fn flush(db: &Db, req: &FlushRequest, actor: &str) -> Result<Flushed> {
    if req.confirm.as_deref() != Some(FLUSH_CONFIRMATION) {
        return Err(Error::invalid(
            "confirmation_required",
            format!("to delete telemetry, send {{\"confirm\": \"{FLUSH_CONFIRMATION}\"}}"),
        ));
    }
    let before = match req
        .before
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(b) => Some(stats::parse_time("before", b, chrono_tz::Tz::UTC)?.0),
        None => None,
    };
    let device = match req
        .device_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(d) => Some(crate::domain::devices::find_by_device_id(db.conn(), d).await?),
        None => None,
    };
    let backend = db.conn().get_database_backend();
    let mut conditions: Vec<String> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if let Some(b) = before {
        values.push(b.timestamp().into());
        conditions.push(format!(
            "occurred_epoch < {}",
            placeholder(backend, values.len())
        ));
    }
    if let Some(d) = &device {
        values.push(d.id.into());
        conditions.push(format!(
            "device_id = {}",
            placeholder(backend, values.len())
        ));
    }
    let condition = conditions.join(" AND ");

    let txn = db.begin_write().await?;
    let deleted = if conditions.is_empty() {
        rollup::subtract(&*txn, None).await?;
        txn.execute_unprepared("DELETE FROM telemetry_events")
            .await?
            .rows_affected()
    } else {
        rollup::subtract(
            &*txn,
            Some(rollup::Deleted {
                condition: &condition,
                values: &values,
            }),
        )
        .await?;
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            format!("DELETE FROM telemetry_events WHERE {condition}"),
            values.clone(),
        ))
        .await?
        .rows_affected()
    };
    txn.commit().await?;
    let flushed = Flushed {
        deleted,
        before: before.map(crate::domain::wire_time),
        device_id: device.map(|d| d.device_id),
    };
    tracing::warn!(
        actor,
        deleted,
        before = flushed.before.as_deref().unwrap_or("-"),
        device = flushed.device_id.as_deref().unwrap_or("-"),
        "telemetry flushed"
    );
    Ok(flushed)
}
