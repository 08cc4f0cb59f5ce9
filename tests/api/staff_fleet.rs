//! Outlets, machines and devices through the staff API: CRUD round trips, registration,
//! assignment with its history, deletes that keep telemetry, pagination and roles.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, Staff, TestApp};

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    who: &Staff,
    body: Option<Value>,
) -> crate::helpers::Reply {
    app.staff_call(method, path, Some(&who.token), body.as_ref())
        .await
}

async fn outlet(app: &TestApp, staff: &Staff, name: &str) -> i64 {
    let reply = app
        .staff_post(
            "/api/outlets/",
            staff,
            &json!({"name": name, "address": "Address", "contact_person": "Contact", "is_active": true}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.body["id"].as_i64().unwrap()
}

#[tokio::test]
async fn outlets_round_trip_through_create_read_update_and_delete() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let id = outlet(&app, &staff, "Grand Mall").await;
    let got = app.staff_get(&format!("/api/outlets/{id}/"), &staff).await;
    assert_eq!(got.body["name"], "Grand Mall");
    assert_eq!(got.body["is_active"], true);

    let put = call(
        &app,
        Method::PUT,
        &format!("/api/outlets/{id}/"),
        &staff,
        Some(
            json!({"name": "Grand Mall 2", "region": "North", "is_active": false, "total_sva": 12}),
        ),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["region"], "North");
    assert_eq!(put.body["total_sva"], 12);

    let patched = call(
        &app,
        Method::PATCH,
        &format!("/api/outlets/{id}/"),
        &staff,
        Some(json!({"total_sva": null, "contact_person": "Ann"})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.body["total_sva"], Value::Null);
    assert_eq!(patched.body["name"], "Grand Mall 2");

    let inactive = app.staff_get("/api/outlets/?is_active=false", &staff).await;
    assert_eq!(inactive.body["count"], 1);
    let active = app.staff_get("/api/outlets/?is_active=true", &staff).await;
    assert_eq!(active.body["count"], 0);

    app.staff_post("/api/outlets/", &staff, &json!({"name": "Grand Mall 2"}))
        .await
        .assert_error(409, "outlet_name_taken");

    let deleted = call(
        &app,
        Method::DELETE,
        &format!("/api/outlets/{id}/"),
        &staff,
        None,
    )
    .await;
    assert_eq!(deleted.status, 204);
    app.staff_get(&format!("/api/outlets/{id}/"), &staff)
        .await
        .assert_error(404, "outlet_not_found");
}

#[tokio::test]
async fn reads_need_a_user_and_mutations_need_staff() {
    let app = spawn_app().await;
    let reader = app.user("reader", false, false).await;
    let staff = app.staff().await;
    outlet(&app, &staff, "Shop").await;
    assert_eq!(app.staff_get("/api/outlets/", &reader).await.status, 200);
    app.staff_call(Method::GET, "/api/outlets/", None, None)
        .await
        .assert_error(401, "not_authenticated");
    app.staff_post("/api/outlets/", &reader, &json!({"name": "Other"}))
        .await
        .assert_error(403, "staff_required");
    app.staff_post("/api/machines/", &reader, &json!({"name": "M"}))
        .await
        .assert_error(403, "staff_required");
}

#[tokio::test]
async fn pagination_is_bounded_and_links_the_pages() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    for n in 0..5 {
        outlet(&app, &staff, &format!("Shop {n}")).await;
    }
    let first = app.staff_get("/api/outlets/?limit=2", &staff).await;
    assert_eq!(first.body["count"], 5);
    assert_eq!(first.body["results"].as_array().unwrap().len(), 2);
    assert_eq!(first.body["previous"], Value::Null);
    let next = first.body["next"].as_str().unwrap().to_owned();
    assert!(
        next.contains("limit=2") && next.contains("offset=2"),
        "{next}"
    );
    let second = app.staff_get(&next, &staff).await;
    assert_eq!(second.body["results"][0]["name"], "Shop 2");
    assert!(second.body["previous"]
        .as_str()
        .unwrap()
        .contains("offset=0"));
    let last = app
        .staff_get("/api/outlets/?limit=2&offset=4", &staff)
        .await;
    assert_eq!(last.body["next"], Value::Null);
    let beyond = app.staff_get("/api/outlets/?offset=100", &staff).await;
    assert_eq!(beyond.body["count"], 5);
    assert_eq!(beyond.body["results"], json!([]));

    app.staff_get("/api/outlets/?limit=1001", &staff)
        .await
        .assert_error(422, "invalid_limit");
    app.staff_get("/api/outlets/?limit=0", &staff)
        .await
        .assert_error(422, "invalid_limit");
    app.staff_get("/api/outlets/?offset=-1", &staff)
        .await
        .assert_error(422, "invalid_offset");
    let max = app.staff_get("/api/outlets/?limit=1000", &staff).await;
    assert_eq!(max.status, 200);
    let bad = app.staff_get("/api/outlets/?limit=abc", &staff).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[tokio::test]
async fn register_binds_a_device_and_unregistered_lists_devices_with_telemetry_only() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let shop = outlet(&app, &staff, "Shop").await;
    let quiet = app.handshake("AA:BB:CC:00:00:01").await;
    let busy = app.handshake("AA:BB:CC:00:00:02").await;
    let ack = app.post_event(&busy, "e-1", json!({})).await;
    assert_eq!(ack.status, 200, "{}", ack.body);

    let unregistered = app.staff_get("/api/machines/unregistered/", &staff).await;
    assert_eq!(unregistered.body["count"], 1, "{}", unregistered.body);
    assert_eq!(unregistered.body["results"][0]["device_id"], busy.device_id);

    let machine = app
        .staff_post(
            "/api/machines/register/",
            &staff,
            &json!({"device_id": busy.device_id, "outlet_id": shop, "name": "Machine A"}),
        )
        .await;
    assert_eq!(machine.status, 201, "{}", machine.body);
    assert_eq!(machine.body["device_id"], busy.device_id);
    assert_eq!(machine.body["outlet"], shop);
    assert_eq!(machine.body["outlet_name"], "Shop");
    assert_eq!(machine.body["status"], "online");

    let unregistered = app.staff_get("/api/machines/unregistered/", &staff).await;
    assert_eq!(unregistered.body["count"], 0);

    let device = app
        .staff_get(&format!("/api/devices/{}/", busy.device_id), &staff)
        .await;
    assert_eq!(device.body["assigned"], true);
    assert_eq!(device.body["bound_machine"]["name"], "Machine A");
    assert_eq!(device.body["bound_machine"]["outlet_name"], "Shop");

    // Registering a bound device again is a conflict.
    app.staff_post(
        "/api/machines/register/",
        &staff,
        &json!({"device_id": busy.device_id, "name": "Machine B"}),
    )
    .await
    .assert_error(409, "device_assigned_elsewhere");
    let by_outlet = app
        .staff_get(&format!("/api/machines/?outlet_id={shop}"), &staff)
        .await;
    assert_eq!(by_outlet.body["count"], 1);
    let by_device = app
        .staff_get(
            &format!("/api/machines/?device_id={}", quiet.device_id),
            &staff,
        )
        .await;
    assert_eq!(by_device.body["count"], 0);
}

#[tokio::test]
async fn moving_a_device_needs_move_and_keeps_the_binding_history() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let device = app.handshake("AA:BB:CC:00:00:03").await;
    let mut machines = Vec::new();
    for name in ["First", "Second"] {
        let m = app
            .staff_post(
                "/api/machines/",
                &staff,
                &json!({"name": name, "outlet": null}),
            )
            .await;
        assert_eq!(m.status, 201, "{}", m.body);
        assert!(m.body["machine_code"].as_str().unwrap().starts_with("M-"));
        machines.push(m.body["id"].as_i64().unwrap());
    }
    let (first, second) = (machines[0], machines[1]);
    let assigned = app
        .staff_post(
            &format!("/api/machines/{first}/assign/"),
            &staff,
            &json!({"device_id": device.device_id}),
        )
        .await;
    assert_eq!(assigned.status, 200, "{}", assigned.body);
    assert_eq!(assigned.body["device_id"], device.device_id);

    app.staff_post(
        &format!("/api/machines/{second}/assign/"),
        &staff,
        &json!({"device_id": device.device_id}),
    )
    .await
    .assert_error(409, "device_assigned_elsewhere");
    let moved = app
        .staff_post(
            &format!("/api/machines/{second}/assign/"),
            &staff,
            &json!({"device_id": device.device_id, "move": true}),
        )
        .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    let first_now = app
        .staff_get(&format!("/api/machines/{first}/"), &staff)
        .await;
    assert_eq!(first_now.body["device_id"], Value::Null);

    let history = app
        .staff_get(&format!("/api/machines/{first}/devices/"), &staff)
        .await;
    assert_eq!(history.body["count"], 1);
    assert_eq!(history.body["results"][0]["device_id"], device.device_id);
    assert!(history.body["results"][0]["unassigned_at"].is_string());
    let history = app
        .staff_get(&format!("/api/machines/{second}/devices/"), &staff)
        .await;
    assert_eq!(history.body["results"][0]["unassigned_at"], Value::Null);

    // Deleting a machine that carries a device needs force; unassign frees it.
    app.staff_call(
        Method::DELETE,
        &format!("/api/machines/{second}/"),
        Some(&staff.token),
        None,
    )
    .await
    .assert_error(409, "machine_has_device");
    let freed = app
        .staff_post(
            &format!("/api/machines/{second}/unassign/"),
            &staff,
            &json!({}),
        )
        .await;
    assert_eq!(freed.status, 200, "{}", freed.body);
    assert_eq!(freed.body["device_id"], Value::Null);
    let device_now = app
        .staff_get(&format!("/api/devices/{}/", device.device_id), &staff)
        .await;
    assert_eq!(device_now.body["assigned"], false);
}

#[tokio::test]
async fn outlets_with_machines_need_force_and_telemetry_is_never_orphaned() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let shop = outlet(&app, &staff, "Shop").await;
    let m = app
        .staff_post(
            "/api/machines/",
            &staff,
            &json!({"name": "M", "outlet": shop, "machine_code": "CH1/001/2024"}),
        )
        .await;
    assert_eq!(m.status, 201, "{}", m.body);
    let machine = m.body["id"].as_i64().unwrap();
    app.staff_call(
        Method::DELETE,
        &format!("/api/outlets/{shop}/"),
        Some(&staff.token),
        None,
    )
    .await
    .assert_error(409, "outlet_has_machines");
    let device = app.handshake("AA:BB:CC:00:00:04").await;
    app.staff_post(
        &format!("/api/machines/{machine}/assign/"),
        &staff,
        &json!({"device_id": device.device_id}),
    )
    .await;
    let ack = app
        .post_event(
            &device,
            "e-1",
            json!({"ts": chrono::Utc::now().to_rfc3339()}),
        )
        .await;
    assert_eq!(ack.status, 200);
    app.staff_call(
        Method::DELETE,
        &format!("/api/outlets/{shop}/?force=true"),
        Some(&staff.token),
        None,
    )
    .await
    .assert_error(409, "outlet_has_telemetry");
    app.staff_call(
        Method::DELETE,
        &format!("/api/machines/{machine}/?force=true"),
        Some(&staff.token),
        None,
    )
    .await
    .assert_error(409, "machine_has_telemetry");
    app.staff_call(
        Method::DELETE,
        &format!("/api/devices/{}/", device.device_id),
        Some(&staff.token),
        None,
    )
    .await
    .assert_error(409, "device_has_telemetry");

    let events = app
        .staff_get(&format!("/api/events/?machine_id={machine}"), &staff)
        .await;
    assert_eq!(events.body["count"], 1, "{}", events.body);
    assert_eq!(events.body["results"][0]["outlet_id"], shop);
}

#[tokio::test]
async fn device_lists_show_status_counters_and_notes() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let device = app.handshake("AA:BB:CC:00:00:05").await;
    app.handshake("AA:BB:CC:00:00:06").await;
    let ack = app
        .post_event(
            &device,
            "e-1",
            json!({"ts": chrono::Utc::now().to_rfc3339(), "current_counters": {"basic": 3, "standard": 2, "premium": 1}}),
        )
        .await;
    assert_eq!(ack.status, 200);
    let all = app.staff_get("/api/devices/all/", &staff).await;
    assert_eq!(all.body["count"], 2);
    let online = app.staff_get("/api/devices/online/", &staff).await;
    assert_eq!(online.body["count"], 1, "{}", online.body);
    assert_eq!(online.body["results"][0]["counts"]["basic"], 3);
    let data = app.staff_get("/api/devices-data/", &staff).await;
    assert_eq!(data.body["totals"]["devices"], 2);
    assert_eq!(data.body["totals"]["online"], 1);
    assert_eq!(data.body["totals"]["counts"]["premium"], 1);
    assert_eq!(data.body["count"], 2);

    let patched = app
        .staff_call(
            Method::PATCH,
            &format!("/api/devices/{}/", device.device_id),
            Some(&staff.token),
            Some(&json!({"notes": "behind the counter"})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.body["notes"], "behind the counter");

    let summary = app
        .staff_get(
            &format!("/api/telemetry/summary/?device_id={}", device.device_id),
            &staff,
        )
        .await;
    assert_eq!(summary.status, 200, "{}", summary.body);
    assert_eq!(summary.body["mode"], "BASIC");
    assert_eq!(summary.body["device"]["counts"]["standard"], 2);
    let latest = app
        .staff_get(
            &format!("/api/telemetry/latest/?device_id={}", device.device_id),
            &staff,
        )
        .await;
    assert_eq!(latest.body["event"]["event_id"], "e-1");

    let reset = app
        .staff_post(
            &format!("/api/devices/{}/reset-token/", device.device_id),
            &staff,
            &json!({}),
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    let refused = app.post_event(&device, "e-2", json!({})).await;
    refused.assert_error(401, "invalid_token");
    app.staff_get("/api/devices/nope/", &staff)
        .await
        .assert_error(404, "device_not_found");
}
