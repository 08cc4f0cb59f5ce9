//! MQTT transport: the embedded broker. `edge` owns the listener and every connection
//! (authentication, ACL, limits, presence), `bridge` turns device messages into domain calls and
//! pushes commands, `staff` serves integrators through rumqttd's router, `topics` is the topic
//! contract, `codec` frames packets with `rumqttd::protocol`.
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

use crate::{config::Settings, domain::status, state::AppState};

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
    addr: SocketAddr,
    state: Arc<AppState>,
    edge: Arc<edge::Edge>,
    stop: watch::Sender<bool>,
    runtime: tokio::runtime::Runtime,
    watcher: JoinHandle<()>,
    presence: JoinHandle<()>,
}

impl Broker {
    /// Starts the broker on `settings.mqtt_addr`; `None` when MQTT is turned off.
    pub async fn start(state: Arc<AppState>) -> anyhow::Result<Option<Broker>> {
        let settings = &state.settings;
        if !settings.mqtt_enabled() {
            return Ok(None);
        }
        // Connections of a previous run are gone, whatever the database says.
        status::clear_mqtt_connected(&state.db).await?;
        let listener = std::net::TcpListener::bind(settings.mqtt_addr.trim())
            .with_context(|| format!("cannot listen for MQTT on {}", settings.mqtt_addr))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;

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
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(edge::accept_loop(edge.clone(), listener));
        let watcher = tokio::spawn(bridge::watch_commands(
            edge.clone(),
            Duration::from_millis(settings.mqtt_command_poll_ms.max(10)),
            stopped,
        ));
        state.broker.set_listening(true);
        Ok(Some(Broker {
            addr,
            state,
            edge,
            stop,
            runtime,
            watcher,
            presence,
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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
        let runtime = self.runtime;
        let _ = tokio::task::spawn_blocking(move || {
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .await;
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
