//! The legacy trust model. The original contract leaves `/api/iot/` unauthenticated and lets
//! any device handshake without a token; these settings narrow who may do either.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the unauthenticated legacy form may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LegacyIot {
    /// Compatible with the original: any MAC may post, registering new devices.
    #[default]
    On,
    /// The form is refused.
    Off,
    /// Only devices not bound to a machine may post: an assigned device's counters and its
    /// machine's statistics follow its authenticated events alone.
    UnassignedOnly,
}

/// Who may use the endpoints that carry no device token.
#[derive(Debug, Clone, Default)]
pub struct LegacyPolicy {
    pub iot: LegacyIot,
    /// Client networks allowed to post the legacy form and to handshake without the device's
    /// current token; empty allows every address.
    pub networks: Vec<IpNet>,
}

impl LegacyPolicy {
    /// Whether a request from `client` may use a token-less endpoint.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<()> {
        if self.networks.is_empty() {
            return Ok(());
        }
        let allowed = client.is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            self.networks.iter().any(|net| net.contains(&ip))
        });
        if allowed {
            Ok(())
        } else {
            Err(Error::Forbidden {
                code: "address_not_allowed",
                detail: "this endpoint is not open to the client's network".into(),
            })
        }
    }

    /// Whether the legacy form may be posted for a device that is (or is not) assigned.
    pub fn admit_reading(&self, client: Option<IpAddr>, assigned: Option<bool>) -> Result<()> {
        match self.iot {
            LegacyIot::Off => {
                return Err(Error::Forbidden {
                    code: "legacy_disabled",
                    detail: "the legacy /api/iot/ form is turned off on this server".into(),
                })
            }
            LegacyIot::UnassignedOnly if assigned == Some(true) => {
                return Err(Error::Forbidden {
                    code: "device_assigned",
                    detail:
                        "assigned devices report through authenticated events, not the legacy form"
                            .into(),
                })
            }
            _ => {}
        }
        self.admit(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_limit_token_less_endpoints() {
        let policy = LegacyPolicy {
            iot: LegacyIot::On,
            networks: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        };
        assert!(policy.admit(Some("10.1.2.3".parse().unwrap())).is_ok());
        assert!(policy
            .admit(Some("::ffff:10.1.2.3".parse().unwrap()))
            .is_ok());
        assert!(policy.admit(Some("::1".parse().unwrap())).is_ok());
        assert!(policy.admit(Some("192.168.1.1".parse().unwrap())).is_err());
        assert!(policy.admit(None).is_err());
        assert!(LegacyPolicy::default().admit(None).is_ok());
    }

    #[test]
    fn legacy_modes() {
        let mut policy = LegacyPolicy::default();
        assert!(policy.admit_reading(None, Some(true)).is_ok());
        policy.iot = LegacyIot::UnassignedOnly;
        assert!(policy.admit_reading(None, Some(false)).is_ok());
        assert!(policy.admit_reading(None, None).is_ok());
        assert!(policy.admit_reading(None, Some(true)).is_err());
        policy.iot = LegacyIot::Off;
        assert!(policy.admit_reading(None, Some(false)).is_err());
    }
}
