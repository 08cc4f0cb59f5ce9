//! Operator commands: `ozone backup` while the server runs, `ozone check` and its exit codes,
//! and JSON logs.

use std::process::{Command, Output};

use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait};
use serde_json::{json, Value};

use ozone::db::entities::telemetry_event;

use crate::helpers::{on_postgres, spawn_app};

fn ozone(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ozone"));
    cmd.args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .env_remove("OZONE_LOG")
        .env_remove("OZONE_LOG_FORMAT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ozone")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_taken_while_serving_restores_to_the_same_event_count() {
    let app = spawn_app().await;
    let device = app.handshake("02:00:00:00:20:01").await;
    for i in 0..25 {
        let reply = app.post_event(&device, &format!("b-{i}"), json!({})).await;
        assert_eq!(reply.status, 200);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("backup.db");
    let file_arg = file.to_str().expect("utf-8 path");
    let out = ozone(&app.database_url, &["backup", file_arg], &[]);
    if on_postgres() {
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("pg_dump"),
            "{}",
            text(&out.stderr)
        );
        return;
    }
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("written to"));

    let live = telemetry_event::Entity::find()
        .count(app.db())
        .await
        .unwrap();
    assert_eq!(live, 25);
    // The copy is a complete database: current migrations, the same events.
    let restored_url = format!("sqlite://{}?mode=rw", file.display());
    let check = ozone(&restored_url, &["check"], &[]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stdout));
    let restored = sea_orm::Database::connect(restored_url.as_str())
        .await
        .unwrap();
    let copied = telemetry_event::Entity::find()
        .count(&restored)
        .await
        .unwrap();
    assert_eq!(copied, live);
    restored.close().await.unwrap();

    // An existing file is never overwritten.
    let again = ozone(&app.database_url, &["backup", file_arg], &[]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_zero_when_configuration_database_and_migrations_are_fine() {
    let app = spawn_app().await;
    let out = ozone(&app.database_url, &["check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("configuration: ok"), "{stdout}");
    assert!(stdout.contains("none pending"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exit_codes_tell_what_is_wrong() {
    let app = spawn_app().await;
    // 2: the configuration is invalid.
    let out = ozone(
        &app.database_url,
        &["check"],
        &[("OZONE_DB_MAX_CONNECTIONS", "0")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // 3: the database cannot be reached.
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = format!("sqlite://{}?mode=rwc", dir.path().join("none.db").display());
    let out = ozone(&missing, &["check"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        !dir.path().join("none.db").exists(),
        "check creates nothing"
    );
    let out = ozone("postgres://nobody:secret@127.0.0.1:1/none", &["check"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        !text(&out.stdout).contains("secret"),
        "passwords are never printed"
    );

    // 4: a migration is pending.
    app.db()
        .execute_unprepared(
            "DELETE FROM seaql_migrations WHERE version = \
             (SELECT MAX(version) FROM seaql_migrations)",
        )
        .await
        .unwrap();
    let out = ozone(&app.database_url, &["check"], &[]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("pending"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("ozone.db").display()
    );
    let out = ozone(
        &url,
        &["migrate"],
        &[
            ("OZONE_LOG_FORMAT", "json"),
            ("OZONE_LOG", "info,sea_orm_migration=info"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "migrations log at info");
    for line in lines {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
    }
    let bad = ozone(&url, &["check"], &[("OZONE_LOG_FORMAT", "xml")]);
    assert_eq!(bad.status.code(), Some(2));
}
