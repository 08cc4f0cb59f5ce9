//! `POST /api/iot/`: the legacy form ingest.

use sea_orm::{EntityTrait, PaginatorTrait};

use ozone::db::entities::{device_status, telemetry_event};

use crate::helpers::spawn_app;

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_reading_is_stored_with_counts_and_answers_ok() {
    let app = spawn_app().await;
    let body = "mode=BASIC&macaddr=EC%3AE3%3A34%3A46%3A2B%3AC0&type1=30&type2=45&type3=60&count1=12&count2=4&count3=1&timestamp=2024-01-15+14%3A30%3A25&rtc_available=true&sd_available=false";
    let reply = app.post_raw("/api/iot/", None, FORM, body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, serde_json::json!({"status": "ok"}));
    let events = telemetry_event::Entity::find().all(app.db()).await.unwrap();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.event, "treatment");
    assert_eq!(e.event_type.as_deref(), Some("BASIC"));
    assert_eq!(
        (e.count_basic, e.count_standard, e.count_premium),
        (Some(12), Some(4), Some(1))
    );
    assert_eq!(e.occurred_at.to_rfc3339(), "2024-01-15T14:30:25+00:00");
    assert_eq!(e.payload.as_ref().unwrap()["type2"], "45");
    let status = device_status::Entity::find_by_id(e.device_id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.current_count_basic, 12);
    assert_eq!(status.rtc_available, Some(true));
    assert_eq!(status.sd_card_available, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_legacy_reading_is_stored_once() {
    let app = spawn_app().await;
    let body =
        "mode=status&macaddr=ece334462bc0&count1=1&count2=2&count3=3&timestamp=2024-01-15 14:30:25";
    for _ in 0..3 {
        assert_eq!(app.post_raw("/api/iot", None, FORM, body).await.status, 200);
    }
    let other =
        "mode=status&macaddr=ece334462bc0&count1=1&count2=2&count3=4&timestamp=2024-01-15 14:30:25";
    assert_eq!(
        app.post_raw("/api/iot", None, FORM, other).await.status,
        200
    );
    assert_eq!(
        telemetry_event::Entity::find()
            .count(app.db())
            .await
            .unwrap(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_legacy_forms_get_clear_errors() {
    let app = spawn_app().await;
    app.post_raw("/api/iot/", None, FORM, "mode=BASIC")
        .await
        .assert_error(422, "missing_field");
    app.post_raw("/api/iot/", None, FORM, "mode=TURBO&macaddr=ece334462bc0")
        .await
        .assert_error(422, "invalid_mode");
    app.post_raw("/api/iot/", None, FORM, "mode=BASIC&macaddr=zz")
        .await
        .assert_error(422, "invalid_mac");
    app.post_raw(
        "/api/iot/",
        None,
        FORM,
        "mode=BASIC&macaddr=ece334462bc0&count1=lots",
    )
    .await
    .assert_error(422, "invalid_count");
    app.post_raw(
        "/api/iot/",
        None,
        FORM,
        "mode=BASIC&macaddr=ece334462bc0&timestamp=2024%00",
    )
    .await
    .assert_error(422, "invalid_body");
    assert_eq!(
        telemetry_event::Entity::find()
            .count(app.db())
            .await
            .unwrap(),
        0
    );
}
