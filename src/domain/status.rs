//! Device presence: `online`, `idle` or `offline` from MQTT presence and the age of the last
//! poll (falling back to the last contact).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::db::entities::device_status;

#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub online: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Online,
    Idle,
    Offline,
}

pub fn presence(status: &device_status::Model, now: DateTime<Utc>, t: Thresholds) -> Presence {
    if status.mqtt_connected {
        return Presence::Online;
    }
    let Some(last) = status.last_poll.or(status.last_seen) else {
        return Presence::Offline;
    };
    let age = now - last;
    if age <= t.online {
        Presence::Online
    } else if age <= t.idle {
        Presence::Idle
    } else {
        Presence::Offline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(last_poll: Option<i64>, last_seen: Option<i64>, mqtt: bool) -> device_status::Model {
        let now = Utc::now();
        device_status::Model {
            device_id: 1,
            wifi_connected: true,
            rtc_available: None,
            sd_card_available: None,
            current_count_basic: 0,
            current_count_standard: 0,
            current_count_premium: 0,
            uptime_seconds: None,
            last_seen: last_seen.map(|m| now - Duration::minutes(m)),
            last_poll: last_poll.map(|m| now - Duration::minutes(m)),
            device_timestamp: None,
            mqtt_connected: mqtt,
            updated_at: now,
        }
    }

    #[test]
    fn thresholds_prefer_last_poll_over_last_seen() {
        let t = Thresholds {
            online: Duration::minutes(16),
            idle: Duration::hours(1),
        };
        let now = Utc::now();
        assert_eq!(
            presence(&status(Some(15), None, false), now, t),
            Presence::Online
        );
        assert_eq!(
            presence(&status(Some(17), Some(1), false), now, t),
            Presence::Idle
        );
        assert_eq!(
            presence(&status(None, Some(61), false), now, t),
            Presence::Offline
        );
        assert_eq!(
            presence(&status(None, None, false), now, t),
            Presence::Offline
        );
        assert_eq!(
            presence(&status(Some(600), None, true), now, t),
            Presence::Online
        );
    }
}
