//! `POST /api/device/events/` and its `/api/events/` alias.

use futures_util_free::join_all;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;

use ozone::db::entities::{device_status, telemetry_event};

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

async fn stored_events(app: &TestApp) -> Vec<telemetry_event::Model> {
    telemetry_event::Entity::find().all(app.db()).await.unwrap()
}

async fn status_of(app: &TestApp, device_id: &str) -> device_status::Model {
    let device = ozone::domain::devices::find_by_device_id(app.db(), device_id)
        .await
        .unwrap();
    device_status::Entity::find_by_id(device.id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_acknowledged_and_stored() {
    let app = spawn_app().await;
    let device = app.handshake("EC:E3:34:46:2B:C0").await;
    let reply = app
        .post_event(&device, "esp32-001-0000000123", json!({"counter": 124}))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        json!({"ack": true, "event_id": "esp32-001-0000000123"})
    );
    let events = stored_events(&app).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.event, "treatment");
    assert_eq!(e.treatment.as_deref(), Some("BASIC"));
    assert_eq!(e.counter, Some(124));
    assert_eq!(e.occurred_at.to_rfc3339(), "2025-09-16T12:34:56+00:00");
    assert_eq!(e.occurred_epoch, e.occurred_at.timestamp());
    assert_eq!(
        e.machine_id, None,
        "unassigned devices still count treatments"
    );
    let payload = e.payload.as_ref().expect("the device's body is kept");
    assert_eq!(payload["event_id"], "esp32-001-0000000123");
    assert_eq!(payload["firmware"], "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_alias_and_trailing_slash_are_optional() {
    let app = spawn_app().await;
    let device = app.handshake("EC:E3:34:46:2B:C0").await;
    for (i, path) in [
        "/api/device/events/",
        "/api/device/events",
        "/api/events/",
        "/api/events",
    ]
    .iter()
    .enumerate()
    {
        let reply = app
            .post_json(
                path,
                Some(&device.token),
                &json!({"device_id": device.device_id, "event_id": format!("e{i}"), "event": "treatment", "treatment": "PREMIUM", "counter": i}),
            )
            .await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    assert_eq!(stored_events(&app).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_is_acknowledged_but_stored_once() {
    let app = spawn_app().await;
    let device = app.handshake("EC:E3:34:46:2B:C0").await;
    let first = app
        .post_event(
            &device,
            "dup-1",
            json!({"current_counters": {"basic": 5, "standard": 0, "premium": 0}}),
        )
        .await;
    let second = app
        .post_event(
            &device,
            "dup-1",
            json!({"current_counters": {"basic": 99, "standard": 0, "premium": 0}}),
        )
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 200);
    assert_eq!(first.body, second.body);
    assert_eq!(stored_events(&app).await.len(), 1);
    assert_eq!(
        status_of(&app, &device.device_id).await.current_count_basic,
        5,
        "a duplicate changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_from_two_devices_is_two_events() {
    let app = spawn_app().await;
    let a = app.handshake("EC:E3:34:46:2B:C0").await;
    let b = app.handshake("EC:E3:34:46:2B:C1").await;
    assert_eq!(app.post_event(&a, "seq-1", json!({})).await.status, 200);
    assert_eq!(app.post_event(&b, "seq-1", json!({})).await.status, 200);
    assert_eq!(stored_events(&app).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_need_a_valid_token_of_the_same_device() {
    let app = spawn_app().await;
    let a = app.handshake("EC:E3:34:46:2B:C0").await;
    let b = app.handshake("EC:E3:34:46:2B:C1").await;
    let body = json!({"device_id": b.device_id, "event_id": "x", "treatment": "BASIC"});
    app.post_json("/api/device/events/", None, &body)
        .await
        .assert_error(401, "missing_token");
    app.post_json("/api/device/events/", Some("0123abcd"), &body)
        .await
        .assert_error(401, "invalid_token");
    app.post_json("/api/device/events/", Some(&a.token), &body)
        .await
        .assert_error(401, "device_mismatch");
    assert!(stored_events(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_clear_client_errors() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let path = "/api/device/events/";
    app.post_raw(path, Some(&d.token), "application/json", "{not json")
        .await
        .assert_error(400, "malformed_json");
    app.post_raw(path, Some(&d.token), "application/json", "")
        .await
        .assert_error(400, "empty_body");
    app.post_raw(path, Some(&d.token), "application/json", "[1,2]")
        .await
        .assert_error(422, "invalid_body");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "treatment": "BASIC", "counter": "many"}),
    )
    .await
    .assert_error(422, "invalid_body");
    app.post_json(path, Some(&d.token), &json!({"treatment": "BASIC"}))
        .await
        .assert_error(422, "missing_event_id");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "treatment": "DELUXE"}),
    )
    .await
    .assert_error(422, "invalid_treatment");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "event": "explosion"}),
    )
    .await
    .assert_error(422, "invalid_event");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "event": "treatment"}),
    )
    .await
    .assert_error(422, "missing_treatment");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "treatment": "BASIC", "counter": -1}),
    )
    .await
    .assert_error(422, "invalid_counter");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "x".repeat(500), "treatment": "BASIC"}),
    )
    .await
    .assert_error(422, "invalid_event_id");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "treatment": "BASIC", "current_counters": {"basic": -3}}),
    )
    .await
    .assert_error(422, "invalid_counters");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "treatment": "BASIC", "current_counters": [1, 2, 3]}),
    )
    .await
    .assert_error(422, "invalid_body");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a\u{0}b", "treatment": "BASIC"}),
    )
    .await
    .assert_error(422, "invalid_body");
    app.post_json(
        path,
        Some(&d.token),
        &json!({"event_id": "a", "treatment": "BASIC", "note": {"deep": ["x\u{0}"]}}),
    )
    .await
    .assert_error(422, "invalid_body");
    assert!(stored_events(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_get_413() {
    let app = spawn_app_with(|s| s.body_limit_bytes = 4096).await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let big = json!({"event_id": "big", "treatment": "BASIC", "pad": "x".repeat(10_000)});
    app.post_json("/api/device/events/", Some(&d.token), &big)
        .await
        .assert_error(413, "payload_too_large");
    app.post_raw(
        "/api/handshake/",
        None,
        "application/json",
        "x".repeat(10_000),
    )
    .await
    .assert_error(413, "payload_too_large");
    assert!(stored_events(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_counters_are_the_devices_truth() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    app.post_event(
        &d,
        "c1",
        json!({"current_counters": {"basic": 10, "standard": 4, "premium": 2}}),
    )
    .await;
    let status = status_of(&app, &d.device_id).await;
    assert_eq!(
        (
            status.current_count_basic,
            status.current_count_standard,
            status.current_count_premium
        ),
        (10, 4, 2)
    );
    // Lower values are accepted too: the device knows its counters (e.g. after a local reset).
    app.post_event(
        &d,
        "c2",
        json!({"current_counters": {"basic": 1, "standard": 0, "premium": 0}}),
    )
    .await;
    let status = status_of(&app, &d.device_id).await;
    assert_eq!(
        (
            status.current_count_basic,
            status.current_count_standard,
            status.current_count_premium
        ),
        (1, 0, 0)
    );
    // Without current_counters the status counters stay as they are.
    app.post_event(&d, "c3", json!({})).await;
    assert_eq!(status_of(&app, &d.device_id).await.current_count_basic, 1);
    assert!(status_of(&app, &d.device_id).await.last_seen.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_device_time_is_kept_but_the_event_is_dated_on_arrival() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let before = chrono::Utc::now();
    app.post_event(&d, "t-1970", json!({"ts": "1970-01-01T00:00:07Z"}))
        .await;
    app.post_event(&d, "t-future", json!({"ts": "2999-01-01T00:00:00Z"}))
        .await;
    app.post_event(&d, "t-none", json!({"ts": null})).await;
    app.post_event(&d, "t-garbage", json!({"ts": "soon"})).await;
    let after = chrono::Utc::now();
    for e in stored_events(&app).await {
        assert!(
            e.occurred_at >= before - chrono::Duration::seconds(1) && e.occurred_at <= after,
            "{}: {}",
            e.event_id,
            e.occurred_at
        );
    }
    let e = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::EventId.eq("t-1970"))
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.device_timestamp.as_deref(), Some("1970-01-01T00:00:07Z"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_attributed_to_the_machine_bound_when_they_happened() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let before = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    app.post_event(&d, "before", json!({"ts": before})).await;
    app.admin(&[
        "device",
        "assign",
        &d.device_id,
        "--machine",
        "M-A",
        "--outlet",
        "North",
    ]);
    app.post_event(&d, "on-a", json!({"ts": null})).await;
    let while_on_a = chrono::Utc::now().to_rfc3339();
    app.admin(&[
        "device",
        "assign",
        &d.device_id,
        "--machine",
        "M-B",
        "--outlet",
        "South",
    ]);
    app.post_event(&d, "on-b", json!({"ts": null})).await;
    // Delivered after the move, but it happened while the device was on M-A.
    app.post_event(&d, "late-a", json!({"ts": while_on_a}))
        .await;
    let events = stored_events(&app).await;
    let by_id = |id: &str| events.iter().find(|e| e.event_id == id).unwrap().clone();
    assert_eq!(
        by_id("before").machine_id,
        None,
        "no machine carried the device then"
    );
    let a = by_id("on-a");
    let b = by_id("on-b");
    assert!(a.machine_id.is_some() && b.machine_id.is_some());
    assert_ne!(
        a.machine_id, b.machine_id,
        "moving a device does not move its history"
    );
    assert_ne!(a.outlet_id, b.outlet_id);
    assert_eq!(by_id("late-a").machine_id, a.machine_id);
    assert!(a.outlet_id.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_are_all_stored_durably() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let d2 = app.handshake("EC:E3:34:46:2B:C1").await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let http = app.http.clone();
        let url = app.url("/api/device/events/");
        let (device_id, token) = if i % 2 == 0 {
            (d.device_id.clone(), d.token.clone())
        } else {
            (d2.device_id.clone(), d2.token.clone())
        };
        tasks.push(tokio::spawn(async move {
            // Every event is sent twice: the duplicate must be acknowledged the same way.
            let body = json!({"device_id": device_id, "event_id": format!("c-{}", i / 2), "treatment": "STANDARD", "counter": i});
            let mut statuses = Vec::new();
            for _ in 0..2 {
                let resp = http.post(&url).bearer_auth(&token).json(&body).send().await.unwrap();
                statuses.push(resp.status().as_u16());
            }
            statuses
        }));
    }
    for statuses in join_all(tasks).await {
        assert_eq!(statuses, vec![200, 200]);
    }
    let stored = telemetry_event::Entity::find()
        .count(app.db())
        .await
        .unwrap();
    assert_eq!(stored, 300, "150 event ids per device, each stored once");
}

/// Tiny `join_all` so the tests need no extra crate.
mod futures_util_free {
    pub async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.expect("task"));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_of_many_devices_are_recorded_in_one_statement() {
    use ozone::domain::{events::Counters, status};
    let app = spawn_app().await;
    let a = app.handshake("EC:E3:34:46:2B:C0").await;
    let b = app.handshake("EC:E3:34:46:2B:C1").await;
    let c = app.handshake("EC:E3:34:46:2B:C2").await;
    app.post_event(
        &b,
        "b1",
        json!({"current_counters": {"basic": 4, "standard": 5, "premium": 6}}),
    )
    .await;
    let pk = |d: &crate::helpers::Device| {
        let id = d.device_id.clone();
        let db = app.db().clone();
        async move {
            ozone::domain::devices::find_by_device_id(&db, &id)
                .await
                .unwrap()
                .id
        }
    };
    let (pa, pb, pc) = (pk(&a).await, pk(&b).await, pk(&c).await);
    let with_counters = status::StatusReport {
        counters: Some(Counters {
            basic: 1,
            standard: 2,
            premium: 3,
        }),
        firmware: Some("9.9.9".into()),
        ..Default::default()
    };
    let wifi_only = status::StatusReport {
        wifi_connected: Some(true),
        uptime_seconds: Some(77),
        ..Default::default()
    };
    let nothing = status::StatusReport::default();
    let now = chrono::Utc::now();
    let update = |report: &status::StatusReport| {
        let mut u = status::DeviceUpdate::default();
        u.seen_at(now);
        u.report(report, status::Stamp::of(now, now));
        u
    };
    let txn = app.state.db.begin_write().await.unwrap();
    let writes = status::record_many(
        &*txn,
        &[
            (pa, update(&with_counters)),
            (pb, update(&wifi_only)),
            (pc, update(&nothing)),
        ],
        now,
        &Default::default(),
        app.state.db.statement_bytes(),
    )
    .await
    .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(writes.firmware_of(pa), Some("9.9.9"));
    assert_eq!(
        writes.firmware_of(pb),
        None,
        "no firmware reported, none written"
    );

    let mut rows = Vec::new();
    for id in [pa, pb, pc] {
        rows.push(
            device_status::Entity::find_by_id(id)
                .one(app.db())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (ra, rb, rc) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(
        (
            ra.current_count_basic,
            ra.current_count_standard,
            ra.current_count_premium
        ),
        (1, 2, 3)
    );
    assert_eq!(
        (
            rb.current_count_basic,
            rb.current_count_standard,
            rb.current_count_premium
        ),
        (4, 5, 6),
        "untouched without counters"
    );
    assert!(rb.wifi_connected);
    assert_eq!(rb.uptime_seconds, Some(77));
    assert!(!rc.wifi_connected);
    for r in [ra, rb, rc] {
        assert_eq!(
            r.last_seen.map(|t| t.timestamp_micros()),
            Some(now.timestamp_micros())
        );
    }
    let device_a = ozone::domain::devices::find_by_device_id(app.db(), &a.device_id)
        .await
        .unwrap();
    assert_eq!(device_a.firmware, "9.9.9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_is_never_deleted_with_its_device() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    app.post_event(&d, "kept", json!({})).await;
    let device = ozone::domain::devices::find_by_device_id(app.db(), &d.device_id)
        .await
        .unwrap();
    let deleted = ozone::db::entities::device::Entity::delete_by_id(device.id)
        .exec(app.db())
        .await;
    assert!(
        deleted.is_err(),
        "the schema refuses to drop a device's history"
    );
    assert_eq!(stored_events(&app).await.len(), 1);
}
