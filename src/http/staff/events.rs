//! Reads of telemetry: `/api/events/` (GET), `/api/telemetry/summary/`,
//! `/api/telemetry/latest/`.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use poem::{web::Data, Request};
use poem_openapi::{param::Query, payload::Json, types::Any, Object, OpenApi};
use serde_json::Value;

use super::{
    common::{page_request, ApiResult, Page},
    devices::DeviceDto,
    StaffAuth, Tag,
};
use crate::{
    domain::queries::{self, EventFilter, EventView},
    error::Error,
    state::AppState,
};

#[derive(Debug, Object)]
pub struct EventDto {
    pub id: i64,
    pub device_id: String,
    pub event_id: String,
    /// `treatment`, `status` or `reset`.
    pub event: String,
    /// `BASIC`, `STANDARD` or `PREMIUM`.
    #[oai(nullable)]
    pub treatment: Option<String>,
    #[oai(nullable)]
    pub counter: Option<i64>,
    /// Legacy `/api/iot/` fields.
    #[oai(nullable)]
    pub event_type: Option<String>,
    #[oai(nullable)]
    pub count_basic: Option<i64>,
    #[oai(nullable)]
    pub count_standard: Option<i64>,
    #[oai(nullable)]
    pub count_premium: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    /// The device's own time, as it sent it.
    #[oai(nullable)]
    pub device_timestamp: Option<String>,
    pub received_at: DateTime<Utc>,
    #[oai(nullable)]
    pub wifi_status: Option<bool>,
    /// The machine and outlet the event was attributed to when it happened.
    #[oai(nullable)]
    pub machine_id: Option<i32>,
    #[oai(nullable)]
    pub outlet_id: Option<i32>,
    #[oai(nullable)]
    pub payload: Option<Any<Value>>,
}

impl From<EventView> for EventDto {
    fn from(v: EventView) -> Self {
        let e = v.event;
        EventDto {
            id: e.id,
            device_id: v.device_id,
            event_id: e.event_id,
            event: e.event,
            treatment: e.treatment,
            counter: e.counter,
            event_type: e.event_type,
            count_basic: e.count_basic,
            count_standard: e.count_standard,
            count_premium: e.count_premium,
            occurred_at: e.occurred_at,
            device_timestamp: e.device_timestamp,
            received_at: e.received_at,
            wifi_status: e.wifi_status,
            machine_id: e.machine_id,
            outlet_id: e.outlet_id,
            payload: e.payload.map(Any),
        }
    }
}

#[derive(Debug, Object)]
pub struct TelemetrySummary {
    pub device: DeviceDto,
    /// The last treatment the device counted (`BASIC`, `STANDARD`, `PREMIUM`).
    #[oai(nullable)]
    pub mode: Option<String>,
    #[oai(nullable)]
    pub latest_event: Option<EventDto>,
}

#[derive(Debug, Object)]
pub struct LatestEvent {
    pub device_id: String,
    /// Null when the device sent nothing yet.
    #[oai(nullable)]
    pub event: Option<EventDto>,
}

pub struct EventsApi;

#[OpenApi(tag = "Tag::Telemetry")]
impl EventsApi {
    /// List telemetry events
    ///
    /// Newest first. The window is `start`..`end` when given, else the last `days` days
    /// (default 7).
    #[oai(path = "/api/events", method = "get", operation_id = "events_list")]
    async fn list(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        device_id: Query<Option<String>>,
        machine_id: Query<Option<i32>>,
        outlet_id: Query<Option<i32>>,
        /// Days to look back (1-3650, default 7); ignored when `start` is given.
        #[oai(validator(minimum(value = "1"), maximum(value = "3650")))]
        days: Query<Option<i64>>,
        start: Query<Option<DateTime<Utc>>>,
        end: Query<Option<DateTime<Utc>>>,
        /// `treatment`, `status` or `reset`.
        event: Query<Option<String>>,
        /// Leave out `status` (heartbeat) events.
        exclude_status: Query<Option<bool>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<EventDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let days = days.0.unwrap_or(7);
        if !(1..=3650).contains(&days) {
            return Err(Error::invalid("invalid_days", "days must be between 1 and 3650").into());
        }
        let since = start.0.unwrap_or_else(|| Utc::now() - Duration::days(days));
        let filter = EventFilter {
            device_id: device_id.0,
            machine_id: machine_id.0,
            outlet_id: outlet_id.0,
            since,
            until: end.0,
            event: event.0,
            exclude_status: exclude_status.0.unwrap_or(false),
        };
        let page = queries::events(&state.db, filter, window).await?;
        Ok(Json(Page::from_domain(req, page, EventDto::from)))
    }

    /// A device's latest state
    ///
    /// Status, counters and mode (the last treatment), with the latest event.
    #[oai(
        path = "/api/telemetry/summary",
        method = "get",
        operation_id = "telemetry_summary"
    )]
    async fn summary(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Query<String>,
    ) -> ApiResult<Json<TelemetrySummary>> {
        let view = queries::device(&state.db, &device_id.0, state.settings.thresholds()).await?;
        let mode = queries::latest_treatment(&state.db, view.device.id)
            .await?
            .and_then(|e| e.treatment);
        let latest = queries::latest_event(&state.db, &device_id.0).await?;
        Ok(Json(TelemetrySummary {
            device: view.into(),
            mode,
            latest_event: latest.map(Into::into),
        }))
    }

    /// A device's most recent event
    #[oai(
        path = "/api/telemetry/latest",
        method = "get",
        operation_id = "telemetry_latest"
    )]
    async fn latest(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Query<String>,
    ) -> ApiResult<Json<LatestEvent>> {
        let latest = queries::latest_event(&state.db, &device_id.0).await?;
        let device_id = latest
            .as_ref()
            .map(|l| l.device_id.clone())
            .unwrap_or(device_id.0);
        Ok(Json(LatestEvent {
            device_id,
            event: latest.map(Into::into),
        }))
    }
}
