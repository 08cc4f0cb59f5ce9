//! The bridge between MQTT messages and the domain: events go through the same group-commit
//! ingest as HTTP and are acknowledged on `events/ack` after their commit; results and status
//! reports go through the same domain functions as HTTP; commands are pushed to connected
//! devices when they are queued (in-process notifications), when a device subscribes, and when
//! another process queued them (a cheap periodic query); presence is written in batches.

use std::{collections::HashSet, sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::{broadcast::error::RecvError, mpsc, watch};

use super::{
    edge::{Edge, Session},
    topics::DeviceFilter,
};
use crate::{
    domain::{
        commands::{self, Channel, CommandResult},
        devices::{self, AuthenticatedDevice},
        events::{DeviceEvent, Ingested, NewEvent},
        notify::Notification,
        status,
        wire::{self, EventAck, StatusMessage, WireCommand},
    },
    error::Error,
    state::AppState,
};

/// An event published by a device: stored through the group-commit writer, then answered on
/// the device's `events/ack` topic. Nothing is acknowledged before its commit.
pub fn event(
    edge: Arc<Edge>,
    session: Arc<Session>,
    payload: Bytes,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        let _permit = permit;
        let received_at = Utc::now();
        let ack = match store_event(&edge.state, &session.device, &payload, received_at).await {
            Ok(ack) => ack,
            Err(Error::Unavailable) => return, // shutting down: the device resends it
            Err(err) => EventAck::refused(event_id_of(&payload), &err),
        };
        if let Ok(body) = serde_json::to_vec(&ack) {
            session.offer(DeviceFilter::EventAcks, Bytes::from(body));
        }
    });
}

async fn store_event(
    state: &AppState,
    device: &AuthenticatedDevice,
    payload: &[u8],
    received_at: chrono::DateTime<Utc>,
) -> crate::Result<EventAck> {
    let (body, _): (DeviceEvent, _) = wire::parse_json(payload)?;
    let text = String::from_utf8_lossy(payload).into_owned();
    let event = NewEvent::from_device(device, body, text, received_at)?;
    let event_id = event.event_id.clone();
    match state.ingestor.submit(event).await? {
        Ingested::Stored | Ingested::Duplicate => Ok(EventAck::stored(event_id)),
    }
}

/// The `event_id` of a refused event, when one can be read, so the device can match the ack.
fn event_id_of(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match value.get("event_id")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A command result: the same domain function as the HTTP result endpoint, with the device's
/// current assignment read fresh.
pub fn result(edge: &Arc<Edge>, session: &Arc<Session>, command: String, payload: Bytes) {
    let state = edge.state.clone();
    let device_id = session.device.device_id.clone();
    edge.main.spawn(async move {
        let outcome = async {
            let (body, _): (CommandResult, _) = wire::parse_json(&payload)?;
            let found = devices::find_by_device_id(state.db.conn(), &device_id).await?;
            let device = AuthenticatedDevice {
                id: found.id,
                device_id: found.device_id,
                assigned: found.assigned,
            };
            commands::report_result(&state.db, &state.notifier, &device, &command, body).await
        }
        .await;
        if let Err(err) = outcome {
            tracing::info!(%device_id, command, code = err.code(), error = %err, "MQTT command result refused");
        }
    });
}

/// A status report on the device's `status` topic (its will, `{online: false}`, included).
pub fn status(edge: &Arc<Edge>, session: &Arc<Session>, payload: Bytes) {
    let state = edge.state.clone();
    let device = session.device.id;
    let device_id = session.device.device_id.clone();
    edge.main.spawn(async move {
        let outcome = async {
            let (message, _): (StatusMessage, _) = wire::parse_json(&payload)?;
            let report = message.into_report()?;
            status::report(&state.db, &state.notifier, device, &report).await
        }
        .await;
        if let Err(err) = outcome {
            tracing::info!(%device_id, code = err.code(), error = %err, "MQTT status report refused");
        }
    });
}

/// Which commands a delivery publishes.
#[derive(Debug, Clone, Copy)]
pub enum Delivery {
    /// Those not sent yet, to the device's current connection.
    New,
    /// Every open one, also those sent before and still without a result: what a connection
    /// (this generation of the device's session) gets when it subscribes, unless another
    /// connection has taken over since (that one gets its own).
    OnSubscribe(u64),
}

/// Publishes a device's deliverable commands and marks the pending ones `sent` over MQTT.
pub fn deliver(edge: &Arc<Edge>, device: i32, delivery: Delivery) {
    let edge2 = edge.clone();
    edge.main.spawn(async move {
        if let Err(err) = deliver_now(&edge2, device, delivery).await {
            tracing::warn!(device, error = %err, "MQTT command delivery failed");
        }
    });
}

async fn deliver_now(edge: &Edge, device: i32, delivery: Delivery) -> crate::Result<()> {
    // The connection is looked up once the lock is held: one that took over meanwhile is the
    // one delivered to.
    let _one_at_a_time = edge.sessions.delivering(device).await;
    let Some(session) = edge.sessions.get(device) else {
        return Ok(());
    };
    if !session.commands.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    let include_sent = match delivery {
        // The subscribe's own delivery, queued behind this one, takes them all (once).
        Delivery::New
            if session
                .resubscribed
                .load(std::sync::atomic::Ordering::Acquire) =>
        {
            return Ok(());
        }
        Delivery::New => false,
        Delivery::OnSubscribe(generation) if generation == session.generation() => {
            session
                .resubscribed
                .store(false, std::sync::atomic::Ordering::Release);
            true
        }
        Delivery::OnSubscribe(_) => return Ok(()),
    };
    let state = &edge.state;
    let due = commands::push_due(
        &state.db,
        &state.notifier,
        device,
        Channel::Mqtt,
        edge.settings.queue_per_client as u64,
        include_sent,
    )
    .await?;
    for command in due {
        let body = serde_json::to_vec(&WireCommand::from(command))
            .map_err(|e| Error::Internal(e.to_string()))?;
        // A full queue leaves the rest `sent` without a result: they come again on the
        // device's next subscribe.
        if !session.offer(DeviceFilter::Commands, Bytes::from(body)) {
            break;
        }
    }
    Ok(())
}

/// Pushes commands as they are queued: at once for those queued in this process (the
/// notification bus), within `interval` for those queued by other processes. Likewise for a
/// connected device's commands that waited for its assignment: at once when it is assigned
/// in this process, within `interval` otherwise.
pub async fn watch_commands(edge: Arc<Edge>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut notifications = edge.state.notifier.subscribe();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = notifications.recv() => match received {
                Ok(Notification::CommandQueued { device, .. }) => deliver(&edge, device, Delivery::New),
                // An assignment in this process: the device's waiting commands may go now.
                Ok(Notification::DeviceChanged { device }) if edge.sessions.get(device).is_some() => {
                    deliver(&edge, device, Delivery::New)
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => sweep_pending(&edge).await,
                Err(RecvError::Closed) => break,
            },
            _ = ticker.tick() => sweep_pending(&edge).await,
            _ = stop.changed() => break,
        }
    }
}

/// Delivers pending commands of every subscribed device that has some.
async fn sweep_pending(edge: &Arc<Edge>) {
    if edge.sessions.len() == 0 {
        return;
    }
    match commands::devices_with_pending(&edge.state.db).await {
        Ok(devices) => {
            let devices: HashSet<i32> = devices.into_iter().collect();
            for session in edge.sessions.subscribed() {
                if devices.contains(&session.device.id) {
                    deliver(edge, session.device.id, Delivery::New);
                }
            }
        }
        Err(err) => tracing::warn!(error = %err, "pending command query failed"),
    }
}

/// Writes presence changes in batches: whatever queued while the previous write ran shares
/// the next one, and only each device's latest state counts.
pub async fn write_presence(
    state: Arc<AppState>,
    mut changes: mpsc::UnboundedReceiver<(i32, bool)>,
) {
    while let Some(first) = changes.recv().await {
        let mut latest = std::collections::HashMap::new();
        latest.insert(first.0, first.1);
        while let Ok((device, connected)) = changes.try_recv() {
            latest.insert(device, connected);
        }
        let batch: Vec<(i32, bool)> = latest.into_iter().collect();
        if let Err(err) = status::set_mqtt_presence(&state.db, &state.notifier, &batch).await {
            tracing::warn!(error = %err, devices = batch.len(), "MQTT presence write failed");
        }
    }
}
