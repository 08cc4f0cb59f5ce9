//! PostgreSQL: a binding revision, raised by every transaction that changes which machine a
//! device is bound to or which outlet a machine stands in, so that a process may keep the
//! bindings it read and know, in any later statement, whether they still hold.
//!
//! The revision is raised by deferred row triggers, that is as the changing transaction
//! commits, after every other lock it takes: a transaction holding the revision's row waits for
//! nothing more, so two changes can queue on it but never deadlock. Readers only read it.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE binding_revision (
    id smallint PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL
);
INSERT INTO binding_revision (id, revision) VALUES (1, 0);

CREATE FUNCTION binding_revision_raise() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE binding_revision SET revision = revision + 1 WHERE id = 1;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER machine_devices_revision
    AFTER INSERT OR UPDATE OR DELETE ON machine_devices
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION binding_revision_raise();

CREATE CONSTRAINT TRIGGER machine_outlets_revision
    AFTER INSERT OR UPDATE OR DELETE ON machine_outlets
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION binding_revision_raise();
"#;

const DOWN: &str = r#"
DROP TRIGGER IF EXISTS machine_outlets_revision ON machine_outlets;
DROP TRIGGER IF EXISTS machine_devices_revision ON machine_devices;
DROP FUNCTION IF EXISTS binding_revision_raise();
DROP TABLE IF EXISTS binding_revision;
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
