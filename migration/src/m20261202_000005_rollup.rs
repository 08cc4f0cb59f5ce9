//! The hourly rollup of treatments that usage statistics read instead of raw events.
//!
//! Three levels, each keyed by the UTC hour (`bucket_hour`, epoch seconds of the hour's start)
//! and the treatment (0 = BASIC, 1 = STANDARD, 2 = PREMIUM):
//! - `stats_hourly`: per device, machine and outlet the event was attributed to (0 = none, so
//!   that the key has no NULLs and `ON CONFLICT` always matches);
//! - `stats_hourly_outlets`: per outlet (0 = none);
//! - `stats_hourly_fleet`: the whole fleet.
//!
//! Keys lead with the hour, so that ingest, which mostly counts into the current hour, updates
//! a few adjacent pages per commit rather than one page per device. The per-device and
//! per-outlet indexes that queries use only change when a key appears for the first time
//! (about once per device, treatment and hour), not on every count.
//!
//! The ingest transaction keeps all three exact; this migration fills them from the events
//! already stored.

use sea_orm_migration::{prelude::*, sea_orm::DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const TREATMENT_CODE: &str =
    "CASE treatment WHEN 'BASIC' THEN 0 WHEN 'STANDARD' THEN 1 WHEN 'PREMIUM' THEN 2 END";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        // SQLite stores a table without a rowid in the order of its key: one B-tree per level.
        let suffix = match manager.get_database_backend() {
            DbBackend::Sqlite => " WITHOUT ROWID",
            _ => "",
        };
        db.execute_unprepared(&format!(
            "CREATE TABLE stats_hourly (\
             device_id INTEGER NOT NULL, bucket_hour BIGINT NOT NULL, \
             machine_id INTEGER NOT NULL, outlet_id INTEGER NOT NULL, \
             treatment SMALLINT NOT NULL, count BIGINT NOT NULL, \
             PRIMARY KEY (bucket_hour, device_id, machine_id, outlet_id, treatment)){suffix}"
        ))
        .await?;
        db.execute_unprepared(&format!(
            "CREATE TABLE stats_hourly_outlets (\
             outlet_id INTEGER NOT NULL, bucket_hour BIGINT NOT NULL, \
             treatment SMALLINT NOT NULL, count BIGINT NOT NULL, \
             PRIMARY KEY (bucket_hour, outlet_id, treatment)){suffix}"
        ))
        .await?;
        db.execute_unprepared(&format!(
            "CREATE TABLE stats_hourly_fleet (\
             bucket_hour BIGINT NOT NULL, treatment SMALLINT NOT NULL, count BIGINT NOT NULL, \
             PRIMARY KEY (bucket_hour, treatment)){suffix}"
        ))
        .await?;
        db.execute_unprepared(
            "CREATE INDEX ix_stats_hourly_device ON stats_hourly (device_id, bucket_hour)",
        )
        .await?;
        db.execute_unprepared(
            "CREATE INDEX ix_stats_hourly_outlets_outlet \
             ON stats_hourly_outlets (outlet_id, bucket_hour)",
        )
        .await?;

        let hour = "(occurred_epoch / 3600) * 3600";
        let treatments = "event = 'treatment' AND treatment IN ('BASIC', 'STANDARD', 'PREMIUM')";
        db.execute_unprepared(&format!(
            "INSERT INTO stats_hourly (device_id, bucket_hour, machine_id, outlet_id, treatment, count) \
             SELECT device_id, {hour}, COALESCE(machine_id, 0), COALESCE(outlet_id, 0), {TREATMENT_CODE}, COUNT(*) \
             FROM telemetry_events WHERE {treatments} \
             GROUP BY device_id, {hour}, COALESCE(machine_id, 0), COALESCE(outlet_id, 0), {TREATMENT_CODE}"
        ))
        .await?;
        db.execute_unprepared(
            "INSERT INTO stats_hourly_outlets (outlet_id, bucket_hour, treatment, count) \
             SELECT outlet_id, bucket_hour, treatment, SUM(count) FROM stats_hourly \
             GROUP BY outlet_id, bucket_hour, treatment",
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO stats_hourly_fleet (bucket_hour, treatment, count) \
             SELECT bucket_hour, treatment, SUM(count) FROM stats_hourly_outlets \
             GROUP BY bucket_hour, treatment",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for table in ["stats_hourly_fleet", "stats_hourly_outlets", "stats_hourly"] {
            db.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
        }
        Ok(())
    }
}
