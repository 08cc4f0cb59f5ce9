//! Device state that never goes backwards, outlet history, and database-enforced bindings.
//!
//! - `device_status` remembers the time of the report its counters and its other fields came
//!   from (`*_at` = the event's own time in epoch milliseconds, never after its arrival; `*_rx`
//!   = its arrival, breaking ties), and the reset point older events cannot undo.
//! - `machine_outlets` is the outlet history of each machine, like `machine_devices` is the
//!   device history: events are attributed to the outlet of their own time.
//! - At most one open binding per machine and per device (partial unique indexes).
//! - Commands keep their lifetime (a retry's expiry counts from the retry) and say whether a
//!   result came after their expiry.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum DeviceStatus {
    Table,
    CountersAt,
    CountersRx,
    ReportAt,
    ReportRx,
    ResetAt,
}

#[derive(DeriveIden)]
enum MachineOutlets {
    Table,
    Id,
    MachineId,
    OutletId,
    AssignedAt,
    UnassignedAt,
}

#[derive(DeriveIden)]
enum Machines {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Outlets {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Commands {
    Table,
    LifetimeSecs,
    Late,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite adds one column per ALTER TABLE.
        for column in [
            DeviceStatus::CountersAt,
            DeviceStatus::CountersRx,
            DeviceStatus::ReportAt,
            DeviceStatus::ReportRx,
            DeviceStatus::ResetAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(DeviceStatus::Table)
                        .add_column(big_integer_null(column))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Commands::Table)
                    .add_column(big_integer_null(Commands::LifetimeSecs))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Commands::Table)
                    .add_column(boolean(Commands::Late).default(false))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(MachineOutlets::Table)
                    .if_not_exists()
                    .col(pk_auto(MachineOutlets::Id))
                    .col(integer(MachineOutlets::MachineId))
                    .col(integer_null(MachineOutlets::OutletId))
                    .col(timestamp_with_time_zone(MachineOutlets::AssignedAt))
                    .col(timestamp_with_time_zone_null(MachineOutlets::UnassignedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(MachineOutlets::Table, MachineOutlets::MachineId)
                            .to(Machines::Table, Machines::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(MachineOutlets::Table, MachineOutlets::OutletId)
                            .to(Outlets::Table, Outlets::Id)
                            .on_delete(ForeignKeyAction::SetNull),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_machine_outlets_machine")
                    .table(MachineOutlets::Table)
                    .col(MachineOutlets::MachineId)
                    .col(MachineOutlets::AssignedAt)
                    .to_owned(),
            )
            .await?;

        let db = manager.get_connection();
        // Every existing machine has been in its current outlet since it was created.
        db.execute_unprepared(
            "INSERT INTO machine_outlets (machine_id, outlet_id, assigned_at, unassigned_at) \
             SELECT id, outlet_id, created_at, NULL FROM machines",
        )
        .await?;
        // Bindings left open twice by concurrent assignments: the newest stays open.
        for column in ["machine_id", "device_id"] {
            db.execute_unprepared(&format!(
                "UPDATE machine_devices SET unassigned_at = assigned_at \
                 WHERE unassigned_at IS NULL AND id NOT IN \
                 (SELECT MAX(id) FROM machine_devices WHERE unassigned_at IS NULL GROUP BY {column})"
            ))
            .await?;
            // Partial unique indexes: the same text on SQLite and PostgreSQL.
            db.execute_unprepared(&format!(
                "CREATE UNIQUE INDEX ux_machine_devices_open_{column} \
                 ON machine_devices ({column}) WHERE unassigned_at IS NULL"
            ))
            .await?;
        }
        db.execute_unprepared(
            "CREATE UNIQUE INDEX ux_machine_outlets_open \
             ON machine_outlets (machine_id) WHERE unassigned_at IS NULL",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for index in [
            "ux_machine_devices_open_machine_id",
            "ux_machine_devices_open_device_id",
        ] {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}"))
                .await?;
        }
        manager
            .drop_table(
                Table::drop()
                    .table(MachineOutlets::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
