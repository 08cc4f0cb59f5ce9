//! Analytics, exports, logs and flush through the staff API: exact numbers on small hand-built
//! fleets, CSV read back against the JSON, attachments, roles, and 4xx JSON for bad input.

use std::collections::HashMap;

use chrono::{Duration, DurationRound, Utc};
use reqwest::{header, Method};
use serde_json::{json, Value};

use crate::helpers::{bind_at, spawn_app, treat, treat_with, Staff, TestApp};

/// A GET answered with a body that is not JSON: status, headers and text.
struct Download {
    status: u16,
    content_type: String,
    disposition: String,
    content_length: Option<String>,
    text: String,
}

async fn download(app: &TestApp, path: &str, who: &Staff) -> Download {
    let resp = app
        .http
        .get(app.url(path))
        .bearer_auth(&who.token)
        .send()
        .await
        .expect("request");
    let head = |name: header::HeaderName| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_owned())
    };
    let content_type = head(header::CONTENT_TYPE).unwrap_or_default();
    let disposition = head(header::CONTENT_DISPOSITION).unwrap_or_default();
    let content_length = head(header::CONTENT_LENGTH);
    let status = resp.status().as_u16();
    Download {
        status,
        content_type,
        disposition,
        content_length,
        text: resp.text().await.expect("body"),
    }
}

/// CSV rows as maps from column to value.
fn csv_rows(text: &str) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader.headers().expect("header").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("CSV row");
            header
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().expect("string").to_owned())
        .collect()
}

/// Two devices on two machines in two outlets; `d` has five treatments around the first days
/// of January 2025 (one on the last day of December), `e` one on January 3rd.
struct Fleet {
    d: crate::helpers::Device,
    a: i32,
    x: i32,
    y: i32,
}

async fn fleet(app: &TestApp) -> Fleet {
    let d = app.handshake("02:00:00:00:01:01").await;
    let e = app.handshake("02:00:00:00:01:02").await;
    let (a, x) = bind_at(app, &d, "M-A", Some("Outlet X"), "2024-12-01T00:00:00Z").await;
    let (_, y) = bind_at(app, &e, "M-B", Some("Outlet Y"), "2024-12-01T00:00:00Z").await;
    treat(app, &d, "e0", "BASIC", "2024-12-31T10:00:00Z").await;
    treat(app, &d, "e1", "BASIC", "2025-01-01T23:59:59Z").await;
    treat(app, &d, "e2", "PREMIUM", "2025-01-02T00:00:00Z").await;
    treat(app, &d, "e3", "STANDARD", "2025-01-04T12:00:00Z").await;
    treat(app, &d, "e4", "STANDARD", "2025-01-04T13:00:00Z").await;
    treat(app, &e, "f1", "PREMIUM", "2025-01-03T08:00:00Z").await;
    Fleet {
        d,
        a,
        x: x.expect("outlet"),
        y: y.expect("outlet"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_answer_exact_numbers_for_any_active_user() {
    let app = spawn_app().await;
    let f = fleet(&app).await;
    // Reads need an active user, not a staff one.
    let viewer = app.user("viewer", false, false).await;
    let range = "granularity=day&start=2025-01-01&end=2025-01-05";

    let s = app
        .staff_get(&format!("/api/test/stats/?{range}"), &viewer)
        .await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(
        strs(&s.body["labels"]),
        [
            "2025-01-01",
            "2025-01-02",
            "2025-01-03",
            "2025-01-04",
            "2025-01-05"
        ]
    );
    assert_eq!(ints(&s.body["series"]["basic"]), [1, 0, 0, 0, 0]);
    assert_eq!(ints(&s.body["series"]["standard"]), [0, 0, 0, 2, 0]);
    assert_eq!(ints(&s.body["series"]["premium"]), [0, 1, 1, 0, 0]);
    assert_eq!(ints(&s.body["series"]["total"]), [1, 1, 1, 2, 0]);
    assert_eq!(
        s.body["totals"],
        json!({"basic": 1, "standard": 2, "premium": 2, "total": 5})
    );
    assert_eq!(
        s.body["range"],
        json!({
            "start": "2025-01-01T00:00:00Z",
            "end": "2025-01-06T00:00:00Z",
            "granularity": "day",
            "tz": "UTC",
            "buckets": 5,
        })
    );
    assert!(s.body.get("previous").is_none_or(Value::is_null));
    assert!(s.body.get("ma").is_none_or(Value::is_null));
    // Without the trailing slash, the same answer.
    let same = app
        .staff_get(&format!("/api/test/stats?{range}"), &viewer)
        .await;
    assert_eq!(same.body, s.body);

    // Filters: one outlet, one machine, one device, and an outlet the machine is not in.
    for (filter, total) in [
        (format!("outlet_id={}", f.x), [1, 1, 0, 2, 0]),
        (format!("outlet_id={}", f.y), [0, 0, 1, 0, 0]),
        (format!("machine_id={}", f.a), [1, 1, 0, 2, 0]),
        (format!("device_id={}", f.d.device_id), [1, 1, 0, 2, 0]),
        (
            format!("outlet_id={}&machine_id={}", f.y, f.a),
            [0, 0, 0, 0, 0],
        ),
    ] {
        let r = app
            .staff_get(&format!("/api/test/stats/?{range}&{filter}"), &viewer)
            .await;
        assert_eq!(r.status, 200, "{filter}: {}", r.body);
        assert_eq!(ints(&r.body["series"]["total"]), total, "{filter}");
    }

    // Cumulative, moving average and the previous period.
    let s = app
        .staff_get(
            &format!("/api/test/stats/?{range}&cumulative=true&ma=2&compare=true"),
            &viewer,
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(ints(&s.body["series"]["total"]), [1, 2, 3, 5, 5]);
    assert_eq!(s.body["totals"]["total"], 5, "totals are never cumulative");
    assert_eq!(s.body["ma"]["total"], json!([1.0, 1.5, 2.5, 4.0, 5.0]));
    assert_eq!(s.body["ma_window"], 2);
    assert_eq!(s.body["cumulative"], true);
    let previous = &s.body["previous"];
    assert_eq!(
        strs(&previous["labels"]),
        [
            "2024-12-27",
            "2024-12-28",
            "2024-12-29",
            "2024-12-30",
            "2024-12-31"
        ]
    );
    assert_eq!(ints(&previous["series"]["basic"]), [0, 0, 0, 0, 1]);
    assert_eq!(previous["totals"]["total"], 1);

    // Berlin days: 23:59:59Z on the 1st is 00:59:59 on the 2nd there.
    let s = app
        .staff_get(
            &format!("/api/test/stats/?{range}&tz=Europe/Berlin"),
            &viewer,
        )
        .await;
    assert_eq!(ints(&s.body["series"]["total"]), [0, 2, 1, 2, 0]);
    assert_eq!(s.body["range"]["start"], "2025-01-01T00:00:00+01:00");

    // The CSV export: same parameters, same numbers.
    let query = format!("{range}&ma=2&compare=true");
    let json_answer = app
        .staff_get(&format!("/api/test/stats/?{query}"), &viewer)
        .await
        .body;
    let csv = download(
        &app,
        &format!("/api/test/stats-export.csv?{query}"),
        &viewer,
    )
    .await;
    assert_eq!(csv.status, 200, "{}", csv.text);
    assert_eq!(csv.content_type, "text/csv; charset=utf-8");
    assert_eq!(
        csv.disposition,
        "attachment; filename=\"stats-20250101-20250106.csv\""
    );
    let rows = csv_rows(&csv.text);
    assert_eq!(rows.len(), 5);
    let current = &json_answer;
    let previous = &json_answer["previous"];
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["bucket"], current["labels"][i].as_str().unwrap());
        assert_eq!(row["start"], current["starts"][i].as_str().unwrap());
        assert_eq!(
            row["previous_bucket"],
            previous["labels"][i].as_str().unwrap()
        );
        for t in ["basic", "standard", "premium", "total"] {
            assert_eq!(
                row[t].parse::<i64>().unwrap(),
                current["series"][t][i].as_i64().unwrap(),
                "{t} of row {i}"
            );
            assert_eq!(
                row[&format!("ma_{t}")].parse::<f64>().unwrap(),
                current["ma"][t][i].as_f64().unwrap(),
                "ma_{t} of row {i}"
            );
            assert_eq!(
                row[&format!("previous_{t}")].parse::<i64>().unwrap(),
                previous["series"][t][i].as_i64().unwrap(),
                "previous_{t} of row {i}"
            );
        }
    }

    // The options cascade.
    let o = app
        .staff_get(
            &format!("/api/test/stats-options/?outlet_id={}", f.x),
            &viewer,
        )
        .await;
    assert_eq!(o.status, 200, "{}", o.body);
    let outlets: Vec<&str> = o.body["outlets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(outlets, ["Outlet X", "Outlet Y"]);
    assert_eq!(o.body["machines"].as_array().unwrap().len(), 1);
    assert_eq!(o.body["machines"][0]["machine_code"], "M-A");
    assert_eq!(o.body["devices"][0]["device_id"], f.d.device_id);
    let o = app
        .staff_get(
            &format!("/api/test/stats-options?machine_id={}", f.a),
            &viewer,
        )
        .await;
    assert_eq!(o.body["devices"].as_array().unwrap().len(), 1);
    assert_eq!(o.body["devices"][0]["current"], true);
    assert_eq!(o.body["devices"][0]["machine_id"], f.a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_answered_with_4xx_json() {
    let app = spawn_app().await;
    let viewer = app.user("viewer", false, false).await;
    for path in [
        "/api/test/stats/",
        "/api/test/stats-export.csv",
        "/api/test/stats-options/",
        "/api/events/analytics/",
        "/api/export/",
        "/api/machines/1/logs/",
    ] {
        app.get(path, None)
            .await
            .assert_error(401, "not_authenticated");
    }
    for base in ["/api/test/stats/", "/api/test/stats-export.csv"] {
        let r = app
            .staff_get(&format!("{base}?granularity=minute&days=365"), &viewer)
            .await;
        r.assert_error(422, "range_too_fine");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains("525600"), "{detail}");
        assert!(
            detail.contains(&format!(
                "largest allowed count is {}",
                ozone::domain::stats::MAX_BUCKETS
            )),
            "{detail}"
        );
        for (query, status, code) in [
            ("tz=Mars/Olympus", 422, "invalid_tz"),
            ("granularity=week", 422, "invalid_granularity"),
            ("granularity=", 422, "invalid_granularity"),
            ("granularity=DAY", 422, "invalid_granularity"),
            ("start=2025-02-01&end=2025-01-01", 422, "invalid_range"),
            ("start=yesterday", 422, "invalid_time"),
            // Dates so far out that the period before them would not fit in a date.
            (
                "start=-262143-01-01&end=-262143-01-05&compare=true",
                422,
                "invalid_time",
            ),
            ("end=-262143-01-03&days=5", 422, "invalid_time"),
            ("start=0000-12-31", 422, "invalid_time"),
            ("end=10000-01-01", 422, "invalid_time"),
            ("device_id=a%00b", 422, "invalid_parameter"),
            ("outlet_id=999", 404, "outlet_not_found"),
            ("machine_id=999", 404, "machine_not_found"),
            ("device_id=nobody", 404, "device_not_found"),
        ] {
            app.staff_get(&format!("{base}?{query}"), &viewer)
                .await
                .assert_error(status, code);
        }
        // Out of the declared bounds: a broken rule (422); not a number: unreadable (400).
        for (query, status, code) in [
            ("days=0", 422, "invalid_days"),
            ("days=3661", 422, "invalid_days"),
            ("ma=-1", 422, "invalid_field"),
            ("ma=5001", 422, "invalid_field"),
            ("outlet_id=x", 400, "bad_request"),
            ("cumulative=maybe", 400, "bad_request"),
        ] {
            app.staff_get(&format!("{base}?{query}"), &viewer)
                .await
                .assert_error(status, code);
        }
    }
    for (path, status, code) in [
        ("/api/events/analytics/?tz=Nowhere", 422, "invalid_tz"),
        (
            "/api/events/analytics/?device_id=nobody",
            404,
            "device_not_found",
        ),
        ("/api/export/?start=soon", 422, "invalid_time"),
        ("/api/export/?end=-262143-01-03&days=5", 422, "invalid_time"),
        (
            "/api/export/?start=2025-02-01&end=2025-01-01",
            422,
            "invalid_range",
        ),
        ("/api/export/?machine_id=7", 404, "machine_not_found"),
        (
            "/api/test/stats-options/?outlet_id=7",
            404,
            "outlet_not_found",
        ),
        ("/api/machines/7/logs/", 404, "machine_not_found"),
    ] {
        app.staff_get(path, &viewer)
            .await
            .assert_error(status, code);
    }
    for (path, status, code) in [
        ("/api/events/analytics/?days=0", 422, "invalid_days"),
        ("/api/export/?days=4000", 422, "invalid_days"),
        ("/api/machines/x/logs/", 400, "bad_request"),
        ("/api/machines/7/logs/?limit=0", 422, "invalid_limit"),
        ("/api/machines/7/logs/?limit=1001", 422, "invalid_limit"),
        ("/api/machines/7/logs/?offset=-1", 422, "invalid_offset"),
    ] {
        app.staff_get(path, &viewer)
            .await
            .assert_error(status, code);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_streams_quoted_utf8_csv_as_an_attachment() {
    let app = spawn_app().await;
    let viewer = app.user("viewer", false, false).await;
    let d = app.handshake("02:00:00:00:02:01").await;
    let other = app.handshake("02:00:00:00:02:02").await;
    let (m, o) = bind_at(
        &app,
        &d,
        "M-CSV, \"quoted\"",
        Some("Café Ünïcode"),
        "2024-12-01T00:00:00Z",
    )
    .await;
    treat(&app, &d, "x1", "BASIC", "2025-01-02T10:00:00Z").await;
    treat_with(
        &app,
        &d,
        "x2",
        "PREMIUM",
        "2025-01-03T11:00:00Z",
        json!({"current_counters": {"basic": 1, "standard": 0, "premium": 1}}),
    )
    .await;
    treat(&app, &other, "y1", "STANDARD", "2025-01-03T12:00:00Z").await;
    // Outside the range.
    treat(&app, &d, "x0", "BASIC", "2024-12-31T12:00:00Z").await;

    let csv = download(
        &app,
        "/api/export/?start=2025-01-01&end=2025-01-31",
        &viewer,
    )
    .await;
    assert_eq!(csv.status, 200, "{}", csv.text);
    assert_eq!(csv.content_type, "text/csv; charset=utf-8");
    assert_eq!(
        csv.disposition,
        "attachment; filename=\"telemetry-20250101-20250201.csv\""
    );
    assert_eq!(csv.content_length, None, "the export is streamed");
    let header_line = csv.text.lines().next().expect("header");
    assert_eq!(
        header_line,
        "id,event_id,device_id,machine_id,machine_code,outlet_id,outlet_name,event,treatment,\
         counter,occurred_at,received_at,device_timestamp,count_basic,count_standard,\
         count_premium,wifi_status,payload"
    );
    assert!(
        csv.text.contains(&format!(
            ",{m},\"M-CSV, \"\"quoted\"\"\",{},Café Ünïcode,treatment,",
            o.unwrap()
        )),
        "{}",
        csv.text
    );
    let rows = csv_rows(&csv.text);
    let ids: Vec<&str> = rows.iter().map(|r| r["event_id"].as_str()).collect();
    assert_eq!(ids, ["x1", "x2", "y1"]);
    assert_eq!(rows[0]["machine_code"], "M-CSV, \"quoted\"");
    assert_eq!(rows[0]["outlet_name"], "Café Ünïcode");
    assert_eq!(rows[0]["device_id"], d.device_id);
    assert_eq!(rows[1]["treatment"], "PREMIUM");
    assert_eq!(rows[1]["occurred_at"], "2025-01-03T11:00:00Z");
    let payload: Value = serde_json::from_str(&rows[1]["payload"]).expect("payload is JSON");
    assert_eq!(payload["current_counters"]["premium"], 1);
    assert_eq!(rows[2]["machine_id"], "");
    assert_eq!(rows[2]["device_id"], other.device_id);

    // Filters.
    let by_device = download(
        &app,
        &format!(
            "/api/export?start=2025-01-01&end=2025-01-31&device_id={}",
            other.device_id
        ),
        &viewer,
    )
    .await;
    let rows = csv_rows(&by_device.text);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["event_id"], "y1");
    let by_machine = download(
        &app,
        &format!("/api/export/?start=2024-12-01&end=2025-01-31&machine_id={m}"),
        &viewer,
    )
    .await;
    let ids: Vec<String> = csv_rows(&by_machine.text)
        .into_iter()
        .map(|r| r["event_id"].clone())
        .collect();
    assert_eq!(ids, ["x1", "x2", "x0"], "ordered by id (arrival)");
    // Nothing in range: the header alone.
    let empty = download(
        &app,
        "/api/export/?start=2020-01-01&end=2020-01-02",
        &viewer,
    )
    .await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.text.lines().count(), 1);
}

/// Basic and premium treatments from January 2nd to 3rd 2025, from the stats endpoint.
async fn hour_totals(app: &TestApp, who: &Staff) -> (i64, i64) {
    let r = app
        .staff_get(
            "/api/test/stats/?granularity=hour&start=2025-01-02&end=2025-01-03",
            who,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    (
        r.body["totals"]["basic"].as_i64().unwrap(),
        r.body["totals"]["premium"].as_i64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_needs_a_superuser_and_the_confirmation() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let root = app.user("root", true, true).await;
    let d = app.handshake("02:00:00:00:03:01").await;
    let e = app.handshake("02:00:00:00:03:02").await;
    for (i, ts) in [
        "2025-01-02T10:00:00Z",
        "2025-01-02T10:20:00Z",
        "2025-01-03T10:00:00Z",
    ]
    .iter()
    .enumerate()
    {
        treat(&app, &d, &format!("d{i}"), "BASIC", ts).await;
        treat(&app, &e, &format!("e{i}"), "PREMIUM", ts).await;
    }
    let confirm = "DELETE ALL TELEMETRY";
    app.staff_call(
        Method::POST,
        "/api/flush/",
        None,
        Some(&json!({"confirm": confirm})),
    )
    .await
    .assert_error(401, "not_authenticated");
    app.staff_post("/api/flush/", &staff, &json!({"confirm": confirm}))
        .await
        .assert_error(403, "superuser_required");
    app.staff_post("/api/flush/", &root, &json!({}))
        .await
        .assert_error(422, "confirmation_required");
    app.staff_post(
        "/api/flush",
        &root,
        &json!({"confirm": "delete all telemetry"}),
    )
    .await
    .assert_error(422, "confirmation_required");
    app.staff_post(
        "/api/flush/",
        &root,
        &json!({"confirm": confirm, "device_id": "nobody"}),
    )
    .await
    .assert_error(404, "device_not_found");
    app.staff_post(
        "/api/flush/",
        &root,
        &json!({"confirm": confirm, "before": "someday"}),
    )
    .await
    .assert_error(422, "invalid_time");
    app.staff_post(
        "/api/flush/",
        &root,
        &json!({"confirm": confirm, "before": "-262143-01-01"}),
    )
    .await
    .assert_error(422, "invalid_time");
    assert_eq!(
        hour_totals(&app, &staff).await,
        (3, 3),
        "nothing was deleted"
    );

    // One device, mid-hour: its 10:00 event goes, its 10:20 one stays.
    let r = app
        .staff_post(
            "/api/flush/",
            &root,
            &json!({"confirm": confirm, "before": "2025-01-02T10:10:00Z", "device_id": d.device_id}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"deleted": 1, "before": "2025-01-02T10:10:00Z", "device_id": d.device_id})
    );
    assert_eq!(hour_totals(&app, &staff).await, (2, 3));

    // Everyone's events before a date.
    let r = app
        .staff_post(
            "/api/flush/",
            &root,
            &json!({"confirm": confirm, "before": "2025-01-03"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["deleted"], 3);
    assert_eq!(r.body["before"], "2025-01-03T00:00:00Z");
    assert_eq!(hour_totals(&app, &staff).await, (1, 1));

    let r = app
        .staff_post("/api/flush/", &root, &json!({"confirm": confirm}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["deleted"], 2);
    assert_eq!(hour_totals(&app, &staff).await, (0, 0));
    let csv = download(&app, "/api/export/?start=2025-01-01", &staff).await;
    assert_eq!(csv.text.lines().count(), 1, "only the header is left");
}

fn log_rows(body: &Value) -> Vec<(String, [i64; 3], bool)> {
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {body}"))
        .iter()
        .map(|e| {
            let c = &e["cumulative"];
            (
                e["event_id"].as_str().unwrap().to_owned(),
                [
                    c["basic"].as_i64().unwrap(),
                    c["standard"].as_i64().unwrap(),
                    c["premium"].as_i64().unwrap(),
                ],
                e["reported"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_logs_page_newest_first_with_cumulative_counters() {
    let app = spawn_app().await;
    let viewer = app.user("viewer", false, false).await;
    let d = app.handshake("02:00:00:00:04:01").await;
    let (m, _) = bind_at(&app, &d, "M-LOG", None, "2025-01-01T00:00:00Z").await;
    treat(&app, &d, "e1", "BASIC", "2025-01-02T10:00:00Z").await;
    treat(&app, &d, "e2", "STANDARD", "2025-01-02T11:00:00Z").await;
    treat_with(
        &app,
        &d,
        "e3",
        "BASIC",
        "2025-01-02T12:00:00Z",
        json!({ "current_counters": { "basic": 10, "standard": 4, "premium": 0 } }),
    )
    .await;
    treat(&app, &d, "e4", "PREMIUM", "2025-01-02T13:00:00Z").await;
    let cmd = app.send_command(&d, "RESET", &[]);
    let command_id = cmd["command_id"].as_str().expect("command_id");
    let reply = app.report(&d, command_id, json!({ "success": true })).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let later = ozone::domain::wire_time(Utc::now() + Duration::minutes(1));
    treat_with(
        &app,
        &d,
        "e5",
        "BASIC",
        &later,
        json!({ "current_counters": { "basic": 1, "standard": 0, "premium": 0 } }),
    )
    .await;
    let reset_id = format!("reset-{command_id}");
    let expected = [
        ("e5", [1, 0, 0], true),
        (reset_id.as_str(), [0, 0, 0], true),
        ("e4", [10, 4, 1], false),
        ("e3", [10, 4, 0], true),
        ("e2", [1, 1, 0], false),
        ("e1", [1, 0, 0], false),
    ];

    let page = app
        .staff_get(&format!("/api/machines/{m}/logs/?limit=2"), &viewer)
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.body["count"], 6);
    assert_eq!(page.body["machine_id"], m);
    assert_eq!(page.body["previous"], Value::Null);
    assert_eq!(
        page.body["next"],
        format!("/api/machines/{m}/logs?limit=2&offset=2")
    );
    let mut seen = log_rows(&page.body);
    assert_eq!(page.body["results"][1]["event"], "reset");
    assert_eq!(page.body["results"][1]["treatment"], Value::Null);
    assert_eq!(page.body["results"][0]["device_id"], d.device_id);
    assert_eq!(
        page.body["summary"],
        json!({
            "totals": {"basic": 3, "standard": 1, "premium": 1, "total": 5},
            "current_device_id": d.device_id,
            "current_counters": {"basic": 1, "standard": 0, "premium": 0},
        })
    );
    // Follow `next` to the end: every page computes its counters on its own.
    let mut next = page.body["next"].as_str().map(str::to_owned);
    let mut pages = 1;
    while let Some(path) = next {
        let page = app.staff_get(&path, &viewer).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.body["count"], 6);
        assert!(page.body["previous"].is_string());
        seen.extend(log_rows(&page.body));
        next = page.body["next"].as_str().map(str::to_owned);
        pages += 1;
    }
    assert_eq!(pages, 3);
    let expected_rows: Vec<(String, [i64; 3], bool)> = expected
        .iter()
        .map(|(id, c, r)| (id.to_string(), *c, *r))
        .collect();
    assert_eq!(seen, expected_rows);
    // Cumulative columns never decrease between resets, read oldest first.
    let oldest_first: Vec<[i64; 3]> = seen[2..].iter().rev().map(|r| r.1).collect();
    assert!(oldest_first
        .windows(2)
        .all(|w| (0..3).all(|k| w[0][k] <= w[1][k])));

    let last = app
        .staff_get(&format!("/api/machines/{m}/logs?limit=4&offset=4"), &viewer)
        .await;
    assert_eq!(
        last.body["previous"],
        format!("/api/machines/{m}/logs?limit=4&offset=0")
    );
    assert_eq!(last.body["next"], Value::Null);
    assert_eq!(log_rows(&last.body), expected_rows[4..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_give_totals_days_and_busiest_hours() {
    let app = spawn_app().await;
    let viewer = app.user("viewer", false, false).await;
    let d = app.handshake("02:00:00:00:05:01").await;
    let e = app.handshake("02:00:00:00:05:02").await;
    let today = Utc::now()
        .duration_trunc(Duration::days(1))
        .expect("midnight");
    let at = |days_ago: i64, h: i64, m: i64| {
        ozone::domain::wire_time(today - Duration::days(days_ago) + Duration::minutes(h * 60 + m))
    };
    treat(&app, &d, "a1", "BASIC", &at(1, 9, 10)).await;
    treat(&app, &d, "a2", "PREMIUM", &at(1, 9, 40)).await;
    treat(&app, &d, "a3", "BASIC", &at(1, 14, 0)).await;
    treat(&app, &d, "a4", "STANDARD", &at(3, 9, 5)).await;
    treat(&app, &d, "a5", "STANDARD", &at(3, 22, 0)).await;
    // Too old for 7 days, and another device.
    treat(&app, &d, "old", "BASIC", &at(8, 9, 0)).await;
    treat(&app, &e, "b1", "PREMIUM", &at(2, 14, 30)).await;

    let r = app
        .staff_get(
            &format!("/api/events/analytics/?device_id={}", d.device_id),
            &viewer,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["device_id"], d.device_id);
    assert_eq!(r.body["days"], 7);
    assert_eq!(
        r.body["totals"],
        json!({"basic": 2, "standard": 2, "premium": 1, "total": 5})
    );
    let per_day = ints(&r.body["per_day"]["series"]["total"]);
    assert_eq!(per_day, [0, 0, 0, 2, 0, 3, 0]);
    let labels = strs(&r.body["per_day"]["labels"]);
    assert_eq!(labels[6], today.format("%Y-%m-%d").to_string());
    let mut by_hour = vec![0i64; 24];
    by_hour[9] = 3;
    by_hour[14] = 1;
    by_hour[22] = 1;
    assert_eq!(ints(&r.body["by_hour"]), by_hour);
    assert_eq!(
        r.body["busiest_hours"],
        json!([{"hour": 9, "count": 3}, {"hour": 14, "count": 1}, {"hour": 22, "count": 1}])
    );

    // The whole fleet over 10 days.
    let r = app
        .staff_get("/api/events/analytics?days=10", &viewer)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["device_id"], Value::Null);
    assert_eq!(r.body["totals"]["total"], 7);
    assert_eq!(r.body["busiest_hours"][0], json!({"hour": 9, "count": 4}));
    assert_eq!(r.body["busiest_hours"][1], json!({"hour": 14, "count": 2}));
}

#[tokio::test]
async fn csv_operations_declare_their_media_type_and_bounds_in_the_spec() {
    let spec: Value = serde_json::from_str(&ozone::http::staff::spec_json()).expect("JSON");
    for (path, method) in [
        ("/api/test/stats-export.csv", "get"),
        ("/api/export", "get"),
    ] {
        let op = &spec["paths"][path][method];
        let ok = &op["responses"]["200"];
        assert!(
            ok["content"]["text/csv; charset=utf-8"].is_object(),
            "{path}: {ok}"
        );
        let headers = ok["headers"].as_object().expect("headers");
        assert!(
            headers
                .keys()
                .any(|h| h.eq_ignore_ascii_case("content-disposition")),
            "{path}: {ok}"
        );
        for status in ["400", "401", "404", "422"] {
            assert!(op["responses"][status].is_object(), "{path} lacks {status}");
        }
    }
    for path in [
        "/api/test/stats",
        "/api/test/stats-options",
        "/api/events/analytics",
        "/api/machines/{id}/logs",
    ] {
        let op = &spec["paths"][path]["get"];
        assert_eq!(op["tags"][0], "Analytics", "{path}");
        assert!(op["responses"]["422"].is_object(), "{path}");
    }
    let flush = &spec["paths"]["/api/flush"]["post"];
    assert!(flush["responses"]["403"].is_object());
    let days = spec["paths"]["/api/test/stats"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "days")
        .expect("days parameter")
        .clone();
    assert_eq!(days["schema"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(days["schema"]["maximum"].as_f64(), Some(3660.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_streams_past_its_page_size_in_id_order() {
    use futures_util::stream::{self, StreamExt};

    let app = spawn_app().await;
    let viewer = app.user("viewer", false, false).await;
    let d = app.handshake("02:00:00:00:06:01").await;
    // More events than one page of the export holds, a treatment every 10 s.
    let n = ozone::domain::export::PAGE_ROWS as usize + 3;
    let start = crate::helpers::at("2025-03-01T00:00:00Z");
    stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let (app, d) = (&app, &d);
            async move {
                let ts = ozone::domain::wire_time(start + Duration::seconds(10 * i as i64));
                let t = ["BASIC", "STANDARD", "PREMIUM"][i % 3];
                treat(app, d, &format!("p{i}"), t, &ts).await;
            }
        })
        .await;

    let csv = download(
        &app,
        "/api/export/?start=2025-03-01&end=2025-03-31",
        &viewer,
    )
    .await;
    assert_eq!(csv.status, 200);
    let rows = csv_rows(&csv.text);
    assert_eq!(rows.len(), n);
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
    let mut event_ids: Vec<usize> = rows
        .iter()
        .map(|r| r["event_id"][1..].parse().unwrap())
        .collect();
    event_ids.sort_unstable();
    assert_eq!(event_ids, (0..n).collect::<Vec<_>>());
    // The same events, counted by the statistics.
    let s = app
        .staff_get(
            "/api/test/stats/?granularity=month&start=2025-03-01&end=2025-03-31",
            &viewer,
        )
        .await;
    assert_eq!(s.body["totals"]["total"], n as i64);
    let premium = rows.iter().filter(|r| r["treatment"] == "PREMIUM").count();
    assert_eq!(s.body["totals"]["premium"], premium as i64);
}

/// The CSV text as the csv crate writes these records (header included).
fn rewritten(text: &str) -> String {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes());
    let mut writer = csv::Writer::from_writer(Vec::new());
    for record in reader.byte_records() {
        writer.write_byte_record(&record.expect("record")).unwrap();
    }
    String::from_utf8(writer.into_inner().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_is_the_csv_crates_text_whichever_way_a_page_is_written() {
    let app = spawn_app().await;
    let viewer = app.user("viewer", false, false).await;
    let d = app.handshake("02:00:00:00:07:01").await;
    let (m, o) = bind_at(
        &app,
        &d,
        "M,\"q\"\r\n2",
        Some("Out\rlet \"Ü\", 2"),
        "2024-12-01T00:00:00Z",
    )
    .await;
    treat(&app, &d, "a1", "BASIC", "2025-01-02T10:00:00Z").await;
    treat_with(
        &app,
        &d,
        "a2",
        "PREMIUM",
        "2025-01-03T11:00:00Z",
        json!({"note": "line\nbreak, \"quoted\"", "current_counters": {"basic": 1, "standard": 0, "premium": 1}}),
    )
    .await;
    treat(&app, &d, "a3", "STANDARD", "2025-01-04T12:00:00.250Z").await;
    let path = "/api/export/?start=2025-01-01&end=2025-01-31";

    let first = download(&app, path, &viewer).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(
        first.text,
        rewritten(&first.text),
        "the csv crate's quoting"
    );
    let rows = csv_rows(&first.text);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["machine_id"], m.to_string());
    assert_eq!(rows[0]["machine_code"], "M,\"q\"\r\n2");
    assert_eq!(rows[0]["outlet_id"], o.unwrap().to_string());
    assert_eq!(rows[0]["outlet_name"], "Out\rlet \"Ü\", 2");
    assert_eq!(rows[2]["occurred_at"], "2025-01-04T12:00:00.250Z");
    let payload: Value = serde_json::from_str(&rows[1]["payload"]).expect("payload is JSON");
    assert_eq!(payload["note"], "line\nbreak, \"quoted\"");
    for row in &rows {
        assert_eq!(row["wifi_status"], "", "{row:?}");
        let received = crate::helpers::at(&row["received_at"]);
        assert_eq!(
            received.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            row["received_at"]
        );
    }

    // On SQLite a time the page statement does not recognise sends the page through the
    // row-by-row writer: the same text but for that time.
    if app.db().get_database_backend() == sea_orm::DbBackend::Sqlite {
        use sea_orm::ConnectionTrait;
        app.db()
            .execute_unprepared(
                "UPDATE telemetry_events SET occurred_at = '2025-01-03T11:00:00.5+00:00' \
                 WHERE event_id = 'a2'",
            )
            .await
            .expect("update");
        let second = download(&app, path, &viewer).await;
        let before = format!(",2025-01-03T11:00:00Z,{},", rows[1]["received_at"]);
        let after = format!(",2025-01-03T11:00:00.500Z,{},", rows[1]["received_at"]);
        assert_eq!(first.text.matches(&before).count(), 1);
        assert_eq!(second.text, first.text.replace(&before, &after));
    }
}
