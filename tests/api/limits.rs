//! Abuse limits: 429 with `Retry-After` and the JSON error, per key, and recovery once the
//! budget refills. Quotas are tiny and the window one second so recovery is quick.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp};

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        retry_after,
        body,
    }
}

fn handshake(app: &TestApp, mac: &str) -> reqwest::RequestBuilder {
    app.http
        .post(app.url("/api/handshake/"))
        .json(&json!({ "mac": mac, "firmware": "1.0.0" }))
}

#[track_caller]
fn assert_limited(answer: &Answer) {
    assert_eq!(answer.status, 429, "body: {}", answer.body);
    assert_eq!(answer.body["code"], "rate_limited", "body: {}", answer.body);
    assert!(answer.body["error"].is_string());
    assert!(answer.body["detail"].is_string());
    let retry_after = answer.retry_after.expect("a Retry-After header");
    assert!((1..=1).contains(&retry_after), "Retry-After {retry_after}");
}

/// Retries until the request is served again; the budget refills within the 1 s window.
async fn recovers(make: impl Fn() -> reqwest::RequestBuilder) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let answer = send(make()).await;
        if answer.status != 429 || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn handshakes_beyond_the_address_budget_get_429_then_recover() {
    let app = spawn_app_with(|s| {
        s.limit_window_secs = 1;
        s.limit_handshakes_per_addr = 2;
    })
    .await;
    assert_eq!(send(handshake(&app, "02:00:00:00:00:01")).await.status, 200);
    assert_eq!(send(handshake(&app, "02:00:00:00:00:02")).await.status, 200);
    assert_limited(&send(handshake(&app, "02:00:00:00:00:03")).await);
    let answer = recovers(|| handshake(&app, "02:00:00:00:00:03")).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
}

#[tokio::test]
async fn a_mac_over_its_handshake_budget_does_not_limit_other_macs() {
    let app = spawn_app_with(|s| {
        s.limit_window_secs = 1;
        s.limit_handshakes_per_mac = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(send(handshake(&app, "02:00:00:00:00:01")).await.status, 200);
    }
    // The same MAC spelled differently is the same device.
    assert_limited(&send(handshake(&app, "02-00-00-00-00-01")).await);
    assert_eq!(send(handshake(&app, "02:00:00:00:00:02")).await.status, 200);
    let answer = recovers(|| handshake(&app, "02:00:00:00:00:01")).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
}

#[tokio::test]
async fn an_address_sending_bad_tokens_is_refused_until_its_budget_refills() {
    let app = spawn_app_with(|s| {
        s.limit_window_secs = 1;
        s.limit_bad_tokens_per_addr = 2;
    })
    .await;
    let device = app.handshake("02:00:00:00:00:01").await;
    let event = |token: &str| {
        app.http
            .post(app.url("/api/device/events/"))
            .bearer_auth(token)
            .json(&json!({ "event_id": "e-1", "treatment": "BASIC" }))
    };
    assert_eq!(send(event("bad")).await.status, 401);
    assert_eq!(
        send(app.http.get(app.url("/api/device/x/commands/")))
            .await
            .status,
        401
    );
    assert_limited(&send(event("bad")).await);
    // While blocked, the address is refused before any token is looked at.
    assert_limited(&send(event(&device.token)).await);
    let answer = recovers(|| event(&device.token)).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
}

#[tokio::test]
async fn legacy_readings_beyond_the_address_budget_get_429() {
    let app = spawn_app_with(|s| {
        s.limit_window_secs = 1;
        s.limit_iot_per_addr = 2;
    })
    .await;
    let reading = || {
        app.http
            .post(app.url("/api/iot/"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("mode=status&macaddr=020000000001&count1=1&count2=2&count3=3")
    };
    for _ in 0..2 {
        let answer = send(reading()).await;
        assert_eq!(answer.status, 200, "body: {}", answer.body);
    }
    assert_limited(&send(reading()).await);
    assert_eq!(recovers(reading).await.status, 200);
}

#[tokio::test]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    let behind_proxy = spawn_app_with(|s| {
        s.limit_handshakes_per_addr = 1;
        s.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let from = |app: &TestApp, client: &str, mac: &str| {
        handshake(app, mac).header("x-forwarded-for", client.to_owned())
    };
    let app = &behind_proxy;
    assert_eq!(
        send(from(app, "198.51.100.1", "02:00:00:00:00:01"))
            .await
            .status,
        200
    );
    assert_limited_status(&send(from(app, "198.51.100.1", "02:00:00:00:00:02")).await);
    assert_eq!(
        send(from(app, "198.51.100.2", "02:00:00:00:00:03"))
            .await
            .status,
        200
    );
    let forwarded = handshake(app, "02:00:00:00:00:04")
        .header("forwarded", "for=\"[2001:db8::1]:4711\";proto=https");
    assert_eq!(send(forwarded).await.status, 200);

    // Without a trusted proxy the header is the client's word and is ignored.
    let direct = spawn_app_with(|s| s.limit_handshakes_per_addr = 1).await;
    let app = &direct;
    assert_eq!(
        send(from(app, "198.51.100.1", "02:00:00:00:00:01"))
            .await
            .status,
        200
    );
    assert_limited_status(&send(from(app, "198.51.100.2", "02:00:00:00:00:02")).await);
}

/// With the default 60 s window, Retry-After is up to a minute.
#[track_caller]
fn assert_limited_status(answer: &Answer) {
    assert_eq!(answer.status, 429, "body: {}", answer.body);
    assert_eq!(answer.body["code"], "rate_limited");
    assert!(answer.retry_after.is_some_and(|s| (1..=60).contains(&s)));
}
