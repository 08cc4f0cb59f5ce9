//! Device records as staff edit them: notes and deletion.

use sea_orm::{sea_query::Expr, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use crate::{
    db::{
        entities::{device, telemetry_event},
        Db,
    },
    domain::{
        devices::{self, TokenCache},
        fleet,
        notify::{Notification, Notifier},
    },
    error::{Error, Result},
};

pub const NOTES_MAX: usize = 2000;

pub async fn set_notes(db: &Db, notifier: &Notifier, device_id: &str, notes: &str) -> Result<()> {
    if notes.chars().count() > NOTES_MAX {
        return Err(Error::invalid(
            "invalid_field",
            format!("notes must be at most {NOTES_MAX} characters"),
        ));
    }
    let txn = db.begin_write().await?;
    let found = devices::find_by_device_id(&*txn, device_id).await?;
    device::Entity::update_many()
        .col_expr(device::Column::Notes, Expr::value(notes))
        .filter(device::Column::Id.eq(found.id))
        .exec(&*txn)
        .await?;
    txn.commit().await?;
    notifier.publish(Notification::DeviceChanged { device: found.id });
    Ok(())
}

/// Deletes a device that has no telemetry (409 `device_has_telemetry` otherwise: events are
/// never deleted except by the admin flush). Its binding, status and commands go with it.
pub async fn delete(db: &Db, cache: &TokenCache, device_id: &str) -> Result<()> {
    let txn = db.begin_write().await?;
    let found = devices::find_by_device_id(&*txn, device_id).await?;
    let events = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::DeviceId.eq(found.id))
        .count(&*txn)
        .await?;
    if events > 0 {
        return Err(Error::conflict(
            "device_has_telemetry",
            format!(
                "device `{}` has {events} telemetry events; they are kept, so the device is too",
                found.device_id
            ),
        ));
    }
    fleet::release_device(&*txn, found.id, chrono::Utc::now()).await?;
    device::Entity::delete_by_id(found.id).exec(&*txn).await?;
    txn.commit().await?;
    cache.evict_device(found.id);
    Ok(())
}
