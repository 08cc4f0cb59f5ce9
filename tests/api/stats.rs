//! Usage statistics, machine logs, exports and flush, on small hand-built fleets with exact
//! expected numbers. Events go in through the real ingest path (HTTP); bindings are made with
//! the fleet domain's own functions at chosen times, so that past events have a machine.

use chrono::Utc;
use futures_util::StreamExt;
use ozone::domain::{
    export, logs,
    stats::{self, StatsParams},
};
use serde_json::json;

use crate::helpers::{bind_at, spawn_app, treat, treat_with, TestApp};

fn params(granularity: &str, start: &str, end: &str) -> StatsParams {
    StatsParams {
        granularity: Some(granularity.into()),
        start: Some(start.into()),
        end: Some(end.into()),
        ..StatsParams::default()
    }
}

async fn query(app: &TestApp, p: StatsParams) -> stats::Stats {
    stats::stats(&app.state.db, &p, Utc::now())
        .await
        .expect("stats")
}

/// The rollup and a direct count over raw events agree, bucket by bucket.
async fn assert_rollup_matches_raw(app: &TestApp, p: StatsParams) {
    let q = stats::StatsQuery::from_params(&app.state.db, &p, Utc::now())
        .await
        .expect("query");
    let rolled = stats::count(app.db(), q.filter, &q.buckets)
        .await
        .expect("rollup");
    let raw = stats::count_raw(app.db(), q.filter, &q.buckets)
        .await
        .expect("raw");
    assert_eq!(rolled, raw, "filter {:?}", q.filter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day_buckets_split_at_midnight_and_empty_days_are_zero() {
    let app = spawn_app().await;
    let d = app.handshake("02:00:00:00:00:01").await;
    treat(&app, &d, "e1", "BASIC", "2025-01-01T23:59:59Z").await;
    treat(&app, &d, "e2", "PREMIUM", "2025-01-02T00:00:00Z").await;
    treat(&app, &d, "e3", "STANDARD", "2025-01-04T12:00:00Z").await;
    treat(&app, &d, "e4", "STANDARD", "2025-01-04T13:00:00Z").await;
    treat(&app, &d, "e0", "BASIC", "2024-12-31T10:00:00Z").await;

    let s = query(&app, params("day", "2025-01-01", "2025-01-05")).await;
    let c = &s.current;
    assert_eq!(
        c.labels,
        [
            "2025-01-01",
            "2025-01-02",
            "2025-01-03",
            "2025-01-04",
            "2025-01-05"
        ]
    );
    assert_eq!(c.series.basic, [1, 0, 0, 0, 0]);
    assert_eq!(c.series.standard, [0, 0, 0, 2, 0]);
    assert_eq!(c.series.premium, [0, 1, 0, 0, 0]);
    assert_eq!(c.series.total, [1, 1, 0, 2, 0]);
    assert_eq!(c.totals.total, 4);
    assert_eq!(s.range.start, "2025-01-01T00:00:00Z");
    assert_eq!(s.range.end, "2025-01-06T00:00:00Z");
    assert!(s.previous.is_none());

    let s = query(
        &app,
        StatsParams {
            cumulative: true,
            ma: Some(2),
            compare: true,
            ..params("day", "2025-01-01", "2025-01-05")
        },
    )
    .await;
    assert_eq!(s.current.series.total, [1, 2, 2, 4, 4]);
    assert!(s.current.series.total.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(s.current.totals.total, 4, "totals are never cumulative");
    let ma = s.current.ma.as_ref().expect("ma");
    assert_eq!(ma.total, [1.0, 1.5, 2.0, 3.0, 4.0]);
    let previous = s.previous.expect("previous");
    assert_eq!(
        previous.labels,
        [
            "2024-12-27",
            "2024-12-28",
            "2024-12-29",
            "2024-12-30",
            "2024-12-31"
        ]
    );
    assert_eq!(previous.series.basic, [0, 0, 0, 0, 1]);
    assert_eq!(previous.totals.total, 1);

    let s = query(
        &app,
        StatsParams {
            ma: Some(3),
            ..params("day", "2025-01-01", "2025-01-05")
        },
    )
    .await;
    assert_eq!(
        s.current.ma.expect("ma").total,
        [1.0, 1.0, 0.667, 1.0, 0.667]
    );

    // Minutes come from raw events; the same edges hold.
    let s = query(
        &app,
        params("minute", "2025-01-01T23:58:00Z", "2025-01-02T00:02:00Z"),
    )
    .await;
    assert_eq!(s.current.series.total, [0, 1, 1, 0]);
    assert_eq!(s.current.labels[1], "2025-01-01T23:59+00:00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berlin_days_follow_daylight_saving_time() {
    let app = spawn_app().await;
    let d = app.handshake("02:00:00:00:00:02").await;
    // 23:59:59 CET on the 29th, 00:30 CET and 23:59:59 CEST on the 30th, midnight CEST on the 31st.
    treat(&app, &d, "a", "BASIC", "2025-03-29T22:59:59Z").await;
    treat(&app, &d, "b", "BASIC", "2025-03-29T23:30:00Z").await;
    treat(&app, &d, "c", "BASIC", "2025-03-30T21:59:59Z").await;
    treat(&app, &d, "d", "BASIC", "2025-03-30T22:00:00Z").await;
    // 02:30 CEST and 02:30 CET on the day the clock goes back.
    treat(&app, &d, "e", "PREMIUM", "2025-10-26T00:30:00Z").await;
    treat(&app, &d, "f", "PREMIUM", "2025-10-26T01:30:00Z").await;

    let berlin = |p: StatsParams| StatsParams {
        tz: Some("Europe/Berlin".into()),
        ..p
    };
    let s = query(&app, berlin(params("day", "2025-03-29", "2025-03-31"))).await;
    assert_eq!(s.current.labels, ["2025-03-29", "2025-03-30", "2025-03-31"]);
    assert_eq!(s.current.series.total, [1, 2, 1]);
    assert_eq!(s.range.start, "2025-03-29T00:00:00+01:00");
    assert_eq!(s.range.end, "2025-04-01T00:00:00+02:00");
    assert_eq!(s.range.tz, "Europe/Berlin");
    // The same events in UTC days.
    let s = query(&app, params("day", "2025-03-29", "2025-03-31")).await;
    assert_eq!(s.current.series.total, [2, 2, 0]);

    let s = query(&app, berlin(params("hour", "2025-03-30", "2025-03-30"))).await;
    assert_eq!(s.current.labels.len(), 23);
    assert_eq!(s.current.labels[1], "2025-03-30T01:00+01:00");
    assert_eq!(s.current.labels[2], "2025-03-30T03:00+02:00");
    assert_eq!(s.current.series.total[0], 1);
    assert_eq!(s.current.series.total[22], 1);

    let s = query(&app, berlin(params("hour", "2025-10-26", "2025-10-26"))).await;
    assert_eq!(s.current.labels.len(), 25);
    assert_eq!(s.current.labels[2], "2025-10-26T02:00+02:00");
    assert_eq!(s.current.labels[3], "2025-10-26T02:00+01:00");
    assert_eq!(&s.current.series.premium[2..4], [1, 1]);

    let s = query(&app, berlin(params("month", "2025-01-01", "2025-12-31"))).await;
    assert_eq!(s.current.labels.len(), 12);
    assert_eq!(s.current.series.basic[2], 4);
    assert_eq!(s.current.series.premium[9], 2);

    // Half-hour zones are answered from raw events, with their own midnight.
    let s = query(
        &app,
        StatsParams {
            tz: Some("Asia/Kolkata".into()),
            ..params("day", "2025-03-30", "2025-03-31")
        },
    )
    .await;
    // 22:59:59Z and 23:30Z on the 29th are 04:29:59 and 05:00 IST on the 30th; 21:59:59Z
    // and 22:00Z on the 30th fall on the 31st.
    assert_eq!(s.current.series.total, [2, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_device_counts_for_each_machine_only_while_bound_there() {
    let app = spawn_app().await;
    let d = app.handshake("02:00:00:00:00:03").await;
    let other = app.handshake("02:00:00:00:00:04").await;
    let (a, x) = bind_at(&app, &d, "M-A", Some("Outlet X"), "2025-02-01T00:00:00Z").await;
    treat(&app, &d, "before", "BASIC", "2025-01-20T10:00:00Z").await;
    treat(&app, &d, "a1", "BASIC", "2025-02-05T10:00:00Z").await;
    treat(&app, &d, "a2", "PREMIUM", "2025-02-05T11:00:00Z").await;
    let (b, y) = bind_at(&app, &d, "M-B", Some("Outlet Y"), "2025-02-10T00:00:00Z").await;
    treat(&app, &d, "b1", "STANDARD", "2025-02-15T10:00:00Z").await;
    treat(&app, &d, "b2", "STANDARD", "2025-02-15T10:30:00Z").await;
    treat(&app, &d, "b3", "BASIC", "2025-02-16T09:00:00Z").await;
    // A late event, from before the move, arrives after it: it still counts for A.
    treat(&app, &d, "late", "BASIC", "2025-02-09T23:59:59Z").await;
    bind_at(
        &app,
        &other,
        "M-C",
        Some("Outlet X"),
        "2025-02-01T00:00:00Z",
    )
    .await;
    treat(&app, &other, "c1", "PREMIUM", "2025-02-20T08:00:00Z").await;

    let feb = || params("month", "2025-01-01", "2025-02-28");
    let total = |s: &stats::Stats| s.current.series.total.clone();
    let with = |outlet: Option<i32>, machine: Option<i32>, device: Option<&str>| StatsParams {
        outlet_id: outlet,
        machine_id: machine,
        device_id: device.map(str::to_owned),
        ..feb()
    };
    assert_eq!(total(&query(&app, feb()).await), [1, 7]);
    assert_eq!(total(&query(&app, with(None, Some(a), None)).await), [0, 3]);
    assert_eq!(total(&query(&app, with(None, Some(b), None)).await), [0, 3]);
    assert_eq!(total(&query(&app, with(x, None, None)).await), [0, 4]);
    assert_eq!(total(&query(&app, with(y, None, None)).await), [0, 3]);
    assert_eq!(
        total(&query(&app, with(None, None, Some(&d.device_id))).await),
        [1, 6]
    );
    assert_eq!(
        total(&query(&app, with(x, Some(a), Some(&d.device_id))).await),
        [0, 3]
    );
    assert_eq!(total(&query(&app, with(y, Some(a), None)).await), [0, 0]);

    for p in [
        params("hour", "2025-02-01", "2025-02-28"),
        params("day", "2025-01-01", "2025-02-28"),
    ] {
        for (outlet, machine, device) in [
            (None, None, None),
            (None, Some(a), None),
            (None, Some(b), None),
            (x, None, None),
            (y, None, None),
            (None, None, Some(d.device_id.as_str())),
            (x, Some(a), None),
        ] {
            assert_rollup_matches_raw(
                &app,
                StatsParams {
                    outlet_id: outlet,
                    machine_id: machine,
                    device_id: device.map(str::to_owned),
                    ..p.clone()
                },
            )
            .await;
        }
    }

    let options = stats::options(&app.state.db, x, None)
        .await
        .expect("options");
    assert_eq!(options.outlets.len(), 2);
    let codes: Vec<&str> = options
        .machines
        .iter()
        .map(|m| m.machine_code.as_str())
        .collect();
    assert_eq!(codes, ["M-A", "M-C"]);
    let options = stats::options(&app.state.db, None, Some(a))
        .await
        .expect("options");
    assert_eq!(options.devices.len(), 1);
    assert_eq!(options.devices[0].device_id, d.device_id);
    assert!(!options.devices[0].current, "the device has moved on to B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_too_fine_for_their_length_are_refused() {
    let app = spawn_app().await;
    let err = stats::stats(
        &app.state.db,
        &StatsParams {
            granularity: Some("minute".into()),
            days: Some(365),
            ..StatsParams::default()
        },
        Utc::now(),
    )
    .await
    .expect_err("a year of minutes");
    assert_eq!(err.code(), "range_too_fine");
    assert!(err.to_string().contains("largest allowed count is 5000"));
    for (p, code) in [
        (
            StatsParams {
                tz: Some("Mars/Olympus".into()),
                ..StatsParams::default()
            },
            "invalid_tz",
        ),
        (
            StatsParams {
                granularity: Some("week".into()),
                ..StatsParams::default()
            },
            "invalid_granularity",
        ),
        (params("day", "2025-02-01", "2025-01-01"), "invalid_range"),
        (params("day", "yesterday", "2025-01-01"), "invalid_time"),
        (
            StatsParams {
                outlet_id: Some(999),
                ..StatsParams::default()
            },
            "outlet_not_found",
        ),
    ] {
        let err = stats::stats(&app.state.db, &p, Utc::now())
            .await
            .expect_err(code);
        assert_eq!(err.code(), code);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_cumulative_counters_and_reset_rows_newest_first() {
    let app = spawn_app().await;
    let d = app.handshake("02:00:00:00:00:05").await;
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
    let later = ozone::domain::wire_time(Utc::now() + chrono::Duration::minutes(1));
    treat(&app, &d, "e5", "BASIC", &later).await;

    let page = logs::machine_logs(&app.state.db, m, 50, 0)
        .await
        .expect("logs");
    assert_eq!(page.count, 6);
    let rows: Vec<(&str, [i64; 3])> = page
        .entries
        .iter()
        .map(|e| {
            (
                e.event_id.as_str(),
                [
                    e.cumulative.basic,
                    e.cumulative.standard,
                    e.cumulative.premium,
                ],
            )
        })
        .collect();
    let reset_id = format!("reset-{command_id}");
    assert_eq!(
        rows,
        [
            ("e5", [1, 0, 0]),
            (reset_id.as_str(), [0, 0, 0]),
            ("e4", [10, 4, 1]),
            ("e3", [10, 4, 0]),
            ("e2", [1, 1, 0]),
            ("e1", [1, 0, 0]),
        ]
    );
    assert_eq!(page.entries[1].event, "reset");
    assert_eq!(page.summary.totals.total, 5);
    assert_eq!(page.summary.totals.basic, 3);
    assert_eq!(
        page.summary.current_device_id.as_deref(),
        Some(d.device_id.as_str())
    );

    // A later page walks back to the last reported counters on its own.
    let page = logs::machine_logs(&app.state.db, m, 2, 2)
        .await
        .expect("logs");
    let rows: Vec<(&str, i64, i64)> = page
        .entries
        .iter()
        .map(|e| {
            (
                e.event_id.as_str(),
                e.cumulative.basic,
                e.cumulative.premium,
            )
        })
        .collect();
    assert_eq!(rows, [("e4", 10, 1), ("e3", 10, 0)]);
    let page = logs::machine_logs(&app.state.db, m, 1, 4)
        .await
        .expect("logs");
    assert_eq!(page.entries[0].event_id, "e2");
    assert_eq!(page.entries[0].cumulative.standard, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_log_shows_each_device_only_while_it_was_bound() {
    let app = spawn_app().await;
    let first = app.handshake("02:00:00:00:00:06").await;
    let second = app.handshake("02:00:00:00:00:07").await;
    let (m, _) = bind_at(&app, &first, "M-SWAP", None, "2025-01-01T00:00:00Z").await;
    treat(&app, &first, "f1", "BASIC", "2025-01-02T10:00:00Z").await;
    bind_at(&app, &second, "M-SWAP", None, "2025-01-03T00:00:00Z").await;
    treat(&app, &first, "f2", "BASIC", "2025-01-04T10:00:00Z").await;
    treat(&app, &second, "s1", "PREMIUM", "2025-01-04T11:00:00Z").await;
    let page = logs::machine_logs(&app.state.db, m, 50, 0)
        .await
        .expect("logs");
    let rows: Vec<(&str, &str)> = page
        .entries
        .iter()
        .map(|e| (e.event_id.as_str(), e.device_id.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("s1", second.device_id.as_str()),
            ("f1", first.device_id.as_str())
        ]
    );
    assert_eq!(page.entries[0].cumulative.premium, 1);
    assert_eq!(page.summary.totals.total, 2);
}

async fn csv_of(export: export::CsvExport) -> String {
    let mut body = export.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    String::from_utf8(out).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_parse_back_to_the_same_numbers() {
    let app = spawn_app().await;
    let d = app.handshake("02:00:00:00:00:08").await;
    bind_at(
        &app,
        &d,
        "M-CSV, \"quoted\"",
        Some("Café Ünïcode"),
        "2025-01-01T00:00:00Z",
    )
    .await;
    for i in 0..12 {
        let t = ["BASIC", "STANDARD", "PREMIUM"][i % 3];
        treat(
            &app,
            &d,
            &format!("x{i}"),
            t,
            &format!("2025-01-0{}T1{}:00:00Z", 2 + i % 3, i % 10),
        )
        .await;
    }
    let p = StatsParams {
        compare: true,
        ma: Some(2),
        ..params("day", "2025-01-01", "2025-01-05")
    };
    let s = query(&app, p.clone()).await;
    let text = csv_of(
        export::export_stats(&app.state.db, &p, Utc::now())
            .await
            .expect("csv"),
    )
    .await;
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader.headers().expect("header").clone();
    assert_eq!(&header[0], "bucket");
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), s.current.labels.len());
    for (i, row) in rows.iter().enumerate() {
        let get = |name: &str| row[header.iter().position(|h| h == name).expect(name)].to_owned();
        assert_eq!(get("bucket"), s.current.labels[i]);
        assert_eq!(
            get("total").parse::<i64>().unwrap(),
            s.current.series.total[i]
        );
        assert_eq!(
            get("basic").parse::<i64>().unwrap(),
            s.current.series.basic[i]
        );
        assert_eq!(
            get("ma_total").parse::<f64>().unwrap(),
            s.current.ma.as_ref().unwrap().total[i]
        );
        let previous = s.previous.as_ref().unwrap();
        assert_eq!(get("previous_bucket"), previous.labels[i]);
        assert_eq!(
            get("previous_total").parse::<i64>().unwrap(),
            previous.series.total[i]
        );
    }

    let raw = csv_of(
        export::export_events(
            &app.state.db,
            &export::ExportParams {
                start: Some("2025-01-01".into()),
                end: Some("2025-01-31".into()),
                ..Default::default()
            },
            Utc::now(),
        )
        .await
        .expect("export"),
    )
    .await;
    let mut reader = csv::Reader::from_reader(raw.as_bytes());
    let header = reader.headers().expect("header").clone();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), 12);
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    assert_eq!(&rows[0][col("machine_code")], "M-CSV, \"quoted\"");
    assert_eq!(&rows[0][col("outlet_name")], "Café Ünïcode");
    assert_eq!(&rows[0][col("device_id")], d.device_id);
    assert!(rows[0][col("payload")].contains("\"event_id\""));
    let basics = rows
        .iter()
        .filter(|r| &r[col("treatment")] == "BASIC")
        .count() as i64;
    assert_eq!(basics, s.current.totals.basic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_needs_the_confirmation_and_keeps_the_rollup_exact() {
    let app = spawn_app().await;
    let d = app.handshake("02:00:00:00:00:09").await;
    let e = app.handshake("02:00:00:00:00:0A").await;
    bind_at(&app, &d, "M-F", Some("F"), "2025-01-01T00:00:00Z").await;
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
    let err = export::flush(&app.state.db, &export::FlushRequest::default(), "tester")
        .await
        .expect_err("no confirmation");
    assert_eq!(err.code(), "confirmation_required");
    let confirm = Some(export::FLUSH_CONFIRMATION.to_owned());
    // Mid-hour: the 10:20 event stays, the 10:00 one goes.
    let flushed = export::flush(
        &app.state.db,
        &export::FlushRequest {
            confirm: confirm.clone(),
            before: Some("2025-01-02T10:10:00Z".into()),
            device_id: Some(d.device_id.clone()),
        },
        "tester",
    )
    .await
    .expect("flush");
    assert_eq!(flushed.deleted, 1);
    let p = || params("hour", "2025-01-02", "2025-01-03");
    let s = query(&app, p()).await;
    assert_eq!((s.current.totals.basic, s.current.totals.premium), (2, 3));
    assert_rollup_matches_raw(&app, p()).await;
    assert_rollup_matches_raw(
        &app,
        StatsParams {
            device_id: Some(d.device_id.clone()),
            ..p()
        },
    )
    .await;

    let flushed = export::flush(
        &app.state.db,
        &export::FlushRequest {
            confirm: confirm.clone(),
            before: Some("2025-01-03".into()),
            device_id: None,
        },
        "tester",
    )
    .await
    .expect("flush");
    assert_eq!(flushed.deleted, 3);
    let s = query(&app, p()).await;
    assert_eq!(s.current.totals.total, 2);
    assert_rollup_matches_raw(&app, p()).await;

    let flushed = export::flush(
        &app.state.db,
        &export::FlushRequest {
            confirm,
            ..Default::default()
        },
        "tester",
    )
    .await
    .expect("flush");
    assert_eq!(flushed.deleted, 2);
    assert_eq!(query(&app, p()).await.current.totals.total, 0);
}
