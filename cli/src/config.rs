//! The client config (`clientconfig.yaml`) and how the CLI picks a cluster.
//!
//! Resolution order, first match wins:
//! 1. `-C/--cluster NAME` (a configured cluster);
//! 2. `MIREN_CLUSTER`: a configured name, or an address `host:port;sha1:fp`
//!    (an address that matches a configured cluster uses its identity;
//!    otherwise the CLI connects without one, as a CI job does);
//! 3. `active_cluster` of the config file: `MIREN_CONFIG` if set, else
//!    `~/.config/miren/clientconfig.yaml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use identity::{ClusterAddress, Fingerprint};
use serde::{Deserialize, Serialize};

/// One configured cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterEntry {
    /// `host:port`, optionally with `;sha1:<fingerprint>`.
    pub hostname: String,
    /// `sha1:<hex>` of the cluster CA, when not in `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// PEM client certificate (admin identity), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
}

impl ClusterEntry {
    /// The entry's address with its pin.
    pub fn address(&self) -> anyhow::Result<ClusterAddress> {
        let mut addr: ClusterAddress = self.hostname.parse()?;
        if let Some(fp) = &self.fingerprint {
            let fp: Fingerprint = fp.parse()?;
            match addr.fingerprint {
                Some(existing) if existing != fp => {
                    bail!(
                        "cluster entry {:?} has two different fingerprints",
                        self.hostname
                    )
                }
                _ => addr.fingerprint = Some(fp),
            }
        }
        Ok(addr)
    }

    /// The admin identity, if the entry has one.
    pub fn identity(&self) -> Option<(String, String)> {
        match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        }
    }
}

/// `clientconfig.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_cluster: Option<String>,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterEntry>,
}

/// Where the client config lives: `MIREN_CONFIG`, else the user's file.
pub fn config_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MIREN_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = dirs::config_dir()
        .ok_or_else(|| anyhow!("cannot find the user's config directory; set MIREN_CONFIG"))?;
    Ok(base.join("miren").join("clientconfig.yaml"))
}

impl ClientConfig {
    /// Loads `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml_ng::from_str(&text)
                .with_context(|| format!("client config {} is not valid YAML", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
            Err(e) => Err(e).with_context(|| format!("reading client config {}", path.display())),
        }
    }

    /// Writes `path` atomically, mode 0600 (it may hold a private key).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_yaml_ng::to_string(self)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        transport::files::write_atomic(path, text.as_bytes(), 0o600)
            .with_context(|| format!("writing client config {}", path.display()))
    }

    /// The configured cluster whose address is `addr` (same endpoint, same pin).
    pub fn find_by_address(&self, addr: &ClusterAddress) -> Option<(&String, &ClusterEntry)> {
        self.clusters
            .iter()
            .find(|(_, e)| e.address().is_ok_and(|a| a.same_cluster(addr)))
    }
}

/// The cluster a command talks to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Config name, when it came from the config.
    pub name: Option<String>,
    pub address: ClusterAddress,
    /// PEM certificate and key to present.
    pub identity: Option<(String, String)>,
}

/// Picks the target cluster per the resolution order above.
pub fn resolve(cluster_flag: Option<&str>) -> anyhow::Result<Target> {
    let path = config_path()?;
    let cfg = ClientConfig::load(&path)?;
    let from_entry = |name: &str, entry: &ClusterEntry| -> anyhow::Result<Target> {
        Ok(Target {
            name: Some(name.to_string()),
            address: entry
                .address()
                .with_context(|| format!("cluster {name:?} in {}", path.display()))?,
            identity: entry.identity(),
        })
    };
    if let Some(name) = cluster_flag {
        let entry = cfg.clusters.get(name).ok_or_else(|| {
            anyhow!(
                "no cluster named {name:?} in {} (`miren cluster list` shows the configured ones)",
                path.display()
            )
        })?;
        return from_entry(name, entry);
    }
    if let Some(value) = std::env::var("MIREN_CLUSTER")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        if let Some(entry) = cfg.clusters.get(value.trim()) {
            return from_entry(value.trim(), entry);
        }
        let address: ClusterAddress = value.parse().with_context(|| {
            format!("MIREN_CLUSTER={value:?} is neither a configured cluster nor an address")
        })?;
        if let Some((name, entry)) = cfg.find_by_address(&address) {
            // The configured identity, with every coordinator the variable
            // lists (it may name more than the config does).
            let mut target = from_entry(name, entry)?;
            for hp in address.endpoints() {
                if !target.address.endpoints().contains(&hp) {
                    target.address.alternates.push(hp);
                }
            }
            return Ok(target);
        }
        return Ok(Target {
            name: None,
            address,
            identity: None,
        });
    }
    if let Some(active) = &cfg.active_cluster {
        let entry = cfg.clusters.get(active).ok_or_else(|| {
            anyhow!(
                "active cluster {active:?} is not in {} (`miren cluster switch NAME` to pick another)",
                path.display()
            )
        })?;
        return from_entry(active, entry);
    }
    bail!(
        "no cluster selected: start one with `miren server --dev`, add one with `miren cluster add NAME ADDRESS`, or set MIREN_CLUSTER=host:port;sha1:<fingerprint>"
    )
}
