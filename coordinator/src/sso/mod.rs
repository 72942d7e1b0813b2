//! Route OIDC at the ingress (labs): the login flow and the session.
//!
//! An unauthenticated browser request is sent to the provider (authorization
//! code with PKCE S256, `state`, `nonce`); the callback at
//! [`CALLBACK_PATH`] exchanges the code, verifies the ID token with the
//! `identity` verifier against the provider's JWKS (the same key cache as CI
//! issuers), and sets a session cookie sealed with AES-256-GCM (HttpOnly,
//! SameSite=Lax, Secure when the ingress serves HTTPS), bound to the host.
//! The claims last no longer than the ID token; when the provider gave a
//! refresh token, it renews them (one refresh per session at a time, so a
//! rotated refresh token is never spent twice) up to the session cap.
//! Login state travels in a sealed cookie of its own, one per login (named
//! after the state, so logins in several tabs do not clash); each `state` is
//! accepted once. A callback that would make the coordinator ask the
//! provider takes from a token bucket of its source address first
//! ([`CALLBACK_BURST`], [`CALLBACK_INTERVAL`]): the login cookie and its
//! state are free to anyone, so without it one anonymous peer could make
//! the coordinator call the provider's token endpoint at any rate. Used
//! states, ended sessions and the latest refresh of
//! each session are shared through the store by every coordinator
//! ([`shared`]). The pure rules (return paths, PKCE, header filtering,
//! session lifetime, used states) are in `identity`.
//!
//! Three parts: [`cookie`] (names, scopes, the sealing key), [`provider`]
//! (a provider's endpoints, token requests, ID token verification) and
//! [`flow`] (what the gate does with a request). The route and provider
//! records are [`crate::routes`]'.

pub mod cookie;
pub mod flow;
pub mod provider;
pub mod shared;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use identity::UsedStates;

pub use cookie::{
    is_our_cookie, CookieScope, LOGIN_COOKIE, MAX_COOKIE_VALUE_BYTES, SESSION_COOKIE,
};
pub use flow::{
    Gate, GateRequest, CALLBACK_PATH, LOGIN_SECS, LOGOUT_PATH, MAX_SESSION_SECS, SESSION_ID_CLAIM,
};
pub use provider::ProviderMeta;

use crate::frontdoor::RateLimiter;
use crate::shutdown::Tasks;
use crate::store::{Revision, Store};

/// Callbacks one source address (an IPv4 address, an IPv6 /64) may send on
/// to the provider at once: a few people behind one NAT signing in
/// together, a user retrying.
pub const CALLBACK_BURST: u32 = 10;
/// ... and then one every this long.
pub const CALLBACK_INTERVAL: Duration = Duration::from_secs(1);
/// Sources whose callback buckets are remembered; past that, full buckets
/// are forgotten first (they equal an absent one), then the one nearest
/// full, so many addresses cannot grow the map.
pub const MAX_CALLBACK_SOURCES: usize = 4096;

/// The bucket callbacks take from per source address.
fn callback_limiter() -> RateLimiter<IpAddr> {
    RateLimiter::new(CALLBACK_BURST, CALLBACK_INTERVAL, MAX_CALLBACK_SOURCES)
}

/// Completed logins remembered for replay protection at most (each until
/// its login window ends); beyond it new callbacks are refused until older
/// logins expire. Only logins the provider completed count, so an
/// anonymous peer cannot fill it.
pub const MAX_LOGINS_IN_PROGRESS: usize = 100_000;

/// Sealing key, used states and provider metadata.
pub struct Sso {
    key: cookie::CookieKey,
    store: Arc<dyn Store>,
    /// States of logins completed through this coordinator: a fast
    /// refusal of a replay here (read before the provider is asked) and
    /// one winner among this coordinator's callbacks of one state. A state
    /// is taken only after the provider completed its login and the ID
    /// token verified, just before the store (which decides for all)
    /// consumes it, so a junk-code callback takes nothing.
    used_states: Mutex<UsedStates>,
    /// The lease used states are written on.
    state_lease: shared::StateLease,
    /// Callbacks per source address that go on to the store and the
    /// provider: a burst, then one per interval.
    callbacks: Mutex<RateLimiter<IpAddr>>,
    /// Sessions ended by logout, refused until they would have expired
    /// anyway; following the store, so a logout through any coordinator
    /// (or before a restart) counts.
    ended: Arc<shared::EndedSessions>,
    /// The revision `ended` was loaded at.
    ended_loaded_at: Revision,
    providers: provider::ProviderCache,
    /// A lock per session being refreshed here, so this coordinator's
    /// requests of one session wait for one look at the shared record.
    refreshes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Counts and audits logins, refreshes and logouts.
    observe: Arc<crate::observe::Observe>,
}

impl Sso {
    /// Loads the sealing key from `dir/route-oidc.key` (creating it once)
    /// and the sessions ended by logout from `store`.
    pub fn load_or_create(dir: &Path, store: Arc<dyn Store>) -> anyhow::Result<Sso> {
        let key = cookie::CookieKey::load_or_create(&dir.join(cookie::COOKIE_KEY_FILE))?;
        Self::with_key(key, store)
    }

    /// With the cookie key given (the cluster's shared one, `--etcd`) and
    /// the sessions ended by logout from `store`.
    pub fn with_key(key: cookie::CookieKey, store: Arc<dyn Store>) -> anyhow::Result<Sso> {
        let ended = Arc::new(shared::EndedSessions::default());
        let ended_loaded_at = crate::watched::Watched::reload(&*ended, &*store)?;
        Ok(Sso {
            key,
            store,
            used_states: Mutex::new(UsedStates::new(MAX_LOGINS_IN_PROGRESS)),
            state_lease: shared::StateLease::default(),
            callbacks: Mutex::new(callback_limiter()),
            ended,
            ended_loaded_at,
            providers: provider::ProviderCache::default(),
            refreshes: Mutex::new(HashMap::new()),
            observe: Arc::new(crate::observe::Observe::disabled()),
        })
    }

    /// Counts and audits in `observe`.
    pub fn observed(self, observe: Arc<crate::observe::Observe>) -> Self {
        Sso { observe, ..self }
    }

    /// Takes one callback for `source` at `now`, or says how long until
    /// its address may send the next one.
    fn callback_attempt(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.callbacks.lock() {
            Ok(mut limiter) => limiter.attempt(source, now),
            Err(_) => Err(CALLBACK_INTERVAL.max(Duration::from_secs(1))),
        }
    }

    /// Follows logouts through every coordinator until shutdown.
    pub fn follow(&self, tasks: &Tasks) {
        crate::watched::follow(
            self.ended.clone(),
            self.store.clone(),
            self.ended_loaded_at,
            tasks,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sso::shared::ENDED_PREFIX;
    use crate::store::RedbStore;
    use identity::route_oidc::{random_token, SessionClaims};

    const A: CookieScope<'static> = CookieScope {
        secure: false,
        host: "a.test",
        issuer: "https://login.example.com",
        client_id: "client-1",
    };

    fn session(now: i64) -> SessionClaims {
        let mut claims = serde_json::Map::new();
        claims.insert(
            SESSION_ID_CLAIM.into(),
            serde_json::Value::String(random_token([7; 32])),
        );
        SessionClaims::start(
            "alice".into(),
            claims,
            now + 60,
            Some("rt".into()),
            now,
            MAX_SESSION_SECS,
        )
    }

    #[test]
    fn a_session_cookie_opens_only_for_its_host_and_unaltered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("store.redb")).unwrap());
        let sso = Sso::load_or_create(dir.path(), store).unwrap();
        let now = 1_700_000_000;
        let sealed = sso.seal_session(&A, &session(now)).unwrap();
        let cookie = format!("other=1; {SESSION_COOKIE}={sealed}");
        assert!(sso.session(&A, &cookie, now).is_some());
        // Bound to the host, the scheme and the provider's client.
        for other in [
            CookieScope {
                host: "b.test",
                ..A
            },
            CookieScope { secure: true, ..A },
            CookieScope {
                client_id: "client-2",
                ..A
            },
            CookieScope {
                issuer: "https://other.example.com",
                ..A
            },
        ] {
            let name = other.cookie_name(SESSION_COOKIE);
            let moved = format!("{name}={sealed}");
            assert!(sso.session(&other, &moved, now).is_none(), "{other:?}");
        }
        // A planted cookie of the same name first does not hide ours.
        let planted = format!("{SESSION_COOKIE}=garbage; {cookie}");
        assert!(sso.session(&A, &planted, now).is_some());
        let mut bytes = sealed.into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{SESSION_COOKIE}={}", String::from_utf8(bytes).unwrap());
        assert!(sso.session(&A, &tampered, now).is_none());
        // Refreshable after the ID token, over at the cap.
        let cookie = format!(
            "{SESSION_COOKIE}={}",
            sso.seal_session(&A, &session(now)).unwrap()
        );
        assert!(sso.session(&A, &cookie, now + 61).is_some());
        assert!(sso.session(&A, &cookie, now + MAX_SESSION_SECS).is_none());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn callbacks_from_one_address_get_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut callbacks = callback_limiter();
        let peer = ip("192.0.2.1");
        for i in 0..CALLBACK_BURST {
            assert_eq!(callbacks.attempt(peer, t0), Ok(()), "callback {i}");
        }
        assert_eq!(callbacks.attempt(peer, t0), Err(CALLBACK_INTERVAL));
        // Its IPv4-mapped form and other ports are the same peer; another
        // address is not held back.
        assert!(callbacks.attempt(ip("::ffff:192.0.2.1"), t0).is_err());
        assert_eq!(callbacks.attempt(ip("192.0.2.2"), t0), Ok(()));
        // One more after one interval, not before.
        let half = t0 + CALLBACK_INTERVAL / 2;
        assert_eq!(callbacks.attempt(peer, half), Err(Duration::from_secs(1)));
        let later = t0 + CALLBACK_INTERVAL;
        assert_eq!(callbacks.attempt(peer, later), Ok(()));
        assert!(callbacks.attempt(peer, later).is_err());
        // An IPv6 host counts by its /64.
        let v6 = ip("2001:db8:1:2::1");
        for _ in 0..CALLBACK_BURST {
            callbacks.attempt(v6, t0).unwrap();
        }
        assert!(callbacks.attempt(ip("2001:db8:1:2::ffff"), t0).is_err());
        assert_eq!(callbacks.attempt(ip("2001:db8:1:3::1"), t0), Ok(()));
    }

    #[test]
    fn callback_buckets_stay_bounded_however_many_addresses_send() {
        let t0 = Instant::now();
        let mut callbacks = callback_limiter();
        let held = ip("198.51.100.7");
        for _ in 0..CALLBACK_BURST {
            callbacks.attempt(held, t0).unwrap();
        }
        let mut n: u32 = 0;
        while (n as usize) < MAX_CALLBACK_SOURCES + 100 {
            let [_, b, c, d] = (0x0a00_0000 + n).to_be_bytes();
            let _ = callbacks.attempt(IpAddr::from([10, b, c, d]), t0);
            n += 1;
        }
        assert!(
            callbacks.len() <= MAX_CALLBACK_SOURCES,
            "{}",
            callbacks.len()
        );
        // The drained bucket outlived fuller ones: still limited.
        assert!(callbacks.attempt(held, t0).is_err());
    }

    #[test]
    fn logout_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("store.redb")).unwrap());
        let now = 1_700_000_000;
        let s = session(now);
        let cookie = {
            let sso = Sso::load_or_create(dir.path(), store.clone()).unwrap();
            let cookie = format!("{SESSION_COOKIE}={}", sso.seal_session(&A, &s).unwrap());
            assert!(sso.session(&A, &cookie, now).is_some());
            sso.end(&s, now);
            assert!(sso.session(&A, &cookie, now).is_none());
            cookie
        };
        // A restart: same key file, same store.
        let sso = Sso::load_or_create(dir.path(), store.clone()).unwrap();
        assert!(sso.session(&A, &cookie, now + 1).is_none());
        // The record leaves the store with its lease, when the session
        // would have ended anyway.
        let (kvs, _) = store.scan_kv(ENDED_PREFIX).unwrap();
        assert_eq!(kvs.len(), 1);
        assert!(kvs[0].lease.is_some(), "{kvs:?}");
    }
}
