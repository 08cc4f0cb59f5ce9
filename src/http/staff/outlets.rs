//! `/api/outlets/…`: outlets CRUD.

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
    StaffAuth, Tag,
};
use crate::{
    db::entities::outlet,
    domain::outlets::{self, OutletFields, OutletPatch},
    state::AppState,
};

#[derive(Debug, Object)]
pub struct OutletDto {
    pub id: i32,
    pub name: String,
    pub region: String,
    pub address: String,
    pub contact_person: String,
    pub is_active: bool,
    #[oai(nullable)]
    pub total_sva: Option<i32>,
    #[oai(nullable)]
    pub average_intage_services: Option<f64>,
    #[oai(nullable)]
    pub number_of_machines: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<outlet::Model> for OutletDto {
    fn from(o: outlet::Model) -> Self {
        OutletDto {
            id: o.id,
            name: o.name,
            region: o.region,
            address: o.address,
            contact_person: o.contact_person,
            is_active: o.is_active,
            total_sva: o.total_sva,
            average_intage_services: o.average_intage_services,
            number_of_machines: o.number_of_machines,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

/// An outlet's fields (create, and full update with PUT).
#[derive(Debug, Object)]
pub struct OutletBody {
    #[oai(deserialize_with = "text")]
    pub name: String,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub region: Option<String>,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub address: Option<String>,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub contact_person: Option<String>,
    #[oai(default = "yes")]
    #[oai(nullable)]
    pub is_active: bool,
    #[oai(nullable)]
    pub total_sva: Option<i32>,
    #[oai(nullable)]
    pub average_intage_services: Option<f64>,
    #[oai(nullable)]
    pub number_of_machines: Option<i32>,
}

fn yes() -> bool {
    true
}

impl From<OutletBody> for OutletFields {
    fn from(b: OutletBody) -> Self {
        OutletFields {
            name: b.name,
            region: b.region.unwrap_or_default(),
            address: b.address.unwrap_or_default(),
            contact_person: b.contact_person.unwrap_or_default(),
            is_active: b.is_active,
            total_sva: b.total_sva,
            average_intage_services: b.average_intage_services,
            number_of_machines: b.number_of_machines,
        }
    }
}

/// A partial update: only the fields given change (`null` clears an owner metric).
#[derive(Debug, Object)]
pub struct OutletPatchBody {
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub name: Option<String>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub region: Option<String>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub address: Option<String>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub contact_person: Option<String>,
    #[oai(nullable)]
    pub is_active: Option<bool>,
    #[oai(nullable)]
    pub total_sva: MaybeUndefined<i32>,
    #[oai(nullable)]
    pub average_intage_services: MaybeUndefined<f64>,
    #[oai(nullable)]
    pub number_of_machines: MaybeUndefined<i32>,
}

fn maybe<T>(v: MaybeUndefined<T>) -> Option<Option<T>> {
    match v {
        MaybeUndefined::Undefined => None,
        MaybeUndefined::Null => Some(None),
        MaybeUndefined::Value(v) => Some(Some(v)),
    }
}

impl From<OutletPatchBody> for OutletPatch {
    fn from(b: OutletPatchBody) -> Self {
        OutletPatch {
            name: b.name,
            region: b.region,
            address: b.address,
            contact_person: b.contact_person,
            is_active: b.is_active,
            total_sva: maybe(b.total_sva),
            average_intage_services: maybe(b.average_intage_services),
            number_of_machines: maybe(b.number_of_machines),
        }
    }
}

#[derive(ApiResponse)]
pub enum OutletCreated {
    /// The outlet was created.
    #[oai(status = 201)]
    Created(Json<OutletDto>),
}

pub struct OutletsApi;

#[OpenApi(tag = "Tag::Outlets")]
impl OutletsApi {
    /// List outlets
    #[oai(path = "/api/outlets", method = "get", operation_id = "outlets_list")]
    async fn list(
        &self,
        req: &Request,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        /// Only active (true) or inactive (false) outlets.
        is_active: Query<Option<bool>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<Json<Page<OutletDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let page = outlets::list(&state.db, is_active.0, window).await?;
        Ok(Json(Page::from_domain(req, page, OutletDto::from)))
    }

    /// Create an outlet
    #[oai(
        path = "/api/outlets",
        method = "post",
        operation_id = "outlets_create"
    )]
    async fn create(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        body: Json<OutletBody>,
    ) -> ApiResult<OutletCreated> {
        auth.staff()?;
        let created = outlets::create(&state.db, body.0.into()).await?;
        Ok(OutletCreated::Created(Json(created.into())))
    }

    /// One outlet
    #[oai(
        path = "/api/outlets/:id",
        method = "get",
        operation_id = "outlets_get"
    )]
    async fn get(
        &self,
        _auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
    ) -> ApiResult<Json<OutletDto>> {
        Ok(Json(outlets::get(&state.db, id.0).await?.into()))
    }

    /// Replace an outlet
    #[oai(
        path = "/api/outlets/:id",
        method = "put",
        operation_id = "outlets_update"
    )]
    async fn update(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        body: Json<OutletBody>,
    ) -> ApiResult<Json<OutletDto>> {
        auth.staff()?;
        let fields: OutletFields = body.0.into();
        Ok(Json(
            outlets::update(&state.db, id.0, fields.into())
                .await?
                .into(),
        ))
    }

    /// Change some fields of an outlet
    #[oai(
        path = "/api/outlets/:id",
        method = "patch",
        operation_id = "outlets_patch"
    )]
    async fn patch(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        body: Json<OutletPatchBody>,
    ) -> ApiResult<Json<OutletDto>> {
        auth.staff()?;
        Ok(Json(
            outlets::update(&state.db, id.0, body.0.into())
                .await?
                .into(),
        ))
    }

    /// Delete an outlet
    ///
    /// Refused (409 `outlet_has_machines`) while machines stand in it, unless `force=true`,
    /// which moves them out first. An outlet with telemetry attributed to it cannot be deleted
    /// (409 `outlet_has_telemetry`): deactivate it instead.
    #[oai(
        path = "/api/outlets/:id",
        method = "delete",
        operation_id = "outlets_delete"
    )]
    async fn delete(
        &self,
        auth: StaffAuth,
        state: Data<&Arc<AppState>>,
        id: Path<i32>,
        /// Move the outlet's machines out and delete it anyway.
        force: Query<Option<bool>>,
    ) -> ApiResult<Deleted> {
        auth.staff()?;
        outlets::delete(&state.db, id.0, force.0.unwrap_or(false)).await?;
        Ok(Deleted::Done)
    }
}
