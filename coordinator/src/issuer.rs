//! The cluster as an OIDC issuer: its URL (and the ones it replaced), its
//! signing key ring, and the background task that rotates the keys.
//!
//! `issuer.json` in the data dir remembers the current issuer and the ones
//! it replaced. After `--issuer-url` changes, the previous issuer stays
//! accepted for the longest token lifetime plus an hour, so tokens minted
//! just before the change keep verifying until they expire. What a token
//! says (whose it is) is decided in [`crate::minting`]; the documents that
//! publish the keys are served by [`crate::https`].

use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use identity::{IssuerUrl, KeySet, PublicKey, Verifier, MAX_TTL_SECS};
use serde::{Deserialize, Serialize};

use crate::datadir::DataDirError;
use crate::keyring::{KeyRing, KeyStatus};
use crate::observe::Observe;
use crate::shutdown::Tasks;

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

/// Loads `issuer.json` (absent means no history), records `url` as current
/// and writes it back when it changed.
pub fn record(dir: &Path, url: &str, now: i64) -> Result<IssuerHistory, DataDirError> {
    let path = dir.join("issuer.json");
    let old: IssuerHistory = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DataDirError::Corrupt {
            path: path.clone(),
            reason: crate::datadir::CorruptFile::Json(e),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => IssuerHistory::default(),
        Err(source) => return Err(DataDirError::Io { path, source }),
    };
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
        let mut ring = self
            .keys
            .write()
            .map_err(|_| IssuerError::KeysUnavailable)?;
        if ring.has_pending(now) {
            return Err(IssuerError::RotationPending);
        }
        ring.rotate(now, self.jwks_max_age_secs)?;
        Ok(ring.statuses(now))
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
            let recorded = write_ring(&issuer, move |ring| ring.record_active(now)).await;
            if let Err(e) = recorded {
                tracing::error!("recording the active signing key failed: {e}");
            }
        }
        if due {
            match write_ring(&issuer, move |ring| ring.rotate(now, window)).await {
                Ok(k) => {
                    tracing::info!(kid = %k.kid, activates = k.activates_unix, "signing key rotation started")
                }
                Err(e) => tracing::error!("signing key rotation failed: {e}"),
            }
        }
    }
}

/// Changes the key ring on the blocking pool (it writes files).
async fn write_ring<T: Send + 'static>(
    issuer: &std::sync::Arc<Issuer>,
    change: impl FnOnce(&mut KeyRing) -> Result<T, crate::keyring::KeyRingError> + Send + 'static,
) -> Result<T, IssuerError> {
    let issuer = issuer.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut ring = issuer
            .keys
            .write()
            .map_err(|_| IssuerError::KeysUnavailable)?;
        Ok(change(&mut ring)?)
    })
    .await;
    done?
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
