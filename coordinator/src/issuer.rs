//! The cluster as an OIDC issuer: its URL (and the ones it replaced), its
//! signing key ring, and the background task that rotates the keys.
//!
//! `issuer.json` in the data dir remembers the current issuer and the ones
//! it replaced. After `--issuer-url` changes, the previous issuer stays
//! accepted for the longest token lifetime plus an hour, so tokens minted
//! just before the change keep verifying until they expire. What a token
//! says (whose it is) is decided in [`crate::minting`]; the documents that
//! publish the keys are served by [`crate::https`].
//!
//! With `--etcd` the ring and the history are shared records of the store
//! (`crate::cluster_secrets`), not files: every coordinator follows the
//! ring's record with a watch ([`RingFollower`], through `crate::watched`)
//! and swaps its ring in memory, so all publish the same JWKS; a change
//! (the leader's rotation, an operator's) is a compare-and-set on the
//! record's revision, and the loser of a race reloads instead of rotating
//! a second time ([`SharedRing`]).

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use identity::{IssuerUrl, KeySet, PublicKey, Verifier, MAX_TTL_SECS};
use serde::{Deserialize, Serialize};

use crate::cluster_secrets::{ClusterSecrets, SecretsError, KEYRING};
use crate::datadir::DataDirError;
use crate::keyring::{KeyRing, KeyStatus, RingRecord};
use crate::observe::Observe;
use crate::shutdown::Tasks;
use crate::store::{EventKind, KeyValue, Revision, Store, StoreError, WatchBatch};

/// How long a replaced issuer stays accepted.
pub const PREVIOUS_ISSUER_GRACE_SECS: i64 = MAX_TTL_SECS as i64 + 3600;

/// A replaced issuer and until when it is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousIssuer {
    pub url: String,
    pub accepted_until: i64,
}

/// `issuer.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerHistory {
    pub current: String,
    #[serde(default)]
    pub previous: Vec<PreviousIssuer>,
}

impl IssuerHistory {
    /// The history after the cluster starts with issuer `url` at `now`:
    /// a changed issuer moves the old one to `previous`; expired entries go.
    pub fn with_current(&self, url: &str, now: i64) -> IssuerHistory {
        let mut previous: Vec<PreviousIssuer> = self
            .previous
            .iter()
            .filter(|p| p.accepted_until > now && p.url != url)
            .cloned()
            .collect();
        if !self.current.is_empty() && self.current != url {
            previous.retain(|p| p.url != self.current);
            previous.push(PreviousIssuer {
                url: self.current.clone(),
                accepted_until: now + PREVIOUS_ISSUER_GRACE_SECS,
            });
        }
        IssuerHistory {
            current: url.to_string(),
            previous,
        }
    }

    /// Every issuer accepted at `now`, current first.
    pub fn accepted(&self, now: i64) -> Vec<String> {
        let mut out = vec![self.current.clone()];
        out.extend(
            self.previous
                .iter()
                .filter(|p| p.accepted_until > now)
                .map(|p| p.url.clone()),
        );
        out
    }
}

/// The data dir file of the issuer history (without `--etcd`).
pub const ISSUER_FILE: &str = "issuer.json";

/// Reads `issuer.json` (absent means no history).
pub fn read_history(dir: &Path) -> Result<IssuerHistory, DataDirError> {
    let path = dir.join(ISSUER_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DataDirError::Corrupt {
            path: path.clone(),
            reason: crate::datadir::CorruptFile::Json(e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IssuerHistory::default()),
        Err(source) => Err(DataDirError::Io { path, source }),
    }
}

/// Loads `issuer.json` (absent means no history), records `url` as current
/// and writes it back when it changed.
pub fn record(dir: &Path, url: &str, now: i64) -> Result<IssuerHistory, DataDirError> {
    let path = dir.join(ISSUER_FILE);
    let old = read_history(dir)?;
    let new = old.with_current(url, now);
    if new != old {
        let json = serde_json::to_vec_pretty(&new).map_err(|e| DataDirError::Corrupt {
            path: path.clone(),
            reason: crate::datadir::CorruptFile::Json(e),
        })?;
        transport::files::write_atomic(&path, &json, 0o644)
            .map_err(|source| DataDirError::Io { path, source })?;
    }
    Ok(new)
}

/// The issuer of this cluster's tokens.
pub struct Issuer {
    /// Issuer of the tokens minted now.
    pub url: IssuerUrl,
    /// Current issuer and replaced ones still accepted.
    pub history: IssuerHistory,
    pub keys: RwLock<KeyRing>,
    /// How long verifiers may cache the JWKS; a new key is published at
    /// least this long before it signs.
    pub jwks_max_age_secs: i64,
    /// The ring's record in the store when the cluster shares it
    /// (`--etcd`); `None`: the ring is the data dir's `keys/`.
    pub shared: Option<SharedRing>,
}

/// The signing key ring as a shared record: where it is and the revision
/// the ring in memory was made from.
pub struct SharedRing {
    secrets: Arc<ClusterSecrets>,
    revision: Mutex<Revision>,
}

impl SharedRing {
    /// The record read at `revision` is the ring in memory.
    pub fn new(secrets: Arc<ClusterSecrets>, revision: Revision) -> SharedRing {
        SharedRing {
            secrets,
            revision: Mutex::new(revision),
        }
    }
}

/// The key ring is unusable (a thread panicked holding its lock).
pub const KEYS_UNAVAILABLE: &str = "key ring unavailable";

/// Why the issuer could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// A thread panicked holding the key ring's lock.
    #[error("{KEYS_UNAVAILABLE}")]
    KeysUnavailable,
    /// An operator's rotation while a new key waits to activate.
    #[error("a new signing key is already waiting to activate (see `miren identity keys list`); rotate again after it is active")]
    RotationPending,
    /// The key ring refused (files, schedule).
    #[error(transparent)]
    KeyRing(#[from] crate::keyring::KeyRingError),
    /// The published keys do not make a key set.
    #[error(transparent)]
    KeySet(#[from] identity::KeySetError),
    /// The blocking task changing the key ring ended without an answer.
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Another coordinator changed the shared key ring first; this one now
    /// holds that change.
    #[error("another coordinator changed the signing keys at the same time; the keys were read again (see `miren identity keys list`), try again if still needed")]
    Conflict,
    /// The shared ring's record could not be read or written.
    #[error(transparent)]
    Shared(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Issuer {
    /// Keys to publish at `now` (discovery, JWKS).
    pub fn published(&self, now: i64) -> Result<Vec<PublicKey>, IssuerError> {
        Ok(self
            .keys
            .read()
            .map_err(|_| IssuerError::KeysUnavailable)?
            .published(now))
    }

    /// Every key with its state at `now`.
    pub fn statuses(&self, now: i64) -> Result<Vec<KeyStatus>, IssuerError> {
        Ok(self
            .keys
            .read()
            .map_err(|_| IssuerError::KeysUnavailable)?
            .statuses(now))
    }

    /// A verifier for this cluster's own tokens at `now`: published keys,
    /// accepted issuers, the given audience.
    pub fn verifier(&self, audience: &str, now: i64) -> Result<Verifier, IssuerError> {
        let keys = KeySet::from_keys(self.published(now)?)?;
        Ok(Verifier::new(
            keys,
            self.history.accepted(now),
            [audience.to_string()],
        ))
    }

    /// Starts a new signing key now (an operator's rotation); refused while
    /// one is already waiting to activate. Returns every key's state.
    pub fn rotate(&self, now: i64) -> Result<Vec<KeyStatus>, IssuerError> {
        let window = self.jwks_max_age_secs;
        self.change_ring(move |ring| {
            if ring.has_pending(now) {
                return Err(IssuerError::RotationPending);
            }
            ring.rotate(now, window)?;
            Ok(ring.statuses(now))
        })
    }

    /// Applies `change` to the ring: in place when it is the data dir's;
    /// when it is shared, to a copy that is published with a compare-and-set
    /// and swapped in only once the store took it (a lost race reloads the
    /// record and reports [`IssuerError::Conflict`]). Blocks on the store.
    pub fn change_ring<T>(
        &self,
        change: impl FnOnce(&mut KeyRing) -> Result<T, IssuerError>,
    ) -> Result<T, IssuerError> {
        let Some(shared) = &self.shared else {
            let mut ring = self
                .keys
                .write()
                .map_err(|_| IssuerError::KeysUnavailable)?;
            return change(&mut ring);
        };
        let from = *shared
            .revision
            .lock()
            .map_err(|_| IssuerError::KeysUnavailable)?;
        let mut candidate = self
            .keys
            .read()
            .map_err(|_| IssuerError::KeysUnavailable)?
            .detached();
        let out = change(&mut candidate)?;
        match shared
            .secrets
            .replace(KEYRING, &candidate.to_record(), from)?
        {
            Some(revision) => {
                self.install(candidate, revision)?;
                Ok(out)
            }
            None => {
                self.reload_ring(&**shared.secrets.store())?;
                Err(IssuerError::Conflict)
            }
        }
    }

    /// Puts `ring`, made from the record at `revision`, in place unless a
    /// later record is there already.
    fn install(&self, ring: KeyRing, revision: Revision) -> Result<bool, IssuerError> {
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        let mut seen = shared
            .revision
            .lock()
            .map_err(|_| IssuerError::KeysUnavailable)?;
        if revision <= *seen {
            return Ok(false);
        }
        *self
            .keys
            .write()
            .map_err(|_| IssuerError::KeysUnavailable)? = ring;
        *seen = revision;
        Ok(true)
    }

    /// Installs the ring of a record as read from the store.
    fn install_kv(&self, kv: &KeyValue) -> Result<bool, IssuerError> {
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        let read = shared.secrets.open_kv::<RingRecord>(KEYRING, kv)?;
        let ring = KeyRing::from_record(&read.value, transport::clock::now_unix())?;
        self.install(ring, read.mod_revision)
    }

    /// Reads the ring's record again and installs it.
    fn reload_ring(&self, store: &dyn Store) -> Result<(), IssuerError> {
        let kv = store
            .get_kv(KEYRING)?
            .ok_or(SecretsError::Missing(KEYRING))?;
        self.install_kv(&kv)?;
        Ok(())
    }
}

/// Keeps a shared ring in step with its record (see [`crate::watched`]).
pub struct RingFollower(pub Arc<Issuer>);

impl crate::watched::Watched for RingFollower {
    const NAME: &'static str = "signing key ring";

    fn prefix(&self) -> &str {
        KEYRING
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let page = store.range(KEYRING, None, 1)?;
        // A record that cannot be used leaves the ring as it is (it keeps
        // signing) and is said loudly; the next change is tried again.
        match page.kvs.iter().find(|kv| kv.key == KEYRING) {
            Some(kv) => {
                if let Err(e) = self.0.install_kv(kv) {
                    tracing::error!("the signing key record could not be used: {e}");
                }
            }
            None => {
                tracing::error!("the store holds no signing key record; keeping the keys in memory")
            }
        }
        Ok(page.revision)
    }

    fn apply(&self, batch: &WatchBatch) {
        for event in &batch.events {
            if event.kv.key != KEYRING || event.kind != EventKind::Put {
                continue;
            }
            match self.0.install_kv(&event.kv) {
                Ok(true) => tracing::info!(
                    revision = event.kv.mod_revision,
                    "signing keys changed in the store: the ring in memory follows"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!("the signing key record could not be used: {e}"),
            }
        }
    }
}

/// Starts a new signing key one JWKS cache lifetime before the active one
/// reaches `rotation` age, so verifiers have it before it signs; ends when
/// the coordinator shuts down.
pub async fn rotate_keys_forever(
    issuer: std::sync::Arc<Issuer>,
    rotation: Duration,
    leadership: crate::leader::Leadership,
    tasks: Tasks,
) {
    let rotation = rotation.as_secs() as i64;
    let window = issuer.jwks_max_age_secs;
    let every = Duration::from_secs((rotation / 4).clamp(1, 10) as u64);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tasks.stopping() => return,
        }
        // The leader rotates; the others follow what it publishes.
        if !leadership.is_leader() {
            continue;
        }
        let now = transport::clock::now_unix();
        let (due, record) = match issuer.keys.read() {
            Ok(ring) => (
                !ring.has_pending(now)
                    && ring
                        .active_since(now)
                        .is_some_and(|since| now + window >= since + rotation),
                ring.needs_record(now),
            ),
            Err(_) => (false, false),
        };
        if record {
            // The key that just activated stays the signer should the clock
            // step back (see `keyring`).
            let recorded = write_ring(&issuer, move |ring| Ok(ring.record_active(now)?)).await;
            match recorded {
                Ok(_) => {}
                Err(IssuerError::Conflict) => {
                    tracing::info!("another coordinator recorded the active signing key first")
                }
                Err(e) => tracing::error!("recording the active signing key failed: {e}"),
            }
        }
        if due {
            // Decided again on the ring as it is when the change is made: a
            // rotation published meanwhile by another coordinator is not
            // made twice.
            let rotated = write_ring(&issuer, move |ring| {
                if ring.has_pending(now) {
                    return Err(IssuerError::RotationPending);
                }
                Ok(ring.rotate(now, window)?)
            })
            .await;
            match rotated {
                Ok(k) => {
                    tracing::info!(kid = %k.kid, activates = k.activates_unix, "signing key rotation started")
                }
                Err(IssuerError::Conflict | IssuerError::RotationPending) => tracing::info!(
                    "another coordinator rotated the signing keys first; following its ring"
                ),
                Err(e) => tracing::error!("signing key rotation failed: {e}"),
            }
        }
    }
}

/// Changes the key ring on the blocking pool (it writes files or the
/// store).
async fn write_ring<T: Send + 'static>(
    issuer: &std::sync::Arc<Issuer>,
    change: impl FnOnce(&mut KeyRing) -> Result<T, IssuerError> + Send + 'static,
) -> Result<T, IssuerError> {
    let issuer = issuer.clone();
    tokio::task::spawn_blocking(move || issuer.change_ring(change)).await?
}

/// Checks the key ring every second and audits what changed (keys change
/// by time as well as by rotation: a pending key activates by itself);
/// ends when the coordinator shuts down.
pub async fn watch_keys_forever(
    issuer: std::sync::Arc<Issuer>,
    observe: std::sync::Arc<Observe>,
    tasks: Tasks,
) {
    if !observe.enabled() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tasks.stopping() => return,
        }
        if let Ok(statuses) = issuer.statuses(transport::clock::now_unix()) {
            observe.watch_keys(&statuses);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two coordinators' issuers on one store holding the ring's record.
    fn two_sharing() -> (tempfile::TempDir, Arc<dyn Store>, Issuer, Issuer) {
        use crate::cluster_secrets::{AllRecords, CaRecord, CookieKeyRecord};
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&d.path().join("s.redb")).unwrap());
        KeyRing::init(&d.path().join("keys"), 1000).unwrap();
        let ring = KeyRing::load(&d.path().join("keys"), 1000).unwrap();
        let secrets = Arc::new(ClusterSecrets::new(
            store.clone(),
            crate::sealed::ClusterKey::generate().unwrap(),
        ));
        secrets
            .publish(&AllRecords {
                cluster: serde_json::json!({}),
                ca: CaRecord {
                    cert_pem: String::new(),
                    key_pem: String::new(),
                },
                keyring: serde_json::to_value(ring.to_record()).unwrap(),
                cookie_key: CookieKeyRecord { key: vec![0; 32] },
                issuer: serde_json::json!({}),
            })
            .unwrap();
        let issuer = || {
            let read = secrets.read::<RingRecord>(KEYRING).unwrap();
            Issuer {
                url: IssuerUrl::parse("https://c.test").unwrap(),
                history: IssuerHistory::default().with_current("https://c.test", 1000),
                keys: RwLock::new(KeyRing::from_record(&read.value, 1000).unwrap()),
                jwks_max_age_secs: 300,
                shared: Some(SharedRing::new(secrets.clone(), read.mod_revision)),
            }
        };
        let (a, b) = (issuer(), issuer());
        (d, store, a, b)
    }

    fn kids(i: &Issuer) -> Vec<String> {
        i.statuses(2000)
            .unwrap()
            .into_iter()
            .map(|s| s.kid)
            .collect()
    }

    #[test]
    fn a_shared_ring_is_rotated_once_and_the_loser_of_a_race_reloads() {
        let (_d, _store, a, b) = two_sharing();
        let rotated = a.rotate(2000).unwrap();
        assert_eq!(rotated.len(), 2);
        // b still holds the ring it read: its rotation loses the
        // compare-and-set, and it now holds a's ring instead of making a
        // second key.
        assert!(matches!(b.rotate(2000), Err(IssuerError::Conflict)));
        assert_eq!(kids(&a), kids(&b));
        // Asked again, b sees the pending key and refuses like a would.
        assert!(matches!(b.rotate(2001), Err(IssuerError::RotationPending)));
        let stored = a
            .shared
            .as_ref()
            .unwrap()
            .secrets
            .read::<RingRecord>(KEYRING);
        assert_eq!(stored.unwrap().value.keys.len(), 2, "one rotation, not two");
    }

    #[test]
    fn a_follower_installs_the_records_ring_and_ignores_an_older_one() {
        use crate::watched::Watched;
        let (_d, store, a, b) = two_sharing();
        let b = Arc::new(b);
        let follower = RingFollower(b.clone());
        let old = store.get_kv(KEYRING).unwrap().unwrap();
        a.rotate(2000).unwrap();
        let new = store.get_kv(KEYRING).unwrap().unwrap();
        let batch = |kv: &KeyValue| WatchBatch {
            revision: kv.mod_revision,
            events: vec![crate::store::WatchEvent {
                kind: EventKind::Put,
                kv: kv.clone(),
            }],
        };
        follower.apply(&batch(&new));
        assert_eq!(kids(&a), kids(&b));
        // A late event of the older record changes nothing.
        follower.apply(&batch(&old));
        assert_eq!(kids(&a), kids(&b));
        assert!(follower.reload(&*store).unwrap() >= new.mod_revision);
    }

    #[test]
    fn changed_issuer_stays_accepted_for_max_ttl_plus_an_hour() {
        let h = IssuerHistory::default().with_current("https://a", 100);
        assert_eq!(h.accepted(100), vec!["https://a"]);
        let h = h.with_current("https://b", 1000);
        let until = 1000 + 86_400 + 3600;
        assert_eq!(h.accepted(until - 1), vec!["https://b", "https://a"]);
        assert_eq!(h.accepted(until), vec!["https://b"]);
        // Same issuer again changes nothing.
        assert_eq!(h.with_current("https://b", 2000), h);
        // Going back to a previous issuer removes it from `previous`.
        let back = h.with_current("https://a", 2000);
        assert_eq!(back.current, "https://a");
        assert_eq!(back.previous.len(), 1);
        assert_eq!(back.previous[0].url, "https://b");
    }
}
