//! Deploy keys in the store (`deploykey/<id>`): client credentials that
//! let a CI system without OIDC deploy one app through the token endpoint.
//!
//! The rules (format, hashing, expiry, rotation overlap, revocation) are
//! `identity::deploy_key`; this module keeps the records. Every grant
//! reads its key from the store, so a revocation holds at once on every
//! coordinator sharing it; the last use is written at most once a minute
//! per key. Like a CI binding, a key may name an app not deployed yet (its
//! first deploy creates it); `app delete` removes the app's keys in its
//! one transaction ([`removal_ops`]).

use std::sync::Arc;

use identity::deploy_key::{self, DeployKey, DeployKeyRecord, KeyPolicyError, KeyRefusal};
use identity::ClusterAddress;

use crate::store::{Condition, Op, Outcome, Store, StoreError, Txn};

const PREFIX: &str = "deploykey/";
/// Tries of a write that lost a compare-and-set to a concurrent one.
const WRITE_ATTEMPTS: usize = 5;

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// Why a key operation failed, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DeployKeyError {
    #[error(transparent)]
    Policy(#[from] KeyPolicyError),
    #[error(transparent)]
    AppName(#[from] identity::NameError),
    #[error("no deploy key {0} (see `miren auth key list -a APP`)")]
    NotFound(String),
    #[error("deploy key {0} kept changing; try again")]
    Contended(String),
    /// A rotation lost to a change of the key made meanwhile (another
    /// admin's rotation or revocation): it was not applied, since applying
    /// it over the other would silently void the secret that one printed.
    #[error("deploy key {0} was changed meanwhile by another admin (a rotation or revocation won); nothing was changed by this command: check `miren auth key list` and rotate again if still needed")]
    ChangedMeanwhile(String),
    #[error("the cluster address has no CA fingerprint to pin in the key")]
    Unpinned,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The deploy keys of the cluster.
pub struct DeployKeys {
    store: Arc<dyn Store>,
}

/// A key just made: its record and the string printed once.
pub struct CreatedKey {
    pub record: DeployKeyRecord,
    pub key: DeployKey,
}

fn fresh_secret() -> [u8; 32] {
    rand::random()
}

fn fresh_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

impl DeployKeys {
    pub fn new(store: Arc<dyn Store>) -> DeployKeys {
        DeployKeys { store }
    }

    fn read(&self, id: &str) -> Result<Option<(DeployKeyRecord, u64)>, StoreError> {
        if !deploy_key::valid_id(id) {
            return Ok(None);
        }
        let Some(kv) = self.store.get_kv(&key(id))? else {
            return Ok(None);
        };
        let record = crate::store::decode(&kv.key, &kv.value)?;
        Ok(Some((record, kv.mod_revision)))
    }

    /// A new key for `app`, living `ttl_secs` (checked) from `now`.
    pub fn create(
        &self,
        address: &ClusterAddress,
        app: &str,
        description: &str,
        ttl_secs: Option<u64>,
        now: i64,
    ) -> Result<CreatedKey, DeployKeyError> {
        identity::check_app_name(app)?;
        deploy_key::check_description(description)?;
        let ttl = deploy_key::check_ttl(ttl_secs)?;
        for _ in 0..WRITE_ATTEMPTS {
            let key_text = DeployKey::new(address.clone(), fresh_id(), fresh_secret())
                .ok_or(DeployKeyError::Unpinned)?;
            let record = DeployKeyRecord::new(
                key_text.id.clone(),
                app.to_string(),
                description.to_string(),
                &key_text.secret,
                ttl,
                now,
            );
            let outcome = self.store.commit(Txn {
                conditions: vec![Condition::Absent(key(&record.id))],
                ops: vec![Op::Put(key(&record.id), crate::store::encode(&record))],
            })?;
            if outcome == Outcome::Applied {
                return Ok(CreatedKey {
                    record,
                    key: key_text,
                });
            }
        }
        Err(DeployKeyError::Contended(app.to_string()))
    }

    /// The keys of `app` (every app when empty), oldest first.
    /// Whether key `id` is still usable at `now` (exists, not revoked,
    /// not expired): what a session logged in with it is checked against
    /// before each change it makes.
    pub fn is_usable(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        Ok(self
            .read(id)?
            .is_some_and(|(r, _)| r.state(now) == identity::deploy_key::KeyState::Active))
    }

    pub fn list(&self, app: &str) -> Result<Vec<DeployKeyRecord>, StoreError> {
        DeployKeys::list_in(&*self.store, app)
    }

    fn list_in(store: &dyn Store, app: &str) -> Result<Vec<DeployKeyRecord>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in store.scan(PREFIX)? {
            let r: DeployKeyRecord = crate::store::decode(&k, &v)?;
            if app.is_empty() || r.app == app {
                out.push(r);
            }
        }
        out.sort_by_key(|r| (r.created_at, r.id.clone()));
        Ok(out)
    }

    /// Read-modify-write of key `id` with compare-and-set, tried again on
    /// the newer record when another change won (for changes whose intent
    /// holds whatever came first, like a revocation).
    fn update<T>(
        &self,
        id: &str,
        change: impl Fn(&DeployKeyRecord) -> Result<(DeployKeyRecord, T), DeployKeyError>,
    ) -> Result<T, DeployKeyError> {
        self.update_within(id, WRITE_ATTEMPTS, change)
            .map_err(|e| match e {
                DeployKeyError::ChangedMeanwhile(id) => DeployKeyError::Contended(id),
                other => other,
            })
    }

    /// [`DeployKeys::update`] with at most `attempts` tries; the last lost
    /// one is [`DeployKeyError::ChangedMeanwhile`].
    fn update_within<T>(
        &self,
        id: &str,
        attempts: usize,
        mut change: impl FnMut(&DeployKeyRecord) -> Result<(DeployKeyRecord, T), DeployKeyError>,
    ) -> Result<T, DeployKeyError> {
        for _ in 0..attempts {
            let (record, rev) = self
                .read(id)?
                .ok_or_else(|| DeployKeyError::NotFound(id.to_string()))?;
            let (next, out) = change(&record)?;
            let outcome = self.store.commit(Txn {
                conditions: vec![Condition::ModRevision(key(id), rev)],
                ops: vec![Op::Put(key(id), crate::store::encode(&next))],
            })?;
            if outcome == Outcome::Applied {
                return Ok(out);
            }
        }
        Err(DeployKeyError::ChangedMeanwhile(id.to_string()))
    }

    /// A new secret for key `id`; the old one works `overlap_secs` more.
    /// Returns the record and the new printed key. One compare-and-set on
    /// the record read: when another rotation (through any coordinator)
    /// won meanwhile, this one is refused rather than retried, or the
    /// secret the other printed would stop working unannounced.
    pub fn rotate(
        &self,
        address: &ClusterAddress,
        id: &str,
        overlap_secs: Option<u64>,
        now: i64,
    ) -> Result<CreatedKey, DeployKeyError> {
        let overlap = deploy_key::check_overlap(overlap_secs)?;
        self.update_within(id, 1, |record| {
            let key_text = DeployKey::new(address.clone(), id.to_string(), fresh_secret())
                .ok_or(DeployKeyError::Unpinned)?;
            let next = record.rotated(&key_text.secret, overlap, now)?;
            Ok((
                next.clone(),
                CreatedKey {
                    record: next,
                    key: key_text,
                },
            ))
        })
    }

    /// Revokes key `id` at `now`: refused from the next request on.
    pub fn revoke(&self, id: &str, now: i64) -> Result<DeployKeyRecord, DeployKeyError> {
        self.update(id, |record| {
            let mut next = record.clone();
            next.revoked_at.get_or_insert(now);
            Ok((next.clone(), next))
        })
    }

    /// The key `id` if `secret` is accepted at `now`; records its use (at
    /// most once a minute). Store failures are not refusals.
    pub fn authenticate(
        &self,
        id: &str,
        secret: &str,
        now: i64,
    ) -> Result<Result<DeployKeyRecord, KeyRefusal>, StoreError> {
        let Some((record, rev)) = self.read(id)? else {
            // Spend the same work as a real comparison.
            let _ = deploy_key::secret_matches(&deploy_key::secret_hash(""), secret);
            return Ok(Err(KeyRefusal::Unknown));
        };
        if let Err(refusal) = record.authenticate(secret, now) {
            return Ok(Err(refusal));
        }
        if record.use_is_news(now) {
            let mut used = record.clone();
            used.last_used_at = Some(now);
            // A lost race means another request wrote a use just now.
            if let Err(e) = self.store.commit(Txn {
                conditions: vec![Condition::ModRevision(key(id), rev)],
                ops: vec![Op::Put(key(id), crate::store::encode(&used))],
            }) {
                tracing::warn!(key = id, "could not record a deploy key's use: {e}");
            }
        }
        Ok(Ok(record))
    }
}

/// The deletions of every key of `app` in `store`, for `app delete`'s one
/// transaction (a key is only created while the app record is unchanged,
/// so none can slip in between).
pub fn removal_ops(store: &dyn Store, app: &str) -> Result<Vec<Op>, StoreError> {
    Ok(DeployKeys::list_in(store, app)?
        .into_iter()
        .map(|r| Op::Delete(key(&r.id)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn address() -> ClusterAddress {
        format!("cluster.test:8443;sha1:{}", "ab".repeat(20))
            .parse()
            .unwrap()
    }

    #[test]
    fn keys_are_made_rotated_revoked_and_removed_with_their_app() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let keys = DeployKeys::new(store.clone());
        let now = 1_000_000;
        assert!(matches!(
            keys.create(&address(), "web", "", Some(0), now),
            Err(DeployKeyError::Policy(KeyPolicyError::Ttl))
        ));
        let made = keys
            .create(&address(), "web", "jenkins", None, now)
            .unwrap();
        let id = made.record.id.clone();
        assert_eq!(DeployKey::parse(&made.key.encode()).unwrap(), made.key);
        let ok = keys.authenticate(&id, &made.key.secret, now + 1).unwrap();
        assert_eq!(ok.unwrap().app, "web");
        assert_eq!(keys.list("web").unwrap()[0].last_used_at, Some(now + 1));
        assert_eq!(
            keys.authenticate(&id, "wrong", now).unwrap(),
            Err(KeyRefusal::Unknown)
        );
        assert_eq!(
            keys.authenticate("000000000000", "x", now).unwrap(),
            Err(KeyRefusal::Unknown)
        );
        let rotated = keys.rotate(&address(), &id, Some(60), now + 10).unwrap();
        assert!(keys
            .authenticate(&id, &made.key.secret, now + 69)
            .unwrap()
            .is_ok());
        assert!(keys
            .authenticate(&id, &rotated.key.secret, now + 69)
            .unwrap()
            .is_ok());
        assert_eq!(
            keys.authenticate(&id, &made.key.secret, now + 70).unwrap(),
            Err(KeyRefusal::RotatedOut)
        );
        keys.revoke(&id, now + 80).unwrap();
        assert_eq!(
            keys.authenticate(&id, &rotated.key.secret, now + 81)
                .unwrap(),
            Err(KeyRefusal::Revoked)
        );
        let ops = removal_ops(&*store, "web").unwrap();
        assert_eq!(ops.len(), 1);
        store
            .commit(Txn {
                conditions: vec![],
                ops,
            })
            .unwrap();
        assert!(keys.list("").unwrap().is_empty());
        assert!(matches!(
            keys.revoke(&id, now),
            Err(DeployKeyError::NotFound(_))
        ));
    }

    #[test]
    fn a_rotation_that_loses_to_another_is_refused_and_the_winner_keeps_its_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let (a, b) = (DeployKeys::new(store.clone()), DeployKeys::new(store));
        let now = 1_000_000;
        let id = a
            .create(&address(), "web", "", None, now)
            .unwrap()
            .record
            .id;
        // B rotates between A's read and A's write.
        let mut won = None;
        let lost = a.update_within(&id, 1, |record| {
            if won.is_none() {
                won = Some(b.rotate(&address(), &id, Some(0), now + 1).unwrap());
            }
            Ok((record.rotated("a-secret", 0, now + 1)?, ()))
        });
        assert!(
            matches!(lost, Err(DeployKeyError::ChangedMeanwhile(ref k)) if *k == id),
            "{lost:?}"
        );
        let won = won.unwrap();
        assert!(a
            .authenticate(&id, &won.key.secret, now + 2)
            .unwrap()
            .is_ok());
        assert!(a.authenticate(&id, "a-secret", now + 2).unwrap().is_err());
    }
}
