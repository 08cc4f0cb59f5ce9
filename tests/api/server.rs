//! Health, error shapes for unknown routes, and graceful shutdown.

use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;

use ozone::db::{entities::telemetry_event, Db};

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    let health = app.get("/healthz", None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "ok");
    let ready = app.get("/readyz/", None).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app().await;
    app.get("/api/nothing-here/", None)
        .await
        .assert_error(404, "not_found");
    let resp = app
        .http
        .put(app.url("/api/handshake/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_every_acknowledged_event() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = app.http.clone();
        let url = app.url("/api/device/events/");
        let token = d.token.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"event_id": format!("s-{i}"), "treatment": "BASIC"});
            match http.post(&url).bearer_auth(&token).json(&body).send().await {
                Ok(resp) if resp.status() == 200 => Some(i),
                _ => None,
            }
        }));
    }
    let stopped = app.stop().await;
    let mut acknowledged = 0u64;
    for task in tasks {
        if task.await.unwrap().is_some() {
            acknowledged += 1;
        }
    }
    let db = Db::connect(&stopped.database_url, 2).await.unwrap();
    let stored = telemetry_event::Entity::find()
        .count(db.conn())
        .await
        .unwrap();
    assert!(
        stored >= acknowledged,
        "{acknowledged} events acknowledged but only {stored} stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart_on_the_same_database() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    assert_eq!(app.post_event(&d, "persist-1", json!({})).await.status, 200);
    let stopped = app.stop().await;
    let url = stopped.database_url.clone();
    let again = crate::helpers::spawn_app_with(|s| s.database_url = url).await;
    // The same token still authenticates, and the event is a duplicate now.
    let reply = again
        .post_json(
            "/api/device/events/",
            Some(&d.token),
            &json!({"event_id": "persist-1", "treatment": "BASIC"}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        telemetry_event::Entity::find()
            .count(again.db())
            .await
            .unwrap(),
        1
    );
    drop(stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("ozone.db");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ozone"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}?mode=rwc", db_path.display()))
        .env("OZONE_LOG", "info,ozone::http=debug")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready when it says where it listens.
    let stderr = child.stderr.take().unwrap();
    let (addr, stderr) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains("ozone is up") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("http="))
                    .expect("the banner names the address")
                    .to_owned();
                return (addr, lines);
            }
        }
        panic!("the server exited before it was up");
    })
    .await
    .unwrap();
    assert!(
        !addr.contains('\u{1b}'),
        "no colour codes in non-terminal logs"
    );

    let http = reqwest::Client::new();
    let handshake: serde_json::Value = http
        .post(format!("http://{addr}/api/handshake/"))
        .json(&json!({"mac": "02:00:00:00:00:01"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = handshake["token"].as_str().unwrap();
    for i in 0..50 {
        let resp = http
            .post(format!("http://{addr}/api/device/events/"))
            .bearer_auth(token)
            .json(&json!({"event_id": format!("bin-{i}"), "treatment": "BASIC"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let log: Vec<String> = stderr.map(|l| l.unwrap()).collect();
        (status, log.join("\n"))
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        log.contains(r#"path="/api/device/events/" status=200"#),
        "an access line per request at debug level: {log}"
    );
    assert!(!log.contains(token), "tokens never reach the log");
    assert!(
        !dir.path().join("ozone.db-wal").exists(),
        "the WAL is checkpointed and removed on a clean stop"
    );
    let db = Db::connect(&format!("sqlite://{}?mode=rwc", db_path.display()), 2)
        .await
        .unwrap();
    assert_eq!(
        telemetry_event::Entity::find()
            .count(db.conn())
            .await
            .unwrap(),
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    let app = crate::helpers::spawn_app_with(|s| s.http_idle_timeout_secs = 1).await;
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // The server ends the connection: the read sees end-of-stream (or a reset), within a bound.
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("an idle connection must not be kept for ever");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
