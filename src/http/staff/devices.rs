//! `/api/devices/…` and `/api/devices-data/`: devices with their presence, counters and
//! machine; notes, delete and token reset.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::{web::Data, Request};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Enum, Object, OpenApi,
};

use super::{
    common::{optional_text, page_request, ApiResult, Deleted, Page},
    StaffAuth, Tag,
};
use crate::{
    domain::{
        device_admin,
        queries::{self, DeviceFilter, DeviceView},
        status::Presence,
    },
    state::AppState,
};

/// online: connected over MQTT or last contact within the online threshold (16 min by
/// default); idle: within the idle threshold (1 h); offline beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum DeviceState {
    Online,
    Idle,
    Offline,
}

impl From<Presence> for DeviceState {
    fn from(p: Presence) -> Self {
        match p {
            Presence::Online => DeviceState::Online,
            Presence::Idle => DeviceState::Idle,
            Presence::Offline => DeviceState::Offline,
        }
    }
}

impl From<DeviceState> for Presence {
    fn from(s: DeviceState) -> Self {
        match s {
            DeviceState::Online => Presence::Online,
            DeviceState::Idle => Presence::Idle,
            DeviceState::Offline => Presence::Offline,
        }
    }
}

#[derive(Debug, Clone, Object)]
pub struct Counts {
    pub basic: i64,
    pub standard: i64,
    pub premium: i64,
}

/// The machine a device is bound to.
#[derive(Debug, Clone, Object)]
pub struct BoundMachine {
    pub id: i32,
    pub name: String,
    pub machine_code: String,
    #[oai(nullable)]
    pub outlet_id: Option<i32>,
    #[oai(nullable)]
    pub outlet_name: Option<String>,
}

#[derive(Debug, Clone, Object)]
pub struct DeviceDto {
    pub device_id: String,
    pub mac: String,
    pub status: DeviceState,
    pub firmware: String,
    pub assigned: bool,
    pub notes: String,
    #[oai(nullable)]
    pub last_seen: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub last_poll: Option<DateTime<Utc>>,
    pub mqtt_connected: bool,
    pub wifi_connected: bool,
    #[oai(nullable)]
    pub rtc_available: Option<bool>,
    #[oai(nullable)]
    pub sd_card_available: Option<bool>,
    #[oai(nullable)]
    pub uptime_seconds: Option<i64>,
    /// The device's own treatment counters.
    pub counts: Counts,
    #[oai(nullable)]
    pub bound_machine: Option<BoundMachine>,
    pub created_at: DateTime<Utc>,
}

impl From<DeviceView> for DeviceDto {
    fn from(v: DeviceView) -> Self {
        let (basic, standard, premium) = v.counters();
        let status = v.status.as_ref();
        let last_seen = match (v.device.last_seen, status.and_then(|s| s.last_seen)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        DeviceDto {
            status: v.presence.into(),
            firmware: v.device.firmware.clone(),
            assigned: v.device.assigned,
            notes: v.device.notes.clone(),
            last_seen,
            last_poll: status.and_then(|s| s.last_poll),
            mqtt_connected: status.is_some_and(|s| s.mqtt_connected),
            wifi_connected: status.is_some_and(|s| s.wifi_connected),
            rtc_available: status.and_then(|s| s.rtc_available),
            sd_card_available: status.and_then(|s| s.sd_card_available),
            uptime_seconds: status.and_then(|s| s.uptime_seconds),
            counts: Counts {
                basic,
                standard,
                premium,
            },
            bound_machine: v.machine.as_ref().map(|m| BoundMachine {
                id: m.id,
                name: m.name.clone(),
                machine_code: m.machine_code.clone(),
                outlet_id: m.outlet_id,
                outlet_name: v.outlet.as_ref().map(|o| o.name.clone()),
            }),
            created_at: v.device.created_at,
            mac: v.device.mac,
            device_id: v.device.device_id,
        }
    }
}

/// Fleet totals for the real-time view.
#[derive(Debug, Object)]
pub struct FleetTotals {
    pub devices: u64,
    pub online: u64,
    pub idle: u64,
    pub offline: u64,
    /// Sums of the devices' own counters.
    pub counts: Counts,
}

/// The seed's real-time UI shape: devices with status and counts, plus totals.
#[derive(Debug, Object)]
pub struct DevicesData {
    pub totals: FleetTotals,
    pub generated_at: DateTime<Utc>,
    #[oai(flatten)]
    pub page: Page<DeviceDto>,
}

#[derive(Debug, Object)]
pub struct DevicePatchBody {
    /// Free text for staff.
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub notes: Option<String>,
}

#[derive(Debug, Object)]
pub struct ResetTokenReply {
    pub success: bool,
    pub device_id: String,
    pub message: String,
}

pub struct DevicesApi;

impl DevicesApi {
    async fn listing(
        req: &Request,
        state: &AppState,
        filter: DeviceFilter,
        limit: Option<i64>,
        offset: Option<i64>,
    ) -> ApiResult<Json<Page<DeviceDto>>> {
        let window = page_request(limit, offset)?;
        let all = queries::devices(&state.db, filter, state.settings.thresholds()).await?;
        Ok(Json(Page::from_domain(
            req,
            queries::Page::from_vec(all, window),
            DeviceDto::from,
        )))
    }
}

#[OpenApi(tag = "Tag::Devices")]
impl DevicesApi {
    /// List devices
    ///
    /// Newest first, each with its status, counters and bound machine.
    #[oai(path = "/api/devices", method = "get", operation_id = "devices_list")]
    async fn list(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Only assigned (true) or unassigned (false) devices.
        assigned: Query<Option<bool>>,
        /// Only devices in this state.
        status: Query<Option<DeviceState>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<DeviceDto>>> {
        let filter = DeviceFilter {
            assigned: assigned.0,
            presence: status.0.map(Into::into),
        };
        Self::listing(req, &state, filter, limit.0, offset.0).await
    }

    /// All devices, online and offline
    #[oai(
        path = "/api/devices/all",
        method = "get",
        operation_id = "devices_all"
    )]
    async fn all(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<DeviceDto>>> {
        Self::listing(req, &state, DeviceFilter::default(), limit.0, offset.0).await
    }

    /// Online devices
    ///
    /// Devices connected over MQTT or in contact within the online threshold.
    #[oai(
        path = "/api/devices/online",
        method = "get",
        operation_id = "devices_online"
    )]
    async fn online(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<DeviceDto>>> {
        let filter = DeviceFilter {
            presence: Some(Presence::Online),
            ..Default::default()
        };
        Self::listing(req, &state, filter, limit.0, offset.0).await
    }

    /// Real-time devices data
    ///
    /// Devices with status and counts, plus fleet totals (over every device, not only the
    /// page).
    #[oai(
        path = "/api/devices-data",
        method = "get",
        operation_id = "devices_data"
    )]
    async fn data(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<DevicesData>> {
        let window = page_request(limit.0, offset.0)?;
        let all = queries::devices(
            &state.db,
            DeviceFilter::default(),
            state.settings.thresholds(),
        )
        .await?;
        let mut totals = FleetTotals {
            devices: all.len() as u64,
            online: 0,
            idle: 0,
            offline: 0,
            counts: Counts {
                basic: 0,
                standard: 0,
                premium: 0,
            },
        };
        for v in &all {
            match v.presence {
                Presence::Online => totals.online += 1,
                Presence::Idle => totals.idle += 1,
                Presence::Offline => totals.offline += 1,
            }
            let (b, s, p) = v.counters();
            totals.counts.basic += b;
            totals.counts.standard += s;
            totals.counts.premium += p;
        }
        Ok(Json(DevicesData {
            totals,
            generated_at: Utc::now(),
            page: Page::from_domain(req, queries::Page::from_vec(all, window), DeviceDto::from),
        }))
    }

    /// One device
    #[oai(
        path = "/api/devices/:device_id",
        method = "get",
        operation_id = "devices_get"
    )]
    async fn get(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Path<String>,
    ) -> ApiResult<Json<DeviceDto>> {
        let view = queries::device(&state.db, &device_id.0, state.settings.thresholds()).await?;
        Ok(Json(view.into()))
    }

    /// Change a device's notes
    #[oai(
        path = "/api/devices/:device_id",
        method = "patch",
        operation_id = "devices_patch"
    )]
    async fn patch(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Path<String>,
        body: Json<DevicePatchBody>,
    ) -> ApiResult<Json<DeviceDto>> {
        auth.staff()?;
        if let Some(notes) = &body.notes {
            device_admin::set_notes(&state.db, &state.notifier, &device_id.0, notes).await?;
        }
        let view = queries::device(&state.db, &device_id.0, state.settings.thresholds()).await?;
        Ok(Json(view.into()))
    }

    /// Delete a device
    ///
    /// Refused (409 `device_has_telemetry`) while telemetry of the device exists; unbinds it
    /// from its machine otherwise.
    #[oai(
        path = "/api/devices/:device_id",
        method = "delete",
        operation_id = "devices_delete"
    )]
    async fn delete(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Path<String>,
    ) -> ApiResult<Deleted> {
        auth.staff()?;
        device_admin::delete(&state.db, &state.tokens, &device_id.0).await?;
        Ok(Deleted::Done)
    }

    /// Reset a device's token
    ///
    /// Forgets the device's token: it stops working at once and the device's next handshake
    /// gets a fresh one (also under `strict_handshake`).
    #[oai(
        path = "/api/devices/:device_id/reset-token",
        method = "post",
        operation_id = "devices_reset_token"
    )]
    async fn reset_token(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// The device's id (or its MAC).
        device_id: Path<String>,
    ) -> ApiResult<Json<ResetTokenReply>> {
        auth.staff()?;
        crate::domain::devices::reset_credentials(&state.db, &state.tokens, &device_id.0).await?;
        Ok(Json(ResetTokenReply {
            success: true,
            device_id: device_id.0,
            message: "the token was forgotten; the device gets a new one at its next handshake"
                .into(),
        }))
    }
}
