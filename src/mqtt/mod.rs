//! MQTT transport: the embedded broker. `edge` owns the listener and every connection
//! (authentication, ACL, limits, presence), `bridge` turns device messages into domain calls and
//! pushes commands, `staff` serves integrators through rumqttd's router, `topics` is the topic
//! contract, `codec` frames packets with `rumqttd::protocol`.
//!
//! Listeners: plain MQTT on `mqtt_addr` and MQTT over TLS on `mqtts_addr`, served by the same
//! edge (authentication, topic rules and limits do not depend on the transport).
//!
//! Threads: rumqttd's router runs on its own OS thread; connections run on a runtime of their
//! own (`mqtt_threads` workers), because rumqttd's link calls may block; database work hops to
//! the application's runtime.

mod bridge;
mod codec;
mod edge;
mod staff;
mod topics;

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context;
use rumqttd::{local::LinkBuilder, protocol::Publish, Notification, Router, RouterConfig};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{config::Settings, domain::status, state::AppState, tls::TlsFiles};

pub use topics::Topics;

/// The MQTT settings the edge needs, taken from [`Settings`].
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub max_connections: usize,
    pub max_payload_bytes: usize,
    pub keep_alive_min_secs: u64,
    pub keep_alive_max_secs: u64,
    pub connect_timeout_ms: u64,
    pub inflight_per_client: usize,
    pub queue_per_client: usize,
    pub topic_prefix: String,
}

impl MqttSettings {
    fn from(s: &Settings) -> Self {
        MqttSettings {
            max_connections: s.mqtt_max_connections,
            max_payload_bytes: s.mqtt_max_payload_bytes,
            keep_alive_min_secs: s.mqtt_keep_alive_min_secs,
            keep_alive_max_secs: s.mqtt_keep_alive_max_secs,
            connect_timeout_ms: s.mqtt_connect_timeout_ms,
            inflight_per_client: s.mqtt_inflight_per_client,
            queue_per_client: s.mqtt_queue_per_client,
            topic_prefix: s.mqtt_topic_prefix.clone(),
        }
    }

    /// Largest packet: the payload limit plus room for the topic and headers.
    pub fn max_packet_bytes(&self) -> usize {
        self.max_payload_bytes + 1024
    }
}

/// The running broker.
pub struct Broker {
    addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    state: Arc<AppState>,
    edge: Arc<edge::Edge>,
    stop: watch::Sender<bool>,
    runtime: ConnectionRuntime,
    watcher: JoinHandle<()>,
    presence: JoinHandle<()>,
    reloader: Option<JoinHandle<()>>,
}

/// The runtime serving connections. A broker dropped without [`Broker::shutdown`] (its server
/// future dropped rather than stopped) lets it go in the background: dropping a runtime on
/// another runtime's worker would panic.
struct ConnectionRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ConnectionRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Binds a listener of the broker; `what` names the setting in errors.
fn bind(addr: &str, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr.trim())
        .with_context(|| format!("cannot listen for MQTT on {addr} ({what})"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Broker {
    /// Starts the broker on `settings.mqtt_addr` and, when set, `settings.mqtts_addr`; `None`
    /// when both are off.
    pub async fn start(state: Arc<AppState>) -> anyhow::Result<Option<Broker>> {
        let settings = &state.settings;
        if !settings.broker_enabled() {
            return Ok(None);
        }
        // Certificate problems stop the start before anything runs.
        let tls = match settings.mqtts_files() {
            Some((cert, key)) if settings.mqtts_enabled() => Some(
                TlsFiles::load(
                    cert.as_ref(),
                    key.as_ref(),
                    &[],
                    settings.tls_handshake_timeout(),
                )
                .context("mqtts_addr")?,
            ),
            None if settings.mqtts_enabled() => {
                anyhow::bail!("mqtts_addr needs mqtts_cert and mqtts_key (or tls_cert and tls_key)")
            }
            _ => None,
        };
        let listener = match settings.mqtt_enabled() {
            true => Some(bind(&settings.mqtt_addr, "mqtt_addr")?),
            false => None,
        };
        let tls_listener = match &tls {
            Some(_) => Some(bind(&settings.mqtts_addr, "mqtts_addr")?),
            None => None,
        };
        let addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let tls_addr = tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        // Connections of a previous run are gone, whatever the database says.
        status::clear_mqtt_connected(&state.db).await?;

        let topics = Topics::new(&settings.mqtt_topic_prefix);
        let router = Router::new(
            0,
            RouterConfig {
                // Staff connections plus the feed link; devices never reach the router.
                max_connections: settings.mqtt_max_connections + 1,
                max_outgoing_packet_count: 200,
                max_segment_size: settings.mqtt_segment_bytes,
                max_segment_count: settings.mqtt_segment_count,
                custom_segment: None,
                initialized_filters: Some(topics.staff_filters().to_vec()),
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        let feed_link = router_tx.clone();
        let make_link = Box::new(move |id: &str| {
            LinkBuilder::new(id, router_tx.clone())
                .build()
                .map_err(|e| e.to_string())
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.mqtt_threads)
            .thread_name("ozone-mqtt")
            .enable_all()
            .build()
            .context("cannot start the MQTT runtime")?;
        let (stop, stopped) = watch::channel(false);
        let (presence_tx, presence_rx) = mpsc::unbounded_channel();
        let presence = tokio::spawn(bridge::write_presence(state.clone(), presence_rx));
        let (feed_tx, feed_rx) = mpsc::channel(4096);
        std::thread::Builder::new()
            .name("ozone-mqtt-feed".into())
            .spawn(move || {
                run_feed(feed_rx, move || {
                    LinkBuilder::new("ozone-feed", feed_link)
                        .build()
                        .map_err(|e| e.to_string())
                })
            })
            .context("cannot start the MQTT feed thread")?;

        let edge = Arc::new(edge::Edge::new(
            state.clone(),
            tokio::runtime::Handle::current(),
            MqttSettings::from(settings),
            presence_tx,
            feed_tx,
            make_link,
            stopped.clone(),
        ));
        {
            let _entered = runtime.enter();
            if let Some(listener) = listener {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                runtime.spawn(edge::accept_loop(edge.clone(), listener, None));
            }
            if let Some(listener) = tls_listener {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                runtime.spawn(edge::accept_loop(edge.clone(), listener, tls.clone()));
            }
        }
        let reloader = tls.map(|files| files.spawn_reloader(stopped.clone()));
        let watcher = tokio::spawn(bridge::watch_commands(
            edge.clone(),
            Duration::from_millis(settings.mqtt_command_poll_ms.max(10)),
            stopped,
        ));
        state.broker.set_listening(true);
        Ok(Some(Broker {
            addr,
            tls_addr,
            state,
            edge,
            stop,
            runtime: ConnectionRuntime(Some(runtime)),
            watcher,
            presence,
            reloader,
        }))
    }

    /// The plain MQTT listener's address; `None` when `mqtt_addr` is off.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The MQTT-over-TLS listener's address; `None` when `mqtts_addr` is off.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Something that stops the listener and closes every connection when it resolves.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    /// Closes the listener and every connection, waits (a few seconds at most) for them to
    /// end, then records every device as disconnected.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.state.broker.set_listening(false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.edge.open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.watcher.await;
        if let Some(reloader) = self.reloader {
            let _ = reloader.await;
        }
        let mut runtime = self.runtime;
        if let Some(runtime) = runtime.0.take() {
            let _ = tokio::task::spawn_blocking(move || {
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .await;
        }
        // The last handle on the presence channel goes with the edge: the writer drains it.
        drop(self.edge);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.presence).await;
        if let Err(err) = status::clear_mqtt_connected(&self.state.db).await {
            tracing::warn!(error = %err, "cannot record MQTT disconnections at shutdown");
        }
    }
}

/// Copies device events and status into the router for staff subscribers, on a thread of its
/// own: rumqttd's link calls block.
fn run_feed(
    mut messages: mpsc::Receiver<edge::FeedMessage>,
    link: impl FnOnce() -> Result<edge::Link, String>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the MQTT feed");
            return;
        }
    };
    runtime.block_on(async move {
        let (mut tx, mut rx, _) = match link() {
            Ok(link) => link,
            Err(err) => {
                tracing::error!(error = %err, "cannot link the MQTT feed to the router");
                return;
            }
        };
        loop {
            tokio::select! {
                message = messages.recv() => {
                    let Some(m) = message else { break };
                    let publish = Publish::new(m.topic, m.payload, m.retain);
                    if tx.send(rumqttd::protocol::Packet::Publish(publish, None)).await.is_err() {
                        break;
                    }
                }
                notification = rx.next() => match notification {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
            }
        }
    });
}
