//! Abuse limits: a keyed rate limiter (governor) whose refusals are `Error::RateLimited`
//! (429 with `Retry-After`), the limits the firmware shim applies, and the client address as
//! seen through trusted reverse proxies.
//!
//! Each key has its own bucket, so a limited address or MAC does not slow anyone else; keys are
//! forgotten by `housekeep` once their bucket is full again.

use std::{
    collections::HashMap,
    fmt::Display,
    hash::Hash,
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};
use poem::{http::HeaderMap, web::RemoteAddr, FromRequest, Request, RequestBody};

use crate::{
    config::Settings,
    error::{Error, Result},
    state::AppState,
};

/// `amount` requests per `window` for each key, all of which may come at once; refills evenly.
/// An amount of 0 disables the limit.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    /// Stable identifier (logs, metrics).
    name: &'static str,
    /// What is counted, for the error detail: "handshakes from this address".
    what: &'static str,
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    /// One log line per key and minute, however hard it hammers.
    log_gate: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone + Display> KeyedLimiter<K> {
    pub fn new(name: &'static str, what: &'static str, amount: u32, window: Duration) -> Self {
        let limiter = NonZeroU32::new(amount).map(|n| {
            let period = (window / n.get()).max(Duration::from_nanos(1));
            let quota = Quota::with_period(period)
                .unwrap_or_else(|| Quota::per_second(n))
                .allow_burst(n);
            RateLimiter::keyed(quota)
        });
        KeyedLimiter {
            name,
            what,
            limiter,
            log_gate: RateLimiter::keyed(Quota::per_minute(NonZeroU32::MIN)),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Takes one request from `key`'s budget, or says how long until the next is allowed.
    fn acquire(&self, key: &K) -> std::result::Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    fn refusal(&self, key: &K, wait: Duration) -> Error {
        let retry_after_secs = retry_after_secs(wait);
        metrics::counter!("ozone_rate_limited_total", "limit" => self.name).increment(1);
        if self.log_gate.check_key(key).is_ok() {
            tracing::warn!(
                limit = self.name,
                key = %key,
                retry_after_secs,
                "rate limited"
            );
        }
        Error::RateLimited {
            limit: self.name,
            what: self.what,
            retry_after_secs,
        }
    }

    /// Counts one request of `key`; `Err(Error::RateLimited)` once its budget is spent.
    pub fn check(&self, key: &K) -> Result<()> {
        self.acquire(key).map_err(|wait| self.refusal(key, wait))
    }

    /// Forgets keys whose budget is full again and returns their memory.
    pub fn housekeep(&self) {
        for limiter in self.limiter.iter().chain(std::iter::once(&self.log_gate)) {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys currently remembered (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// Counts failures (bad device tokens) per key. A key over its budget is refused *before* any
/// work until the budget refills, so a script guessing tokens costs no database lookups.
pub struct FailureLimiter<K: Hash + Eq + Clone> {
    budget: KeyedLimiter<K>,
    blocked: Mutex<HashMap<K, Instant>>,
    /// Lets the common case (nobody blocked) skip the lock.
    any_blocked: AtomicBool,
}

impl<K: Hash + Eq + Clone + Display> FailureLimiter<K> {
    pub fn new(name: &'static str, what: &'static str, amount: u32, window: Duration) -> Self {
        FailureLimiter {
            budget: KeyedLimiter::new(name, what, amount, window),
            blocked: Mutex::new(HashMap::new()),
            any_blocked: AtomicBool::new(false),
        }
    }

    /// Refuses `key` while it is blocked.
    pub fn ensure_not_blocked(&self, key: &K) -> Result<()> {
        if !self.any_blocked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let until = {
            let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            blocked.get(key).copied()
        };
        match until.and_then(|until| until.checked_duration_since(Instant::now())) {
            Some(wait) if !wait.is_zero() => Err(self.budget.refusal(key, wait)),
            _ => Ok(()),
        }
    }

    /// Counts one failure of `key`; once over budget, `key` is blocked and this returns the
    /// refusal to answer instead of the failure.
    pub fn record_failure(&self, key: &K) -> Result<()> {
        match self.budget.acquire(key) {
            Ok(()) => Ok(()),
            Err(wait) => {
                let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
                blocked.insert(key.clone(), Instant::now() + wait);
                self.any_blocked.store(true, Ordering::Relaxed);
                drop(blocked);
                Err(self.budget.refusal(key, wait))
            }
        }
    }

    pub fn housekeep(&self) {
        self.budget.housekeep();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
        self.any_blocked
            .store(!blocked.is_empty(), Ordering::Relaxed);
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The limits of the firmware shim, built from the `limit_*` settings.
pub struct Limits {
    pub trusted_proxies: TrustedProxies,
    pub handshakes_per_addr: KeyedLimiter<IpAddr>,
    pub handshakes_per_mac: KeyedLimiter<String>,
    pub bad_tokens_per_addr: FailureLimiter<IpAddr>,
    pub iot_per_addr: KeyedLimiter<IpAddr>,
}

impl Limits {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Limits> {
        let window = Duration::from_secs(settings.limit_window_secs);
        Ok(Limits {
            trusted_proxies: TrustedProxies::parse(&settings.trusted_proxies)?,
            handshakes_per_addr: KeyedLimiter::new(
                "handshakes_per_addr",
                "handshakes from this address",
                settings.limit_handshakes_per_addr,
                window,
            ),
            handshakes_per_mac: KeyedLimiter::new(
                "handshakes_per_mac",
                "handshakes for this MAC",
                settings.limit_handshakes_per_mac,
                window,
            ),
            bad_tokens_per_addr: FailureLimiter::new(
                "bad_tokens_per_addr",
                "requests with bad device tokens from this address",
                settings.limit_bad_tokens_per_addr,
                window,
            ),
            iot_per_addr: KeyedLimiter::new(
                "iot_per_addr",
                "legacy readings from this address",
                settings.limit_iot_per_addr,
                window,
            ),
        })
    }

    pub fn housekeep(&self) {
        self.handshakes_per_addr.housekeep();
        self.handshakes_per_mac.housekeep();
        self.bad_tokens_per_addr.housekeep();
        self.iot_per_addr.housekeep();
    }
}

/// Reverse proxies (addresses or CIDR ranges) whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// `["10.0.0.0/8", "::1", "192.0.2.7"]`.
    pub fn parse(entries: &[String]) -> anyhow::Result<TrustedProxies> {
        let mut nets = Vec::with_capacity(entries.len());
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (addr, prefix) = match entry.split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (entry, None),
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| anyhow::anyhow!("trusted_proxies: `{entry}` is not an address"))?;
            let addr = addr.to_canonical();
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    anyhow::anyhow!("trusted_proxies: `{entry}` has a bad prefix length")
                })?,
            };
            nets.push((addr, prefix));
        }
        Ok(TrustedProxies(nets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|&(net, prefix)| in_net(ip, net, prefix))
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The address limits are keyed on: the peer, or, when the peer is a trusted proxy, the
/// nearest address in `Forwarded` (preferred) or `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(peer: &RemoteAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer
        .as_socket_addr()
        .map(|a| a.ip().to_canonical())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let chain = forwarded_chain(headers);
    let mut client = peer;
    // Walk from the nearest hop outwards: every trusted proxy vouches for the hop before it.
    for hop in chain.iter().rev() {
        match hop {
            Some(ip) => {
                client = *ip;
                if !trusted.contains(*ip) {
                    break;
                }
            }
            // An obfuscated or unreadable hop: nothing beyond it can be believed.
            None => break,
        }
    }
    client
}

/// The hops of `Forwarded: for=…` (RFC 7239) or, without it, of `X-Forwarded-For`, client first.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<Option<IpAddr>> = headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_hop(value))
            })
        })
        .collect();
    if !forwarded.is_empty() {
        return forwarded;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(parse_hop)
        .collect()
}

/// `192.0.2.1`, `"192.0.2.1:4711"`, `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_hop(value: &str) -> Option<IpAddr> {
    let value = value.trim().trim_matches('"');
    if let Some(rest) = value.strip_prefix('[') {
        let ip: IpAddr = rest.split(']').next()?.parse().ok()?;
        return Some(ip.to_canonical());
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    // IPv4 with a port.
    let (host, _port) = value.rsplit_once(':')?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Extractor: the client address (see `client_ip`), using the app's trusted proxies.
pub struct ClientAddr(pub IpAddr);

impl<'a> FromRequest<'a> for ClientAddr {
    async fn from_request(req: &'a Request, _body: &mut RequestBody) -> poem::Result<Self> {
        let untrusted = TrustedProxies::default();
        let trusted = req
            .data::<std::sync::Arc<AppState>>()
            .map_or(&untrusted, |state| &state.limits.trusted_proxies);
        Ok(ClientAddr(client_ip(
            req.remote_addr(),
            req.headers(),
            trusted,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem::{http::HeaderValue, Addr};

    fn peer(ip: &str) -> RemoteAddr {
        let ip: IpAddr = ip.parse().expect("address");
        RemoteAddr(Addr::SocketAddr((ip, 40000).into()))
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("valid list")
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn forwarding_headers_are_ignored_from_untrusted_peers() {
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        assert_eq!(
            client_ip(&peer("203.0.113.5"), &h, &proxies(&["10.0.0.0/8"])),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(&peer("10.0.0.2"), &h, &TrustedProxies::default()),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn trusted_proxies_reveal_the_nearest_untrusted_hop() {
        let trusted = proxies(&["10.0.0.0/8", "192.0.2.1"]);
        // A client that forges a first entry cannot choose its key: the rightmost untrusted
        // hop wins.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.9, 192.0.2.1")]);
        assert_eq!(
            client_ip(&peer("10.1.2.3"), &h, &trusted),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[(
            "forwarded",
            "for=\"[2001:db8::7]:4711\";proto=https, for=192.0.2.1",
        )]);
        assert_eq!(
            client_ip(&peer("10.1.2.3"), &h, &trusted),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[("x-forwarded-for", "198.51.100.9:5555")]);
        assert_eq!(
            client_ip(&peer("::ffff:10.0.0.1"), &h, &trusted),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_trusted_proxy_entries_are_refused() {
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["proxy.local".into()]).is_err());
        assert!(proxies(&["::/0"]).contains("2001:db8::1".parse().unwrap()));
        assert!(!proxies(&["10.0.0.0/8"]).contains("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
    }

    #[test]
    fn a_limited_key_does_not_limit_others_and_zero_disables() {
        let limiter = KeyedLimiter::new("t", "tests", 2, Duration::from_secs(60));
        assert!(limiter.check(&"a".to_string()).is_ok());
        assert!(limiter.check(&"a".to_string()).is_ok());
        match limiter.check(&"a".to_string()) {
            Err(Error::RateLimited {
                retry_after_secs, ..
            }) => assert!((1..=30).contains(&retry_after_secs)),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(limiter.check(&"b".to_string()).is_ok());
        let off = KeyedLimiter::new("t", "tests", 0, Duration::from_secs(60));
        for _ in 0..100 {
            assert!(off.check(&"a".to_string()).is_ok());
        }
    }

    #[test]
    fn failures_over_budget_block_until_the_budget_refills() {
        let limiter = FailureLimiter::new("t", "tests", 1, Duration::from_millis(200));
        let key = "a".to_string();
        assert!(limiter.ensure_not_blocked(&key).is_ok());
        assert!(limiter.record_failure(&key).is_ok());
        assert!(limiter.record_failure(&key).is_err());
        assert!(limiter.ensure_not_blocked(&key).is_err());
        assert!(limiter.ensure_not_blocked(&"b".to_string()).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(limiter.ensure_not_blocked(&key).is_ok());
        limiter.housekeep();
        assert!(!limiter.any_blocked.load(Ordering::Relaxed));
    }
}
