//! Outlets, machines and which device each machine carries. Binding history is kept so that
//! moving a device never moves its past events.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    sea_query::{Expr, OnConflict},
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Statement,
    Value,
};

use crate::{
    db::{
        entities::{device, machine, machine_device, machine_outlet, outlet},
        padded_ids, placeholder, Db,
    },
    domain::devices::{self, Mac, TokenCache},
    error::{Entity, Error, Result},
};

/// The outcome of binding a device to a machine.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub device: device::Model,
    pub machine: machine::Model,
    pub outlet: Option<outlet::Model>,
    pub created_machine: bool,
    pub created_outlet: bool,
    pub created_device: bool,
}

fn required(field: &'static str, value: &str, max: usize) -> Result<String> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max {
        return Err(Error::invalid(
            "invalid_field",
            format!("{field} must be 1-{max} characters"),
        ));
    }
    Ok(v.to_owned())
}

/// Binds `device_id` to the machine `machine_code`, creating the machine and the outlet
/// when they do not exist yet. A device not seen yet is pre-registered when its id is a MAC.
pub async fn assign_by_code(
    db: &Db,
    cache: &TokenCache,
    device_id: &str,
    machine_code: &str,
    outlet_name: Option<&str>,
) -> Result<Assignment> {
    let machine_code = required("machine code", machine_code, 64)?;
    let outlet_name = outlet_name
        .map(|o| required("outlet name", o, 200))
        .transpose()?;
    let txn = db.begin_write().await?;
    // Binding times are taken inside the write transaction, so that no event committed
    // between them and the commit is attributed to the wrong side.
    let now = Utc::now();

    let (device, created_device) = match devices::find_by_device_id(&*txn, device_id).await {
        Ok(d) => (d, false),
        Err(Error::NotFound { .. }) => match Mac::parse(device_id) {
            Ok(mac) => {
                let known = device::Entity::find()
                    .filter(device::Column::Mac.eq(mac.as_str()))
                    .one(&*txn)
                    .await?;
                match known {
                    Some(d) => (d, false),
                    None => (devices::register(&*txn, &mac, now).await?, true),
                }
            }
            Err(_) => return Err(Error::not_found(Entity::Device, device_id)),
        },
        Err(e) => return Err(e),
    };

    let (outlet, created_outlet) = match &outlet_name {
        None => (None, false),
        Some(name) => {
            let (outlet, created) = outlet_named(&*txn, name, now).await?;
            (Some(outlet), created)
        }
    };
    let (mut machine, created_machine) =
        machine_coded(&*txn, &machine_code, outlet.as_ref().map(|o| o.id), now).await?;
    if let Some(o) = &outlet {
        if machine.outlet_id != Some(o.id) {
            set_machine_outlet(&*txn, machine.id, Some(o.id), now).await?;
            machine.outlet_id = Some(o.id);
        }
    }

    bind(&*txn, &machine, &device, now).await?;
    txn.commit().await?;
    cache.evict_device(device.id);

    let machine = machine::Entity::find_by_id(machine.id)
        .one(db.conn())
        .await?
        .ok_or_else(|| Error::not_found(Entity::Machine, machine_code.clone()))?;
    let device = device::Entity::find_by_id(device.id)
        .one(db.conn())
        .await?
        .ok_or_else(|| Error::not_found(Entity::Device, device_id))?;
    let outlet = match machine.outlet_id {
        Some(id) => outlet::Entity::find_by_id(id).one(db.conn()).await?,
        None => None,
    };
    Ok(Assignment {
        device,
        machine,
        outlet,
        created_machine,
        created_outlet,
        created_device,
    })
}

/// The outlet called `name`, created when missing; says whether it was created. An insert
/// that does nothing on a name taken meanwhile, so two creators of one name get one outlet.
pub async fn outlet_named(
    conn: &impl ConnectionTrait,
    name: &str,
    now: DateTime<Utc>,
) -> Result<(outlet::Model, bool)> {
    let inserted = outlet::Entity::insert(outlet::ActiveModel {
        name: Set(name.to_owned()),
        region: Set(String::new()),
        address: Set(String::new()),
        contact_person: Set(String::new()),
        is_active: Set(true),
        total_sva: Set(None),
        average_intage_services: Set(None),
        number_of_machines: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    })
    .on_conflict(
        OnConflict::column(outlet::Column::Name)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(conn)
    .await?;
    let outlet = outlet::Entity::find()
        .filter(outlet::Column::Name.eq(name))
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Outlet, name))?;
    Ok((outlet, inserted == 1))
}

/// The machine with code `code`, created (in `outlet`) when missing; says whether it was
/// created. Safe against a concurrent creation of the same code.
pub async fn machine_coded(
    conn: &impl ConnectionTrait,
    code: &str,
    outlet: Option<i32>,
    now: DateTime<Utc>,
) -> Result<(machine::Model, bool)> {
    let inserted = machine::Entity::insert(machine::ActiveModel {
        machine_code: Set(code.to_owned()),
        name: Set(code.to_owned()),
        outlet_id: Set(None),
        current_device_id: Set(None),
        is_active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    })
    .on_conflict(
        OnConflict::column(machine::Column::MachineCode)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(conn)
    .await?
        == 1;
    let mut machine = machine::Entity::find()
        .filter(machine::Column::MachineCode.eq(code))
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Machine, code))?;
    if inserted && outlet.is_some() {
        set_machine_outlet(conn, machine.id, outlet, now).await?;
        machine.outlet_id = outlet;
    }
    Ok((machine, inserted))
}

/// Locks a machine's row until the transaction ends (PostgreSQL; SQLite's single writer
/// already serialises), so concurrent assignments of one machine run one after the other.
async fn lock_machine(conn: &impl ConnectionTrait, id: i32) -> Result<machine::Model> {
    let mut query = machine::Entity::find_by_id(id);
    if conn.get_database_backend() == sea_orm::DbBackend::Postgres {
        query = query.lock_exclusive();
    }
    query
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Machine, id.to_string()))
}

/// Makes `device` the machine's current device: any other binding of either side is closed
/// first, keeping one device per machine and one machine per device.
pub async fn bind(
    conn: &impl ConnectionTrait,
    machine: &machine::Model,
    device: &device::Model,
    now: DateTime<Utc>,
) -> Result<()> {
    // Re-read under the lock: another assignment may have committed since `machine` was read.
    let machine = &lock_machine(conn, machine.id).await?;
    if machine.current_device_id == Some(device.id) {
        return Ok(());
    }
    if let Some(previous) = machine.current_device_id {
        release_device(conn, previous, now).await?;
    }
    release_device(conn, device.id, now).await?;
    machine::Entity::update_many()
        .col_expr(machine::Column::CurrentDeviceId, Expr::value(device.id))
        .col_expr(machine::Column::UpdatedAt, Expr::value(now))
        .filter(machine::Column::Id.eq(machine.id))
        .exec(conn)
        .await?;
    machine_device::ActiveModel {
        machine_id: Set(machine.id),
        device_id: Set(device.id),
        assigned_at: Set(now),
        unassigned_at: Set(None),
        ..Default::default()
    }
    .insert(conn)
    .await?;
    device::Entity::update_many()
        .col_expr(device::Column::Assigned, Expr::value(true))
        .filter(device::Column::Id.eq(device.id))
        .exec(conn)
        .await?;
    Ok(())
}

/// Detaches a device from whatever machine carries it and closes the open binding.
pub async fn release_device(
    conn: &impl ConnectionTrait,
    device: i32,
    now: DateTime<Utc>,
) -> Result<()> {
    machine::Entity::update_many()
        .col_expr(
            machine::Column::CurrentDeviceId,
            Expr::value(Option::<i32>::None),
        )
        .col_expr(machine::Column::UpdatedAt, Expr::value(now))
        .filter(machine::Column::CurrentDeviceId.eq(device))
        .exec(conn)
        .await?;
    machine_device::Entity::update_many()
        .col_expr(machine_device::Column::UnassignedAt, Expr::value(now))
        .filter(machine_device::Column::DeviceId.eq(device))
        .filter(machine_device::Column::UnassignedAt.is_null())
        .exec(conn)
        .await?;
    device::Entity::update_many()
        .col_expr(device::Column::Assigned, Expr::value(false))
        .filter(device::Column::Id.eq(device))
        .exec(conn)
        .await?;
    Ok(())
}

/// Unbinds a device (named by id or MAC) from whatever machine carries it.
pub async fn unassign_device(
    db: &Db,
    cache: &TokenCache,
    device_id: &str,
) -> Result<device::Model> {
    let txn = db.begin_write().await?;
    let device = devices::find_by_device_id(&*txn, device_id).await?;
    // Taken inside the transaction: no event committed before it lands on the wrong side.
    release_device(&*txn, device.id, Utc::now()).await?;
    txn.commit().await?;
    cache.evict_device(device.id);
    Ok(device)
}

/// Removes the device from a machine; returns the device it carried.
pub async fn unassign_machine(db: &Db, cache: &TokenCache, machine_id: i32) -> Result<Option<i32>> {
    let txn = db.begin_write().await?;
    let now = Utc::now();
    let machine = machine::Entity::find_by_id(machine_id)
        .one(&*txn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Machine, machine_id.to_string()))?;
    if let Some(device) = machine.current_device_id {
        release_device(&*txn, device, now).await?;
        txn.commit().await?;
        cache.evict_device(device);
        return Ok(Some(device));
    }
    txn.commit().await?;
    Ok(None)
}

/// Which machine each device was bound to over a period, and which outlet each of those
/// machines stood in.
#[derive(Default)]
pub struct Attribution {
    bindings: HashMap<i32, Vec<Binding>>,
}

#[derive(Clone)]
struct Binding {
    machine: i32,
    assigned_at: DateTime<Utc>,
    unassigned_at: Option<DateTime<Utc>>,
    /// The machine's outlet periods overlapping the binding.
    outlets: Vec<Period>,
}

#[derive(Clone)]
struct Period {
    outlet: Option<i32>,
    assigned_at: DateTime<Utc>,
    unassigned_at: Option<DateTime<Utc>>,
}

fn covers(from: DateTime<Utc>, until: Option<DateTime<Utc>>, at: DateTime<Utc>) -> bool {
    from <= at && until.is_none_or(|u| u > at)
}

impl Attribution {
    /// Loads, in one query, the bindings of `devices` that were open at or after `since`,
    /// with the outlet history of their machines over the same time.
    pub async fn load(
        conn: &impl ConnectionTrait,
        devices: &[i32],
        since: DateTime<Utc>,
    ) -> Result<Attribution> {
        Ok(Self::load_at_revision(conn, devices, since).await?.0)
    }

    /// [`Attribution::load`], with the binding revision it was read at (PostgreSQL; see
    /// [`AttributionCache`]), in the same statement.
    pub async fn load_at_revision(
        conn: &impl ConnectionTrait,
        devices: &[i32],
        since: DateTime<Utc>,
    ) -> Result<(Attribution, Option<i64>)> {
        let backend = conn.get_database_backend();
        let ids = padded_ids(devices);
        // SQLite binds `?` in order of appearance: the values follow the text.
        let joined_since = placeholder(backend, 1);
        let list: Vec<String> = (2..ids.len() + 2)
            .map(|n| placeholder(backend, n))
            .collect();
        let bound_since = placeholder(backend, ids.len() + 2);
        let sql = format!(
            "SELECT md.id, md.device_id, md.machine_id, md.assigned_at, md.unassigned_at, \
             mo.outlet_id, mo.assigned_at AS outlet_from, mo.unassigned_at AS outlet_until \
             FROM machine_devices md LEFT JOIN machine_outlets mo ON mo.machine_id = md.machine_id \
             AND (mo.unassigned_at IS NULL OR mo.unassigned_at > {joined_since}) \
             WHERE md.device_id IN ({}) AND (md.unassigned_at IS NULL OR md.unassigned_at > {bound_since})",
            list.join(", "),
        );
        // One row at least, which carries the revision when no binding matches.
        let sql = match backend {
            DbBackend::Postgres => format!(
                "SELECT r.revision, a.* FROM (SELECT 1) AS one \
                 LEFT JOIN binding_revision r ON r.id = 1 LEFT JOIN ({sql}) a ON TRUE"
            ),
            _ => sql,
        };
        let mut values: Vec<Value> = vec![since.into()];
        values.extend(ids.into_iter().map(Value::from));
        values.push(since.into());
        let rows = conn
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        let mut by_id: HashMap<i32, (i32, Binding)> = HashMap::new();
        let mut revision = None;
        for row in rows {
            if backend == DbBackend::Postgres {
                revision = row.try_get("", "revision")?;
            }
            let Some(id): Option<i32> = row.try_get("", "id")? else {
                continue;
            };
            let binding = match by_id.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert((
                    row.try_get("", "device_id")?,
                    Binding {
                        machine: row.try_get("", "machine_id")?,
                        assigned_at: row.try_get("", "assigned_at")?,
                        unassigned_at: row.try_get("", "unassigned_at")?,
                        outlets: Vec::new(),
                    },
                )),
            };
            let from: Option<DateTime<Utc>> = row.try_get("", "outlet_from")?;
            if let Some(from) = from {
                binding.1.outlets.push(Period {
                    outlet: row.try_get("", "outlet_id")?,
                    assigned_at: from,
                    unassigned_at: row.try_get("", "outlet_until")?,
                });
            }
        }
        let mut bindings: HashMap<i32, Vec<Binding>> = HashMap::new();
        for (_, (device, binding)) in by_id {
            bindings.entry(device).or_default().push(binding);
        }
        Ok((Attribution { bindings }, revision))
    }

    /// The machine a device was bound to at `at`, and the outlet that machine stood in then.
    pub fn at(&self, device: i32, at: DateTime<Utc>) -> (Option<i32>, Option<i32>) {
        let Some(binding) = self.bindings.get(&device).and_then(|rows| {
            rows.iter()
                .filter(|b| covers(b.assigned_at, b.unassigned_at, at))
                .max_by_key(|b| b.assigned_at)
        }) else {
            return (None, None);
        };
        let outlet = binding
            .outlets
            .iter()
            .filter(|p| covers(p.assigned_at, p.unassigned_at, at))
            .max_by_key(|p| p.assigned_at)
            .and_then(|p| p.outlet);
        (Some(binding.machine), outlet)
    }
}

/// Devices remembered by an [`AttributionCache`]; beyond it the cache starts over.
const CACHE_MAX_DEVICES: usize = 100_000;

/// Attribution kept between event batches (PostgreSQL), so that a batch of known devices
/// needs no query for it. It is valid at one binding revision: a counter that every
/// transaction changing `machine_devices` or `machine_outlets` raises as it commits (migration
/// `binding_revision`), whatever process or replica makes it. The statement that stores a
/// batch reads the revision in its own snapshot; when it is not the one the cache was read at,
/// the batch's events are attributed again from a fresh read, and the cache starts over.
#[derive(Default)]
pub struct AttributionCache {
    revision: Option<i64>,
    /// Per device: the bindings open at or after the time they were read from.
    devices: HashMap<i32, (DateTime<Utc>, Vec<Binding>)>,
}

impl AttributionCache {
    /// The attribution of `devices` from `since` on, and the revision it holds at, if every
    /// one of them is known from then.
    pub fn get(&self, devices: &[i32], since: DateTime<Utc>) -> Option<(Attribution, i64)> {
        let revision = self.revision?;
        let mut bindings = HashMap::with_capacity(devices.len());
        for device in devices {
            let (from, rows) = self.devices.get(device)?;
            if *from > since {
                return None;
            }
            if !rows.is_empty() {
                bindings.insert(*device, rows.clone());
            }
        }
        Some((Attribution { bindings }, revision))
    }

    /// Remembers `attribution`, read for `devices` from `since` on at `revision`.
    pub fn put(
        &mut self,
        attribution: &Attribution,
        devices: &[i32],
        since: DateTime<Utc>,
        revision: i64,
    ) {
        if self.revision != Some(revision) || self.devices.len() + devices.len() > CACHE_MAX_DEVICES
        {
            self.devices.clear();
            self.revision = Some(revision);
        }
        for device in devices {
            let rows = attribution
                .bindings
                .get(device)
                .cloned()
                .unwrap_or_default();
            self.devices.insert(*device, (since, rows));
        }
    }

    pub fn clear(&mut self) {
        self.revision = None;
        self.devices.clear();
    }
}

/// Puts a machine in `outlet` (or in none). Every change of a machine's outlet goes through
/// here, so that the outlet history that attribution reads stays complete.
pub async fn set_machine_outlet(
    conn: &impl ConnectionTrait,
    machine_id: i32,
    outlet: Option<i32>,
    now: DateTime<Utc>,
) -> Result<()> {
    let open = machine_outlet::Entity::find()
        .filter(machine_outlet::Column::MachineId.eq(machine_id))
        .filter(machine_outlet::Column::UnassignedAt.is_null())
        .one(conn)
        .await?;
    if open.as_ref().map(|o| o.outlet_id) != Some(outlet) {
        machine_outlet::Entity::update_many()
            .col_expr(machine_outlet::Column::UnassignedAt, Expr::value(now))
            .filter(machine_outlet::Column::MachineId.eq(machine_id))
            .filter(machine_outlet::Column::UnassignedAt.is_null())
            .exec(conn)
            .await?;
        if outlet.is_some() || open.is_some() {
            machine_outlet::ActiveModel {
                machine_id: Set(machine_id),
                outlet_id: Set(outlet),
                assigned_at: Set(now),
                unassigned_at: Set(None),
                ..Default::default()
            }
            .insert(conn)
            .await?;
        }
    }
    machine::Entity::update_many()
        .col_expr(machine::Column::OutletId, Expr::value(outlet))
        .col_expr(machine::Column::UpdatedAt, Expr::value(now))
        .filter(machine::Column::Id.eq(machine_id))
        .exec(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(hour: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-12-01T{hour:02}:00:00Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Device 1 on machine 10 from 08:00, in outlet 100; device 2 on no machine.
    fn read() -> Attribution {
        let binding = Binding {
            machine: 10,
            assigned_at: t(8),
            unassigned_at: None,
            outlets: vec![Period {
                outlet: Some(100),
                assigned_at: t(0),
                unassigned_at: None,
            }],
        };
        Attribution {
            bindings: HashMap::from([(1, vec![binding])]),
        }
    }

    #[test]
    fn the_cache_answers_only_for_devices_and_times_it_has_read() {
        let mut cache = AttributionCache::default();
        assert!(cache.get(&[1], t(9)).is_none(), "empty");
        cache.put(&read(), &[1, 2], t(6), 7);
        let (attribution, revision) = cache.get(&[1, 2], t(9)).expect("both read from 06:00");
        assert_eq!(revision, 7);
        assert_eq!(attribution.at(1, t(9)), (Some(10), Some(100)));
        assert_eq!(
            attribution.at(2, t(9)),
            (None, None),
            "read, and on no machine"
        );
        assert!(cache.get(&[1], t(5)).is_none(), "before what was read");
        assert!(cache.get(&[1, 3], t(9)).is_none(), "a device not read");
    }

    #[test]
    fn a_new_revision_forgets_what_was_read_before_it() {
        let mut cache = AttributionCache::default();
        cache.put(&read(), &[1], t(6), 7);
        cache.put(&Attribution::default(), &[2], t(6), 8);
        assert!(cache.get(&[1], t(9)).is_none(), "read at revision 7");
        assert_eq!(cache.get(&[2], t(9)).map(|(_, r)| r), Some(8));
        cache.clear();
        assert!(cache.get(&[2], t(9)).is_none());
    }
}
