//! `GET /api/stream/`: the dashboard's live feed as Server-Sent Events. Notifications from the
//! domain's bus are gathered for a moment and sent as one `change` event naming the devices and
//! commands that changed; pages re-read what they show from the staff API. A feed that fell
//! behind the bus says `resync`. Streams end when the server shuts down, and browsers reconnect
//! by themselves (each new stream starts with a `ready` event, after which pages re-read all).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use futures_util::{stream as streams, StreamExt};
use poem::{
    handler,
    http::HeaderMap,
    web::{
        sse::{Event, SSE},
        Data,
    },
};
use serde::Serialize;
use tokio::sync::broadcast::{error::RecvError, Receiver};

use crate::{
    domain::{auth, devices, notify::Notification},
    error::Error,
    state::AppState,
};

/// How long notifications are gathered into one event: a burst (a fleet polling, a batch of
/// events) becomes one re-read per page instead of hundreds.
const GATHER: Duration = Duration::from_millis(150);
/// Comments on an idle stream, so proxies and browsers keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One `change` event.
#[derive(Debug, Default, Serialize)]
struct Change {
    /// Devices whose record, status or contact changed.
    devices: BTreeSet<String>,
    /// Devices with newly stored events.
    events: BTreeSet<String>,
    /// Commands queued or changed.
    commands: Vec<CommandChange>,
    /// Some notifications were missed: re-read everything.
    resync: bool,
}

#[derive(Debug, Serialize)]
struct CommandChange {
    device_id: String,
    command_id: String,
    status: String,
}

/// Staff sign-in (cookie or bearer) required, any active user.
#[handler]
pub async fn stream(state: Data<&Arc<AppState>>, headers: &HeaderMap) -> poem::Result<SSE> {
    let credential = super::credential(headers).ok_or(Error::MissingToken)?;
    auth::authenticate(&state.db, &state.auth, credential).await?;
    let state = state.0.clone();
    let feed = Feed {
        notifications: state.notifier.subscribe(),
        names: HashMap::new(),
        state: state.clone(),
    };
    let ready = streams::once(async { Event::message("{}").event_type("ready") });
    let changes = streams::unfold(feed, |mut feed| async move {
        let change = feed.next().await?;
        let data = serde_json::to_string(&change).unwrap_or_else(|_| "{}".into());
        Some((Event::message(data).event_type("change"), feed))
    });
    let stopped = async move { state.stopped().await };
    Ok(SSE::new(ready.chain(changes).take_until(stopped)).keep_alive(KEEP_ALIVE))
}

struct Feed {
    state: Arc<AppState>,
    notifications: Receiver<Notification>,
    /// `device_id` by primary key, for the devices seen so far.
    names: HashMap<i32, String>,
}

impl Feed {
    /// The next gathered change; `None` when the bus closes.
    async fn next(&mut self) -> Option<Change> {
        let mut change = Change::default();
        let mut pending: Vec<Notification> = Vec::new();
        match self.notifications.recv().await {
            Ok(n) => pending.push(n),
            Err(RecvError::Lagged(_)) => change.resync = true,
            Err(RecvError::Closed) => return None,
        }
        let until = tokio::time::Instant::now() + GATHER;
        loop {
            match tokio::time::timeout_at(until, self.notifications.recv()).await {
                Ok(Ok(n)) => pending.push(n),
                Ok(Err(RecvError::Lagged(_))) => change.resync = true,
                Ok(Err(RecvError::Closed)) | Err(_) => break,
            }
        }
        for notification in pending {
            match notification {
                Notification::CommandQueued {
                    device_id,
                    command_id,
                    ..
                } => change.commands.push(CommandChange {
                    device_id,
                    command_id,
                    status: "pending".into(),
                }),
                Notification::CommandChanged {
                    device,
                    command_id,
                    status,
                } => {
                    if let Some(device_id) = self.name(device).await {
                        change.devices.insert(device_id.clone());
                        change.commands.push(CommandChange {
                            device_id,
                            command_id,
                            status,
                        });
                    }
                }
                Notification::EventsStored { devices } => {
                    for device in devices {
                        if let Some(name) = self.name(device).await {
                            change.events.insert(name);
                        }
                    }
                }
                Notification::DeviceChanged { device } => {
                    if let Some(name) = self.name(device).await {
                        change.devices.insert(name);
                    }
                }
                Notification::DevicesContacted { devices } => {
                    for device in devices {
                        if let Some(name) = self.name(device).await {
                            change.devices.insert(name);
                        }
                    }
                }
            }
        }
        Some(change)
    }

    /// A device's `device_id` (it never changes once given); `None` for a deleted device.
    async fn name(&mut self, device: i32) -> Option<String> {
        if let Some(name) = self.names.get(&device) {
            return Some(name.clone());
        }
        let found = devices::find_by_pk(self.state.db.conn(), device)
            .await
            .ok()?;
        self.names.insert(device, found.device_id.clone());
        Some(found.device_id)
    }
}
