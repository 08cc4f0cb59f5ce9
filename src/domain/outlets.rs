//! Outlets (shops) as staff manage them: listing, create, update and a delete that never
//! loses telemetry attribution.

use chrono::Utc;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder,
};

use crate::{
    db::{
        entities::{machine, outlet, telemetry_event},
        Db,
    },
    domain::{
        fleet,
        queries::{paginate, Page, PageRequest},
    },
    error::{Entity, Error, Result},
};

/// Every field of an outlet (create and full update).
#[derive(Debug, Clone, Default)]
pub struct OutletFields {
    pub name: String,
    pub region: String,
    pub address: String,
    pub contact_person: String,
    pub is_active: bool,
    pub total_sva: Option<i32>,
    pub average_intage_services: Option<f64>,
    pub number_of_machines: Option<i32>,
}

/// A partial update: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct OutletPatch {
    pub name: Option<String>,
    pub region: Option<String>,
    pub address: Option<String>,
    pub contact_person: Option<String>,
    pub is_active: Option<bool>,
    pub total_sva: Option<Option<i32>>,
    pub average_intage_services: Option<Option<f64>>,
    pub number_of_machines: Option<Option<i32>>,
}

impl From<OutletFields> for OutletPatch {
    fn from(f: OutletFields) -> Self {
        OutletPatch {
            name: Some(f.name),
            region: Some(f.region),
            address: Some(f.address),
            contact_person: Some(f.contact_person),
            is_active: Some(f.is_active),
            total_sva: Some(f.total_sva),
            average_intage_services: Some(f.average_intage_services),
            number_of_machines: Some(f.number_of_machines),
        }
    }
}

fn clean_name(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 200 {
        return Err(Error::invalid(
            "invalid_field",
            "name must be 1-200 characters",
        ));
    }
    Ok(n.to_owned())
}

fn text(field: &str, value: &str, max: usize) -> Result<String> {
    if value.chars().count() > max {
        return Err(Error::invalid(
            "invalid_field",
            format!("{field} must be at most {max} characters"),
        ));
    }
    Ok(value.trim().to_owned())
}

fn check_metrics(
    total_sva: Option<i32>,
    average: Option<f64>,
    machines: Option<i32>,
) -> Result<()> {
    if total_sva.is_some_and(|v| v < 0) || machines.is_some_and(|v| v < 0) {
        return Err(Error::invalid(
            "invalid_field",
            "total_sva and number_of_machines must not be negative",
        ));
    }
    if average.is_some_and(|v| !v.is_finite() || v < 0.0) {
        return Err(Error::invalid(
            "invalid_field",
            "average_intage_services must be a finite number >= 0",
        ));
    }
    Ok(())
}

async fn ensure_name_free(
    conn: &impl sea_orm::ConnectionTrait,
    name: &str,
    except: Option<i32>,
) -> Result<()> {
    let mut q = outlet::Entity::find().filter(outlet::Column::Name.eq(name));
    if let Some(id) = except {
        q = q.filter(outlet::Column::Id.ne(id));
    }
    if q.one(conn).await?.is_some() {
        return Err(Error::conflict(
            "outlet_name_taken",
            format!("an outlet named `{name}` already exists"),
        ));
    }
    Ok(())
}

pub async fn list(
    db: &Db,
    is_active: Option<bool>,
    page: PageRequest,
) -> Result<Page<outlet::Model>> {
    let mut query = outlet::Entity::find().order_by_asc(outlet::Column::Id);
    if let Some(active) = is_active {
        query = query.filter(outlet::Column::IsActive.eq(active));
    }
    paginate(db.conn(), query, page).await
}

pub async fn get(db: &Db, id: i32) -> Result<outlet::Model> {
    outlet::Entity::find_by_id(id)
        .one(db.conn())
        .await?
        .ok_or_else(|| Error::not_found(Entity::Outlet, id.to_string()))
}

pub async fn create(db: &Db, fields: OutletFields) -> Result<outlet::Model> {
    let name = clean_name(&fields.name)?;
    check_metrics(
        fields.total_sva,
        fields.average_intage_services,
        fields.number_of_machines,
    )?;
    let now = Utc::now();
    let txn = db.begin_write().await?;
    ensure_name_free(&*txn, &name, None).await?;
    let created = outlet::ActiveModel {
        name: Set(name),
        region: Set(text("region", &fields.region, 100)?),
        address: Set(text("address", &fields.address, 500)?),
        contact_person: Set(text("contact_person", &fields.contact_person, 200)?),
        is_active: Set(fields.is_active),
        total_sva: Set(fields.total_sva),
        average_intage_services: Set(fields.average_intage_services),
        number_of_machines: Set(fields.number_of_machines),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&*txn)
    .await?;
    txn.commit().await?;
    Ok(created)
}

pub async fn update(db: &Db, id: i32, patch: OutletPatch) -> Result<outlet::Model> {
    let txn = db.begin_write().await?;
    let current = outlet::Entity::find_by_id(id)
        .one(&*txn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Outlet, id.to_string()))?;
    check_metrics(
        patch.total_sva.unwrap_or(current.total_sva),
        patch
            .average_intage_services
            .unwrap_or(current.average_intage_services),
        patch
            .number_of_machines
            .unwrap_or(current.number_of_machines),
    )?;
    let mut active: outlet::ActiveModel = current.into();
    if let Some(name) = patch.name {
        let name = clean_name(&name)?;
        ensure_name_free(&*txn, &name, Some(id)).await?;
        active.name = Set(name);
    }
    if let Some(v) = patch.region {
        active.region = Set(text("region", &v, 100)?);
    }
    if let Some(v) = patch.address {
        active.address = Set(text("address", &v, 500)?);
    }
    if let Some(v) = patch.contact_person {
        active.contact_person = Set(text("contact_person", &v, 200)?);
    }
    if let Some(v) = patch.is_active {
        active.is_active = Set(v);
    }
    if let Some(v) = patch.total_sva {
        active.total_sva = Set(v);
    }
    if let Some(v) = patch.average_intage_services {
        active.average_intage_services = Set(v);
    }
    if let Some(v) = patch.number_of_machines {
        active.number_of_machines = Set(v);
    }
    active.updated_at = Set(Utc::now());
    let updated = active.update(&*txn).await?;
    txn.commit().await?;
    Ok(updated)
}

/// Deletes an outlet. One that has machines is refused (409 `outlet_has_machines`) unless
/// `force`, which moves its machines out first. One with telemetry attributed to it is always
/// refused (409 `outlet_has_telemetry`): deleting it would lose that attribution; deactivate
/// it instead.
pub async fn delete(db: &Db, id: i32, force: bool) -> Result<()> {
    let now = Utc::now();
    let txn = db.begin_write().await?;
    outlet::Entity::find_by_id(id)
        .one(&*txn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Outlet, id.to_string()))?;
    let events = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::OutletId.eq(id))
        .count(&*txn)
        .await?;
    if events > 0 {
        return Err(Error::conflict(
            "outlet_has_telemetry",
            format!(
                "outlet {id} has {events} telemetry events attributed to it; deactivate it (is_active = false) instead"
            ),
        ));
    }
    let machines = machine::Entity::find()
        .filter(machine::Column::OutletId.eq(id))
        .all(&*txn)
        .await?;
    if !machines.is_empty() && !force {
        return Err(Error::conflict(
            "outlet_has_machines",
            format!(
                "outlet {id} has {} machines; move them first or delete with force=true",
                machines.len()
            ),
        ));
    }
    for m in &machines {
        fleet::set_machine_outlet(&*txn, m.id, None, now).await?;
    }
    outlet::Entity::delete_by_id(id).exec(&*txn).await?;
    txn.commit().await?;
    Ok(())
}
