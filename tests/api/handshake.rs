//! `POST /api/handshake/`: registration, MAC normalisation and the re-handshake rules.

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_handshake_registers_an_unassigned_device() {
    let app = spawn_app().await;
    let reply = app
        .post_json(
            "/api/handshake/",
            None,
            &json!({"mac": "EC:E3:34:46:2B:C0", "firmware": "1.0.0"}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["device_id"], "EC:E3:34:46:2B:C0");
    assert_eq!(reply.body["assigned"], false);
    let token = reply.body["token"].as_str().unwrap();
    assert_eq!(token.len(), 64, "256-bit token in hex");
    assert_eq!(
        reply.body.as_object().unwrap().len(),
        3,
        "exactly the documented fields"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_accepts_a_form_encoded_body() {
    let app = spawn_app().await;
    let reply = app
        .post_raw(
            "/api/handshake",
            None,
            "application/x-www-form-urlencoded",
            "mac=ec%3Ae3%3A34%3A46%3A2b%3Ac0&firmware=2.1.0",
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["device_id"], "EC:E3:34:46:2B:C0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mac_spellings_normalise_to_one_device() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for mac in [
        "ec:e3:34:46:2b:c0",
        "EC-E3-34-46-2B-C0",
        "ece334462bc0",
        "EC:E3:34:46:2B:C0",
    ] {
        ids.push(app.handshake(mac).await.device_id);
    }
    assert!(ids.iter().all(|id| id == "EC:E3:34:46:2B:C0"), "{ids:?}");
    use sea_orm::{EntityTrait, PaginatorTrait};
    let devices = ozone::db::entities::device::Entity::find()
        .count(app.db())
        .await
        .unwrap();
    assert_eq!(devices, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_missing_mac_is_refused_with_a_clear_error() {
    let app = spawn_app().await;
    app.post_json("/api/handshake/", None, &json!({"mac": "not-a-mac"}))
        .await
        .assert_error(422, "invalid_mac");
    app.post_json("/api/handshake/", None, &json!({"firmware": "1.0"}))
        .await
        .assert_error(422, "missing_field");
    app.post_raw("/api/handshake/", None, "application/json", "{\"mac\":")
        .await
        .assert_error(400, "malformed_json");
    app.post_raw(
        "/api/handshake/",
        None,
        "application/x-www-form-urlencoded",
        "mac=%ZZ&&firmware",
    )
    .await
    .assert_error(422, "invalid_mac");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehandshake_with_the_current_token_keeps_it() {
    let app = spawn_app().await;
    let device = app.handshake("EC:E3:34:46:2B:C0").await;
    let reply = app
        .post_json(
            "/api/handshake/",
            Some(&device.token),
            &json!({"mac": "EC:E3:34:46:2B:C0", "firmware": "1.0.1"}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["token"], device.token.as_str());
    assert_eq!(app.post_event(&device, "e-1", json!({})).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehandshake_without_the_token_rotates_it_and_the_old_one_stops_working() {
    let app = spawn_app().await;
    let old = app.handshake("EC:E3:34:46:2B:C0").await;
    assert_eq!(app.post_event(&old, "e-1", json!({})).await.status, 200);
    let new = app.handshake("EC:E3:34:46:2B:C0").await;
    assert_eq!(new.device_id, old.device_id);
    assert_ne!(new.token, old.token);
    app.post_event(&old, "e-2", json!({}))
        .await
        .assert_error(401, "invalid_token");
    assert_eq!(app.post_event(&new, "e-3", json!({})).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_token_rotation_for_assigned_devices_until_reset() {
    let app = spawn_app_with(|s| s.strict_handshake = true).await;
    let device = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let body = json!({"mac": "EC:E3:34:46:2B:C0"});
    app.post_json("/api/handshake/", None, &body)
        .await
        .assert_error(403, "handshake_refused");
    // The current token still works, and still re-handshakes.
    let same = app
        .post_json("/api/handshake/", Some(&device.token), &body)
        .await;
    assert_eq!(same.body["token"], device.token.as_str());
    assert_eq!(same.body["assigned"], true);
    app.admin(&["device", "reset-token", &device.device_id]);
    let fresh = app.post_json("/api/handshake/", None, &body).await;
    assert_eq!(fresh.status, 200);
    assert_ne!(fresh.body["token"], device.token.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_reports_assignment() {
    let app = spawn_app().await;
    let device = app
        .assigned_device("EC:E3:34:46:2B:C0", "CH1/027/2024")
        .await;
    let reply = app
        .post_json(
            "/api/handshake/",
            Some(&device.token),
            &json!({"mac": "ece334462bc0"}),
        )
        .await;
    assert_eq!(reply.body["assigned"], true);
}
