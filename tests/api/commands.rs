//! Command poll and result: `GET /api/device/{id}/commands/`, `POST …/commands/{command}/`.

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;

use ozone::{
    db::entities::{command, device_status, telemetry_event},
    domain::commands::{self, NewCommand},
};

use crate::helpers::{spawn_app, spawn_app_with, Device, TestApp};

/// A command whose lifetime ended as it was created.
async fn expired_command(app: &TestApp, device: &Device) -> command::Model {
    commands::create(
        &app.state.db,
        &app.state.notifier,
        &device.device_id,
        NewCommand {
            command_type: "REBOOT".into(),
            expires_in: Some(std::time::Duration::ZERO),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn command_row(app: &TestApp, command_id: &str) -> command::Model {
    command::Entity::find()
        .filter(command::Column::CommandId.eq(command_id))
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_devices_cannot_use_command_endpoints() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    app.poll(&d).await.assert_error(401, "device_unassigned");
    app.report(&d, "1", json!({"success": true}))
        .await
        .assert_error(401, "device_unassigned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_endpoints_check_token_and_device() {
    let app = spawn_app().await;
    let a = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let b = app.assigned_device("EC:E3:34:46:2B:C1", "M-2").await;
    let path = format!("/api/device/{}/commands/", b.device_id);
    app.get(&path, None)
        .await
        .assert_error(401, "missing_token");
    app.get(&path, Some("nope"))
        .await
        .assert_error(401, "invalid_token");
    app.get(&path, Some(&a.token))
        .await
        .assert_error(401, "device_mismatch");
    let cmd = app.send_command(&b, "REBOOT", &[]);
    // A's token cannot report B's command, and B's command is not A's to report.
    app.post_json(
        &format!(
            "/api/device/{}/commands/{}/",
            b.device_id,
            cmd["command_id"].as_str().unwrap()
        ),
        Some(&a.token),
        &json!({"success": true}),
    )
    .await
    .assert_error(401, "device_mismatch");
    app.report(
        &a,
        cmd["command_id"].as_str().unwrap(),
        json!({"success": true}),
    )
    .await
    .assert_error(404, "command_not_found");
    assert_eq!(
        command_row(&app, cmd["command_id"].as_str().unwrap())
            .await
            .status,
        "pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_returns_pending_commands_by_priority_then_age_and_marks_them_sent() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let empty = app.poll(&d).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.body, json!({"commands": []}));

    let low = app.send_command(&d, "SYNC", &[]);
    let urgent = app.send_command(
        &d,
        "RESET",
        &["--priority", "10", "--payload", r#"{"why":"audit"}"#],
    );
    let low2 = app.send_command(&d, "REBOOT", &[]);
    let reply = app.poll(&d).await;
    assert_eq!(reply.status, 200);
    let list = reply.body["commands"].as_array().unwrap();
    let ids: Vec<&str> = list
        .iter()
        .map(|c| c["command_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![
            urgent["command_id"].as_str().unwrap(),
            low["command_id"].as_str().unwrap(),
            low2["command_id"].as_str().unwrap()
        ]
    );
    let first = &list[0];
    assert_eq!(first["id"], urgent["id"]);
    assert_eq!(first["command_type"], "RESET");
    assert_eq!(first["payload"], json!({"why": "audit"}));
    assert_eq!(first["priority"], 10);
    for key in ["description", "created_at", "expires_at"] {
        assert!(first.get(key).is_some(), "{key} missing: {first}");
    }
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));

    for id in ids {
        let row = command_row(&app, id).await;
        assert_eq!(row.status, "sent");
        assert_eq!(row.channel.as_deref(), Some("http"));
        assert!(row.sent_at.is_some());
    }
    assert_eq!(
        app.poll(&d).await.body,
        json!({"commands": []}),
        "sent commands are not re-sent"
    );
    app.state.ingestor.flush_contacts().await;
    let device = ozone::domain::devices::find_by_device_id(app.db(), &d.device_id)
        .await
        .unwrap();
    let status = device_status::Entity::find_by_id(device.id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.last_poll.is_some(),
        "a poll is recorded for presence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_accepted_by_numeric_id_or_command_id() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let by_id = app.send_command(&d, "REBOOT", &[]);
    let by_cid = app.send_command(&d, "SYNC", &[]);
    app.poll(&d).await;

    let reply = app
        .report(
            &d,
            &by_id["id"].to_string(),
            json!({"success": true, "message": "rebooting"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"ack": true, "command_id": by_id["command_id"], "status": "executed"})
    );
    let reply = app
        .report(
            &d,
            by_cid["command_id"].as_str().unwrap(),
            json!({"success": false, "message": "no SD card", "response_data": {"errno": 5}}),
        )
        .await;
    assert_eq!(reply.body["status"], "failed");

    let ok = command_row(&app, by_id["command_id"].as_str().unwrap()).await;
    assert!(ok.executed_at.is_some());
    assert_eq!(ok.response_data, Some(json!({"message": "rebooting"})));
    let failed = command_row(&app, by_cid["command_id"].as_str().unwrap()).await;
    assert_eq!(failed.error_message.as_deref(), Some("no SD card"));
    assert_eq!(failed.response_data, Some(json!({"errno": 5})));

    app.report(&d, "999999", json!({"success": true}))
        .await
        .assert_error(404, "command_not_found");
    app.report(&d, "cmd-unknown", json!({"success": true}))
        .await
        .assert_error(404, "command_not_found");
    app.report(
        &d,
        &by_id["id"].to_string(),
        json!({"message": "no success field"}),
    )
    .await
    .assert_error(422, "invalid_body");
    app.report(
        &d,
        &by_id["id"].to_string(),
        json!({"success": true, "current_counters": "0,0,0"}),
    )
    .await
    .assert_error(422, "invalid_body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_a_final_command_changes_nothing() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let cmd = app.send_command(&d, "REBOOT", &[]);
    let cid = cmd["command_id"].as_str().unwrap();
    app.report(&d, cid, json!({"success": true})).await;
    let executed = command_row(&app, cid).await;
    let again = app
        .report(&d, cid, json!({"success": false, "message": "late"}))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["status"], "executed");
    assert_eq!(command_row(&app, cid).await, executed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_reset_zeroes_counters_and_logs_a_reset_entry() {
    let app = spawn_app().await;
    let d = app
        .assigned_device("EC:E3:34:46:2B:C0", "CH1/027/2024")
        .await;
    app.post_event(
        &d,
        "t1",
        json!({"current_counters": {"basic": 7, "standard": 3, "premium": 1}}),
    )
    .await;
    let reset = app.send_command(&d, "RESET", &[]);
    app.poll(&d).await;
    let reply = app
        .report(
            &d,
            reset["command_id"].as_str().unwrap(),
            json!({"success": true}),
        )
        .await;
    assert_eq!(reply.body["status"], "executed");

    let device = ozone::domain::devices::find_by_device_id(app.db(), &d.device_id)
        .await
        .unwrap();
    let status = device_status::Entity::find_by_id(device.id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            status.current_count_basic,
            status.current_count_standard,
            status.current_count_premium
        ),
        (0, 0, 0)
    );
    let log = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::Event.eq("reset"))
        .all(app.db())
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
    assert!(
        log[0].machine_id.is_some(),
        "the reset is in the machine's log"
    );
    assert_eq!(log[0].count_basic, Some(0));

    // A reset reporting counters takes them instead of zero.
    let reset2 = app.send_command(&d, "reset", &[]);
    app.report(
        &d,
        reset2["command_id"].as_str().unwrap(),
        json!({"success": true, "current_counters": {"basic": 1, "standard": 0, "premium": 0}}),
    )
    .await;
    let status = device_status::Entity::find_by_id(device.id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.current_count_basic, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reset_keeps_the_counters() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    app.post_event(
        &d,
        "t1",
        json!({"current_counters": {"basic": 7, "standard": 3, "premium": 1}}),
    )
    .await;
    let reset = app.send_command(&d, "RESET", &[]);
    app.report(
        &d,
        reset["command_id"].as_str().unwrap(),
        json!({"success": false, "message": "busy"}),
    )
    .await;
    let device = ozone::domain::devices::find_by_device_id(app.db(), &d.device_id)
        .await
        .unwrap();
    let status = device_status::Entity::find_by_id(device.id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.current_count_basic, 7);
    let resets = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::Event.eq("reset"))
        .all(app.db())
        .await
        .unwrap();
    assert!(resets.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_commands_are_not_delivered_and_time_out() {
    // The sweeper runs every 20 ms here; the test waits for its effect, with a deadline.
    let app = spawn_app_with(|s| s.command_sweep_interval_ms = 20).await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let expired = expired_command(&app, &d).await;
    let live = app.send_command(&d, "SYNC", &["--expires-in", "3600"]);
    let polled = app.poll(&d).await;
    let ids: Vec<&str> = polled.body["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![live["command_id"].as_str().unwrap()]);
    assert!(polled.body["commands"][0]["expires_at"].is_string());

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if command_row(&app, &expired.command_id).await.status == "timeout" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sweeper never timed the command out"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // A result arriving after the timeout changes nothing.
    let late = app
        .report(&d, &expired.command_id, json!({"success": true}))
        .await;
    assert_eq!(late.body["status"], "timeout");
    assert_eq!(
        command_row(&app, live["command_id"].as_str().unwrap())
            .await
            .status,
        "sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_after_expiry_times_the_command_out_even_before_the_sweep() {
    // The sweeper runs hourly here, so only the result path can time the command out.
    let app = spawn_app_with(|s| s.command_sweep_interval_ms = 3_600_000).await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let expired = expired_command(&app, &d).await;
    let reply = app
        .report(&d, &expired.command_id, json!({"success": true}))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["status"], "timeout");
    assert_eq!(
        command_row(&app, &expired.command_id).await.status,
        "timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_moves_pending_and_sent_commands_past_expiry_to_timeout() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let sent = app.send_command(&d, "SYNC", &["--expires-in", "60"]);
    app.poll(&d).await;
    let pending = app.send_command(&d, "REBOOT", &["--expires-in", "60"]);
    let forever = app.send_command(&d, "NOOP", &[]);
    let later = chrono::Utc::now() + chrono::Duration::seconds(120);
    let swept = commands::sweep_expired(&app.state.db, &app.state.notifier, later)
        .await
        .unwrap();
    assert_eq!(swept, 2);
    for (cmd, status) in [
        (&sent, "timeout"),
        (&pending, "timeout"),
        (&forever, "pending"),
    ] {
        assert_eq!(
            command_row(&app, cmd["command_id"].as_str().unwrap())
                .await
                .status,
            status
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_requeues_a_failed_command() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let cmd = app.send_command(&d, "REBOOT", &["--expires-in", "600"]);
    let cid = cmd["command_id"].as_str().unwrap();
    assert!(
        commands::retry(&app.state.db, &app.state.notifier, cid, 5)
            .await
            .is_err(),
        "pending is not retryable"
    );
    app.report(&d, cid, json!({"success": false})).await;
    let retried = commands::retry(&app.state.db, &app.state.notifier, cid, 5)
        .await
        .unwrap();
    assert_eq!(retried.status, "pending");
    assert_eq!(retried.retry_count, 1);
    assert!(retried.expires_at.unwrap() > chrono::Utc::now() + chrono::Duration::seconds(500));
    let polled = app.poll(&d).await;
    assert_eq!(polled.body["commands"][0]["command_id"], cid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_command_is_not_delivered_and_stays_cancelled() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let cmd = app.send_command(&d, "REBOOT", &[]);
    let cid = cmd["command_id"].as_str().unwrap();
    let cancelled = commands::cancel(&app.state.db, &app.state.notifier, cid)
        .await
        .unwrap();
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!(app.poll(&d).await.body, json!({"commands": []}));
    let late = app.report(&d, cid, json!({"success": true})).await;
    assert_eq!(late.body["status"], "cancelled");
    assert!(
        commands::cancel(&app.state.db, &app.state.notifier, cid)
            .await
            .is_err(),
        "a final command cannot be cancelled again"
    );
}
