//! What the transports share: settings, the database, the event writer's handle, the device
//! token cache, the notification bus and the abuse limits. Transports import this module, never `app`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{
    config::Settings,
    db::Db,
    domain::{
        auth::AuthKeys, devices::TokenCache, events::Ingestor, notify::Notifier,
        trust::LegacyPolicy,
    },
    http::{limits::Limits, staff::auth::LoginLimits},
};

/// The embedded MQTT broker as readiness checks see it.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    enabled: AtomicBool,
    listening: AtomicBool,
}

impl BrokerHealth {
    pub fn new(enabled: bool) -> Self {
        BrokerHealth {
            enabled: AtomicBool::new(enabled),
            listening: AtomicBool::new(false),
        }
    }

    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
    }

    /// Ready when MQTT is off, or on and accepting connections.
    pub fn is_ready(&self) -> bool {
        !self.enabled.load(Ordering::Acquire) || self.listening.load(Ordering::Acquire)
    }
}

pub struct AppState {
    pub settings: Settings,
    pub db: Db,
    pub ingestor: Ingestor,
    pub tokens: TokenCache,
    pub notifier: Notifier,
    /// Who may use the endpoints without a device token (from the settings).
    pub legacy: LegacyPolicy,
    /// Abuse limits and the trusted proxies that reveal client addresses.
    pub limits: Limits,
    /// Signing keys of staff JWTs.
    pub auth: AuthKeys,
    /// Staff login attempts per client address and per user name.
    pub login_limits: LoginLimits,
    pub broker: BrokerHealth,
    /// Turns true when the server starts shutting down: long-lived responses (the dashboard's
    /// live feed) end then, so graceful shutdown does not wait for them.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    /// Resolves once shutdown has begun.
    pub async fn stopped(&self) {
        let mut stopping = self.stopping.subscribe();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }
}
