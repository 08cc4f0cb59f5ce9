//! `ozone-sim`: replays the firmware vectors against a running server, generates event-ingest
//! load, and simulates a fleet of legacy HTTP devices or of MQTT devices (`mqtt`).

mod mqtt;

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use firmware_compat::{load_vectors, Client, Response, VECTORS_DIR};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "ozone-sim",
    version,
    about = "Firmware contract replay, device simulator and load generator for Ozone"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay the firmware wire-contract vectors against a running server.
    Replay(ReplayArgs),
    /// Load-test durable event ingest (POST /api/device/events/).
    Ingest(IngestArgs),
    /// Load-test command polls (GET /api/device/{id}/commands/); the devices must be assigned
    /// beforehand (see --mac-prefix), and polls that find nothing are the common case.
    Poll(IngestArgs),
    /// Run simulated devices: handshake, poll and execute commands, post treatments.
    Simulate(SimulateArgs),
    /// MQTT devices: simulate a fleet, or measure durable ingest, raw publish rate, idle
    /// connections.
    Mqtt(mqtt::MqttArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Directory of vector files.
    #[arg(long, default_value = VECTORS_DIR)]
    dir: PathBuf,
    /// The `ozone` binary, to run the operator steps (`device assign`, `command send`).
    #[arg(long, requires = "database_url")]
    ozone_bin: Option<PathBuf>,
    /// The server's database URL, passed to `ozone --database-url` for operator steps.
    #[arg(long, requires = "ozone_bin")]
    database_url: Option<String>,
    /// Only vectors whose name or file name contains this text.
    #[arg(long)]
    only: Option<String>,
}

#[derive(Debug, Args)]
struct IngestArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Devices to handshake; connection i posts for device i % devices.
    #[arg(long, default_value_t = 64)]
    devices: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    warmup: f64,
    /// Print the results as one JSON line.
    #[arg(long)]
    json: bool,
    /// First four bytes of the devices' MACs (device i gets `<prefix>:HH:LL`), e.g. to load
    /// devices registered and assigned beforehand; random per run when absent.
    #[arg(long)]
    mac_prefix: Option<String>,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// First four bytes of the devices' MACs; device i gets `<prefix>:HH:LL` from i.
    #[arg(long, default_value = "02:53:49:4D")]
    mac_prefix: String,
    /// Seconds between command polls of each device.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    poll_interval: f64,
    /// Mean seconds between treatments of each device (0: no treatments).
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    event_interval: f64,
    /// Stop after this many seconds (0: run until interrupted).
    #[arg(long, default_value_t = 0.0, value_parser = seconds)]
    duration: f64,
    /// Firmware version the devices report.
    #[arg(long, default_value = "ozone-sim/0.1")]
    firmware: String,
    /// Print every event and poll, not only commands and errors.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("ozone-sim: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Replay(args) => replay(args).await,
            Command::Ingest(args) => ingest(args, Load::Events).await,
            Command::Poll(args) => ingest(args, Load::Polls).await,
            Command::Simulate(args) => simulate(args).await,
            Command::Mqtt(args) => mqtt::run(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ozone-sim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A number of seconds: finite, not negative, at most a year.
fn seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=31_536_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds between 0 and 31536000"
        )),
    }
}

/// Resolves `http://host[:port][/...]` to a socket address.
async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("`{url}`: only http:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let target = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut addrs = tokio::net::lookup_host(target.as_str())
        .await
        .with_context(|| format!("resolving {target}"))?;
    addrs
        .next()
        .ok_or_else(|| anyhow!("{target} does not resolve"))
}

/// Non-cryptographic randomness for run prefixes and jitter.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// xorshift64*: cheap per-task randomness.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(random_u64() | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`, written into `out`.
fn write_utc_now(out: &mut Vec<u8>) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    write_utc(out, secs);
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn write_utc(out: &mut Vec<u8>, secs: i64) {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

fn mac_of(prefix: &str, index: usize) -> String {
    format!("{prefix}:{:02X}:{:02X}", (index >> 8) & 0xff, index & 0xff)
}

fn json_body(response: &Response) -> Value {
    serde_json::from_slice(&response.body).unwrap_or(Value::Null)
}

async fn post_json(
    client: &mut Client,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<Response> {
    let bytes = serde_json::to_vec(body)?;
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        client.send("POST", path, &headers, &bytes),
    )
    .await
    .map_err(|_| anyhow!("POST {path}: no response within 30 s"))??;
    Ok(response)
}

#[derive(Debug, Clone)]
struct Credentials {
    device_id: String,
    token: String,
}

async fn handshake(
    client: &mut Client,
    mac: &str,
    firmware: &str,
) -> anyhow::Result<(Credentials, bool)> {
    let response = post_json(
        client,
        "/api/handshake/",
        None,
        &json!({ "mac": mac, "firmware": firmware }),
    )
    .await
    .with_context(|| format!("handshake of {mac} with {}", client.addr()))?;
    let body = json_body(&response);
    if response.status != 200 {
        bail!(
            "handshake of {mac}: {} {}",
            response.status,
            response.text()
        );
    }
    let field = |k: &str| {
        body[k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("handshake of {mac}: no `{k}` in {body}"))
    };
    Ok((
        Credentials {
            device_id: field("device_id")?,
            token: field("token")?,
        },
        body["assigned"].as_bool().unwrap_or(false),
    ))
}

// ---------------------------------------------------------------------------------------------
// replay

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let addr = resolve(&args.url).await?;
    let vectors = load_vectors(&args.dir)?;
    let admin_cli = args.ozone_bin.clone().zip(args.database_url.clone());
    let mut admin = move |cli_args: &[String]| -> anyhow::Result<String> {
        let Some((bin, database_url)) = &admin_cli else {
            bail!("operator steps need --ozone-bin and --database-url");
        };
        let output = std::process::Command::new(bin)
            .arg("--database-url")
            .arg(database_url)
            .args(cli_args)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !output.status.success() {
            bail!(
                "`ozone {}` exited with {}: {}",
                cli_args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for vector in &vectors {
        if let Some(only) = &args.only {
            if !vector.name.contains(only.as_str()) && !vector.file.contains(only.as_str()) {
                continue;
            }
        }
        if vector.needs_admin() && args.ozone_bin.is_none() {
            println!(
                "skip  {} ({}): has operator steps; pass --ozone-bin and --database-url to run it",
                vector.name, vector.file
            );
            skipped += 1;
            continue;
        }
        match vector.replay(addr, &mut admin).await {
            Ok(()) => {
                println!("ok    {} ({})", vector.name, vector.file);
                passed += 1;
            }
            Err(err) => {
                println!("FAIL  {err:#}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------------------------
// ingest

#[derive(Debug, Default)]
struct ConnStats {
    ok: u64,
    non_200: u64,
    errors: u64,
    /// Microseconds, successful measured requests only.
    latencies: Vec<u32>,
    first_non_200: Option<String>,
    first_error: Option<String>,
}

/// What a load connection sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Events,
    Polls,
}

impl ConnStats {
    /// Counts one request's outcome; false once the run's end cut it off. After a connection
    /// error it pauses a little, so as not to spin against a server that refuses connections.
    async fn record<E: std::fmt::Display>(
        &mut self,
        outcome: Result<Result<(), E>, tokio::time::error::Elapsed>,
        sent: tokio::time::Instant,
        measure_from: tokio::time::Instant,
        response: &Response,
    ) -> bool {
        let measured = sent >= measure_from;
        match outcome {
            // Cut off by the end of the run: neither a success nor an error.
            Err(_) => return false,
            Ok(Err(err)) => {
                if measured {
                    self.errors += 1;
                }
                self.first_error.get_or_insert_with(|| err.to_string());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Ok(())) => {
                let micros = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                if response.status == 200 {
                    if measured {
                        self.ok += 1;
                        self.latencies.push(micros);
                    }
                } else {
                    if measured {
                        self.non_200 += 1;
                    }
                    self.first_non_200
                        .get_or_insert_with(|| format!("{} {}", response.status, response.text()));
                }
            }
        }
        true
    }
}

async fn ingest(args: IngestArgs, load: Load) -> anyhow::Result<ExitCode> {
    if args.connections == 0 || args.devices == 0 {
        bail!("--connections and --devices must be at least 1");
    }
    if args.devices > 65_536 {
        bail!("--devices is limited to 65536");
    }
    if args.duration == 0.0 {
        bail!("--duration must be positive");
    }
    let addr = resolve(&args.url).await?;
    let run = random_u64();
    let prefix = match &args.mac_prefix {
        Some(prefix) => valid_mac_prefix(prefix)?,
        None => {
            let b = (run as u32).to_be_bytes();
            format!("02:{:02X}:{:02X}:{:02X}", b[0], b[1], b[2])
        }
    };
    let run_tag = format!("{:08x}", run as u32);

    let devices = handshake_all(addr, &prefix, args.devices, args.connections).await?;

    let start = tokio::time::Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::with_capacity(args.connections);
    for conn in 0..args.connections {
        let device = devices[conn % devices.len()].clone();
        let run_tag = run_tag.clone();
        tasks.push(tokio::spawn(ingest_connection(
            addr,
            load,
            conn,
            device,
            run_tag,
            measure_from,
            end,
        )));
    }
    let mut total = ConnStats::default();
    for task in tasks {
        let stats = task.await.context("a connection task panicked")?;
        total.ok += stats.ok;
        total.non_200 += stats.non_200;
        total.errors += stats.errors;
        total.latencies.extend_from_slice(&stats.latencies);
        total.first_non_200 = total.first_non_200.or(stats.first_non_200);
        total.first_error = total.first_error.or(stats.first_error);
    }
    total.latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        let l = &total.latencies;
        if l.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * l.len() as f64).ceil() as usize;
        f64::from(l[rank.clamp(1, l.len()) - 1]) / 1000.0
    };
    let rps = total.ok as f64 / args.duration;
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    if args.json {
        println!(
            "{}",
            json!({
                "url": args.url,
                "connections": args.connections,
                "devices": args.devices,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "ok": total.ok,
                "rps": (rps * 10.0).round() / 10.0,
                "non_200": total.non_200,
                "errors": total.errors,
                "latency_ms": {
                    "p50": round(pct(50.0)),
                    "p90": round(pct(90.0)),
                    "p99": round(pct(99.0)),
                    "max": round(pct(100.0)),
                },
            })
        );
    } else {
        println!(
            "{}: {} connections, {} devices, {:.1} s measured after {:.1} s warm-up",
            if load == Load::Polls {
                "poll"
            } else {
                "ingest"
            },
            args.connections,
            args.devices,
            args.duration,
            args.warmup
        );
        println!("  requests/s  {rps:.1} ({} ok)", total.ok);
        println!("  non-200     {}", total.non_200);
        println!("  errors      {}", total.errors);
        println!(
            "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            pct(50.0),
            pct(90.0),
            pct(99.0),
            pct(100.0)
        );
    }
    if let Some(first) = &total.first_non_200 {
        eprintln!("first non-200 response: {first}");
    }
    if let Some(first) = &total.first_error {
        eprintln!("first error: {first}");
    }
    Ok(if total.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Handshakes `count` devices over up to `connections` (at most 32) parallel connections.
async fn handshake_all(
    addr: SocketAddr,
    prefix: &str,
    count: usize,
    connections: usize,
) -> anyhow::Result<Vec<Credentials>> {
    let workers = connections.clamp(1, 32).min(count);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(addr);
            let mut out = Vec::new();
            for index in (w..count).step_by(workers) {
                let (creds, _) =
                    handshake(&mut client, &mac_of(&prefix, index), "ozone-sim/0.1").await?;
                out.push((index, creds));
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await.context("a handshake task panicked")??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, c)| c).collect())
}

async fn ingest_connection(
    addr: SocketAddr,
    load: Load,
    conn: usize,
    device: Credentials,
    run_tag: String,
    measure_from: tokio::time::Instant,
    end: tokio::time::Instant,
) -> ConnStats {
    const TREATMENTS: [&str; 3] = ["BASIC", "STANDARD", "PREMIUM"];
    let mut stats = ConnStats {
        latencies: Vec::with_capacity(64 * 1024),
        ..ConnStats::default()
    };
    let mut client = Client::new(addr);
    let auth = format!("Bearer {}", device.token);
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let mut body = Vec::with_capacity(512);
    let mut response = Response::default();
    let mut counts = [0u64; 3];
    let mut seq: u64 = 0;
    let poll_path = format!("/api/device/{}/commands/", device.device_id);
    while tokio::time::Instant::now() < end {
        if load == Load::Polls {
            let sent = tokio::time::Instant::now();
            let outcome = tokio::time::timeout_at(
                end,
                client.send_into("GET", &poll_path, &headers[1..], b"", &mut response),
            )
            .await;
            if !stats.record(outcome, sent, measure_from, &response).await {
                break;
            }
            continue;
        }
        let t = (seq % 3) as usize;
        counts[t] += 1;
        body.clear();
        let _ = write!(
            body,
            r#"{{"device_id":"{}","firmware":"ozone-sim/0.1","event_id":"sim-{run_tag}-{conn}-{seq}","event":"treatment","treatment":"{}","counter":{},"ts":""#,
            device.device_id, TREATMENTS[t], counts[t]
        );
        write_utc_now(&mut body);
        let _ = write!(
            body,
            r#"","current_counters":{{"basic":{},"standard":{},"premium":{}}}}}"#,
            counts[0], counts[1], counts[2]
        );
        seq += 1;

        let sent = tokio::time::Instant::now();
        let outcome = tokio::time::timeout_at(
            end,
            client.send_into(
                "POST",
                "/api/device/events/",
                &headers,
                &body,
                &mut response,
            ),
        )
        .await;
        if !stats.record(outcome, sent, measure_from, &response).await {
            break;
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// simulate

/// Checks and upper-cases a `--mac-prefix` of four hex bytes.
fn valid_mac_prefix(prefix: &str) -> anyhow::Result<String> {
    let prefix = prefix.trim().to_ascii_uppercase();
    let valid = prefix.split(':').count() == 4
        && prefix
            .split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    if !valid {
        bail!("--mac-prefix must be four hex bytes like 02:53:49:4D");
    }
    Ok(prefix)
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let prefix = valid_mac_prefix(&args.mac_prefix)?;
    if args.devices == 0 || args.devices > 65_536 {
        bail!("--devices must be 1-65536");
    }
    if args.poll_interval == 0.0 {
        bail!("--poll-interval must be positive");
    }
    let addr = resolve(&args.url).await?;
    let boot = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let deadline = (args.duration > 0.0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs_f64(args.duration));
    let args = std::sync::Arc::new(args);
    let mut tasks = Vec::with_capacity(args.devices);
    for index in 0..args.devices {
        let args = args.clone();
        let mac = mac_of(&prefix, index);
        tasks.push(tokio::spawn(async move {
            let run = run_device(addr, mac.clone(), boot, &args);
            let outcome = match deadline {
                Some(d) => tokio::time::timeout_at(d, run).await.unwrap_or(Ok(())),
                None => run.await,
            };
            if let Err(err) = outcome {
                eprintln!("{mac}: stopped: {err:#}");
            }
        }));
    }
    for task in tasks {
        task.await.context("a device task panicked")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One simulated device. It runs until its task is dropped.
async fn run_device(
    addr: SocketAddr,
    mac: String,
    boot: u64,
    args: &SimulateArgs,
) -> anyhow::Result<()> {
    const TREATMENTS: [&str; 3] = ["BASIC", "STANDARD", "PREMIUM"];
    let mut client = Client::new(addr);
    let mut rng = Rng::new();
    let (mut creds, assigned) = handshake(&mut client, &mac, &args.firmware).await?;
    println!("{}: handshake ok (assigned: {assigned})", creds.device_id);
    let mut counters = [0u64; 3];
    let mut seq: u64 = 0;
    let mut waiting_for_assignment = false;
    let now = tokio::time::Instant::now();
    let poll_every = Duration::from_secs_f64(args.poll_interval);
    // Spread the first polls so devices do not arrive in lockstep.
    let mut next_poll = now + poll_every.mul_f64(rng.unit());
    let next_gap = |rng: &mut Rng| {
        // Exponential gaps: treatments arrive as a Poisson process.
        Duration::from_secs_f64(-args.event_interval * (1.0 - rng.unit()).ln())
    };
    let mut next_event = (args.event_interval > 0.0).then(|| now + next_gap(&mut rng));
    loop {
        let wake = next_event.map_or(next_poll, |e| e.min(next_poll));
        tokio::time::sleep_until(wake).await;
        let now = tokio::time::Instant::now();

        if next_event.is_some_and(|e| e <= now) {
            next_event = Some(now + next_gap(&mut rng));
            let t = (rng.next() % 3) as usize;
            counters[t] += 1;
            seq += 1;
            let event_id = format!(
                "{}-{boot}-{seq}",
                creds.device_id.replace(':', "").to_ascii_lowercase()
            );
            let mut ts = Vec::with_capacity(20);
            write_utc_now(&mut ts);
            let body = json!({
                "device_id": creds.device_id,
                "firmware": args.firmware,
                "event_id": event_id,
                "event": "treatment",
                "treatment": TREATMENTS[t],
                "counter": counters[t],
                "ts": String::from_utf8_lossy(&ts),
                "current_counters": {
                    "basic": counters[0], "standard": counters[1], "premium": counters[2],
                },
            });
            match post_json(
                &mut client,
                "/api/device/events/",
                Some(&creds.token),
                &body,
            )
            .await
            {
                Ok(r) if r.status == 200 => {
                    if args.verbose {
                        println!(
                            "{}: {} #{} acked",
                            creds.device_id, TREATMENTS[t], counters[t]
                        );
                    }
                }
                Ok(r) if r.status == 401 && json_body(&r)["code"] == "invalid_token" => {
                    println!("{}: token rejected, handshaking again", creds.device_id);
                    creds = handshake(&mut client, &mac, &args.firmware).await?.0;
                }
                Ok(r) => eprintln!(
                    "{}: event refused: {} {}",
                    creds.device_id,
                    r.status,
                    r.text()
                ),
                Err(err) => eprintln!("{}: event failed: {err:#}", creds.device_id),
            }
        }

        if next_poll <= now {
            next_poll = now + poll_every;
            let path = format!("/api/device/{}/commands/", creds.device_id);
            let auth = format!("Bearer {}", creds.token);
            let polled = tokio::time::timeout(
                Duration::from_secs(30),
                client.send("GET", &path, &[("Authorization", &auth)], b""),
            )
            .await
            .map_err(|_| anyhow!("no response within 30 s"))
            .and_then(|r| Ok(r?));
            let response = match polled {
                Ok(r) => r,
                Err(err) => {
                    eprintln!("{}: poll failed: {err:#}", creds.device_id);
                    continue;
                }
            };
            let body = json_body(&response);
            match (response.status, body["code"].as_str()) {
                (200, _) => {
                    if waiting_for_assignment {
                        println!("{}: assigned, polling commands", creds.device_id);
                        waiting_for_assignment = false;
                    }
                }
                (401, Some("device_unassigned")) => {
                    if !waiting_for_assignment {
                        println!(
                            "{}: not assigned yet; assign it with `ozone device assign {} --machine <code>`",
                            creds.device_id, creds.device_id
                        );
                        waiting_for_assignment = true;
                    }
                    continue;
                }
                (401, Some("invalid_token")) => {
                    println!("{}: token rejected, handshaking again", creds.device_id);
                    creds = handshake(&mut client, &mac, &args.firmware).await?.0;
                    continue;
                }
                (status, _) => {
                    eprintln!(
                        "{}: poll refused: {status} {}",
                        creds.device_id,
                        response.text()
                    );
                    continue;
                }
            }
            if args.verbose {
                println!("{}: polled", creds.device_id);
            }
            let commands = body["commands"].as_array().cloned().unwrap_or_default();
            for command in commands {
                let command_id = command["command_id"].as_str().unwrap_or_default();
                let command_type = command["command_type"].as_str().unwrap_or_default();
                let mut result =
                    json!({ "success": true, "message": format!("{command_type} executed") });
                if command_type.eq_ignore_ascii_case("RESET") {
                    counters = [0; 3];
                    result["message"] = json!("counters reset");
                    result["current_counters"] = json!({ "basic": 0, "standard": 0, "premium": 0 });
                }
                let path = format!("/api/device/{}/commands/{command_id}/", creds.device_id);
                match post_json(&mut client, &path, Some(&creds.token), &result).await {
                    Ok(r) if r.status == 200 => println!(
                        "{}: {command_type} {command_id} -> {}",
                        creds.device_id,
                        json_body(&r)["status"].as_str().unwrap_or("?")
                    ),
                    Ok(r) => eprintln!(
                        "{}: result for {command_id} refused: {} {}",
                        creds.device_id,
                        r.status,
                        r.text()
                    ),
                    Err(err) => eprintln!(
                        "{}: result for {command_id} failed: {err:#}",
                        creds.device_id
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps_are_iso_8601() {
        for (secs, expected) in [
            (0, "1970-01-01T00:00:00Z"),
            (1_758_026_096, "2025-09-16T12:34:56Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
        ] {
            let mut out = Vec::new();
            write_utc(&mut out, secs);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        let mut out = Vec::new();
        write_utc_now(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.len(), 20, "{s}");
        assert!(
            s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T",
            "{s}"
        );
    }

    #[test]
    fn device_macs_come_from_prefix_and_index() {
        assert_eq!(mac_of("02:53:49:4D", 0), "02:53:49:4D:00:00");
        assert_eq!(mac_of("02:53:49:4D", 258), "02:53:49:4D:01:02");
    }

    #[tokio::test]
    async fn urls_resolve_with_default_port() {
        assert_eq!(
            resolve("http://127.0.0.1:18123").await.unwrap(),
            "127.0.0.1:18123".parse().unwrap()
        );
        assert_eq!(resolve("http://127.0.0.1/x").await.unwrap().port(), 80);
        assert!(resolve("https://127.0.0.1").await.is_err());
    }
}
