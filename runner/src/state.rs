//! What a runner keeps in its data dir (0700):
//!
//! - `runner.json`: runner id, cluster address (with the CA fingerprint), name;
//! - `identity.pem`: its certificate followed by its private key (0600),
//!   one file so that a renewal replaces both atomically;
//! - `ca.crt`: the cluster CA as received at join;
//! - `coordinators.json`: the coordinators the runner last knew (it holds
//!   a session with each; see [`crate::known_coordinators`]), written
//!   atomically whenever that set changes; absent until it first does,
//!   when the join code's list is used.

use std::path::{Path, PathBuf};

use identity::address::HostPort;
use identity::ClusterAddress;
use serde::{Deserialize, Serialize};
use transport::files;
use transport::pki;
use transport::tls::ClientIdentity;

/// Why the data dir could not be read or written; every message names
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read, written or made.
    #[error(transparent)]
    Io(#[from] files::PathError),
    /// `runner.json` is not what this runner writes.
    #[error("{} is corrupt: {source}", path.display())]
    CorruptConfig {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// `runner.json` names no valid cluster address.
    #[error("cluster address in {}: {source}", path.display())]
    Address {
        /// The file.
        path: PathBuf,
        /// What is wrong with the address.
        #[source]
        source: identity::AddressError,
    },
    /// `identity.pem` is not a certificate followed by its key.
    #[error("{} is corrupt: {source}", path.display())]
    CorruptIdentity {
        /// The file.
        path: PathBuf,
        /// What is missing or broken.
        #[source]
        source: IdentityPemError,
    },
    /// `coordinators.json` is not what this runner writes.
    #[error("{} is corrupt: {reason} (delete it: the runner starts again from the coordinators of its join code)", path.display())]
    CorruptCoordinators {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `runner.json` could not be encoded.
    #[error("encoding runner.json: {0}")]
    Encode(#[source] serde_json::Error),
    /// The certificate or key held could not be used.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// What is wrong with the contents of `identity.pem`.
#[derive(Debug, thiserror::Error)]
pub enum IdentityPemError {
    /// No `PRIVATE KEY` block follows the certificate.
    #[error("no private key")]
    NoPrivateKey,
    /// The certificate or the key does not parse.
    #[error(transparent)]
    Pem(#[from] pki::PkiError),
}

/// `runner.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunnerConfig {
    pub runner_id: String,
    /// `host:port;sha1:<fingerprint>`.
    pub cluster: String,
    pub name: String,
}

/// `coordinators.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct CoordinatorsFile {
    /// `host:port` of each coordinator, in the order learned.
    coordinators: Vec<String>,
}

/// A runner's data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub dir: PathBuf,
}

/// A loaded runner identity.
pub struct Identity {
    pub config: RunnerConfig,
    pub address: ClusterAddress,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    /// The certificate and key to present over mTLS.
    pub fn client_identity(&self) -> Result<ClientIdentity, StateError> {
        Ok(ClientIdentity {
            chain: vec![pki::cert_der_from_pem(&self.cert_pem)?],
            key: pki::key_der_from_pem(&self.key_pem)?,
        })
    }

    /// `notAfter` of the certificate.
    pub fn expires_unix(&self) -> Result<i64, StateError> {
        Ok(pki::not_after_unix(&self.cert_pem)?)
    }
}

impl DataDir {
    pub fn new(dir: &Path) -> Self {
        DataDir {
            dir: dir.to_path_buf(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("runner.json")
    }

    fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.pem")
    }

    fn coordinators_path(&self) -> PathBuf {
        self.dir.join("coordinators.json")
    }

    /// The coordinators saved by [`DataDir::save_coordinators`], or `None`
    /// when none were saved yet.
    pub fn load_coordinators(&self) -> Result<Option<Vec<HostPort>>, StateError> {
        let path = self.coordinators_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(files::PathError::at("reading", &path)(e).into()),
        };
        let corrupt = |reason: String| StateError::CorruptCoordinators {
            path: path.clone(),
            reason,
        };
        let file: CoordinatorsFile =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if file.coordinators.is_empty() {
            return Err(corrupt("it lists no coordinator".into()));
        }
        let mut out = Vec::new();
        for one in &file.coordinators {
            let (host, port) = identity::address::split_host_port(one)
                .map_err(|e| corrupt(format!("{one:?}: {e}")))?;
            out.push(HostPort { host, port });
        }
        Ok(Some(out))
    }

    /// Saves the coordinators this runner knows, atomically.
    pub fn save_coordinators(&self, endpoints: &[HostPort]) -> Result<(), StateError> {
        let file = CoordinatorsFile {
            coordinators: endpoints.iter().map(HostPort::to_string).collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(StateError::Encode)?;
        let path = self.coordinators_path();
        files::write_atomic(&path, &json, 0o600).map_err(files::PathError::at("writing", &path))?;
        Ok(())
    }

    /// Whether this runner has joined a cluster.
    pub fn has_joined(&self) -> bool {
        self.config_path().exists()
    }

    /// Loads the identity; every failure names the file.
    pub fn load(&self) -> Result<Identity, StateError> {
        let cfg_path = self.config_path();
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(files::PathError::at("reading", &cfg_path))?;
        let config: RunnerConfig =
            serde_json::from_str(&text).map_err(|source| StateError::CorruptConfig {
                path: cfg_path.clone(),
                source,
            })?;
        let address: ClusterAddress =
            config
                .cluster
                .parse()
                .map_err(|source| StateError::Address {
                    path: cfg_path.clone(),
                    source,
                })?;
        let id_path = self.identity_path();
        let pem =
            std::fs::read_to_string(&id_path).map_err(files::PathError::at("reading", &id_path))?;
        let (cert_pem, key_pem) =
            split_identity(&pem).map_err(|source| StateError::CorruptIdentity {
                path: id_path.clone(),
                source,
            })?;
        Ok(Identity {
            config,
            address,
            cert_pem,
            key_pem,
        })
    }

    /// Saves a new identity (first join): identity file, CA, then
    /// `runner.json` last (its presence means "joined").
    pub fn save_joined(
        &self,
        config: &RunnerConfig,
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> Result<(), StateError> {
        files::ensure_private_dir(&self.dir)
            .map_err(files::PathError::at("creating", &self.dir))?;
        self.save_identity(cert_pem, key_pem)?;
        let ca = self.dir.join("ca.crt");
        files::write_atomic(&ca, ca_pem.as_bytes(), 0o644)
            .map_err(files::PathError::at("writing", &ca))?;
        let json = serde_json::to_vec_pretty(config).map_err(StateError::Encode)?;
        let cfg_path = self.config_path();
        files::write_atomic(&cfg_path, &json, 0o600)
            .map_err(files::PathError::at("writing", &cfg_path))?;
        Ok(())
    }

    /// Replaces the certificate and key together.
    pub fn save_identity(&self, cert_pem: &str, key_pem: &str) -> Result<(), StateError> {
        let both = format!("{}\n{}", cert_pem.trim_end(), key_pem);
        let path = self.identity_path();
        files::write_atomic(&path, both.as_bytes(), 0o600)
            .map_err(files::PathError::at("writing", &path))?;
        Ok(())
    }
}

fn split_identity(pem: &str) -> Result<(String, String), IdentityPemError> {
    let marker = "-----BEGIN PRIVATE KEY-----";
    let at = pem.find(marker).ok_or(IdentityPemError::NoPrivateKey)?;
    let (cert, key) = pem.split_at(at);
    pki::cert_der_from_pem(cert)?;
    pki::key_der_from_pem(key)?;
    Ok((cert.trim_end().to_string() + "\n", key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_corruption_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(&dir.path().join("r"));
        let ca = pki::ClusterCa::generate("t").unwrap();
        let loaded = pki::ClusterCa::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let client = loaded.issue_client("runner-x", time_days(1)).unwrap();
        let cfg = RunnerConfig {
            runner_id: "x".into(),
            cluster: format!("h:1;sha1:{}", loaded.fingerprint()),
            name: "n".into(),
        };
        d.save_joined(&cfg, &client.cert_pem, &client.key_pem, &ca.cert_pem)
            .unwrap();
        let id = d.load().unwrap();
        assert_eq!(id.config, cfg);
        assert_eq!(id.key_pem, client.key_pem);
        std::fs::write(d.dir.join("identity.pem"), "garbage").unwrap();
        let err = format!("{:#}", d.load().err().unwrap());
        assert!(err.contains("identity.pem"), "{err}");
    }

    #[test]
    fn the_known_coordinators_round_trip_and_a_corrupt_list_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        assert!(d.load_coordinators().unwrap().is_none());
        let list = vec![
            HostPort {
                host: "a.example".into(),
                port: 8443,
            },
            HostPort {
                host: "::1".into(),
                port: 9,
            },
        ];
        d.save_coordinators(&list).unwrap();
        assert_eq!(d.load_coordinators().unwrap(), Some(list));
        std::fs::write(d.dir.join("coordinators.json"), r#"{"coordinators":[]}"#).unwrap();
        let err = d.load_coordinators().unwrap_err().to_string();
        assert!(err.contains("coordinators.json"), "{err}");
    }

    fn time_days(n: i64) -> ::time::Duration {
        ::time::Duration::days(n)
    }
}
