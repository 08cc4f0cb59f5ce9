//! Event ingest: validation, attribution to the machine bound when the event happened, and a
//! group-commit writer that acknowledges events only after their transaction is committed.

mod writer;

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

pub use writer::{Contact, Ingested, Ingestor, CONTACT_DELAY};

use crate::{
    db::Db,
    domain::{
        devices::{self, AuthenticatedDevice, Mac},
        status::StatusReport,
    },
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    Basic,
    Standard,
    Premium,
}

impl Treatment {
    pub fn parse(s: &str) -> Option<Treatment> {
        match s.trim().to_ascii_uppercase().as_str() {
            "BASIC" => Some(Treatment::Basic),
            "STANDARD" => Some(Treatment::Standard),
            "PREMIUM" => Some(Treatment::Premium),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Treatment::Basic => "BASIC",
            Treatment::Standard => "STANDARD",
            Treatment::Premium => "PREMIUM",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Treatment,
    Status,
    Reset,
}

impl EventKind {
    pub fn parse(s: &str) -> Option<EventKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "treatment" => Some(EventKind::Treatment),
            "status" | "heartbeat" => Some(EventKind::Status),
            "reset" => Some(EventKind::Reset),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Treatment => "treatment",
            EventKind::Status => "status",
            EventKind::Reset => "reset",
        }
    }
}

/// The device's own counters; when reported they are the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Counters {
    #[serde(default)]
    pub basic: i64,
    #[serde(default)]
    pub standard: i64,
    #[serde(default)]
    pub premium: i64,
}

impl Counters {
    pub const ZERO: Counters = Counters {
        basic: 0,
        standard: 0,
        premium: 0,
    };

    pub fn validate(self) -> Result<Counters> {
        if self.basic < 0 || self.standard < 0 || self.premium < 0 {
            return Err(Error::invalid(
                "invalid_counters",
                "current_counters must not be negative",
            ));
        }
        Ok(self)
    }
}

/// Reads `current_counters`, which must be an object (`null` or absent means not reported).
pub fn counters_object<'de, D>(deserializer: D) -> std::result::Result<Option<Counters>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    match Option::<Json>::deserialize(deserializer)? {
        None | Some(Json::Null) => Ok(None),
        Some(object @ Json::Object(_)) => serde_json::from_value(object)
            .map(Some)
            .map_err(D::Error::custom),
        Some(_) => Err(D::Error::custom(
            "current_counters must be an object {basic, standard, premium}",
        )),
    }
}

/// An event ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub device: i32,
    pub event_id: String,
    pub kind: EventKind,
    pub treatment: Option<Treatment>,
    pub counter: Option<i64>,
    pub event_type: Option<String>,
    pub legacy_counts: Option<Counters>,
    pub occurred_at: DateTime<Utc>,
    pub device_timestamp: Option<String>,
    pub received_at: DateTime<Utc>,
    pub wifi_status: Option<bool>,
    /// The event as the device sent it, as JSON text.
    pub payload: Option<String>,
    pub report: StatusReport,
}

/// The events body firmware posts over HTTP (and later MQTT).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceEvent {
    pub device_id: Option<String>,
    pub firmware: Option<String>,
    pub event_id: Option<Json>,
    pub event: Option<String>,
    pub treatment: Option<String>,
    pub counter: Option<i64>,
    pub ts: Option<Json>,
    #[serde(default, deserialize_with = "counters_object")]
    pub current_counters: Option<Counters>,
    #[serde(alias = "wifi_status")]
    pub wifi_connected: Option<bool>,
    pub rtc_available: Option<bool>,
    #[serde(alias = "sd_available")]
    pub sd_card_available: Option<bool>,
    pub uptime_seconds: Option<i64>,
}

const EVENT_ID_MAX: usize = 128;

fn event_id_of(value: Option<&Json>) -> Result<String> {
    let id = match value {
        Some(Json::String(s)) => s.trim().to_owned(),
        // Some firmware sends a sequence number rather than a string.
        Some(Json::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(Error::invalid(
                "invalid_event_id",
                "event_id must be a string",
            ))
        }
        None => String::new(),
    };
    if id.is_empty() {
        return Err(Error::invalid("missing_event_id", "event_id is required"));
    }
    if id.len() > EVENT_ID_MAX {
        return Err(Error::invalid(
            "invalid_event_id",
            format!("event_id is longer than {EVENT_ID_MAX} bytes"),
        ));
    }
    Ok(id)
}

/// Device clocks without an RTC report 1970 or garbage: such times are kept as
/// `device_timestamp` and the event is dated by its arrival.
pub fn plausible_time(ts: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    let floor = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).single();
    floor.is_some_and(|floor| ts >= floor) && ts <= now + Duration::days(1)
}

/// Parses the timestamp forms firmware sends: RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC), or Unix
/// seconds (or milliseconds).
pub fn parse_device_time(value: &Json) -> (Option<String>, Option<DateTime<Utc>>) {
    match value {
        Json::String(s) => {
            let s = s.trim();
            let parsed = DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .ok()
                .or_else(|| {
                    [
                        "%Y-%m-%d %H:%M:%S",
                        "%Y-%m-%dT%H:%M:%S",
                        "%Y-%m-%d %H:%M:%S%.f",
                    ]
                    .iter()
                    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
                    .map(|n| n.and_utc())
                });
            (Some(truncate(s, 64)), parsed)
        }
        Json::Number(n) => {
            // Unix seconds, or milliseconds when the value is too large to be seconds.
            let parsed = n.as_i64().and_then(|t| {
                if t.abs() >= 100_000_000_000 {
                    DateTime::<Utc>::from_timestamp_millis(t)
                } else {
                    DateTime::<Utc>::from_timestamp(t, 0)
                }
            });
            (Some(n.to_string()), parsed)
        }
        Json::Null => (None, None),
        other => (Some(truncate(&other.to_string(), 64)), None),
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

impl NewEvent {
    /// Validates an events body posted by an authenticated device.
    pub fn from_device(
        device: &AuthenticatedDevice,
        body: DeviceEvent,
        payload: String,
        received_at: DateTime<Utc>,
    ) -> Result<NewEvent> {
        if let Some(device_id) = body.device_id.as_deref() {
            device.ensure_is(device_id)?;
        }
        let event_id = event_id_of(body.event_id.as_ref())?;
        let kind = match body.event.as_deref() {
            None => EventKind::Treatment,
            Some(e) => EventKind::parse(e).ok_or_else(|| {
                Error::invalid(
                    "invalid_event",
                    format!("event `{e}` is not one of treatment, status, reset"),
                )
            })?,
        };
        let treatment = match (kind, body.treatment.as_deref()) {
            (_, Some(t)) => Some(Treatment::parse(t).ok_or_else(|| {
                Error::invalid(
                    "invalid_treatment",
                    format!("treatment `{t}` is not one of BASIC, STANDARD, PREMIUM"),
                )
            })?),
            (EventKind::Treatment, None) => {
                return Err(Error::invalid(
                    "missing_treatment",
                    "a treatment event needs `treatment` (BASIC, STANDARD or PREMIUM)",
                ))
            }
            (_, None) => None,
        };
        if body.counter.is_some_and(|c| c < 0) {
            return Err(Error::invalid(
                "invalid_counter",
                "counter must not be negative",
            ));
        }
        let counters = body.current_counters.map(Counters::validate).transpose()?;
        let (device_timestamp, parsed) = match &body.ts {
            Some(ts) => parse_device_time(ts),
            None => (None, None),
        };
        let occurred_at = parsed
            .filter(|t| plausible_time(*t, received_at))
            .unwrap_or(received_at);
        let firmware = clean_text(body.firmware.as_deref(), 64);
        Ok(NewEvent {
            device: device.id,
            event_id,
            kind,
            treatment,
            counter: body.counter,
            event_type: None,
            legacy_counts: None,
            occurred_at,
            device_timestamp: device_timestamp.clone(),
            received_at,
            wifi_status: body.wifi_connected,
            payload: Some(payload),
            report: StatusReport {
                firmware,
                counters,
                wifi_connected: body.wifi_connected,
                rtc_available: body.rtc_available,
                sd_card_available: body.sd_card_available,
                uptime_seconds: body.uptime_seconds.filter(|u| *u >= 0),
                device_timestamp,
                reset: false,
            },
        })
    }
}

fn clean_text(s: Option<&str>, max: usize) -> Option<String> {
    s.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| truncate(s, max))
}

/// The legacy `/api/iot/` form.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct LegacyReading {
    pub mode: Option<String>,
    pub macaddr: Option<String>,
    pub type1: Option<String>,
    pub type2: Option<String>,
    pub type3: Option<String>,
    pub count1: Option<String>,
    pub count2: Option<String>,
    pub count3: Option<String>,
    pub timestamp: Option<String>,
    pub rtc_available: Option<String>,
    pub sd_available: Option<String>,
}

fn form_count(name: &str, value: Option<&str>) -> Result<i64> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(0),
        Some(v) => {
            v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                Error::invalid("invalid_count", format!("{name} `{v}` is not a count"))
            })
        }
    }
}

fn form_bool(value: Option<&str>) -> Option<bool> {
    match value?.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Stores a legacy form reading. It carries no event id, so one is derived from its content:
/// a resend of the same reading is a duplicate.
pub async fn ingest_legacy(
    db: &Db,
    ingestor: &Ingestor,
    reading: LegacyReading,
    received_at: DateTime<Utc>,
) -> Result<Ingested> {
    let mac_input = reading
        .macaddr
        .as_deref()
        .ok_or_else(|| Error::invalid("missing_field", "macaddr is required"))?;
    let mac = Mac::parse(mac_input)?;
    let mode = reading
        .mode
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Error::invalid("missing_field", "mode is required"))?;
    let (kind, treatment) = if mode.eq_ignore_ascii_case("status") {
        (EventKind::Status, None)
    } else {
        let t = Treatment::parse(mode).ok_or_else(|| {
            Error::invalid(
                "invalid_mode",
                format!("mode `{mode}` is not one of BASIC, STANDARD, PREMIUM, status"),
            )
        })?;
        (EventKind::Treatment, Some(t))
    };
    let counts = Counters {
        basic: form_count("count1", reading.count1.as_deref())?,
        standard: form_count("count2", reading.count2.as_deref())?,
        premium: form_count("count3", reading.count3.as_deref())?,
    };
    let (device_timestamp, parsed) = match reading.timestamp.as_deref() {
        Some(ts) => parse_device_time(&Json::String(ts.to_owned())),
        None => (None, None),
    };
    let occurred_at = parsed
        .filter(|t| plausible_time(*t, received_at))
        .unwrap_or(received_at);
    let payload = serde_json::to_string(&reading).ok();
    let event_id = {
        let mut hasher = Sha256::new();
        hasher.update(mac.as_str().as_bytes());
        for part in [
            Some(mode),
            reading.type1.as_deref(),
            reading.type2.as_deref(),
            reading.type3.as_deref(),
            reading.count1.as_deref(),
            reading.count2.as_deref(),
            reading.count3.as_deref(),
            reading.timestamp.as_deref(),
        ] {
            hasher.update([0x1f]);
            hasher.update(part.unwrap_or("").trim().as_bytes());
        }
        format!("iot-{}", &hex::encode(hasher.finalize())[..32])
    };
    let device = devices::find_or_register_by_mac(db, &mac, received_at).await?;
    let event = NewEvent {
        device: device.id,
        event_id,
        kind,
        treatment,
        counter: None,
        event_type: Some(treatment.map_or("status", Treatment::as_str).to_owned()),
        legacy_counts: Some(counts),
        occurred_at,
        device_timestamp: device_timestamp.clone(),
        received_at,
        wifi_status: Some(true),
        payload,
        report: StatusReport {
            counters: Some(counts),
            wifi_connected: Some(true),
            rtc_available: form_bool(reading.rtc_available.as_deref()),
            sd_card_available: form_bool(reading.sd_available.as_deref()),
            device_timestamp,
            ..Default::default()
        },
    };
    ingestor.submit(event).await
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_device_times_fall_back_to_arrival() {
        let now = Utc::now();
        let early = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 5).unwrap();
        assert!(!plausible_time(early, now));
        assert!(!plausible_time(now + Duration::days(2), now));
        assert!(plausible_time(now - Duration::days(300), now));
    }

    #[test]
    fn device_times_parse_in_the_forms_firmware_sends() {
        let (_, t) = parse_device_time(&Json::String("2025-09-16T12:34:56Z".into()));
        assert_eq!(t.unwrap().timestamp(), 1758026096);
        let (_, t) = parse_device_time(&Json::String("2024-01-15 14:30:25".into()));
        assert_eq!(t.unwrap().timestamp(), 1705329025);
        let (raw, t) = parse_device_time(&serde_json::json!(1758026096));
        assert_eq!(t.unwrap().timestamp(), 1758026096);
        assert_eq!(raw.as_deref(), Some("1758026096"));
        let (_, t) = parse_device_time(&serde_json::json!(1758026096250_i64));
        assert_eq!(t.unwrap().timestamp_millis(), 1758026096250);
        let (raw, t) = parse_device_time(&Json::String("garbage".into()));
        assert!(t.is_none());
        assert_eq!(raw.as_deref(), Some("garbage"));
    }
}
