//! Commands through the staff API together with the firmware shim: create → poll → result →
//! status list; bulk by devices, machines and outlet; retry limits; cancel.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn a_command_created_by_staff_is_polled_executed_and_listed() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let device = app
        .assigned_device("AA:BB:CC:00:01:01", "CH1/001/2024")
        .await;
    let created = app
        .staff_post(
            &format!("/api/device/{}/commands/create/", device.device_id),
            &staff,
            &json!({"command_type": "reset", "payload": {"why": "test"}, "priority": 5, "expires_in": 3600}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["status"], "pending");
    assert_eq!(created.body["command_type"], "RESET");
    assert_eq!(created.body["created_by"], "staff");
    assert_eq!(created.body["device_id"], device.device_id);
    assert!(created.body["expires_at"].is_string());
    let command_id = created.body["command_id"].as_str().unwrap().to_owned();

    let polled = app.poll(&device).await;
    assert_eq!(polled.body["commands"][0]["command_id"], command_id);
    let sent = app
        .staff_get(
            &format!(
                "/api/device/{}/commands/status/?status=sent",
                device.device_id
            ),
            &staff,
        )
        .await;
    assert_eq!(sent.body["count"], 1, "{}", sent.body);
    assert_eq!(sent.body["results"][0]["channel"], "http");

    let result = app
        .report(
            &device,
            &command_id,
            json!({"success": true, "message": "done"}),
        )
        .await;
    assert_eq!(result.status, 200, "{}", result.body);
    let executed = app
        .staff_get(&format!("/api/commands/{command_id}/"), &staff)
        .await;
    assert_eq!(executed.body["status"], "executed");
    assert!(executed.body["executed_at"].is_string());
    let listed = app
        .staff_get(
            &format!(
                "/api/commands/?device_id={}&status=executed&command_type=RESET",
                device.device_id
            ),
            &staff,
        )
        .await;
    assert_eq!(listed.body["count"], 1);

    // Executed commands cannot be cancelled or retried.
    app.staff_post(
        &format!("/api/commands/{command_id}/cancel/"),
        &staff,
        &json!({}),
    )
    .await
    .assert_error(409, "command_final");
    app.staff_post(
        &format!("/api/commands/{command_id}/retry/"),
        &staff,
        &json!({}),
    )
    .await
    .assert_error(409, "command_not_retryable");
}

#[tokio::test]
async fn command_creation_validates_its_input() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let reader = app.user("reader", false, false).await;
    let device = app.handshake("AA:BB:CC:00:01:02").await;
    let path = format!("/api/device/{}/commands/create/", device.device_id);
    app.staff_post(&path, &reader, &json!({"command_type": "RESET"}))
        .await
        .assert_error(403, "staff_required");
    app.staff_post(&path, &staff, &json!({"command_type": "bad type!"}))
        .await
        .assert_error(422, "invalid_command_type");
    app.staff_post(
        &path,
        &staff,
        &json!({"command_type": "RESET", "expires_at": "2001-01-01T00:00:00Z"}),
    )
    .await
    .assert_error(422, "invalid_expiry");
    app.staff_post(
        "/api/device/nope/commands/create/",
        &staff,
        &json!({"command_type": "RESET"}),
    )
    .await
    .assert_error(404, "device_not_found");
    let malformed = app
        .staff_call(
            Method::POST,
            &path,
            Some(&staff.token),
            Some(&json!({"priority": 1})),
        )
        .await;
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert!(malformed.body["code"].is_string());
}

#[tokio::test]
async fn bulk_commands_reach_devices_machines_and_outlets_and_say_what_was_skipped() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let a = app.handshake("AA:BB:CC:00:01:03").await;
    let b = app.handshake("AA:BB:CC:00:01:04").await;
    let by_devices = app
        .staff_post(
            "/api/commands/bulk/",
            &staff,
            &json!({"device_ids": [a.device_id, b.device_id, "ghost"], "command_type": "REBOOT"}),
        )
        .await;
    assert_eq!(by_devices.status, 201, "{}", by_devices.body);
    assert_eq!(by_devices.body["created_count"], 2);
    assert_eq!(by_devices.body["skipped"][0]["target"], "ghost");
    assert_eq!(by_devices.body["skipped"][0]["code"], "device_not_found");

    let shop = app
        .staff_post("/api/outlets/", &staff, &json!({"name": "Shop"}))
        .await
        .body["id"]
        .as_i64()
        .unwrap();
    let with_device = app
        .staff_post(
            "/api/machines/register/",
            &staff,
            &json!({"device_id": a.device_id, "outlet_id": shop, "name": "A"}),
        )
        .await
        .body["id"]
        .as_i64()
        .unwrap();
    let empty = app
        .staff_post(
            "/api/machines/",
            &staff,
            &json!({"name": "Empty", "outlet": shop}),
        )
        .await
        .body["id"]
        .as_i64()
        .unwrap();
    let by_machines = app
        .staff_post(
            "/api/commands/bulk/",
            &staff,
            &json!({"machine_ids": [with_device, empty, 9999], "command_type": "RESET", "priority": 3}),
        )
        .await;
    assert_eq!(by_machines.body["created_count"], 1, "{}", by_machines.body);
    assert_eq!(by_machines.body["created"][0]["device_id"], a.device_id);
    let codes: Vec<&str> = by_machines.body["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"machine_has_no_device") && codes.contains(&"machine_not_found"));

    let by_outlet = app
        .staff_post(
            "/api/commands/bulk/",
            &staff,
            &json!({"outlet_id": shop, "command_type": "RESET"}),
        )
        .await;
    assert_eq!(by_outlet.body["created_count"], 1, "{}", by_outlet.body);

    app.staff_post(
        "/api/commands/bulk/",
        &staff,
        &json!({"outlet_id": shop, "device_ids": [a.device_id], "command_type": "RESET"}),
    )
    .await
    .assert_error(422, "invalid_target");
    let all = app.staff_get("/api/commands/?limit=1000", &staff).await;
    assert_eq!(all.body["count"], 4);
}

#[tokio::test]
async fn cancelled_commands_can_be_retried_up_to_the_limit() {
    let app = spawn_app_with(|s| s.max_command_retries = 2).await;
    let staff = app.staff().await;
    let device = app.handshake("AA:BB:CC:00:01:05").await;
    let created = app
        .staff_post(
            &format!("/api/device/{}/commands/create/", device.device_id),
            &staff,
            &json!({"command_type": "REBOOT"}),
        )
        .await;
    let id = created.body["id"].as_i64().unwrap();
    app.staff_post(&format!("/api/commands/{id}/retry/"), &staff, &json!({}))
        .await
        .assert_error(409, "command_not_retryable");
    for round in 1..=2 {
        let cancelled = app
            .staff_post(&format!("/api/commands/{id}/cancel/"), &staff, &json!({}))
            .await;
        assert_eq!(cancelled.body["status"], "cancelled", "{}", cancelled.body);
        let retried = app
            .staff_post(&format!("/api/commands/{id}/retry/"), &staff, &json!({}))
            .await;
        assert_eq!(retried.status, 200, "{}", retried.body);
        assert_eq!(retried.body["status"], "pending");
        assert_eq!(retried.body["retry_count"], round);
    }
    app.staff_post(&format!("/api/commands/{id}/cancel/"), &staff, &json!({}))
        .await;
    app.staff_post(&format!("/api/commands/{id}/retry/"), &staff, &json!({}))
        .await
        .assert_error(409, "retry_limit_reached");
    app.staff_post("/api/commands/cmd-nope/retry/", &staff, &json!({}))
        .await
        .assert_error(404, "command_not_found");
}
