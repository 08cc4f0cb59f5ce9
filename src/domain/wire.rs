//! Wire objects that more than one transport sends: the command a device receives (in the HTTP
//! poll list and as one MQTT message) and the acknowledgement of an event. Defined once so HTTP
//! and MQTT serialise the same bytes.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    db::entities::command,
    domain::{events::Counters, status::StatusReport, wire_time},
    error::Error,
};

/// A command as a device receives it.
#[derive(Debug, Clone, Serialize)]
pub struct WireCommand {
    pub id: i32,
    pub command_id: String,
    pub command_type: String,
    pub payload: Value,
    pub priority: i32,
    pub description: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

impl From<command::Model> for WireCommand {
    fn from(c: command::Model) -> Self {
        WireCommand {
            id: c.id,
            command_id: c.command_id,
            command_type: c.command_type,
            payload: c.payload.unwrap_or_else(|| json!({})),
            priority: c.priority,
            description: c.description,
            created_at: wire_time(c.created_at),
            expires_at: c.expires_at.map(wire_time),
        }
    }
}

/// The answer to an event: `{ack: true, event_id}` once it is committed (or known), or
/// `{ack: false, event_id, code, error}` when it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventAck {
    pub ack: bool,
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EventAck {
    pub fn stored(event_id: String) -> Self {
        EventAck {
            ack: true,
            event_id: Some(event_id),
            code: None,
            error: None,
        }
    }

    pub fn refused(event_id: Option<String>, error: &Error) -> Self {
        EventAck {
            ack: false,
            event_id,
            code: Some(error.code()),
            error: Some(error.to_string()),
        }
    }
}

/// What a device publishes on its `status` topic (retained); its last will is
/// `{"online": false}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StatusMessage {
    pub online: Option<bool>,
    pub firmware: Option<String>,
    #[serde(alias = "wifi_status")]
    pub wifi_connected: Option<bool>,
    pub rtc_available: Option<bool>,
    #[serde(alias = "sd_available")]
    pub sd_card_available: Option<bool>,
    pub uptime_seconds: Option<i64>,
    #[serde(default, deserialize_with = "crate::domain::events::counters_object")]
    pub current_counters: Option<Counters>,
}

impl StatusMessage {
    /// The fields that update the device's status; invalid counters are refused.
    pub fn into_report(self) -> crate::error::Result<StatusReport> {
        Ok(StatusReport {
            firmware: self
                .firmware
                .as_deref()
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(|f| f.chars().take(64).collect()),
            counters: self.current_counters.map(Counters::validate).transpose()?,
            wifi_connected: self.wifi_connected,
            rtc_available: self.rtc_available,
            sd_card_available: self.sd_card_available,
            uptime_seconds: self.uptime_seconds.filter(|u| *u >= 0),
            device_timestamp: None,
            reset: false,
        })
    }
}

/// Parses a device's JSON body (HTTP request or MQTT payload), keeping the raw document.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> crate::error::Result<(T, Value)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Malformed {
            code: "empty_body",
            detail: "the body is empty; a JSON object is expected".into(),
        });
    }
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        code: "malformed_json",
        detail: format!("the body is not valid JSON: {e}"),
    })?;
    if !raw.is_object() {
        return Err(Error::invalid(
            "invalid_body",
            "the body must be a JSON object",
        ));
    }
    if contains_nul(&raw) {
        return Err(nul_error());
    }
    // Read from the text, not the parsed document: some fields keep the exact text sent.
    let parsed = serde_json::from_slice::<T>(bytes)
        .map_err(|e| Error::invalid("invalid_body", format!("the body does not fit: {e}")))?;
    Ok((parsed, raw))
}

/// NUL cannot be stored in PostgreSQL text or jsonb: refuse it on every backend alike.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

pub fn nul_error() -> Error {
    Error::invalid("invalid_body", "text must not contain NUL characters")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_acks_serialise_as_the_contract_says() {
        assert_eq!(
            serde_json::to_value(EventAck::stored("e1".into())).unwrap(),
            json!({"ack": true, "event_id": "e1"})
        );
        let refused = EventAck::refused(
            Some("e2".into()),
            &Error::invalid("invalid_treatment", "bad"),
        );
        assert_eq!(
            serde_json::to_value(refused).unwrap(),
            json!({"ack": false, "event_id": "e2", "code": "invalid_treatment", "error": "bad"})
        );
    }
}
