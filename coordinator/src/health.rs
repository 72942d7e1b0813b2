//! Is this coordinator ready to serve? `/readyz` on the HTTPS listener and
//! on the metrics listener answers from [`checks`]: the store answers a
//! read, a signing key is active (tokens can be minted), and the listeners
//! accept. `/healthz` only says the process serves HTTP.
//!
//! The rule is pure ([`coordinator_checks`]) and unit-tested with a store
//! that fails and a key ring without an active key; the integration tests
//! see the runner's `/readyz` follow its coordinator.

use std::sync::{Arc, Weak};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use transport::ops::{Check, Readiness};

use crate::issuer::Issuer;
use crate::observe::Observe;
use crate::store::Store;

/// Why a readiness probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The store did not answer a read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A thread panicked holding the key ring's lock.
    #[error("{}", crate::issuer::KEYS_UNAVAILABLE)]
    KeysUnavailable,
    /// No key can sign now.
    #[error(transparent)]
    Keys(#[from] crate::keyring::KeyRingError),
}

/// The readiness checks from what they observe.
pub fn coordinator_checks(
    store: Result<(), ProbeError>,
    active_key: Result<(), ProbeError>,
    listening: bool,
) -> Vec<Check> {
    vec![
        Check::from_result("store", store),
        Check::from_result("signing key", active_key),
        if listening {
            Check::ok("listeners")
        } else {
            Check::failed("listeners", "not accepting connections")
        },
    ]
}

/// A read the store must answer (any key; absence is an answer).
pub fn probe_store(store: &dyn Store) -> Result<(), ProbeError> {
    store.get("health/probe")?;
    Ok(())
}

/// Whether a key can sign now.
pub fn probe_keys(
    keys: &std::sync::RwLock<crate::keyring::KeyRing>,
    now: i64,
) -> Result<(), ProbeError> {
    keys.read()
        .map_err(|_| ProbeError::KeysUnavailable)?
        .active(now)?;
    Ok(())
}

/// What readiness looks at: the store, the issuer's keys, whether the
/// listeners accept.
pub struct Probes {
    pub store: Arc<dyn Store>,
    pub issuer: Arc<Issuer>,
    pub observe: Arc<Observe>,
}

/// The checks of a running coordinator.
pub fn checks(p: &Probes) -> Vec<Check> {
    coordinator_checks(
        probe_store(p.store.as_ref()),
        probe_keys(&p.issuer.keys, transport::clock::now_unix()),
        p.observe.listening(),
    )
}

/// Readiness of a coordinator while its parts live (a [`Readiness`] for
/// `transport::ops`).
pub fn readiness(probes: &Arc<Probes>) -> Readiness {
    let weak: Weak<Probes> = Arc::downgrade(probes);
    Arc::new(move || match weak.upgrade() {
        Some(p) => checks(&p),
        None => vec![Check::failed("coordinator", "stopped")],
    })
}

/// Which of our issuer documents a path asks for.
fn issuer_document(path: &str) -> Option<&'static str> {
    if path.ends_with(identity::documents::DISCOVERY_PATH) {
        Some("discovery")
    } else if path.ends_with(identity::documents::JWKS_PATH) {
        Some("jwks")
    } else {
        None
    }
}

async fn count_documents(
    axum::extract::State(observe): axum::extract::State<Arc<Observe>>,
    req: Request,
    next: Next,
) -> Response {
    let doc = issuer_document(req.uri().path());
    let resp = next.run(req).await;
    if let Some(doc) = doc {
        observe.issuer_served(doc, resp.status().as_u16());
    }
    resp
}

/// The HTTPS router with `/healthz`, `/readyz` and counting of discovery
/// and JWKS requests.
pub fn with_health(router: Router, probes: &Arc<Probes>) -> Router {
    router
        .merge(transport::ops::health_router(vec![readiness(probes)]))
        .layer(axum::middleware::from_fn_with_state(
            probes.observe.clone(),
            count_documents,
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        Committed, KeyValue, LeaseId, RangePage, Revision, StoreError, Txn, WatchStream,
    };

    /// A store whose disk is gone: every call fails.
    struct Broken;
    fn gone<T>() -> Result<T, StoreError> {
        Err(StoreError::Backend(redb::Error::Corrupted(
            "disk gone".into(),
        )))
    }
    impl Store for Broken {
        fn get_kv(&self, _: &str) -> Result<Option<KeyValue>, StoreError> {
            gone()
        }
        fn range(&self, _: &str, _: Option<&str>, _: usize) -> Result<RangePage, StoreError> {
            gone()
        }
        fn txn(&self, _: Txn) -> Result<Committed, StoreError> {
            gone()
        }
        fn revision(&self) -> Result<Revision, StoreError> {
            gone()
        }
        fn watch(&self, _: &str, _: Revision) -> Result<WatchStream, StoreError> {
            gone()
        }
        fn grant_lease(&self, _: std::time::Duration) -> Result<LeaseId, StoreError> {
            gone()
        }
        fn keep_alive(&self, _: LeaseId) -> Result<(), StoreError> {
            gone()
        }
        fn revoke_lease(&self, _: LeaseId) -> Result<(), StoreError> {
            gone()
        }
    }

    #[test]
    fn ready_needs_store_key_and_listeners() {
        let ok = coordinator_checks(Ok(()), Ok(()), true);
        assert_eq!(transport::ops::verdict(&ok).0, 200);

        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap();
        assert!(probe_store(&store).is_ok());
        let broken = coordinator_checks(probe_store(&Broken), Ok(()), true);
        let (status, body) = transport::ops::verdict(&broken);
        assert_eq!(status, 503);
        assert!(
            body["reason"].as_str().unwrap().starts_with("store:"),
            "{body}"
        );

        // A clock stepped back before the only key's activation still
        // leaves a signing key (the clock-back rule), so still ready.
        let keys = dir.path().join("keys");
        crate::keyring::KeyRing::init(&keys, 1_000_000).unwrap();
        let ring = std::sync::RwLock::new(crate::keyring::KeyRing::load(&keys, 1_000_000).unwrap());
        assert!(probe_keys(&ring, 1_000_000).is_ok());
        assert!(probe_keys(&ring, 10).is_ok());
        // A key ring that cannot sign is not ready.
        let (status, body) = transport::ops::verdict(&coordinator_checks(
            Ok(()),
            Err(crate::keyring::KeyRingError::NoActiveKey.into()),
            true,
        ));
        assert_eq!(status, 503);
        assert!(
            body["reason"].as_str().unwrap().starts_with("signing key:"),
            "{body}"
        );

        let (status, body) = transport::ops::verdict(&coordinator_checks(Ok(()), Ok(()), false));
        assert_eq!(status, 503);
        assert_eq!(body["failing"], serde_json::json!(["listeners"]));
    }

    #[test]
    fn issuer_documents_by_path() {
        assert_eq!(
            issuer_document("/.well-known/openid-configuration"),
            Some("discovery")
        );
        assert_eq!(issuer_document("/p/.well-known/miren/jwks"), Some("jwks"));
        assert_eq!(issuer_document("/healthz"), None);
    }
}
