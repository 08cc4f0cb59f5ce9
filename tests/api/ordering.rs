//! Device state, attribution and identities under late, repeated and hostile input: reports
//! apply only when newer, events belong to the outlet of their own time, numbers and ids are
//! kept exactly, command edges, and the legacy trust settings.

use chrono::{Duration, Utc};
use sea_orm::{
    sea_query::Expr, ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait,
    QueryFilter,
};
use serde_json::json;

use ozone::{
    db::entities::{command, device_status, telemetry_event},
    domain::{
        commands::{self, NewCommand},
        devices,
        events::{self, LegacyReading},
        trust::LegacyIot,
    },
};

use crate::helpers::{spawn_app, spawn_app_with, Device, TestApp};

async fn status_of(app: &TestApp, device: &Device) -> device_status::Model {
    let pk = devices::find_by_device_id(app.db(), &device.device_id)
        .await
        .unwrap()
        .id;
    device_status::Entity::find_by_id(pk)
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
}

fn basic(s: &device_status::Model) -> i64 {
    s.current_count_basic
}

fn counters(basic: i64) -> serde_json::Value {
    json!({"basic": basic, "standard": 0, "premium": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_older_event_does_not_roll_counters_back() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let now = Utc::now();
    let r = app
        .post_event(
            &d,
            "new",
            json!({"ts": now.to_rfc3339(), "current_counters": counters(6)}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = app
        .post_event(
            &d,
            "buffered",
            json!({"ts": (now - Duration::minutes(10)).to_rfc3339(), "current_counters": counters(5)}),
        )
        .await;
    assert_eq!(r.status, 200, "the buffered event is still stored");
    assert_eq!(basic(&status_of(&app, &d).await), 6);
    let r = app
        .post_event(
            &d,
            "newer",
            json!({"ts": Utc::now().to_rfc3339(), "current_counters": counters(7)}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        basic(&status_of(&app, &d).await),
        7,
        "newer reports still apply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_event_from_before_a_reset_does_not_undo_it() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let before_reset = Utc::now();
    app.post_event(
        &d,
        "e1",
        json!({"ts": before_reset.to_rfc3339(), "current_counters": counters(6)}),
    )
    .await;
    let reset = app.send_command(&d, "RESET", &[]);
    app.poll(&d).await;
    let r = app
        .report(
            &d,
            reset["command_id"].as_str().unwrap(),
            json!({"success": true}),
        )
        .await;
    assert_eq!(r.body["status"], "executed");
    assert_eq!(basic(&status_of(&app, &d).await), 0);
    let r = app
        .post_event(
            &d,
            "buffered",
            json!({"ts": before_reset.to_rfc3339(), "current_counters": counters(7)}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        basic(&status_of(&app, &d).await),
        0,
        "an event made before the reset cannot bring counters back"
    );
    assert!(status_of(&app, &d).await.reset_at.is_some());
    app.post_event(
        &d,
        "after",
        json!({"ts": Utc::now().to_rfc3339(), "current_counters": counters(1)}),
    )
    .await;
    assert_eq!(basic(&status_of(&app, &d).await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_from_an_unassigned_device_still_counts_as_contact() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    app.poll(&d).await.assert_error(401, "device_unassigned");
    app.state.ingestor.flush_contacts().await;
    assert!(status_of(&app, &d).await.last_poll.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_are_recorded_without_a_transaction_each_and_survive_a_clean_shutdown() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    for _ in 0..20 {
        assert_eq!(app.poll(&d).await.status, 200);
    }
    let polled = Utc::now();
    let stopped = app.stop().await;
    let db = sea_orm::Database::connect(stopped.database_url.as_str())
        .await
        .unwrap();
    let status = device_status::Entity::find()
        .one(&db)
        .await
        .unwrap()
        .unwrap();
    let last_poll = status
        .last_poll
        .expect("the last poll was written before exit");
    assert!(last_poll <= polled && polled - last_poll < Duration::seconds(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_machine_to_another_outlet_keeps_its_past_in_the_old_one() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    app.admin(&[
        "device",
        "assign",
        &d.device_id,
        "--machine",
        "M-1",
        "--outlet",
        "North",
    ]);
    // Made in North, delivered only after the move.
    let before_move = Utc::now();
    app.post_event(&d, "in-north", json!({"ts": Utc::now().to_rfc3339()}))
        .await;
    app.admin(&[
        "device",
        "assign",
        &d.device_id,
        "--machine",
        "M-1",
        "--outlet",
        "South",
    ]);
    app.post_event(&d, "in-south", json!({"ts": Utc::now().to_rfc3339()}))
        .await;
    app.post_event(&d, "late", json!({"ts": before_move.to_rfc3339()}))
        .await;
    let events = telemetry_event::Entity::find().all(app.db()).await.unwrap();
    let outlet = |id: &str| events.iter().find(|e| e.event_id == id).unwrap().outlet_id;
    assert!(outlet("in-north").is_some() && outlet("in-south").is_some());
    assert_ne!(outlet("in-north"), outlet("in-south"));
    assert_eq!(
        outlet("late"),
        outlet("in-north"),
        "an event made before the move belongs to the old outlet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_the_store_cannot_hold_are_refused_and_their_neighbours_stored() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let body = |id: &str, extra: &str| {
        format!(
            r#"{{"device_id": "{}", "event_id": "{id}", "event": "treatment", "treatment": "BASIC", "extra": {extra}}}"#,
            d.device_id
        )
    };
    let post = |id: &str, extra: &str| {
        app.post_raw(
            "/api/device/events/",
            Some(&d.token),
            "application/json",
            body(id, extra),
        )
    };
    // Posted at once, so that they share a commit.
    let (ok1, tiny, ok2, ok3) = tokio::join!(
        post("ok-1", "1"),
        post("tiny", "[1e-20000]"),
        post("ok-2", r#"{"x": 2.5e10}"#),
        post("ok-3", "-0.0"),
    );
    tiny.assert_error(422, "number_out_of_range");
    for ok in [ok1, ok2, ok3] {
        assert_eq!(ok.status, 200, "{}", ok.body);
    }
    let huge = app
        .post_raw(
            "/api/device/events/",
            Some(&d.token),
            "application/json",
            body("huge", "1e400"),
        )
        .await;
    assert!(
        (400..500).contains(&huge.status),
        "1e400 is refused as client input: {}",
        huge.body
    );
    let stored = telemetry_event::Entity::find()
        .count(app.db())
        .await
        .unwrap();
    assert_eq!(stored, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_event_ids_beyond_64_bits_stay_distinct() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    for id in ["123456789012345678901", "123456789012345678902"] {
        let body = format!(
            r#"{{"device_id": "{}", "event_id": {id}, "event": "treatment", "treatment": "BASIC"}}"#,
            d.device_id
        );
        let r = app
            .post_raw(
                "/api/device/events/",
                Some(&d.token),
                "application/json",
                body,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["event_id"], id);
    }
    let ids: Vec<String> = telemetry_event::Entity::find()
        .all(app.db())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_clockless_legacy_readings_minutes_apart_are_distinct_and_resends_are_not() {
    let app = spawn_app().await;
    let reading = || LegacyReading {
        mode: Some("BASIC".into()),
        macaddr: Some("EC:E3:34:46:2B:C0".into()),
        count1: Some("3".into()),
        timestamp: Some("1970-01-01 00:00:05".into()),
        ..Default::default()
    };
    let state = &app.state;
    let ingest = |at| {
        events::ingest_legacy(
            &state.db,
            &state.ingestor,
            &state.legacy,
            None,
            reading(),
            at,
        )
    };
    let t0 = Utc::now();
    assert_eq!(ingest(t0).await.unwrap(), events::Ingested::Stored);
    assert_eq!(
        ingest(t0 + Duration::seconds(20)).await.unwrap(),
        events::Ingested::Duplicate,
        "a resend seconds later is the same reading"
    );
    assert_eq!(
        ingest(t0 + Duration::minutes(5)).await.unwrap(),
        events::Ingested::Stored,
        "after a reboot, the same uptime and counts minutes later are a new reading"
    );
    assert_eq!(
        ingest(t0 + Duration::minutes(10)).await.unwrap(),
        events::Ingested::Stored
    );
    // A reading with a real clock is identified by its content alone.
    let timed = || LegacyReading {
        timestamp: Some("2025-09-16 12:00:00".into()),
        ..reading()
    };
    let ingest_timed =
        |at| events::ingest_legacy(&state.db, &state.ingestor, &state.legacy, None, timed(), at);
    assert_eq!(ingest_timed(t0).await.unwrap(), events::Ingested::Stored);
    assert_eq!(
        ingest_timed(t0 + Duration::hours(1)).await.unwrap(),
        events::Ingested::Duplicate
    );
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
async fn a_reset_result_after_expiry_is_recorded_as_executed_late() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    app.post_event(
        &d,
        "e1",
        json!({"ts": Utc::now().to_rfc3339(), "current_counters": counters(4)}),
    )
    .await;
    let reset = app.send_command(&d, "RESET", &["--expires-in", "60"]);
    let cid = reset["command_id"].as_str().unwrap();
    assert_eq!(
        app.poll(&d).await.body["commands"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Its lifetime ends while the device executes it.
    command::Entity::update_many()
        .col_expr(
            command::Column::ExpiresAt,
            Expr::value(Utc::now() - Duration::seconds(1)),
        )
        .filter(command::Column::CommandId.eq(cid))
        .exec(app.db())
        .await
        .unwrap();
    let r = app.report(&d, cid, json!({"success": true})).await;
    assert_eq!(r.body["status"], "executed");
    let row = command_row(&app, cid).await;
    assert!(row.late);
    assert_eq!(basic(&status_of(&app, &d).await), 0);
    let resets = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::Event.eq("reset"))
        .count(app.db())
        .await
        .unwrap();
    assert_eq!(resets, 1, "the reset is in the machine's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_its_lifetime_counted_from_the_retry() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    let created = app.send_command(&d, "REBOOT", &["--expires-in", "60"]);
    let cid = created["command_id"].as_str().unwrap();
    // Created an hour ago, failed since.
    let row = command_row(&app, cid).await;
    let mut old: command::ActiveModel = row.clone().into();
    old.created_at = Set(row.created_at - Duration::hours(1));
    old.status = Set("failed".into());
    old.update(app.db()).await.unwrap();
    for _ in 0..2 {
        let retried = commands::retry(&app.state.db, &app.state.notifier, cid, 5)
            .await
            .unwrap();
        let left = retried.expires_at.unwrap() - Utc::now();
        assert!(
            left <= Duration::seconds(60) && left > Duration::seconds(50),
            "expires in {left}"
        );
        command::Entity::update_many()
            .col_expr(command::Column::Status, Expr::value("failed"))
            .filter(command::Column::CommandId.eq(cid))
            .exec(app.db())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_hands_out_at_most_the_limit_most_urgent_first() {
    let app = spawn_app_with(|s| s.poll_max_commands = 20).await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    for i in 0..25 {
        commands::create(
            &app.state.db,
            &app.state.notifier,
            &d.device_id,
            NewCommand {
                command_type: "PING".into(),
                priority: i,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let first = app.poll(&d).await;
    let first: Vec<i64> = first.body["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["priority"].as_i64().unwrap())
        .collect();
    assert_eq!(first, (5..25).rev().collect::<Vec<i64>>());
    let second = app.poll(&d).await;
    assert_eq!(second.body["commands"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_is_never_cached_again_by_a_racing_request() {
    let app = spawn_app().await;
    let mut d = app.handshake("EC:E3:34:46:2B:C0").await;
    for round in 0..10 {
        // Cached now.
        assert_eq!(
            app.post_event(&d, &format!("r{round}"), json!({}))
                .await
                .status,
            200
        );
        let old = d.token.clone();
        let old_device = Device {
            device_id: d.device_id.clone(),
            token: old.clone(),
        };
        let rotate = json!({"mac": d.device_id});
        let racing = format!("race{round}");
        let (rotated, _) = tokio::join!(
            app.post_json("/api/handshake/", None, &rotate),
            app.post_event(&old_device, &racing, json!({})),
        );
        assert_eq!(rotated.status, 200);
        d.token = rotated.body["token"].as_str().unwrap().to_owned();
        app.post_event(&old_device, &format!("after{round}"), json!({}))
            .await
            .assert_error(401, "invalid_token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_form_can_be_turned_off() {
    let app = spawn_app_with(|s| s.legacy_iot = LegacyIot::Off).await;
    app.post_raw(
        "/api/iot/",
        None,
        "application/x-www-form-urlencoded",
        "mode=BASIC&macaddr=EC:E3:34:46:2B:C0&count1=1",
    )
    .await
    .assert_error(403, "legacy_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_only_keeps_the_legacy_form_away_from_assigned_devices() {
    let app = spawn_app_with(|s| s.legacy_iot = LegacyIot::UnassignedOnly).await;
    let form = |mac: &str| format!("mode=BASIC&macaddr={mac}&count1=9");
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    app.post_raw(
        "/api/iot/",
        None,
        "application/x-www-form-urlencoded",
        form(&d.device_id),
    )
    .await
    .assert_error(403, "device_assigned");
    assert_eq!(basic(&status_of(&app, &d).await), 0);
    let r = app
        .post_raw(
            "/api/iot/",
            None,
            "application/x-www-form-urlencoded",
            form("EC:E3:34:46:2B:C1"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_less_endpoints_can_be_limited_to_site_networks() {
    let app = spawn_app_with(|s| s.legacy_networks = vec!["10.0.0.0/8".parse().unwrap()]).await;
    app.post_raw(
        "/api/iot/",
        None,
        "application/x-www-form-urlencoded",
        "mode=BASIC&macaddr=EC:E3:34:46:2B:C0&count1=1",
    )
    .await
    .assert_error(403, "address_not_allowed");
    app.post_json(
        "/api/handshake/",
        None,
        &json!({"mac": "EC:E3:34:46:2B:C1"}),
    )
    .await
    .assert_error(403, "address_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_proving_its_token_may_handshake_from_any_network() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let limited = app.replica_with(|s| s.legacy_networks = vec!["10.0.0.0/8".parse().unwrap()]);
    let limited = limited.await;
    let r = limited
        .post_json(
            "/api/handshake/",
            Some(&d.token),
            &json!({"mac": d.device_id}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["token"], d.token);
}
