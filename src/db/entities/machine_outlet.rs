//! Outlet history of machines: events are attributed to the outlet their machine stood in when
//! they happened.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "machine_outlets")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub machine_id: i32,
    pub outlet_id: Option<i32>,
    pub assigned_at: DateTimeUtc,
    pub unassigned_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
