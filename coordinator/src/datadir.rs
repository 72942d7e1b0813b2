//! The coordinator's data directory: what it holds, how it is created, and
//! how it is checked on every start.
//!
//! Layout (directory mode 0700, private keys 0600):
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the cluster CA |
//! | `server.crt`, `server.key`, `server.names` | the coordinator's TLS certificate and the names it was issued for |
//! | `admin.crt`, `admin.key` | the admin client identity written into client configs |
//! | `keys/` | signing keys, see [`crate::keyring`] |
//! | `store.redb` | the store |
//! | `cluster.json` | cluster id and name; written last, so its presence means "initialised" |
//!
//! Every file is written to a temporary name, synced and renamed, so a crash
//! leaves either the old or the new file. A directory with material but no
//! `cluster.json` is half-written and is refused, never silently regenerated.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use transport::files;
use transport::pki::{self, CertifiedPem, ClusterCa};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data dir file {path} is corrupt: {reason} (restore it from a backup, or move the data dir aside to create a new cluster)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("data dir file {path} is missing although {marker} says the cluster was initialised (restore it from a backup, or move the data dir aside)")]
    Missing { path: PathBuf, marker: PathBuf },
    #[error("data dir {dir} is half-written: it holds {found} but no cluster.json (an earlier first start was interrupted?); move the data dir aside and start again")]
    HalfWritten { dir: PathBuf, found: String },
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not create cluster material: {0}")]
    Pki(#[from] pki::PkiError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub id: String,
    pub name: String,
    pub created_unix: i64,
}

/// Everything the coordinator loads from its data dir.
pub struct Material {
    pub dir: PathBuf,
    pub meta: ClusterMeta,
    pub ca: ClusterCa,
    pub server: CertifiedPem,
    pub admin: CertifiedPem,
}

/// Files whose presence without `cluster.json` means an interrupted init.
const MATERIAL: &[&str] = &[
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "admin.crt",
    "admin.key",
    "store.redb",
    "keys",
];

/// Creates `dir` (0700) if needed.
pub fn ensure_private_dir(dir: &Path) -> Result<(), DataDirError> {
    files::ensure_private_dir(dir).map_err(io_err(dir))
}

/// Writes `bytes` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DataDirError> {
    files::write_atomic(path, bytes, mode).map_err(io_err(path))
}

fn read_text(path: &Path, marker: &Path) -> Result<String, DataDirError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| DataDirError::Corrupt {
            path: path.to_path_buf(),
            reason: "not UTF-8 text".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataDirError::Missing {
            path: path.to_path_buf(),
            marker: marker.to_path_buf(),
        }),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Opens an initialised data dir, or initialises an empty one.
///
/// `server_names` are the SANs the server certificate must carry; when they
/// differ from the ones it was issued for, a new one is issued by the same CA
/// (the cluster fingerprint does not change).
pub fn open_or_init(
    dir: &Path,
    cluster_name: &str,
    server_names: &[String],
) -> Result<Material, DataDirError> {
    ensure_private_dir(dir)?;
    let marker = dir.join("cluster.json");
    if !marker.exists() {
        let found: Vec<&str> = MATERIAL
            .iter()
            .copied()
            .filter(|f| dir.join(f).exists())
            .collect();
        if !found.is_empty() {
            return Err(DataDirError::HalfWritten {
                dir: dir.to_path_buf(),
                found: found.join(", "),
            });
        }
        init(dir, cluster_name)?;
    }
    load(dir, server_names)
}

fn init(dir: &Path, cluster_name: &str) -> Result<(), DataDirError> {
    let ca = ClusterCa::generate(cluster_name)?;
    write_atomic(&dir.join("ca.key"), ca.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("ca.crt"), ca.cert_pem.as_bytes(), 0o644)?;
    let loaded = ClusterCa::load(&ca.cert_pem, &ca.key_pem)?;
    let admin = loaded.issue_client("admin-operator", time::Duration::days(3650))?;
    write_atomic(&dir.join("admin.key"), admin.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("admin.crt"), admin.cert_pem.as_bytes(), 0o644)?;
    crate::keyring::KeyRing::init(&dir.join("keys"), now_unix()).map_err(|e| {
        DataDirError::Corrupt {
            path: dir.join("keys"),
            reason: e.to_string(),
        }
    })?;
    let meta = ClusterMeta {
        id: uuid::Uuid::new_v4().to_string(),
        name: cluster_name.to_string(),
        created_unix: now_unix(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| DataDirError::Corrupt {
        path: dir.join("cluster.json"),
        reason: e.to_string(),
    })?;
    write_atomic(&dir.join("cluster.json"), &json, 0o644)
}

fn load(dir: &Path, server_names: &[String]) -> Result<Material, DataDirError> {
    let marker = dir.join("cluster.json");
    let corrupt = |path: &Path, reason: String| DataDirError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let meta_text = read_text(&marker, &marker)?;
    let meta: ClusterMeta =
        serde_json::from_str(&meta_text).map_err(|e| corrupt(&marker, e.to_string()))?;

    let ca_crt = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let ca_cert_pem = read_text(&ca_crt, &marker)?;
    let ca_key_pem = read_text(&ca_key, &marker)?;
    pki::cert_der_from_pem(&ca_cert_pem).map_err(|e| corrupt(&ca_crt, e.to_string()))?;
    pki::key_der_from_pem(&ca_key_pem).map_err(|e| corrupt(&ca_key, e.to_string()))?;
    let ca =
        ClusterCa::load(&ca_cert_pem, &ca_key_pem).map_err(|e| corrupt(&ca_key, e.to_string()))?;

    let admin = CertifiedPem {
        cert_pem: read_text(&dir.join("admin.crt"), &marker)?,
        key_pem: read_text(&dir.join("admin.key"), &marker)?,
    };
    pki::cert_der_from_pem(&admin.cert_pem)
        .map_err(|e| corrupt(&dir.join("admin.crt"), e.to_string()))?;
    pki::key_der_from_pem(&admin.key_pem)
        .map_err(|e| corrupt(&dir.join("admin.key"), e.to_string()))?;

    let server = server_certificate(dir, &ca, server_names)?;
    Ok(Material {
        dir: dir.to_path_buf(),
        meta,
        ca,
        server,
        admin,
    })
}

/// Loads the server certificate, re-issuing it when the requested names
/// changed or it is missing.
fn server_certificate(
    dir: &Path,
    ca: &ClusterCa,
    names: &[String],
) -> Result<CertifiedPem, DataDirError> {
    let names_path = dir.join("server.names");
    let crt = dir.join("server.crt");
    let key = dir.join("server.key");
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_path).ok();
    if current.as_deref() == Some(wanted.as_str()) && crt.exists() && key.exists() {
        let marker = dir.join("cluster.json");
        let pem = CertifiedPem {
            cert_pem: read_text(&crt, &marker)?,
            key_pem: read_text(&key, &marker)?,
        };
        pki::cert_der_from_pem(&pem.cert_pem).map_err(|e| DataDirError::Corrupt {
            path: crt.clone(),
            reason: e.to_string(),
        })?;
        pki::key_der_from_pem(&pem.key_pem).map_err(|e| DataDirError::Corrupt {
            path: key.clone(),
            reason: e.to_string(),
        })?;
        return Ok(pem);
    }
    let issued = ca.issue_server(names)?;
    write_atomic(&key, issued.key_pem.as_bytes(), 0o600)?;
    write_atomic(&crt, issued.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&names_path, wanted.as_bytes(), 0o644)?;
    Ok(issued)
}

/// Seconds since the Unix epoch, from the system clock.
pub use transport::clock::now_unix;
