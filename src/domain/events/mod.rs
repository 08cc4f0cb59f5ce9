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
        trust::LegacyPolicy,
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
    /// Kept as sent: a numeric id is the exact decimal text, even beyond 64 bits.
    pub event_id: Option<Box<serde_json::value::RawValue>>,
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

fn event_id_of(value: Option<&serde_json::value::RawValue>) -> Result<String> {
    let text = value.map_or("null", |raw| raw.get().trim());
    let id = match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text)
            .map_err(|_| Error::invalid("invalid_event_id", "event_id must be a string"))?
            .trim()
            .to_owned(),
        // Some firmware sends a sequence number rather than a string: its digits are the id,
        // exactly as sent (two ids beyond 64-bit precision must not become one).
        Some(b'-' | b'0'..=b'9') => text.to_owned(),
        _ if text == "null" => String::new(),
        _ => {
            return Err(Error::invalid(
                "invalid_event_id",
                "event_id must be a string",
            ))
        }
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

/// Refuses JSON whose numbers the store cannot hold as they are: a number beyond the range of
/// a double (`1e400`) or so small it would round to zero (`1e-20000`; PostgreSQL's `jsonb`
/// refuses both). Checked before an event is queued, so it never fails its batch.
pub fn check_numbers(json: &str) -> Result<()> {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let token = &json[start..i];
                let value: f64 = token.parse().unwrap_or(f64::INFINITY);
                let mantissa = token.split(['e', 'E']).next().unwrap_or("");
                let underflow = value == 0.0 && mantissa.bytes().any(|b| matches!(b, b'1'..=b'9'));
                if !value.is_finite() || underflow {
                    return Err(Error::invalid(
                        "number_out_of_range",
                        format!(
                            "the number {} cannot be stored; numbers must fit a 64-bit float",
                            truncate(token, 40)
                        ),
                    ));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
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
        check_numbers(&payload)?;
        let event_id = event_id_of(body.event_id.as_deref())?;
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

/// Clockless legacy readings are told apart by the window of this many seconds they arrive in.
pub const LEGACY_RESEND_WINDOW_SECS: i64 = 60;

/// The id of a legacy reading: a hash of the MAC and the form's content, plus the arrival
/// window for readings without a usable clock.
fn legacy_event_id(mac: &Mac, content: &[Option<&str>], window: Option<i64>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(mac.as_str().as_bytes());
    for part in content {
        hasher.update([0x1f]);
        hasher.update(part.unwrap_or("").trim().as_bytes());
    }
    if let Some(window) = window {
        hasher.update([0x1e]);
        hasher.update(window.to_be_bytes());
    }
    format!("iot-{}", &hex::encode(hasher.finalize())[..32])
}

/// Stores a legacy form reading. It carries no event id, so one is derived from its content
/// (and, for a device without a usable clock, from when it arrived): a resend of the same
/// reading is a duplicate, a new identical reading is not.
pub async fn ingest_legacy(
    db: &Db,
    ingestor: &Ingestor,
    policy: &LegacyPolicy,
    client: Option<std::net::IpAddr>,
    reading: LegacyReading,
    received_at: DateTime<Utc>,
) -> Result<Ingested> {
    policy.admit_reading(client, None)?;
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
    let device = devices::find_or_register_by_mac(db, &mac, received_at).await?;
    policy.admit_reading(client, Some(device.assigned))?;
    let content = [
        Some(mode),
        reading.type1.as_deref(),
        reading.type2.as_deref(),
        reading.type3.as_deref(),
        reading.count1.as_deref(),
        reading.count2.as_deref(),
        reading.count3.as_deref(),
        reading.timestamp.as_deref(),
    ];
    let event_id = if parsed.is_some_and(|t| plausible_time(t, received_at)) {
        legacy_event_id(&mac, &content, None)
    } else {
        // No usable clock: identical readings are told apart by when they arrived. A reading
        // identical to one received in the same or the previous window is a resend.
        let window = received_at
            .timestamp()
            .div_euclid(LEGACY_RESEND_WINDOW_SECS);
        let previous = legacy_event_id(&mac, &content, Some(window - 1));
        if devices::has_event(db.conn(), device.id, &previous).await? {
            previous
        } else {
            legacy_event_id(&mac, &content, Some(window))
        }
    };
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
    fn numbers_the_store_cannot_hold_are_refused() {
        for bad in [
            r#"{"a": 1e400}"#,
            r#"{"a": [1, {"b": -1e-20000}]}"#,
            r#"{"a": 0.1e-400}"#,
        ] {
            assert!(check_numbers(bad).is_err(), "{bad}");
        }
        for good in [
            r#"{"a": 0, "b": 0.0e-9999, "c": -12.5e3, "d": "1e400"}"#,
            r#"{"esc": "a\"1e400", "n": 1e300}"#,
            r#"{"big": 123456789012345678901}"#,
        ] {
            assert!(check_numbers(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn numeric_event_ids_keep_their_exact_digits() {
        let raw = |s: &str| serde_json::value::RawValue::from_string(s.to_owned()).unwrap();
        assert_eq!(
            event_id_of(Some(&raw("123456789012345678901"))).unwrap(),
            "123456789012345678901"
        );
        assert_eq!(event_id_of(Some(&raw(r#"" abc ""#))).unwrap(), "abc");
        assert!(event_id_of(Some(&raw("null"))).is_err());
        assert!(event_id_of(Some(&raw("true"))).is_err());
        assert!(event_id_of(None).is_err());
    }

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
