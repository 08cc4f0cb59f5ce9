//! `ozone-sim mqtt`: devices on the MQTT contract (rumqttc). They handshake over HTTP, connect
//! with `client_id = username = device_id` and the token as password, and then:
//! - `simulate`: publish treatments, execute the commands they receive and report results;
//! - `ingest`: publish events as fast as acknowledgements come back (`window` in flight per
//!   device) and report durable events/s (acknowledged on `events/ack` after commit);
//! - `raw`: publish QoS 1 messages and count PUBACKs (transport only; with `--anonymous`, no
//!   handshake, so any MQTT broker can be measured with the same load);
//! - `idle`: connect and stay connected (for memory measurements).

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use crate::{handshake_all, mac_of, random_u64, resolve, seconds, valid_mac_prefix, Credentials};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Simulate,
    Ingest,
    Raw,
    Idle,
}

#[derive(Debug, Args)]
pub struct MqttArgs {
    /// What the devices do.
    #[arg(long, value_enum, default_value = "simulate")]
    mode: Mode,
    /// Base URL of the server, for the handshakes.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// MQTT broker, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// Number of devices (one connection each).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Measured seconds (simulate/idle: run time; 0 runs until interrupted).
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    warmup: f64,
    /// Seconds to wait between the HTTP handshakes and the MQTT connections (announced on
    /// stderr as "handshakes done"), so the server can be measured in between.
    #[arg(long, default_value_t = 0.0, value_parser = seconds)]
    pause_after_handshakes: f64,
    /// MQTT keep-alive of each device, in seconds: an idle device sends a PINGREQ this often.
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// QoS 1 messages each device keeps in flight (ingest, raw).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Mean seconds between treatments of each device (simulate).
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    event_interval: f64,
    /// No handshake: client ids `sim-N`, no credentials (raw mode against any broker).
    #[arg(long)]
    anonymous: bool,
    /// Topic prefix of the MQTT contract.
    #[arg(long, default_value = "ozone/")]
    prefix: String,
    /// First four bytes of the devices' MACs; random per run when absent.
    #[arg(long)]
    mac_prefix: Option<String>,
    /// Print the results as one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    acked: AtomicU64,
    refused: AtomicU64,
    commands: AtomicU64,
    errors: AtomicU64,
}

pub async fn run(args: MqttArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.devices == 0 || args.devices > 65_536 {
        bail!("--devices must be 1-65536");
    }
    if args.window == 0 {
        bail!("--window must be at least 1");
    }
    let broker = tokio::net::lookup_host(args.mqtt.as_str())
        .await
        .with_context(|| format!("resolving {}", args.mqtt))?
        .next()
        .with_context(|| format!("{} does not resolve", args.mqtt))?;
    let devices: Vec<Credentials> = if args.anonymous {
        (0..args.devices)
            .map(|i| Credentials {
                device_id: format!("sim-{i}"),
                token: String::new(),
            })
            .collect()
    } else {
        let addr = resolve(&args.url).await?;
        let prefix = match &args.mac_prefix {
            Some(p) => valid_mac_prefix(p)?,
            None => {
                let b = (random_u64() as u32).to_be_bytes();
                format!("02:{:02X}:{:02X}:{:02X}", b[0], b[1], b[2])
            }
        };
        handshake_all(addr, &prefix, args.devices, 32).await?
    };
    if args.pause_after_handshakes > 0.0 {
        eprintln!("handshakes done: {} devices", devices.len());
        tokio::time::sleep(Duration::from_secs_f64(args.pause_after_handshakes)).await;
    }
    let _ = mac_of;
    let args = Arc::new(args);
    let counters = Arc::new(Counters::default());
    let run_tag = format!("{:08x}", random_u64() as u32);
    let mut tasks = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let (args, counters, run_tag) = (args.clone(), counters.clone(), run_tag.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(err) = device_task(broker, index, device, &args, &counters, &run_tag).await {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                if counters.errors.load(Ordering::Relaxed) <= 3 {
                    eprintln!("device {index}: {err:#}");
                }
            }
        }));
        // Do not storm the listener's backlog with thousands of SYNs at once.
        if index % 256 == 255 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Wait for the fleet to connect (bounded), then measure.
    let all_in = tokio::time::Instant::now() + Duration::from_secs(120);
    let settled = || {
        let errors = counters.errors.load(Ordering::Relaxed) as usize;
        counters.connected.load(Ordering::Relaxed) + errors >= args.devices
    };
    while !settled() && tokio::time::Instant::now() < all_in {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = counters.connected.load(Ordering::Relaxed);
    eprintln!("{connected} of {} devices connected", args.devices);
    if args.mode == Mode::Idle || args.mode == Mode::Simulate {
        println!(
            "{}",
            json!({"connected": connected, "devices": args.devices})
        );
        let run = async {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                eprintln!(
                    "connected {}  events acked {}  commands {}  errors {}",
                    counters.connected.load(Ordering::Relaxed),
                    counters.acked.load(Ordering::Relaxed),
                    counters.commands.load(Ordering::Relaxed),
                    counters.errors.load(Ordering::Relaxed)
                );
            }
        };
        if args.duration > 0.0 {
            let _ = tokio::time::timeout(Duration::from_secs_f64(args.duration), run).await;
        } else {
            run.await;
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let before = counters.acked.load(Ordering::Relaxed);
    let refused_before = counters.refused.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let acked = counters.acked.load(Ordering::Relaxed) - before;
    let refused = counters.refused.load(Ordering::Relaxed) - refused_before;
    for task in tasks {
        task.abort();
    }
    let rate = acked as f64 / args.duration;
    let what = match args.mode {
        Mode::Ingest => "durable events/s (acknowledged after commit)",
        _ => "QoS 1 publishes/s (PUBACKs)",
    };
    if args.json {
        println!(
            "{}",
            json!({
                "mode": format!("{:?}", args.mode).to_lowercase(),
                "devices": args.devices,
                "connected": connected,
                "window": args.window,
                "duration_s": args.duration,
                "acked": acked,
                "refused": refused,
                "rate": (rate * 10.0).round() / 10.0,
                "errors": counters.errors.load(Ordering::Relaxed),
            })
        );
    } else {
        println!(
            "{rate:.1} {what}; {connected} devices, window {}, {refused} refused",
            args.window
        );
    }
    Ok(if acked > 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn event_body(device: &Credentials, run_tag: &str, seq: u64) -> String {
    const TREATMENTS: [&str; 3] = ["BASIC", "STANDARD", "PREMIUM"];
    format!(
        r#"{{"device_id":"{}","firmware":"ozone-sim/0.1","event_id":"mq-{run_tag}-{seq}","event":"treatment","treatment":"{}","counter":{seq}}}"#,
        device.device_id,
        TREATMENTS[(seq % 3) as usize]
    )
}

async fn device_task(
    broker: std::net::SocketAddr,
    index: usize,
    device: Credentials,
    args: &MqttArgs,
    counters: &Counters,
    run_tag: &str,
) -> anyhow::Result<()> {
    let mut options = MqttOptions::new(
        device.device_id.clone(),
        broker.ip().to_string(),
        broker.port(),
    );
    options.set_keep_alive(Duration::from_secs(args.keep_alive.into()));
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    options.set_inflight(args.window.min(u16::MAX as usize) as u16);
    if !args.anonymous {
        options.set_credentials(device.device_id.clone(), device.token.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(options, args.window * 2 + 8);
    let root = format!("{}devices/{}/", args.prefix, device.device_id);
    let events = format!("{root}events");
    let mut seq: u64 = index as u64 * 1_000_000_000;
    let mut connected = false;
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(err) => {
                if connected {
                    counters.connected.fetch_sub(1, Ordering::Relaxed);
                }
                return Err(err.into());
            }
        };
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                connected = true;
                counters.connected.fetch_add(1, Ordering::Relaxed);
                match args.mode {
                    Mode::Ingest => {
                        client
                            .subscribe(format!("{root}events/ack"), QoS::AtLeastOnce)
                            .await?;
                    }
                    Mode::Simulate => {
                        client
                            .subscribe(format!("{root}events/ack"), QoS::AtLeastOnce)
                            .await?;
                        client
                            .subscribe(format!("{root}commands"), QoS::AtLeastOnce)
                            .await?;
                        let client = client.clone();
                        let events = events.clone();
                        let device = device.clone();
                        let run_tag = run_tag.to_owned();
                        let mean = args.event_interval;
                        if mean > 0.0 {
                            tokio::spawn(async move {
                                let mut rng = crate::Rng::new();
                                let mut n = seq;
                                loop {
                                    let gap = -mean * (1.0 - rng.unit()).ln();
                                    tokio::time::sleep(Duration::from_secs_f64(gap)).await;
                                    n += 1;
                                    let body = event_body(&device, &run_tag, n);
                                    if client
                                        .publish(events.clone(), QoS::AtLeastOnce, false, body)
                                        .await
                                        .is_err()
                                    {
                                        break;
                                    }
                                }
                            });
                        }
                    }
                    Mode::Raw => {
                        for _ in 0..args.window {
                            seq += 1;
                            client
                                .publish(&events, QoS::AtLeastOnce, false, raw_body(seq))
                                .await?;
                        }
                    }
                    Mode::Idle => {}
                }
            }
            Event::Incoming(Packet::SubAck(_)) if args.mode == Mode::Ingest => {
                for _ in 0..args.window {
                    seq += 1;
                    client
                        .publish(
                            &events,
                            QoS::AtLeastOnce,
                            false,
                            event_body(&device, run_tag, seq),
                        )
                        .await?;
                }
            }
            Event::Incoming(Packet::PubAck(_)) if args.mode == Mode::Raw => {
                counters.acked.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                client
                    .publish(&events, QoS::AtLeastOnce, false, raw_body(seq))
                    .await?;
            }
            Event::Incoming(Packet::Publish(p)) => {
                let body: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if p.topic.ends_with("/events/ack") {
                    if body["ack"] == true {
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    if args.mode == Mode::Ingest {
                        seq += 1;
                        client
                            .publish(
                                &events,
                                QoS::AtLeastOnce,
                                false,
                                event_body(&device, run_tag, seq),
                            )
                            .await?;
                    }
                } else if p.topic.ends_with("/commands") {
                    counters.commands.fetch_add(1, Ordering::Relaxed);
                    if let Some(command_id) = body["command_id"].as_str() {
                        let result = json!({"success": true, "message": "done by ozone-sim"});
                        // Never wait here: this task is the one that drains the event loop.
                        let _ = client.try_publish(
                            format!("{root}commands/{command_id}/result"),
                            QoS::AtLeastOnce,
                            false,
                            result.to_string(),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

/// A raw-mode payload: the size of an event, but without an `event_id`, so Ozone refuses it
/// after parsing and no database work is measured.
fn raw_body(seq: u64) -> String {
    format!(
        r#"{{"firmware":"ozone-sim/0.1","event":"treatment","treatment":"BASIC","counter":{seq},"padding":"0123456789012345678901234567890123456789"}}"#
    )
}
