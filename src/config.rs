//! Settings: built-in defaults < optional TOML file < `OZONE_*` environment (and
//! `DATABASE_URL`) < command-line flags.

use std::{fmt, path::Path, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// HTTP listener for the firmware shim, the staff API and health checks.
    pub http_addr: String,
    /// Listener of the embedded MQTT broker.
    pub mqtt_addr: String,
    /// MQTT over TLS (conventionally `0.0.0.0:8883`), with the same authentication, topic rules
    /// and limits as `mqtt_addr`; empty turns it off. Needs `mqtts_cert` and `mqtts_key` (or
    /// `tls_cert` and `tls_key`).
    pub mqtts_addr: String,
    /// `sqlite://…` or `postgres://…`. May hold a password: never printed.
    pub database_url: String,
    /// Connections in the database pool.
    pub db_max_connections: u32,
    /// Seconds to wait for a database connection before failing.
    pub db_connect_timeout_secs: u64,
    /// PostgreSQL: seconds a statement may run before the server cancels it.
    pub db_statement_timeout_secs: u64,
    /// PostgreSQL: the `application_name` of the connections.
    pub db_application_name: String,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub body_limit_bytes: usize,
    /// An HTTP connection with no traffic for this long is closed (seconds).
    pub http_idle_timeout_secs: u64,
    /// Refuse re-handshakes without the current token for assigned devices.
    pub strict_handshake: bool,
    /// A device is `online` while its last poll/contact is at most this old (seconds).
    pub online_threshold_secs: u64,
    /// … `idle` up to this age, `offline` beyond it (seconds).
    pub idle_threshold_secs: u64,
    /// How often expired commands are moved to `timeout` (milliseconds).
    pub command_sweep_interval_ms: u64,
    /// Most events committed in one transaction. 1 disables group commit.
    pub ingest_batch_max: usize,
    /// How long a verified device token is trusted without asking the database (milliseconds).
    pub token_cache_ttl_ms: u64,
    /// Most commands one HTTP poll hands out (highest priority first); the rest wait.
    pub poll_max_commands: u64,
    /// How many times a failed, timed-out or cancelled command may be retried.
    pub max_command_retries: i32,
    /// The legacy `/api/iot/` form: `on` (the original contract), `off`, or
    /// `unassigned-only` (assigned devices must use authenticated events).
    pub legacy_iot: crate::domain::trust::LegacyIot,
    /// Client networks (CIDR) allowed to post the legacy form and to handshake without the
    /// device's current token; empty allows all.
    pub legacy_networks: Vec<ipnet::IpNet>,
    /// HS256 key for staff JWTs. When unset, one is generated once and kept in the database,
    /// so restarts keep sessions. Never printed.
    pub jwt_secret: Option<String>,
    /// Lifetime of a staff login (seconds).
    pub jwt_ttl_secs: u64,
    /// Lets anyone create an (unprivileged) account with `POST /api/auth/register/`; when off,
    /// only staff can register users.
    pub open_registration: bool,
    /// Marks the session cookie `Secure` (set when the server is reached over HTTPS).
    pub secure_cookies: bool,
    /// Origins allowed to call the staff API from a browser, with credentials (e.g.
    /// `https://admin.example.com`; a list or a comma-separated string). Empty: same origin
    /// only.
    #[serde(deserialize_with = "list_or_commas")]
    pub cors_allowed_origins: Vec<String>,
    /// Login attempts allowed per minute, per client address and per user name.
    pub login_attempts_per_minute: u32,
    /// Log filter, in `RUST_LOG` syntax.
    pub log: String,
    /// `text` (human-readable) or `json` (one JSON object per line, for log collectors).
    pub log_format: String,
    /// Reverse proxies (addresses or CIDR ranges, a list or a comma-separated string) whose
    /// `Forwarded` / `X-Forwarded-For` headers name the real client address for the limits.
    #[serde(deserialize_with = "list_or_commas")]
    pub trusted_proxies: Vec<String>,
    /// The window the `limit_*` amounts are counted over (seconds); budgets refill evenly.
    pub limit_window_secs: u64,
    /// Handshakes per client address per window (0 = unlimited).
    pub limit_handshakes_per_addr: u32,
    /// Handshakes per MAC per window (0 = unlimited).
    pub limit_handshakes_per_mac: u32,
    /// Requests with a missing or invalid device token per client address per window; beyond
    /// it the address gets 429 on token-bearing requests until its budget refills.
    pub limit_bad_tokens_per_addr: u32,
    /// Legacy `/api/iot/` readings per client address per window (0 = unlimited).
    pub limit_iot_per_addr: u32,
    /// Bearer token a `/metrics` scrape must present. Never printed.
    pub metrics_token: Option<String>,
    /// An HTTPS listener (e.g. `0.0.0.0:8443`) serving the same routes as `http_addr`, with
    /// `tls_cert` and `tls_key`; both are read again on SIGHUP.
    pub https_addr: Option<String>,
    /// PEM certificate chain for `https_addr` (leaf first).
    pub tls_cert: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `https_addr`.
    pub tls_key: Option<String>,
    /// PEM certificate chain (leaf first) and private key for `mqtts_addr`; when unset,
    /// `tls_cert` and `tls_key` serve both listeners. Read again on SIGHUP.
    pub mqtts_cert: Option<String>,
    pub mqtts_key: Option<String>,
    /// A TLS client that has not finished its handshake within this time is dropped
    /// (milliseconds; HTTPS and MQTTS).
    pub tls_handshake_timeout_ms: u64,
    /// A listener of its own for `/metrics` (e.g. `127.0.0.1:9100`); the main listener then
    /// answers 404 there. With neither this nor a token, only loopback clients may scrape.
    pub metrics_addr: Option<String>,
    /// Most MQTT connections at once; more are refused with a CONNACK "server unavailable".
    pub mqtt_max_connections: usize,
    /// Largest MQTT packet accepted, in bytes; a larger one closes the connection.
    pub mqtt_max_payload_bytes: usize,
    /// Keep-alive bounds (seconds): a client's keep-alive is clamped into them, and one that
    /// asks for none (0) gets the maximum. A client silent for 1.5 × keep-alive is dropped.
    pub mqtt_keep_alive_min_secs: u64,
    pub mqtt_keep_alive_max_secs: u64,
    /// A connection that sends no CONNECT within this time is closed (milliseconds).
    pub mqtt_connect_timeout_ms: u64,
    /// QoS 1 messages sent to one client and not acknowledged yet; more wait their turn.
    pub mqtt_inflight_per_client: usize,
    /// Messages queued for one client's connection before new ones are left for later.
    pub mqtt_queue_per_client: usize,
    /// Size of one in-memory log segment of the embedded router (bytes), and how many
    /// segments a topic filter keeps: small, since only staff subscriptions use them.
    pub mqtt_segment_bytes: usize,
    pub mqtt_segment_count: usize,
    /// Topic prefix of the MQTT contract (`ozone/devices/{device_id}/…`).
    pub mqtt_topic_prefix: String,
    /// How often commands queued by other processes are looked for (milliseconds).
    pub mqtt_command_poll_ms: u64,
    /// Threads serving MQTT connections (kept off the HTTP and database runtime).
    pub mqtt_threads: usize,
}

/// Accepts `["a", "b"]` (TOML) as well as `"a, b"` (environment).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    Ok(match ListOrString::deserialize(d)? {
        ListOrString::List(list) => list,
        ListOrString::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            http_addr: "0.0.0.0:8000".into(),
            mqtt_addr: "0.0.0.0:1883".into(),
            mqtts_addr: String::new(),
            database_url: "sqlite://ozone.db?mode=rwc".into(),
            db_max_connections: 8,
            db_connect_timeout_secs: 10,
            db_statement_timeout_secs: 30,
            db_application_name: "ozone".into(),
            body_limit_bytes: 64 * 1024,
            http_idle_timeout_secs: 120,
            strict_handshake: false,
            online_threshold_secs: 16 * 60,
            idle_threshold_secs: 60 * 60,
            command_sweep_interval_ms: 5_000,
            ingest_batch_max: 1024,
            token_cache_ttl_ms: 2_000,
            poll_max_commands: 20,
            max_command_retries: 5,
            legacy_iot: Default::default(),
            legacy_networks: Vec::new(),
            jwt_secret: None,
            jwt_ttl_secs: 24 * 3600,
            open_registration: false,
            secure_cookies: false,
            cors_allowed_origins: Vec::new(),
            login_attempts_per_minute: 10,
            log: "info".into(),
            log_format: "text".into(),
            trusted_proxies: Vec::new(),
            limit_window_secs: 60,
            limit_handshakes_per_addr: 1200,
            limit_handshakes_per_mac: 30,
            limit_bad_tokens_per_addr: 600,
            limit_iot_per_addr: 6000,
            metrics_token: None,
            metrics_addr: None,
            https_addr: None,
            tls_cert: None,
            tls_key: None,
            mqtts_cert: None,
            mqtts_key: None,
            tls_handshake_timeout_ms: 10_000,
            mqtt_max_connections: 20_000,
            mqtt_max_payload_bytes: 64 * 1024,
            mqtt_keep_alive_min_secs: 5,
            mqtt_keep_alive_max_secs: 1_200,
            mqtt_connect_timeout_ms: 5_000,
            mqtt_inflight_per_client: 32,
            mqtt_queue_per_client: 256,
            mqtt_segment_bytes: 1024 * 1024,
            mqtt_segment_count: 4,
            mqtt_topic_prefix: "ozone/".into(),
            mqtt_command_poll_ms: 1_000,
            mqtt_threads: 2,
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtts_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

impl Settings {
    pub fn load(config_file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = config_file {
            anyhow::ensure!(
                path.is_file(),
                "config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(Env::prefixed("OZONE_").ignore(&["CONFIG"]))
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(Serialized::defaults(overrides));
        let settings: Settings = figment.extract()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.db_max_connections >= 1,
            "db_max_connections must be >= 1"
        );
        anyhow::ensure!(self.ingest_batch_max >= 1, "ingest_batch_max must be >= 1");
        anyhow::ensure!(
            self.poll_max_commands >= 1,
            "poll_max_commands must be >= 1"
        );
        anyhow::ensure!(
            self.body_limit_bytes >= 1024,
            "body_limit_bytes must be >= 1024"
        );
        anyhow::ensure!(
            self.http_idle_timeout_secs >= 1,
            "http_idle_timeout_secs must be >= 1"
        );
        anyhow::ensure!(self.jwt_ttl_secs >= 60, "jwt_ttl_secs must be >= 60");
        anyhow::ensure!(
            self.login_attempts_per_minute >= 1,
            "login_attempts_per_minute must be >= 1"
        );
        if let Some(secret) = &self.jwt_secret {
            anyhow::ensure!(secret.len() >= 32, "jwt_secret must be at least 32 bytes");
        }
        anyhow::ensure!(
            self.online_threshold_secs <= self.idle_threshold_secs,
            "online_threshold_secs must not exceed idle_threshold_secs"
        );
        anyhow::ensure!(
            matches!(self.log_format.as_str(), "text" | "json"),
            "log_format must be `text` or `json`"
        );
        anyhow::ensure!(
            self.limit_window_secs >= 1,
            "limit_window_secs must be >= 1"
        );
        crate::http::limits::TrustedProxies::parse(&self.trusted_proxies)?;
        anyhow::ensure!(
            self.https_addr.is_none() || (self.tls_cert.is_some() && self.tls_key.is_some()),
            "https_addr needs tls_cert and tls_key"
        );
        anyhow::ensure!(
            !self.mqtts_enabled() || self.mqtts_files().is_some(),
            "mqtts_addr needs mqtts_cert and mqtts_key (or tls_cert and tls_key)"
        );
        anyhow::ensure!(
            self.tls_handshake_timeout_ms >= 1,
            "tls_handshake_timeout_ms must be >= 1"
        );
        anyhow::ensure!(
            self.mqtt_max_payload_bytes >= 1024,
            "mqtt_max_payload_bytes must be >= 1024"
        );
        anyhow::ensure!(
            self.mqtt_keep_alive_min_secs >= 1
                && self.mqtt_keep_alive_min_secs <= self.mqtt_keep_alive_max_secs,
            "mqtt_keep_alive_min_secs must be >= 1 and <= mqtt_keep_alive_max_secs"
        );
        anyhow::ensure!(
            self.mqtt_inflight_per_client >= 1 && self.mqtt_queue_per_client >= 1,
            "mqtt_inflight_per_client and mqtt_queue_per_client must be >= 1"
        );
        anyhow::ensure!(
            self.mqtt_segment_bytes >= 1024 && self.mqtt_segment_count >= 1,
            "mqtt_segment_bytes must be >= 1024 and mqtt_segment_count >= 1"
        );
        anyhow::ensure!(self.mqtt_threads >= 1, "mqtt_threads must be >= 1");
        anyhow::ensure!(
            !self.mqtt_topic_prefix.contains(['+', '#']),
            "mqtt_topic_prefix must not contain wildcards"
        );
        Ok(())
    }

    pub fn db_options(&self) -> crate::db::DbOptions {
        crate::db::DbOptions {
            max_connections: self.db_max_connections,
            connect_timeout: Duration::from_secs(self.db_connect_timeout_secs.max(1)),
            statement_timeout: Duration::from_secs(self.db_statement_timeout_secs.max(1)),
            application_name: self.db_application_name.clone(),
        }
    }

    /// MQTT is off when its address is empty (`--mqtt-addr ""`).
    pub fn mqtt_enabled(&self) -> bool {
        !self.mqtt_addr.trim().is_empty()
    }

    /// Whether the embedded broker runs: on when it has a plain or a TLS listener.
    pub fn broker_enabled(&self) -> bool {
        self.mqtt_enabled() || self.mqtts_enabled()
    }

    /// MQTT over TLS is off when its address is empty (the default).
    pub fn mqtts_enabled(&self) -> bool {
        !self.mqtts_addr.trim().is_empty()
    }

    /// The certificate chain and key of `mqtts_addr`: its own, else those of `https_addr`.
    pub fn mqtts_files(&self) -> Option<(&str, &str)> {
        match (&self.mqtts_cert, &self.mqtts_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms.max(1))
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }

    pub fn command_sweep_interval(&self) -> Duration {
        Duration::from_millis(self.command_sweep_interval_ms.max(10))
    }

    pub fn legacy_policy(&self) -> crate::domain::trust::LegacyPolicy {
        crate::domain::trust::LegacyPolicy {
            iot: self.legacy_iot,
            networks: self.legacy_networks.clone(),
        }
    }

    pub fn thresholds(&self) -> crate::domain::status::Thresholds {
        crate::domain::status::Thresholds {
            online: chrono::Duration::seconds(self.online_threshold_secs as i64),
            idle: chrono::Duration::seconds(self.idle_threshold_secs as i64),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("http_addr", &self.http_addr)
            .field("mqtt_addr", &self.mqtt_addr)
            .field("mqtts_addr", &self.mqtts_addr)
            .field("database_url", &redact_url(&self.database_url))
            .field("db_max_connections", &self.db_max_connections)
            .field("db_connect_timeout_secs", &self.db_connect_timeout_secs)
            .field("db_statement_timeout_secs", &self.db_statement_timeout_secs)
            .field("db_application_name", &self.db_application_name)
            .field("body_limit_bytes", &self.body_limit_bytes)
            .field("http_idle_timeout_secs", &self.http_idle_timeout_secs)
            .field("strict_handshake", &self.strict_handshake)
            .field("online_threshold_secs", &self.online_threshold_secs)
            .field("idle_threshold_secs", &self.idle_threshold_secs)
            .field("command_sweep_interval_ms", &self.command_sweep_interval_ms)
            .field("ingest_batch_max", &self.ingest_batch_max)
            .field("token_cache_ttl_ms", &self.token_cache_ttl_ms)
            .field("poll_max_commands", &self.poll_max_commands)
            .field("max_command_retries", &self.max_command_retries)
            .field("legacy_iot", &self.legacy_iot)
            .field("legacy_networks", &self.legacy_networks)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field("jwt_ttl_secs", &self.jwt_ttl_secs)
            .field("open_registration", &self.open_registration)
            .field("secure_cookies", &self.secure_cookies)
            .field("cors_allowed_origins", &self.cors_allowed_origins)
            .field("login_attempts_per_minute", &self.login_attempts_per_minute)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("limit_window_secs", &self.limit_window_secs)
            .field("limit_handshakes_per_addr", &self.limit_handshakes_per_addr)
            .field("limit_handshakes_per_mac", &self.limit_handshakes_per_mac)
            .field("limit_bad_tokens_per_addr", &self.limit_bad_tokens_per_addr)
            .field("limit_iot_per_addr", &self.limit_iot_per_addr)
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "***"))
            .field("metrics_addr", &self.metrics_addr)
            .field("https_addr", &self.https_addr)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("mqtts_cert", &self.mqtts_cert)
            .field("mqtts_key", &self.mqtts_key)
            .field("tls_handshake_timeout_ms", &self.tls_handshake_timeout_ms)
            .field("mqtt_max_connections", &self.mqtt_max_connections)
            .field("mqtt_max_payload_bytes", &self.mqtt_max_payload_bytes)
            .field("mqtt_keep_alive_min_secs", &self.mqtt_keep_alive_min_secs)
            .field("mqtt_keep_alive_max_secs", &self.mqtt_keep_alive_max_secs)
            .field("mqtt_connect_timeout_ms", &self.mqtt_connect_timeout_ms)
            .field("mqtt_inflight_per_client", &self.mqtt_inflight_per_client)
            .field("mqtt_queue_per_client", &self.mqtt_queue_per_client)
            .field("mqtt_segment_bytes", &self.mqtt_segment_bytes)
            .field("mqtt_segment_count", &self.mqtt_segment_count)
            .field("mqtt_topic_prefix", &self.mqtt_topic_prefix)
            .field("mqtt_command_poll_ms", &self.mqtt_command_poll_ms)
            .field("mqtt_threads", &self.mqtt_threads)
            .finish()
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_database_urls() {
        assert_eq!(
            redact_url("postgres://ozone:hunter2@db:5432/ozone"),
            "postgres://ozone:***@db:5432/ozone"
        );
        assert_eq!(
            redact_url("sqlite://ozone.db?mode=rwc"),
            "sqlite://ozone.db?mode=rwc"
        );
        let settings = Settings {
            database_url: "postgres://u:topsecret@h/d".into(),
            ..Settings::default()
        };
        assert!(!format!("{settings:?}").contains("topsecret"));
    }

    #[test]
    fn mqtts_takes_its_own_certificate_or_the_https_one() {
        let mut settings = Settings {
            mqtts_addr: "0.0.0.0:8883".into(),
            ..Settings::default()
        };
        assert!(settings.validate().is_err(), "no certificate at all");
        settings.tls_cert = Some("https.pem".into());
        settings.tls_key = Some("https.key".into());
        assert_eq!(settings.mqtts_files(), Some(("https.pem", "https.key")));
        settings.mqtts_cert = Some("mqtts.pem".into());
        assert_eq!(settings.mqtts_files(), None, "a chain without its key");
        assert!(settings.validate().is_err());
        settings.mqtts_key = Some("mqtts.key".into());
        assert_eq!(settings.mqtts_files(), Some(("mqtts.pem", "mqtts.key")));
        assert!(settings.validate().is_ok());
        // A TLS-only broker.
        settings.mqtt_addr = String::new();
        assert!(settings.broker_enabled() && !settings.mqtt_enabled());
        settings.mqtts_addr = " ".into();
        assert!(!settings.broker_enabled());
    }
}
