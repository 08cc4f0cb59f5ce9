//! Event ingest: validation, attribution to the machine bound when the event happened, and a
//! group-commit writer that acknowledges events only after their transaction is committed.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use sea_orm::{
    sea_query::{Expr, ExprTrait},
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, Statement, Value,
};
use serde::Deserialize;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::{
    db::{
        entities::{device, device_status, machine, machine_device},
        Db,
    },
    domain::devices::{self, AuthenticatedDevice, Mac},
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    Basic,
    Standard,
    Premium,
}

impl Treatment {
    pub fn parse(s: &str) -> Option<Treatment> {
        match s.trim().to_ascii_uppercase().as_str() {
            "BASIC" => Some(Treatment::Basic),
            "STANDARD" => Some(Treatment::Standard),
            "PREMIUM" => Some(Treatment::Premium),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Treatment::Basic => "BASIC",
            Treatment::Standard => "STANDARD",
            Treatment::Premium => "PREMIUM",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Treatment,
    Status,
    Reset,
}

impl EventKind {
    pub fn parse(s: &str) -> Option<EventKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "treatment" => Some(EventKind::Treatment),
            "status" | "heartbeat" => Some(EventKind::Status),
            "reset" => Some(EventKind::Reset),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Treatment => "treatment",
            EventKind::Status => "status",
            EventKind::Reset => "reset",
        }
    }
}

/// The device's own counters; when reported they are the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Counters {
    #[serde(default)]
    pub basic: i64,
    #[serde(default)]
    pub standard: i64,
    #[serde(default)]
    pub premium: i64,
}

impl Counters {
    pub const ZERO: Counters = Counters {
        basic: 0,
        standard: 0,
        premium: 0,
    };

    pub fn validate(self) -> Result<Counters> {
        if self.basic < 0 || self.standard < 0 || self.premium < 0 {
            return Err(Error::invalid(
                "invalid_counters",
                "current_counters must not be negative",
            ));
        }
        Ok(self)
    }
}

/// Reads `current_counters`, which must be an object (`null` or absent means not reported).
pub fn counters_object<'de, D>(deserializer: D) -> std::result::Result<Option<Counters>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    match Option::<Json>::deserialize(deserializer)? {
        None | Some(Json::Null) => Ok(None),
        Some(object @ Json::Object(_)) => serde_json::from_value(object)
            .map(Some)
            .map_err(D::Error::custom),
        Some(_) => Err(D::Error::custom(
            "current_counters must be an object {basic, standard, premium}",
        )),
    }
}

/// What an event tells about its device, applied to `device_status` when the event is new.
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

/// An event ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub device: i32,
    pub event_id: String,
    pub kind: EventKind,
    pub treatment: Option<Treatment>,
    pub counter: Option<i64>,
    pub event_type: Option<String>,
    pub legacy_counts: Option<Counters>,
    pub occurred_at: DateTime<Utc>,
    pub device_timestamp: Option<String>,
    pub received_at: DateTime<Utc>,
    pub wifi_status: Option<bool>,
    pub payload: Option<Json>,
    pub report: StatusReport,
}

/// The events body firmware posts over HTTP (and later MQTT).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceEvent {
    pub device_id: Option<String>,
    pub firmware: Option<String>,
    pub event_id: Option<Json>,
    pub event: Option<String>,
    pub treatment: Option<String>,
    pub counter: Option<i64>,
    pub ts: Option<Json>,
    #[serde(default, deserialize_with = "counters_object")]
    pub current_counters: Option<Counters>,
    #[serde(alias = "wifi_status")]
    pub wifi_connected: Option<bool>,
    pub rtc_available: Option<bool>,
    #[serde(alias = "sd_available")]
    pub sd_card_available: Option<bool>,
    pub uptime_seconds: Option<i64>,
}

const EVENT_ID_MAX: usize = 128;

fn event_id_of(value: Option<&Json>) -> Result<String> {
    let id = match value {
        Some(Json::String(s)) => s.trim().to_owned(),
        // Some firmware sends a sequence number rather than a string.
        Some(Json::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(Error::invalid(
                "invalid_event_id",
                "event_id must be a string",
            ))
        }
        None => String::new(),
    };
    if id.is_empty() {
        return Err(Error::invalid("missing_event_id", "event_id is required"));
    }
    if id.len() > EVENT_ID_MAX {
        return Err(Error::invalid(
            "invalid_event_id",
            format!("event_id is longer than {EVENT_ID_MAX} bytes"),
        ));
    }
    Ok(id)
}

/// Device clocks without an RTC report 1970 or garbage: such times are kept as
/// `device_timestamp` and the event is dated by its arrival.
pub fn plausible_time(ts: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    let floor = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).single();
    floor.is_some_and(|floor| ts >= floor) && ts <= now + Duration::days(1)
}

/// Parses the timestamp forms firmware sends: RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC), or Unix
/// seconds.
pub fn parse_device_time(value: &Json) -> (Option<String>, Option<DateTime<Utc>>) {
    match value {
        Json::String(s) => {
            let s = s.trim();
            let parsed = DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .ok()
                .or_else(|| {
                    [
                        "%Y-%m-%d %H:%M:%S",
                        "%Y-%m-%dT%H:%M:%S",
                        "%Y-%m-%d %H:%M:%S%.f",
                    ]
                    .iter()
                    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
                    .map(|n| n.and_utc())
                });
            (Some(truncate(s, 64)), parsed)
        }
        Json::Number(n) => {
            let parsed = n
                .as_i64()
                .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0));
            (Some(n.to_string()), parsed)
        }
        Json::Null => (None, None),
        other => (Some(truncate(&other.to_string(), 64)), None),
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

impl NewEvent {
    /// Validates an events body posted by an authenticated device.
    pub fn from_device(
        device: &AuthenticatedDevice,
        body: DeviceEvent,
        payload: Json,
        received_at: DateTime<Utc>,
    ) -> Result<NewEvent> {
        if let Some(device_id) = body.device_id.as_deref() {
            device.ensure_is(device_id)?;
        }
        let event_id = event_id_of(body.event_id.as_ref())?;
        let kind = match body.event.as_deref() {
            None => EventKind::Treatment,
            Some(e) => EventKind::parse(e).ok_or_else(|| {
                Error::invalid(
                    "invalid_event",
                    format!("event `{e}` is not one of treatment, status, reset"),
                )
            })?,
        };
        let treatment = match (kind, body.treatment.as_deref()) {
            (_, Some(t)) => Some(Treatment::parse(t).ok_or_else(|| {
                Error::invalid(
                    "invalid_treatment",
                    format!("treatment `{t}` is not one of BASIC, STANDARD, PREMIUM"),
                )
            })?),
            (EventKind::Treatment, None) => {
                return Err(Error::invalid(
                    "missing_treatment",
                    "a treatment event needs `treatment` (BASIC, STANDARD or PREMIUM)",
                ))
            }
            (_, None) => None,
        };
        if body.counter.is_some_and(|c| c < 0) {
            return Err(Error::invalid(
                "invalid_counter",
                "counter must not be negative",
            ));
        }
        let counters = body.current_counters.map(Counters::validate).transpose()?;
        let (device_timestamp, parsed) = match &body.ts {
            Some(ts) => parse_device_time(ts),
            None => (None, None),
        };
        let occurred_at = parsed
            .filter(|t| plausible_time(*t, received_at))
            .unwrap_or(received_at);
        let firmware = clean_text(body.firmware.as_deref(), 64);
        Ok(NewEvent {
            device: device.id,
            event_id,
            kind,
            treatment,
            counter: body.counter,
            event_type: None,
            legacy_counts: None,
            occurred_at,
            device_timestamp: device_timestamp.clone(),
            received_at,
            wifi_status: body.wifi_connected,
            payload: Some(payload),
            report: StatusReport {
                firmware,
                counters,
                wifi_connected: body.wifi_connected,
                rtc_available: body.rtc_available,
                sd_card_available: body.sd_card_available,
                uptime_seconds: body.uptime_seconds.filter(|u| *u >= 0),
                device_timestamp,
            },
        })
    }
}

fn clean_text(s: Option<&str>, max: usize) -> Option<String> {
    s.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| truncate(s, max))
}

/// The legacy `/api/iot/` form.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct LegacyReading {
    pub mode: Option<String>,
    pub macaddr: Option<String>,
    pub type1: Option<String>,
    pub type2: Option<String>,
    pub type3: Option<String>,
    pub count1: Option<String>,
    pub count2: Option<String>,
    pub count3: Option<String>,
    pub timestamp: Option<String>,
    pub rtc_available: Option<String>,
    pub sd_available: Option<String>,
}

fn form_count(name: &str, value: Option<&str>) -> Result<i64> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(0),
        Some(v) => {
            v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                Error::invalid("invalid_count", format!("{name} `{v}` is not a count"))
            })
        }
    }
}

fn form_bool(value: Option<&str>) -> Option<bool> {
    match value?.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Stores a legacy form reading. It carries no event id, so one is derived from its content:
/// a resend of the same reading is a duplicate.
pub async fn ingest_legacy(
    db: &Db,
    ingestor: &Ingestor,
    reading: LegacyReading,
    received_at: DateTime<Utc>,
) -> Result<Ingested> {
    let mac_input = reading
        .macaddr
        .as_deref()
        .ok_or_else(|| Error::invalid("missing_field", "macaddr is required"))?;
    let mac = Mac::parse(mac_input)?;
    let mode = reading
        .mode
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Error::invalid("missing_field", "mode is required"))?;
    let (kind, treatment) = if mode.eq_ignore_ascii_case("status") {
        (EventKind::Status, None)
    } else {
        let t = Treatment::parse(mode).ok_or_else(|| {
            Error::invalid(
                "invalid_mode",
                format!("mode `{mode}` is not one of BASIC, STANDARD, PREMIUM, status"),
            )
        })?;
        (EventKind::Treatment, Some(t))
    };
    let counts = Counters {
        basic: form_count("count1", reading.count1.as_deref())?,
        standard: form_count("count2", reading.count2.as_deref())?,
        premium: form_count("count3", reading.count3.as_deref())?,
    };
    let (device_timestamp, parsed) = match reading.timestamp.as_deref() {
        Some(ts) => parse_device_time(&Json::String(ts.to_owned())),
        None => (None, None),
    };
    let occurred_at = parsed
        .filter(|t| plausible_time(*t, received_at))
        .unwrap_or(received_at);
    let payload = serde_json::to_value(&reading).unwrap_or(Json::Null);
    let event_id = {
        let mut hasher = Sha256::new();
        hasher.update(mac.as_str().as_bytes());
        for part in [
            Some(mode),
            reading.type1.as_deref(),
            reading.type2.as_deref(),
            reading.type3.as_deref(),
            reading.count1.as_deref(),
            reading.count2.as_deref(),
            reading.count3.as_deref(),
            reading.timestamp.as_deref(),
        ] {
            hasher.update([0x1f]);
            hasher.update(part.unwrap_or("").trim().as_bytes());
        }
        format!("iot-{}", &hex::encode(hasher.finalize())[..32])
    };
    let device = devices::find_or_register_by_mac(db, &mac, received_at).await?;
    let event = NewEvent {
        device: device.id,
        event_id,
        kind,
        treatment,
        counter: None,
        event_type: Some(treatment.map_or("status", Treatment::as_str).to_owned()),
        legacy_counts: Some(counts),
        occurred_at,
        device_timestamp: device_timestamp.clone(),
        received_at,
        wifi_status: Some(true),
        payload: Some(payload),
        report: StatusReport {
            counters: Some(counts),
            wifi_connected: Some(true),
            rtc_available: form_bool(reading.rtc_available.as_deref()),
            sd_card_available: form_bool(reading.sd_available.as_deref()),
            device_timestamp,
            ..Default::default()
        },
    };
    ingestor.submit(event).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    Stored,
    Duplicate,
}

struct Job {
    event: NewEvent,
    done: oneshot::Sender<Result<Ingested>>,
}

/// Hands events to the group-commit writer.
#[derive(Clone)]
pub struct Ingestor {
    tx: mpsc::Sender<Job>,
    stop: std::sync::Arc<Notify>,
}

impl Ingestor {
    /// Starts the writer. At most `batch_max` events share a transaction; a batch is whatever
    /// queued while the previous commit was in flight, so an idle server commits each event at
    /// once and a busy one amortises the fsync.
    pub fn start(db: Db, batch_max: usize) -> (Ingestor, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(batch_max.max(1) * 8);
        let stop = std::sync::Arc::new(Notify::new());
        let task = tokio::spawn(run_writer(db, rx, batch_max.max(1), stop.clone()));
        (Ingestor { tx, stop }, task)
    }

    /// Resolves once the event is durably stored (or known to be a duplicate).
    pub async fn submit(&self, event: NewEvent) -> Result<Ingested> {
        let (done, outcome) = oneshot::channel();
        self.tx
            .send(Job { event, done })
            .await
            .map_err(|_| Error::Unavailable)?;
        outcome.await.map_err(|_| Error::Unavailable)?
    }

    /// Stops accepting events; everything already queued is still committed.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

async fn run_writer(
    db: Db,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    stop: std::sync::Arc<Notify>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                job = rx.recv() => job,
                _ = stop.notified() => {
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        let mut jobs = vec![first];
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let events: Vec<&NewEvent> = jobs.iter().map(|j| &j.event).collect();
        match commit_batch(&db, &events).await {
            Ok(outcomes) => {
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.done.send(Ok(outcome));
                }
            }
            Err(err) if jobs.len() > 1 => {
                // One bad event must not fail its neighbours: retry them one by one.
                tracing::warn!(error = %err, size = jobs.len(), "event batch failed; committing individually");
                for job in jobs {
                    let outcome = commit_batch(&db, &[&job.event])
                        .await
                        .map(|mut o| o.pop().unwrap_or(Ingested::Duplicate));
                    let _ = job.done.send(outcome);
                }
            }
            Err(err) => {
                for job in jobs {
                    let _ = job.done.send(Err(Error::Internal(err.to_string())));
                }
            }
        }
    }
}

/// Commits a batch in one transaction and says, per event, whether it was new.
async fn commit_batch(db: &Db, events: &[&NewEvent]) -> Result<Vec<Ingested>> {
    let now = Utc::now();
    // Repeats within the batch: the first occurrence is the one that may be new.
    let mut first_seen: HashSet<(i32, &str)> = HashSet::with_capacity(events.len());
    let candidates: Vec<&NewEvent> = events
        .iter()
        .copied()
        .filter(|e| first_seen.insert((e.device, e.event_id.as_str())))
        .collect();
    let mut device_ids: Vec<i32> = events.iter().map(|e| e.device).collect();
    device_ids.sort_unstable();
    device_ids.dedup();

    let txn = db.begin_write().await?;
    let earliest = candidates
        .iter()
        .map(|e| e.occurred_at)
        .min()
        .unwrap_or(now);
    let attribution = Attribution::load(&*txn, &device_ids, earliest).await?;
    let mut inserted: HashSet<(i32, String)> = HashSet::with_capacity(candidates.len());
    for chunk in insert_chunks(&candidates) {
        inserted.extend(insert_events(&*txn, chunk, &attribution).await?);
    }

    // Device status: the newest report of each device wins; every sender was seen now.
    let mut reports: HashMap<i32, StatusReport> = HashMap::new();
    for event in &candidates {
        if inserted.contains(&(event.device, event.event_id.clone())) {
            merge_report(reports.entry(event.device).or_default(), &event.report);
        }
    }
    for device in &device_ids {
        let report = reports.remove(device).unwrap_or_default();
        apply_report(&*txn, *device, &report, now).await?;
    }
    txn.commit().await?;

    let mut claimed: HashSet<(i32, &str)> = HashSet::with_capacity(events.len());
    Ok(events
        .iter()
        .map(|e| {
            let key = (e.device, e.event_id.as_str());
            if claimed.insert(key) && inserted.contains(&(e.device, e.event_id.clone())) {
                Ingested::Stored
            } else {
                Ingested::Duplicate
            }
        })
        .collect())
}

/// Multi-row inserts in a few fixed sizes, so that the database's prepared-statement cache
/// holds every shape instead of preparing a new statement for each batch size.
const INSERT_CHUNKS: [usize; 4] = [64, 16, 4, 1];

fn insert_chunks<'a>(events: &'a [&'a NewEvent]) -> Vec<&'a [&'a NewEvent]> {
    let mut chunks = Vec::new();
    let mut rest = events;
    while !rest.is_empty() {
        let size = INSERT_CHUNKS
            .into_iter()
            .find(|size| *size <= rest.len())
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(size);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

const EVENT_COLUMNS: [&str; 17] = [
    "device_id",
    "event_id",
    "event",
    "treatment",
    "counter",
    "event_type",
    "count_basic",
    "count_standard",
    "count_premium",
    "occurred_at",
    "occurred_epoch",
    "device_timestamp",
    "received_at",
    "wifi_status",
    "payload",
    "machine_id",
    "outlet_id",
];

/// `INSERT … ON CONFLICT DO NOTHING RETURNING` for `rows` events: the rows returned are the
/// ones that were new. Portable to SQLite (3.35+) and PostgreSQL; only placeholders differ.
fn insert_sql(backend: DbBackend, rows: usize) -> String {
    let columns = EVENT_COLUMNS.join(", ");
    let mut sql = format!("INSERT INTO telemetry_events ({columns}) VALUES ");
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..EVENT_COLUMNS.len() {
            if col > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                DbBackend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                _ => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (device_id, event_id) DO NOTHING RETURNING device_id, event_id");
    sql
}

fn cached_insert_sql(backend: DbBackend, rows: usize) -> &'static str {
    use std::sync::OnceLock;
    static SQLITE: OnceLock<Vec<String>> = OnceLock::new();
    static POSTGRES: OnceLock<Vec<String>> = OnceLock::new();
    let (cell, backend) = match backend {
        DbBackend::Postgres => (&POSTGRES, DbBackend::Postgres),
        _ => (&SQLITE, DbBackend::Sqlite),
    };
    let all = cell.get_or_init(|| {
        INSERT_CHUNKS
            .iter()
            .map(|n| insert_sql(backend, *n))
            .collect()
    });
    INSERT_CHUNKS
        .iter()
        .position(|n| *n == rows)
        .map(|i| all[i].as_str())
        .unwrap_or_else(|| all[INSERT_CHUNKS.len() - 1].as_str())
}

async fn insert_events(
    conn: &impl ConnectionTrait,
    events: &[&NewEvent],
    attribution: &Attribution,
) -> Result<Vec<(i32, String)>> {
    let backend = conn.get_database_backend();
    let mut values: Vec<Value> = Vec::with_capacity(events.len() * EVENT_COLUMNS.len());
    for e in events {
        let (machine, outlet) = attribution.at(e.device, e.occurred_at);
        values.extend([
            e.device.into(),
            e.event_id.clone().into(),
            e.kind.as_str().into(),
            e.treatment.map(Treatment::as_str).into(),
            e.counter.into(),
            e.event_type.clone().into(),
            e.legacy_counts.map(|c| c.basic).into(),
            e.legacy_counts.map(|c| c.standard).into(),
            e.legacy_counts.map(|c| c.premium).into(),
            e.occurred_at.into(),
            e.occurred_at.timestamp().into(),
            e.device_timestamp.clone().into(),
            e.received_at.into(),
            e.wifi_status.into(),
            Value::Json(e.payload.clone().map(Box::new)),
            machine.into(),
            outlet.into(),
        ]);
    }
    let sql = cached_insert_sql(backend, events.len());
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get::<i32>("", "device_id")?,
                row.try_get::<String>("", "event_id")?,
            ))
        })
        .collect::<std::result::Result<Vec<_>, DbErr>>()
        .map_err(Error::from)
}

fn merge_report(into: &mut StatusReport, newer: &StatusReport) {
    macro_rules! take {
        ($($f:ident),*) => { $( if newer.$f.is_some() { into.$f = newer.$f.clone(); } )* };
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

/// Writes what a device reported into its status row and marks it seen.
pub async fn apply_report(
    conn: &impl ConnectionTrait,
    device: i32,
    report: &StatusReport,
    now: DateTime<Utc>,
) -> Result<()> {
    if status_update(device, report, now)
        .exec(conn)
        .await?
        .rows_affected
        == 0
    {
        // Devices registered before their status row existed get one now.
        devices::ensure_status(conn, device, now).await?;
        status_update(device, report, now).exec(conn).await?;
    }
    let mut device_update = device::Entity::update_many()
        .col_expr(device::Column::LastSeen, Expr::value(now))
        .filter(device::Column::Id.eq(device));
    if let Some(firmware) = &report.firmware {
        device_update =
            device_update.col_expr(device::Column::Firmware, Expr::value(firmware.clone()));
    }
    device_update.exec(conn).await?;
    Ok(())
}

fn status_update(
    device: i32,
    report: &StatusReport,
    now: DateTime<Utc>,
) -> sea_orm::UpdateMany<device_status::Entity> {
    use device_status::Column as C;
    let mut update = device_status::Entity::update_many()
        .col_expr(C::LastSeen, Expr::value(now))
        .col_expr(C::UpdatedAt, Expr::value(now))
        .filter(C::DeviceId.eq(device));
    if let Some(c) = report.counters {
        update = update
            .col_expr(C::CurrentCountBasic, Expr::value(c.basic))
            .col_expr(C::CurrentCountStandard, Expr::value(c.standard))
            .col_expr(C::CurrentCountPremium, Expr::value(c.premium));
    }
    let flags = [
        (C::WifiConnected, report.wifi_connected),
        (C::RtcAvailable, report.rtc_available),
        (C::SdCardAvailable, report.sd_card_available),
    ];
    for (column, value) in flags {
        if let Some(v) = value {
            update = update.col_expr(column, Expr::value(v));
        }
    }
    if let Some(v) = report.uptime_seconds {
        update = update.col_expr(C::UptimeSeconds, Expr::value(v));
    }
    if let Some(v) = &report.device_timestamp {
        update = update.col_expr(C::DeviceTimestamp, Expr::value(v.clone()));
    }
    update
}

/// An `IN (…)` list padded to a power-of-two length by repeating its last id: the same few
/// statement shapes recur, so prepared statements are reused.
fn padded(ids: &[i32]) -> Vec<i32> {
    let mut list = ids.to_vec();
    if let Some(&last) = list.last() {
        list.resize(list.len().next_power_of_two(), last);
    }
    list
}

/// Which machine (and its outlet) each device was bound to over a period.
pub struct Attribution {
    bindings: HashMap<i32, Vec<machine_device::Model>>,
    outlets: HashMap<i32, Option<i32>>,
}

impl Attribution {
    /// Loads the bindings of `devices` that were open at or after `since`.
    pub async fn load(
        conn: &impl ConnectionTrait,
        devices: &[i32],
        since: DateTime<Utc>,
    ) -> Result<Attribution> {
        let rows = machine_device::Entity::find()
            .filter(machine_device::Column::DeviceId.is_in(padded(devices)))
            .filter(
                machine_device::Column::UnassignedAt
                    .is_null()
                    .or(machine_device::Column::UnassignedAt.gt(since)),
            )
            .all(conn)
            .await?;
        let machine_ids: HashSet<i32> = rows.iter().map(|b| b.machine_id).collect();
        let outlets = if machine_ids.is_empty() {
            HashMap::new()
        } else {
            machine::Entity::find()
                .filter(
                    machine::Column::Id.is_in(padded(&machine_ids.into_iter().collect::<Vec<_>>())),
                )
                .all(conn)
                .await?
                .into_iter()
                .map(|m| (m.id, m.outlet_id))
                .collect()
        };
        let mut bindings: HashMap<i32, Vec<machine_device::Model>> = HashMap::new();
        for row in rows {
            bindings.entry(row.device_id).or_default().push(row);
        }
        Ok(Attribution { bindings, outlets })
    }

    /// The machine and outlet a device was bound to at `at`. An event stamped before the
    /// current binding started (a clock set after the fact) goes to the binding open then,
    /// if any.
    pub fn at(&self, device: i32, at: DateTime<Utc>) -> (Option<i32>, Option<i32>) {
        let machine = self.bindings.get(&device).and_then(|rows| {
            rows.iter()
                .filter(|b| b.assigned_at <= at && b.unassigned_at.is_none_or(|u| u > at))
                .max_by_key(|b| b.assigned_at)
                .map(|b| b.machine_id)
        });
        let outlet = machine.and_then(|m| self.outlets.get(&m).copied().flatten());
        (machine, outlet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_device_times_fall_back_to_arrival() {
        let now = Utc::now();
        let early = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 5).unwrap();
        assert!(!plausible_time(early, now));
        assert!(!plausible_time(now + Duration::days(2), now));
        assert!(plausible_time(now - Duration::days(300), now));
    }

    #[test]
    fn device_times_parse_in_the_forms_firmware_sends() {
        let (_, t) = parse_device_time(&Json::String("2025-09-16T12:34:56Z".into()));
        assert_eq!(t.unwrap().timestamp(), 1758026096);
        let (_, t) = parse_device_time(&Json::String("2024-01-15 14:30:25".into()));
        assert_eq!(t.unwrap().timestamp(), 1705329025);
        let (raw, t) = parse_device_time(&serde_json::json!(1758026096));
        assert_eq!(t.unwrap().timestamp(), 1758026096);
        assert_eq!(raw.as_deref(), Some("1758026096"));
        let (raw, t) = parse_device_time(&Json::String("garbage".into()));
        assert!(t.is_none());
        assert_eq!(raw.as_deref(), Some("garbage"));
    }
}
