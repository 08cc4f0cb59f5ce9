//! What the transports share: settings, the database, the event writer's handle, the device
//! token cache and the notification bus. Transports import this module, never `app`.

use crate::{
    config::Settings,
    db::Db,
    domain::{devices::TokenCache, events::Ingestor, notify::Notifier},
};

pub struct AppState {
    pub settings: Settings,
    pub db: Db,
    pub ingestor: Ingestor,
    pub tokens: TokenCache,
    pub notifier: Notifier,
}
