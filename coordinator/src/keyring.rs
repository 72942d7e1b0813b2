//! The coordinator's signing keys on disk, their schedule, and rotation.
//!
//! `keys/index.json` lists every key with its times; each key lives in its
//! own PKCS#8 PEM file (0600). A rotation writes the new key file first and
//! the index second, both atomically: a crash in between leaves an orphan
//! file that is ignored, never an index naming a missing key.
//!
//! Schedule (all times from the index, `now` passed in):
//! - a new key is *pending* from creation until `activates_unix`, which is at
//!   least one JWKS cache lifetime later: verifiers see it before it signs;
//! - the newest key that has ever been active is *active* and signs (see
//!   below), so the newest key whose activation has passed when the clock
//!   runs forward;
//! - older keys are *retired*: published until every token they signed has
//!   expired (`next key's activation + MAX_TTL + leeway`), then *expired*.
//! - a legacy Ed25519 key found in `keys/` is published (EdDSA) forever and
//!   never signs.
//!
//! With `--etcd` the ring is not on disk: it is one sealed record of the
//! store ([`RingRecord`], see `crate::cluster_secrets`), which every
//! coordinator follows and only the leader changes; a ring made from it
//! ([`KeyRing::from_record`]) writes no file, and its changes are published
//! by the caller (`crate::issuer`) with a compare-and-set.
//!
//! A clock stepped back must not leave the ring without a signing key (the
//! coordinator would refuse to start) nor hand signing back to an older key.
//! So "newest" is the order of the index (keys are appended as they are
//! made), and a key has *been active* when its activation has passed `now`,
//! when the ring recorded seeing it active (`first_active_unix`, written
//! once, at start and by the rotation task), or when a key after it in the
//! index was created at or after its activation (the clock then had passed
//! it, which also covers indexes written before the record existed). The newest such
//! key keeps signing until a later one activates. Should no key qualify at
//! all (an index edited by hand), the oldest signs rather than none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use identity::claims::MAX_TTL_SECS;
use identity::keys::{PublicKey, SigningKeyPair};
use identity::mint::Minter;
use serde::{Deserialize, Serialize};

use transport::files::{ensure_private_dir, write_atomic};

/// Seconds a retired key stays published past the last moment it signed,
/// beyond the longest token lifetime (clock skew allowance).
pub const RETIRE_GRACE_SECS: i64 = 3600;

/// Why the key ring cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("signing key file {path} is corrupt: {reason} (restore it from a backup)")]
    Corrupt {
        path: PathBuf,
        #[source]
        reason: CorruptKey,
    },
    #[error(
        "signing key index {path} names {kid} but its file is missing (restore it from a backup)"
    )]
    Missing { path: PathBuf, kid: String },
    #[error("no signing key is active (the index lists none that has activated)")]
    NoActiveKey,
    /// A file or dir of the ring could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A new key could not be made or encoded.
    #[error(transparent)]
    Key(#[from] identity::KeyError),
    /// A new key could not be prepared for signing.
    #[error(transparent)]
    Minter(#[from] identity::MintError),
    /// The index could not be encoded.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
}

/// What is wrong with a file of the ring.
#[derive(Debug, thiserror::Error)]
pub enum CorruptKey {
    /// The index is not JSON of its shape.
    #[error("{0}")]
    Index(#[source] serde_json::Error),
    #[error("key file name {0:?} is not a plain file name")]
    FileName(String),
    /// The key does not parse.
    #[error(transparent)]
    Key(#[from] identity::KeyError),
    #[error("holds key {found} but the index says {indexed}")]
    OtherKid { found: String, indexed: String },
    /// The key cannot sign.
    #[error(transparent)]
    Minter(#[from] identity::MintError),
}

/// What a key is doing at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Pending,
    Active,
    Retired,
    Expired,
    Legacy,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Expired => "expired",
            KeyState::Legacy => "legacy",
        }
    }
}

/// One entry of `keys/index.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyEntry {
    pub kid: String,
    pub alg: String,
    pub file: String,
    pub created_unix: i64,
    pub activates_unix: i64,
    /// False for legacy keys kept only for verification.
    pub signs: bool,
    /// When the ring first saw this key active (its activation had passed
    /// the clock): from then on a clock stepped back cannot make it
    /// pending again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_active_unix: Option<i64>,
}

/// A key entry with its state and retirement time at some `now`.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub kid: String,
    pub alg: String,
    pub state: KeyState,
    pub created_unix: i64,
    pub activates_unix: i64,
    /// When it stops being published; `None` while it may still sign or
    /// for legacy keys.
    pub retires_unix: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct KeyIndex {
    keys: Vec<KeyEntry>,
}

/// The pure schedule: state of every entry at `now`.
pub fn schedule(entries: &[KeyEntry], now: i64) -> Vec<KeyStatus> {
    // Index order is creation order: `rotate` appends.
    let signing: Vec<&KeyEntry> = entries.iter().filter(|e| e.signs).collect();
    let has_been_active = |i: usize| {
        let e = signing[i];
        e.activates_unix <= now
            || e.first_active_unix.is_some()
            || signing[i + 1..]
                .iter()
                .any(|later| later.created_unix >= e.activates_unix)
    };
    let active_idx = (0..signing.len())
        .rev()
        .find(|&i| has_been_active(i))
        .or(if signing.is_empty() { None } else { Some(0) });
    let mut out = Vec::new();
    for (i, e) in signing.iter().enumerate() {
        let (state, retires) = match active_idx {
            Some(a) if i == a => (KeyState::Active, None),
            Some(a) if i < a => {
                // Signed until its successor activated.
                let successor = signing[i + 1].activates_unix;
                let retires = successor + MAX_TTL_SECS as i64 + RETIRE_GRACE_SECS;
                if now >= retires {
                    (KeyState::Expired, Some(retires))
                } else {
                    (KeyState::Retired, Some(retires))
                }
            }
            _ => (KeyState::Pending, None),
        };
        out.push(KeyStatus {
            kid: e.kid.clone(),
            alg: e.alg.clone(),
            state,
            created_unix: e.created_unix,
            activates_unix: e.activates_unix,
            retires_unix: retires,
        });
    }
    for e in entries.iter().filter(|e| !e.signs) {
        out.push(KeyStatus {
            kid: e.kid.clone(),
            alg: e.alg.clone(),
            state: KeyState::Legacy,
            created_unix: e.created_unix,
            activates_unix: e.activates_unix,
            retires_unix: None,
        });
    }
    out
}

/// The whole ring as one record: the index and every key's PKCS#8 PEM by
/// kid (the shared store's form; sealed before it is stored).
#[derive(Clone, Serialize, Deserialize)]
pub struct RingRecord {
    pub keys: Vec<KeyEntry>,
    pub pems: std::collections::BTreeMap<String, String>,
}

/// Loaded signing keys: minters for RS256 keys, public keys for all.
#[derive(Clone)]
pub struct KeyRing {
    /// `keys/` in the data dir; `None` for a ring that lives in the store.
    dir: Option<PathBuf>,
    entries: Vec<KeyEntry>,
    minters: HashMap<String, Arc<Minter>>,
    public: HashMap<String, PublicKey>,
    /// Every key's PKCS#8 PEM by kid (for [`KeyRing::to_record`]).
    pems: HashMap<String, String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyRingError + '_ {
    move |source| KeyRingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl KeyRing {
    /// Creates `dir` with one active key (used on first start).
    pub fn init(dir: &Path, now: i64) -> Result<(), KeyRingError> {
        ensure_private_dir(dir).map_err(io(dir))?;
        let key = SigningKeyPair::generate()?;
        let (entry, pem) = new_entry(&key, now, now)?;
        write_key(dir, &entry, &pem)?;
        write_index(dir, &KeyIndex { keys: vec![entry] })
    }

    /// Loads the ring from `dir`, adopting a legacy Ed25519 key file that the
    /// index does not know yet.
    pub fn load(dir: &Path, now: i64) -> Result<Self, KeyRingError> {
        let index_path = dir.join("index.json");
        let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
        let mut index: KeyIndex =
            serde_json::from_str(&text).map_err(|e| KeyRingError::Corrupt {
                path: index_path.clone(),
                reason: CorruptKey::Index(e),
            })?;
        let mut minters = HashMap::new();
        let mut public = HashMap::new();
        let mut pems = HashMap::new();
        for entry in &index.keys {
            let path = dir.join(&entry.file);
            if entry.file.contains('/') || entry.file.starts_with('.') {
                return Err(KeyRingError::Corrupt {
                    path: index_path,
                    reason: CorruptKey::FileName(entry.file.clone()),
                });
            }
            let pem = match std::fs::read_to_string(&path) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(KeyRingError::Missing {
                        path: index_path,
                        kid: entry.kid.clone(),
                    })
                }
                Err(e) => return Err(io(&path)(e)),
            };
            let corrupt = |reason: CorruptKey| KeyRingError::Corrupt {
                path: path.clone(),
                reason,
            };
            add_key(entry, &pem, &mut minters, &mut public).map_err(corrupt)?;
            pems.insert(entry.kid.clone(), pem);
        }
        // Adopt legacy Ed25519 keys left by older data dirs.
        let known: Vec<String> = index.keys.iter().map(|e| e.file.clone()).collect();
        let mut adopted = false;
        if let Ok(listing) = std::fs::read_dir(dir) {
            for item in listing.flatten() {
                let name = item.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".pem") || name.starts_with('.') || known.contains(&name) {
                    continue;
                }
                let Ok(pem) = std::fs::read_to_string(item.path()) else {
                    continue;
                };
                if let Ok(key) = PublicKey::ed25519_from_pkcs8_pem(&pem) {
                    pems.insert(key.kid().to_string(), pem.clone());
                    index.keys.push(KeyEntry {
                        kid: key.kid().to_string(),
                        alg: "EdDSA".into(),
                        file: name,
                        created_unix: now,
                        activates_unix: now,
                        signs: false,
                        first_active_unix: None,
                    });
                    public.insert(key.kid().to_string(), key);
                    adopted = true;
                }
            }
        }
        if adopted {
            write_index(dir, &index)?;
        }
        let mut ring = KeyRing {
            dir: Some(dir.to_path_buf()),
            entries: index.keys,
            minters,
            public,
            pems,
        };
        ring.active(now)?;
        ring.record_active(now)?;
        Ok(ring)
    }

    /// A ring from its store record (writes no file).
    pub fn from_record(record: &RingRecord, now: i64) -> Result<Self, KeyRingError> {
        let mut minters = HashMap::new();
        let mut public = HashMap::new();
        let mut pems = HashMap::new();
        let record_path = || PathBuf::from("(the store's signing key record)");
        for entry in &record.keys {
            let Some(pem) = record.pems.get(&entry.kid) else {
                return Err(KeyRingError::Missing {
                    path: record_path(),
                    kid: entry.kid.clone(),
                });
            };
            add_key(entry, pem, &mut minters, &mut public).map_err(|reason| {
                KeyRingError::Corrupt {
                    path: record_path(),
                    reason,
                }
            })?;
            pems.insert(entry.kid.clone(), pem.clone());
        }
        let ring = KeyRing {
            dir: None,
            entries: record.keys.clone(),
            minters,
            public,
            pems,
        };
        ring.active(now)?;
        Ok(ring)
    }

    /// The ring as one record (every key's PEM and the index).
    pub fn to_record(&self) -> RingRecord {
        RingRecord {
            keys: self.entries.clone(),
            pems: self
                .entries
                .iter()
                .filter_map(|e| self.pems.get(&e.kid).map(|p| (e.kid.clone(), p.clone())))
                .collect(),
        }
    }

    /// The same keys as a ring that writes no file (its changes go to the
    /// store through the caller).
    pub fn detached(&self) -> KeyRing {
        KeyRing {
            dir: None,
            ..self.clone()
        }
    }

    /// Whether the active key's first activation is yet to be recorded
    /// (cheap; call [`KeyRing::record_active`] when it is).
    pub fn needs_record(&self, now: i64) -> bool {
        self.unrecorded_active(now).is_some()
    }

    fn unrecorded_active(&self, now: i64) -> Option<usize> {
        let kid = schedule(&self.entries, now)
            .into_iter()
            .find(|s| s.state == KeyState::Active)?
            .kid;
        self.entries
            .iter()
            .position(|e| e.kid == kid && e.first_active_unix.is_none() && e.activates_unix <= now)
    }

    /// Records that the active key has been seen active at `now` (once per
    /// key; only when its activation has really passed `now`), so a clock
    /// stepped back later keeps it signing. Returns whether it wrote.
    pub fn record_active(&mut self, now: i64) -> Result<bool, KeyRingError> {
        let Some(i) = self.unrecorded_active(now) else {
            return Ok(false);
        };
        let mut entries = self.entries.clone();
        entries[i].first_active_unix = Some(now);
        self.persist_index(&entries)?;
        self.entries = entries;
        Ok(true)
    }

    /// Writes `entries` as the index when the ring lives in a dir (a ring
    /// of the shared store's record has none).
    fn persist_index(&self, entries: &[KeyEntry]) -> Result<(), KeyRingError> {
        match &self.dir {
            Some(dir) => write_index(
                dir,
                &KeyIndex {
                    keys: entries.to_vec(),
                },
            ),
            None => Ok(()),
        }
    }

    /// The minter of the key that signs at `now`.
    pub fn active(&self, now: i64) -> Result<Arc<Minter>, KeyRingError> {
        schedule(&self.entries, now)
            .into_iter()
            .find(|s| s.state == KeyState::Active)
            .and_then(|s| self.minters.get(&s.kid).cloned())
            .ok_or(KeyRingError::NoActiveKey)
    }

    /// Every key with its state at `now`.
    pub fn statuses(&self, now: i64) -> Vec<KeyStatus> {
        schedule(&self.entries, now)
    }

    /// Public keys to publish at `now` (all but expired), RS256 first.
    pub fn published(&self, now: i64) -> Vec<PublicKey> {
        let mut out: Vec<(bool, PublicKey)> = schedule(&self.entries, now)
            .into_iter()
            .filter(|s| s.state != KeyState::Expired)
            .filter_map(|s| {
                self.public
                    .get(&s.kid)
                    .map(|k| (s.state == KeyState::Legacy, k.clone()))
            })
            .collect();
        out.sort_by_key(|(legacy, _)| *legacy);
        out.into_iter().map(|(_, k)| k).collect()
    }

    /// Whether a pending key already waits to take over.
    pub fn has_pending(&self, now: i64) -> bool {
        schedule(&self.entries, now)
            .iter()
            .any(|s| s.state == KeyState::Pending)
    }

    /// When the active key started signing.
    pub fn active_since(&self, now: i64) -> Option<i64> {
        schedule(&self.entries, now)
            .into_iter()
            .find(|s| s.state == KeyState::Active)
            .map(|s| s.activates_unix)
    }

    /// Generates a new key that activates at `now + publish_window`,
    /// writes it (file, then index) and adds it to the ring. Expired key
    /// files are removed from the index and disk.
    pub fn rotate(&mut self, now: i64, publish_window: i64) -> Result<KeyStatus, KeyRingError> {
        let key = SigningKeyPair::generate()?;
        let (entry, pem) = new_entry(&key, now, now + publish_window.max(0))?;
        if let Some(dir) = &self.dir {
            write_key(dir, &entry, &pem)?;
        }
        let statuses = schedule(&self.entries, now);
        let expired: Vec<String> = statuses
            .iter()
            .filter(|s| s.state == KeyState::Expired)
            .map(|s| s.kid.clone())
            .collect();
        let mut entries: Vec<KeyEntry> = self
            .entries
            .iter()
            .filter(|e| !expired.contains(&e.kid))
            .cloned()
            .collect();
        entries.push(entry.clone());
        self.persist_index(&entries)?;
        for e in self.entries.iter().filter(|e| expired.contains(&e.kid)) {
            if let Some(dir) = &self.dir {
                let _ = std::fs::remove_file(dir.join(&e.file));
            }
            self.minters.remove(&e.kid);
            self.public.remove(&e.kid);
            self.pems.remove(&e.kid);
        }
        let minter = Minter::new(&key)?;
        self.minters.insert(entry.kid.clone(), Arc::new(minter));
        self.pems.insert(entry.kid.clone(), pem);
        self.public
            .insert(entry.kid.clone(), key.public_key().clone());
        self.entries = entries;
        schedule(&self.entries, now)
            .into_iter()
            .find(|s| s.kid == entry.kid)
            .ok_or(KeyRingError::NoActiveKey)
    }
}

/// Checks one key against its entry and adds its minter (signing keys)
/// and public key.
fn add_key(
    entry: &KeyEntry,
    pem: &str,
    minters: &mut HashMap<String, Arc<Minter>>,
    public: &mut HashMap<String, PublicKey>,
) -> Result<(), CorruptKey> {
    if entry.signs {
        let pair = SigningKeyPair::from_pkcs8_pem(pem)?;
        if pair.kid() != entry.kid {
            return Err(CorruptKey::OtherKid {
                found: pair.kid().to_string(),
                indexed: entry.kid.clone(),
            });
        }
        let minter = Minter::new(&pair)?;
        public.insert(entry.kid.clone(), pair.public_key().clone());
        minters.insert(entry.kid.clone(), Arc::new(minter));
    } else {
        let key = PublicKey::ed25519_from_pkcs8_pem(pem)?;
        public.insert(entry.kid.clone(), key);
    }
    Ok(())
}

/// The entry and PKCS#8 PEM of a new key.
fn new_entry(
    key: &SigningKeyPair,
    created: i64,
    activates: i64,
) -> Result<(KeyEntry, String), KeyRingError> {
    let file = format!(
        "rs256-{created}-{}.pem",
        &key.kid()[..8.min(key.kid().len())]
    );
    let pem = key.to_pkcs8_pem()?;
    Ok((
        KeyEntry {
            kid: key.kid().to_string(),
            alg: "RS256".into(),
            file,
            created_unix: created,
            activates_unix: activates,
            signs: true,
            first_active_unix: None,
        },
        pem.to_string(),
    ))
}

fn write_key(dir: &Path, entry: &KeyEntry, pem: &str) -> Result<(), KeyRingError> {
    let path = dir.join(&entry.file);
    write_atomic(&path, pem.as_bytes(), 0o600).map_err(io(&path))
}

fn write_index(dir: &Path, index: &KeyIndex) -> Result<(), KeyRingError> {
    let json = serde_json::to_vec_pretty(index).map_err(KeyRingError::Encode)?;
    let path = dir.join("index.json");
    write_atomic(&path, &json, 0o600).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kid: &str, created: i64, activates: i64) -> KeyEntry {
        KeyEntry {
            kid: kid.into(),
            alg: "RS256".into(),
            file: format!("{kid}.pem"),
            created_unix: created,
            activates_unix: activates,
            signs: true,
            first_active_unix: None,
        }
    }

    fn state_of(s: &[KeyStatus], kid: &str) -> KeyState {
        s.iter().find(|k| k.kid == kid).map(|k| k.state).unwrap()
    }

    #[test]
    fn new_key_is_pending_until_its_activation() {
        let keys = vec![entry("a", 0, 0), entry("b", 1000, 1300)];
        let s = schedule(&keys, 1200);
        assert_eq!(state_of(&s, "a"), KeyState::Active);
        assert_eq!(state_of(&s, "b"), KeyState::Pending);
        let s = schedule(&keys, 1300);
        assert_eq!(state_of(&s, "a"), KeyState::Retired);
        assert_eq!(state_of(&s, "b"), KeyState::Active);
    }

    #[test]
    fn retired_key_is_published_until_its_tokens_expire() {
        let keys = vec![entry("a", 0, 0), entry("b", 1000, 1300)];
        let retires = 1300 + MAX_TTL_SECS as i64 + RETIRE_GRACE_SECS;
        let s = schedule(&keys, retires - 1);
        assert_eq!(state_of(&s, "a"), KeyState::Retired);
        assert_eq!(s[0].retires_unix, Some(retires));
        let s = schedule(&keys, retires);
        assert_eq!(state_of(&s, "a"), KeyState::Expired);
    }

    #[test]
    fn legacy_keys_never_sign() {
        let mut legacy = entry("old", 0, 0);
        legacy.signs = false;
        legacy.alg = "EdDSA".into();
        let keys = vec![legacy, entry("a", 5, 5)];
        let s = schedule(&keys, 10);
        assert_eq!(state_of(&s, "old"), KeyState::Legacy);
        assert_eq!(state_of(&s, "a"), KeyState::Active);
    }

    fn active_kid(keys: &[KeyEntry], now: i64) -> String {
        let s = schedule(keys, now);
        let active: Vec<_> = s.iter().filter(|k| k.state == KeyState::Active).collect();
        assert_eq!(active.len(), 1, "exactly one active key: {s:?}");
        active[0].kid.clone()
    }

    #[test]
    fn forward_clock_hands_over_at_activation() {
        let keys = vec![entry("a", 0, 0), entry("b", 1000, 1300)];
        assert_eq!(active_kid(&keys, 0), "a");
        assert_eq!(active_kid(&keys, 1299), "a");
        assert_eq!(active_kid(&keys, 1300), "b");
        assert_eq!(active_kid(&keys, 10_000_000), "b");
    }

    #[test]
    fn clock_back_before_the_newest_keys_activation_keeps_it_signing() {
        // b activated at 1300 and the ring saw it (recorded at 1310); then
        // the clock steps back to 1250.
        let mut b = entry("b", 1000, 1300);
        b.first_active_unix = Some(1310);
        let keys = vec![entry("a", 0, 0), b];
        assert_eq!(active_kid(&keys, 1250), "b");
        let s = schedule(&keys, 1250);
        assert_eq!(state_of(&s, "a"), KeyState::Retired);
        // Without the record, b was never active as far as anyone can
        // tell: a signs, as it did before.
        let keys = vec![entry("a", 0, 0), entry("b", 1000, 1300)];
        assert_eq!(active_kid(&keys, 1250), "a");
    }

    #[test]
    fn a_later_creation_proves_an_activation_without_a_record() {
        // c was created at 1400, after b's activation at 1300 (an index
        // from before records existed); the clock goes back to 1250.
        let keys = vec![
            entry("a", 0, 0),
            entry("b", 1000, 1300),
            entry("c", 1400, 1700),
        ];
        assert_eq!(active_kid(&keys, 1250), "b");
        assert_eq!(state_of(&schedule(&keys, 1250), "c"), KeyState::Pending);
        assert_eq!(active_kid(&keys, 1700), "c");
    }

    #[test]
    fn clock_back_before_every_keys_activation_still_signs() {
        // The first key is active from its creation; the clock goes back
        // before it was even made.
        let keys = vec![entry("a", 1000, 1000)];
        assert_eq!(active_kid(&keys, 500), "a");
        // Two keys, the newest recorded active: it signs, the older one
        // stays published as retired.
        let mut b = entry("b", 2000, 2300);
        b.first_active_unix = Some(2300);
        let keys = vec![entry("a", 1000, 1000), b];
        assert_eq!(active_kid(&keys, 500), "b");
        assert_eq!(state_of(&schedule(&keys, 500), "a"), KeyState::Retired);
        // A hand-made index where nothing ever activated: the oldest signs.
        let keys = vec![entry("x", 1000, 1300), entry("y", 1100, 1400)];
        assert_eq!(active_kid(&keys, 500), "x");
        assert_eq!(state_of(&schedule(&keys, 500), "y"), KeyState::Pending);
    }

    #[test]
    fn a_key_made_while_the_clock_is_back_takes_over_at_its_own_activation() {
        // b active and recorded; the clock steps back to 900 and an
        // operator rotates: c activates at 1200, before b's 1300.
        let mut b = entry("b", 1000, 1300);
        b.first_active_unix = Some(1300);
        let keys = vec![entry("a", 0, 0), b, entry("c", 900, 1200)];
        assert_eq!(active_kid(&keys, 1000), "b");
        assert_eq!(state_of(&schedule(&keys, 1000), "c"), KeyState::Pending);
        assert_eq!(active_kid(&keys, 1200), "c");
    }

    #[test]
    fn a_ring_round_trips_through_its_record_and_a_detached_one_writes_no_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("keys");
        KeyRing::init(&dir, 1000).expect("init");
        let ring = KeyRing::load(&dir, 1000).expect("load");
        let record = ring.to_record();
        assert_eq!(record.pems.len(), 1);
        let mut shared = KeyRing::from_record(&record, 1000).expect("from record");
        assert_eq!(
            shared.active(1000).expect("active").kid(),
            ring.active(1000).expect("active").kid()
        );
        let before: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().collect();
        let next = shared.rotate(2000, 300).expect("rotate");
        let after: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().collect();
        assert_eq!(before.len(), after.len(), "no file written");
        let again = KeyRing::from_record(&shared.to_record(), 2300).expect("again");
        assert_eq!(again.active(2300).expect("active").kid(), next.kid);
        // A record naming a key whose PEM it lacks is refused.
        let mut broken = shared.to_record();
        broken.pems.remove(&next.kid);
        assert!(matches!(
            KeyRing::from_record(&broken, 2300),
            Err(KeyRingError::Missing { .. })
        ));
        assert!(ring.detached().dir.is_none());
    }

    #[test]
    fn the_ring_records_activation_and_survives_a_clock_step_back() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("keys");
        KeyRing::init(&dir, 1000).expect("init");
        let mut ring = KeyRing::load(&dir, 1000).expect("load");
        let first = ring.active(1000).expect("active").kid().to_string();
        let b = ring.rotate(2000, 300).expect("rotate");
        assert_eq!(b.activates_unix, 2300);
        assert!(!ring.needs_record(2299));
        assert!(ring.needs_record(2300));
        assert!(ring.record_active(2305).expect("record"));
        assert!(!ring.record_active(2306).expect("once"));
        // A restart with the clock an hour before b's activation, and one
        // before the ring was even made.
        for now in [2300 - 3600, 10] {
            let ring = KeyRing::load(&dir, now).expect("load after clock step");
            assert_eq!(ring.active(now).expect("active").kid(), b.kid);
            assert_ne!(b.kid, first);
        }
    }
}
