//! Usage statistics: treatments counted in time buckets (minute, hour, day, month) of a time
//! zone, filtered by outlet, machine and device, optionally cumulative, smoothed by a trailing
//! moving average and compared with the period before. Also the filter options cascade and the
//! per-device analytics.
//!
//! Buckets are local to the requested IANA zone: a day is a local calendar day (23 or 25 hours
//! when daylight saving time starts or ends), a month a local calendar month. Every bucket of
//! the range is answered, with zero when nothing happened.
//!
//! Hours, days and months are summed from the hourly rollup (`domain::rollup`) when every
//! bucket edge falls on a whole UTC hour, which holds in every zone whose offset is a whole
//! number of hours. Minutes, and zones with half- or quarter-hour offsets (India, Nepal,
//! South Australia, …), are counted from raw events instead: exact, but a scan of the range.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, Months, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, Statement, Value};
use serde::Serialize;

use crate::{
    db::{
        entities::{device, machine, machine_device, outlet},
        placeholder, Db,
    },
    domain::{devices, rollup::HOUR},
    error::{Entity, Error, Result},
};

/// The most buckets one answer may have (the current period; `compare` doubles the work).
pub const MAX_BUCKETS: usize = 5000;
/// The longest `days` accepted.
pub const MAX_DAYS: i64 = 3660;
/// The default `days` when neither `start` nor `days` is given.
pub const DEFAULT_DAYS: i64 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Result<Granularity> {
        match s.trim().to_ascii_lowercase().as_str() {
            "minute" => Ok(Granularity::Minute),
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "month" => Ok(Granularity::Month),
            other => Err(Error::invalid(
                "invalid_granularity",
                format!("granularity `{other}` is not one of minute, hour, day, month"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }
}

/// The stats request as a client states it (query parameters), before validation.
#[derive(Debug, Clone, Default)]
pub struct StatsParams {
    pub granularity: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub days: Option<i64>,
    pub outlet_id: Option<i32>,
    pub machine_id: Option<i32>,
    pub device_id: Option<String>,
    pub cumulative: bool,
    pub ma: Option<i64>,
    pub compare: bool,
    pub tz: Option<String>,
}

/// Which treatments count: those attributed to this outlet and/or machine, and/or of this
/// device (database ids). All `None` is the whole fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    pub outlet: Option<i32>,
    pub machine: Option<i32>,
    pub device: Option<i32>,
}

impl Filter {
    /// Resolves the client's ids: an outlet or machine that does not exist is a 404, like a
    /// device id that names no device.
    pub async fn resolve(
        db: &Db,
        outlet_id: Option<i32>,
        machine_id: Option<i32>,
        device_id: Option<&str>,
    ) -> Result<Filter> {
        let conn = db.conn();
        if let Some(id) = outlet_id {
            outlet::Entity::find_by_id(id)
                .one(conn)
                .await?
                .ok_or_else(|| Error::not_found(Entity::Outlet, id.to_string()))?;
        }
        if let Some(id) = machine_id {
            machine::Entity::find_by_id(id)
                .one(conn)
                .await?
                .ok_or_else(|| Error::not_found(Entity::Machine, id.to_string()))?;
        }
        let device = match device_id.map(str::trim).filter(|d| !d.is_empty()) {
            Some(d) => Some(devices::find_by_device_id(conn, d).await?.id),
            None => None,
        };
        Ok(Filter {
            outlet: outlet_id,
            machine: machine_id,
            device,
        })
    }
}

/// Counts per bucket, one vector per treatment plus their sum.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    pub basic: Vec<i64>,
    pub standard: Vec<i64>,
    pub premium: Vec<i64>,
    pub total: Vec<i64>,
}

/// Trailing moving averages of a [`Series`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Averages {
    pub basic: Vec<f64>,
    pub standard: Vec<f64>,
    pub premium: Vec<f64>,
    pub total: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub basic: i64,
    pub standard: i64,
    pub premium: i64,
    pub total: i64,
}

/// One period's answer: bucket labels, the series (cumulative when asked), the moving average
/// when asked, and the totals of the period (never cumulative).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Period {
    pub labels: Vec<String>,
    /// Where each bucket starts, as an instant with the zone's offset.
    pub starts: Vec<String>,
    pub series: Series,
    pub ma: Option<Averages>,
    pub totals: Totals,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RangeInfo {
    pub start: String,
    pub end: String,
    pub granularity: Granularity,
    pub tz: String,
    pub buckets: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub current: Period,
    pub previous: Option<Period>,
    pub range: RangeInfo,
    pub cumulative: bool,
    pub ma: usize,
}

/// A validated stats request.
#[derive(Debug, Clone)]
pub struct StatsQuery {
    pub granularity: Granularity,
    pub tz: Tz,
    pub buckets: Buckets,
    pub filter: Filter,
    pub cumulative: bool,
    pub ma: usize,
    pub compare: bool,
}

pub fn parse_tz(tz: Option<&str>) -> Result<Tz> {
    match tz.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(Tz::UTC),
        Some(name) => name.parse::<Tz>().map_err(|_| {
            Error::invalid(
                "invalid_tz",
                format!("`{name}` is not an IANA time zone name (e.g. Europe/Berlin, UTC)"),
            )
        }),
    }
}

/// A point in time a client gave: an instant with an offset, a local date-time in `tz`, or a
/// date (its local midnight). Says whether it was a bare date. Years run from 1 to 9999, so
/// that ranges, the period before them and their bucket edges stay far inside what dates can
/// hold.
pub fn parse_time(field: &str, value: &str, tz: Tz) -> Result<(DateTime<Utc>, bool)> {
    let s = value.trim();
    let (t, date, year) = parse_any_time(s, tz).ok_or_else(|| {
        Error::invalid(
            "invalid_time",
            format!("{field} `{s}` is not an ISO 8601 date (2025-03-30) or date-time (2025-03-30T12:00:00Z)"),
        )
    })?;
    if !(1..=9999).contains(&year) {
        return Err(Error::invalid(
            "invalid_time",
            format!("{field} `{s}` is out of range: years run from 1 to 9999"),
        ));
    }
    Ok((t, date))
}

/// The instant, whether it was a bare date, and the year as written.
fn parse_any_time(s: &str, tz: Tz) -> Option<(DateTime<Utc>, bool, i32)> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some((t.with_timezone(&Utc), false, t.year()));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(local) = NaiveDateTime::parse_from_str(s, format) {
            if !(1..=9999).contains(&local.year()) {
                return Some((local.and_utc(), false, local.year()));
            }
            return Some((local_instant(tz, local), false, local.year()));
        }
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    if !(1..=9999).contains(&date.year()) {
        return Some((date.and_time(NaiveTime::MIN).and_utc(), true, date.year()));
    }
    Some((local_midnight(tz, date), true, date.year()))
}

/// The instant a local wall-clock time names: the earlier one when the clock went back, the
/// first valid minute after it when the clock jumped over it.
pub fn local_instant(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut t = local;
    // Gaps are at most a few hours (in practice one); step through them.
    for _ in 0..(6 * 60) {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) => return x.with_timezone(&Utc),
            LocalResult::Ambiguous(a, _) => return a.with_timezone(&Utc),
            LocalResult::None => t += Duration::minutes(1),
        }
    }
    local.and_utc()
}

pub fn local_midnight(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    local_instant(tz, date.and_time(NaiveTime::MIN))
}

fn offset_secs(tz: Tz, t: DateTime<Utc>) -> i64 {
    i64::from(
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc(),
    )
}

/// The start of the bucket holding `t`.
pub fn floor(g: Granularity, tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
    let local = t.with_timezone(&tz);
    match g {
        Granularity::Minute | Granularity::Hour => {
            let unit = if g == Granularity::Minute { 60 } else { HOUR };
            let off = offset_secs(tz, t);
            let floored = (t.timestamp() + off).div_euclid(unit) * unit - off;
            DateTime::from_timestamp(floored, 0).unwrap_or(t)
        }
        Granularity::Day => local_midnight(tz, local.date_naive()),
        Granularity::Month => local_midnight(
            tz,
            local.date_naive().with_day(1).unwrap_or(local.date_naive()),
        ),
    }
}

/// The start of the bucket after the one that starts at `start`.
fn next(g: Granularity, tz: Tz, start: DateTime<Utc>) -> DateTime<Utc> {
    match g {
        Granularity::Minute => start + Duration::minutes(1),
        Granularity::Hour => start + Duration::hours(1),
        Granularity::Day => {
            let d = start.with_timezone(&tz).date_naive();
            local_midnight(tz, d.succ_opt().unwrap_or(d))
        }
        Granularity::Month => {
            let d = start.with_timezone(&tz).date_naive();
            local_midnight(tz, d.checked_add_months(Months::new(1)).unwrap_or(d))
        }
    }
}

/// `n` buckets back from the bucket start `start`.
fn back(g: Granularity, tz: Tz, start: DateTime<Utc>, n: usize) -> DateTime<Utc> {
    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
    match g {
        Granularity::Minute => start - Duration::minutes(n as i64),
        Granularity::Hour => start - Duration::hours(n as i64),
        Granularity::Day => {
            let d = start.with_timezone(&tz).date_naive();
            local_midnight(tz, d - Duration::days(n as i64))
        }
        Granularity::Month => {
            let d = start.with_timezone(&tz).date_naive();
            local_midnight(tz, d.checked_sub_months(Months::new(n32)).unwrap_or(d))
        }
    }
}

/// How many buckets lie between two bucket starts.
fn count_between(g: Granularity, tz: Tz, start: DateTime<Utc>, end: DateTime<Utc>) -> i64 {
    match g {
        Granularity::Minute => (end - start).num_seconds().div_euclid(60),
        Granularity::Hour => (end - start).num_seconds().div_euclid(HOUR),
        Granularity::Day => {
            (end.with_timezone(&tz).date_naive() - start.with_timezone(&tz).date_naive()).num_days()
        }
        Granularity::Month => {
            let (a, b) = (start.with_timezone(&tz), end.with_timezone(&tz));
            i64::from(b.year() * 12 + b.month() as i32)
                - i64::from(a.year() * 12 + a.month() as i32)
        }
    }
}

/// Consecutive buckets: `edges[i]..edges[i + 1]` is bucket `i` (epoch seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    pub granularity: Granularity,
    pub tz: Tz,
    pub edges: Vec<i64>,
}

impl Buckets {
    /// `n` buckets from the bucket start `start`.
    pub fn new(g: Granularity, tz: Tz, start: DateTime<Utc>, n: usize) -> Buckets {
        let mut edges = Vec::with_capacity(n + 1);
        let mut t = start;
        edges.push(t.timestamp());
        for _ in 0..n {
            t = next(g, tz, t);
            edges.push(t.timestamp());
        }
        Buckets {
            granularity: g,
            tz,
            edges,
        }
    }

    pub fn len(&self) -> usize {
        self.edges.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn start(&self) -> DateTime<Utc> {
        at(self.edges[0])
    }

    pub fn end(&self) -> DateTime<Utc> {
        at(self.edges[self.edges.len() - 1])
    }

    /// The same number of buckets immediately before these.
    pub fn previous(&self) -> Buckets {
        let start = back(self.granularity, self.tz, self.start(), self.len());
        Buckets::new(self.granularity, self.tz, start, self.len())
    }

    /// The bucket holding the instant `t` (epoch seconds).
    pub fn index_of(&self, t: i64) -> Option<usize> {
        let i = self.edges.partition_point(|e| *e <= t);
        (i >= 1 && i < self.edges.len()).then(|| i - 1)
    }

    pub fn labels(&self) -> Vec<String> {
        self.edges[..self.len()]
            .iter()
            .map(|e| {
                let local = at(*e).with_timezone(&self.tz);
                match self.granularity {
                    Granularity::Month => local.format("%Y-%m").to_string(),
                    Granularity::Day => local.format("%Y-%m-%d").to_string(),
                    Granularity::Hour | Granularity::Minute => {
                        local.format("%Y-%m-%dT%H:%M%:z").to_string()
                    }
                }
            })
            .collect()
    }

    pub fn starts(&self) -> Vec<String> {
        self.edges[..self.len()]
            .iter()
            .map(|e| local_rfc3339(self.tz, at(*e)))
            .collect()
    }

    /// The width (seconds) of the raw-event groups that fit every edge: an hour when the rollup
    /// can answer, else the largest of half an hour, 15 minutes or a minute that divides every edge.
    fn unit(&self) -> i64 {
        [HOUR, 1800, 900, 60]
            .into_iter()
            .find(|u| self.edges.iter().all(|e| e.rem_euclid(*u) == 0))
            .unwrap_or(1)
    }
}

fn at(epoch: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(epoch, 0).unwrap_or_default()
}

pub fn local_rfc3339(tz: Tz, t: DateTime<Utc>) -> String {
    t.with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn too_fine(g: Granularity, count: i64) -> Error {
    Error::invalid(
        "range_too_fine",
        format!(
            "this range has {count} {} buckets; the largest allowed count is {MAX_BUCKETS}: \
             choose a coarser granularity or a shorter range",
            g.as_str()
        ),
    )
}

/// The buckets a request covers. `end` given as a bare date includes that day. Without `start`
/// the range is the last `days` (default 7) ending with the bucket that holds `end` (default
/// now); without `end` it runs to the bucket holding now.
pub fn resolve_range(
    g: Granularity,
    tz: Tz,
    start: Option<&str>,
    end: Option<&str>,
    days: Option<i64>,
    now: DateTime<Utc>,
) -> Result<Buckets> {
    let days = days.unwrap_or(DEFAULT_DAYS);
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(Error::invalid(
            "invalid_days",
            format!("days must be between 1 and {MAX_DAYS}"),
        ));
    }
    let end_at = match end.map(str::trim).filter(|s| !s.is_empty()) {
        Some(e) => {
            let (t, date) = parse_time("end", e, tz)?;
            if date {
                let d = t.with_timezone(&tz).date_naive();
                local_midnight(tz, d.succ_opt().unwrap_or(d))
            } else {
                t
            }
        }
        None => now,
    };
    // The end is exclusive: the bucket holding the instant just before it is the last one.
    let last_start = floor(g, tz, end_at - Duration::seconds(1));
    let end_edge = if floor(g, tz, end_at) == end_at {
        end_at
    } else {
        next(g, tz, last_start)
    };
    let start_edge = match start.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => floor(g, tz, parse_time("start", s, tz)?.0),
        None => {
            let local = end_edge.with_timezone(&tz).naive_local() - Duration::days(days);
            floor(g, tz, local_instant(tz, local))
        }
    };
    if start_edge >= end_edge {
        return Err(Error::invalid("invalid_range", "start must be before end"));
    }
    let count = count_between(g, tz, start_edge, end_edge);
    if count > MAX_BUCKETS as i64 {
        return Err(too_fine(g, count));
    }
    let buckets = Buckets::new(g, tz, start_edge, count.max(1) as usize);
    Ok(buckets)
}

impl StatsQuery {
    pub async fn from_params(db: &Db, p: &StatsParams, now: DateTime<Utc>) -> Result<StatsQuery> {
        let granularity = match p
            .granularity
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(g) => Granularity::parse(g)?,
            None => Granularity::Day,
        };
        let tz = parse_tz(p.tz.as_deref())?;
        let buckets = resolve_range(
            granularity,
            tz,
            p.start.as_deref(),
            p.end.as_deref(),
            p.days,
            now,
        )?;
        let ma = p.ma.unwrap_or(0);
        if !(0..=MAX_BUCKETS as i64).contains(&ma) {
            return Err(Error::invalid(
                "invalid_ma",
                format!("ma must be between 0 (off) and {MAX_BUCKETS}"),
            ));
        }
        let filter = Filter::resolve(db, p.outlet_id, p.machine_id, p.device_id.as_deref()).await?;
        Ok(StatsQuery {
            granularity,
            tz,
            buckets,
            filter,
            cumulative: p.cumulative,
            ma: ma as usize,
            compare: p.compare,
        })
    }
}

/// Answers a stats request.
pub async fn stats(db: &Db, p: &StatsParams, now: DateTime<Utc>) -> Result<Stats> {
    let q = StatsQuery::from_params(db, p, now).await?;
    run(db, &q).await
}

pub async fn run(db: &Db, q: &StatsQuery) -> Result<Stats> {
    let current = period(db, q, &q.buckets).await?;
    let previous = if q.compare {
        Some(period(db, q, &q.buckets.previous()).await?)
    } else {
        None
    };
    Ok(Stats {
        current,
        previous,
        range: RangeInfo {
            start: local_rfc3339(q.tz, q.buckets.start()),
            end: local_rfc3339(q.tz, q.buckets.end()),
            granularity: q.granularity,
            tz: q.tz.name().to_owned(),
            buckets: q.buckets.len(),
        },
        cumulative: q.cumulative,
        ma: q.ma,
    })
}

async fn period(db: &Db, q: &StatsQuery, buckets: &Buckets) -> Result<Period> {
    let counts = count(db.conn(), q.filter, buckets).await?;
    let mut series = Series::default();
    let mut totals = Totals::default();
    for [b, s, p] in counts {
        series.basic.push(b);
        series.standard.push(s);
        series.premium.push(p);
        series.total.push(b + s + p);
        totals.basic += b;
        totals.standard += s;
        totals.premium += p;
    }
    totals.total = totals.basic + totals.standard + totals.premium;
    if q.cumulative {
        for v in [
            &mut series.basic,
            &mut series.standard,
            &mut series.premium,
            &mut series.total,
        ] {
            running_sum(v);
        }
    }
    let ma = (q.ma > 0).then(|| Averages {
        basic: moving_average(&series.basic, q.ma),
        standard: moving_average(&series.standard, q.ma),
        premium: moving_average(&series.premium, q.ma),
        total: moving_average(&series.total, q.ma),
    });
    Ok(Period {
        labels: buckets.labels(),
        starts: buckets.starts(),
        series,
        ma,
        totals,
    })
}

fn running_sum(v: &mut [i64]) {
    let mut sum = 0;
    for x in v {
        sum += *x;
        *x = sum;
    }
}

/// The mean of each value and the `window - 1` before it; the first buckets average over the
/// values there are. Rounded to 1/1000.
pub fn moving_average(v: &[i64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(v.len());
    let mut sum = 0i64;
    for i in 0..v.len() {
        sum += v[i];
        if i >= window {
            sum -= v[i - window];
        }
        let n = (i + 1).min(window) as f64;
        out.push((sum as f64 / n * 1000.0).round() / 1000.0);
    }
    out
}

fn treatment_index(name: &str) -> Option<usize> {
    match name {
        "BASIC" => Some(0),
        "STANDARD" => Some(1),
        "PREMIUM" => Some(2),
        _ => None,
    }
}

/// Devices that were ever bound to a machine.
pub async fn devices_of_machine(conn: &impl ConnectionTrait, machine: i32) -> Result<Vec<i32>> {
    use sea_orm::ColumnTrait;
    let mut ids: Vec<i32> = machine_device::Entity::find()
        .filter(machine_device::Column::MachineId.eq(machine))
        .order_by_asc(machine_device::Column::Id)
        .all(conn)
        .await?
        .into_iter()
        .map(|b| b.device_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A statement under construction: text and values, placeholders numbered as they are added.
struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    fn new(backend: DbBackend, text: &str) -> Sql {
        Sql {
            backend,
            text: text.to_owned(),
            values: Vec::new(),
        }
    }

    fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    fn bind(&mut self, value: impl Into<Value>) -> &mut Sql {
        self.values.push(value.into());
        let p = placeholder(self.backend, self.values.len());
        self.text.push_str(&p);
        self
    }

    fn bind_list(&mut self, ids: &[i32]) -> &mut Sql {
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(*id);
        }
        self
    }

    fn statement(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}

/// Treatments per bucket (basic, standard, premium).
pub async fn count(
    conn: &impl ConnectionTrait,
    filter: Filter,
    buckets: &Buckets,
) -> Result<Vec<[i64; 3]>> {
    let mut out = vec![[0i64; 3]; buckets.len()];
    if buckets.is_empty() {
        return Ok(out);
    }
    let backend = conn.get_database_backend();
    let (from, until) = (buckets.edges[0], buckets.edges[buckets.len()]);
    let machine_devices = match (filter.machine, filter.device) {
        (Some(m), None) => {
            let ids = devices_of_machine(conn, m).await?;
            if ids.is_empty() {
                return Ok(out);
            }
            Some(ids)
        }
        _ => None,
    };
    let unit = if buckets.granularity == Granularity::Minute {
        60.min(buckets.unit())
    } else {
        buckets.unit()
    };
    let sql = if unit == HOUR {
        rollup_sql(backend, filter, machine_devices.as_deref(), from, until)
    } else {
        raw_sql(
            backend,
            filter,
            machine_devices.as_deref(),
            from,
            until,
            unit,
        )
    };
    let rows = conn.query_all_raw(sql.statement()).await?;
    for row in rows {
        let t: i64 = row.try_get("", "t")?;
        let n: i64 = row.try_get("", "n")?;
        let treatment = if unit == HOUR {
            usize::try_from(row.try_get::<i16>("", "treatment")?).ok()
        } else {
            treatment_index(&row.try_get::<String>("", "treatment")?)
        };
        if let (Some(i), Some(k)) = (buckets.index_of(t), treatment.filter(|k| *k < 3)) {
            out[i][k] += n;
        }
    }
    Ok(out)
}

fn rollup_sql(
    backend: DbBackend,
    filter: Filter,
    machine_devices: Option<&[i32]>,
    from: i64,
    until: i64,
) -> Sql {
    let mut sql;
    match (filter, machine_devices) {
        (
            Filter {
                outlet: None,
                machine: None,
                device: None,
            },
            _,
        ) => {
            sql = Sql::new(
                backend,
                "SELECT bucket_hour AS t, treatment, count AS n FROM stats_hourly_fleet WHERE ",
            );
        }
        (
            Filter {
                outlet: Some(o),
                machine: None,
                device: None,
            },
            _,
        ) => {
            sql = Sql::new(
                backend,
                "SELECT bucket_hour AS t, treatment, count AS n FROM stats_hourly_outlets WHERE outlet_id = ",
            );
            sql.bind(o).push(" AND ");
        }
        (f, devices) => {
            sql = Sql::new(
                backend,
                "SELECT bucket_hour AS t, treatment, CAST(SUM(count) AS BIGINT) AS n FROM stats_hourly WHERE ",
            );
            match (f.device, devices) {
                (Some(d), _) => {
                    sql.push("device_id = ").bind(d).push(" AND ");
                }
                (None, Some(ids)) => {
                    sql.push("device_id IN (").bind_list(ids).push(") AND ");
                }
                (None, None) => {}
            }
            if let Some(m) = f.machine {
                sql.push("machine_id = ").bind(m).push(" AND ");
            }
            if let Some(o) = f.outlet {
                sql.push("outlet_id = ").bind(o).push(" AND ");
            }
            sql.push("bucket_hour >= ")
                .bind(from)
                .push(" AND bucket_hour < ")
                .bind(until)
                .push(" GROUP BY bucket_hour, treatment");
            return sql;
        }
    }
    sql.push("bucket_hour >= ")
        .bind(from)
        .push(" AND bucket_hour < ")
        .bind(until);
    sql
}

fn raw_sql(
    backend: DbBackend,
    filter: Filter,
    machine_devices: Option<&[i32]>,
    from: i64,
    until: i64,
    unit: i64,
) -> Sql {
    let mut sql = Sql::new(
        backend,
        &format!(
            "SELECT (occurred_epoch / {unit}) * {unit} AS t, treatment, COUNT(*) AS n \
             FROM telemetry_events WHERE event = 'treatment' AND "
        ),
    );
    if let Some(d) = filter.device {
        sql.push("device_id = ").bind(d).push(" AND ");
    } else if let Some(ids) = machine_devices {
        sql.push("device_id IN (").bind_list(ids).push(") AND ");
    }
    if let Some(m) = filter.machine {
        sql.push("machine_id = ").bind(m).push(" AND ");
    }
    if let Some(o) = filter.outlet {
        sql.push("outlet_id = ").bind(o).push(" AND ");
    }
    sql.push("occurred_epoch >= ")
        .bind(from)
        .push(" AND occurred_epoch < ")
        .bind(until)
        .push(&format!(
            " GROUP BY (occurred_epoch / {unit}) * {unit}, treatment"
        ));
    sql
}

/// Treatments per bucket counted straight from raw events, whatever the zone: the reference
/// the rollup is checked against.
pub async fn count_raw(
    conn: &impl ConnectionTrait,
    filter: Filter,
    buckets: &Buckets,
) -> Result<Vec<[i64; 3]>> {
    let mut out = vec![[0i64; 3]; buckets.len()];
    if buckets.is_empty() {
        return Ok(out);
    }
    let machine_devices = match filter.machine {
        Some(m) if filter.device.is_none() => Some(devices_of_machine(conn, m).await?),
        _ => None,
    };
    let (from, until) = (buckets.edges[0], buckets.edges[buckets.len()]);
    let sql = raw_sql(
        conn.get_database_backend(),
        filter,
        machine_devices.as_deref(),
        from,
        until,
        60,
    );
    for row in conn.query_all_raw(sql.statement()).await? {
        let t: i64 = row.try_get("", "t")?;
        let n: i64 = row.try_get("", "n")?;
        let k = treatment_index(&row.try_get::<String>("", "treatment")?);
        if let (Some(i), Some(k)) = (buckets.index_of(t), k) {
            out[i][k] += n;
        }
    }
    Ok(out)
}

/// The stats answer as CSV: one row per bucket; with `compare`, the previous period's bucket
/// and counts on the same row; with `ma`, the averages after the counts.
pub fn stats_csv(stats: &Stats) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = ["bucket", "start", "basic", "standard", "premium", "total"]
        .map(String::from)
        .to_vec();
    if stats.current.ma.is_some() {
        header.extend(["ma_basic", "ma_standard", "ma_premium", "ma_total"].map(String::from));
    }
    if stats.previous.is_some() {
        header.extend(
            [
                "previous_bucket",
                "previous_start",
                "previous_basic",
                "previous_standard",
                "previous_premium",
                "previous_total",
            ]
            .map(String::from),
        );
        if stats.current.ma.is_some() {
            header.extend(
                [
                    "previous_ma_basic",
                    "previous_ma_standard",
                    "previous_ma_premium",
                    "previous_ma_total",
                ]
                .map(String::from),
            );
        }
    }
    w.write_record(&header).map_err(csv_error)?;
    let fields = |p: &Period, i: usize, row: &mut Vec<String>| {
        row.push(p.labels[i].clone());
        row.push(p.starts[i].clone());
        for v in [
            &p.series.basic,
            &p.series.standard,
            &p.series.premium,
            &p.series.total,
        ] {
            row.push(v[i].to_string());
        }
        if let Some(ma) = &p.ma {
            for v in [&ma.basic, &ma.standard, &ma.premium, &ma.total] {
                row.push(v[i].to_string());
            }
        }
    };
    for i in 0..stats.current.labels.len() {
        let mut row = Vec::with_capacity(header.len());
        fields(&stats.current, i, &mut row);
        if let Some(previous) = &stats.previous {
            fields(previous, i, &mut row);
        }
        w.write_record(&row).map_err(csv_error)?;
    }
    w.into_inner()
        .map_err(|e| Error::Internal(format!("csv: {e}")))
}

pub(crate) fn csv_error(e: csv::Error) -> Error {
    Error::Internal(format!("csv: {e}"))
}

/// A file name for downloads: `prefix-YYYYMMDD-YYYYMMDD.csv` (local dates of the range).
pub fn csv_file_name(prefix: &str, stats: &Stats) -> String {
    let day = |s: &str| s.get(..10).unwrap_or(s).replace('-', "");
    format!(
        "{prefix}-{}-{}.csv",
        day(&stats.range.start),
        day(&stats.range.end)
    )
}

// ---------------------------------------------------------------------------------------------
// Filter options

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutletOption {
    pub id: i32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineOption {
    pub id: i32,
    pub name: String,
    pub machine_code: String,
    pub outlet_id: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceOption {
    pub device_id: String,
    /// The machine that carries it now, if any.
    pub machine_id: Option<i32>,
    /// Whether it is bound to the machine asked about (`machine_id`) now; a device that was
    /// bound to it earlier is listed too, since its past events count for that machine.
    pub current: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Options {
    pub outlets: Vec<OutletOption>,
    pub machines: Vec<MachineOption>,
    pub devices: Vec<DeviceOption>,
}

/// The filter options cascade: every outlet; the machines of `outlet_id` (all machines without
/// it); the devices of `machine_id` (every device bound to it, ever), else those carried by the
/// listed machines, else every device.
pub async fn options(db: &Db, outlet_id: Option<i32>, machine_id: Option<i32>) -> Result<Options> {
    use sea_orm::ColumnTrait;
    let conn = db.conn();
    let outlets: Vec<OutletOption> = outlet::Entity::find()
        .order_by_asc(outlet::Column::Name)
        .all(conn)
        .await?
        .into_iter()
        .map(|o| OutletOption {
            id: o.id,
            name: o.name,
        })
        .collect();
    if let Some(id) = outlet_id {
        if !outlets.iter().any(|o| o.id == id) {
            return Err(Error::not_found(Entity::Outlet, id.to_string()));
        }
    }
    let mut machines_query = machine::Entity::find().order_by_asc(machine::Column::Name);
    if let Some(id) = outlet_id {
        machines_query = machines_query.filter(machine::Column::OutletId.eq(id));
    }
    let machine_rows = machines_query.all(conn).await?;
    let carried: std::collections::HashMap<i32, i32> = machine::Entity::find()
        .filter(machine::Column::CurrentDeviceId.is_not_null())
        .all(conn)
        .await?
        .into_iter()
        .filter_map(|m| m.current_device_id.map(|d| (d, m.id)))
        .collect();
    let devices_of = |ids: Vec<i32>| async move {
        Ok::<_, Error>(
            device::Entity::find()
                .filter(device::Column::Id.is_in(ids))
                .order_by_asc(device::Column::DeviceId)
                .all(conn)
                .await?,
        )
    };
    let device_rows = match machine_id {
        Some(m) => {
            machine::Entity::find_by_id(m)
                .one(conn)
                .await?
                .ok_or_else(|| Error::not_found(Entity::Machine, m.to_string()))?;
            devices_of(devices_of_machine(conn, m).await?).await?
        }
        None if outlet_id.is_some() => {
            devices_of(
                machine_rows
                    .iter()
                    .filter_map(|m| m.current_device_id)
                    .collect(),
            )
            .await?
        }
        None => {
            device::Entity::find()
                .order_by_asc(device::Column::DeviceId)
                .all(conn)
                .await?
        }
    };
    let devices = device_rows
        .into_iter()
        .map(|d| {
            let machine = carried.get(&d.id).copied();
            DeviceOption {
                current: machine_id.is_some() && machine == machine_id,
                machine_id: machine,
                device_id: d.device_id,
            }
        })
        .collect();
    let machines = machine_rows
        .into_iter()
        .map(|m| MachineOption {
            id: m.id,
            name: m.name,
            machine_code: m.machine_code,
            outlet_id: m.outlet_id,
        })
        .collect();
    Ok(Options {
        outlets,
        machines,
        devices,
    })
}

// ---------------------------------------------------------------------------------------------
// Per-device analytics

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourCount {
    /// Local hour of day, 0-23.
    pub hour: u32,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analytics {
    /// The device asked about; `None` is the whole fleet.
    pub device_id: Option<String>,
    pub days: i64,
    pub tz: String,
    pub start: String,
    pub end: String,
    pub totals: Totals,
    /// One bucket per local day.
    pub per_day: Period,
    /// Treatments per local hour of day (index = hour), over the whole range.
    pub by_hour: Vec<i64>,
    /// The hours with the most treatments, busiest first (ties: earlier hour first); at most
    /// five, never an hour without treatments.
    pub busiest_hours: Vec<HourCount>,
}

/// Totals, a daily series and the hours of day with most treatments over the last `days`
/// (default 7) local days, for one device or the whole fleet.
pub async fn analytics(
    db: &Db,
    device_id: Option<&str>,
    days: Option<i64>,
    tz: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Analytics> {
    let tz = parse_tz(tz)?;
    let days_n = days.unwrap_or(DEFAULT_DAYS);
    let buckets = resolve_range(Granularity::Day, tz, None, None, Some(days_n), now)?;
    let filter = Filter::resolve(db, None, None, device_id).await?;
    let query = StatsQuery {
        granularity: Granularity::Day,
        tz,
        buckets: buckets.clone(),
        filter,
        cumulative: false,
        ma: 0,
        compare: false,
    };
    let per_day = period(db, &query, &buckets).await?;
    // Hours of day: hourly buckets over the same range, folded by their local hour.
    let hours = Buckets::new(
        Granularity::Hour,
        tz,
        buckets.start(),
        count_between(Granularity::Hour, tz, buckets.start(), buckets.end()).max(0) as usize,
    );
    let hourly = count(db.conn(), filter, &hours).await?;
    let mut by_hour = vec![0i64; 24];
    for (i, [b, s, p]) in hourly.into_iter().enumerate() {
        let hour = at(hours.edges[i]).with_timezone(&tz).hour() as usize;
        by_hour[hour] += b + s + p;
    }
    let mut busiest: Vec<HourCount> = by_hour
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(h, n)| HourCount {
            hour: h as u32,
            count: *n,
        })
        .collect();
    busiest.sort_by(|a, b| b.count.cmp(&a.count).then(a.hour.cmp(&b.hour)));
    busiest.truncate(5);
    Ok(Analytics {
        device_id: device_id
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        days: days_n,
        tz: tz.name().to_owned(),
        start: local_rfc3339(tz, buckets.start()),
        end: local_rfc3339(tz, buckets.end()),
        totals: per_day.totals,
        per_day,
        by_hour,
        busiest_hours: busiest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn berlin_days_are_23_and_25_hours_long_when_the_clock_changes() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let b = resolve_range(
            Granularity::Day,
            tz,
            Some("2025-03-29"),
            Some("2025-03-31"),
            None,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(b.labels(), ["2025-03-29", "2025-03-30", "2025-03-31"]);
        let hours: Vec<i64> = b.edges.windows(2).map(|w| (w[1] - w[0]) / 3600).collect();
        assert_eq!(hours, [24, 23, 24]);
        let b = resolve_range(
            Granularity::Day,
            tz,
            Some("2025-10-26"),
            Some("2025-10-26"),
            None,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(b.edges[1] - b.edges[0], 25 * 3600);
        assert_eq!(b.unit(), HOUR);
    }

    #[test]
    fn days_end_with_the_bucket_holding_now() {
        let now = utc("2025-06-10T13:20:00Z");
        let b = resolve_range(Granularity::Day, Tz::UTC, None, None, Some(7), now).unwrap();
        assert_eq!(b.len(), 7);
        assert_eq!(b.labels()[0], "2025-06-04");
        assert_eq!(b.labels()[6], "2025-06-10");
        let b = resolve_range(Granularity::Hour, Tz::UTC, None, None, Some(1), now).unwrap();
        assert_eq!(b.len(), 24);
        assert_eq!(b.end(), utc("2025-06-10T14:00:00Z"));
    }

    #[test]
    fn minutes_over_a_year_are_refused_with_the_allowed_count() {
        let err = resolve_range(
            Granularity::Minute,
            Tz::UTC,
            None,
            None,
            Some(365),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(err.code(), "range_too_fine");
        assert!(err.to_string().contains("525600"), "{err}");
        assert!(err.to_string().contains("5000"), "{err}");
    }

    #[test]
    fn half_hour_zones_fall_back_to_raw_events() {
        let tz: Tz = "Asia/Kolkata".parse().unwrap();
        let b = resolve_range(
            Granularity::Day,
            tz,
            Some("2025-01-01"),
            Some("2025-01-02"),
            None,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(b.unit(), 1800);
        assert_eq!(b.edges[0], utc("2024-12-31T18:30:00Z").timestamp());
    }

    #[test]
    fn months_compare_with_the_months_before() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let b = resolve_range(
            Granularity::Month,
            tz,
            Some("2025-01-15"),
            Some("2025-03-02"),
            None,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(b.labels(), ["2025-01", "2025-02", "2025-03"]);
        assert_eq!(b.previous().labels(), ["2024-10", "2024-11", "2024-12"]);
    }

    #[test]
    fn moving_average_is_trailing_and_partial_at_the_start() {
        assert_eq!(moving_average(&[3, 0, 6, 3], 2), [3.0, 1.5, 3.0, 4.5]);
        assert_eq!(moving_average(&[1, 2, 2], 3), [1.0, 1.5, 1.667]);
    }
}
