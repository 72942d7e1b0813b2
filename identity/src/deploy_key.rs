//! Deploy keys: long-lived client credentials for CI systems without OIDC.
//!
//! A key is printed once as one string, `miren_key_` + base64url(JSON
//! `{"v":1,"addr","fp","id","secret"}`): the prefix is for secret
//! scanners, and the string carries everything a pipeline needs (the
//! pinned cluster address, the client id, the secret), so `MIREN_API_KEY`
//! alone deploys. The store keeps SHA-256 of each secret, compared in
//! constant time. A key expires (required, at most a year), can be
//! rotated with an overlap during which the old secret still works, and
//! can be revoked at once. [`DeployKeyRecord::authenticate`] is the whole
//! decision, pure, with `now` passed in; a caller who presents a secret
//! that matches is told why its key no longer works (it proved it held
//! it), anyone else only that the credentials are invalid.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::address::{ClusterAddress, Fingerprint};

/// Prefix of every printed key.
pub const PREFIX: &str = "miren_key_";
/// Lifetime of a key when none is asked: 90 days.
pub const DEFAULT_TTL_SECS: u64 = 90 * 86_400;
/// Longest lifetime: one year.
pub const MAX_TTL_SECS: u64 = 365 * 86_400;
/// Shortest lifetime: one second (a key for one job is fine).
pub const MIN_TTL_SECS: u64 = 1;
/// Overlap of a rotation when none is asked.
pub const DEFAULT_OVERLAP_SECS: u64 = 86_400;
/// Longest overlap of a rotation: 7 days.
pub const MAX_OVERLAP_SECS: u64 = 7 * 86_400;
/// Longest accepted printed key.
pub const MAX_KEY_LEN: usize = 1024;
/// Replaced secrets remembered per key (to explain a refusal).
pub const MAX_RETIRED_SECRETS: usize = 4;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 200;

/// Why a printed key could not be read. Said to whoever holds the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    /// No key.
    #[error("MIREN_API_KEY is empty")]
    Empty,
    /// It does not start with the prefix.
    #[error("not a miren deploy key: it must start with {PREFIX} (from `miren auth key create`)")]
    Prefix,
    /// The rest is not a key.
    #[error(
        "the deploy key is damaged (it could not be decoded); copy it again or create a new one"
    )]
    Damaged,
    /// The address in it is unusable.
    #[error("the deploy key's cluster address is invalid")]
    Address,
}

/// Why a key was refused at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    /// No key has this id, or the secret is not one of its secrets (the
    /// two are not told apart).
    #[error("invalid client credentials")]
    Unknown,
    /// The key was revoked.
    #[error("this deploy key was revoked; create a new one with `miren auth key create`")]
    Revoked,
    /// The key's lifetime is over.
    #[error("this deploy key has expired; create a new one with `miren auth key create`")]
    Expired,
    /// The secret was replaced by a rotation whose overlap has ended.
    #[error("this secret was replaced by `miren auth key rotate` and its overlap has ended; use the new key")]
    RotatedOut,
}

/// Why a key could not be created or rotated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPolicyError {
    /// Lifetime out of bounds.
    #[error("a deploy key lives between 1s and 365d; use another --expires")]
    Ttl,
    /// Overlap out of bounds.
    #[error("a rotation overlap is at most 7d; use a shorter --overlap")]
    Overlap,
    /// Description too long or with control characters.
    #[error("a description is at most 200 printable characters")]
    Description,
    /// The key cannot be rotated.
    #[error("deploy key {0} cannot be rotated: it is {1}")]
    NotActive(String, KeyState),
}

/// Checks the lifetime of a new key (`None`: the default).
pub fn check_ttl(ttl_secs: Option<u64>) -> Result<u64, KeyPolicyError> {
    match ttl_secs.unwrap_or(DEFAULT_TTL_SECS) {
        t if (MIN_TTL_SECS..=MAX_TTL_SECS).contains(&t) => Ok(t),
        _ => Err(KeyPolicyError::Ttl),
    }
}

/// Checks a rotation overlap (`None`: the default).
pub fn check_overlap(overlap_secs: Option<u64>) -> Result<u64, KeyPolicyError> {
    match overlap_secs.unwrap_or(DEFAULT_OVERLAP_SECS) {
        t if t <= MAX_OVERLAP_SECS => Ok(t),
        _ => Err(KeyPolicyError::Overlap),
    }
}

/// Checks a description.
pub fn check_description(d: &str) -> Result<(), KeyPolicyError> {
    if d.chars().count() > MAX_DESCRIPTION_LEN || d.chars().any(char::is_control) {
        return Err(KeyPolicyError::Description);
    }
    Ok(())
}

/// Key ids: 12 lowercase hex digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `sub` of tokens issued to key `id`.
pub fn subject(id: &str) -> String {
    format!("key:{id}")
}

/// A deploy key as printed once.
#[derive(Clone, PartialEq, Eq)]
pub struct DeployKey {
    /// The cluster, with its CA fingerprint.
    pub address: ClusterAddress,
    /// The client id.
    pub id: String,
    /// The client secret.
    pub secret: String,
}

impl std::fmt::Debug for DeployKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployKey")
            .field("address", &self.address.to_string())
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    addr: String,
    fp: String,
    id: String,
    secret: String,
}

impl DeployKey {
    /// A key for `address` (with its fingerprint) from 32 random bytes.
    pub fn new(address: ClusterAddress, id: String, secret: [u8; 32]) -> Option<DeployKey> {
        address.fingerprint?;
        Some(DeployKey {
            address,
            id,
            secret: URL_SAFE_NO_PAD.encode(secret),
        })
    }

    /// `miren_key_…`.
    pub fn encode(&self) -> String {
        let wire = Wire {
            v: 1,
            addr: self.address.host_port(),
            fp: self
                .address
                .fingerprint
                .map(|f| f.to_string())
                .unwrap_or_default(),
            id: self.id.clone(),
            secret: self.secret.clone(),
        };
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a printed key; surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<DeployKey, KeyFormatError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyFormatError::Empty);
        }
        let body = text.strip_prefix(PREFIX).ok_or(KeyFormatError::Prefix)?;
        if text.len() > MAX_KEY_LEN {
            return Err(KeyFormatError::Damaged);
        }
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| KeyFormatError::Damaged)?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|_| KeyFormatError::Damaged)?;
        if wire.v != 1 || !valid_id(&wire.id) || wire.secret.is_empty() {
            return Err(KeyFormatError::Damaged);
        }
        let fp: Fingerprint = wire.fp.parse().map_err(|_| KeyFormatError::Address)?;
        let mut address: ClusterAddress = wire.addr.parse().map_err(|_| KeyFormatError::Address)?;
        if address.fingerprint.is_some() {
            return Err(KeyFormatError::Address);
        }
        address.fingerprint = Some(fp);
        Ok(DeployKey {
            address,
            id: wire.id,
            secret: wire.secret,
        })
    }
}

/// SHA-256 of a secret, as stored (hex).
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored` (hex), compared in constant time.
pub fn secret_matches(stored: &str, secret: &str) -> bool {
    let Ok(stored) = hex::decode(stored) else {
        return false;
    };
    let presented = Sha256::digest(secret.as_bytes());
    aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &presented).is_ok()
}

/// A secret a rotation replaced, and until when it still works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredSecret {
    /// SHA-256 (hex).
    pub hash: String,
    /// When it stops working (the end of the overlap).
    pub valid_until: i64,
}

/// What the store keeps of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployKeyRecord {
    /// Client id.
    pub id: String,
    /// The one app it may act on.
    pub app: String,
    /// Operator's note.
    #[serde(default)]
    pub description: String,
    /// Created (unix seconds).
    pub created_at: i64,
    /// Expires (unix seconds).
    pub expires_at: i64,
    /// SHA-256 (hex) of the current secret.
    pub secret_hash: String,
    /// Secrets replaced by rotations, newest first.
    #[serde(default)]
    pub retired: Vec<RetiredSecret>,
    /// When it was revoked.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// When it last obtained a token (kept to the minute).
    #[serde(default)]
    pub last_used_at: Option<i64>,
}

/// A key's state at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

impl KeyState {
    /// Its name in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Expired => "expired",
            KeyState::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DeployKeyRecord {
    /// A new key record for `app` holding the hash of `secret`.
    pub fn new(
        id: String,
        app: String,
        description: String,
        secret: &str,
        ttl_secs: u64,
        now: i64,
    ) -> DeployKeyRecord {
        DeployKeyRecord {
            id,
            app,
            description,
            created_at: now,
            expires_at: now.saturating_add(ttl_secs as i64),
            secret_hash: secret_hash(secret),
            retired: vec![],
            revoked_at: None,
            last_used_at: None,
        }
    }

    /// Its state at `now`.
    pub fn state(&self, now: i64) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if now >= self.expires_at {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    /// Whether `secret` is accepted at `now`, and if not, why. Every
    /// stored hash is compared, so the time taken does not tell which one
    /// matched.
    pub fn authenticate(&self, secret: &str, now: i64) -> Result<(), KeyRefusal> {
        let current = secret_matches(&self.secret_hash, secret);
        let mut in_overlap = false;
        let mut rotated_out = false;
        for r in &self.retired {
            if secret_matches(&r.hash, secret) {
                if now < r.valid_until {
                    in_overlap = true;
                } else {
                    rotated_out = true;
                }
            }
        }
        if !current && !in_overlap && !rotated_out {
            return Err(KeyRefusal::Unknown);
        }
        match self.state(now) {
            KeyState::Revoked => Err(KeyRefusal::Revoked),
            KeyState::Expired => Err(KeyRefusal::Expired),
            KeyState::Active if current || in_overlap => Ok(()),
            KeyState::Active => Err(KeyRefusal::RotatedOut),
        }
    }

    /// The record after a rotation at `now` to `new_secret`: the old
    /// secret works `overlap_secs` more (at most until the key expires).
    pub fn rotated(
        &self,
        new_secret: &str,
        overlap_secs: u64,
        now: i64,
    ) -> Result<DeployKeyRecord, KeyPolicyError> {
        let state = self.state(now);
        if state != KeyState::Active {
            return Err(KeyPolicyError::NotActive(self.id.clone(), state));
        }
        let mut next = self.clone();
        next.retired.insert(
            0,
            RetiredSecret {
                hash: self.secret_hash.clone(),
                valid_until: now.saturating_add(overlap_secs as i64),
            },
        );
        next.retired.truncate(MAX_RETIRED_SECRETS);
        next.secret_hash = secret_hash(new_secret);
        Ok(next)
    }

    /// Whether a use at `now` should be written down (once a minute).
    pub fn use_is_news(&self, now: i64) -> bool {
        self.last_used_at.is_none_or(|t| now - t >= 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> ClusterAddress {
        format!("cluster.test:8443;sha1:{}", "ab".repeat(20))
            .parse()
            .unwrap()
    }

    #[test]
    fn a_printed_key_round_trips_and_damage_is_named() {
        let key = DeployKey::new(address(), "0123456789ab".into(), [7; 32]).unwrap();
        let text = key.encode();
        assert!(text.starts_with("miren_key_"));
        assert!(!text.contains(';'), "one shell-safe string: {text}");
        let back = DeployKey::parse(&format!(" {text}\n")).unwrap();
        assert_eq!(back, key);
        assert_eq!(back.address.to_string(), address().to_string());
        assert!(!format!("{back:?}").contains(&key.secret));
        assert_eq!(DeployKey::parse(""), Err(KeyFormatError::Empty));
        assert_eq!(DeployKey::parse("mren_abc"), Err(KeyFormatError::Prefix));
        assert_eq!(
            DeployKey::parse(&text[..text.len() - 4]),
            Err(KeyFormatError::Damaged)
        );
        let no_pin: ClusterAddress = "cluster.test:8443".parse().unwrap();
        assert!(DeployKey::new(no_pin, "0123456789ab".into(), [7; 32]).is_none());
    }

    #[test]
    fn expiry_revocation_and_rotation_are_told_to_the_holder_only() {
        let now = 1_000_000;
        let key = DeployKeyRecord::new(
            "0123456789ab".into(),
            "web".into(),
            String::new(),
            "s1",
            3600,
            now,
        );
        assert_eq!(key.authenticate("s1", now), Ok(()));
        assert_eq!(key.authenticate("nope", now), Err(KeyRefusal::Unknown));
        assert_eq!(key.authenticate("s1", now + 3600), Err(KeyRefusal::Expired));
        assert_eq!(
            key.authenticate("nope", now + 3600),
            Err(KeyRefusal::Unknown)
        );

        let rotated = key.rotated("s2", 600, now + 10).unwrap();
        assert_eq!(rotated.authenticate("s2", now + 20), Ok(()));
        assert_eq!(
            rotated.authenticate("s1", now + 609),
            Ok(()),
            "in the overlap"
        );
        assert_eq!(
            rotated.authenticate("s1", now + 610),
            Err(KeyRefusal::RotatedOut)
        );
        let mut revoked = rotated.clone();
        revoked.revoked_at = Some(now + 30);
        assert_eq!(
            revoked.authenticate("s2", now + 31),
            Err(KeyRefusal::Revoked)
        );
        assert_eq!(
            revoked.authenticate("s1", now + 31),
            Err(KeyRefusal::Revoked)
        );
        assert!(matches!(
            revoked.rotated("s3", 0, now + 40),
            Err(KeyPolicyError::NotActive(_, KeyState::Revoked))
        ));
        let mut many = key.clone();
        for i in 0..10 {
            many = many.rotated(&format!("x{i}"), 0, now + i).unwrap();
        }
        assert_eq!(many.retired.len(), MAX_RETIRED_SECRETS);
    }

    #[test]
    fn lifetimes_and_overlaps_are_bounded() {
        assert_eq!(check_ttl(None), Ok(DEFAULT_TTL_SECS));
        assert_eq!(check_ttl(Some(MAX_TTL_SECS + 1)), Err(KeyPolicyError::Ttl));
        assert_eq!(check_ttl(Some(0)), Err(KeyPolicyError::Ttl));
        assert_eq!(check_overlap(None), Ok(DEFAULT_OVERLAP_SECS));
        assert_eq!(
            check_overlap(Some(MAX_OVERLAP_SECS + 1)),
            Err(KeyPolicyError::Overlap)
        );
        assert!(check_description("nightly\nbuild").is_err());
        assert!(secret_matches(&secret_hash("a"), "a"));
        assert!(!secret_matches("zz", "a"));
    }
}
