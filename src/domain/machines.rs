//! Machines as staff manage them: CRUD, registration of a device as a new machine, and
//! assignment of devices. Every outlet change goes through `fleet::set_machine_outlet` and
//! every binding through `fleet::bind` / `fleet::release_device`, so the outlet and binding
//! histories stay complete.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};

use crate::{
    db::{
        entities::{device, machine, machine_device, outlet, telemetry_event},
        Db,
    },
    domain::{
        devices::{self, TokenCache},
        fleet,
        notify::{Notification, Notifier},
        queries::{self, device_views, outlets_by_id, DeviceView, Page, PageRequest},
        status::Thresholds,
    },
    error::{Entity, Error, Result},
};

/// A machine with its outlet and its current device (with that device's state).
#[derive(Debug, Clone)]
pub struct MachineView {
    pub machine: machine::Model,
    pub outlet: Option<outlet::Model>,
    pub device: Option<DeviceView>,
}

/// Filters of the machine list.
#[derive(Debug, Clone, Default)]
pub struct MachineFilter {
    pub outlet_id: Option<i32>,
    pub is_active: Option<bool>,
    /// The `device_id` of the current device.
    pub device_id: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NewMachine {
    pub outlet: Option<i32>,
    pub name: String,
    pub is_active: bool,
    /// Generated when absent.
    pub machine_code: Option<String>,
}

/// A partial update: `None` leaves a field as it is; `outlet: Some(None)` takes the machine
/// out of its outlet.
#[derive(Debug, Clone, Default)]
pub struct MachinePatch {
    pub name: Option<String>,
    pub machine_code: Option<String>,
    pub outlet: Option<Option<i32>>,
    pub is_active: Option<bool>,
}

fn field(name: &str, value: &str, max: usize) -> Result<String> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max {
        return Err(Error::invalid(
            "invalid_field",
            format!("{name} must be 1-{max} characters"),
        ));
    }
    Ok(v.to_owned())
}

fn generated_code() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("M-{}", id[20..].to_ascii_uppercase())
}

async fn views(
    conn: &impl ConnectionTrait,
    machines: Vec<machine::Model>,
    thresholds: Thresholds,
) -> Result<Vec<MachineView>> {
    let outlets = outlets_by_id(conn, machines.iter().filter_map(|m| m.outlet_id)).await?;
    let device_ids: Vec<i32> = machines
        .iter()
        .filter_map(|m| m.current_device_id)
        .collect();
    let devices = if device_ids.is_empty() {
        Vec::new()
    } else {
        device::Entity::find()
            .filter(device::Column::Id.is_in(device_ids))
            .all(conn)
            .await?
    };
    let mut device_views = device_views(conn, devices, thresholds, Utc::now()).await?;
    Ok(machines
        .into_iter()
        .map(|machine| {
            let device = machine.current_device_id.and_then(|d| {
                device_views
                    .iter()
                    .position(|v| v.device.id == d)
                    .map(|i| device_views.swap_remove(i))
            });
            MachineView {
                outlet: machine.outlet_id.and_then(|o| outlets.get(&o).cloned()),
                machine,
                device,
            }
        })
        .collect())
}

async fn find(conn: &impl ConnectionTrait, id: i32) -> Result<machine::Model> {
    machine::Entity::find_by_id(id)
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Machine, id.to_string()))
}

async fn ensure_outlet(conn: &impl ConnectionTrait, outlet: Option<i32>) -> Result<()> {
    if let Some(id) = outlet {
        if outlet::Entity::find_by_id(id).one(conn).await?.is_none() {
            return Err(Error::not_found(Entity::Outlet, id.to_string()));
        }
    }
    Ok(())
}

async fn ensure_code_free(
    conn: &impl ConnectionTrait,
    code: &str,
    except: Option<i32>,
) -> Result<()> {
    let mut q = machine::Entity::find().filter(machine::Column::MachineCode.eq(code));
    if let Some(id) = except {
        q = q.filter(machine::Column::Id.ne(id));
    }
    if q.one(conn).await?.is_some() {
        return Err(Error::conflict(
            "machine_code_taken",
            format!("a machine with code `{code}` already exists"),
        ));
    }
    Ok(())
}

pub async fn list(
    db: &Db,
    filter: MachineFilter,
    thresholds: Thresholds,
    page: PageRequest,
) -> Result<Page<MachineView>> {
    let mut query = machine::Entity::find().order_by_asc(machine::Column::Id);
    if let Some(o) = filter.outlet_id {
        query = query.filter(machine::Column::OutletId.eq(o));
    }
    if let Some(a) = filter.is_active {
        query = query.filter(machine::Column::IsActive.eq(a));
    }
    if let Some(d) = &filter.device_id {
        match devices::find_by_device_id(db.conn(), d).await {
            Ok(device) => query = query.filter(machine::Column::CurrentDeviceId.eq(device.id)),
            Err(Error::NotFound { .. }) => {
                return Ok(Page {
                    count: 0,
                    items: Vec::new(),
                    request: page,
                })
            }
            Err(e) => return Err(e),
        }
    }
    let page = queries::paginate(db.conn(), query, page).await?;
    let items = views(db.conn(), page.items, thresholds).await?;
    Ok(Page {
        count: page.count,
        items,
        request: page.request,
    })
}

pub async fn get(db: &Db, id: i32, thresholds: Thresholds) -> Result<MachineView> {
    let machine = find(db.conn(), id).await?;
    views(db.conn(), vec![machine], thresholds)
        .await?
        .pop()
        .ok_or_else(|| Error::not_found(Entity::Machine, id.to_string()))
}

async fn insert(
    conn: &impl ConnectionTrait,
    new: &NewMachine,
    now: DateTime<Utc>,
) -> Result<machine::Model> {
    let name = field("name", &new.name, 200)?;
    let code = match &new.machine_code {
        Some(c) => field("machine_code", c, 64)?,
        None => generated_code(),
    };
    ensure_outlet(conn, new.outlet).await?;
    ensure_code_free(conn, &code, None).await?;
    let mut created = machine::ActiveModel {
        machine_code: Set(code),
        name: Set(name),
        outlet_id: Set(None),
        current_device_id: Set(None),
        is_active: Set(new.is_active),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(conn)
    .await?;
    if new.outlet.is_some() {
        fleet::set_machine_outlet(conn, created.id, new.outlet, now).await?;
        created.outlet_id = new.outlet;
    }
    Ok(created)
}

pub async fn create(db: &Db, new: NewMachine) -> Result<machine::Model> {
    let txn = db.begin_write().await?;
    let created = insert(&*txn, &new, Utc::now()).await?;
    txn.commit().await?;
    Ok(created)
}

pub async fn update(db: &Db, id: i32, patch: MachinePatch) -> Result<machine::Model> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let current = find(&*txn, id).await?;
    if let Some(outlet) = patch.outlet {
        if outlet != current.outlet_id {
            ensure_outlet(&*txn, outlet).await?;
            fleet::set_machine_outlet(&*txn, id, outlet, now).await?;
        }
    }
    let mut active: machine::ActiveModel = find(&*txn, id).await?.into();
    if let Some(name) = patch.name {
        active.name = Set(field("name", &name, 200)?);
    }
    if let Some(code) = patch.machine_code {
        let code = field("machine_code", &code, 64)?;
        ensure_code_free(&*txn, &code, Some(id)).await?;
        active.machine_code = Set(code);
    }
    if let Some(a) = patch.is_active {
        active.is_active = Set(a);
    }
    active.updated_at = Set(now);
    let updated = active.update(&*txn).await?;
    txn.commit().await?;
    Ok(updated)
}

/// Deletes a machine. One with telemetry attributed to it is refused (409
/// `machine_has_telemetry`; deactivate it instead); one carrying a device is refused (409
/// `machine_has_device`) unless `force`, which releases the device first.
pub async fn delete(db: &Db, cache: &TokenCache, id: i32, force: bool) -> Result<()> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let machine = find(&*txn, id).await?;
    let events = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::MachineId.eq(id))
        .count(&*txn)
        .await?;
    if events > 0 {
        return Err(Error::conflict(
            "machine_has_telemetry",
            format!(
                "machine {id} has {events} telemetry events attributed to it; deactivate it (is_active = false) instead"
            ),
        ));
    }
    let released = machine.current_device_id;
    if let Some(device) = released {
        if !force {
            return Err(Error::conflict(
                "machine_has_device",
                format!(
                    "machine {id} carries a device; unassign it first or delete with force=true"
                ),
            ));
        }
        fleet::release_device(&*txn, device, now).await?;
    }
    machine::Entity::delete_by_id(id).exec(&*txn).await?;
    txn.commit().await?;
    if let Some(device) = released {
        cache.evict_device(device);
    }
    Ok(())
}

/// Binds `device` to `machine` inside `conn`'s transaction. A device bound to another machine,
/// or a machine carrying another device, is a conflict unless `move_device`.
async fn bind_checked(
    conn: &impl ConnectionTrait,
    machine: &machine::Model,
    device: &device::Model,
    move_device: bool,
    now: DateTime<Utc>,
) -> Result<Option<i32>> {
    if machine.current_device_id == Some(device.id) {
        return Ok(None);
    }
    if let Some(other) = machine::Entity::find()
        .filter(machine::Column::CurrentDeviceId.eq(device.id))
        .one(conn)
        .await?
    {
        if !move_device {
            return Err(Error::conflict(
                "device_assigned_elsewhere",
                format!(
                    "device `{}` is bound to machine {} ({}); unassign it first or send move=true",
                    device.device_id, other.id, other.machine_code
                ),
            ));
        }
    }
    if machine.current_device_id.is_some() && !move_device {
        return Err(Error::conflict(
            "machine_has_device",
            format!(
                "machine {} already carries another device; unassign it first or send move=true",
                machine.id
            ),
        ));
    }
    fleet::bind(conn, machine, device, now).await?;
    Ok(machine.current_device_id)
}

/// Binds a device to a machine; see [`bind_checked`] for the conflicts.
pub async fn assign(
    db: &Db,
    cache: &TokenCache,
    notifier: &Notifier,
    machine_id: i32,
    device_id: &str,
    move_device: bool,
    thresholds: Thresholds,
) -> Result<MachineView> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let machine = find(&*txn, machine_id).await?;
    let device = devices::find_by_device_id(&*txn, device_id).await?;
    let replaced = bind_checked(&*txn, &machine, &device, move_device, now).await?;
    txn.commit().await?;
    cache.evict_device(device.id);
    notifier.publish(Notification::DeviceChanged { device: device.id });
    if let Some(previous) = replaced {
        cache.evict_device(previous);
        notifier.publish(Notification::DeviceChanged { device: previous });
    }
    get(db, machine_id, thresholds).await
}

/// Takes the device off a machine (nothing to do when it carries none).
pub async fn unassign(
    db: &Db,
    cache: &TokenCache,
    notifier: &Notifier,
    machine_id: i32,
    thresholds: Thresholds,
) -> Result<MachineView> {
    if let Some(device) = fleet::unassign_machine(db, cache, machine_id).await? {
        notifier.publish(Notification::DeviceChanged { device });
    }
    get(db, machine_id, thresholds).await
}

/// Creates a machine bound to `device_id` (the seed's "register device as machine").
pub async fn register(
    db: &Db,
    cache: &TokenCache,
    device_id: &str,
    outlet_id: Option<i32>,
    name: &str,
    thresholds: Thresholds,
) -> Result<MachineView> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    let device = devices::find_by_device_id(&*txn, device_id).await?;
    let created = insert(
        &*txn,
        &NewMachine {
            outlet: outlet_id,
            name: name.to_owned(),
            is_active: true,
            machine_code: None,
        },
        now,
    )
    .await?;
    bind_checked(&*txn, &created, &device, false, now).await?;
    txn.commit().await?;
    cache.evict_device(device.id);
    get(db, created.id, thresholds).await
}

/// Devices that sent telemetry but are not bound to any machine.
pub async fn unregistered(
    db: &Db,
    thresholds: Thresholds,
    page: PageRequest,
) -> Result<Page<DeviceView>> {
    let with_events = telemetry_event::Entity::find()
        .select_only()
        .column(telemetry_event::Column::DeviceId)
        .distinct()
        .into_tuple::<i32>()
        .all(db.conn())
        .await?;
    let bound: Vec<i32> = machine::Entity::find()
        .filter(machine::Column::CurrentDeviceId.is_not_null())
        .all(db.conn())
        .await?
        .into_iter()
        .filter_map(|m| m.current_device_id)
        .collect();
    let ids: Vec<i32> = with_events
        .into_iter()
        .filter(|d| !bound.contains(d))
        .collect();
    let query = device::Entity::find()
        .filter(device::Column::Id.is_in(ids))
        .order_by_asc(device::Column::Id);
    let page = queries::paginate(db.conn(), query, page).await?;
    let items = device_views(db.conn(), page.items, thresholds, Utc::now()).await?;
    Ok(Page {
        count: page.count,
        items,
        request: page.request,
    })
}

/// A machine's binding history, newest first.
pub async fn history(db: &Db, machine_id: i32) -> Result<Vec<(machine_device::Model, String)>> {
    find(db.conn(), machine_id).await?;
    let rows = machine_device::Entity::find()
        .filter(machine_device::Column::MachineId.eq(machine_id))
        .order_by_desc(machine_device::Column::AssignedAt)
        .order_by_desc(machine_device::Column::Id)
        .all(db.conn())
        .await?;
    let ids: Vec<i32> = rows.iter().map(|r| r.device_id).collect();
    let names: std::collections::HashMap<i32, String> = if ids.is_empty() {
        Default::default()
    } else {
        device::Entity::find()
            .filter(device::Column::Id.is_in(ids))
            .all(db.conn())
            .await?
            .into_iter()
            .map(|d| (d.id, d.device_id))
            .collect()
    };
    Ok(rows
        .into_iter()
        .map(|r| {
            let name = names.get(&r.device_id).cloned().unwrap_or_default();
            (r, name)
        })
        .collect())
}
