//! What the transports share: settings, the database, the event writer's handle, the device
//! token cache, the notification bus and the abuse limits. Transports import this module, never `app`.

use crate::{
    config::Settings,
    db::Db,
    domain::{devices::TokenCache, events::Ingestor, notify::Notifier, trust::LegacyPolicy},
    http::limits::Limits,
};

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
}
