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
//!
//! A new binding whose patterns admit more than they name is refused
//! unless it allows that ([`identity::check_breadth`]). A GitHub binding
//! made without its immutable ids pins those of the first token it accepts
//! ([`CiBindings::matching`]): a compare-and-set write of its record, an
//! audit line per id, and the in-memory set updated; from then on a token
//! with the same names and other ids is refused as drift.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use identity::bindings::{issuer_literal_address, Binding, BindingSet, IdPin};
use identity::{AddressPolicy, BroadPattern, Explanation, IdDrift, MatchRefusal, Refused};

use crate::outbound::AllowedBy;

use crate::audit::{Actor, Event, Text};
use crate::observe::Observe;
use crate::shutdown::Tasks;
use crate::store::{
    Condition, EventKind, Op, Outcome, Revision, Store, StoreError, Txn, WatchBatch,
};

const PREFIX: &str = "binding/";

/// Compare-and-set attempts of one pin before giving up (each lost race
/// re-reads the record; two first logins of one binding race at most).
const PIN_ATTEMPTS: usize = 3;

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
    /// A new binding admits more than it names and does not allow that.
    #[error(transparent)]
    Broad(#[from] BroadPattern),
    /// A pin lost its compare-and-set [`PIN_ATTEMPTS`] times.
    #[error("binding {0} changed while its ids were pinned; retry")]
    PinContended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why no binding could be matched.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    /// A verified token that no binding of the app matches.
    #[error(transparent)]
    NoMatch(#[from] identity::NoMatch),
    /// A binding matches the token's names but pinned other ids.
    #[error(transparent)]
    Drift(#[from] IdDrift),
    /// The binding index is unavailable (a poisoned lock), or the ids the
    /// token taught could not be recorded (logged).
    #[error("the CI binding index is unavailable")]
    Unavailable,
}

impl From<MatchRefusal> for MatchError {
    fn from(r: MatchRefusal) -> Self {
        match r {
            MatchRefusal::NoMatch(m) => MatchError::NoMatch(m),
            MatchRefusal::Drift(d) => MatchError::Drift(d),
        }
    }
}

/// Why ids could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The binding pinned other ids meanwhile.
    #[error(transparent)]
    Drift(#[from] IdDrift),
    /// The record could not be read or written.
    #[error(transparent)]
    Ci(#[from] CiError),
}

/// The bindings of the cluster, in memory and kept in step with the store
/// by a watch ([`crate::watched`]): a binding added, pinned or removed
/// through any coordinator is seen by every one (a removal is a revocation).
/// Each id keeps the revision it was last seen at, so that a late event
/// never brings back a binding removed here.
pub struct CiBindings {
    store: Arc<dyn Store>,
    set: RwLock<BindingSet>,
    /// Lock order: `set`, then `seen`.
    seen: Mutex<HashMap<String, Revision>>,
    /// The revision the set was loaded at (where `follow` starts).
    loaded_at: Revision,
    outbound: AddressPolicy,
    observe: Arc<Observe>,
}

impl CiBindings {
    /// Loads every stored binding; `outbound` judges the issuers of new ones
    /// (stored ones are judged at every fetch).
    pub fn load(store: Arc<dyn Store>, outbound: AddressPolicy) -> Result<Self, CiError> {
        let (kvs, loaded_at) = store.scan_kv(PREFIX)?;
        let mut bindings = Vec::new();
        let mut seen = HashMap::new();
        for kv in kvs {
            let b: Binding = crate::store::decode(&kv.key, &kv.value)?;
            seen.insert(b.id.clone(), kv.mod_revision);
            bindings.push(b);
        }
        let set = BindingSet::from_bindings(bindings)?;
        Ok(CiBindings {
            store,
            set: RwLock::new(set),
            seen: Mutex::new(seen),
            loaded_at,
            outbound,
            observe: Arc::new(Observe::disabled()),
        })
    }

    /// Keeps the set in step with the store until shutdown.
    pub fn follow(self: &Arc<Self>, tasks: &Tasks) {
        crate::watched::follow(self.clone(), self.store.clone(), self.loaded_at, tasks);
    }

    /// Records that `id` changed at `revision`; false when something newer
    /// is already known (the change is then not to be applied).
    fn note(&self, id: &str, revision: Revision) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(id) {
            Some(r) if *r >= revision => false,
            _ => {
                seen.insert(id.to_string(), revision);
                true
            }
        }
    }

    /// Audits the ids bindings pin in `observe`.
    pub fn observed(mut self, observe: Arc<Observe>) -> Self {
        self.observe = observe;
        self
    }

    /// Validates and stores a binding made at `now` (unix seconds); returns
    /// its new id. Patterns that admit more than they name are refused
    /// unless the binding allows them.
    pub fn add(&self, mut binding: Binding, now: i64) -> Result<String, CiError> {
        binding.id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        binding.created_unix = now;
        binding.validate()?;
        identity::check_breadth(&binding)?;
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
        let committed = self.store.txn(Txn {
            conditions: vec![Condition::Absent(key.clone())],
            ops: vec![Op::Put(key, bytes)],
        })?;
        if committed.outcome != Outcome::Applied {
            return Err(CiError::IdCollision);
        }
        let id = binding.id.clone();
        self.note(&id, committed.revision);
        set.insert(binding).map_err(|(_, e)| CiError::Binding(e))?;
        Ok(id)
    }

    /// Bindings of one app, by id.
    /// Whether binding `id` still exists: what a session a CI token bought
    /// is checked against before each change it makes.
    pub fn exists(&self, id: &str) -> bool {
        self.set.read().is_ok_and(|s| s.get(id).is_some())
    }

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
        let committed = self.store.txn(Txn {
            conditions: vec![],
            ops: vec![Op::Delete(format!("binding/{id}"))],
        })?;
        self.note(id, committed.revision);
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
        let committed = self.store.txn(txn)?;
        if committed.outcome == Outcome::Applied {
            for id in &ids {
                self.note(id, committed.revision);
                set.remove(id);
            }
        }
        Ok(committed.outcome)
    }

    /// Whether some binding names `issuer` (only those are ever fetched).
    pub fn names_issuer(&self, issuer: &str) -> bool {
        self.set
            .read()
            .map(|s| s.names_issuer(issuer))
            .unwrap_or(false)
    }

    /// The binding of `app` that verified `claims` match at `now`, or the
    /// mismatch naming issuer, subject and repository, or the drift naming
    /// the id. Ids the token teaches a GitHub binding are pinned before the
    /// binding is returned ([`CiBindings::pin`]); when that fails the login
    /// is refused, so no token is accepted by a binding that did not record
    /// who it accepted.
    pub fn matching(
        &self,
        app: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
        now: i64,
    ) -> Result<Binding, MatchError> {
        let (binding, learn) = {
            let set = self.set.read().map_err(|_| {
                tracing::error!("the CI binding index is unavailable (lock poisoned)");
                MatchError::Unavailable
            })?;
            let found = set.matching(app, claims, now)?;
            (found.binding.clone(), found.learn)
        };
        if learn.is_empty() {
            return Ok(binding);
        }
        match self.pin(&binding.id, &learn) {
            Ok(pinned) => Ok(pinned),
            Err(PinError::Drift(d)) => Err(MatchError::Drift(d)),
            Err(PinError::Ci(e)) => {
                tracing::error!(binding = %binding.id, "CI binding ids not recorded: {e}");
                Err(MatchError::Unavailable)
            }
        }
    }

    /// Pins `learned` on binding `id`: a compare-and-set write of its
    /// record (re-read when another write won), the in-memory set updated,
    /// an audit line per id. A binding that already pinned the same ids is
    /// returned unchanged; other ids are drift.
    pub fn pin(&self, id: &str, learned: &[IdPin]) -> Result<Binding, PinError> {
        let key = format!("binding/{id}");
        for _ in 0..PIN_ATTEMPTS {
            let Some(kv) = self.store.get_kv(&key).map_err(CiError::Store)? else {
                return Err(CiError::NotFound(id.to_string()).into());
            };
            let stored: Binding = crate::store::decode(&key, &kv.value).map_err(CiError::Store)?;
            let pinned = stored.pinned(learned)?;
            let mut set = self.set.write().map_err(|_| CiError::Unavailable)?;
            if pinned == stored {
                if self.note(id, kv.mod_revision) {
                    set.insert(pinned.clone())
                        .map_err(|(_, e)| CiError::Binding(e))?;
                }
                return Ok(pinned);
            }
            let bytes = serde_json::to_vec(&pinned).map_err(CiError::Encode)?;
            let committed = self
                .store
                .txn(Txn {
                    conditions: vec![Condition::ModRevision(key.clone(), kv.mod_revision)],
                    ops: vec![Op::Put(key.clone(), bytes)],
                })
                .map_err(CiError::Store)?;
            if committed.outcome != Outcome::Applied {
                continue;
            }
            if self.note(id, committed.revision) {
                set.insert(pinned.clone())
                    .map_err(|(_, e)| CiError::Binding(e))?;
            }
            drop(set);
            for pin in pinned
                .ids
                .iter()
                .filter(|p| stored.id_pin(&p.claim).is_none())
            {
                self.observe.changed(
                    &Actor::Ci(id.to_string()),
                    Event::BindingPinned {
                        binding: Text::new(id),
                        app: Text::new(&pinned.app),
                        claim: Text::new(&pin.claim),
                        value: Text::new(&pin.value),
                    },
                );
            }
            return Ok(pinned);
        }
        Err(CiError::PinContended(id.to_string()).into())
    }

    /// Every binding of `app` against a token's claims, claim by claim.
    pub fn explain(
        &self,
        app: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<Explanation>, CiError> {
        let set = self.set.read().map_err(|_| CiError::Unavailable)?;
        Ok(set.explain(app, claims))
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

impl crate::watched::Watched for CiBindings {
    const NAME: &'static str = "CI binding index";

    fn prefix(&self) -> &str {
        PREFIX
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let (kvs, read_at) = store.scan_kv(PREFIX)?;
        // A record that does not load is left out (and said), never kept
        // from before.
        let mut fresh = BindingSet::new();
        let mut seen = HashMap::new();
        for kv in kvs {
            match crate::store::decode::<Binding>(&kv.key, &kv.value) {
                Ok(b) => {
                    seen.insert(b.id.clone(), kv.mod_revision);
                    if let Err((id, err)) = fresh.insert(b) {
                        tracing::error!("CI binding index: binding {id}: {err}");
                    }
                }
                Err(e) => tracing::error!("CI binding index: {e}"),
            }
        }
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        *set = fresh;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        Ok(read_at)
    }

    fn apply(&self, batch: &WatchBatch) {
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        for e in &batch.events {
            let Some(id) = e.kv.key.strip_prefix(PREFIX) else {
                continue;
            };
            if !self.note(id, batch.revision) {
                continue;
            }
            match e.kind {
                EventKind::Put => match crate::store::decode::<Binding>(&e.kv.key, &e.kv.value) {
                    Ok(b) => {
                        if let Err((id, err)) = set.insert(b) {
                            tracing::error!("CI binding index: binding {id}: {err}");
                        }
                    }
                    Err(err) => {
                        // Unreadable: it must not keep matching as it was.
                        set.remove(id);
                        tracing::error!("CI binding index: {err}");
                    }
                },
                EventKind::Delete => {
                    set.remove(id);
                }
            }
        }
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
        let id = ci.add(b, 0).unwrap();
        assert_eq!(ci.for_app("web").len(), 1);
        let local = Binding::generic(
            "x",
            "web",
            "https://127.0.0.1:9999",
            "repo:acme/web:*",
            vec![],
            "",
        )
        .unwrap();
        let refused = ci.add(local.clone(), 0).unwrap_err();
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
        let lan = Binding::generic(
            "x",
            "web",
            "https://10.1.2.3",
            "repo:acme/web:*",
            vec![],
            "",
        )
        .unwrap();
        let loopback_only =
            CiBindings::load(store.clone(), AddressPolicy::new(true, vec![])).unwrap();
        let refused = loopback_only.add(lan.clone(), 0).unwrap_err();
        assert!(
            refused.to_string().contains("--outbound-allow 10.1.2.3"),
            "{refused}"
        );
        let listed = CiBindings::load(
            store.clone(),
            AddressPolicy::new(false, vec!["10.1.0.0/16".parse().unwrap()]),
        )
        .unwrap();
        let lan_id = listed.add(lan, 0).unwrap();
        listed.remove(&lan_id).unwrap();
        let again = CiBindings::load(store.clone(), AddressPolicy::new(true, vec![])).unwrap();
        assert_eq!(again.for_app("web")[0].id, id);
        assert!(again.add(local, 0).is_ok());
        assert_eq!(again.remove(&id).unwrap().id, id);
        assert!(matches!(again.remove(&id), Err(CiError::NotFound(_))));
        assert_eq!(
            CiBindings::load(store, AddressPolicy::new(true, vec![]))
                .unwrap()
                .len(),
            1
        );
    }

    fn github_token(repository_id: &str) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::json!({
            "iss": identity::bindings::GITHUB_ISSUER,
            "sub": "repo:acme/web:ref:refs/heads/main",
            "repository": "acme/web",
            "repository_id": repository_id,
            "repository_owner_id": "7",
            "event_name": "push",
            "ref": "refs/heads/main",
        }) {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_first_login_pins_the_ids_in_the_store_and_drift_is_refused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let ci = CiBindings::load(store.clone(), AddressPolicy::default()).unwrap();
        let b = Binding::github("x", "web", "acme/web", None, None, None, "").unwrap();
        let id = ci.add(b, 1_000).unwrap();
        assert_eq!(ci.for_app("web")[0].created_unix, 1_000);
        let first = ci.matching("web", &github_token("100"), 2_000).unwrap();
        assert_eq!(first.ids.len(), 2);
        assert_eq!(first.id_pin("repository_id").unwrap().value, "100");
        assert_eq!(
            first.id_pin("repository_id").unwrap().learned_unix,
            Some(2_000)
        );
        // A second login changes nothing.
        let rev = store.revision().unwrap();
        assert_eq!(
            ci.matching("web", &github_token("100"), 3_000).unwrap(),
            first
        );
        assert_eq!(store.revision().unwrap(), rev);
        // The pin survives a restart, and the recreated repository is refused.
        let again = CiBindings::load(store.clone(), AddressPolicy::default()).unwrap();
        assert_eq!(again.for_app("web")[0], first);
        let err = again
            .matching("web", &github_token("555"), 4_000)
            .unwrap_err();
        assert!(
            matches!(&err, MatchError::Drift(d) if d.binding == id && d.pinned == "100"),
            "{err:?}"
        );
        // Pinning other ids directly (a racing first login) is drift too.
        let racing = IdPin {
            claim: "repository_id".into(),
            value: "555".into(),
            learned_unix: Some(0),
        };
        assert!(matches!(again.pin(&id, &[racing]), Err(PinError::Drift(_))));
        // A pin for a removed binding is refused.
        again.remove(&id).unwrap();
        assert!(matches!(
            again.pin(&id, &[]),
            Err(PinError::Ci(CiError::NotFound(_)))
        ));
    }

    #[test]
    fn broad_bindings_are_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let ci = CiBindings::load(store.clone(), AddressPolicy::default()).unwrap();
        let mut broad =
            Binding::generic("x", "web", "https://ci.example", "repo:acme/*", vec![], "").unwrap();
        assert!(matches!(ci.add(broad.clone(), 0), Err(CiError::Broad(_))));
        assert!(ci.is_empty());
        assert_eq!(store.count("binding/").unwrap(), 0);
        broad.allow_broad = true;
        ci.add(broad, 0).unwrap();
        assert!(ci.for_app("web")[0].allow_broad);
    }
}
