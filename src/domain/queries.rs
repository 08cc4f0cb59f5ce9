//! Reads for staff: paginated listings and the page window shared by every list.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
};

use crate::{
    db::{
        entities::{device, device_status, machine, outlet, telemetry_event},
        Db,
    },
    domain::status::{presence, Presence, Thresholds},
    error::{Error, Result},
};

/// Items per page when the caller does not say.
pub const DEFAULT_LIMIT: u64 = 50;
/// The most items one page may hold.
pub const MAX_LIMIT: u64 = 1000;

/// A window into a list: `limit` items starting at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u64,
    pub offset: u64,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest {
            limit: DEFAULT_LIMIT,
            offset: 0,
        }
    }
}

impl PageRequest {
    /// Checks the bounds: `limit` 1..=1000 (default 50), `offset` ≥ 0.
    pub fn new(limit: Option<i64>, offset: Option<i64>) -> Result<PageRequest> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT as i64);
        if !(1..=MAX_LIMIT as i64).contains(&limit) {
            return Err(Error::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_LIMIT}"),
            ));
        }
        let offset = offset.unwrap_or(0);
        if offset < 0 {
            return Err(Error::invalid("invalid_offset", "offset must be >= 0"));
        }
        Ok(PageRequest {
            limit: limit as u64,
            offset: offset as u64,
        })
    }
}

/// One page of a list and the size of the whole list.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub count: u64,
    pub items: Vec<T>,
    pub request: PageRequest,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            count: self.count,
            items: self.items.into_iter().map(f).collect(),
            request: self.request,
        }
    }

    /// Pages an in-memory list (for lists built from several queries).
    pub fn from_vec(all: Vec<T>, request: PageRequest) -> Page<T> {
        let count = all.len() as u64;
        let items = all
            .into_iter()
            .skip(request.offset as usize)
            .take(request.limit as usize)
            .collect();
        Page {
            count,
            items,
            request,
        }
    }
}

/// Counts a query's rows and fetches the requested window of them.
pub async fn paginate<E, C>(
    conn: &C,
    query: Select<E>,
    request: PageRequest,
) -> Result<Page<E::Model>>
where
    E: EntityTrait,
    E::Model: Sync,
    C: ConnectionTrait,
{
    let count = query.clone().count(conn).await?;
    let items = if request.offset >= count {
        Vec::new()
    } else {
        query
            .offset(request.offset)
            .limit(request.limit)
            .all(conn)
            .await?
    };
    Ok(Page {
        count,
        items,
        request,
    })
}

// ---------------------------------------------------------------------------------------------
// Devices as staff see them.

/// A device with its latest state, its presence and the machine (and outlet) it is bound to.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub device: device::Model,
    pub status: Option<device_status::Model>,
    pub presence: Presence,
    pub machine: Option<machine::Model>,
    pub outlet: Option<outlet::Model>,
}

impl DeviceView {
    /// The device's own counters (basic, standard, premium).
    pub fn counters(&self) -> (i64, i64, i64) {
        self.status
            .as_ref()
            .map(|s| {
                (
                    s.current_count_basic,
                    s.current_count_standard,
                    s.current_count_premium,
                )
            })
            .unwrap_or_default()
    }
}

/// Builds the views of `devices` with three batched lookups.
pub async fn device_views(
    conn: &impl ConnectionTrait,
    devices: Vec<device::Model>,
    thresholds: Thresholds,
    now: DateTime<Utc>,
) -> Result<Vec<DeviceView>> {
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i32> = devices.iter().map(|d| d.id).collect();
    let statuses: HashMap<i32, device_status::Model> = device_status::Entity::find()
        .filter(device_status::Column::DeviceId.is_in(ids.clone()))
        .all(conn)
        .await?
        .into_iter()
        .map(|s| (s.device_id, s))
        .collect();
    let machines: HashMap<i32, machine::Model> = machine::Entity::find()
        .filter(machine::Column::CurrentDeviceId.is_in(ids))
        .all(conn)
        .await?
        .into_iter()
        .filter_map(|m| m.current_device_id.map(|d| (d, m)))
        .collect();
    let outlets = outlets_by_id(conn, machines.values().filter_map(|m| m.outlet_id)).await?;
    Ok(devices
        .into_iter()
        .map(|device| {
            let status = statuses.get(&device.id).cloned();
            let presence = status
                .as_ref()
                .map(|s| presence(s, now, thresholds))
                .unwrap_or(Presence::Offline);
            let machine = machines.get(&device.id).cloned();
            let outlet = machine
                .as_ref()
                .and_then(|m| m.outlet_id)
                .and_then(|o| outlets.get(&o).cloned());
            DeviceView {
                device,
                status,
                presence,
                machine,
                outlet,
            }
        })
        .collect())
}

/// Outlets by id, in one query.
pub async fn outlets_by_id(
    conn: &impl ConnectionTrait,
    ids: impl Iterator<Item = i32>,
) -> Result<HashMap<i32, outlet::Model>> {
    let mut ids: Vec<i32> = ids.collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(outlet::Entity::find()
        .filter(outlet::Column::Id.is_in(ids))
        .all(conn)
        .await?
        .into_iter()
        .map(|o| (o.id, o))
        .collect())
}

/// Which devices a listing shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceFilter {
    pub assigned: Option<bool>,
    pub presence: Option<Presence>,
}

/// Every device matching `filter`, newest first (presence is computed, so the whole fleet is
/// read once).
pub async fn devices(
    db: &Db,
    filter: DeviceFilter,
    thresholds: Thresholds,
) -> Result<Vec<DeviceView>> {
    let mut query = device::Entity::find().order_by_desc(device::Column::Id);
    if let Some(assigned) = filter.assigned {
        query = query.filter(device::Column::Assigned.eq(assigned));
    }
    let all = query.all(db.conn()).await?;
    let views = device_views(db.conn(), all, thresholds, Utc::now()).await?;
    Ok(views
        .into_iter()
        .filter(|v| filter.presence.is_none_or(|p| v.presence == p))
        .collect())
}

/// One device's view.
pub async fn device(db: &Db, device_id: &str, thresholds: Thresholds) -> Result<DeviceView> {
    let found = crate::domain::devices::find_by_device_id(db.conn(), device_id).await?;
    let mut views = device_views(db.conn(), vec![found], thresholds, Utc::now()).await?;
    views
        .pop()
        .ok_or_else(|| Error::not_found(crate::error::Entity::Device, device_id))
}

// ---------------------------------------------------------------------------------------------
// Telemetry events.

/// Filters of the event list.
#[derive(Debug, Clone)]
pub struct EventFilter {
    /// The device's `device_id` (or MAC).
    pub device_id: Option<String>,
    pub machine_id: Option<i32>,
    pub outlet_id: Option<i32>,
    /// Events that happened at or after this time.
    pub since: DateTime<Utc>,
    /// … and before this one.
    pub until: Option<DateTime<Utc>>,
    /// `treatment`, `status` or `reset`.
    pub event: Option<String>,
    /// Leave out `status` (heartbeat) events.
    pub exclude_status: bool,
}

/// An event with its device's `device_id`.
#[derive(Debug, Clone)]
pub struct EventView {
    pub event: telemetry_event::Model,
    pub device_id: String,
}

async fn with_device_ids(
    conn: &impl ConnectionTrait,
    events: Vec<telemetry_event::Model>,
) -> Result<Vec<EventView>> {
    let mut ids: Vec<i32> = events.iter().map(|e| e.device_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let names: HashMap<i32, String> = if ids.is_empty() {
        HashMap::new()
    } else {
        device::Entity::find()
            .filter(device::Column::Id.is_in(ids))
            .all(conn)
            .await?
            .into_iter()
            .map(|d| (d.id, d.device_id))
            .collect()
    };
    Ok(events
        .into_iter()
        .map(|event| EventView {
            device_id: names.get(&event.device_id).cloned().unwrap_or_default(),
            event,
        })
        .collect())
}

/// Events matching `filter`, newest first.
pub async fn events(db: &Db, filter: EventFilter, page: PageRequest) -> Result<Page<EventView>> {
    if filter.until.is_some_and(|u| u < filter.since) {
        return Err(Error::invalid(
            "invalid_range",
            "end must not be before start",
        ));
    }
    let mut query = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::OccurredAt.gte(filter.since))
        .order_by_desc(telemetry_event::Column::OccurredAt)
        .order_by_desc(telemetry_event::Column::Id);
    if let Some(until) = filter.until {
        query = query.filter(telemetry_event::Column::OccurredAt.lt(until));
    }
    if let Some(d) = &filter.device_id {
        let found = crate::domain::devices::find_by_device_id(db.conn(), d).await?;
        query = query.filter(telemetry_event::Column::DeviceId.eq(found.id));
    }
    if let Some(m) = filter.machine_id {
        query = query.filter(telemetry_event::Column::MachineId.eq(m));
    }
    if let Some(o) = filter.outlet_id {
        query = query.filter(telemetry_event::Column::OutletId.eq(o));
    }
    if let Some(e) = &filter.event {
        let kind = crate::domain::events::EventKind::parse(e.trim()).ok_or_else(|| {
            Error::invalid(
                "invalid_event",
                format!("event `{e}` is not one of treatment, status, reset"),
            )
        })?;
        query = query.filter(telemetry_event::Column::Event.eq(kind.as_str()));
    }
    if filter.exclude_status {
        query = query.filter(telemetry_event::Column::Event.ne("status"));
    }
    let page = paginate(db.conn(), query, page).await?;
    let items = with_device_ids(db.conn(), page.items).await?;
    Ok(Page {
        count: page.count,
        items,
        request: page.request,
    })
}

/// A device's most recent event, if any.
pub async fn latest_event(db: &Db, device_id: &str) -> Result<Option<EventView>> {
    let found = crate::domain::devices::find_by_device_id(db.conn(), device_id).await?;
    let latest = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::DeviceId.eq(found.id))
        .order_by_desc(telemetry_event::Column::OccurredAt)
        .order_by_desc(telemetry_event::Column::Id)
        .one(db.conn())
        .await?;
    Ok(latest.map(|event| EventView {
        event,
        device_id: found.device_id,
    }))
}

/// A device's most recent treatment, if any (its "mode").
pub async fn latest_treatment(db: &Db, device_pk: i32) -> Result<Option<telemetry_event::Model>> {
    Ok(telemetry_event::Entity::find()
        .filter(telemetry_event::Column::DeviceId.eq(device_pk))
        .filter(telemetry_event::Column::Treatment.is_not_null())
        .order_by_desc(telemetry_event::Column::OccurredAt)
        .order_by_desc(telemetry_event::Column::Id)
        .one(db.conn())
        .await?)
}
