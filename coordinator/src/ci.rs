//! CI bindings: which OIDC tokens (issuer, subject, claims) may act on
//! which app.
//!
//! Records live in the store (`binding/<id>`); the compiled
//! [`identity::BindingSet`] kept in memory answers "which issuers do we
//! trust" and "does this token match a binding of this app" without a store
//! read. An issuer whose host is an IP literal (or `localhost`) the
//! outbound policy refuses is refused here already, with the flag that
//! would allow it (`--oidc-allow-loopback-issuers` for loopback, for tests;
//! `--outbound-allow CIDR` for the rest); names are judged when they are
//! resolved, at every fetch (`crate::outbound`).

use std::sync::{Arc, RwLock};

use identity::bindings::{issuer_literal_address, Binding, BindingSet};
use identity::{AddressPolicy, Refused};

use crate::outbound::AllowedBy;

use crate::store::{Condition, Op, Outcome, Store, StoreError, Txn};

/// Binding failures, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CiError {
    /// A stored binding does not compile.
    #[error(transparent)]
    Stored(#[from] identity::bindings::BindingSetError),
    /// A new binding breaks a binding rule.
    #[error(transparent)]
    Binding(#[from] identity::bindings::BindingError),
    /// A new binding names no valid app.
    #[error(transparent)]
    AppName(#[from] identity::NameError),
    /// A binding could not be encoded for the store.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// The in-memory binding index is unavailable (a poisoned lock).
    #[error("binding index unavailable")]
    Unavailable,
    /// The fresh binding id is taken.
    #[error("binding id collision; try again")]
    IdCollision,
    #[error(
        "issuer {issuer} is on a {} address ({}); such issuers are refused unless the server runs with {}",
        .refused.class, .refused.ip, AllowedBy(*.refused)
    )]
    PrivateIssuer { issuer: String, refused: Refused },
    #[error("no CI authentication binding {0} (see `miren auth ci list -a APP`)")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why no binding could be matched.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    /// A verified token that no binding of the app matches.
    #[error(transparent)]
    NoMatch(#[from] identity::NoMatch),
    /// The binding index is unavailable (a poisoned lock, logged).
    #[error("the CI binding index is unavailable")]
    Unavailable,
}

/// The bindings of the cluster.
pub struct CiBindings {
    store: Arc<dyn Store>,
    set: RwLock<BindingSet>,
    outbound: AddressPolicy,
}

impl CiBindings {
    /// Loads every stored binding; `outbound` judges the issuers of new ones
    /// (stored ones are judged at every fetch).
    pub fn load(store: Arc<dyn Store>, outbound: AddressPolicy) -> Result<Self, CiError> {
        let mut bindings = Vec::new();
        for (k, v) in store.scan("binding/")? {
            let b: Binding = crate::store::decode(&k, &v)?;
            bindings.push(b);
        }
        let set = BindingSet::from_bindings(bindings)?;
        Ok(CiBindings {
            store,
            set: RwLock::new(set),
            outbound,
        })
    }

    /// Validates and stores a binding; returns its new id.
    pub fn add(&self, mut binding: Binding) -> Result<String, CiError> {
        binding.id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        binding.validate()?;
        let issuer = binding.issuer_url()?;
        if let Some(ip) = issuer_literal_address(&issuer) {
            self.outbound
                .check(ip)
                .map_err(|refused| CiError::PrivateIssuer {
                    issuer: binding.issuer.clone(),
                    refused,
                })?;
        }
        identity::check_app_name(&binding.app)?;
        let key = format!("binding/{}", binding.id);
        let bytes = serde_json::to_vec(&binding).map_err(CiError::Encode)?;
        let mut set = self.set.write().map_err(|_| CiError::Unavailable)?;
        if self.store.commit(Txn {
            conditions: vec![Condition::Absent(key.clone())],
            ops: vec![Op::Put(key, bytes)],
        })? != Outcome::Applied
        {
            return Err(CiError::IdCollision);
        }
        let id = binding.id.clone();
        set.insert(binding).map_err(|(_, e)| CiError::Binding(e))?;
        Ok(id)
    }

    /// Bindings of one app, by id.
    pub fn for_app(&self, app: &str) -> Vec<Binding> {
        self.set
            .read()
            .map(|s| s.for_app(app).into_iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Removes a binding.
    pub fn remove(&self, id: &str) -> Result<Binding, CiError> {
        let mut set = self.set.write().map_err(|_| CiError::Unavailable)?;
        let existing = set
            .get(id)
            .cloned()
            .ok_or_else(|| CiError::NotFound(id.to_string()))?;
        self.store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::Delete(format!("binding/{id}"))],
        })?;
        set.remove(id);
        Ok(existing)
    }

    /// Commits `txn` with the deletion of every binding of `app` added to
    /// it, and forgets those bindings when it applied: `app delete` takes
    /// the app's right to deploy with it, in the same write.
    pub fn commit_removing_app(&self, app: &str, mut txn: Txn) -> Result<Outcome, CiError> {
        let mut set = self.set.write().map_err(|_| CiError::Unavailable)?;
        let ids: Vec<String> = set.for_app(app).into_iter().map(|b| b.id.clone()).collect();
        txn.ops
            .extend(ids.iter().map(|id| Op::Delete(format!("binding/{id}"))));
        let outcome = self.store.commit(txn)?;
        if outcome == Outcome::Applied {
            for id in &ids {
                set.remove(id);
            }
        }
        Ok(outcome)
    }

    /// Whether some binding names `issuer` (only those are ever fetched).
    pub fn names_issuer(&self, issuer: &str) -> bool {
        self.set
            .read()
            .map(|s| s.names_issuer(issuer))
            .unwrap_or(false)
    }

    /// The binding of `app` that verified `claims` match, or the mismatch
    /// naming issuer, subject and repository.
    pub fn matching(
        &self,
        app: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Binding, MatchError> {
        let set = self.set.read().map_err(|_| {
            tracing::error!("the CI binding index is unavailable (lock poisoned)");
            MatchError::Unavailable
        })?;
        Ok(set.matching(app, claims)?.clone())
    }

    /// How many bindings exist.
    pub fn len(&self) -> usize {
        self.set.read().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;
    use identity::AddressClass;

    #[test]
    fn bindings_survive_reload_and_private_issuers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let ci = CiBindings::load(store.clone(), AddressPolicy::default()).unwrap();
        let b = Binding::github("x", "web", "acme/web", None, None, None, "").unwrap();
        let id = ci.add(b).unwrap();
        assert_eq!(ci.for_app("web").len(), 1);
        let local = Binding::generic(
            "x",
            "web",
            "https://127.0.0.1:9999",
            "repo:acme/*",
            vec![],
            "",
        )
        .unwrap();
        let refused = ci.add(local.clone()).unwrap_err();
        assert!(
            matches!(&refused, CiError::PrivateIssuer { refused, .. }
                if refused.class == AddressClass::Loopback),
            "{refused:?}"
        );
        assert!(refused
            .to_string()
            .contains("--oidc-allow-loopback-issuers"));
        // The loopback flag does not open the private network or the
        // metadata endpoint; the allow-list does.
        let lan =
            Binding::generic("x", "web", "https://10.1.2.3", "repo:acme/*", vec![], "").unwrap();
        let loopback_only =
            CiBindings::load(store.clone(), AddressPolicy::new(true, vec![])).unwrap();
        let refused = loopback_only.add(lan.clone()).unwrap_err();
        assert!(
            refused.to_string().contains("--outbound-allow 10.1.2.3"),
            "{refused}"
        );
        let listed = CiBindings::load(
            store.clone(),
            AddressPolicy::new(false, vec!["10.1.0.0/16".parse().unwrap()]),
        )
        .unwrap();
        let lan_id = listed.add(lan).unwrap();
        listed.remove(&lan_id).unwrap();
        let again = CiBindings::load(store.clone(), AddressPolicy::new(true, vec![])).unwrap();
        assert_eq!(again.for_app("web")[0].id, id);
        assert!(again.add(local).is_ok());
        assert_eq!(again.remove(&id).unwrap().id, id);
        assert!(matches!(again.remove(&id), Err(CiError::NotFound(_))));
        assert_eq!(
            CiBindings::load(store, AddressPolicy::new(true, vec![]))
                .unwrap()
                .len(),
            1
        );
    }
}
