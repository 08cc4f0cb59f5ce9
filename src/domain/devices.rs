//! Devices: MAC normalisation, handshake and device-token authentication.
//!
//! Tokens are 256-bit random values shown to the device once; only their SHA-256 is stored.
//! A token is looked up by its hash (an attacker cannot steer a hash prefix, so the index
//! lookup leaks nothing useful) and the stored hash is then compared in constant time.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sea_orm::{
    sea_query::OnConflict, ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait,
    EntityTrait, QueryFilter,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    db::{
        entities::{device, device_status},
        Db,
    },
    domain::{
        notify::{Notification, Notifier},
        trust::LegacyPolicy,
    },
    error::{Entity, Error, Result},
};

/// A MAC address normalised to upper case with colons: `AA:BB:CC:DD:EE:FF`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mac(String);

impl Mac {
    /// Accepts colons, dashes, dots or no separators, in any case.
    pub fn parse(input: &str) -> Result<Mac> {
        let hex: String = input
            .trim()
            .chars()
            .filter(|c| !matches!(c, ':' | '-' | '.'))
            .collect();
        if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "invalid_mac",
                format!("`{input}` is not a MAC address (expected 12 hex digits, e.g. EC:E3:34:46:2B:C0)"),
            ));
        }
        let upper = hex.to_ascii_uppercase();
        let pairs: Vec<&str> = (0..6).map(|i| &upper[i * 2..i * 2 + 2]).collect();
        Ok(Mac(pairs.join(":")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn hashes_match(stored: &str, presented_hash: &str) -> bool {
    stored.as_bytes().ct_eq(presented_hash.as_bytes()).into()
}

/// The device a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedDevice {
    pub id: i32,
    pub device_id: String,
    pub assigned: bool,
}

impl AuthenticatedDevice {
    /// The `device_id` a request names must be the token's own.
    pub fn ensure_is(&self, device_id: &str) -> Result<()> {
        if self.device_id.eq_ignore_ascii_case(device_id.trim()) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch(device_id.to_string()))
        }
    }

    pub fn ensure_assigned(&self) -> Result<()> {
        if self.assigned {
            Ok(())
        } else {
            Err(Error::DeviceUnassigned(self.device_id.clone()))
        }
    }
}

/// Recently verified tokens, so the event hot path does not query the database per request.
/// Entries live for a short TTL; rotation in this process evicts at once.
pub struct TokenCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (AuthenticatedDevice, Instant)>>,
    /// Bumped by every eviction: a lookup that read the database before an eviction does not
    /// cache what it read, so a token rotated or unassigned a moment ago is not put back.
    epoch: std::sync::atomic::AtomicU64,
}

const TOKEN_CACHE_MAX: usize = 100_000;

impl TokenCache {
    pub fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn get(&self, hash: &str) -> Option<AuthenticatedDevice> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(device, _)| device.clone())
    }

    fn put(&self, hash: String, device: AuthenticatedDevice, read_at_epoch: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch() != read_at_epoch {
            return;
        }
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash, (device, Instant::now()));
    }

    /// Forgets every cached token of a device (rotation, assignment changes). Call it after
    /// the change is committed.
    pub fn evict_device(&self, id: i32) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.retain(|_, (device, _)| device.id != id);
    }
}

/// Resolves a bearer token to its device. `fresh` bypasses the cache (command endpoints need
/// the current assignment).
pub async fn authenticate(
    db: &Db,
    cache: &TokenCache,
    token: Option<&str>,
    fresh: bool,
) -> Result<AuthenticatedDevice> {
    let token = token.map(str::trim).filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(Error::MissingToken);
    };
    let hash = hash_token(token);
    if !fresh {
        if let Some(device) = cache.get(&hash) {
            return Ok(device);
        }
    }
    let epoch = cache.epoch();
    let found = device::Entity::find()
        .filter(device::Column::TokenHash.eq(hash.as_str()))
        .one(db.conn())
        .await?;
    let device = match found {
        Some(d)
            if d.token_hash
                .as_deref()
                .is_some_and(|h| hashes_match(h, &hash)) =>
        {
            d
        }
        _ => return Err(Error::InvalidToken),
    };
    let auth = AuthenticatedDevice {
        id: device.id,
        device_id: device.device_id,
        assigned: device.assigned,
    };
    cache.put(hash, auth.clone(), epoch);
    Ok(auth)
}

#[derive(Debug, Clone)]
pub struct Handshake {
    pub mac: String,
    pub firmware: Option<String>,
    /// The token the device already holds, from `Authorization: Bearer`.
    pub presented_token: Option<String>,
    /// The client's address, for the legacy policy's networks.
    pub client: Option<std::net::IpAddr>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct HandshakeGranted {
    pub device_id: String,
    pub token: String,
    pub assigned: bool,
}

impl std::fmt::Debug for HandshakeGranted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeGranted")
            .field("device_id", &self.device_id)
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

const FIRMWARE_MAX: usize = 64;

fn clean_firmware(firmware: Option<&str>) -> Result<Option<String>> {
    match firmware.map(str::trim).filter(|f| !f.is_empty()) {
        Some(f) if f.chars().count() > FIRMWARE_MAX => Err(Error::invalid(
            "invalid_firmware",
            format!("firmware is longer than {FIRMWARE_MAX} characters"),
        )),
        other => Ok(other.map(str::to_owned)),
    }
}

/// Registers a device on first contact, or re-issues its credentials.
///
/// A known MAC presenting its current token gets the same token back. Without it a fresh token
/// is issued and the old one stops working, unless `strict` is on and the device is assigned.
///
/// A handshake without the device's current token is only taken from the networks `policy`
/// allows.
pub async fn handshake(
    db: &Db,
    cache: &TokenCache,
    notifier: &Notifier,
    strict: bool,
    policy: &LegacyPolicy,
    request: Handshake,
) -> Result<HandshakeGranted> {
    let mac = Mac::parse(&request.mac)?;
    let firmware = clean_firmware(request.firmware.as_deref())?;
    if policy.admit(request.client).is_err() {
        // Only a device proving its current token may handshake from elsewhere.
        let known = device::Entity::find()
            .filter(device::Column::Mac.eq(mac.as_str()))
            .one(db.conn())
            .await?;
        let proven = match (known.and_then(|d| d.token_hash), &request.presented_token) {
            (Some(stored), Some(token)) => hashes_match(&stored, &hash_token(token.trim())),
            _ => false,
        };
        if !proven {
            policy.admit(request.client)?;
        }
    }
    let txn = db.begin_write().await?;
    let now = Utc::now();
    // First contact: an insert that a simultaneous first handshake of the same MAC (in
    // another process) cannot make fail; the loser continues as a known device.
    let token = new_token();
    let created = device::Entity::insert(device::ActiveModel {
        device_id: Set(mac.as_str().to_owned()),
        mac: Set(mac.as_str().to_owned()),
        token_hash: Set(Some(hash_token(&token))),
        token_issued_at: Set(Some(now)),
        assigned: Set(false),
        firmware: Set(firmware.clone().unwrap_or_default()),
        last_seen: Set(Some(now)),
        notes: Set(String::new()),
        created_at: Set(now),
        ..Default::default()
    })
    // Any unique key: `device_id` defaults to the MAC, so both collide.
    .on_conflict(OnConflict::new().do_nothing().to_owned())
    .exec_without_returning(&*txn)
    .await?
        == 1;
    let existing = device::Entity::find()
        .filter(device::Column::Mac.eq(mac.as_str()))
        .one(&*txn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Device, mac.as_str()))?;
    let mut evict = None;
    let changed = existing.id;
    let granted = match existing {
        device if created => {
            ensure_status(&*txn, device.id, now).await?;
            HandshakeGranted {
                device_id: device.device_id,
                token,
                assigned: false,
            }
        }
        device => {
            let presented_is_current = match (&request.presented_token, &device.token_hash) {
                (Some(token), Some(stored)) => hashes_match(stored, &hash_token(token.trim())),
                _ => false,
            };
            let mut update = device::ActiveModel {
                id: Set(device.id),
                last_seen: Set(Some(now)),
                ..Default::default()
            };
            if let Some(firmware) = firmware {
                update.firmware = Set(firmware);
            }
            let token = if presented_is_current {
                request
                    .presented_token
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            } else {
                if strict && device.assigned && device.token_hash.is_some() {
                    return Err(Error::HandshakeRefused(device.device_id));
                }
                let token = new_token();
                update.token_hash = Set(Some(hash_token(&token)));
                update.token_issued_at = Set(Some(now));
                token
            };
            update.update(&*txn).await?;
            ensure_status(&*txn, device.id, now).await?;
            evict = Some(device.id);
            HandshakeGranted {
                device_id: device.device_id,
                token,
                assigned: device.assigned,
            }
        }
    };
    txn.commit().await?;
    if let Some(id) = evict {
        cache.evict_device(id);
    }
    notifier.publish(Notification::DeviceChanged { device: changed });
    Ok(granted)
}

/// Clears a device's token so that its next handshake is accepted even under `strict`.
pub async fn reset_credentials(db: &Db, cache: &TokenCache, device_id: &str) -> Result<()> {
    let txn = db.begin_write().await?;
    let device = find_by_device_id(&*txn, device_id).await?;
    device::ActiveModel {
        id: Set(device.id),
        token_hash: Set(None),
        token_issued_at: Set(None),
        ..Default::default()
    }
    .update(&*txn)
    .await?;
    txn.commit().await?;
    cache.evict_device(device.id);
    Ok(())
}

/// Whether a device already stored an event with this id.
pub async fn has_event(conn: &impl ConnectionTrait, device: i32, event_id: &str) -> Result<bool> {
    use crate::db::entities::telemetry_event;
    use sea_orm::QuerySelect;
    Ok(telemetry_event::Entity::find()
        .select_only()
        .column(telemetry_event::Column::Id)
        .filter(telemetry_event::Column::DeviceId.eq(device))
        .filter(telemetry_event::Column::EventId.eq(event_id))
        .into_tuple::<i64>()
        .one(conn)
        .await?
        .is_some())
}

/// Finds a device by its primary key.
pub async fn find_by_pk(conn: &impl ConnectionTrait, id: i32) -> Result<device::Model> {
    device::Entity::find_by_id(id)
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Device, id.to_string()))
}

/// Finds a device by its `device_id`, or by its MAC in any spelling (`ec-e3-…`) when no
/// `device_id` matches exactly.
pub async fn find_by_device_id(
    conn: &impl ConnectionTrait,
    device_id: &str,
) -> Result<device::Model> {
    let exact = device::Entity::find()
        .filter(device::Column::DeviceId.eq(device_id.trim()))
        .one(conn)
        .await?;
    let found = match (exact, Mac::parse(device_id)) {
        (Some(device), _) => Some(device),
        (None, Ok(mac)) => {
            device::Entity::find()
                .filter(device::Column::Mac.eq(mac.as_str()))
                .one(conn)
                .await?
        }
        (None, Err(_)) => None,
    };
    found.ok_or_else(|| Error::not_found(Entity::Device, device_id))
}

/// Finds a device by MAC, registering it (without a token) when it has never been seen. Used by
/// the legacy form ingest, whose devices may never have handshaken.
pub async fn find_or_register_by_mac(
    db: &Db,
    mac: &Mac,
    now: DateTime<Utc>,
) -> Result<device::Model> {
    if let Some(device) = device::Entity::find()
        .filter(device::Column::Mac.eq(mac.as_str()))
        .one(db.conn())
        .await?
    {
        return Ok(device);
    }
    let txn = db.begin_write().await?;
    if let Some(device) = device::Entity::find()
        .filter(device::Column::Mac.eq(mac.as_str()))
        .one(&*txn)
        .await?
    {
        return Ok(device);
    }
    let device = register(&*txn, mac, now).await?;
    txn.commit().await?;
    Ok(device)
}

/// The device record of a MAC, created with no token (until it handshakes) when there is none;
/// a registration racing another one for the same MAC returns the same device.
pub async fn register(
    conn: &impl ConnectionTrait,
    mac: &Mac,
    now: DateTime<Utc>,
) -> Result<device::Model> {
    device::Entity::insert(device::ActiveModel {
        device_id: Set(mac.as_str().to_owned()),
        mac: Set(mac.as_str().to_owned()),
        token_hash: Set(None),
        token_issued_at: Set(None),
        assigned: Set(false),
        firmware: Set(String::new()),
        last_seen: Set(None),
        notes: Set(String::new()),
        created_at: Set(now),
        ..Default::default()
    })
    // Any unique key: `device_id` defaults to the MAC, so both collide.
    .on_conflict(OnConflict::new().do_nothing().to_owned())
    .exec_without_returning(conn)
    .await?;
    let device = device::Entity::find()
        .filter(device::Column::Mac.eq(mac.as_str()))
        .one(conn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::Device, mac.as_str()))?;
    ensure_status(conn, device.id, now).await?;
    Ok(device)
}

/// Gives a device its status row if it has none (an upsert: safe against a concurrent one).
pub async fn ensure_status(
    conn: &impl ConnectionTrait,
    device_pk: i32,
    now: DateTime<Utc>,
) -> Result<()> {
    device_status::Entity::insert(device_status::ActiveModel {
        device_id: Set(device_pk),
        wifi_connected: Set(false),
        rtc_available: Set(None),
        sd_card_available: Set(None),
        current_count_basic: Set(0),
        current_count_standard: Set(0),
        current_count_premium: Set(0),
        uptime_seconds: Set(None),
        last_seen: Set(None),
        last_poll: Set(None),
        device_timestamp: Set(None),
        mqtt_connected: Set(false),
        updated_at: Set(now),
        ..Default::default()
    })
    .on_conflict(
        OnConflict::column(device_status::Column::DeviceId)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise_to_upper_case_with_colons() {
        for input in [
            "ec:e3:34:46:2b:c0",
            "EC-E3-34-46-2B-C0",
            "ece334462bc0",
            " EC:E3:34:46:2B:C0 ",
            "ece3.3446.2bc0",
        ] {
            assert_eq!(Mac::parse(input).unwrap().as_str(), "EC:E3:34:46:2B:C0");
        }
        for bad in [
            "",
            "EC:E3:34:46:2B",
            "EC:E3:34:46:2B:C0:11",
            "GG:E3:34:46:2B:C0",
        ] {
            assert!(Mac::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn tokens_are_256_bit_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), a);
    }
}
