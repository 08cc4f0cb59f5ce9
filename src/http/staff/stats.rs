//! Usage analytics and exports: `/api/test/stats/`, `/api/test/stats-options/`,
//! `/api/test/stats-export.csv`, `/api/events/analytics/`, `/api/export/` (raw events as a
//! streamed CSV), `/api/flush/` and `/api/machines/{id}/logs/`.

use std::{borrow::Cow, sync::Arc};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use poem::{web::Data, Body, Request};
use poem_openapi::{
    param::{Path, Query},
    payload::{Binary, Json},
    registry::{MetaSchema, MetaSchemaRef},
    types::{ParseFromParameter, ParseResult, Type},
    ApiResponse, Object, OpenApi,
};

use super::{
    common::{page_request, ApiResult, Page},
    devices::Counts,
    StaffAuth, Tag,
};
use crate::{
    domain::{
        events::Counters,
        export::{self, CsvExport, ExportParams, FlushRequest},
        logs::{self, LogEntry},
        queries,
        stats::{self, Analytics, Averages, Options, Period, Series, Stats, StatsParams, Totals},
    },
    error::{Error, Result},
    state::AppState,
};

/// Treatments per bucket, one array per treatment and their sum.
#[derive(Debug, Object)]
pub struct SeriesDto {
    pub basic: Vec<i64>,
    pub standard: Vec<i64>,
    pub premium: Vec<i64>,
    pub total: Vec<i64>,
}

impl From<Series> for SeriesDto {
    fn from(s: Series) -> Self {
        SeriesDto {
            basic: s.basic,
            standard: s.standard,
            premium: s.premium,
            total: s.total,
        }
    }
}

/// Trailing moving averages of the series (rounded to 1/1000).
#[derive(Debug, Object)]
pub struct AveragesDto {
    pub basic: Vec<f64>,
    pub standard: Vec<f64>,
    pub premium: Vec<f64>,
    pub total: Vec<f64>,
}

impl From<Averages> for AveragesDto {
    fn from(a: Averages) -> Self {
        AveragesDto {
            basic: a.basic,
            standard: a.standard,
            premium: a.premium,
            total: a.total,
        }
    }
}

/// Treatments over the whole period (never cumulative).
#[derive(Debug, Object)]
pub struct TotalsDto {
    pub basic: i64,
    pub standard: i64,
    pub premium: i64,
    pub total: i64,
}

impl From<Totals> for TotalsDto {
    fn from(t: Totals) -> Self {
        TotalsDto {
            basic: t.basic,
            standard: t.standard,
            premium: t.premium,
            total: t.total,
        }
    }
}

/// One period: a label per bucket, where each bucket starts, the series and the totals.
#[derive(Debug, Object)]
pub struct PeriodDto {
    /// `2025-03` (month), `2025-03-30` (day), `2025-03-30T03:00+02:00` (hour, minute).
    pub labels: Vec<String>,
    /// Where each bucket starts, an instant with the zone's offset.
    pub starts: Vec<String>,
    pub series: SeriesDto,
    /// The moving averages, when `ma` > 0.
    #[oai(nullable)]
    pub ma: Option<AveragesDto>,
    pub totals: TotalsDto,
}

impl From<Period> for PeriodDto {
    fn from(p: Period) -> Self {
        PeriodDto {
            labels: p.labels,
            starts: p.starts,
            series: p.series.into(),
            ma: p.ma.map(Into::into),
            totals: p.totals.into(),
        }
    }
}

/// The range the answer covers: `start` inclusive, `end` exclusive, local to `tz`.
#[derive(Debug, Object)]
pub struct RangeDto {
    pub start: String,
    pub end: String,
    /// `minute`, `hour`, `day` or `month`.
    pub granularity: String,
    pub tz: String,
    /// Buckets in the period.
    pub buckets: u64,
}

/// Usage statistics: the current period's buckets at the top level; with `compare`, the
/// period of equal length just before it in `previous`, aligned bucket by bucket.
#[derive(Debug, Object)]
pub struct StatsDto {
    pub labels: Vec<String>,
    pub starts: Vec<String>,
    /// Running sums when `cumulative`.
    pub series: SeriesDto,
    /// Trailing moving averages over `ma_window` buckets, when asked.
    #[oai(nullable)]
    pub ma: Option<AveragesDto>,
    pub totals: TotalsDto,
    #[oai(nullable)]
    pub previous: Option<PeriodDto>,
    pub range: RangeDto,
    pub cumulative: bool,
    /// The moving-average window in buckets (0: off).
    pub ma_window: u64,
}

impl From<Stats> for StatsDto {
    fn from(s: Stats) -> Self {
        let current = PeriodDto::from(s.current);
        StatsDto {
            labels: current.labels,
            starts: current.starts,
            series: current.series,
            ma: current.ma,
            totals: current.totals,
            previous: s.previous.map(Into::into),
            range: RangeDto {
                start: s.range.start,
                end: s.range.end,
                granularity: s.range.granularity.as_str().to_owned(),
                tz: s.range.tz,
                buckets: s.range.buckets as u64,
            },
            cumulative: s.cumulative,
            ma_window: s.ma as u64,
        }
    }
}

#[derive(Debug, Object)]
pub struct OutletOptionDto {
    pub id: i32,
    pub name: String,
}

#[derive(Debug, Object)]
pub struct MachineOptionDto {
    pub id: i32,
    pub name: String,
    pub machine_code: String,
    #[oai(nullable)]
    pub outlet_id: Option<i32>,
}

#[derive(Debug, Object)]
pub struct DeviceOptionDto {
    pub device_id: String,
    /// The machine that carries it now.
    #[oai(nullable)]
    pub machine_id: Option<i32>,
    /// Whether it is bound to the machine asked about now (a device bound there earlier is
    /// listed too: its past events count for that machine).
    pub current: bool,
}

/// The filter cascade: every outlet; the machines of `outlet_id` (all without it); the
/// devices ever bound to `machine_id`, else those the listed machines carry, else all.
#[derive(Debug, Object)]
pub struct OptionsDto {
    pub outlets: Vec<OutletOptionDto>,
    pub machines: Vec<MachineOptionDto>,
    pub devices: Vec<DeviceOptionDto>,
}

impl From<Options> for OptionsDto {
    fn from(o: Options) -> Self {
        OptionsDto {
            outlets: o
                .outlets
                .into_iter()
                .map(|o| OutletOptionDto {
                    id: o.id,
                    name: o.name,
                })
                .collect(),
            machines: o
                .machines
                .into_iter()
                .map(|m| MachineOptionDto {
                    id: m.id,
                    name: m.name,
                    machine_code: m.machine_code,
                    outlet_id: m.outlet_id,
                })
                .collect(),
            devices: o
                .devices
                .into_iter()
                .map(|d| DeviceOptionDto {
                    device_id: d.device_id,
                    machine_id: d.machine_id,
                    current: d.current,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Object)]
pub struct HourCountDto {
    /// Local hour of day, 0-23.
    pub hour: u32,
    pub count: i64,
}

/// A device's (or the fleet's) treatments over the last `days` local days.
#[derive(Debug, Object)]
pub struct AnalyticsDto {
    /// The device asked about; null for the whole fleet.
    #[oai(nullable)]
    pub device_id: Option<String>,
    pub days: i64,
    pub tz: String,
    pub start: String,
    pub end: String,
    pub totals: TotalsDto,
    /// One bucket per local day.
    pub per_day: PeriodDto,
    /// Treatments per local hour of day (index = hour) over the range.
    pub by_hour: Vec<i64>,
    /// The busiest hours, busiest first (ties: earlier hour first); at most five.
    pub busiest_hours: Vec<HourCountDto>,
}

impl From<Analytics> for AnalyticsDto {
    fn from(a: Analytics) -> Self {
        AnalyticsDto {
            device_id: a.device_id,
            days: a.days,
            tz: a.tz,
            start: a.start,
            end: a.end,
            totals: a.totals.into(),
            per_day: a.per_day.into(),
            by_hour: a.by_hour,
            busiest_hours: a
                .busiest_hours
                .into_iter()
                .map(|h| HourCountDto {
                    hour: h.hour,
                    count: h.count,
                })
                .collect(),
        }
    }
}

/// What to flush. Without `before` and `device_id`, every telemetry event goes.
#[derive(Debug, Object)]
pub struct FlushBody {
    /// Must be exactly `DELETE ALL TELEMETRY`.
    #[oai(nullable)]
    pub confirm: Option<String>,
    /// Only events that happened before this time (ISO date-time; a date is its UTC midnight).
    #[oai(nullable)]
    pub before: Option<String>,
    /// Only this device's events (its id or MAC).
    #[oai(nullable)]
    pub device_id: Option<String>,
}

#[derive(Debug, Object)]
pub struct FlushedDto {
    /// Events deleted.
    pub deleted: u64,
    #[oai(nullable)]
    pub before: Option<String>,
    #[oai(nullable)]
    pub device_id: Option<String>,
}

/// A machine log entry: a treatment or a reset, with the device's counters after it.
#[derive(Debug, Object)]
pub struct LogEntryDto {
    pub id: i64,
    pub event_id: String,
    pub device_id: String,
    /// `treatment` or `reset`.
    pub event: String,
    /// `BASIC`, `STANDARD` or `PREMIUM` (null on resets).
    #[oai(nullable)]
    pub treatment: Option<String>,
    /// The device's own treatment counter, when it sent one.
    #[oai(nullable)]
    pub counter: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// The device's cumulative Basic/Standard/Premium after this entry.
    pub cumulative: Counts,
    /// Whether `cumulative` was reported by the device (its `current_counters`, a legacy
    /// reading's counts, a reset result) rather than counted by the server.
    pub reported: bool,
}

fn counts(c: Counters) -> Counts {
    Counts {
        basic: c.basic,
        standard: c.standard,
        premium: c.premium,
    }
}

impl From<LogEntry> for LogEntryDto {
    fn from(e: LogEntry) -> Self {
        LogEntryDto {
            id: e.id,
            event_id: e.event_id,
            device_id: e.device_id,
            event: e.event,
            treatment: e.treatment,
            counter: e.counter,
            occurred_at: e.occurred_at,
            received_at: e.received_at,
            cumulative: counts(e.cumulative),
            reported: e.reported,
        }
    }
}

/// The machine's stats card: historical totals from events and the current counters.
#[derive(Debug, Object)]
pub struct LogSummaryDto {
    /// Every treatment attributed to the machine, from the events.
    pub totals: TotalsDto,
    /// The device the machine carries now.
    #[oai(nullable)]
    pub current_device_id: Option<String>,
    /// That device's counters as its status last reported them.
    #[oai(nullable)]
    pub current_counters: Option<Counts>,
}

/// One page of a machine's log, newest first, in the list shape `{count, next, previous,
/// results}`, with the machine's id and its summary.
#[derive(Debug, Object)]
pub struct MachineLogsDto {
    /// Entries in the whole log.
    pub count: u64,
    #[oai(nullable)]
    pub next: Option<String>,
    #[oai(nullable)]
    pub previous: Option<String>,
    pub results: Vec<LogEntryDto>,
    pub machine_id: i32,
    pub summary: LogSummaryDto,
}

/// A CSV download.
#[derive(ApiResponse)]
pub enum CsvFile {
    /// The CSV file (UTF-8, header row first), sent as an attachment.
    #[oai(status = 200, content_type = "text/csv; charset=utf-8")]
    Csv(
        Binary<Body>,
        /// `attachment; filename="…"`.
        #[oai(header = "Content-Disposition")]
        String,
    ),
}

impl From<CsvExport> for CsvFile {
    /// Streams the export's chunks as they are produced: dropping the body (a client that
    /// went away) drops the stream and stops the query.
    fn from(export: CsvExport) -> Self {
        let body = Body::from_bytes_stream(export.body.map(|chunk| {
            chunk.map_err(|e| {
                tracing::error!(error = %e, "CSV export failed");
                std::io::Error::other(e.to_string())
            })
        }));
        let name = export.file_name.replace(['"', '\\', '\r', '\n'], "_");
        CsvFile::Csv(Binary(body), format!("attachment; filename=\"{name}\""))
    }
}

/// `granularity` as the client wrote it. The spec lists the four widths (Swagger UI offers
/// them); any other value is answered with 422 `invalid_granularity`.
#[derive(Debug, Clone)]
pub struct GranularityParam(pub String);

impl Type for GranularityParam {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string(granularity)".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let mut schema = MetaSchema::new("string");
        schema.enum_items = GRANULARITIES
            .map(|g| serde_json::Value::String(g.to_owned()))
            .to_vec();
        MetaSchemaRef::Inline(Box::new(schema))
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

const GRANULARITIES: [&str; 4] = ["minute", "hour", "day", "month"];

impl ParseFromParameter for GranularityParam {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Ok(GranularityParam(value.to_owned()))
    }
}

/// A text query parameter, refused when it holds a NUL (no database stores one).
fn text(field: &str, value: Option<String>) -> Result<Option<String>> {
    match value {
        Some(v) if v.contains('\0') => Err(Error::invalid(
            "invalid_parameter",
            format!("{field} must not contain NUL characters"),
        )),
        v => Ok(v),
    }
}

fn stats_params(
    granularity: Option<GranularityParam>,
    start: Option<String>,
    end: Option<String>,
    days: Option<i64>,
    outlet_id: Option<i32>,
    machine_id: Option<i32>,
    device_id: Option<String>,
    cumulative: Option<bool>,
    ma: Option<i64>,
    compare: Option<bool>,
    tz: Option<String>,
) -> Result<StatsParams> {
    if let Some(GranularityParam(g)) = &granularity {
        if !GRANULARITIES.contains(&g.as_str()) {
            return Err(Error::invalid(
                "invalid_granularity",
                format!("granularity `{g}` is not one of minute, hour, day, month"),
            ));
        }
    }
    Ok(StatsParams {
        granularity: text("granularity", granularity.map(|g| g.0))?,
        start: text("start", start)?,
        end: text("end", end)?,
        days,
        outlet_id,
        machine_id,
        device_id: text("device_id", device_id)?,
        cumulative: cumulative.unwrap_or(false),
        ma,
        compare: compare.unwrap_or(false),
        tz: text("tz", tz)?,
    })
}

pub struct StatsApi;

#[OpenApi(tag = "Tag::Analytics")]
impl StatsApi {
    /// Usage statistics
    ///
    /// Treatments per bucket of a `minute`, `hour`, `day` or `month` local to `tz`, every
    /// bucket present (zero when empty). The range is `start`..`end` (ISO dates or date-times;
    /// a bare `end` date includes that day) or the last `days`. More than 5,000 buckets is
    /// refused with 422 `range_too_fine`, giving the largest allowed count. Each event counts
    /// for the machine and outlet its device was bound to when it happened.
    #[oai(path = "/api/test/stats", method = "get", operation_id = "stats")]
    async fn stats(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// `minute`, `hour`, `day` (default) or `month`.
        granularity: Query<Option<GranularityParam>>,
        /// First bucket: an ISO date (local midnight in `tz`) or date-time.
        start: Query<Option<String>>,
        /// End of the range: a date-time (exclusive) or a date (included).
        end: Query<Option<String>>,
        /// Without `start`: the last `days` days up to `end` or now (default 7).
        #[oai(validator(minimum(value = "1"), maximum(value = "3660")))]
        days: Query<Option<i64>>,
        outlet_id: Query<Option<i32>>,
        machine_id: Query<Option<i32>>,
        /// A device's id (or its MAC).
        device_id: Query<Option<String>>,
        /// Running sums instead of counts per bucket.
        cumulative: Query<Option<bool>>,
        /// Trailing moving-average window in buckets (0, the default, is off).
        #[oai(validator(minimum(value = "0"), maximum(value = "5000")))]
        ma: Query<Option<i64>>,
        /// Add the period of equal length just before, aligned bucket by bucket.
        compare: Query<Option<bool>>,
        /// IANA time zone of the buckets (default `UTC`), e.g. `Europe/Berlin`.
        tz: Query<Option<String>>,
    ) -> ApiResult<Json<StatsDto>> {
        let p = stats_params(
            granularity.0,
            start.0,
            end.0,
            days.0,
            outlet_id.0,
            machine_id.0,
            device_id.0,
            cumulative.0,
            ma.0,
            compare.0,
            tz.0,
        )?;
        let answer = stats::stats(&state.db, &p, Utc::now()).await?;
        Ok(Json(answer.into()))
    }

    /// Filter options of the statistics
    ///
    /// Every outlet; the machines of `outlet_id` (all machines without it); the devices ever
    /// bound to `machine_id`, else the devices the listed machines carry.
    #[oai(
        path = "/api/test/stats-options",
        method = "get",
        operation_id = "stats_options"
    )]
    async fn options(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        outlet_id: Query<Option<i32>>,
        machine_id: Query<Option<i32>>,
    ) -> ApiResult<Json<OptionsDto>> {
        let options = stats::options(&state.db, outlet_id.0, machine_id.0).await?;
        Ok(Json(options.into()))
    }

    /// Usage statistics as CSV
    ///
    /// The same parameters and numbers as `GET /api/test/stats/`: one row per bucket
    /// (`bucket, start, basic, standard, premium, total`), then `ma_*` columns with `ma`, then
    /// the previous period's bucket and counts (`previous_*`) with `compare`.
    #[oai(
        path = "/api/test/stats-export.csv",
        method = "get",
        operation_id = "stats_export_csv"
    )]
    async fn stats_csv(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// `minute`, `hour`, `day` (default) or `month`.
        granularity: Query<Option<GranularityParam>>,
        /// First bucket: an ISO date (local midnight in `tz`) or date-time.
        start: Query<Option<String>>,
        /// End of the range: a date-time (exclusive) or a date (included).
        end: Query<Option<String>>,
        /// Without `start`: the last `days` days up to `end` or now (default 7).
        #[oai(validator(minimum(value = "1"), maximum(value = "3660")))]
        days: Query<Option<i64>>,
        outlet_id: Query<Option<i32>>,
        machine_id: Query<Option<i32>>,
        /// A device's id (or its MAC).
        device_id: Query<Option<String>>,
        /// Running sums instead of counts per bucket.
        cumulative: Query<Option<bool>>,
        /// Trailing moving-average window in buckets (0, the default, is off).
        #[oai(validator(minimum(value = "0"), maximum(value = "5000")))]
        ma: Query<Option<i64>>,
        /// Add the period of equal length just before, aligned bucket by bucket.
        compare: Query<Option<bool>>,
        /// IANA time zone of the buckets (default `UTC`), e.g. `Europe/Berlin`.
        tz: Query<Option<String>>,
    ) -> ApiResult<CsvFile> {
        let p = stats_params(
            granularity.0,
            start.0,
            end.0,
            days.0,
            outlet_id.0,
            machine_id.0,
            device_id.0,
            cumulative.0,
            ma.0,
            compare.0,
            tz.0,
        )?;
        let csv = export::export_stats(&state.db, &p, Utc::now()).await?;
        Ok(csv.into())
    }

    /// Treatment analytics of a device or the fleet
    ///
    /// Totals per treatment, a series per local day and the busiest hours of day over the
    /// last `days` days.
    #[oai(
        path = "/api/events/analytics",
        method = "get",
        operation_id = "events_analytics"
    )]
    async fn analytics(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// A device's id (or its MAC); the whole fleet without it.
        device_id: Query<Option<String>>,
        /// Local days to look back, today included (default 7).
        #[oai(validator(minimum(value = "1"), maximum(value = "3660")))]
        days: Query<Option<i64>>,
        /// IANA time zone of the days and hours (default `UTC`).
        tz: Query<Option<String>>,
    ) -> ApiResult<Json<AnalyticsDto>> {
        let device_id = text("device_id", device_id.0)?;
        let tz = text("tz", tz.0)?;
        let answer = stats::analytics(
            &state.db,
            device_id.as_deref(),
            days.0,
            tz.as_deref(),
            Utc::now(),
        )
        .await?;
        Ok(Json(answer.into()))
    }

    /// Raw telemetry events as CSV
    ///
    /// Oldest first, streamed from the database page by page (memory stays flat whatever the
    /// size). The range is `start`..`end` (UTC; a bare `end` date includes that day) or the
    /// last `days` (default 30). Columns: `id, event_id, device_id, machine_id, machine_code,
    /// outlet_id, outlet_name, event, treatment, counter, occurred_at, received_at,
    /// device_timestamp, count_basic, count_standard, count_premium, wifi_status, payload`.
    #[oai(path = "/api/export", method = "get", operation_id = "export_events")]
    async fn export(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// A device's id (or its MAC).
        device_id: Query<Option<String>>,
        machine_id: Query<Option<i32>>,
        outlet_id: Query<Option<i32>>,
        /// Without `start`: the last `days` days (default 30).
        #[oai(validator(minimum(value = "1"), maximum(value = "3660")))]
        days: Query<Option<i64>>,
        /// ISO date or date-time (UTC when it has no offset).
        start: Query<Option<String>>,
        /// ISO date-time (exclusive) or date (included).
        end: Query<Option<String>>,
    ) -> ApiResult<CsvFile> {
        let p = ExportParams {
            device_id: text("device_id", device_id.0)?,
            machine_id: machine_id.0,
            outlet_id: outlet_id.0,
            days: days.0,
            start: text("start", start.0)?,
            end: text("end", end.0)?,
        };
        let csv = export::export_events(&state.db, &p, Utc::now()).await?;
        Ok(csv.into())
    }

    /// Delete telemetry (superusers)
    ///
    /// Deletes every telemetry event, or those before `before` and/or of one device, and keeps
    /// the statistics exact. Needs `{"confirm": "DELETE ALL TELEMETRY"}`; who asked is logged.
    #[oai(path = "/api/flush", method = "post", operation_id = "flush")]
    async fn flush(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        body: Json<FlushBody>,
    ) -> ApiResult<Json<FlushedDto>> {
        let who = auth.superuser()?;
        let body = body.0;
        let req = FlushRequest {
            confirm: body.confirm,
            before: text("before", body.before)?,
            device_id: text("device_id", body.device_id)?,
        };
        let flushed = export::flush(&state.db, &req, who.username()).await?;
        Ok(Json(FlushedDto {
            deleted: flushed.deleted,
            before: flushed.before,
            device_id: flushed.device_id,
        }))
    }

    /// A machine's treatment log
    ///
    /// Treatment and reset entries newest first, paginated with `limit`/`offset`, each with the
    /// device's cumulative Basic/Standard/Premium after it, computed on the server. `summary`
    /// has the machine's historical totals (from events) and the current counters of the
    /// device it carries. A device's entries show only for the time it was bound here.
    #[oai(
        path = "/api/machines/:id/logs",
        method = "get",
        operation_id = "machines_logs"
    )]
    async fn logs(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<MachineLogsDto>> {
        let window = page_request(limit.0, offset.0)?;
        let answer = logs::machine_logs(&state.db, id.0, window.limit, window.offset).await?;
        let summary = LogSummaryDto {
            totals: answer.summary.totals.into(),
            current_device_id: answer.summary.current_device_id,
            current_counters: answer.summary.current_counters.map(counts),
        };
        let page = Page::from_domain(
            req,
            queries::Page {
                count: answer.count,
                items: answer.entries,
                request: window,
            },
            LogEntryDto::from,
        );
        Ok(Json(MachineLogsDto {
            count: page.count,
            next: page.next,
            previous: page.previous,
            results: page.results,
            machine_id: answer.machine_id,
            summary,
        }))
    }
}
