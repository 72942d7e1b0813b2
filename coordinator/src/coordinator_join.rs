//! A new coordinator joining a cluster on a shared store
//! (`miren server --etcd … --join CODE`).
//!
//! In order, each step before anything is written:
//! 1. the code is parsed as a coordinator code (a runner's is refused);
//! 2. etcd is asked whose state its prefix holds (`cluster/ca-fingerprint`):
//!    another cluster's, or none, is refused before the code is spent;
//! 3. a coordinator of the code is dialed pinned to the code's CA
//!    fingerprint (no trust on first use) and `Cluster.joinCoordinator`
//!    spends the code and answers the cluster key;
//! 4. the sealed records are read from etcd and opened with that key, and
//!    the CA checked against the pin again.
//!
//! The data dir is then written in a temporary sibling directory (the
//! cluster key, `ca.crt`, its own admin identity issued from the unsealed
//! CA, `cluster.json` last) and renamed into place whole, so a failed join
//! leaves no half-written data dir. The server certificate for its
//! `--name`s is issued at its first start like any coordinator's: by itself,
//! from the CA it unsealed (the serving coordinator never sees its key).
//! Later starts find `cluster.json` and need no code.

use std::path::{Path, PathBuf};

use identity::join_token::{JoinKind, JoinRefusal, JoinToken};
use schema::miren_capnp::cluster;
use transport::close::CloseCode;
use transport::rpc::connect_connection;

use crate::cluster_secrets::{ClusterSecrets, Read, SecretsError, CLUSTER};
use crate::datadir::{self, ClusterMeta, DataDirError};
use crate::etcd_store::{EtcdOptions, EtcdStore, OWNER_KEY};
use crate::sealed::{ClusterKey, ClusterKeyError};
use crate::shared_cluster::SharedError;
use crate::store::{Store, StoreError};

/// Why a coordinator could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Code(#[from] JoinRefusal),
    #[error("etcd: {0}")]
    Store(#[from] StoreError),
    #[error("the etcd prefix {prefix:?} holds no cluster: check --etcd and --etcd-prefix against the first coordinator's")]
    NoCluster { prefix: String },
    #[error("the etcd prefix {prefix:?} holds the cluster whose CA is {owner}, but the code is for the cluster whose CA is {code}: use that cluster's --etcd-prefix, or a code of this one")]
    OtherCluster {
        prefix: String,
        owner: String,
        code: String,
    },
    #[error("joining through {addr}: {source}")]
    Dial {
        addr: String,
        #[source]
        source: transport::DialError,
    },
    #[error("the coordinator refused the join: {0}")]
    Refused(#[source] capnp::Error),
    #[error("the coordinator answered a cluster key of {0} bytes, not 32")]
    BadKey(usize),
    #[error("the cluster's records: {0} (the code was spent; make a new one)")]
    Secrets(#[from] SecretsError),
    #[error("the cluster's CA: {0} (the code was spent; make a new one)")]
    Shared(#[from] SharedError),
    #[error("the coordinator that answered is of cluster {answered}, but the etcd prefix holds cluster {stored}")]
    OtherClusterId { answered: String, stored: String },
    #[error("data dir {0} is not empty: a coordinator joins into an empty data dir (or one it joined before)")]
    NotEmpty(PathBuf),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Key(#[from] ClusterKeyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `--join` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The data dir was initialised already: the code was not used.
    AlreadyJoined,
    /// Joined the cluster of this name.
    Joined { cluster_name: String },
}

/// Joins the cluster of `code_text` into `data_dir`. Must run inside a
/// `LocalSet` (the RPC client is not `Send`).
pub async fn join(
    data_dir: &Path,
    code_text: &str,
    etcd: &EtcdOptions,
) -> Result<Joined, JoinError> {
    if data_dir.exists() && datadir::is_initialised(data_dir)? {
        return Ok(Joined::AlreadyJoined);
    }
    if let Ok(mut entries) = std::fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(JoinError::NotEmpty(data_dir.to_path_buf()));
        }
    }
    let code = JoinToken::parse_kind(code_text, JoinKind::Coordinator)?;
    let Some(pin) = code.address.fingerprint else {
        return Err(JoinRefusal::BadFormat.into());
    };
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(EtcdStore::connect(etcd)?);
    match store.get(OWNER_KEY)? {
        None => {
            return Err(JoinError::NoCluster {
                prefix: etcd.prefix.clone(),
            })
        }
        Some(owner) if owner != pin.to_string().as_bytes() => {
            return Err(JoinError::OtherCluster {
                prefix: etcd.prefix.clone(),
                owner: String::from_utf8_lossy(&owner).into_owned(),
                code: pin.to_string(),
            })
        }
        Some(_) => {}
    }
    let (key, cluster_id) = redeem(&code).await?;
    let secrets = ClusterSecrets::new(store, key);
    let meta: Read<ClusterMeta> = secrets.read(CLUSTER)?;
    if meta.value.id != cluster_id {
        return Err(JoinError::OtherClusterId {
            answered: cluster_id,
            stored: meta.value.id,
        });
    }
    let ca = crate::shared_cluster::load_ca(&secrets)?;
    if ca.fingerprint() != pin {
        return Err(JoinError::OtherCluster {
            prefix: etcd.prefix.clone(),
            owner: ca.fingerprint().to_string(),
            code: pin.to_string(),
        });
    }
    write_data_dir(data_dir, secrets.key(), &ca, &meta.value)?;
    Ok(Joined::Joined {
        cluster_name: meta.value.name,
    })
}

/// Dials the code's coordinators pinned to its CA and spends the code;
/// returns the cluster key and the id of the cluster that answered.
async fn redeem(code: &JoinToken) -> Result<(ClusterKey, String), JoinError> {
    let (endpoint, conn) = transport::dial(&code.address, None)
        .await
        .map_err(|source| JoinError::Dial {
            addr: code.address.hosts(),
            source,
        })?;
    let answer = async {
        let cluster: cluster::Client = connect_connection(&conn).await?;
        let mut req = cluster.join_coordinator_request();
        req.get().set_code_id(&code.id);
        req.get().set_secret(&code.secret);
        let reply = req.send().promise.await?;
        let r = reply.get()?;
        Ok::<_, capnp::Error>((
            r.get_cluster_key()?.to_vec(),
            r.get_cluster_id()?.to_string()?,
        ))
    }
    .await;
    conn.close(CloseCode::Done.into(), b"joined");
    let _ = tokio::time::timeout(std::time::Duration::from_millis(50), endpoint.wait_idle()).await;
    let (key, cluster_id) = answer.map_err(JoinError::Refused)?;
    let len = key.len();
    let key: [u8; 32] = key.try_into().map_err(|_| JoinError::BadKey(len))?;
    Ok((ClusterKey::from_bytes(key), cluster_id))
}

/// Writes the joined data dir whole: in a temporary sibling, renamed into
/// place (over an empty dir, if there is one); nothing is left on failure.
fn write_data_dir(
    data_dir: &Path,
    key: &ClusterKey,
    ca: &transport::pki::ClusterCa,
    meta: &ClusterMeta,
) -> Result<(), JoinError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JoinError::Io { path, source }
    };
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "miren".into());
    let tmp = parent.join(format!(".{name}.join-{}", uuid::Uuid::new_v4().simple()));
    let written = (|| -> Result<(), JoinError> {
        datadir::ensure_private_dir(&tmp)?;
        key.write(&tmp)?;
        datadir::write_atomic(&tmp.join("ca.crt"), ca.cert_pem().as_bytes(), 0o644)?;
        datadir::write_admin(&tmp, ca)?;
        datadir::write_meta(&tmp, meta)?;
        match std::fs::rename(&tmp, data_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                Err(JoinError::NotEmpty(data_dir.to_path_buf()))
            }
            Err(e) => Err(io(data_dir)(e)),
        }
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_appears_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let ca = transport::pki::ClusterCa::generate("t").unwrap();
        let ca = transport::pki::ClusterCa::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let meta = ClusterMeta {
            id: "id".into(),
            name: "n".into(),
            created_unix: 1,
        };
        let key = ClusterKey::generate().unwrap();
        // Into an empty dir that exists.
        let dir = d.path().join("joined");
        std::fs::create_dir(&dir).unwrap();
        write_data_dir(&dir, &key, &ca, &meta).unwrap();
        assert!(datadir::is_initialised(&dir).unwrap());
        assert!(dir.join("cluster.key").exists() && dir.join("admin.key").exists());
        assert!(!dir.join("ca.key").exists(), "the CA key stays sealed");
        // Into a dir that holds something: refused, nothing left behind.
        let busy = d.path().join("busy");
        std::fs::create_dir(&busy).unwrap();
        std::fs::write(busy.join("other"), b"x").unwrap();
        assert!(matches!(
            write_data_dir(&busy, &key, &ca, &meta),
            Err(JoinError::NotEmpty(_))
        ));
        let left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.iter().all(|n| !n.contains(".join-")),
            "no temporary dir left: {left:?}"
        );
    }
}
