//! The MQTT channel with real clients (rumqttc over MQTT 3.1.1 and 5): authentication with
//! CONNACK codes, the topic ACL, events acknowledged after commit, command push, presence,
//! robustness against bad clients.

use std::{net::SocketAddr, time::Duration};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, QoS};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use ozone::{
    db::entities::{command, device_status, telemetry_event},
    domain::commands::{self, NewCommand},
};

use crate::helpers::{spawn_mqtt_app, Device, TestApp};

const WAIT: Duration = Duration::from_secs(5);

/// What a test client sees.
#[derive(Debug)]
enum Seen {
    Publish(String, Value),
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    Closed,
}

/// A device (or any client) connected with rumqttc, its events read on a task of its own.
struct Client {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(app: &TestApp, client_id: &str, user: &str, password: &str) -> MqttOptions {
    let addr = app.mqtt.expect("the app has an MQTT listener");
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(5));
    options
}

/// Connects and waits for the CONNACK; the refusal code when refused.
async fn connect_with(options: MqttOptions) -> Result<Client, rumqttc::ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("CONNACK in time")?
        {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    let (tx, seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let _ = tx.send(Seen::Publish(p.topic.clone(), body));
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let _ = tx.send(Seen::SubAck(ack.return_codes));
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(Seen::Closed);
                    break;
                }
            }
        }
    });
    Ok(Client { client, seen, task })
}

async fn connect(app: &TestApp, device: &Device) -> Client {
    connect_with(options(
        app,
        &device.device_id,
        &device.device_id,
        &device.token,
    ))
    .await
    .expect("device connects")
}

fn topic(device: &Device, rest: &str) -> String {
    format!("ozone/devices/{}/{rest}", device.device_id)
}

impl Client {
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("a message in time")
            .unwrap_or(Seen::Closed)
    }

    async fn subscribe(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next().await {
                Seen::SubAck(codes) => return codes,
                Seen::Closed => panic!("closed while subscribing to {filter}"),
                Seen::Publish(..) => continue,
            }
        }
    }

    async fn publish(&self, topic: &str, body: Value) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }

    /// The next publish on `topic`, skipping others.
    async fn receive(&mut self, topic: &str) -> Value {
        loop {
            match self.next().await {
                Seen::Publish(t, body) if t == topic => return body,
                Seen::Closed => panic!("closed while waiting for {topic}"),
                _ => continue,
            }
        }
    }

    /// Asserts nothing arrives for a short while (for messages that must never come).
    async fn receives_nothing(&mut self) {
        if let Ok(Some(Seen::Publish(topic, body))) =
            tokio::time::timeout(Duration::from_millis(300), self.seen.recv()).await
        {
            panic!("unexpected message on {topic}: {body}");
        }
    }

    async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(WAIT, self.seen.recv()).await {
                Ok(Some(Seen::Closed)) | Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn event_body(device: &Device, event_id: &str) -> Value {
    json!({
        "device_id": device.device_id,
        "firmware": "2.0.0",
        "event_id": event_id,
        "event": "treatment",
        "treatment": "PREMIUM",
        "counter": 7,
        "ts": "2025-09-16T12:34:56Z",
    })
}

async fn stored_events(app: &TestApp, event_id: &str) -> usize {
    telemetry_event::Entity::find()
        .filter(telemetry_event::Column::EventId.eq(event_id))
        .all(app.db())
        .await
        .unwrap()
        .len()
}

async fn create_command(app: &TestApp, device: &Device, kind: &str, priority: i32) -> String {
    commands::create(
        &app.state.db,
        &app.state.notifier,
        &device.device_id,
        NewCommand {
            command_type: kind.into(),
            priority,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .command_id
}

async fn command_row(app: &TestApp, command_id: &str) -> command::Model {
    command::Entity::find()
        .filter(command::Column::CommandId.eq(command_id))
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
}

async fn mqtt_connected(app: &TestApp, device_id: &str) -> bool {
    let device = ozone::domain::devices::find_by_device_id(app.db(), device_id)
        .await
        .unwrap();
    device_status::Entity::find_by_id(device.id)
        .one(app.db())
        .await
        .unwrap()
        .is_some_and(|s| s.mqtt_connected)
}

/// Presence is written in the background: wait (bounded) until it shows `expected`.
async fn presence_becomes(app: &TestApp, device_id: &str, expected: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while mqtt_connected(app, device_id).await != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mqtt_connected of {device_id} never became {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connects_with_its_token_and_shows_online() {
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:01", "M-1").await;
    let _client = connect(&app, &device).await;
    presence_becomes(&app, &device.device_id, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_the_matching_connack_code() {
    let app = spawn_mqtt_app().await;
    let a = app.handshake("AA:00:00:00:00:02").await;
    let b = app.handshake("AA:00:00:00:00:03").await;
    let refused = |o| async move {
        match connect_with(o).await {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
            Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
            Ok(_) => panic!("expected a refusal, the connection was accepted"),
        }
    };
    // Wrong password, and a device that does not exist: "bad user name or password" (4).
    let code = refused(options(&app, &a.device_id, &a.device_id, "not-the-token")).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let code = refused(options(&app, "AA:99:99:99:99:99", "AA:99:99:99:99:99", "x")).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    // B's valid token presented as A: "not authorised" (5).
    let code = refused(options(&app, &a.device_id, &a.device_id, &b.token)).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // The right token under another client id: not authorised either.
    let code = refused(options(&app, "someone-else", &a.device_id, &a.token)).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_clients_connect_and_get_v5_refusal_codes() {
    use rumqttc::v5::{
        mqttbytes::v5::{ConnectReturnCode as V5Code, Packet as V5Packet},
        AsyncClient as V5Client, ConnectionError as V5Error, Event as V5Event,
        MqttOptions as V5Options,
    };
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:04", "M-4").await;
    let addr = app.mqtt.unwrap();
    let connect = |password: String| {
        let mut o = V5Options::new(device.device_id.clone(), addr.ip().to_string(), addr.port());
        o.set_credentials(device.device_id.clone(), password);
        o.set_keep_alive(Duration::from_secs(5));
        o
    };
    let (client, mut eventloop) = V5Client::new(connect(device.token.clone()), 16);
    loop {
        match eventloop.poll().await.expect("v5 connect") {
            V5Event::Incoming(V5Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    client
        .subscribe(
            topic(&device, "commands"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    client
        .subscribe("ozone/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let V5Event::Incoming(V5Packet::SubAck(ack)) = eventloop.poll().await.unwrap() {
            acks.push(ack.return_codes);
        }
    }
    assert!(matches!(
        acks[0][0],
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        acks[1][0],
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized
    );
    let command_id = create_command(&app, &device, "REBOOT", 0).await;
    loop {
        if let V5Event::Incoming(V5Packet::Publish(p)) = eventloop.poll().await.unwrap() {
            let body: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(body["command_id"], command_id);
            break;
        }
    }

    let (_c, mut refused) = V5Client::new(connect("wrong".into()), 16);
    loop {
        match refused.poll().await {
            Ok(_) => continue,
            Err(V5Error::ConnectionRefused(code)) => {
                assert_eq!(code, V5Code::BadUserNamePassword);
                break;
            }
            Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_beyond_a_devices_own_topics_fail_and_deliver_nothing() {
    let app = spawn_mqtt_app().await;
    let a = app.assigned_device("AA:00:00:00:00:05", "M-5").await;
    let b = app.assigned_device("AA:00:00:00:00:06", "M-6").await;
    let mut spy = connect(&app, &a).await;
    for filter in [
        topic(&b, "commands"),
        "ozone/#".to_owned(),
        "#".to_owned(),
        "+/devices/+/commands".to_owned(),
        "ozone/devices/+/events".to_owned(),
        "$SYS/#".to_owned(),
    ] {
        assert_eq!(
            spy.subscribe(&filter).await,
            vec![rumqttc::SubscribeReasonCode::Failure],
            "{filter}"
        );
    }
    assert!(matches!(
        spy.subscribe(&topic(&a, "commands")).await[..],
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    ));
    let mut victim = connect(&app, &b).await;
    victim.subscribe(&topic(&b, "commands")).await;
    let command_id = create_command(&app, &b, "REBOOT", 0).await;
    assert_eq!(
        victim.receive(&topic(&b, "commands")).await["command_id"],
        command_id
    );
    spy.receives_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_acknowledged_only_once_it_is_stored() {
    let app = spawn_mqtt_app().await;
    let device = app.handshake("AA:00:00:00:00:07").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    client
        .publish(&topic(&device, "events"), event_body(&device, "ev-1"))
        .await;
    let ack = client.receive(&topic(&device, "events/ack")).await;
    assert_eq!(ack, json!({"ack": true, "event_id": "ev-1"}));
    assert_eq!(stored_events(&app, "ev-1").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_is_stored_once_and_acknowledged_again() {
    let app = spawn_mqtt_app().await;
    let device = app.handshake("AA:00:00:00:00:08").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    for _ in 0..2 {
        client
            .publish(&topic(&device, "events"), event_body(&device, "ev-dup"))
            .await;
        let ack = client.receive(&topic(&device, "events/ack")).await;
        assert_eq!(ack, json!({"ack": true, "event_id": "ev-dup"}));
    }
    assert_eq!(stored_events(&app, "ev-dup").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_event_gets_a_negative_acknowledgement_with_its_code() {
    let app = spawn_mqtt_app().await;
    let device = app.handshake("AA:00:00:00:00:09").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    let mut body = event_body(&device, "ev-bad");
    body["treatment"] = json!("DELUXE");
    client.publish(&topic(&device, "events"), body).await;
    let ack = client.receive(&topic(&device, "events/ack")).await;
    assert_eq!(ack["ack"], false);
    assert_eq!(ack["event_id"], "ev-bad");
    assert_eq!(ack["code"], "invalid_treatment");
    assert!(ack["error"].is_string());
    assert_eq!(stored_events(&app, "ev-bad").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_connected_device_and_is_marked_sent_over_mqtt() {
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:0A", "M-10").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "commands")).await;
    let command_id = create_command(&app, &device, "REBOOT", 3).await;
    let pushed = client.receive(&topic(&device, "commands")).await;
    assert_eq!(pushed["command_id"], command_id);
    assert_eq!(pushed["command_type"], "REBOOT");
    assert_eq!(pushed["priority"], 3);
    // The same object as in the HTTP poll list.
    let row = command_row(&app, &command_id).await;
    let wire = serde_json::to_value(ozone::domain::wire::WireCommand::from(row)).unwrap();
    assert_eq!(pushed, wire);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = command_row(&app, &command_id).await;
        if row.status == "sent" {
            assert_eq!(row.channel.as_deref(), Some("mqtt"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never marked sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The result over MQTT finishes it, through the same domain function as HTTP.
    client
        .publish(
            &topic(&device, &format!("commands/{command_id}/result")),
            json!({"success": true, "message": "rebooted"}),
        )
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while command_row(&app, &command_id).await.status != "executed" {
        assert!(tokio::time::Instant::now() < deadline, "never executed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_while_offline_arrive_on_subscribe_in_priority_order() {
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:0B", "M-11").await;
    let low = create_command(&app, &device, "LOW", 0).await;
    let high = create_command(&app, &device, "HIGH", 9).await;
    let mid = create_command(&app, &device, "MID", 5).await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "commands")).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let body = client.receive(&topic(&device, "commands")).await;
        order.push(body["command_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(order, vec![high.clone(), mid.clone(), low.clone()]);
    // Sent but unanswered commands come again after a reconnect; devices de-duplicate.
    drop(client);
    let mut again = connect(&app, &device).await;
    again.subscribe(&topic(&device, "commands")).await;
    let first = again.receive(&topic(&device, "commands")).await;
    assert_eq!(first["command_id"], high);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_from_another_process_reaches_the_connected_device() {
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:0C", "M-12").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "commands")).await;
    let sent = app.send_command(&device, "RESET", &["--priority", "2"]);
    let pushed = client.receive(&topic(&device, "commands")).await;
    assert_eq!(pushed["command_id"], sent["command_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_publishes_the_will_and_clears_presence() {
    let app = spawn_mqtt_app().await;
    let device = app.handshake("AA:00:00:00:00:0D").await;
    let mut o = options(&app, &device.device_id, &device.device_id, &device.token);
    o.set_last_will(LastWill::new(
        topic(&device, "status"),
        json!({"online": false}).to_string(),
        QoS::AtLeastOnce,
        true,
    ));
    let client = connect_with(o).await.unwrap();
    presence_becomes(&app, &device.device_id, true).await;
    // The network goes away without a DISCONNECT.
    drop(client);
    presence_becomes(&app, &device.device_id, false).await;

    // A clean DISCONNECT clears it as well.
    let client = connect(&app, &device).await;
    presence_becomes(&app, &device.device_id, true).await;
    client.client.disconnect().await.unwrap();
    presence_becomes(&app, &device.device_id, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_a_device_takes_over_from_the_first() {
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:1E", "M-30").await;
    let mut first = connect(&app, &device).await;
    first.subscribe(&topic(&device, "commands")).await;
    let mut second = connect(&app, &device).await;
    assert!(first.closed().await, "the first connection is closed");
    second.subscribe(&topic(&device, "commands")).await;
    let command_id = create_command(&app, &device, "REBOOT", 1).await;
    let pushed = second.receive(&topic(&device, "commands")).await;
    assert_eq!(pushed["command_id"], command_id);
    // The connection that ended was no longer the device's own: it stays online.
    presence_becomes(&app, &device.device_id, true).await;
    second.receives_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_another_devices_topic_disconnects_and_reaches_nothing() {
    let app = spawn_mqtt_app().await;
    let a = app.assigned_device("AA:00:00:00:00:0E", "M-14").await;
    let b = app.assigned_device("AA:00:00:00:00:0F", "M-15").await;
    let command_id = create_command(&app, &b, "REBOOT", 0).await;
    let mut intruder = connect(&app, &a).await;
    intruder
        .publish(&topic(&b, "events"), event_body(&b, "forged"))
        .await;
    assert!(intruder.closed().await, "the intruder is disconnected");
    let mut intruder = connect(&app, &a).await;
    intruder
        .publish(
            &topic(&b, &format!("commands/{command_id}/result")),
            json!({"success": true}),
        )
        .await;
    assert!(intruder.closed().await);
    assert_eq!(stored_events(&app, "forged").await, 0);
    assert_eq!(command_row(&app, &command_id).await.status, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_uses_http_and_mqtt_at_the_same_time() {
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:10", "M-16").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    client
        .publish(&topic(&device, "events"), event_body(&device, "over-mqtt"))
        .await;
    let reply = app.post_event(&device, "over-http", json!({})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    client.receive(&topic(&device, "events/ack")).await;
    assert_eq!(stored_events(&app, "over-mqtt").await, 1);
    assert_eq!(stored_events(&app, "over-http").await, 1);
    let command_id = create_command(&app, &device, "REBOOT", 0).await;
    let polled = app.poll(&device).await;
    assert_eq!(polled.body["commands"][0]["command_id"], command_id);
}

/// Writes raw bytes to the broker and reports whether it answered before closing.
async fn raw_client(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let _ = socket.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_leave_the_broker_serving_others() {
    let app = spawn_mqtt_app_with_short_connect_timeout().await;
    let addr = app.mqtt.unwrap();
    let device = app.assigned_device("AA:00:00:00:00:11", "M-17").await;
    // A client that never sends CONNECT.
    let silent = TcpStream::connect(addr).await.unwrap();
    // Garbage instead of a packet.
    raw_client(addr, b"\xff\xff\xff\xff\xffGARBAGE").await;
    // A CONNECT with a malformed remaining length.
    raw_client(addr, &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    // An oversize payload from an authenticated device closes that connection only.
    let mut o = options(&app, &device.device_id, &device.device_id, &device.token);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let mut big = connect_with(o).await.unwrap();
    let huge = "x".repeat(200 * 1024);
    big.client
        .publish(topic(&device, "events"), QoS::AtLeastOnce, false, huge)
        .await
        .unwrap();
    assert!(
        big.closed().await,
        "the oversize publish closes the connection"
    );
    // Everyone else is still served.
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    client
        .publish(&topic(&device, "events"), event_body(&device, "after"))
        .await;
    assert_eq!(
        client.receive(&topic(&device, "events/ack")).await["ack"],
        true
    );
    drop(silent);
}

async fn spawn_mqtt_app_with_short_connect_timeout() -> TestApp {
    crate::helpers::spawn_mqtt_app_with(|s| s.mqtt_connect_timeout_ms = 500).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_mqtt_off_leaves_http_serving_and_ready() {
    let app = crate::helpers::spawn_app().await;
    assert!(app.mqtt.is_none());
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 200);
    let app = spawn_mqtt_app().await;
    assert!(app.mqtt.is_some());
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 200);
}

/// Mosquitto's command-line clients, an MQTT implementation independent of ours. Absent, the
/// tests skip loudly; with `CI=true` they must be there.
fn mosquitto_clients() -> bool {
    let found = std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mosquitto_pub is required in CI (Debian package mosquitto-clients)"
        );
        eprintln!(
            "SKIPPED: mosquitto_pub/mosquitto_sub not installed (apt install mosquitto-clients)"
        );
    }
    found
}

fn mosquitto_args(app: &TestApp, client_id: &str, user: &str, password: &str) -> Vec<String> {
    let addr = app.mqtt.unwrap();
    [
        "-h",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-i",
        client_id,
        "-u",
        user,
        "-P",
        password,
        "-q",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs a Mosquitto client to completion (its own `-W` timeouts bound it) off the runtime.
async fn mosquitto(tool: &str, args: Vec<String>) -> std::process::Output {
    let tool = tool.to_owned();
    tokio::task::spawn_blocking(move || std::process::Command::new(tool).args(args).output())
        .await
        .unwrap()
        .expect("mosquitto client runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_events_and_receive_commands() {
    if !mosquitto_clients() {
        return;
    }
    let app = spawn_mqtt_app().await;
    let device = app.assigned_device("AA:00:00:00:00:20", "M-20").await;
    for version in ["mqttv311", "mqttv5"] {
        let event_id = format!("mosq-{version}");
        let mut args = mosquitto_args(&app, &device.device_id, &device.device_id, &device.token);
        args.extend([
            "-V".into(),
            version.into(),
            "-t".into(),
            topic(&device, "events"),
            "-m".into(),
            event_body(&device, &event_id).to_string(),
        ]);
        let out = mosquitto("mosquitto_pub", args).await;
        assert!(out.status.success(), "{out:?}");
        let deadline = tokio::time::Instant::now() + WAIT;
        while stored_events(&app, &event_id).await == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{event_id} never stored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A command queued before the subscription arrives on subscribe.
        let command_id = create_command(&app, &device, "REBOOT", 0).await;
        let mut args = mosquitto_args(&app, &device.device_id, &device.device_id, &device.token);
        args.extend([
            "-V".into(),
            version.into(),
            "-t".into(),
            topic(&device, "commands"),
            "-C".into(),
            "1".into(),
            "-W".into(),
            "10".into(),
        ]);
        let out = mosquitto("mosquitto_sub", args).await;
        assert!(out.status.success(), "{out:?}");
        let body: Value = serde_json::from_slice(&out.stdout).expect("a command object");
        // Sent-but-unanswered commands come first on a new subscription: find ours.
        assert!(body["command_id"].is_string());
        let _ = command_id;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_are_refused_with_connack_codes_and_denied_foreign_filters() {
    if !mosquitto_clients() {
        return;
    }
    let app = spawn_mqtt_app().await;
    let a = app.handshake("AA:00:00:00:00:21").await;
    let b = app.handshake("AA:00:00:00:00:22").await;
    for version in ["mqttv311", "mqttv5"] {
        let mut args = mosquitto_args(&app, &a.device_id, &a.device_id, "wrong-token");
        args.extend(["-V", version, "-t", "x", "-m", "{}"].map(String::from));
        let out = mosquitto("mosquitto_pub", args).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("user name or password"),
            "{version}: {stderr}"
        );

        let mut args = mosquitto_args(&app, &a.device_id, &a.device_id, &b.token);
        args.extend(["-V", version, "-t", "x", "-m", "{}"].map(String::from));
        let out = mosquitto("mosquitto_pub", args).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(stderr.contains("not authori"), "{version}: {stderr}");

        let mut args = mosquitto_args(&app, &a.device_id, &a.device_id, &a.token);
        args.extend(["-V", version, "-t", "#", "-W", "5"].map(String::from));
        let out = mosquitto("mosquitto_sub", args).await;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .to_lowercase();
        assert!(all.contains("denied"), "{version}: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_commits_acknowledged_events_and_clears_presence() {
    let app = spawn_mqtt_app().await;
    let device = app.handshake("AA:00:00:00:00:23").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    client
        .publish(
            &topic(&device, "events"),
            event_body(&device, "before-stop"),
        )
        .await;
    client.receive(&topic(&device, "events/ack")).await;
    presence_becomes(&app, &device.device_id, true).await;
    let started = std::time::Instant::now();
    let stopped = app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in time"
    );
    assert!(client.closed().await, "the connection is closed");
    let db = sea_orm::Database::connect(stopped.database_url.as_str())
        .await
        .unwrap();
    let stored = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::EventId.eq("before-stop"))
        .all(&db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    let connected = device_status::Entity::find()
        .filter(device_status::Column::MqttConnected.eq(true))
        .all(&db)
        .await
        .unwrap();
    assert!(connected.is_empty());
}

/// A staff account for MQTT logins; its password is `correct horse battery`.
async fn integrator(app: &TestApp, username: &str) -> crate::helpers::Staff {
    app.user(username, false, false).await
}

const STAFF_PASSWORD: &str = "correct horse battery";

async fn refused_code(options: MqttOptions) -> ConnectReturnCode {
    match connect_with(options).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
        Ok(_) => panic!("expected a refusal, the connection was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_subscriber_reads_every_devices_events_and_status_through_wildcards() {
    let app = spawn_mqtt_app().await;
    integrator(&app, "integrator").await;
    let a = app.handshake("AA:00:00:00:00:30").await;
    let b = app.handshake("AA:00:00:00:00:31").await;
    let mut staff = connect_with(options(&app, "dashboard-1", "integrator", STAFF_PASSWORD))
        .await
        .expect("staff connects with username and password");
    assert!(matches!(
        staff.subscribe("ozone/devices/+/events").await[..],
        [rumqttc::SubscribeReasonCode::Success(_)]
    ));
    assert!(matches!(
        staff.subscribe("ozone/devices/+/status").await[..],
        [rumqttc::SubscribeReasonCode::Success(_)]
    ));

    let mut device_a = connect(&app, &a).await;
    device_a.subscribe(&topic(&a, "events/ack")).await;
    let body = event_body(&a, "seen-by-staff");
    device_a.publish(&topic(&a, "events"), body.clone()).await;
    assert_eq!(staff.receive(&topic(&a, "events")).await, body);
    // The device's own acknowledgement is not for staff eyes; the event is stored all the same.
    device_a.receive(&topic(&a, "events/ack")).await;
    assert_eq!(stored_events(&app, "seen-by-staff").await, 1);

    let device_b = connect(&app, &b).await;
    let status = json!({"online": true, "firmware": "2.1.0", "uptime_seconds": 42});
    device_b
        .client
        .publish(
            topic(&b, "status"),
            QoS::AtLeastOnce,
            true,
            status.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(staff.receive(&topic(&b, "status")).await, status);
    // Status is retained: a subscriber that comes later gets each device's last one at once.
    let mut late = connect_with(options(
        &app,
        "dashboard-late",
        "integrator",
        STAFF_PASSWORD,
    ))
    .await
    .unwrap();
    late.subscribe("ozone/devices/+/status").await;
    assert_eq!(late.receive(&topic(&b, "status")).await, status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_subscribers_see_a_lost_devices_last_will() {
    let app = spawn_mqtt_app().await;
    integrator(&app, "integrator").await;
    let device = app.handshake("AA:00:00:00:00:34").await;
    let mut staff = connect_with(options(&app, "dashboard-3", "integrator", STAFF_PASSWORD))
        .await
        .unwrap();
    staff.subscribe("ozone/devices/+/status").await;
    let mut o = options(&app, &device.device_id, &device.device_id, &device.token);
    o.set_last_will(LastWill::new(
        topic(&device, "status"),
        json!({"online": false}).to_string(),
        QoS::AtLeastOnce,
        true,
    ));
    let client = connect_with(o).await.unwrap();
    presence_becomes(&app, &device.device_id, true).await;
    // The network goes away without a DISCONNECT.
    drop(client);
    assert_eq!(
        staff.receive(&topic(&device, "status")).await,
        json!({"online": false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_may_not_subscribe_beyond_events_and_status_nor_publish() {
    let app = spawn_mqtt_app().await;
    let staff_user = integrator(&app, "integrator").await;
    let device = app.assigned_device("AA:00:00:00:00:32", "M-32").await;
    // A staff JWT is a password too.
    let mut staff = connect_with(options(
        &app,
        "dashboard-2",
        "integrator",
        &staff_user.token,
    ))
    .await
    .expect("staff connects with a JWT as password");
    for filter in [
        "#".to_owned(),
        "ozone/#".to_owned(),
        "ozone/devices/+/commands".to_owned(),
        topic(&device, "commands"),
        "ozone/devices/+/events/ack".to_owned(),
        "$SYS/#".to_owned(),
    ] {
        assert_eq!(
            staff.subscribe(&filter).await,
            vec![rumqttc::SubscribeReasonCode::Failure],
            "{filter}"
        );
    }
    // One SUBSCRIBE with an allowed and a refused filter: each gets its own code.
    staff
        .client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("ozone/devices/+/events".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = loop {
        match staff.next().await {
            Seen::SubAck(codes) => break codes,
            Seen::Closed => panic!("closed while subscribing"),
            Seen::Publish(..) => continue,
        }
    };
    assert!(matches!(
        codes[..],
        [
            rumqttc::SubscribeReasonCode::Success(_),
            rumqttc::SubscribeReasonCode::Failure
        ]
    ));
    // Commands queued for the device never reach staff.
    let mut device_client = connect(&app, &device).await;
    device_client.subscribe(&topic(&device, "commands")).await;
    let command_id = create_command(&app, &device, "REBOOT", 0).await;
    device_client.receive(&topic(&device, "commands")).await;
    staff.receives_nothing().await;

    // A publish, even to a topic staff may read, is refused: dropped, and the client is
    // disconnected.
    staff
        .publish(
            &topic(&device, "events"),
            event_body(&device, "forged-by-staff"),
        )
        .await;
    assert!(
        staff.closed().await,
        "the publishing staff client is disconnected"
    );
    let mut staff = connect_with(options(&app, "dashboard-2", "integrator", STAFF_PASSWORD))
        .await
        .unwrap();
    staff
        .publish(
            &topic(&device, &format!("commands/{command_id}/result")),
            json!({"success": true}),
        )
        .await;
    assert!(staff.closed().await);
    assert_eq!(stored_events(&app, "forged-by-staff").await, 0);
    assert_eq!(command_row(&app, &command_id).await.status, "sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_logins_are_refused_with_the_matching_connack_code() {
    use sea_orm::sea_query::Expr;
    let app = spawn_mqtt_app().await;
    let staff_user = integrator(&app, "integrator").await;
    let other = integrator(&app, "someone").await;
    // Wrong password, unknown user, another user's JWT: bad user name or password (4).
    let code = refused_code(options(&app, "c1", "integrator", "wrong password")).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let code = refused_code(options(&app, "c2", "nobody", STAFF_PASSWORD)).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let code = refused_code(options(&app, "c3", "integrator", &other.token)).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    // A logged-out JWT stops working over MQTT too.
    let reply = app
        .staff_call(
            reqwest::Method::POST,
            "/api/auth/logout/",
            Some(&staff_user.token),
            None,
        )
        .await;
    assert!(reply.status < 300, "logout: {}", reply.body);
    let code = refused_code(options(&app, "c4", "integrator", &staff_user.token)).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);

    // A deactivated account with the right password: not authorised (5); with a wrong one,
    // nothing is revealed (4).
    ozone::db::entities::user::Entity::update_many()
        .col_expr(
            ozone::db::entities::user::Column::IsActive,
            Expr::value(false),
        )
        .filter(ozone::db::entities::user::Column::Username.eq("integrator"))
        .exec(app.db())
        .await
        .unwrap();
    let code = refused_code(options(&app, "c5", "integrator", STAFF_PASSWORD)).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let code = refused_code(options(&app, "c6", "integrator", "wrong password")).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);

    // MQTT 5 clients get the v5 reason codes: 0x86 and 0x87.
    use rumqttc::v5::{
        mqttbytes::v5::ConnectReturnCode as V5Code, AsyncClient as V5Client,
        ConnectionError as V5Error, MqttOptions as V5Options,
    };
    let addr = app.mqtt.unwrap();
    for (password, expected) in [
        ("wrong password", V5Code::BadUserNamePassword),
        (STAFF_PASSWORD, V5Code::NotAuthorized),
    ] {
        let mut o = V5Options::new("c7", addr.ip().to_string(), addr.port());
        o.set_credentials("integrator", password);
        let (_client, mut eventloop) = V5Client::new(o, 4);
        let code = loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("CONNACK in time")
            {
                Ok(_) => continue,
                Err(V5Error::ConnectionRefused(code)) => break code,
                Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
            }
        };
        assert_eq!(code, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_password_attempts_count_against_the_login_limits() {
    let app = crate::helpers::spawn_mqtt_app_with(|s| s.login_attempts_per_minute = 3).await;
    // Logs in over HTTP once: one attempt of three.
    integrator(&app, "integrator").await;
    for _ in 0..2 {
        let code = refused_code(options(&app, "c1", "integrator", "wrong password")).await;
        assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    }
    // Over the budget: "server unavailable" (3) in MQTT 3.1.1, even with the right password…
    let code = refused_code(options(&app, "c1", "integrator", STAFF_PASSWORD)).await;
    assert_eq!(code, ConnectReturnCode::ServiceUnavailable);
    // … "connection rate exceeded" (0x9F) in MQTT 5.
    use rumqttc::v5::{
        mqttbytes::v5::ConnectReturnCode as V5Code, AsyncClient as V5Client,
        ConnectionError as V5Error, MqttOptions as V5Options,
    };
    let addr = app.mqtt.unwrap();
    let mut o = V5Options::new("c2", addr.ip().to_string(), addr.port());
    o.set_credentials("integrator", STAFF_PASSWORD);
    let (_client, mut eventloop) = V5Client::new(o, 4);
    let code = loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("CONNACK in time")
        {
            Ok(_) => continue,
            Err(V5Error::ConnectionRefused(code)) => break code,
            Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
        }
    };
    assert_eq!(code, V5Code::ConnectionRateExceeded);
    // The HTTP login shares the budget.
    let reply = app
        .staff_call(
            reqwest::Method::POST,
            "/api/auth/login/",
            None,
            Some(&json!({"username": "integrator", "password": STAFF_PASSWORD})),
        )
        .await;
    assert_eq!(reply.status, 429, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unassigned_device_gets_its_commands_only_once_assigned() {
    // The look for commands the bus did not announce runs every 100 ms here.
    let app = crate::helpers::spawn_mqtt_app_with(|s| s.mqtt_command_poll_ms = 100).await;
    let device = app.handshake("AA:00:00:00:00:33").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "commands")).await;
    let queued = create_command(&app, &device, "REBOOT", 0).await;
    // Neither the announcement nor the periodic look delivers it (HTTP polls are refused too).
    client.receives_nothing().await;
    app.poll(&device)
        .await
        .assert_error(401, "device_unassigned");
    assert_eq!(command_row(&app, &queued).await.status, "pending");
    // A new subscription does not either.
    drop(client);
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "commands")).await;
    client.receives_nothing().await;
    assert_eq!(command_row(&app, &queued).await.status, "pending");

    // Assigned by an operator in another process: the connected device gets it.
    app.admin(&["device", "assign", &device.device_id, "--machine", "M-33"]);
    let pushed = client.receive(&topic(&device, "commands")).await;
    assert_eq!(pushed["command_id"], queued);
    let row = command_row(&app, &queued).await;
    assert_eq!(row.status, "sent");
    assert_eq!(row.channel.as_deref(), Some("mqtt"));

    // Unassigned again: the next command waits.
    app.admin(&["device", "unassign", &device.device_id]);
    let waiting = create_command(&app, &device, "RESET", 0).await;
    client.receives_nothing().await;
    assert_eq!(command_row(&app, &waiting).await.status, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_in_the_server_releases_waiting_commands_at_once() {
    use ozone::domain::machines::{self, NewMachine};
    // No periodic look within the test: only the assignment's announcement can deliver.
    let app = crate::helpers::spawn_mqtt_app_with(|s| s.mqtt_command_poll_ms = 600_000).await;
    let device = app.handshake("AA:00:00:00:00:35").await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "commands")).await;
    let queued = create_command(&app, &device, "REBOOT", 0).await;
    client.receives_nothing().await;
    let state = &app.state;
    let machine = machines::create(
        &state.db,
        NewMachine {
            outlet: None,
            name: "M-35".into(),
            is_active: true,
            machine_code: None,
        },
    )
    .await
    .unwrap();
    machines::assign(
        &state.db,
        &state.tokens,
        &state.notifier,
        machine.id,
        &device.device_id,
        false,
        state.settings.thresholds(),
    )
    .await
    .unwrap();
    assert_eq!(
        client.receive(&topic(&device, "commands")).await["command_id"],
        queued
    );
    // Unassigned in the server: the next command waits.
    machines::unassign(
        &state.db,
        &state.tokens,
        &state.notifier,
        machine.id,
        state.settings.thresholds(),
    )
    .await
    .unwrap();
    let waiting = create_command(&app, &device, "RESET", 0).await;
    client.receives_nothing().await;
    assert_eq!(command_row(&app, &waiting).await.status, "pending");
}

/// The app with an MQTT-over-TLS listener whose certificate (for `localhost`) a test CA
/// signed; returns the app, the CA's PEM file and the certificate and key files.
async fn spawn_mqtts_app(
    dir: &std::path::Path,
    configure: impl FnOnce(&mut ozone::Settings),
) -> (
    TestApp,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&ca, crate::tls::issue(&cert, &key)).unwrap();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let app = crate::helpers::spawn_mqtt_app_with(|s| {
        s.mqtts_addr = "127.0.0.1:0".into();
        s.mqtts_cert = Some(c);
        s.mqtts_key = Some(k);
        configure(s);
    })
    .await;
    assert!(app.mqtts.is_some(), "the app has an MQTTS listener");
    (app, ca, cert, key)
}

/// rumqttc over rustls to the TLS listener, trusting only `ca`.
fn tls_options(
    app: &TestApp,
    ca: &std::path::Path,
    client_id: &str,
    user: &str,
    password: &str,
) -> MqttOptions {
    use rumqttc::tokio_rustls::rustls::{self, pki_types::pem::PemObject, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let port = app.mqtts.unwrap().port();
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
    ));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_speak_mqtt_over_tls_under_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (app, ca, _, _) = spawn_mqtts_app(dir.path(), |_| {}).await;
    let device = app.assigned_device("AA:00:00:00:00:40", "M-40").await;
    let other = app.handshake("AA:00:00:00:00:41").await;
    let tls =
        |d: &Device, password: &str| tls_options(&app, &ca, &d.device_id, &d.device_id, password);
    // The same authentication and CONNACK codes as plain MQTT.
    assert_eq!(
        refused_code(tls(&device, "not-the-token")).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused_code(tls(&device, &other.token)).await,
        ConnectReturnCode::NotAuthorized
    );
    let mut client = connect_with(tls(&device, &device.token))
        .await
        .expect("device connects over TLS");
    presence_becomes(&app, &device.device_id, true).await;
    // The same topic rules.
    assert_eq!(
        client.subscribe("ozone/#").await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    client.subscribe(&topic(&device, "commands")).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    let command_id = create_command(&app, &device, "REBOOT", 0).await;
    assert_eq!(
        client.receive(&topic(&device, "commands")).await["command_id"],
        command_id
    );
    client
        .publish(&topic(&device, "events"), event_body(&device, "over-tls"))
        .await;
    assert_eq!(
        client.receive(&topic(&device, "events/ack")).await,
        json!({"ack": true, "event_id": "over-tls"})
    );
    assert_eq!(stored_events(&app, "over-tls").await, 1);
    // Staff log in over TLS too.
    integrator(&app, "integrator").await;
    let mut staff = connect_with(tls_options(&app, &ca, "dash", "integrator", STAFF_PASSWORD))
        .await
        .expect("staff connects over TLS");
    assert!(matches!(
        staff.subscribe("ozone/devices/+/events").await[..],
        [rumqttc::SubscribeReasonCode::Success(_)]
    ));
    // Plain MQTT keeps serving beside it.
    let _plain = connect(&app, &other).await;

    // Mosquitto's client, verifying the certificate against the test CA.
    if !mosquitto_clients() {
        return;
    }
    let port = app.mqtts.unwrap().port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let event_id = format!("mosq-tls-{version}");
        let args: Vec<String> = [
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca.display().to_string(),
            "-i",
            &device.device_id,
            "-u",
            &device.device_id,
            "-P",
            &device.token,
            "-q",
            "1",
            "-V",
            version,
            "-t",
            &topic(&device, "events"),
            "-m",
            &event_body(&device, &event_id).to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = mosquitto("mosquitto_pub", args).await;
        assert!(out.status.success(), "{out:?}");
        let deadline = tokio::time::Instant::now() + WAIT;
        while stored_events(&app, &event_id).await == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{event_id} never stored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A wrong password over TLS: the CONNACK code reaches Mosquitto's client as well.
    let args: Vec<String> = [
        "-h",
        "localhost",
        "-p",
        &port,
        "--cafile",
        &ca.display().to_string(),
        "-i",
        &device.device_id,
        "-u",
        &device.device_id,
        "-P",
        "wrong",
        "-t",
        "x",
        "-m",
        "{}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = mosquitto("mosquitto_pub", args).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("user name or password"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_or_garbage_tls_clients_hold_up_nobody_and_are_dropped_in_time() {
    let dir = tempfile::tempdir().unwrap();
    // A TLS-only broker.
    let (app, ca, _, _) = spawn_mqtts_app(dir.path(), |s| {
        s.mqtt_addr = String::new();
        s.tls_handshake_timeout_ms = 3_000;
    })
    .await;
    assert!(app.mqtt.is_none());
    assert_eq!(app.get("/readyz", None).await.status, 200);
    let device = app.assigned_device("AA:00:00:00:00:42", "M-42").await;
    let addr = app.mqtts.unwrap();
    // One client opens TCP and says nothing; another sends garbage instead of a ClientHello.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01\xff\xffGARBAGE")
        .await
        .unwrap();
    // Meanwhile a device connects and is served.
    let mut client = connect_with(tls_options(
        &app,
        &ca,
        &device.device_id,
        &device.device_id,
        &device.token,
    ))
    .await
    .expect("connects while others stall");
    client.subscribe(&topic(&device, "commands")).await;
    // ... while the silent client's handshake is still pending: nothing waited for it.
    let mut buf = [0u8; 64];
    assert!(
        matches!(silent.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent client is still waiting for its handshake"
    );
    // It is dropped once the handshake time is up (well before the test's own wait).
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the silent TLS client is dropped");
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match garbage.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the garbage client is dropped");
    // The device is still served.
    let command_id = create_command(&app, &device, "REBOOT", 0).await;
    assert_eq!(
        client.receive(&topic(&device, "commands")).await["command_id"],
        command_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtts_certificate_is_reloaded_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (app, first_ca, cert, key) = spawn_mqtts_app(dir.path(), |_| {}).await;
    let device = app.handshake("AA:00:00:00:00:43").await;
    let first = connect_with(tls_options(
        &app,
        &first_ca,
        &device.device_id,
        &device.device_id,
        &device.token,
    ))
    .await
    .expect("connects with the first certificate");
    drop(first);
    let second_ca = dir.path().join("second-ca.pem");
    std::fs::write(&second_ca, crate::tls::issue(&cert, &key)).unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let attempt = connect_with(tls_options(
            &app,
            &second_ca,
            &device.device_id,
            &device.device_id,
            &device.token,
        ))
        .await;
        match attempt {
            Ok(_) => break,
            Err(err) if tokio::time::Instant::now() > deadline => {
                panic!("new certificate not served: {err:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // New connections no longer get the old one.
    assert!(connect_with(tls_options(
        &app,
        &first_ca,
        &device.device_id,
        &device.device_id,
        &device.token,
    ))
    .await
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtts_listener_without_a_readable_certificate_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let settings = ozone::Settings {
        http_addr: "127.0.0.1:0".into(),
        mqtt_addr: "127.0.0.1:0".into(),
        mqtts_addr: "127.0.0.1:0".into(),
        mqtts_cert: Some(dir.path().join("missing.pem").display().to_string()),
        mqtts_key: Some(dir.path().join("missing.key").display().to_string()),
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display()),
        ..ozone::Settings::default()
    };
    let err = ozone::Application::build(settings)
        .await
        .err()
        .expect("no start without a certificate");
    assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
}

/// Command push latency, from creation (through the domain) to receipt, with `N` devices
/// connected and subscribed. A measurement, not a check: run by `bench/mqtt.sh` with
/// `cargo test --release --test api -- --ignored --nocapture command_push_latency`
/// (`OZONE_BENCH_DEVICES`, default 1000; `OZONE_BENCH_COMMANDS`, default 2000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn command_push_latency() {
    let devices: usize = std::env::var("OZONE_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let count: usize = std::env::var("OZONE_BENCH_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let app = crate::helpers::spawn_mqtt_app_with(|s| s.mqtt_command_poll_ms = 1000).await;
    let mut fleet = Vec::with_capacity(devices);
    let (tx, mut received) = mpsc::unbounded_channel::<(String, std::time::Instant)>();
    for i in 0..devices {
        let device = app
            .handshake(&format!("02:BE:00:00:{:02X}:{:02X}", i >> 8, i & 255))
            .await;
        // Only devices bound to a machine are sent commands.
        ozone::domain::fleet::assign_by_code(
            &app.state.db,
            &app.state.tokens,
            &device.device_id,
            &format!("BENCH-{i}"),
            None,
        )
        .await
        .expect("assign");
        let (client, mut eventloop) = AsyncClient::new(
            options(&app, &device.device_id, &device.device_id, &device.token),
            16,
        );
        let tx = tx.clone();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let commands = topic(&device, "commands");
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(commands.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        let id = body["command_id"].as_str().unwrap_or_default().to_owned();
                        let _ = tx.send((id, std::time::Instant::now()));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        ready.await.expect("device subscribed");
        fleet.push(device);
    }
    let mut created = std::collections::HashMap::new();
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        let device = &fleet[n % fleet.len()];
        let started = std::time::Instant::now();
        let id = create_command(&app, device, "PING", 0).await;
        created.insert(id, started);
        // A steady stream, not a burst: about 500 commands/s.
        tokio::time::sleep(Duration::from_millis(2)).await;
        while let Ok((id, at)) = received.try_recv() {
            if let Some(t) = created.get(&id) {
                latencies.push(at.duration_since(*t));
            }
        }
    }
    while latencies.len() < count {
        let Ok(Some((id, at))) = tokio::time::timeout(WAIT, received.recv()).await else {
            break;
        };
        if let Some(t) = created.get(&id) {
            latencies.push(at.duration_since(*t));
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        let i = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[i.clamp(1, latencies.len()) - 1].as_secs_f64() * 1000.0
    };
    println!(
        "command push: {} devices connected, {} of {count} commands received, latency ms p50 {:.2} p99 {:.2} max {:.2}",
        devices,
        latencies.len(),
        pct(50.0),
        pct(99.0),
        pct(100.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_mqtt_clients_and_messages() {
    use crate::metrics::{moved, scrape};
    let app = spawn_mqtt_app().await;
    let device = app.handshake("AA:00:00:00:00:4D").await;
    let before = scrape(&app).await;
    let mut client = connect(&app, &device).await;
    client.subscribe(&topic(&device, "events/ack")).await;
    client
        .publish(&topic(&device, "events"), event_body(&device, "ev-metrics"))
        .await;
    client.receive(&topic(&device, "events/ack")).await;
    let after = scrape(&app).await;
    // Other tests share the process-wide recorder: counters only grow, so check by how much.
    assert!(
        moved(
            &before,
            &after,
            "ozone_mqtt_messages_total{direction=\"in\"}"
        ) >= 1.0
    );
    assert!(
        moved(
            &before,
            &after,
            "ozone_mqtt_messages_total{direction=\"out\"}"
        ) >= 1.0
    );
    assert!(after.contains_key("ozone_mqtt_clients_connected{kind=\"device\"}"));
}
