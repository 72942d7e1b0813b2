//! Sealing the cluster's shared secrets for the store: AES-256-GCM under
//! the 32-byte cluster key every coordinator keeps in its data dir
//! (`cluster.key`, 0600).
//!
//! With `--etcd` the CA, the signing keys, the route OIDC cookie key and the
//! cluster's identity live in etcd (`crate::cluster_secrets`), where anyone
//! who can read etcd (its operators, its backups) could read them in the
//! clear. Sealed, they are worth nothing without the cluster key, which
//! never goes into the store. Each seal draws a fresh random 96-bit nonce;
//! the record's name is the associated data, so a sealed value moved to
//! another record's key (the CA put where the cookie key should be, say)
//! does not open.
//!
//! Layout of a sealed value: one version byte, the nonce, the ciphertext
//! with its tag.

use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// The data dir file holding the cluster key.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
/// The format version of a sealed value.
const VERSION: u8 = 1;
/// AES-GCM's tag.
const TAG_LEN: usize = 16;
/// Associated data: what the seal is and which record it belongs to.
const AAD_PREFIX: &str = "miren-sealed-v1|";

/// Why a sealed value does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than a version byte, a nonce and a tag.
    #[error("sealed value of {0} bytes is too short")]
    TooShort(usize),
    /// Not a format this build knows.
    #[error("sealed value has version {0}, not {VERSION}")]
    UnknownVersion(u8),
    /// The tag does not match: another cluster key, a value altered, or a
    /// value sealed for another record (the three are not told apart).
    #[error("does not open with this cluster key (another cluster's key, an altered value, or another record's value)")]
    Refused,
}

/// Why the cluster key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {len} bytes, not a 32-byte cluster key (restore it from a backup)")]
    Length {
        path: std::path::PathBuf,
        len: usize,
    },
    /// The system's random source or AES-GCM failed.
    #[error("the AES-256-GCM provider failed (random bytes or sealing)")]
    Crypto,
}

/// The key the shared records are sealed under.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> Result<ClusterKey, ClusterKeyError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| ClusterKeyError::Crypto)?;
        Ok(ClusterKey(bytes))
    }

    /// A key received whole (by a joining coordinator).
    pub fn from_bytes(bytes: [u8; 32]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// The raw key, to hand to a joining coordinator over the pinned
    /// connection.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads `cluster.key` from `dir`; `None` when there is none.
    pub fn read(dir: &Path) -> Result<Option<ClusterKey>, ClusterKeyError> {
        let path = dir.join(CLUSTER_KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let len = bytes.len();
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| ClusterKeyError::Length { path, len })?;
                Ok(Some(ClusterKey(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ClusterKeyError::Io { path, source }),
        }
    }

    /// Writes `cluster.key` into `dir` (0600, atomically).
    pub fn write(&self, dir: &Path) -> Result<(), ClusterKeyError> {
        let path = dir.join(CLUSTER_KEY_FILE);
        transport::files::write_atomic(&path, &self.0, 0o600)
            .map_err(|source| ClusterKeyError::Io { path, source })
    }

    fn aead(&self) -> Option<LessSafeKey> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .ok()
            .map(LessSafeKey::new)
    }

    /// `plain` sealed for the record `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, ClusterKeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| ClusterKeyError::Crypto)?;
        let mut buf = plain.to_vec();
        self.aead()
            .ok_or(ClusterKeyError::Crypto)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(name).as_bytes()),
                &mut buf,
            )
            .map_err(|_| ClusterKeyError::Crypto)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// What [`ClusterKey::seal`] sealed for `name`, if `sealed` is exactly
    /// that under this key.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
            return Err(OpenError::TooShort(sealed.len()));
        }
        if sealed[0] != VERSION {
            return Err(OpenError::UnknownVersion(sealed[0]));
        }
        let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Refused)?;
        let mut buf = ct.to_vec();
        let plain = self
            .aead()
            .ok_or(OpenError::Refused)?
            .open_in_place(nonce, Aad::from(aad(name).as_bytes()), &mut buf)
            .map_err(|_| OpenError::Refused)?;
        Ok(plain.to_vec())
    }
}

fn aad(name: &str) -> String {
    format!("{AAD_PREFIX}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_with_its_key_and_name_only() {
        let key = ClusterKey::generate().unwrap();
        let sealed = key.seal("secret/ca", b"the CA key").unwrap();
        assert!(!sealed
            .windows(b"the CA key".len())
            .any(|w| w == b"the CA key"));
        assert_eq!(key.open("secret/ca", &sealed).unwrap(), b"the CA key");
        // Another record's name: swapped records do not open.
        assert_eq!(
            key.open("secret/route-oidc-key", &sealed),
            Err(OpenError::Refused)
        );
        // Another key.
        let other = ClusterKey::generate().unwrap();
        assert_eq!(other.open("secret/ca", &sealed), Err(OpenError::Refused));
    }

    #[test]
    fn a_tampered_or_truncated_value_is_refused() {
        let key = ClusterKey::generate().unwrap();
        let sealed = key.seal("n", b"plain").unwrap();
        for i in 1..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(key.open("n", &t), Err(OpenError::Refused), "byte {i}");
        }
        let mut v = sealed.clone();
        v[0] = 2;
        assert_eq!(key.open("n", &v), Err(OpenError::UnknownVersion(2)));
        assert_eq!(key.open("n", &sealed[..28]), Err(OpenError::TooShort(28)));
        assert_eq!(
            key.open("n", &sealed[..sealed.len() - 1]),
            Err(OpenError::Refused)
        );
    }

    #[test]
    fn each_seal_has_its_own_nonce() {
        let key = ClusterKey::generate().unwrap();
        let a = key.seal("n", b"same").unwrap();
        let b = key.seal("n", b"same").unwrap();
        assert_ne!(a[1..1 + NONCE_LEN], b[1..1 + NONCE_LEN]);
    }

    #[test]
    fn the_key_file_round_trips_and_a_short_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(ClusterKey::read(d.path()).unwrap().is_none());
        let key = ClusterKey::generate().unwrap();
        key.write(d.path()).unwrap();
        let back = ClusterKey::read(d.path()).unwrap().unwrap();
        assert_eq!(back.bytes(), key.bytes());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(CLUSTER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(d.path().join(CLUSTER_KEY_FILE), b"short").unwrap();
        assert!(matches!(
            ClusterKey::read(d.path()),
            Err(ClusterKeyError::Length { len: 5, .. })
        ));
    }
}
