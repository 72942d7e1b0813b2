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
//! accepted once. Used states, ended sessions and the latest refresh of
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
use std::path::Path;
use std::sync::{Arc, Mutex};

use identity::UsedStates;

pub use cookie::{
    is_our_cookie, CookieScope, LOGIN_COOKIE, MAX_COOKIE_VALUE_BYTES, SESSION_COOKIE,
};
pub use flow::{
    Gate, GateRequest, CALLBACK_PATH, LOGIN_SECS, LOGOUT_PATH, MAX_SESSION_SECS, SESSION_ID_CLAIM,
};
pub use provider::ProviderMeta;

use crate::shutdown::Tasks;
use crate::store::{Revision, Store};
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
