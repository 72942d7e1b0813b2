//! The coordinator's data directory: what it holds, how it is created, and
//! how it is checked on every start.
//!
//! The layout (every file, and which module writes it) is in one place:
//! "Data dir layout" in ARCHITECTURE.md. This module writes the cluster's
//! identity: `cluster.json`, the CA, the server certificate and the admin
//! identity, and creates the key ring (`crate::keyring`) at first start.
//!
//! With `--etcd` the CA key, the key ring and the cookie key leave the
//! data dir for the store (`crate::shared_cluster`): [`init_if_new`] still
//! creates everything at a cluster's first start, and [`load_with_ca`]
//! opens the dir with the CA that came from the store.
//!
//! Every file is written to a temporary name, synced and renamed, so a crash
//! leaves either the old or the new file. A directory with material but no
//! `cluster.json` is half-written and is refused, never silently regenerated.
//!
//! The server certificate is the one thing the coordinator issues again by
//! itself, because nothing pins it (clients pin the CA): when the `--name`s
//! change, when a third of its lifetime is left (at start here, and while
//! running from [`crate::server`] through [`renew_server_certificate`]), and
//! when `server.key` does not match `server.crt`. The key is written before
//! the certificate, so a crash between the two leaves exactly that mismatch,
//! and the next start issues a fresh pair with the same CA (logged). A file
//! that does not parse is still refused like any other.

use std::fs;
use std::path::{Path, PathBuf};

use identity::renewal::{self, Renewal};
use serde::{Deserialize, Serialize};
use transport::files;
use transport::pki::{self, CertifiedPem, ClusterCa};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data dir file {path} is corrupt: {reason} (restore it from a backup, or move the data dir aside to create a new cluster)")]
    Corrupt {
        path: PathBuf,
        #[source]
        reason: CorruptFile,
    },
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

/// What is wrong with a file of the data dir.
#[derive(Debug, thiserror::Error)]
pub enum CorruptFile {
    #[error("not UTF-8 text")]
    NotUtf8,
    /// Not JSON of its shape (or, writing, not encodable).
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// A certificate or key that does not parse or load.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// A server key and certificate that rustls refuses together.
    #[error(transparent)]
    Tls(#[from] transport::tls::TlsConfigError),
    /// The signing keys could not be created.
    #[error(transparent)]
    KeyRing(#[from] crate::keyring::KeyRingError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lifetime of an admin certificate unless asked for less: the operator's
/// root credential (never past the CA's end, which is as long).
pub const ADMIN_CERT_LIFETIME: time::Duration = time::Duration::days(3650);

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
    /// What happened to the server certificate while opening.
    pub server_change: ServerCertChange,
    pub admin: CertifiedPem,
}

/// What opening the data dir did to the server certificate (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCertChange {
    /// Kept as it was.
    Kept,
    /// Kept although it is due: the CA ends first, so a new one would not
    /// last longer.
    KeptCaEnds { ca_not_after: i64 },
    /// Issued because there was none or the `--name`s changed.
    Issued,
    /// Issued because `server.key` did not match `server.crt`: an earlier
    /// renewal stopped between writing the two.
    Repaired,
    /// Renewed: at most a third of its lifetime was left.
    Renewed { old_not_after: i64, expired: bool },
}

/// How the coordinator issues and renews its server certificate.
#[derive(Debug, Clone)]
pub struct ServerCertPolicy {
    /// Names (DNS or IP) the certificate carries.
    pub names: Vec<String>,
    /// Lifetime of a new certificate; renewed with a third of it left.
    pub lifetime: time::Duration,
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
    crate::sealed::CLUSTER_KEY_FILE,
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
            reason: CorruptFile::NotUtf8,
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
/// `server.names` are the SANs the server certificate must carry; when they
/// differ from the ones it was issued for, or it is due for renewal at
/// `now`, a new one is issued by the same CA (the cluster fingerprint does
/// not change).
pub fn open_or_init(
    dir: &Path,
    cluster_name: &str,
    server: &ServerCertPolicy,
    now: i64,
) -> Result<Material, DataDirError> {
    init_if_new(dir, cluster_name)?;
    load(dir, server, now)
}

/// Whether `dir` is initialised (its `cluster.json` is there); a dir with
/// material but no `cluster.json` is refused as half-written.
pub fn is_initialised(dir: &Path) -> Result<bool, DataDirError> {
    if dir.join("cluster.json").exists() {
        return Ok(true);
    }
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
    Ok(false)
}

/// Creates the cluster's material in `dir` unless it is initialised
/// already; returns whether it did.
pub fn init_if_new(dir: &Path, cluster_name: &str) -> Result<bool, DataDirError> {
    ensure_private_dir(dir)?;
    if is_initialised(dir)? {
        return Ok(false);
    }
    init(dir, cluster_name)?;
    Ok(true)
}

/// `cluster.json` of an initialised dir.
pub fn read_meta(dir: &Path) -> Result<ClusterMeta, DataDirError> {
    let marker = dir.join("cluster.json");
    let text = read_text(&marker, &marker)?;
    serde_json::from_str(&text).map_err(|e| DataDirError::Corrupt {
        path: marker,
        reason: CorruptFile::Json(e),
    })
}

/// Writes `cluster.json` (the mark of an initialised dir: written last).
pub fn write_meta(dir: &Path, meta: &ClusterMeta) -> Result<(), DataDirError> {
    let json = serde_json::to_vec_pretty(meta).map_err(|e| DataDirError::Corrupt {
        path: dir.join("cluster.json"),
        reason: CorruptFile::Json(e),
    })?;
    write_atomic(&dir.join("cluster.json"), &json, 0o644)
}

/// `ca.crt` of an initialised dir (checked to parse).
pub fn read_ca_cert(dir: &Path) -> Result<String, DataDirError> {
    let path = dir.join("ca.crt");
    let pem = read_text(&path, &dir.join("cluster.json"))?;
    pki::cert_der_from_pem(&pem).map_err(|e| DataDirError::Corrupt {
        path: path.clone(),
        reason: e.into(),
    })?;
    Ok(pem)
}

/// `ca.key` of an initialised dir (checked to parse), for publishing it
/// to a shared store.
pub fn read_ca_key(dir: &Path) -> Result<String, DataDirError> {
    let path = dir.join("ca.key");
    let pem = read_text(&path, &dir.join("cluster.json"))?;
    pki::key_der_from_pem(&pem).map_err(|e| DataDirError::Corrupt {
        path: path.clone(),
        reason: e.into(),
    })?;
    Ok(pem)
}

/// Issues an admin identity from `ca` into `dir` (a joining coordinator's
/// own: any admin certificate of the CA is the cluster's admin).
pub fn write_admin(dir: &Path, ca: &ClusterCa) -> Result<(), DataDirError> {
    let admin = ca.issue_client("admin-operator", ADMIN_CERT_LIFETIME)?;
    write_atomic(&dir.join("admin.key"), admin.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("admin.crt"), admin.cert_pem.as_bytes(), 0o644)
}

/// Opens an initialised dir whose CA comes from elsewhere (the shared
/// store, `--etcd`): the admin identity and the server certificate, issued
/// or renewed by `ca` as [`open_or_init`] does.
pub fn load_with_ca(
    dir: &Path,
    meta: ClusterMeta,
    ca: ClusterCa,
    policy: &ServerCertPolicy,
    now: i64,
) -> Result<Material, DataDirError> {
    let marker = dir.join("cluster.json");
    let corrupt = |path: &Path, reason: CorruptFile| DataDirError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let admin = CertifiedPem {
        cert_pem: read_text(&dir.join("admin.crt"), &marker)?,
        key_pem: read_text(&dir.join("admin.key"), &marker)?,
    };
    pki::cert_der_from_pem(&admin.cert_pem)
        .map_err(|e| corrupt(&dir.join("admin.crt"), e.into()))?;
    pki::key_der_from_pem(&admin.key_pem).map_err(|e| corrupt(&dir.join("admin.key"), e.into()))?;
    let (server, server_change) = server_certificate(dir, &ca, policy, now)?;
    Ok(Material {
        dir: dir.to_path_buf(),
        meta,
        ca,
        server,
        server_change,
        admin,
    })
}

fn init(dir: &Path, cluster_name: &str) -> Result<(), DataDirError> {
    let ca = ClusterCa::generate(cluster_name)?;
    write_atomic(&dir.join("ca.key"), ca.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("ca.crt"), ca.cert_pem.as_bytes(), 0o644)?;
    let loaded = ClusterCa::load(&ca.cert_pem, &ca.key_pem)?;
    write_admin(dir, &loaded)?;
    crate::keyring::KeyRing::init(&dir.join("keys"), now_unix()).map_err(|e| {
        DataDirError::Corrupt {
            path: dir.join("keys"),
            reason: e.into(),
        }
    })?;
    let meta = ClusterMeta {
        id: uuid::Uuid::new_v4().to_string(),
        name: cluster_name.to_string(),
        created_unix: now_unix(),
    };
    write_meta(dir, &meta)
}

fn load(dir: &Path, policy: &ServerCertPolicy, now: i64) -> Result<Material, DataDirError> {
    let meta = read_meta(dir)?;
    let ca_cert_pem = read_ca_cert(dir)?;
    let ca_key_pem = read_ca_key(dir)?;
    let ca = ClusterCa::load(&ca_cert_pem, &ca_key_pem).map_err(|e| DataDirError::Corrupt {
        path: dir.join("ca.key"),
        reason: e.into(),
    })?;
    load_with_ca(dir, meta, ca, policy, now)
}

/// Loads the server certificate, issuing a new one when the requested
/// names changed, it is missing, its key does not match it, or it is due
/// for renewal at `now`.
fn server_certificate(
    dir: &Path,
    ca: &ClusterCa,
    policy: &ServerCertPolicy,
    now: i64,
) -> Result<(CertifiedPem, ServerCertChange), DataDirError> {
    let names_path = dir.join("server.names");
    let crt = dir.join("server.crt");
    let key = dir.join("server.key");
    let wanted = policy.names.join("\n");
    let current = fs::read_to_string(&names_path).ok();
    if current.as_deref() != Some(wanted.as_str()) || !crt.exists() || !key.exists() {
        let issued = renew_server_certificate(dir, ca, policy)?;
        return Ok((issued, ServerCertChange::Issued));
    }
    let marker = dir.join("cluster.json");
    let pem = CertifiedPem {
        cert_pem: read_text(&crt, &marker)?,
        key_pem: read_text(&key, &marker)?,
    };
    let corrupt = |path: &Path, reason: CorruptFile| DataDirError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let cert_der = pki::cert_der_from_pem(&pem.cert_pem).map_err(|e| corrupt(&crt, e.into()))?;
    let key_der = pki::key_der_from_pem(&pem.key_pem).map_err(|e| corrupt(&key, e.into()))?;
    match transport::tls::certified_key(vec![cert_der], key_der) {
        Ok(_) => {}
        Err(transport::tls::TlsConfigError::Rustls(rustls::Error::InconsistentKeys(_))) => {
            let issued = renew_server_certificate(dir, ca, policy)?;
            return Ok((issued, ServerCertChange::Repaired));
        }
        Err(e) => return Err(corrupt(&key, e.into())),
    }
    match server_renewal(&pem.cert_pem, ca, policy, now).map_err(|e| corrupt(&crt, e.into()))? {
        Renewal::Keep { .. } => Ok((pem, ServerCertChange::Kept)),
        Renewal::LimitedByCa { ca_not_after } => {
            Ok((pem, ServerCertChange::KeptCaEnds { ca_not_after }))
        }
        Renewal::Renew { expired, .. } => {
            let old_not_after =
                pki::not_after_unix(&pem.cert_pem).map_err(|e| corrupt(&crt, e.into()))?;
            let issued = renew_server_certificate(dir, ca, policy)?;
            Ok((
                issued,
                ServerCertChange::Renewed {
                    old_not_after,
                    expired,
                },
            ))
        }
    }
}

/// What [`identity::renewal::server_certificate`] says about `cert_pem` at
/// `now`.
pub fn server_renewal(
    cert_pem: &str,
    ca: &ClusterCa,
    policy: &ServerCertPolicy,
    now: i64,
) -> Result<Renewal, pki::PkiError> {
    Ok(renewal::server_certificate(
        pki::not_after_unix(cert_pem)?,
        now,
        policy.lifetime.whole_seconds(),
        ca.not_after_unix(),
    ))
}

/// Issues a server certificate with a fresh key and writes it: key, then
/// certificate, then the names (each atomically).
pub fn renew_server_certificate(
    dir: &Path,
    ca: &ClusterCa,
    policy: &ServerCertPolicy,
) -> Result<CertifiedPem, DataDirError> {
    let issued = ca.issue_server_for(&policy.names, policy.lifetime)?;
    write_atomic(&dir.join("server.key"), issued.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("server.crt"), issued.cert_pem.as_bytes(), 0o644)?;
    write_atomic(
        &dir.join("server.names"),
        policy.names.join("\n").as_bytes(),
        0o644,
    )?;
    Ok(issued)
}

/// Seconds since the Unix epoch, from the system clock.
pub use transport::clock::now_unix;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(lifetime: time::Duration) -> ServerCertPolicy {
        ServerCertPolicy {
            names: vec!["127.0.0.1".into(), "localhost".into()],
            lifetime,
        }
    }

    fn year() -> ServerCertPolicy {
        policy(pki::SERVER_CERT_LIFETIME)
    }

    fn not_after(dir: &Path) -> i64 {
        pki::not_after_unix(&fs::read_to_string(dir.join("server.crt")).expect("crt")).expect("end")
    }

    #[test]
    fn a_fresh_dir_issues_then_keeps_its_server_certificate() {
        let d = tempfile::tempdir().expect("tempdir");
        let m = open_or_init(d.path(), "t", &year(), now_unix()).expect("init");
        assert_eq!(m.server_change, ServerCertChange::Issued);
        let m2 = open_or_init(d.path(), "t", &year(), now_unix()).expect("open");
        assert_eq!(m2.server_change, ServerCertChange::Kept);
        assert_eq!(m.server.cert_pem, m2.server.cert_pem);
    }

    #[test]
    fn a_near_expiry_certificate_is_renewed_at_start_with_the_same_ca() {
        let d = tempfile::tempdir().expect("tempdir");
        let m = open_or_init(d.path(), "t", &year(), now_unix()).expect("init");
        let ca_before = fs::read(d.path().join("ca.crt")).expect("ca");
        // What a year-old coordinator would hold: two days left.
        let old =
            m.ca.issue_server_for(&year().names, time::Duration::days(2))
                .expect("short");
        fs::write(d.path().join("server.key"), &old.key_pem).expect("key");
        fs::write(d.path().join("server.crt"), &old.cert_pem).expect("crt");
        let old_end = not_after(d.path());

        let m = open_or_init(d.path(), "t", &year(), now_unix()).expect("open");
        assert_eq!(
            m.server_change,
            ServerCertChange::Renewed {
                old_not_after: old_end,
                expired: false
            }
        );
        assert_ne!(m.server.cert_pem, old.cert_pem);
        assert_ne!(m.server.key_pem, old.key_pem);
        assert!(not_after(d.path()) > old_end + 300 * 86_400);
        assert_eq!(fs::read(d.path().join("ca.crt")).expect("ca"), ca_before);
        assert_eq!(
            fs::read_to_string(d.path().join("server.crt")).expect("crt"),
            m.server.cert_pem
        );
    }

    #[test]
    fn the_decision_takes_now_from_the_caller() {
        let d = tempfile::tempdir().expect("tempdir");
        let m = open_or_init(d.path(), "t", &year(), now_unix()).expect("init");
        let end = not_after(d.path());
        let days = |n: i64| n * 86_400;
        assert!(matches!(
            server_renewal(&m.server.cert_pem, &m.ca, &year(), end - days(122)),
            Ok(Renewal::Keep { .. })
        ));
        assert!(matches!(
            server_renewal(&m.server.cert_pem, &m.ca, &year(), end - days(121)),
            Ok(Renewal::Renew { expired: false, .. })
        ));
        // Opened "four months before the end": renewed.
        let m = open_or_init(d.path(), "t", &year(), end - days(100)).expect("open");
        assert!(matches!(m.server_change, ServerCertChange::Renewed { .. }));
    }

    #[test]
    fn a_dir_with_only_a_cluster_key_is_half_written() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(!is_initialised(d.path()).expect("empty is new"));
        crate::sealed::ClusterKey::generate()
            .expect("key")
            .write(d.path())
            .expect("write");
        let e = init_if_new(d.path(), "t").expect_err("refused");
        assert!(matches!(e, DataDirError::HalfWritten { .. }), "{e}");
        assert!(e.to_string().contains("cluster.key"), "{e}");
        assert!(!d.path().join("ca.key").exists(), "nothing was created");
    }

    #[test]
    fn an_interrupted_renewal_is_repaired_not_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let m = open_or_init(d.path(), "t", &year(), now_unix()).expect("init");
        // The crash between the two writes: a new key beside the old cert.
        let next = m.ca.issue_server(&year().names).expect("next");
        write_atomic(&d.path().join("server.key"), next.key_pem.as_bytes(), 0o600).expect("key");
        let m2 = open_or_init(d.path(), "t", &year(), now_unix()).expect("open");
        assert_eq!(m2.server_change, ServerCertChange::Repaired);
        transport::tls::certified_key(
            vec![pki::cert_der_from_pem(&m2.server.cert_pem).expect("cert")],
            pki::key_der_from_pem(&m2.server.key_pem).expect("key"),
        )
        .expect("the pair on disk matches again");
        // A server certificate that does not parse is still refused.
        fs::write(d.path().join("server.crt"), "garbage").expect("write");
        let e = open_or_init(d.path(), "t", &year(), now_unix())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("server.crt"), "{e}");
    }
}
