//! Ozone's database schema as sea-orm migrations, applied at start-up by `ozone serve` and by
//! `ozone migrate`. The same migrations run on SQLite and PostgreSQL.

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_create_schema;
mod m20261202_000001_ordered_state;
mod m20261202_000002_staff;
mod m20261202_000005_rollup;
mod m20261203_000001_event_references;
mod m20261203_000002_binding_revision;

pub struct Migrator;

/// Runs `sql` on PostgreSQL only, for schema that SQLite has no need of.
async fn on_postgres(manager: &SchemaManager<'_>, sql: &str) -> Result<(), DbErr> {
    if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::Postgres {
        manager.get_connection().execute_unprepared(sql).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_create_schema::Migration),
            Box::new(m20261202_000001_ordered_state::Migration),
            Box::new(m20261202_000002_staff::Migration),
            Box::new(m20261202_000005_rollup::Migration),
            Box::new(m20261203_000001_event_references::Migration),
            Box::new(m20261203_000002_binding_revision::Migration),
        ]
    }
}
