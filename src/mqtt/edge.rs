//! The edge: Ozone's own accept loop in front of rumqttd's router. It reads each client's
//! CONNECT, authenticates it through the domain (CONNACK refusal codes, never a silent drop),
//! enforces the topic ACL, connection limits and keep-alive, and records presence.
//!
//! Device traffic never needs routing: a device may only publish to its own topics (handled
//! here, through the bridge) and subscribe to its own `commands` and `events/ack` (published
//! here, from the bridge). So device connections are served by the edge itself; what staff
//! integrators may read (device events and retained status) is copied into rumqttd's router
//! through one local link, and staff connections get a router link each — routing, QoS,
//! retained messages and sessions for them stay rumqttd's.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use rumqttd::{
    local::{LinkRx, LinkTx},
    protocol::{
        ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Login, Packet,
        PingResp, PubAck, PubAckReason, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
        UnsubAckReason,
    },
    Notification,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch, Notify, Semaphore},
};

use super::{
    bridge,
    codec::{Conn, ConnError, Stream, Version},
    topics::{DeviceFilter, DeviceTopic, Topics},
    MqttSettings,
};
use crate::{domain::devices::AuthenticatedDevice, error::Error, state::AppState, tls::TlsFiles};

/// What the bridge hands to a device's connection, waiting for it to be written. Empty (no
/// allocation) while nothing waits, which is nearly always: an idle device costs little.
#[derive(Default)]
struct Outbox {
    messages: VecDeque<(DeviceFilter, Bytes)>,
    /// Another connection took over this device's client id.
    taken_over: bool,
    /// The connection has ended: nothing more is accepted.
    closed: bool,
}

/// One connected device, as the bridge sees it.
pub struct Session {
    pub device: AuthenticatedDevice,
    generation: u64,
    outbox: Mutex<Outbox>,
    /// Messages the outbox holds at most.
    limit: usize,
    /// Wakes the connection when the outbox changes.
    ready: Notify,
    pub commands: AtomicBool,
    pub acks: AtomicBool,
    /// A subscribe to commands whose delivery has not run yet.
    pub resubscribed: AtomicBool,
}

impl Session {
    /// Hands a message to the connection; false when it is gone or its queue is full.
    pub fn offer(&self, filter: DeviceFilter, payload: Bytes) -> bool {
        let subscribed = match filter {
            DeviceFilter::Commands => &self.commands,
            DeviceFilter::EventAcks => &self.acks,
        };
        if !subscribed.load(Ordering::Acquire) {
            return false;
        }
        {
            let mut outbox = self.outbox();
            if outbox.closed || outbox.messages.len() >= self.limit {
                return false;
            }
            outbox.messages.push_back((filter, payload));
        }
        self.ready.notify_one();
        true
    }

    /// Tells this connection of the device from those before and after it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_over(&self) {
        self.outbox().taken_over = true;
        self.ready.notify_one();
    }

    /// Moves what waits into `into`; true when the connection has been taken over.
    fn drain(&self, into: &mut VecDeque<(DeviceFilter, Bytes)>) -> bool {
        let mut outbox = self.outbox();
        if into.is_empty() {
            *into = std::mem::take(&mut outbox.messages);
        } else {
            into.append(&mut outbox.messages);
        }
        outbox.taken_over
    }
}

/// Locks that serialise command deliveries per device (a device always maps to the same one).
const DELIVERY_LOCKS: usize = 64;

/// The connected devices, by primary key.
pub struct Sessions {
    map: Mutex<HashMap<i32, Arc<Session>>>,
    generation: AtomicU64,
    delivering: [tokio::sync::Mutex<()>; DELIVERY_LOCKS],
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            map: Mutex::default(),
            generation: AtomicU64::new(0),
            delivering: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        }
    }
}

impl Sessions {
    /// Serialises command deliveries to `device`, across its connections: a delivery that
    /// began for a connection since taken over finishes before the new connection's own
    /// delivery (on subscribe) reads what is still open, so nothing claimed for the old one is
    /// missed by the new one.
    pub async fn delivering(&self, device: i32) -> tokio::sync::MutexGuard<'_, ()> {
        self.delivering[device.unsigned_abs() as usize % DELIVERY_LOCKS]
            .lock()
            .await
    }

    pub fn get(&self, device: i32) -> Option<Arc<Session>> {
        self.lock().get(&device).cloned()
    }

    pub fn subscribed(&self) -> Vec<Arc<Session>> {
        self.lock()
            .values()
            .filter(|s| s.commands.load(Ordering::Acquire))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self, device: AuthenticatedDevice, limit: usize) -> Arc<Session> {
        let session = Arc::new(Session {
            generation: self.generation.fetch_add(1, Ordering::Relaxed),
            device,
            outbox: Mutex::default(),
            limit,
            ready: Notify::new(),
            commands: AtomicBool::new(false),
            acks: AtomicBool::new(false),
            resubscribed: AtomicBool::new(false),
        });
        let (previous, connected) = {
            let mut map = self.lock();
            (map.insert(session.device.id, session.clone()), map.len())
        };
        metrics::gauge!("ozone_mqtt_clients_connected", "kind" => "device").set(connected as f64);
        if let Some(previous) = previous {
            previous.take_over();
        }
        session
    }

    /// Forgets the session unless a newer connection of the device replaced it; true when it
    /// was the device's current one.
    fn close(&self, session: &Session) -> bool {
        session.outbox().closed = true;
        let mut map = self.lock();
        match map.get(&session.device.id) {
            Some(current) if current.generation == session.generation => {
                map.remove(&session.device.id);
                metrics::gauge!("ozone_mqtt_clients_connected", "kind" => "device")
                    .set(map.len() as f64);
                true
            }
            _ => false,
        }
    }
}

/// A message for staff subscribers, copied into rumqttd's router.
pub struct FeedMessage {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
}

/// A router link: what rumqttd's `LinkBuilder` gives.
pub type Link = (LinkTx, LinkRx, Notification);

/// Opens router links; the error is rumqttd's `LinkError`, as text.
pub type LinkFactory = dyn Fn(&str) -> Result<Link, String> + Send + Sync + 'static;

/// What every connection task shares.
pub struct Edge {
    pub state: Arc<AppState>,
    /// The application's runtime: database work runs there, never on the edge's threads.
    pub main: tokio::runtime::Handle,
    pub settings: MqttSettings,
    pub topics: Topics,
    pub sessions: Sessions,
    pub presence: mpsc::UnboundedSender<(i32, bool)>,
    feed: mpsc::Sender<FeedMessage>,
    staff_connections: AtomicUsize,
    make_link: Box<LinkFactory>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    pub open: AtomicUsize,
}

impl Edge {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: Arc<AppState>,
        main: tokio::runtime::Handle,
        settings: MqttSettings,
        presence: mpsc::UnboundedSender<(i32, bool)>,
        feed: mpsc::Sender<FeedMessage>,
        make_link: Box<LinkFactory>,
        stop: watch::Receiver<bool>,
    ) -> Edge {
        Edge {
            topics: Topics::new(&settings.topic_prefix),
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            state,
            main,
            settings,
            sessions: Sessions::default(),
            presence,
            feed,
            staff_connections: AtomicUsize::new(0),
            make_link,
            stop,
            open: AtomicUsize::new(0),
        }
    }

    /// Copies a device's message to staff subscribers. Best effort: when the router falls
    /// behind, copies are dropped rather than slowing devices down.
    fn to_feed(&self, topic: &str, payload: &[u8], retain: bool) {
        if !retain && self.staff_connections.load(Ordering::Relaxed) == 0 {
            return;
        }
        let message = FeedMessage {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::copy_from_slice(payload),
            retain,
        };
        if self.feed.try_send(message).is_err() {
            tracing::debug!(topic, "staff feed is full; message not copied");
        }
    }
}

/// Accepts connections until `stop` turns true; each is served on its own task. With `tls`,
/// that task first runs the TLS handshake (bounded in time), so a client that stalls or sends
/// garbage there holds up only itself.
pub async fn accept_loop(edge: Arc<Edge>, listener: TcpListener, tls: Option<TlsFiles>) {
    let mut stop = edge.stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let edge = edge.clone();
                match &tls {
                    None => {
                        tokio::spawn(async move { serve(edge, Box::new(socket), peer).await });
                    }
                    Some(files) => {
                        let handshake = files.handshake(socket);
                        tokio::spawn(async move {
                            match handshake.await {
                                Ok(stream) => serve(edge, Box::new(stream), peer).await,
                                Err(err) => {
                                    tracing::debug!(%peer, error = %err, "MQTT TLS handshake failed")
                                }
                            }
                        });
                    }
                }
            }
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Who a CONNECT proved to be.
enum Peer {
    Device(AuthenticatedDevice),
    Staff { user: String, client_id: String },
}

/// A CONNACK refusing the connection, in the codes the client's protocol version has: MQTT
/// 3.1.1 knows only 1-5, so anything else from the v5 set is "server unavailable" (3) there.
fn refusal(version: Version, code: ConnectReturnCode) -> Packet {
    use ConnectReturnCode as C;
    let code = match (version, code) {
        (
            Version::V4,
            code @ (C::RefusedProtocolVersion
            | C::ClientIdentifierNotValid
            | C::ServiceUnavailable
            | C::BadUserNamePassword
            | C::NotAuthorized),
        ) => code,
        (Version::V4, _) => C::ServiceUnavailable,
        (Version::V5, C::ServiceUnavailable) => C::ServerUnavailable,
        (Version::V5, C::RefusedProtocolVersion) => C::UnsupportedProtocolVersion,
        (_, code) => code,
    };
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

/// A client past its CONNECT: who it proved to be, and what serving it needs.
struct Accepted {
    conn: Conn,
    who: Peer,
    will: Option<LastWill>,
    keep_alive: Duration,
    /// A place under `max_connections`, held until the connection ends.
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// Serves one client connection from CONNECT to close.
pub async fn serve(edge: Arc<Edge>, stream: Box<dyn Stream>, peer: SocketAddr) {
    edge.open.fetch_add(1, Ordering::Relaxed);
    // The handshake runs boxed and is freed when done: for as long as the client stays
    // connected (devices mostly stay, idle), its task holds only what serving it needs.
    let result = match Box::pin(accept(&edge, stream, peer)).await {
        Ok(Some(Accepted {
            conn,
            who,
            will,
            keep_alive,
            permit,
        })) => {
            let result = match who {
                Peer::Device(device) => {
                    let mut device = DeviceConn::open(&edge, conn, device, will, keep_alive);
                    device.run(&edge).await;
                    Ok(())
                }
                Peer::Staff { user, client_id } => {
                    Box::pin(serve_staff(&edge, conn, &client_id, user, keep_alive)).await
                }
            };
            drop(permit);
            result
        }
        Ok(None) => Ok(()),
        Err(err) => Err(err),
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "MQTT connection ended");
    }
    edge.open.fetch_sub(1, Ordering::Relaxed);
}

/// Reads the CONNECT and answers it: `None` when the client was refused (or spoke an
/// unsupported protocol level).
async fn accept(
    edge: &Arc<Edge>,
    stream: Box<dyn Stream>,
    peer: SocketAddr,
) -> Result<Option<Accepted>, ConnError> {
    let mut conn = Conn::new(stream, edge.settings.max_packet_bytes());
    let connect = conn
        .read_connect(Duration::from_millis(edge.settings.connect_timeout_ms))
        .await;
    match connect {
        Ok(Packet::Connect(connect, _props, will, _will_props, login)) => {
            handle_connect(edge, conn, connect, will, login, peer).await
        }
        Ok(_) => Ok(None),
        Err(ConnError::Level(level)) => {
            // MQTT 3.1 and older: "unacceptable protocol version", in the 3.1.1 framing.
            let mut ack = bytes::BytesMut::new();
            ack.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
            tracing::debug!(%peer, level, "MQTT protocol level refused");
            let _ = conn.send_raw(&ack).await;
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

async fn handle_connect(
    edge: &Arc<Edge>,
    mut conn: Conn,
    connect: rumqttd::protocol::Connect,
    will: Option<LastWill>,
    login: Option<Login>,
    peer: SocketAddr,
) -> Result<Option<Accepted>, ConnError> {
    let Ok(permit) = edge.permits.clone().try_acquire_owned() else {
        tracing::warn!(%peer, "MQTT connection limit reached; refused");
        let code = match conn.version {
            Version::V4 => ConnectReturnCode::ServiceUnavailable,
            Version::V5 => ConnectReturnCode::ServerBusy,
        };
        conn.send(refusal(conn.version, code)).await?;
        conn.shutdown().await;
        return Ok(None);
    };
    let who = match identify(edge, &connect.client_id, login, peer).await {
        Ok(who) => who,
        Err(code) => {
            tracing::info!(%peer, client_id = %connect.client_id, ?code, "MQTT connection refused");
            conn.send(refusal(conn.version, code)).await?;
            conn.shutdown().await;
            return Ok(None);
        }
    };
    conn.send(Packet::ConnAck(
        ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        },
        None,
    ))
    .await?;
    conn.shrink();
    Ok(Some(Accepted {
        conn,
        who,
        will,
        keep_alive: effective_keep_alive(&edge.settings, connect.keep_alive),
        permit,
    }))
}

/// Idle time after which a silent client is dropped: 1.5 × its keep-alive, bounded by the
/// settings (a keep-alive of 0, "none", gets the maximum).
fn effective_keep_alive(settings: &MqttSettings, asked: u16) -> Duration {
    let secs = match u64::from(asked) {
        0 => settings.keep_alive_max_secs,
        s => s.clamp(settings.keep_alive_min_secs, settings.keep_alive_max_secs),
    };
    Duration::from_millis(secs * 1500)
}

/// Authenticates a CONNECT: a device by `client_id = username = device_id` and its token as
/// password; anyone else as staff.
async fn identify(
    edge: &Arc<Edge>,
    client_id: &str,
    login: Option<Login>,
    peer: SocketAddr,
) -> Result<Peer, ConnectReturnCode> {
    let Some(login) = login else {
        return Err(ConnectReturnCode::BadUserNamePassword);
    };
    let state = edge.state.clone();
    let password = login.password.clone();
    let authenticated = edge
        .main
        .spawn(async move {
            crate::domain::devices::authenticate(&state.db, &state.tokens, Some(&password), false)
                .await
        })
        .await
        .map_err(|_| ConnectReturnCode::ServerUnavailable)?;
    match authenticated {
        Ok(device) => {
            // A valid token presented under another name: the token is real, the claim is not.
            if device.ensure_is(&login.username).is_err() || device.ensure_is(client_id).is_err() {
                return Err(ConnectReturnCode::NotAuthorized);
            }
            Ok(Peer::Device(device))
        }
        Err(Error::InvalidToken | Error::MissingToken) => {
            super::staff::authenticate(edge, peer.ip(), &login.username, &login.password)
                .await
                .map(|user| Peer::Staff {
                    user,
                    client_id: client_id.to_owned(),
                })
        }
        Err(err) => {
            tracing::warn!(error = %err, "MQTT authentication failed");
            Err(ConnectReturnCode::ServerUnavailable)
        }
    }
}

/// What ended a device connection.
enum End {
    /// DISCONNECT: no last will.
    Clean,
    /// Network error, keep-alive timeout, protocol violation: the last will is published.
    Abnormal,
    /// Replaced by a newer connection of the same device.
    TakenOver,
    /// Server shutdown.
    Shutdown,
}

/// QoS 1 messages to a device not acknowledged yet, and those waiting for room.
struct Outgoing {
    next_pkid: u16,
    inflight: HashMap<u16, ()>,
    waiting: VecDeque<(DeviceFilter, Bytes)>,
    limit: usize,
    /// The device's `commands` and `events/ack` topics, made when first needed.
    topics: Option<(String, String)>,
}

impl Outgoing {
    /// Gives back the memory of an empty window and queue.
    fn shrink(&mut self) {
        if self.inflight.is_empty() && self.inflight.capacity() > 0 {
            self.inflight = HashMap::new();
        }
        if self.waiting.is_empty() && self.waiting.capacity() > 0 {
            self.waiting = VecDeque::new();
        }
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Writes waiting messages while the in-flight window has room.
    fn release(&mut self, conn: &mut Conn, topics: &Topics, device_id: &str) {
        while self.inflight.len() < self.limit {
            let Some((filter, payload)) = self.waiting.pop_front() else {
                break;
            };
            let pkid = self.pkid();
            self.inflight.insert(pkid, ());
            let (commands, acks) = self
                .topics
                .get_or_insert_with(|| (topics.commands(device_id), topics.event_acks(device_id)));
            let topic = match filter {
                DeviceFilter::Commands => commands,
                DeviceFilter::EventAcks => acks,
            };
            conn.queue_publish(topic, &payload, pkid);
        }
    }
}

/// A device's connection from CONNACK to close: everything it holds between packets, kept
/// once in the connection's task (a fleet mostly waits, so this is what ten thousand idle
/// devices cost).
struct DeviceConn {
    conn: Conn,
    session: Arc<Session>,
    will: Option<LastWill>,
    keep_alive: Duration,
    outgoing: Outgoing,
    /// Events being stored hold a permit each: a device that publishes faster than they
    /// commit stops being read (TCP back-pressure) instead of piling up work. Made at the
    /// first event.
    events_in_flight: Option<Arc<Semaphore>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl DeviceConn {
    fn open(
        edge: &Edge,
        conn: Conn,
        device: AuthenticatedDevice,
        will: Option<LastWill>,
        keep_alive: Duration,
    ) -> DeviceConn {
        let session = edge.sessions.open(device, edge.settings.queue_per_client);
        let _ = edge.presence.send((session.device.id, true));
        tracing::debug!(device_id = %session.device.device_id, "device connected over MQTT");
        DeviceConn {
            conn,
            session,
            will,
            keep_alive,
            outgoing: Outgoing {
                next_pkid: 0,
                inflight: HashMap::new(),
                waiting: VecDeque::new(),
                limit: edge.settings.inflight_per_client,
                topics: None,
            },
            events_in_flight: None,
            permit: None,
        }
    }

    /// Serves the device until its connection ends.
    async fn run(&mut self, edge: &Arc<Edge>) {
        let end = self.serve(edge).await;
        self.permit = None;
        let device = &self.session.device;
        let current = edge.sessions.close(&self.session);
        if matches!(end, End::Abnormal) {
            if let Some(will) = self.will.take() {
                publish_will(edge, device, will);
            }
        }
        if matches!(end, End::TakenOver) || matches!(end, End::Shutdown) {
            let _ = self
                .conn
                .send(Packet::Disconnect(
                    Disconnect {
                        reason_code: match end {
                            End::Shutdown => DisconnectReasonCode::ServerShuttingDown,
                            _ => DisconnectReasonCode::SessionTakenOver,
                        },
                    },
                    None,
                ))
                .await;
        }
        if current && !matches!(end, End::Shutdown) {
            let _ = edge.presence.send((device.id, false));
        }
        tracing::debug!(device_id = %device.device_id, "device disconnected from MQTT");
        self.conn.shutdown().await;
    }

    async fn serve(&mut self, edge: &Arc<Edge>) -> End {
        let mut stop = edge.stop.clone();
        loop {
            tokio::select! {
                read = self.conn.fill_within(self.keep_alive) => {
                    if let Err(err) = read {
                        tracing::debug!(device_id = %self.session.device.device_id, error = %err, "device connection lost");
                        return End::Abnormal;
                    }
                    let outcome = self.handle_buffered(edge).await;
                    self.outgoing.release(&mut self.conn, &edge.topics, &self.session.device.device_id);
                    if self.conn.flush().await.is_err() {
                        return End::Abnormal;
                    }
                    if let Some(end) = outcome {
                        return end;
                    }
                }
                _ = self.session.ready.notified() => {
                    if self.session.drain(&mut self.outgoing.waiting) {
                        return End::TakenOver;
                    }
                    self.outgoing.release(&mut self.conn, &edge.topics, &self.session.device.device_id);
                    if self.conn.flush().await.is_err() {
                        return End::Abnormal;
                    }
                }
                _ = stop.changed() => return End::Shutdown,
            }
            self.conn.shrink();
            self.outgoing.shrink();
        }
    }

    /// Handles every packet buffered, before the replies are written at once; `Some(end)`
    /// closes the connection. No packet is held across an await, so the future stays small.
    async fn handle_buffered(&mut self, edge: &Arc<Edge>) -> Option<End> {
        loop {
            if self.permit.is_none() && self.conn.publish_buffered() {
                let events = self
                    .events_in_flight
                    .get_or_insert_with(|| Arc::new(Semaphore::new(EVENTS_IN_FLIGHT)))
                    .clone();
                self.permit = match events.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        let _ = self.conn.flush().await;
                        events.acquire_owned().await.ok()
                    }
                };
            }
            let handled = match self.conn.next_buffered() {
                Ok(Some(packet)) => device_packet(
                    edge,
                    &self.session,
                    &mut self.conn,
                    &mut self.outgoing,
                    packet,
                    &mut self.permit,
                ),
                Ok(None) => return None,
                Err(err) => Err(err),
            };
            match handled {
                Ok(None) => {}
                Ok(Some(end)) => return Some(end),
                Err(err) => {
                    tracing::debug!(device_id = %self.session.device.device_id, error = %err, "device protocol error");
                    return Some(End::Abnormal);
                }
            }
        }
    }
}

/// Events of one connection being stored at once.
const EVENTS_IN_FLIGHT: usize = 64;

/// The last will is the device's own (`{online: false}` on its status topic by contract); it
/// is honoured only on a topic the device may publish to.
fn publish_will(edge: &Arc<Edge>, device: &AuthenticatedDevice, will: LastWill) {
    let Ok(topic) = std::str::from_utf8(&will.topic) else {
        return;
    };
    if edge.topics.device_publish(&device.device_id, topic) == Some(DeviceTopic::Status) {
        edge.to_feed(topic, &will.message, will.retain);
    }
}

fn puback(conn: &mut Conn, pkid: u16) -> Result<(), ConnError> {
    conn.queue(Packet::PubAck(
        PubAck {
            pkid,
            reason: PubAckReason::Success,
        },
        None,
    ))
}

/// Handles one packet of a device; `Some(end)` closes the connection.
fn device_packet(
    edge: &Arc<Edge>,
    session: &Arc<Session>,
    conn: &mut Conn,
    outgoing: &mut Outgoing,
    packet: Packet,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Option<End>, ConnError> {
    let device = &session.device;
    match packet {
        Packet::Publish(publish, _) => {
            metrics::counter!("ozone_mqtt_messages_total", "direction" => "in").increment(1);
            let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                return Ok(Some(End::Abnormal));
            };
            let Some(kind) = edge.topics.device_publish(&device.device_id, topic) else {
                tracing::warn!(
                    device_id = %device.device_id,
                    topic,
                    "publish to a topic the device does not own; disconnecting"
                );
                return Ok(Some(End::Abnormal));
            };
            let pkid = match publish_qos(&publish) {
                Some((QoS::AtMostOnce, _)) => None,
                Some((QoS::AtLeastOnce, pkid)) => Some(pkid),
                _ => {
                    tracing::warn!(device_id = %device.device_id, "QoS 2 is not supported; disconnecting");
                    return Ok(Some(End::Abnormal));
                }
            };
            match kind {
                DeviceTopic::Events => {
                    edge.to_feed(topic, &publish.payload, false);
                    bridge::event(
                        edge.clone(),
                        session.clone(),
                        publish.payload,
                        permit.take(),
                    );
                }
                DeviceTopic::Result(command) => {
                    bridge::result(edge, session, command.to_owned(), publish.payload);
                }
                DeviceTopic::Status => {
                    edge.to_feed(topic, &publish.payload, publish.retain);
                    bridge::status(edge, session, publish.payload);
                }
            }
            if let Some(pkid) = pkid {
                puback(conn, pkid)?;
            }
        }
        Packet::PubAck(ack, _) => {
            outgoing.inflight.remove(&ack.pkid);
        }
        Packet::Subscribe(subscribe, _) => {
            let mut commands = false;
            let return_codes = subscribe
                .filters
                .iter()
                .map(
                    |f| match edge.topics.device_subscribe(&device.device_id, &f.path) {
                        Some(filter) => {
                            match filter {
                                DeviceFilter::Commands => {
                                    session.commands.store(true, Ordering::Release);
                                    commands = true;
                                }
                                DeviceFilter::EventAcks => {
                                    session.acks.store(true, Ordering::Release)
                                }
                            }
                            SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            })
                        }
                        None => {
                            tracing::warn!(
                                device_id = %device.device_id,
                                filter = %f.path,
                                "subscription refused"
                            );
                            forbidden(conn.version)
                        }
                    },
                )
                .collect();
            conn.queue(Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes,
                },
                None,
            ))?;
            if commands {
                // Every subscribe, clean session or not, gets every open command again.
                session.resubscribed.store(true, Ordering::Release);
                bridge::deliver(
                    edge,
                    device.id,
                    bridge::Delivery::OnSubscribe(session.generation()),
                );
            }
        }
        Packet::Unsubscribe(unsubscribe, _) => {
            for filter in &unsubscribe.filters {
                match edge.topics.device_subscribe(&device.device_id, filter) {
                    Some(DeviceFilter::Commands) => {
                        session.commands.store(false, Ordering::Release)
                    }
                    Some(DeviceFilter::EventAcks) => session.acks.store(false, Ordering::Release),
                    None => {}
                }
            }
            conn.queue(Packet::UnsubAck(
                UnsubAck {
                    pkid: unsubscribe.pkid,
                    reasons: vec![UnsubAckReason::Success; unsubscribe.filters.len()],
                },
                None,
            ))?;
        }
        Packet::PingReq(_) => conn.queue(Packet::PingResp(PingResp))?,
        Packet::Disconnect(..) => return Ok(Some(End::Clean)),
        Packet::Connect(..) => return Ok(Some(End::Abnormal)),
        _ => {}
    }
    Ok(None)
}

/// A refused subscription: 0x80 in MQTT 3.1.1, "not authorized" (0x87) in MQTT 5.
pub fn forbidden(version: Version) -> SubscribeReasonCode {
    match version {
        Version::V4 => SubscribeReasonCode::Failure,
        Version::V5 => SubscribeReasonCode::NotAuthorized,
    }
}

/// The QoS and packet id of a publish (the codec keeps them crate-private; its serialisation
/// carries them).
fn publish_qos(publish: &Publish) -> Option<(QoS, u16)> {
    let raw = publish.serialize();
    let qos = match (raw.first()? >> 1) & 0b11 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let pkid = u16::from_be_bytes([*raw.get(1)?, *raw.get(2)?]);
    Some((qos, pkid))
}

/// Serves a staff integrator through a router link of its own: it may subscribe to device
/// events and status, and publish nothing.
async fn serve_staff(
    edge: &Arc<Edge>,
    conn: Conn,
    client_id: &str,
    user: String,
    keep_alive: Duration,
) -> Result<(), ConnError> {
    let staff = edge.staff_connections.fetch_add(1, Ordering::Relaxed) + 1;
    metrics::gauge!("ozone_mqtt_clients_connected", "kind" => "staff").set(staff as f64);
    let result = super::staff::serve(edge, conn, client_id, &user, keep_alive).await;
    let staff = edge.staff_connections.fetch_sub(1, Ordering::Relaxed) - 1;
    metrics::gauge!("ozone_mqtt_clients_connected", "kind" => "staff").set(staff as f64);
    result
}

impl Edge {
    pub(super) fn link(&self, client_id: &str) -> Result<Link, String> {
        (self.make_link)(client_id)
    }

    pub(super) fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }
}
