//! PostgreSQL: the references of `telemetry_events` (to its device, machine and outlet) are
//! checked once per statement instead of once per row.
//!
//! A foreign key runs one locking lookup per inserted row and per key; for a group-committed
//! batch of events that was more than half of the insert's time. The same guarantees are kept
//! by triggers:
//! - after each insert, one statement per referenced table locks every row the new events
//!   point to (`FOR KEY SHARE`, as a foreign key does) and fails with `foreign_key_violation`
//!   if any is missing;
//! - deleting a device that has events fails the same way (the foreign key's `RESTRICT`);
//!   deleting a machine or an outlet clears the events' reference to it (`SET NULL`).
//!
//! A delete locks its row before its trigger runs, and the insert's lock waits for an
//! uncommitted delete, so neither side can miss the other. SQLite keeps its foreign keys: it
//! checks them in process, at no comparable cost.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
ALTER TABLE telemetry_events
    DROP CONSTRAINT IF EXISTS telemetry_events_device_id_fkey,
    DROP CONSTRAINT IF EXISTS telemetry_events_machine_id_fkey,
    DROP CONSTRAINT IF EXISTS telemetry_events_outlet_id_fkey;

CREATE FUNCTION telemetry_events_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wanted bigint;
    found bigint;
BEGIN
    SELECT count(DISTINCT device_id) INTO wanted FROM inserted;
    SELECT count(*) INTO found FROM (SELECT 1 FROM devices d
        WHERE d.id IN (SELECT device_id FROM inserted)) AS present;
    IF found < wanted THEN
        RAISE EXCEPTION 'insert on telemetry_events violates foreign key: no such device'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT count(DISTINCT machine_id) INTO wanted FROM inserted;
    SELECT count(*) INTO found FROM (SELECT 1 FROM machines m
        WHERE m.id IN (SELECT machine_id FROM inserted)) AS present;
    IF found < wanted THEN
        RAISE EXCEPTION 'insert on telemetry_events violates foreign key: no such machine'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT count(DISTINCT outlet_id) INTO wanted FROM inserted;
    SELECT count(*) INTO found FROM (SELECT 1 FROM outlets o
        WHERE o.id IN (SELECT outlet_id FROM inserted)) AS present;
    IF found < wanted THEN
        RAISE EXCEPTION 'insert on telemetry_events violates foreign key: no such outlet'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER telemetry_events_references AFTER INSERT ON telemetry_events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION telemetry_events_references();

CREATE FUNCTION telemetry_events_keep_device() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE telemetry_events IN SHARE ROW EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM telemetry_events WHERE device_id = OLD.id) THEN
        RAISE EXCEPTION 'delete on devices violates foreign key: device % has telemetry events', OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER telemetry_events_keep_device AFTER DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION telemetry_events_keep_device();

CREATE FUNCTION telemetry_events_forget_machine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE telemetry_events IN SHARE ROW EXCLUSIVE MODE;
    UPDATE telemetry_events SET machine_id = NULL WHERE machine_id = OLD.id;
    RETURN NULL;
END $$;

CREATE TRIGGER telemetry_events_forget_machine AFTER DELETE ON machines
    FOR EACH ROW EXECUTE FUNCTION telemetry_events_forget_machine();

CREATE FUNCTION telemetry_events_forget_outlet() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE telemetry_events IN SHARE ROW EXCLUSIVE MODE;
    UPDATE telemetry_events SET outlet_id = NULL WHERE outlet_id = OLD.id;
    RETURN NULL;
END $$;

CREATE TRIGGER telemetry_events_forget_outlet AFTER DELETE ON outlets
    FOR EACH ROW EXECUTE FUNCTION telemetry_events_forget_outlet();
"#;

const DOWN: &str = r#"
DROP TRIGGER IF EXISTS telemetry_events_forget_outlet ON outlets;
DROP TRIGGER IF EXISTS telemetry_events_forget_machine ON machines;
DROP TRIGGER IF EXISTS telemetry_events_keep_device ON devices;
DROP TRIGGER IF EXISTS telemetry_events_references ON telemetry_events;
DROP FUNCTION IF EXISTS telemetry_events_forget_outlet();
DROP FUNCTION IF EXISTS telemetry_events_forget_machine();
DROP FUNCTION IF EXISTS telemetry_events_keep_device();
DROP FUNCTION IF EXISTS telemetry_events_references();
ALTER TABLE telemetry_events
    ADD CONSTRAINT telemetry_events_device_id_fkey FOREIGN KEY (device_id)
        REFERENCES devices (id) ON DELETE RESTRICT,
    ADD CONSTRAINT telemetry_events_machine_id_fkey FOREIGN KEY (machine_id)
        REFERENCES machines (id) ON DELETE SET NULL,
    ADD CONSTRAINT telemetry_events_outlet_id_fkey FOREIGN KEY (outlet_id)
        REFERENCES outlets (id) ON DELETE SET NULL;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::on_postgres(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::on_postgres(manager, DOWN).await
    }
}
