//! Raw events as CSV, streamed from the database in pages (keyset on the event id), so memory
//! stays flat whatever the size; dropping the stream (a client that went away) stops the query
//! between pages. Also the admin flush that deletes telemetry.

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sea_orm::{
    sqlx::{self, AssertSqlSafe, Row},
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, RuntimeErr, Statement,
    Value,
};
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

/// The pool an export reads from. Rows are read through sqlx directly, as a stream decoded in
/// place: nothing of a page but its CSV text is held.
enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// A bound value of the export statement (ids and epoch seconds).
#[derive(Clone, Copy)]
enum Bind {
    I32(i32),
    I64(i64),
}

struct Cursor {
    pool: Pool,
    names: Names,
    /// The statement text and its values without the keyset value, which comes first.
    sql: Arc<str>,
    /// On SQLite, the statement that answers a whole page as CSV text (see [`sqlite_csv_page`]).
    csv_sql: Option<Arc<str>>,
    values: Vec<Bind>,
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

    let conn = db.bulk_conn();
    let backend = conn.get_database_backend();
    let mut values: Vec<Bind> = Vec::new();
    let mut bind = |v: Bind| {
        values.push(v);
        // The keyset value is placeholder 1.
        placeholder(backend, values.len() + 1)
    };
    // The conditions after the keyset's `e.id > ?`, on the events table named `e`.
    let mut conditions = String::new();
    if let Some(d) = filter.device {
        conditions.push_str(&format!(" AND e.device_id = {}", bind(Bind::I32(d))));
    }
    if let Some(m) = filter.machine {
        conditions.push_str(&format!(" AND e.machine_id = {}", bind(Bind::I32(m))));
    }
    if let Some(o) = filter.outlet {
        conditions.push_str(&format!(" AND e.outlet_id = {}", bind(Bind::I32(o))));
    }
    conditions.push_str(&format!(
        " AND e.occurred_epoch >= {}",
        bind(Bind::I64(start.timestamp()))
    ));
    if let Some(end) = end {
        conditions.push_str(&format!(
            " AND e.occurred_epoch < {}",
            bind(Bind::I64(end.timestamp()))
        ));
    }
    let keyset = placeholder(backend, 1);
    let sql = format!(
        "SELECT {COLUMNS} FROM telemetry_events e WHERE e.id > {keyset}{conditions} \
         ORDER BY e.id LIMIT {PAGE_ROWS}"
    );
    let csv_sql = (backend == DbBackend::Sqlite).then(|| sqlite_csv_page(&keyset, &conditions));

    let names = Names::load(db.conn()).await?;
    let file_name = format!(
        "telemetry-{}-{}.csv",
        start.format("%Y%m%d"),
        end.unwrap_or(now).format("%Y%m%d")
    );
    let pool = match backend {
        DbBackend::Postgres => Pool::Postgres(conn.get_postgres_connection_pool().clone()),
        _ => Pool::Sqlite(conn.get_sqlite_connection_pool().clone()),
    };
    let cursor = Cursor {
        pool,
        names,
        sql: sql.into(),
        csv_sql: csv_sql.map(Into::into),
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

fn sqlx_error(e: sqlx::Error) -> Error {
    Error::from(DbErr::Query(RuntimeErr::SqlxError(Arc::new(e))))
}

/// One event as the export writes it, borrowed from its database row.
struct EventRow<'r> {
    id: i64,
    event_id: &'r str,
    device: i32,
    machine: Option<i32>,
    outlet: Option<i32>,
    event: &'r str,
    treatment: Option<&'r str>,
    counter: Option<i64>,
    occurred: DateTime<Utc>,
    received: DateTime<Utc>,
    device_timestamp: Option<&'r str>,
    count_basic: Option<i64>,
    count_standard: Option<i64>,
    count_premium: Option<i64>,
    wifi_status: Option<bool>,
    payload: Option<&'r str>,
}

/// Reads an [`EventRow`] from a row of either backend, by column position (see `COLUMNS`).
macro_rules! event_row {
    ($row:expr) => {{
        let r = $row;
        EventRow {
            id: r.try_get(0).map_err(sqlx_error)?,
            event_id: r.try_get(1).map_err(sqlx_error)?,
            device: r.try_get(2).map_err(sqlx_error)?,
            machine: r.try_get(3).map_err(sqlx_error)?,
            outlet: r.try_get(4).map_err(sqlx_error)?,
            event: r.try_get(5).map_err(sqlx_error)?,
            treatment: r.try_get(6).map_err(sqlx_error)?,
            counter: r.try_get(7).map_err(sqlx_error)?,
            occurred: r.try_get(8).map_err(sqlx_error)?,
            received: r.try_get(9).map_err(sqlx_error)?,
            device_timestamp: r.try_get(10).map_err(sqlx_error)?,
            count_basic: r.try_get(11).map_err(sqlx_error)?,
            count_standard: r.try_get(12).map_err(sqlx_error)?,
            count_premium: r.try_get(13).map_err(sqlx_error)?,
            wifi_status: r.try_get(14).map_err(sqlx_error)?,
            payload: r.try_get(15).map_err(sqlx_error)?,
        }
    }};
}

/// The statement of a page with its values bound: the keyset value first, then the filters'.
macro_rules! bound {
    ($c:expr, $sql:expr) => {{
        let mut query = sqlx::query(AssertSqlSafe($sql.clone())).bind($c.after);
        for v in &$c.values {
            query = match *v {
                Bind::I32(v) => query.bind(v),
                Bind::I64(v) => query.bind(v),
            };
        }
        query
    }};
}

/// One page of events as CSV (with the header first); `None` once there is nothing more to
/// send.
async fn next_page(c: &mut Cursor) -> Result<Option<Bytes>> {
    let header = !c.header;
    if let (Pool::Sqlite(pool), Some(sql)) = (&c.pool, &c.csv_sql) {
        let row = bound!(c, sql).fetch_one(pool).await.map_err(sqlx_error)?;
        let rows: i64 = row.try_get(0).map_err(sqlx_error)?;
        let last: Option<i64> = row.try_get(1).map_err(sqlx_error)?;
        let unwritten: i64 = row.try_get(2).map_err(sqlx_error)?;
        let ids: Option<&str> = row.try_get(4).map_err(sqlx_error)?;
        if unwritten == 0 && in_order(ids.unwrap_or_default(), c.after, rows) {
            let text: Option<&str> = row.try_get(3).map_err(sqlx_error)?;
            c.header = true;
            if let Some(last) = last {
                c.after = last;
            }
            if rows < PAGE_ROWS {
                c.done = true;
            }
            if rows == 0 && !header {
                return Ok(None);
            }
            let text = text.unwrap_or_default().as_bytes();
            let mut buf = Vec::with_capacity(text.len() + 256);
            if header {
                buf.extend_from_slice(&header_line()?);
            }
            buf.extend_from_slice(text);
            return Ok(Some(Bytes::from(buf)));
        }
        // A page with a value the statement does not write itself: row by row, below.
    }
    let mut w = csv::WriterBuilder::new()
        .buffer_capacity(64 * 1024)
        .from_writer(Vec::with_capacity(PAGE_ROWS as usize * 192));
    if header {
        w.write_record(HEADER).map_err(stats::csv_error)?;
        c.header = true;
    }
    let mut fields = Fields::default();
    let mut rows = 0i64;
    macro_rules! page {
        ($pool:expr) => {{
            let mut stream = bound!(c, c.sql).fetch($pool);
            while let Some(row) = stream.try_next().await.map_err(sqlx_error)? {
                let event = event_row!(&row);
                fields.write(&mut w, &event, &c.names)?;
                c.after = event.id;
                rows += 1;
            }
        }};
    }
    match &c.pool {
        Pool::Sqlite(pool) => page!(pool),
        Pool::Postgres(pool) => page!(pool),
    }
    if rows < PAGE_ROWS {
        c.done = true;
    }
    if rows == 0 && !header {
        return Ok(None);
    }
    let buf = w
        .into_inner()
        .map_err(|e| Error::Internal(format!("csv: {e}")))?;
    Ok(Some(Bytes::from(buf)))
}

/// Whether `ids` (comma-separated) are `rows` ids, each greater than the one before, the
/// first greater than `after`.
fn in_order(ids: &str, after: i64, rows: i64) -> bool {
    let mut last = after;
    let mut count = 0;
    for id in ids.split(',').filter(|s| !s.is_empty()) {
        match id.parse::<i64>() {
            Ok(id) if id > last => last = id,
            _ => return false,
        }
        count += 1;
    }
    count == rows
}

/// The header row as CSV.
fn header_line() -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(HEADER).map_err(stats::csv_error)?;
    w.into_inner()
        .map_err(|e| Error::Internal(format!("csv: {e}")))
}

/// On SQLite, the statement that writes a whole page as CSV and answers it as one text value,
/// with the page's row count, its last id, how many of its rows it could not write and the ids
/// in the order their lines were joined (SQLite joins them in the order the subquery hands them
/// over, but promises no order; a page whose ids are not in order is written row by row). Handing
/// 5,000 rows to the driver one by one (each crossing from SQLite's thread) costs more than
/// writing them, so SQLite writes the page itself, exactly as [`Fields::write`] does: the csv
/// crate's quoting (a field with a quote, comma, CR or LF is quoted and its quotes doubled),
/// nulls as empty fields, booleans as `true`/`false`, and times in the one form the database
/// layer stores them (`…+00:00`, a fraction of 3, 6 or 9 digits only when there is one)
/// rewritten with `Z`. A time in any other form counts its row as not written, and the page is
/// then written row by row.
fn sqlite_csv_page(keyset: &str, conditions: &str) -> String {
    fn text(x: &str) -> String {
        format!(
            "CASE WHEN instr({x}, '\"') OR instr({x}, ',') OR instr({x}, char(10)) \
             OR instr({x}, char(13)) THEN '\"' || replace({x}, '\"', '\"\"') || '\"' \
             ELSE {x} END"
        )
    }
    fn time(x: &str) -> String {
        format!("substr({x}, 1, length({x}) - 6), 'Z'")
    }
    fn stored_time(x: &str) -> String {
        format!(
            "length({x}) IN (25, 29, 32, 35) AND substr({x}, 11, 1) = 'T' \
             AND substr({x}, -6) = '+00:00'"
        )
    }
    // `concat` takes a null for the empty field and builds the line in one piece.
    let fields = [
        "e.id".to_owned(),
        text("e.event_id"),
        text("d.device_id"),
        "e.machine_id".to_owned(),
        text("m.machine_code"),
        "e.outlet_id".to_owned(),
        text("o.name"),
        text("e.event"),
        text("e.treatment"),
        "e.counter".to_owned(),
        time("e.occurred_at"),
        time("e.received_at"),
        text("e.device_timestamp"),
        "e.count_basic".to_owned(),
        "e.count_standard".to_owned(),
        "e.count_premium".to_owned(),
        "CASE WHEN e.wifi_status THEN 'true' WHEN NOT e.wifi_status THEN 'false' END".to_owned(),
        text("CAST(e.payload AS TEXT)"),
    ];
    debug_assert_eq!(fields.len(), HEADER.len());
    let line = fields.join(", ',', ");
    let (occurred, received) = (stored_time("e.occurred_at"), stored_time("e.received_at"));
    format!(
        "SELECT count(*), max(id), coalesce(sum(odd), 0), group_concat(line, ''), \
         group_concat(id, ',') FROM (SELECT e.id AS id, \
         CASE WHEN {occurred} AND {received} THEN 0 ELSE 1 END AS odd, \
         concat({line}, char(10)) AS line FROM telemetry_events e \
         LEFT JOIN devices d ON d.id = e.device_id \
         LEFT JOIN machines m ON m.id = e.machine_id \
         LEFT JOIN outlets o ON o.id = e.outlet_id \
         WHERE e.id > {keyset}{conditions} ORDER BY e.id LIMIT {PAGE_ROWS})"
    )
}

/// Scratch space for formatting a row's fields without allocating.
#[derive(Default)]
struct Fields {
    int: itoa::Buffer,
    time: [u8; TIME_LEN],
}

impl Fields {
    fn write(
        &mut self,
        w: &mut csv::Writer<Vec<u8>>,
        e: &EventRow<'_>,
        names: &Names,
    ) -> Result<()> {
        let names_device = name(&names.devices, Some(e.device));
        let machine_code = name(&names.machines, e.machine);
        let outlet_name = name(&names.outlets, e.outlet);
        let field = |w: &mut csv::Writer<Vec<u8>>, bytes: &[u8]| {
            w.write_field(bytes).map_err(stats::csv_error)
        };
        field(w, self.int.format(e.id).as_bytes())?;
        field(w, e.event_id.as_bytes())?;
        field(w, names_device.as_bytes())?;
        field(w, int(&mut self.int, e.machine))?;
        field(w, machine_code.as_bytes())?;
        field(w, int(&mut self.int, e.outlet))?;
        field(w, outlet_name.as_bytes())?;
        field(w, e.event.as_bytes())?;
        field(w, e.treatment.unwrap_or_default().as_bytes())?;
        field(w, int(&mut self.int, e.counter))?;
        field(w, &time(&mut self.time, e.occurred))?;
        field(w, &time(&mut self.time, e.received))?;
        field(w, e.device_timestamp.unwrap_or_default().as_bytes())?;
        field(w, int(&mut self.int, e.count_basic))?;
        field(w, int(&mut self.int, e.count_standard))?;
        field(w, int(&mut self.int, e.count_premium))?;
        field(
            w,
            match e.wifi_status {
                Some(true) => b"true",
                Some(false) => b"false",
                None => b"",
            },
        )?;
        field(w, e.payload.unwrap_or_default().as_bytes())?;
        w.write_record(None::<&[u8]>).map_err(stats::csv_error)
    }
}

/// The name of an id (empty if there is no id or no such name).
fn name(map: &HashMap<i32, String>, id: Option<i32>) -> &str {
    id.and_then(|id| map.get(&id)).map_or("", String::as_str)
}

/// A nullable integer as text; null is the empty field.
fn int<I: itoa::Integer>(buf: &mut itoa::Buffer, v: Option<I>) -> &[u8] {
    match v {
        Some(v) => buf.format(v).as_bytes(),
        None => b"",
    }
}

/// The longest time [`time`] writes itself: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const TIME_LEN: usize = 30;

/// A time as RFC 3339 in UTC, the same text as
/// `to_rfc3339_opts(SecondsFormat::AutoSi, true)` (a fraction of 3, 6 or 9 digits, only when
/// there is one), written digit by digit; years outside 0–9999 and leap seconds are left to
/// chrono.
fn time(buf: &mut [u8; TIME_LEN], t: DateTime<Utc>) -> std::borrow::Cow<'_, [u8]> {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t
            .to_rfc3339_opts(SecondsFormat::AutoSi, true)
            .into_bytes()
            .into();
    }
    fn digits(out: &mut [u8], mut v: u32) {
        for b in out.iter_mut().rev() {
            *b = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    digits(&mut buf[0..4], year as u32);
    buf[4] = b'-';
    digits(&mut buf[5..7], t.month());
    buf[7] = b'-';
    digits(&mut buf[8..10], t.day());
    buf[10] = b'T';
    digits(&mut buf[11..13], t.hour());
    buf[13] = b':';
    digits(&mut buf[14..16], t.minute());
    buf[16] = b':';
    digits(&mut buf[17..19], t.second());
    let mut len = 19;
    let (fraction, places) = if nanos == 0 {
        (0, 0)
    } else if nanos % 1_000_000 == 0 {
        (nanos / 1_000_000, 3)
    } else if nanos % 1_000 == 0 {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if places > 0 {
        buf[len] = b'.';
        digits(&mut buf[len + 1..len + 1 + places], fraction);
        len += 1 + places;
    }
    buf[len] = b'Z';
    std::borrow::Cow::Borrowed(&buf[..len + 1])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ids_must_follow_each_other() {
        assert!(in_order("", 7, 0));
        assert!(in_order("8,9,12", 7, 3));
        assert!(!in_order("8,9,12", 7, 2));
        assert!(!in_order("8,12,9", 7, 3));
        assert!(!in_order("7,9", 7, 2));
        assert!(!in_order("8,8", 0, 2));
        assert!(!in_order("8,x", 0, 2));
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let mut buf = [0u8; TIME_LEN];
        let base = DateTime::parse_from_rfc3339("2025-03-30T01:59:59Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut cases = vec![
            base,
            DateTime::<Utc>::from_timestamp(0, 0).unwrap(),
            DateTime::<Utc>::from_timestamp(253_402_300_799, 999_999_999).unwrap(),
            DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap(),
            DateTime::<Utc>::from_timestamp(-62_167_219_200 - 86_400, 5_000).unwrap(),
            DateTime::<Utc>::from_timestamp(253_402_300_800, 1_000_000).unwrap(),
        ];
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let secs = (seed % 4_000_000_000) as i64;
            let nanos = match seed % 4 {
                0 => 0,
                1 => (seed % 1000) as u32 * 1_000_000,
                2 => (seed % 1_000_000) as u32 * 1_000,
                _ => (seed % 1_000_000_000) as u32,
            };
            cases.push(DateTime::<Utc>::from_timestamp(secs, nanos).unwrap());
        }
        for t in cases {
            let expected = t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
            assert_eq!(
                std::str::from_utf8(&time(&mut buf, t)).unwrap(),
                expected,
                "{t:?}"
            );
        }
    }
}
