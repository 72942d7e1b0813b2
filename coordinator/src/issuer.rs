//! Which issuer URLs this cluster's tokens carry and are still accepted.
//!
//! `issuer.json` in the data dir remembers the current issuer and the ones
//! it replaced. After `--issuer-url` changes, the previous issuer stays
//! accepted for the longest token lifetime plus an hour, so tokens minted
//! just before the change keep verifying until they expire.

use std::path::Path;

use identity::MAX_TTL_SECS;
use serde::{Deserialize, Serialize};

use crate::datadir::{write_atomic, DataDirError};

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
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => IssuerHistory::default(),
        Err(source) => return Err(DataDirError::Io { path, source }),
    };
    let new = old.with_current(url, now);
    if new != old {
        let json = serde_json::to_vec_pretty(&new).map_err(|e| DataDirError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json, 0o644)?;
    }
    Ok(new)
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
