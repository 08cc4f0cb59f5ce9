//! Statistics and exports at scale, on SQLite. Driven by `bench/stats.sh`; three steps, each
//! its own process so that the export's memory is measured from a quiet start:
//!
//!   seed   --db FILE [--events N] [--days D]   a fleet of 1,000 devices on 1,000 machines in
//!          50 outlets, and N events (default 10,000,000) over the last D days (default 365),
//!          bulk-inserted and added to the rollup by the ingest path's own code
//!          (`domain::rollup::add`), batch by batch
//!   query  --db FILE                          latency of the stats queries the issue names
//!   export --db FILE                          a full raw CSV export: rows/s and peak RSS
//!
//! Prints figures; asserts nothing but that the rollup answers like raw events.
//!
//! The export runs the server's own export code (`domain::export`, the stream the HTTP handler
//! sends) in this process, with the server's allocator; its memory is this process's resident
//! set: idle (connected, migrated, one query answered) against the peak while the export runs,
//! the peak counter being reset once idle.

use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
use futures_util::StreamExt;
use migration::MigratorTrait;
use ozone::{
    db::Db,
    domain::{
        devices::{self, Mac},
        events::Treatment,
        export, fleet,
        rollup::{self, Counted},
        stats::{self, StatsParams},
    },
};
use sea_orm::{ConnectionTrait, Statement, Value};

// The server's allocator, so that the export's memory is what the server's would be.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: usize = 1000;
const OUTLETS: usize = 50;

struct Args {
    step: String,
    db: String,
    events: u64,
    days: i64,
}

fn args() -> Args {
    let mut a = Args {
        step: String::new(),
        db: String::new(),
        events: 10_000_000,
        days: 365,
    };
    let mut it = std::env::args().skip(1).filter(|x| x != "--bench");
    while let Some(x) = it.next() {
        match x.as_str() {
            "--db" => a.db = it.next().unwrap_or_default(),
            "--events" => a.events = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.events),
            "--days" => a.days = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.days),
            step => a.step = step.to_owned(),
        }
    }
    a
}

/// A small, fast, deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where the seeded year ends: the start of the current hour.
fn seed_end() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap_or_else(|_| Utc::now())
}

async fn open(path: &str) -> Db {
    let db = Db::connect(&format!("sqlite://{path}?mode=rwc"), 4)
        .await
        .expect("open database");
    migration::Migrator::up(db.conn(), None)
        .await
        .expect("migrate");
    db
}

const COLUMNS: &str = "device_id, event_id, event, treatment, counter, occurred_at, \
    occurred_epoch, device_timestamp, received_at, wifi_status, payload, machine_id, outlet_id";
const ROWS_PER_INSERT: usize = 500;

async fn seed(a: &Args) {
    let db = open(&a.db).await;
    let end = seed_end();
    let start = end - chrono::Duration::days(a.days);
    let started = Instant::now();

    // The fleet, bound since the start of the seeded period.
    let txn = db.begin_write().await.expect("write");
    let mut outlets = Vec::new();
    for o in 0..OUTLETS {
        let (outlet, _) = fleet::outlet_named(&*txn, &format!("Outlet {o:02}"), start)
            .await
            .expect("outlet");
        outlets.push(outlet.id);
    }
    // (device pk, device_id, machine, outlet)
    let mut fleet_rows = Vec::new();
    for i in 0..DEVICES {
        let outlet = outlets[i % OUTLETS];
        let (machine, _) = fleet::machine_coded(&*txn, &format!("M-{i:04}"), Some(outlet), start)
            .await
            .expect("machine");
        let mac = Mac::parse(&format!("02:42:53:54:{:02X}:{:02X}", i >> 8, i & 255)).expect("mac");
        let device = devices::register(&*txn, &mac, start).await.expect("device");
        fleet::bind(&*txn, &machine, &device, start)
            .await
            .expect("bind");
        fleet_rows.push((device.id, device.device_id.clone(), machine.id, outlet));
    }
    txn.commit().await.expect("commit");

    // Events, hour by hour, more by day than by night.
    let hours = a.days * 24;
    let weight = |hour_of_day: i64| -> u64 {
        match hour_of_day {
            0..=6 => 1,
            7..=9 => 4,
            10..=18 => 8,
            _ => 3,
        }
    };
    let day_weight: u64 = (0..24).map(weight).sum();
    let per_day = a.events as f64 / a.days as f64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seq: u64 = 0;
    let mut counters = vec![0i64; DEVICES];
    let mut batch: Vec<(usize, i64, Treatment)> = Vec::new();
    let mut carry = 0.0f64;
    for h in 0..hours {
        let hour_start = start + chrono::Duration::hours(h);
        let exact = per_day * weight(h % 24) as f64 / day_weight as f64 + carry;
        let mut n = exact.floor() as u64;
        carry = exact - n as f64;
        if h == hours - 1 {
            n = a.events.saturating_sub(seq + batch.len() as u64);
        }
        let mut hour: Vec<(usize, i64, Treatment)> = (0..n)
            .map(|_| {
                let device = rng.below(DEVICES as u64) as usize;
                let second = rng.below(3600) as i64;
                let treatment = match rng.below(10) {
                    0..=4 => Treatment::Basic,
                    5..=7 => Treatment::Standard,
                    _ => Treatment::Premium,
                };
                (device, hour_start.timestamp() + second, treatment)
            })
            .collect();
        hour.sort_by_key(|e| e.1);
        batch.extend(hour);
        if batch.len() >= 20_000 || h == hours - 1 {
            write_batch(&db, &fleet_rows, &batch, &mut seq, &mut counters).await;
            batch.clear();
            if seq % 1_000_000 < 20_000 {
                eprintln!(
                    "seeded {seq} events in {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    db.close().await.expect("close");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seed: {seq} events, {DEVICES} devices/machines, {OUTLETS} outlets, {} days in {secs:.0} s ({:.0} events/s)",
        a.days,
        seq as f64 / secs
    );
}

async fn write_batch(
    db: &Db,
    fleet_rows: &[(i32, String, i32, i32)],
    batch: &[(usize, i64, Treatment)],
    seq: &mut u64,
    counters: &mut [i64],
) {
    let txn = db.begin_write().await.expect("write");
    for chunk in batch.chunks(ROWS_PER_INSERT) {
        let mut sql = format!("INSERT INTO telemetry_events ({COLUMNS}) VALUES ");
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 13);
        for (i, (device, epoch, treatment)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
            let (pk, device_id, machine, outlet) = &fleet_rows[*device];
            *seq += 1;
            counters[*device] += 1;
            let at = DateTime::from_timestamp(*epoch, 0).unwrap_or_default();
            let event_id = format!("esp32-{seq:010}");
            let ts = ozone::domain::wire_time(at);
            let payload = format!(
                "{{\"device_id\":\"{device_id}\",\"event_id\":\"{event_id}\",\"event\":\"treatment\",\"treatment\":\"{}\",\"counter\":{},\"ts\":\"{ts}\"}}",
                treatment.as_str(),
                counters[*device]
            );
            values.extend([
                Value::from(*pk),
                event_id.into(),
                "treatment".into(),
                treatment.as_str().into(),
                counters[*device].into(),
                at.into(),
                (*epoch).into(),
                ts.into(),
                (at + chrono::Duration::milliseconds(250)).into(),
                true.into(),
                payload.into(),
                (*machine).into(),
                (*outlet).into(),
            ]);
        }
        txn.execute_raw(Statement::from_sql_and_values(
            sea_orm::DbBackend::Sqlite,
            sql,
            values,
        ))
        .await
        .expect("insert");
    }
    rollup::add(
        &*txn,
        batch.iter().map(|(device, epoch, treatment)| {
            let (pk, _, machine, outlet) = &fleet_rows[*device];
            Counted {
                device: *pk,
                occurred_epoch: *epoch,
                machine: Some(*machine),
                outlet: Some(*outlet),
                treatment: *treatment,
            }
        }),
    )
    .await
    .expect("rollup");
    txn.commit().await.expect("commit");
}

async fn time<F, Fut, T>(label: &str, runs: usize, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = f().await; // warm-up
    let mut times: Vec<Duration> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        out = f().await;
        times.push(t.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<58} median {:>7.1} ms  min {:>7.1} ms  max {:>7.1} ms",
        ms(times[runs / 2]),
        ms(times[0]),
        ms(times[runs - 1])
    );
    out
}

async fn query(a: &Args) {
    let db = open(&a.db).await;
    let now = seed_end() - chrono::Duration::seconds(1);
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            db.conn()
                .query_one_raw(Statement::from_string(sea_orm::DbBackend::Sqlite, sql))
                .await
                .expect("count")
                .and_then(|r| r.try_get::<i64>("", "n").ok())
                .unwrap_or(0)
        }
    };
    println!(
        "database: {} events, {} rollup rows (device level), {} (outlet level), {} (fleet level)",
        count("SELECT COUNT(*) AS n FROM telemetry_events").await,
        count("SELECT COUNT(*) AS n FROM stats_hourly").await,
        count("SELECT COUNT(*) AS n FROM stats_hourly_outlets").await,
        count("SELECT COUNT(*) AS n FROM stats_hourly_fleet").await,
    );
    let outlet = stats::options(&db, None, None)
        .await
        .expect("options")
        .outlets[7]
        .id;
    let machine = stats::options(&db, Some(outlet), None)
        .await
        .expect("options")
        .machines[3]
        .id;
    let runs = 7;
    let run = |p: StatsParams| {
        let db = db.clone();
        async move { stats::stats(&db, &p, now).await.expect("stats") }
    };
    let daily = |outlet_id, machine_id| StatsParams {
        granularity: Some("day".into()),
        days: Some(30),
        outlet_id,
        machine_id,
        ..StatsParams::default()
    };
    let all = time("30 days daily, all outlets", runs, || {
        run(daily(None, None))
    })
    .await;
    time("30 days daily, one outlet", runs, || {
        run(daily(Some(outlet), None))
    })
    .await;
    time("30 days daily, one machine", runs, || {
        run(daily(None, Some(machine)))
    })
    .await;
    let yearly = time(
        "1 year monthly, compare, tz=Europe/Berlin, all outlets",
        runs,
        || {
            run(StatsParams {
                granularity: Some("month".into()),
                days: Some(365),
                compare: true,
                tz: Some("Europe/Berlin".into()),
                ..StatsParams::default()
            })
        },
    )
    .await;
    time("24 hours by minute, all outlets (raw events)", runs, || {
        run(StatsParams {
            granularity: Some("minute".into()),
            days: Some(1),
            ..StatsParams::default()
        })
    })
    .await;
    time(
        "30 days daily, all outlets, tz=Asia/Kolkata (raw events)",
        3,
        || {
            run(StatsParams {
                tz: Some("Asia/Kolkata".into()),
                ..daily(None, None)
            })
        },
    )
    .await;
    let q = stats::StatsQuery::from_params(&db, &daily(None, None), now)
        .await
        .expect("query");
    let raw = stats::count_raw(db.conn(), q.filter, &q.buckets)
        .await
        .expect("raw");
    let raw_total: i64 = raw.iter().map(|b| b.iter().sum::<i64>()).sum();
    println!(
        "30-day total {} from the rollup, {raw_total} from raw events; yearly total {}",
        all.current.totals.total, yearly.current.totals.total
    );
    assert_eq!(all.current.totals.total, raw_total);
}

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn export_all(a: &Args) {
    let db = open(&a.db).await;
    // Idle: connected, migrated, one query answered.
    db.ping().await.expect("ping");
    let idle = rss_kb("VmRSS:");
    // From here on, VmHWM is the peak of the export alone (not of opening and migrating).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let started = Instant::now();
    let csv = export::export_events(
        &db,
        &export::ExportParams {
            days: Some(stats::MAX_DAYS),
            ..Default::default()
        },
        Utc::now(),
    )
    .await
    .expect("export");
    let mut body = csv.body;
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    let rows = lines.saturating_sub(1);
    let peak = rss_kb("VmHWM:");
    println!(
        "export: {rows} rows, {:.0} MB of CSV in {secs:.1} s = {:.0} rows/s; RSS idle {:.1} MB, peak {:.1} MB (+{:.1} MB)",
        bytes as f64 / 1e6,
        rows as f64 / secs,
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak.saturating_sub(idle)) as f64 / 1024.0
    );
}

fn main() {
    let a = args();
    if a.db.is_empty() {
        eprintln!("usage: stats (seed [--events N] [--days D] | query | export) --db FILE");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        match a.step.as_str() {
            "seed" => seed(&a).await,
            "query" => query(&a).await,
            "export" => export_all(&a).await,
            other => {
                eprintln!("unknown step `{other}`: seed, query or export");
                std::process::exit(2);
            }
        }
    });
}
