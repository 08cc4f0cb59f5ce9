//! `GET /metrics`: Prometheus text whose counters move with traffic, and its access rules.
//! Every app in this test binary shares the process-wide recorder, so assertions are on
//! differences and lower bounds.

use std::collections::HashMap;

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

/// Samples by `name{sorted labels}`; panics on anything that is not the Prometheus text format.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("TYPE names a metric");
            let kind = parts.next().expect("TYPE gives a kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels close");
                let mut pairs: Vec<&str> = labels
                    .split("\",")
                    .map(|p| p.trim_end_matches('"'))
                    .collect();
                pairs.sort_unstable();
                for pair in &pairs {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(!k.is_empty() && !v.contains('"'), "{line}");
                }
                (
                    name,
                    pairs
                        .iter()
                        .map(|p| format!("{p}\""))
                        .collect::<Vec<_>>()
                        .join(","),
                )
            }
            None => (series, String::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample without a TYPE line: {line}");
        samples.insert(format!("{name}{{{labels}}}"), value);
    }
    samples
}

pub async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let resp = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse(&resp.text().await.expect("body"))
}

pub fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    let now = *after.get(series).unwrap_or_else(|| {
        panic!(
            "no series {series} in {:?}",
            after.keys().collect::<Vec<_>>()
        )
    });
    now - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_traffic() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    let device = app.assigned_device("02:00:00:00:10:01", "M-1").await;
    app.handshake("02:00:00:00:10:02").await;
    assert_eq!(app.post_event(&device, "m-1", json!({})).await.status, 200);
    assert_eq!(app.post_event(&device, "m-2", json!({})).await.status, 200);
    assert_eq!(app.post_event(&device, "m-2", json!({})).await.status, 200);
    let bad = app
        .post_json("/api/device/events/", Some("nope"), &json!({}))
        .await;
    bad.assert_error(401, "invalid_token");
    app.send_command(&device, "RESET", &[]);
    assert_eq!(app.poll(&device).await.status, 200);
    let after = scrape(&app).await;

    let at_least = |series: &str, n: f64| {
        let d = moved(&before, &after, series);
        assert!(d >= n, "{series} moved by {d}, expected at least {n}");
    };
    at_least(
        r#"ozone_http_requests_total{method="POST",route="/api/handshake",status="200"}"#,
        2.0,
    );
    at_least(
        r#"ozone_http_requests_total{method="POST",route="/api/device/events",status="401"}"#,
        1.0,
    );
    at_least(
        r#"ozone_http_request_duration_seconds_count{route="/api/device/events"}"#,
        4.0,
    );
    at_least(r#"ozone_events_ingested_total{}"#, 2.0);
    at_least(r#"ozone_events_duplicate_total{}"#, 1.0);
    at_least(r#"ozone_ingest_commit_seconds_count{}"#, 1.0);
    at_least(r#"ozone_ingest_batch_size_count{}"#, 1.0);
    at_least(r#"ozone_handshakes_total{outcome="ok"}"#, 2.0);
    at_least(r#"ozone_auth_failures_total{reason="invalid_token"}"#, 1.0);
    at_least(r#"ozone_commands_total{status="sent"}"#, 1.0);
    // Histograms have buckets, not quantiles.
    assert!(after.contains_key(
        r#"ozone_http_request_duration_seconds_bucket{le="0.005",route="/api/device/events"}"#
    ));
    // Raw paths (which hold device ids) never become labels.
    assert!(!after.keys().any(|k| k.contains("02:00:00:00:10:01")));
    for presence in ["online", "idle", "offline"] {
        assert!(after.contains_key(&format!("ozone_devices{{presence=\"{presence}\"}}")));
    }
    assert!(after.contains_key(r#"ozone_db_pool_connections{state="in_use"}"#));
}

#[tokio::test]
async fn metrics_need_the_token_when_one_is_set() {
    let app = spawn_app_with(|s| s.metrics_token = Some("s3cret".into())).await;
    app.get("/metrics", None)
        .await
        .assert_error(401, "invalid_token");
    app.get("/metrics", Some("wrong"))
        .await
        .assert_error(401, "invalid_token");
    let resp = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn metrics_on_their_own_listener_are_not_served_on_the_main_one() {
    let app = spawn_app_with(|s| s.metrics_addr = Some("127.0.0.1:0".into())).await;
    app.get("/metrics", None)
        .await
        .assert_error(404, "not_found");
    let own = app.metrics_addr.expect("a metrics listener");
    let resp = app
        .http
        .get(format!("http://{own}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    assert!(!parse(&text).is_empty());
    let other = app
        .http
        .get(format!("http://{own}/healthz"))
        .send()
        .await
        .expect("request");
    assert_eq!(other.status(), 404);
}
