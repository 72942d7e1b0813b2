//! The pure rules that bound what one sandbox can cost through its token
//! endpoint: how many tokens the runner keeps for it, and how fast it may ask
//! for new ones.
//!
//! A sandbox is hostile. A cached token costs a map lookup; a cache miss
//! costs an RSA signature on the coordinator, which every sandbox of the
//! cluster shares. So each sandbox gets:
//!
//! - a cache of at most [`MAX_CACHED_KEYS`] distinct (audiences, ttl) keys
//!   ([`SandboxCache`]): over it, one entry is evicted (an expired one, else
//!   the least recently used), so memory stays bounded however many keys the
//!   sandbox invents. Eviction rather than refusal: a sandbox whose set of
//!   audiences changes over time keeps working, and what an attacker gains
//!   by churning keys is only more misses, which the bucket below bounds;
//! - a token bucket on misses ([`MissBucket`], [`MissLimit`]): a burst, then
//!   a steady rate. Over it the endpoint answers 429 with `Retry-After`.
//!   Cached hits never take from the bucket.
//!
//! Everything here takes the time as an argument (`now`), so the rules are
//! tested without sleeping; `tokens` wires them to the clock and the wire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most distinct (audiences, ttl) keys cached per sandbox. A real app asks
/// for a handful (one per service it talks to); 32 leaves room for several
/// ttls per audience and costs at most ~100 KiB per sandbox (8 audiences of
/// 256 bytes plus a ~1 KiB token per entry).
pub const MAX_CACHED_KEYS: usize = 32;

/// What one sandbox asks for: the part of a token request that varies
/// within a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub audiences: Vec<String>,
    /// Requested lifetime in seconds (0 = the coordinator's default).
    pub ttl: u32,
}

/// A minted token with its times (Unix seconds, as in its claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedToken {
    pub token: String,
    pub iat: i64,
    pub exp: i64,
}

impl CachedToken {
    /// Under half its lifetime: served without asking the coordinator.
    pub fn is_fresh(&self, now_unix: i64) -> bool {
        now_unix < self.iat + (self.exp - self.iat) / 2
    }

    /// Not yet expired: still worth serving when a new one cannot be had.
    pub fn is_unexpired(&self, now_unix: i64) -> bool {
        now_unix < self.exp
    }
}

#[derive(Debug)]
struct Entry {
    token: CachedToken,
    /// Value of [`SandboxCache::uses`] at the last lookup or insert.
    last_used: u64,
}

/// One sandbox's cached tokens, at most [`MAX_CACHED_KEYS`] of them.
#[derive(Debug, Default)]
pub struct SandboxCache {
    entries: HashMap<CacheKey, Entry>,
    /// A counter, not a clock: orders uses exactly, even within one second.
    uses: u64,
}

impl SandboxCache {
    pub fn new() -> Self {
        SandboxCache::default()
    }

    /// The token cached for `key` (fresh or not), marking it as used.
    pub fn lookup(&mut self, key: &CacheKey) -> Option<CachedToken> {
        self.uses += 1;
        let uses = self.uses;
        self.entries.get_mut(key).map(|e| {
            e.last_used = uses;
            e.token.clone()
        })
    }

    /// Caches `token` under `key`. When that would make more than
    /// [`MAX_CACHED_KEYS`] keys, one other entry goes first: an expired one
    /// if any, else the least recently used. Returns the evicted key.
    pub fn insert(&mut self, key: CacheKey, token: CachedToken, now_unix: i64) -> Option<CacheKey> {
        self.uses += 1;
        let evicted = if !self.entries.contains_key(&key) && self.entries.len() >= MAX_CACHED_KEYS {
            let victim = self
                .entries
                .iter()
                .min_by_key(|(_, e)| (e.token.is_unexpired(now_unix), e.last_used))
                .map(|(k, _)| k.clone());
            victim.inspect(|k| {
                self.entries.remove(k);
            })
        } else {
            None
        };
        self.entries.insert(
            key,
            Entry {
                token,
                last_used: self.uses,
            },
        );
        evicted
    }

    /// How many keys are cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is cached (without marking it used).
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entries.contains_key(key)
    }
}

/// A miss limit with a zero in it: a bucket that never refills (or never
/// holds a token) would lock a sandbox out of new tokens for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the token miss burst and rate must be at least 1 (got burst {burst}, rate {per_sec}/s)")]
pub struct ZeroMissLimit {
    pub burst: u32,
    pub per_sec: u32,
}

/// How many cache misses (coordinator signatures) a sandbox may cause: up to
/// `burst` at once, then `per_sec` per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissLimit {
    burst: u32,
    per_sec: u32,
}

impl MissLimit {
    /// Burst = the cache size, so a sandbox can fill every key it may keep
    /// in one go (at start-up, say).
    pub const DEFAULT_BURST: u32 = MAX_CACHED_KEYS as u32;
    /// Twice the fastest rate a sandbox that uses its cache can need: all
    /// [`MAX_CACHED_KEYS`] keys at the shortest ttl (60 s) are re-minted every
    /// half-life (30 s), ~1.07/s. Asking faster means churning keys, which
    /// is what the limit is for. Worst case per sandbox: 2 signatures/s.
    pub const DEFAULT_PER_SEC: u32 = 2;

    pub fn new(burst: u32, per_sec: u32) -> Result<Self, ZeroMissLimit> {
        if burst == 0 || per_sec == 0 {
            return Err(ZeroMissLimit { burst, per_sec });
        }
        Ok(MissLimit { burst, per_sec })
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }
}

impl Default for MissLimit {
    fn default() -> Self {
        MissLimit {
            burst: Self::DEFAULT_BURST,
            per_sec: Self::DEFAULT_PER_SEC,
        }
    }
}

/// One miss in the bucket's units: a nanosecond at one miss per second, so
/// refilling and waiting are exact integer arithmetic.
const UNITS_PER_MISS: u128 = 1_000_000_000;

/// A token bucket over one sandbox's cache misses. It starts full and
/// refills continuously at [`MissLimit::per_sec`] up to [`MissLimit::burst`].
#[derive(Debug, Clone)]
pub struct MissBucket {
    limit: MissLimit,
    /// Misses available now, in [`UNITS_PER_MISS`] (fractional while refilling).
    available: u128,
    /// When `available` was last brought up to date.
    updated: Instant,
}

impl MissBucket {
    pub fn full(limit: MissLimit, now: Instant) -> Self {
        MissBucket {
            limit,
            available: u128::from(limit.burst) * UNITS_PER_MISS,
            updated: now,
        }
    }

    /// Takes one miss if one is available at `now`; otherwise says how long
    /// until one will be (and takes nothing). A `now` earlier than a previous
    /// one adds nothing.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated);
        if now > self.updated {
            self.updated = now;
        }
        let rate = u128::from(self.limit.per_sec);
        let cap = u128::from(self.limit.burst) * UNITS_PER_MISS;
        self.available = self
            .available
            .saturating_add(elapsed.as_nanos().saturating_mul(rate))
            .min(cap);
        if self.available >= UNITS_PER_MISS {
            self.available -= UNITS_PER_MISS;
            Ok(())
        } else {
            let wait_nanos = (UNITS_PER_MISS - self.available).div_ceil(rate);
            // At most one second at a rate of at least 1/s: fits in u64.
            Err(Duration::from_nanos(
                u64::try_from(wait_nanos).unwrap_or(u64::MAX),
            ))
        }
    }
}

/// A wait as an HTTP `Retry-After` value: whole seconds, rounded up, at
/// least 1 (so that a client retrying after it finds a miss available).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs();
    let rounded = if wait.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    };
    rounded.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(aud: &str) -> CacheKey {
        CacheKey {
            audiences: vec![aud.to_string()],
            ttl: 300,
        }
    }

    fn token(name: &str, iat: i64, exp: i64) -> CachedToken {
        CachedToken {
            token: name.to_string(),
            iat,
            exp,
        }
    }

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn fresh_until_half_life_unexpired_until_exp() {
        let t = token("t", NOW, NOW + 600);
        assert!(t.is_fresh(NOW));
        assert!(t.is_fresh(NOW + 299));
        assert!(!t.is_fresh(NOW + 300));
        assert!(t.is_unexpired(NOW + 599));
        assert!(!t.is_unexpired(NOW + 600));
    }

    #[test]
    fn cache_holds_at_most_the_cap_and_evicts_the_least_recently_used() {
        let mut cache = SandboxCache::new();
        for i in 0..MAX_CACHED_KEYS {
            let evicted = cache.insert(
                key(&format!("a{i}")),
                token(&format!("t{i}"), NOW, NOW + 600),
                NOW,
            );
            assert_eq!(evicted, None);
        }
        assert_eq!(cache.len(), MAX_CACHED_KEYS);
        // a0 is the oldest, but it was just used: a1 goes instead.
        assert_eq!(cache.lookup(&key("a0")).map(|t| t.token), Some("t0".into()));
        let evicted = cache.insert(key("new"), token("tn", NOW, NOW + 600), NOW);
        assert_eq!(evicted, Some(key("a1")));
        assert_eq!(cache.len(), MAX_CACHED_KEYS);
        assert!(cache.contains(&key("a0")));
        assert!(!cache.contains(&key("a1")));
        assert!(cache.contains(&key("new")));
        // Many more distinct keys: still bounded, the newest kept.
        for i in 0..10 * MAX_CACHED_KEYS {
            cache.insert(key(&format!("b{i}")), token("tb", NOW, NOW + 600), NOW);
            assert!(cache.len() <= MAX_CACHED_KEYS);
        }
        assert!(cache.contains(&key(&format!("b{}", 10 * MAX_CACHED_KEYS - 1))));
        assert!(!cache.contains(&key("a0")));
    }

    #[test]
    fn replacing_a_cached_key_evicts_nothing() {
        let mut cache = SandboxCache::new();
        for i in 0..MAX_CACHED_KEYS {
            cache.insert(key(&format!("a{i}")), token("old", NOW, NOW + 600), NOW);
        }
        let evicted = cache.insert(key("a0"), token("renewed", NOW + 300, NOW + 900), NOW + 300);
        assert_eq!(evicted, None);
        assert_eq!(cache.len(), MAX_CACHED_KEYS);
        assert_eq!(
            cache.lookup(&key("a0")).map(|t| t.token),
            Some("renewed".into())
        );
    }

    #[test]
    fn an_expired_entry_is_evicted_before_a_live_one() {
        let mut cache = SandboxCache::new();
        // a0 is the least recently used and still valid; a5 expired.
        for i in 0..MAX_CACHED_KEYS {
            let exp = if i == 5 { NOW + 10 } else { NOW + 600 };
            cache.insert(key(&format!("a{i}")), token("t", NOW, exp), NOW);
        }
        let evicted = cache.insert(key("new"), token("t", NOW + 20, NOW + 620), NOW + 20);
        assert_eq!(evicted, Some(key("a5")));
        assert!(cache.contains(&key("a0")));
    }

    #[test]
    fn lookup_of_an_unknown_key_is_none() {
        let mut cache = SandboxCache::new();
        assert!(cache.is_empty());
        assert_eq!(cache.lookup(&key("nope")), None);
    }

    #[test]
    fn miss_limit_refuses_zeros() {
        assert_eq!(
            MissLimit::new(0, 2),
            Err(ZeroMissLimit {
                burst: 0,
                per_sec: 2
            })
        );
        assert!(MissLimit::new(5, 0).is_err());
        let l = MissLimit::new(5, 3).expect("valid");
        assert_eq!((l.burst(), l.per_sec()), (5, 3));
        assert_eq!(
            MissLimit::default(),
            MissLimit::new(MissLimit::DEFAULT_BURST, MissLimit::DEFAULT_PER_SEC).expect("valid")
        );
    }

    #[test]
    fn bucket_allows_the_burst_then_says_when_to_come_back() {
        let t0 = Instant::now();
        let limit = MissLimit::new(3, 2).expect("valid");
        let mut bucket = MissBucket::full(limit, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(t0), Ok(()));
        }
        // Empty: one miss comes back after 1/2 s.
        assert_eq!(bucket.take(t0), Err(Duration::from_millis(500)));
        // A refusal takes nothing: the wait shrinks as time passes.
        assert_eq!(
            bucket.take(t0 + Duration::from_millis(200)),
            Err(Duration::from_millis(300))
        );
        assert_eq!(bucket.take(t0 + Duration::from_millis(500)), Ok(()));
        assert!(bucket.take(t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn bucket_refills_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let limit = MissLimit::new(4, 2).expect("valid");
        let mut bucket = MissBucket::full(limit, t0);
        for _ in 0..4 {
            assert!(bucket.take(t0).is_ok());
        }
        // 1.5 s at 2/s: three misses, not four.
        let t1 = t0 + Duration::from_millis(1500);
        for _ in 0..3 {
            assert!(bucket.take(t1).is_ok());
        }
        assert!(bucket.take(t1).is_err());
        // An hour idle refills to the burst, never beyond it.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..4 {
            assert!(bucket.take(t2).is_ok());
        }
        assert!(bucket.take(t2).is_err());
    }

    #[test]
    fn bucket_ignores_time_going_backwards() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(10);
        let limit = MissLimit::new(1, 1).expect("valid");
        let mut bucket = MissBucket::full(limit, later);
        assert!(bucket.take(later).is_ok());
        // An earlier `now` neither refills nor moves the bucket's clock back.
        assert!(bucket.take(t0).is_err());
        assert_eq!(
            bucket.take(later + Duration::from_millis(250)),
            Err(Duration::from_millis(750))
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(500)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }
}
