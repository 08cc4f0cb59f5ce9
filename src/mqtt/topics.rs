//! The topic contract and its access rules: which topics a device may publish to and subscribe
//! to, and which filters staff integrators may read. Pure functions, tested on their own.

/// A topic a device publishes to, relative to its own `{prefix}devices/{device_id}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic<'a> {
    Events,
    /// `commands/{command_id}/result`
    Result(&'a str),
    Status,
}

/// A topic a device may subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFilter {
    Commands,
    EventAcks,
}

/// Topic names of one deployment (the prefix is a setting, `ozone/` by default).
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        let mut prefix = prefix.trim().to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Topics { prefix }
    }

    fn device_root(&self, device_id: &str) -> String {
        format!("{}devices/{device_id}/", self.prefix)
    }

    pub fn commands(&self, device_id: &str) -> String {
        format!("{}commands", self.device_root(device_id))
    }

    pub fn event_acks(&self, device_id: &str) -> String {
        format!("{}events/ack", self.device_root(device_id))
    }

    /// What a device's publish to `topic` is, or `None` when the topic is not one of its own
    /// (another device's, a wildcard, anything else): such a publish is refused.
    pub fn device_publish<'t>(&self, device_id: &str, topic: &'t str) -> Option<DeviceTopic<'t>> {
        let rest = topic.strip_prefix(&self.prefix)?;
        let rest = rest.strip_prefix("devices/")?;
        let rest = rest.strip_prefix(device_id)?;
        let rest = rest.strip_prefix('/')?;
        match rest {
            "events" => Some(DeviceTopic::Events),
            "status" => Some(DeviceTopic::Status),
            _ => {
                let command = rest.strip_prefix("commands/")?.strip_suffix("/result")?;
                let valid = !command.is_empty()
                    && !command.contains(['/', '+', '#'])
                    && !command.contains('\0');
                valid.then_some(DeviceTopic::Result(command))
            }
        }
    }

    /// Whether a device may subscribe to `filter`: only its own `commands` and `events/ack`,
    /// exactly (no wildcards, no other device).
    pub fn device_subscribe(&self, device_id: &str, filter: &str) -> Option<DeviceFilter> {
        if filter == self.commands(device_id) {
            Some(DeviceFilter::Commands)
        } else if filter == self.event_acks(device_id) {
            Some(DeviceFilter::EventAcks)
        } else {
            None
        }
    }

    /// The filters staff integrators may read: every device's events and status.
    pub fn staff_filters(&self) -> [String; 2] {
        [
            format!("{}devices/+/events", self.prefix),
            format!("{}devices/+/status", self.prefix),
        ]
    }

    pub fn staff_subscribe(&self, filter: &str) -> bool {
        self.staff_filters().iter().any(|f| f == filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_publishes_only_to_its_own_topics() {
        let t = Topics::new("ozone/");
        let d = "AA:BB:CC:DD:EE:01";
        assert_eq!(
            t.device_publish(d, "ozone/devices/AA:BB:CC:DD:EE:01/events"),
            Some(DeviceTopic::Events)
        );
        assert_eq!(
            t.device_publish(d, "ozone/devices/AA:BB:CC:DD:EE:01/status"),
            Some(DeviceTopic::Status)
        );
        assert_eq!(
            t.device_publish(d, "ozone/devices/AA:BB:CC:DD:EE:01/commands/cmd-1/result"),
            Some(DeviceTopic::Result("cmd-1"))
        );
        for foreign in [
            "ozone/devices/AA:BB:CC:DD:EE:02/events",
            "ozone/devices/AA:BB:CC:DD:EE:011/events",
            "ozone/devices/AA:BB:CC:DD:EE:01/commands",
            "ozone/devices/AA:BB:CC:DD:EE:01/events/ack",
            "ozone/devices/AA:BB:CC:DD:EE:01/commands//result",
            "ozone/devices/AA:BB:CC:DD:EE:01/commands/a/b/result",
            "other/devices/AA:BB:CC:DD:EE:01/events",
            "$SYS/x",
        ] {
            assert_eq!(t.device_publish(d, foreign), None, "{foreign}");
        }
    }

    #[test]
    fn a_device_subscribes_only_to_its_own_commands_and_acks() {
        let t = Topics::new("ozone");
        let d = "dev1";
        assert_eq!(
            t.device_subscribe(d, "ozone/devices/dev1/commands"),
            Some(DeviceFilter::Commands)
        );
        assert_eq!(
            t.device_subscribe(d, "ozone/devices/dev1/events/ack"),
            Some(DeviceFilter::EventAcks)
        );
        for refused in [
            "ozone/devices/dev2/commands",
            "ozone/#",
            "#",
            "+/devices/+/commands",
            "ozone/devices/+/commands",
            "ozone/devices/dev1/#",
            "ozone/devices/dev1/+",
            "$SYS/#",
        ] {
            assert_eq!(t.device_subscribe(d, refused), None, "{refused}");
        }
    }

    #[test]
    fn staff_read_events_and_status_only() {
        let t = Topics::new("ozone/");
        assert!(t.staff_subscribe("ozone/devices/+/events"));
        assert!(t.staff_subscribe("ozone/devices/+/status"));
        assert!(!t.staff_subscribe("ozone/devices/+/commands"));
        assert!(!t.staff_subscribe("#"));
    }
}
