//! The cluster's shared secrets in the store (`--etcd` only), each one
//! record sealed under the cluster key ([`crate::sealed`]): the CA, the
//! signing key ring, the route OIDC cookie key, the cluster's identity and
//! its issuer history.
//!
//! Every record is written create-only the first time (all of them in one
//! transaction: a cluster's secrets are published whole or not at all), and
//! changed afterwards only by compare-and-set on the revision it was read
//! at, so two coordinators changing one record at once cannot both win.
//! What each record holds is its owner's type (`keyring::RingRecord`,
//! `issuer::IssuerHistory`, `datadir::ClusterMeta`, [`CaRecord`]); this
//! module only seals, stores and opens them.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sealed::{ClusterKey, ClusterKeyError, OpenError};
use crate::store::{Condition, KeyValue, Op, Outcome, Revision, Store, StoreError, Txn};

/// The cluster CA's certificate and key.
pub const CA: &str = "secret/ca";
/// The signing key ring: every key's PKCS#8 and the schedule index.
pub const KEYRING: &str = "secret/keyring";
/// The key that seals route OIDC cookies.
pub const COOKIE_KEY: &str = "secret/route-oidc-key";
/// The cluster's id, name and creation time.
pub const CLUSTER: &str = "secret/cluster";
/// The issuer URL and the ones it replaced.
pub const ISSUER: &str = "secret/issuer";
/// Every record, in the order they are published.
pub const ALL: [&str; 5] = [CLUSTER, CA, KEYRING, COOKIE_KEY, ISSUER];

/// The CA record.
#[derive(Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cookie key record.
#[derive(Clone, Serialize, Deserialize)]
pub struct CookieKeyRecord {
    /// The 32 key bytes.
    pub key: Vec<u8>,
}

/// Why a shared record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record does not open with this coordinator's cluster key.
    #[error("the cluster's {name} record in the store {source}: this data dir's cluster.key is not this cluster's (a coordinator joins with `miren server --join CODE`; restore cluster.key from a backup of any coordinator of the cluster)")]
    Open {
        name: &'static str,
        #[source]
        source: OpenError,
    },
    /// The opened record is not of its shape.
    #[error("the cluster's {name} record is not valid: {source}")]
    Record {
        name: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("encoding a record: {0}")]
    Encode(#[source] serde_json::Error),
    /// A compare-and-set kept losing to other writers.
    #[error(
        "the cluster's {0} record kept changing while this coordinator wrote it; start it again"
    )]
    Contended(&'static str),
    /// A record every other one comes with is missing.
    #[error("the store holds some of the cluster's sealed records but not {0} (restore the etcd prefix from a snapshot)")]
    Missing(&'static str),
    #[error(transparent)]
    Key(#[from] ClusterKeyError),
}

/// A record as read, with the revision a compare-and-set names.
#[derive(Debug, Clone)]
pub struct Read<T> {
    pub value: T,
    pub mod_revision: Revision,
}

/// What [`ClusterSecrets::publish`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The records were written.
    Written,
    /// The cluster's records were already there; nothing was written.
    AlreadyThere,
}

/// The sealed records of one cluster in one store.
pub struct ClusterSecrets {
    store: Arc<dyn Store>,
    key: ClusterKey,
}

impl ClusterSecrets {
    pub fn new(store: Arc<dyn Store>, key: ClusterKey) -> ClusterSecrets {
        ClusterSecrets { store, key }
    }

    /// The cluster key (handed to a joining coordinator).
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// The store the records live in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether any record of the cluster is in the store.
    pub fn any_published(store: &dyn Store) -> Result<bool, StoreError> {
        for name in ALL {
            if store.get_kv(name)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Opens a record as read from the store (a watch event, say).
    pub fn open_kv<T: DeserializeOwned>(
        &self,
        name: &'static str,
        kv: &KeyValue,
    ) -> Result<Read<T>, SecretsError> {
        let plain = self
            .key
            .open(name, &kv.value)
            .map_err(|source| SecretsError::Open { name, source })?;
        let value = serde_json::from_slice(&plain)
            .map_err(|source| SecretsError::Record { name, source })?;
        Ok(Read {
            value,
            mod_revision: kv.mod_revision,
        })
    }

    /// Reads and opens a record; `Missing` when it is not there.
    pub fn read<T: DeserializeOwned>(&self, name: &'static str) -> Result<Read<T>, SecretsError> {
        let kv = self
            .store
            .get_kv(name)?
            .ok_or(SecretsError::Missing(name))?;
        self.open_kv(name, &kv)
    }

    fn seal<T: Serialize>(&self, name: &str, value: &T) -> Result<Vec<u8>, SecretsError> {
        let plain = serde_json::to_vec(value).map_err(SecretsError::Encode)?;
        Ok(self.key.seal(name, &plain)?)
    }

    /// Writes every record of the cluster, create-only and in one
    /// transaction: either all are written or, when any is there already,
    /// none.
    pub fn publish(&self, records: &AllRecords) -> Result<Published, SecretsError> {
        let values = [
            (CLUSTER, self.seal(CLUSTER, &records.cluster)?),
            (CA, self.seal(CA, &records.ca)?),
            (KEYRING, self.seal(KEYRING, &records.keyring)?),
            (COOKIE_KEY, self.seal(COOKIE_KEY, &records.cookie_key)?),
            (ISSUER, self.seal(ISSUER, &records.issuer)?),
        ];
        let txn = Txn {
            conditions: values
                .iter()
                .map(|(n, _)| Condition::Absent(n.to_string()))
                .collect(),
            ops: values
                .into_iter()
                .map(|(n, v)| Op::Put(n.to_string(), v))
                .collect(),
        };
        Ok(match self.store.commit(txn)? {
            Outcome::Applied => Published::Written,
            Outcome::ConditionFailed => Published::AlreadyThere,
        })
    }

    /// Replaces record `name` if it is still at `expected` (the revision it
    /// was read at); the new revision, or `None` when another write came
    /// first (read it again).
    pub fn replace<T: Serialize>(
        &self,
        name: &'static str,
        value: &T,
        expected: Revision,
    ) -> Result<Option<Revision>, SecretsError> {
        let sealed = self.seal(name, value)?;
        let done = self.store.txn(Txn {
            conditions: vec![Condition::ModRevision(name.to_string(), expected)],
            ops: vec![Op::Put(name.to_string(), sealed)],
        })?;
        Ok((done.outcome == Outcome::Applied).then_some(done.revision))
    }
}

/// Every record, as published at a cluster's first start on the store.
/// The values are JSON of their owners' types.
pub struct AllRecords {
    pub cluster: serde_json::Value,
    pub ca: CaRecord,
    pub keyring: serde_json::Value,
    pub cookie_key: CookieKeyRecord,
    pub issuer: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn records() -> AllRecords {
        AllRecords {
            cluster: serde_json::json!({"id": "c1"}),
            ca: CaRecord {
                cert_pem: "CERT".into(),
                key_pem: "-----BEGIN PRIVATE KEY----- secret".into(),
            },
            keyring: serde_json::json!({"keys": []}),
            cookie_key: CookieKeyRecord { key: vec![7; 32] },
            issuer: serde_json::json!({"current": "https://a"}),
        }
    }

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let d = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&d.path().join("s.redb")).unwrap();
        (d, Arc::new(s))
    }

    #[test]
    fn published_once_sealed_and_read_back() {
        let (_d, store) = store();
        let secrets = ClusterSecrets::new(store.clone(), ClusterKey::generate().unwrap());
        assert!(!ClusterSecrets::any_published(&*store).unwrap());
        assert_eq!(secrets.publish(&records()).unwrap(), Published::Written);
        assert_eq!(
            secrets.publish(&records()).unwrap(),
            Published::AlreadyThere
        );
        for (_, v) in store.scan("secret/").unwrap() {
            assert!(!String::from_utf8_lossy(&v).contains("PRIVATE KEY"));
        }
        let ca: Read<CaRecord> = secrets.read(CA).unwrap();
        assert!(ca.value.key_pem.contains("secret"));
        // Another cluster key opens nothing, and says what to do.
        let other = ClusterSecrets::new(store, ClusterKey::generate().unwrap());
        let e = other.read::<CaRecord>(CA).err().unwrap();
        assert!(matches!(e, SecretsError::Open { name: CA, .. }), "{e}");
        assert!(e.to_string().contains("--join"), "{e}");
    }

    #[test]
    fn a_record_swapped_for_another_does_not_open() {
        let (_d, store) = store();
        let secrets = ClusterSecrets::new(store.clone(), ClusterKey::generate().unwrap());
        secrets.publish(&records()).unwrap();
        let ca = store.get(CA).unwrap().unwrap();
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(COOKIE_KEY.into(), ca)],
            })
            .unwrap();
        assert!(matches!(
            secrets.read::<CookieKeyRecord>(COOKIE_KEY),
            Err(SecretsError::Open { .. })
        ));
    }

    #[test]
    fn a_replace_on_a_stale_revision_changes_nothing() {
        let (_d, store) = store();
        let secrets = ClusterSecrets::new(store, ClusterKey::generate().unwrap());
        secrets.publish(&records()).unwrap();
        let first: Read<serde_json::Value> = secrets.read(ISSUER).unwrap();
        let next = serde_json::json!({"current": "https://b"});
        let rev = secrets
            .replace(ISSUER, &next, first.mod_revision)
            .unwrap()
            .expect("applied");
        assert!(rev > first.mod_revision);
        let lost = serde_json::json!({"current": "https://c"});
        assert_eq!(
            secrets.replace(ISSUER, &lost, first.mod_revision).unwrap(),
            None
        );
        let now: Read<serde_json::Value> = secrets.read(ISSUER).unwrap();
        assert_eq!(now.value, next);
    }
}
