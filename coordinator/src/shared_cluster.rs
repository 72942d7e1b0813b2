//! A coordinator's start on a shared store (`--etcd`): the cluster's secrets
//! come from their sealed records (`crate::cluster_secrets`), not from the
//! data dir.
//!
//! The data dir keeps what is this coordinator's own or public: the cluster
//! key (`cluster.key`), `cluster.json` (the mark of an initialised dir),
//! `ca.crt`, its admin identity, its server certificate, `coordinator-id`,
//! `quic-reset.key`, the audit trail and the artifacts. Everything shared is
//! in the store, sealed.
//!
//! At start ([`open`]):
//! - records in the store and a cluster key: they are read and opened;
//! - no record yet (the cluster's first coordinator on this store, fresh or
//!   one that ran on etcd before the secrets moved there): the cluster key
//!   is made and written first (records sealed under a key that was lost
//!   could never be opened), then the CA, key ring, cookie key, identity
//!   and issuer history are published from the data dir's files in one
//!   create-only transaction, and those files are removed;
//! - records but no cluster key: refused; such a coordinator joins with a
//!   code (`miren server --join`).

use std::path::Path;
use std::sync::Arc;

use transport::pki::ClusterCa;

use crate::cluster_secrets::{
    AllRecords, CaRecord, ClusterSecrets, CookieKeyRecord, Published, Read, SecretsError, CLUSTER,
    COOKIE_KEY, ISSUER, KEYRING,
};
use crate::datadir::{self, ClusterMeta, DataDirError};
use crate::issuer::IssuerHistory;
use crate::keyring::{KeyRing, KeyRingError, RingRecord};
use crate::sealed::{ClusterKey, ClusterKeyError};
use crate::store::{Store, StoreError};

/// Why the shared secrets could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("the cluster's secrets are sealed in the store, but data dir {0} has no cluster.key: a new coordinator joins with a code (`miren cluster coordinator-code` on a running one, then `miren server --etcd … --join CODE` with an empty data dir); or restore cluster.key from a backup")]
    NoClusterKey(std::path::PathBuf),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Key(#[from] ClusterKeyError),
    #[error("the cluster's signing keys: {0}")]
    KeyRing(#[from] KeyRingError),
    #[error("the cluster's CA from the store does not load: {0}")]
    Ca(#[source] transport::pki::PkiError),
    #[error("the CA in the store is not the one of this data dir's ca.crt (fingerprints {store} and {ours}); this data dir belongs to another cluster")]
    OtherCa { store: String, ours: String },
    #[error("the cluster's cookie key record does not hold 32 bytes")]
    CookieKey,
    #[error("{path}: {source}")]
    Remove {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a coordinator takes from the store at start.
pub struct Shared {
    pub secrets: Arc<ClusterSecrets>,
    pub meta: ClusterMeta,
    pub ca: ClusterCa,
    pub ring: KeyRing,
    /// The revision of the key ring's record `ring` was made from.
    pub ring_revision: u64,
    pub cookie_key: [u8; 32],
}

/// Files the records replace; removed once the records are in the store.
const MOVED: [&str; 4] = [
    "ca.key",
    "keys",
    crate::sso::cookie::COOKIE_KEY_FILE,
    "issuer.json",
];

/// Opens the shared secrets for the initialised data dir `dir`, publishing
/// them from its files first when the store has none.
pub fn open(dir: &Path, store: Arc<dyn Store>, now: i64) -> Result<Shared, SharedError> {
    let published = ClusterSecrets::any_published(&*store)?;
    let key = match (ClusterKey::read(dir)?, published) {
        (Some(key), _) => key,
        (None, false) => {
            let key = ClusterKey::generate()?;
            key.write(dir)?;
            key
        }
        (None, true) => return Err(SharedError::NoClusterKey(dir.to_path_buf())),
    };
    let secrets = Arc::new(ClusterSecrets::new(store, key));
    if !published {
        match secrets.publish(&from_files(dir, now)?)? {
            Published::Written => tracing::info!(
                "the cluster's CA, signing keys, cookie key and identity are now sealed in the store"
            ),
            Published::AlreadyThere => {
                tracing::info!("another coordinator published the cluster's secrets first")
            }
        }
    }
    let shared = read(dir, secrets, now)?;
    remove_moved(dir)?;
    Ok(shared)
}

/// Reads and opens every record (checked against the data dir's `ca.crt`).
fn read(dir: &Path, secrets: Arc<ClusterSecrets>, now: i64) -> Result<Shared, SharedError> {
    let meta: Read<ClusterMeta> = secrets.read(CLUSTER)?;
    let ca = load_ca(&secrets)?;
    let ours = datadir::read_ca_cert(dir)?;
    let ours_fp = identity::address::Fingerprint::of_der(
        &transport::pki::cert_der_from_pem(&ours).map_err(SharedError::Ca)?,
    );
    if ours_fp != ca.fingerprint() {
        return Err(SharedError::OtherCa {
            store: ca.fingerprint().to_string(),
            ours: ours_fp.to_string(),
        });
    }
    let ring: Read<RingRecord> = secrets.read(KEYRING)?;
    let cookie: Read<CookieKeyRecord> = secrets.read(COOKIE_KEY)?;
    let cookie_key: [u8; 32] = cookie
        .value
        .key
        .try_into()
        .map_err(|_| SharedError::CookieKey)?;
    Ok(Shared {
        meta: meta.value,
        ca,
        ring: KeyRing::from_record(&ring.value, now)?,
        ring_revision: ring.mod_revision,
        cookie_key,
        secrets,
    })
}

/// The CA from its record.
pub fn load_ca(secrets: &ClusterSecrets) -> Result<ClusterCa, SharedError> {
    let ca: Read<CaRecord> = secrets.read(crate::cluster_secrets::CA)?;
    ClusterCa::load(&ca.value.cert_pem, &ca.value.key_pem).map_err(SharedError::Ca)
}

/// The cluster's issuer: `--issuer-url` when given (the old one stays
/// accepted as after any change), else the one the cluster has, else
/// `default_issuer` (this coordinator's own URL, for the cluster's first);
/// written back with a compare-and-set when it changed. Every coordinator
/// so serves one issuer.
pub fn record_issuer(
    secrets: &ClusterSecrets,
    issuer_url: Option<&str>,
    default_issuer: &str,
    now: i64,
) -> Result<IssuerHistory, SharedError> {
    for _ in 0..8 {
        let old: Read<IssuerHistory> = secrets.read(ISSUER)?;
        let url = match issuer_url {
            Some(u) => u,
            None if !old.value.current.is_empty() => old.value.current.as_str(),
            None => default_issuer,
        };
        let new = old.value.with_current(url, now);
        if new == old.value {
            return Ok(new);
        }
        if secrets.replace(ISSUER, &new, old.mod_revision)?.is_some() {
            return Ok(new);
        }
    }
    Err(SecretsError::Contended(ISSUER).into())
}

/// The records as the data dir's files hold them.
fn from_files(dir: &Path, now: i64) -> Result<AllRecords, SharedError> {
    let json = |v: serde_json::Result<serde_json::Value>| v.map_err(SecretsError::Encode);
    let meta = datadir::read_meta(dir)?;
    let ring = KeyRing::load(&dir.join("keys"), now)?;
    let cookie_path = dir.join(crate::sso::cookie::COOKIE_KEY_FILE);
    let cookie = match std::fs::read(&cookie_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ClusterKey::generate()?.bytes().to_vec()
        }
        Err(source) => {
            return Err(DataDirError::Io {
                path: cookie_path,
                source,
            }
            .into())
        }
    };
    if cookie.len() != 32 {
        return Err(SharedError::CookieKey);
    }
    Ok(AllRecords {
        cluster: json(serde_json::to_value(&meta))?,
        ca: CaRecord {
            cert_pem: datadir::read_ca_cert(dir)?,
            key_pem: datadir::read_ca_key(dir)?,
        },
        keyring: json(serde_json::to_value(ring.to_record()))?,
        cookie_key: CookieKeyRecord { key: cookie },
        issuer: json(serde_json::to_value(crate::issuer::read_history(dir)?))?,
    })
}

/// Removes the files the records replace (those still there).
fn remove_moved(dir: &Path) -> Result<(), SharedError> {
    for name in MOVED {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(file = %path.display(), "removed: the store holds it, sealed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SharedError::Remove { path, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn policy() -> datadir::ServerCertPolicy {
        datadir::ServerCertPolicy {
            names: vec!["127.0.0.1".into()],
            lifetime: transport::pki::SERVER_CERT_LIFETIME,
        }
    }

    #[test]
    fn the_first_start_moves_the_secrets_into_the_store_and_the_next_reads_them() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let s = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&s.path().join("shared.redb")).unwrap());
        datadir::init_if_new(&dir, "c").unwrap();
        let ca_crt = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        let first = open(&dir, store.clone(), 100).unwrap();
        let issuer = record_issuer(&first.secrets, None, "https://a:1", 100).unwrap();
        assert_eq!(issuer.current, "https://a:1");
        for gone in MOVED {
            assert!(!dir.join(gone).exists(), "{gone} moved into the store");
        }
        assert!(dir.join("cluster.key").exists());
        for (k, v) in store.scan("secret/").unwrap() {
            let text = String::from_utf8_lossy(&v);
            assert!(!text.contains("PRIVATE KEY"), "{k} is sealed");
        }
        assert_eq!(first.ca.cert_pem(), ca_crt);
        // Started again: the same cluster from the records; another
        // coordinator's default issuer does not replace the cluster's.
        let again = open(&dir, store.clone(), 200).unwrap();
        assert_eq!(again.meta.id, first.meta.id);
        let issuer = record_issuer(&again.secrets, None, "https://b:2", 200).unwrap();
        assert_eq!(issuer.current, "https://a:1");
        // An explicit --issuer-url changes it; the old one stays accepted.
        let issuer = record_issuer(&again.secrets, Some("https://c"), "https://b:2", 200).unwrap();
        assert_eq!(issuer.accepted(200), vec!["https://c", "https://a:1"]);
        assert_eq!(
            again.ring.active(200).unwrap().kid(),
            first.ring.active(100).unwrap().kid()
        );
        datadir::load_with_ca(&dir, again.meta, again.ca, &policy(), 200).unwrap();
        // A data dir without the cluster key is told to join.
        std::fs::remove_file(dir.join("cluster.key")).unwrap();
        let e = open(&dir, store, 300).err().unwrap();
        assert!(matches!(e, SharedError::NoClusterKey(_)), "{e}");
        assert!(e.to_string().contains("--join"), "{e}");
    }
}
