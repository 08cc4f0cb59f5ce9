//! The in-process notification bus: domain functions announce what they changed after it is
//! committed; the MQTT bridge, live dashboard feeds and metrics subscribe. A notification is a
//! hint to re-read the database, which stays the source of truth: a subscriber that lags and
//! misses some re-reads what it needs.

use tokio::sync::broadcast;

/// What changed. Devices are named by their primary key and their `device_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A command was queued (created or put back by a retry) and may be delivered now.
    CommandQueued {
        device: i32,
        device_id: String,
        command_id: String,
    },
    /// A command changed state (sent, executed, failed, timed out, cancelled).
    CommandChanged {
        device: i32,
        command_id: String,
        status: String,
    },
    /// Events of these devices were committed.
    EventsStored { devices: Vec<i32> },
    /// A device's record or status changed (handshake, assignment, presence, notes).
    DeviceChanged { device: i32 },
    /// These devices polled or were otherwise in contact (`last_poll`/`last_seen` committed).
    DevicesContacted { devices: Vec<i32> },
}

/// Cheap to clone; publishing never blocks and never fails.
#[derive(Clone)]
pub struct Notifier {
    tx: broadcast::Sender<Notification>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier::new(4096)
    }
}

impl Notifier {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Notifier { tx }
    }

    /// Announces a committed change; nobody listening is fine.
    pub fn publish(&self, notification: Notification) {
        let _ = self.tx.send(notification);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.tx.subscribe()
    }
}
