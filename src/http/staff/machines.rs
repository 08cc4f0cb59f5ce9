//! `/api/machines/…`: machines CRUD, registration of a device as a machine, unregistered
//! devices, assignment and the binding history.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::{web::Data, Request};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::MaybeUndefined,
    ApiResponse, Object, OpenApi,
};

use super::{
    common::{optional_text, page_request, text, ApiResult, Deleted, Page},
    devices::{Counts, DeviceDto, DeviceState},
    StaffAuth, Tag,
};
use crate::{
    domain::{
        machines::{self, MachineFilter, MachinePatch, MachineView, NewMachine},
        queries,
    },
    state::AppState,
};

#[derive(Debug, Object)]
pub struct MachineDto {
    pub id: i32,
    pub machine_code: String,
    pub name: String,
    /// The outlet's id (the seed's field name).
    #[oai(nullable)]
    pub outlet: Option<i32>,
    #[oai(nullable)]
    pub outlet_name: Option<String>,
    pub is_active: bool,
    /// The current device's id.
    #[oai(nullable)]
    pub device_id: Option<String>,
    /// The current device's status; `offline` without a device.
    pub status: DeviceState,
    /// The current device's own counters (zero without a device).
    pub current_counts: Counts,
    #[oai(nullable)]
    pub device: Option<DeviceDto>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<MachineView> for MachineDto {
    fn from(v: MachineView) -> Self {
        let device: Option<DeviceDto> = v.device.map(Into::into);
        MachineDto {
            id: v.machine.id,
            machine_code: v.machine.machine_code,
            name: v.machine.name,
            outlet: v.machine.outlet_id,
            outlet_name: v.outlet.map(|o| o.name),
            is_active: v.machine.is_active,
            device_id: device.as_ref().map(|d| d.device_id.clone()),
            status: device
                .as_ref()
                .map(|d| d.status)
                .unwrap_or(DeviceState::Offline),
            current_counts: device.as_ref().map(|d| d.counts.clone()).unwrap_or(Counts {
                basic: 0,
                standard: 0,
                premium: 0,
            }),
            device,
            created_at: v.machine.created_at,
            updated_at: v.machine.updated_at,
        }
    }
}

/// A new machine (also the full update with PUT).
#[derive(Debug, Object)]
pub struct MachineBody {
    /// The outlet's id, or null.
    #[oai(nullable)]
    pub outlet: Option<i32>,
    #[oai(deserialize_with = "text")]
    pub name: String,
    #[oai(default = "yes")]
    #[oai(nullable)]
    pub is_active: bool,
    /// e.g. `CH1/027/2024`; generated when absent.
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub machine_code: Option<String>,
}

fn yes() -> bool {
    true
}

/// A partial update: only the fields given change; `outlet: null` takes the machine out of
/// its outlet.
#[derive(Debug, Object)]
pub struct MachinePatchBody {
    #[oai(nullable)]
    pub outlet: MaybeUndefined<i32>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub name: Option<String>,
    #[oai(nullable)]
    pub is_active: Option<bool>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub machine_code: Option<String>,
}

#[derive(Debug, Object)]
pub struct RegisterMachineBody {
    #[oai(deserialize_with = "text")]
    pub device_id: String,
    #[oai(nullable)]
    pub outlet_id: Option<i32>,
    #[oai(deserialize_with = "text")]
    pub name: String,
}

#[derive(Debug, Object)]
pub struct AssignBody {
    #[oai(deserialize_with = "text")]
    pub device_id: String,
    /// Take the device from the machine it is bound to (and replace this machine's device)
    /// instead of answering 409.
    #[oai(rename = "move", default)]
    #[oai(nullable)]
    pub move_device: bool,
}

/// One period during which a device was bound to the machine.
#[derive(Debug, Object)]
pub struct BindingDto {
    pub device_id: String,
    pub assigned_at: DateTime<Utc>,
    /// Null while the binding is open.
    #[oai(nullable)]
    pub unassigned_at: Option<DateTime<Utc>>,
}

#[derive(ApiResponse)]
pub enum MachineCreated {
    /// The machine was created.
    #[oai(status = 201)]
    Created(Json<MachineDto>),
}

pub struct MachinesApi;

#[OpenApi(tag = "Tag::Machines")]
impl MachinesApi {
    /// List machines
    #[oai(path = "/api/machines", method = "get", operation_id = "machines_list")]
    async fn list(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Only machines in this outlet.
        outlet_id: Query<Option<i32>>,
        /// Only active (true) or inactive (false) machines.
        is_active: Query<Option<bool>>,
        /// Only the machine carrying this device.
        device_id: Query<Option<String>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<MachineDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let filter = MachineFilter {
            outlet_id: outlet_id.0,
            is_active: is_active.0,
            device_id: device_id.0,
        };
        let page = machines::list(&state.db, filter, state.settings.thresholds(), window).await?;
        Ok(Json(Page::from_domain(req, page, MachineDto::from)))
    }

    /// Create a machine
    #[oai(
        path = "/api/machines",
        method = "post",
        operation_id = "machines_create"
    )]
    async fn create(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        body: Json<MachineBody>,
    ) -> ApiResult<MachineCreated> {
        auth.staff()?;
        let body = body.0;
        let created = machines::create(
            &state.db,
            NewMachine {
                outlet: body.outlet,
                name: body.name,
                is_active: body.is_active,
                machine_code: body.machine_code,
            },
        )
        .await?;
        let view = machines::get(&state.db, created.id, state.settings.thresholds()).await?;
        Ok(MachineCreated::Created(Json(view.into())))
    }

    /// Register a device as a new machine
    ///
    /// Creates a machine (in the outlet, if given) bound to the device. A device bound to
    /// another machine is a 409 `device_assigned_elsewhere`.
    #[oai(
        path = "/api/machines/register",
        method = "post",
        operation_id = "machines_register"
    )]
    async fn register(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        body: Json<RegisterMachineBody>,
    ) -> ApiResult<MachineCreated> {
        auth.staff()?;
        let view = machines::register(
            &state.db,
            &state.tokens,
            &body.device_id,
            body.outlet_id,
            &body.name,
            state.settings.thresholds(),
        )
        .await?;
        Ok(MachineCreated::Created(Json(view.into())))
    }

    /// Devices with telemetry but no machine
    #[oai(
        path = "/api/machines/unregistered",
        method = "get",
        operation_id = "machines_unregistered"
    )]
    async fn unregistered(
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
        let window = page_request(limit.0, offset.0)?;
        let page = machines::unregistered(&state.db, state.settings.thresholds(), window).await?;
        Ok(Json(Page::from_domain(req, page, DeviceDto::from)))
    }

    /// One machine
    #[oai(
        path = "/api/machines/:id",
        method = "get",
        operation_id = "machines_get"
    )]
    async fn get(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
    ) -> ApiResult<Json<MachineDto>> {
        let view = machines::get(&state.db, id.0, state.settings.thresholds()).await?;
        Ok(Json(view.into()))
    }

    /// Replace a machine
    #[oai(
        path = "/api/machines/:id",
        method = "put",
        operation_id = "machines_update"
    )]
    async fn update(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        body: Json<MachineBody>,
    ) -> ApiResult<Json<MachineDto>> {
        auth.staff()?;
        let body = body.0;
        let patch = MachinePatch {
            name: Some(body.name),
            machine_code: body.machine_code,
            outlet: Some(body.outlet),
            is_active: Some(body.is_active),
        };
        machines::update(&state.db, id.0, patch).await?;
        let view = machines::get(&state.db, id.0, state.settings.thresholds()).await?;
        Ok(Json(view.into()))
    }

    /// Change some fields of a machine
    #[oai(
        path = "/api/machines/:id",
        method = "patch",
        operation_id = "machines_patch"
    )]
    async fn patch(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        body: Json<MachinePatchBody>,
    ) -> ApiResult<Json<MachineDto>> {
        auth.staff()?;
        let body = body.0;
        let patch = MachinePatch {
            name: body.name,
            machine_code: body.machine_code,
            outlet: match body.outlet {
                MaybeUndefined::Undefined => None,
                MaybeUndefined::Null => Some(None),
                MaybeUndefined::Value(v) => Some(Some(v)),
            },
            is_active: body.is_active,
        };
        machines::update(&state.db, id.0, patch).await?;
        let view = machines::get(&state.db, id.0, state.settings.thresholds()).await?;
        Ok(Json(view.into()))
    }

    /// Delete a machine
    ///
    /// A machine with telemetry attributed to it cannot be deleted (409
    /// `machine_has_telemetry`; deactivate it instead). One carrying a device is refused
    /// (409 `machine_has_device`) unless `force=true`, which releases the device first.
    #[oai(
        path = "/api/machines/:id",
        method = "delete",
        operation_id = "machines_delete"
    )]
    async fn delete(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        /// Release the machine's device and delete it anyway.
        force: Query<Option<bool>>,
    ) -> ApiResult<Deleted> {
        auth.staff()?;
        machines::delete(&state.db, &state.tokens, id.0, force.0.unwrap_or(false)).await?;
        Ok(Deleted::Done)
    }

    /// Bind a device to the machine
    ///
    /// A device bound to another machine is a 409 `device_assigned_elsewhere`, and a machine
    /// carrying another device a 409 `machine_has_device`, unless `move` is true. The binding
    /// history is kept: the device's past events stay with the machines of their time.
    #[oai(
        path = "/api/machines/:id/assign",
        method = "post",
        operation_id = "machines_assign"
    )]
    async fn assign(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        body: Json<AssignBody>,
    ) -> ApiResult<Json<MachineDto>> {
        auth.staff()?;
        let view = machines::assign(
            &state.db,
            &state.tokens,
            &state.notifier,
            id.0,
            &body.device_id,
            body.move_device,
            state.settings.thresholds(),
        )
        .await?;
        Ok(Json(view.into()))
    }

    /// Take the device off the machine
    #[oai(
        path = "/api/machines/:id/unassign",
        method = "post",
        operation_id = "machines_unassign"
    )]
    async fn unassign(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
    ) -> ApiResult<Json<MachineDto>> {
        auth.staff()?;
        let view = machines::unassign(
            &state.db,
            &state.tokens,
            &state.notifier,
            id.0,
            state.settings.thresholds(),
        )
        .await?;
        Ok(Json(view.into()))
    }

    /// The machine's binding history
    ///
    /// Which devices the machine carried and when, newest first.
    #[oai(
        path = "/api/machines/:id/devices",
        method = "get",
        operation_id = "machines_history"
    )]
    async fn history(
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
    ) -> ApiResult<Json<Page<BindingDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let rows = machines::history(&state.db, id.0).await?;
        Ok(Json(Page::from_domain(
            req,
            queries::Page::from_vec(rows, window),
            |(row, device_id)| BindingDto {
                device_id,
                assigned_at: row.assigned_at,
                unassigned_at: row.unassigned_at,
            },
        )))
    }
}
