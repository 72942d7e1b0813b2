//! What a running coordinator is made of, by concern.
//!
//! [`State`] holds one handle per part; each part is its own type in its
//! own module, and whatever needs a part is handed that part only: the
//! HTTPS documents get the [`Issuer`] (URL and key ring), the ingress its
//! [`crate::ingress::Ingress`] (routes, apps, runners, the login flow),
//! route OIDC administration the [`Routes`] and the [`Labs`], readiness its
//! [`crate::health::Probes`]. Only the RPC capabilities (`crate::service`),
//! which answer for all of them, hold the whole.

use std::sync::Arc;
use std::time::Instant;

use identity::ClusterAddress;
use transport::pki::ClusterCa;

use crate::apps::{AppError, Apps};
use crate::ci::CiBindings;
use crate::datadir::ClusterMeta;
use crate::frontdoor::FrontDoor;
use crate::issuer::Issuer;
use crate::labs::Labs;
use crate::minting::Minting;
use crate::observe::Observe;
use crate::oidc::OidcVerifier;
use crate::routes::Routes;
use crate::runners::{Registry, RegistryError, RunnerView};
use crate::shutdown::Tasks;
use crate::sso::Sso;
use crate::store::Store;

/// Who this cluster is: what `info` and `status` report, and the CA that
/// issues runner and admin certificates.
pub struct ClusterIdentity {
    pub meta: ClusterMeta,
    /// `host:port;sha1:…` written into join tokens.
    pub address: ClusterAddress,
    /// The cluster CA (issues runner and admin certificates).
    pub ca: ClusterCa,
    /// What this coordinator is (version, commit, build date).
    pub build: transport::build_info::BuildInfo,
    pub started: Instant,
    /// This coordinator's id among the cluster's coordinators.
    pub coordinator_id: String,
    /// The cluster's sealed records and key on a shared store (`--etcd`);
    /// `None` on the embedded store.
    pub shared: Option<Arc<crate::cluster_secrets::ClusterSecrets>>,
}

impl State {
    /// The cluster's address with every other running coordinator as an
    /// alternate (what join codes and `cluster export-address` carry), from
    /// memory.
    pub fn address_with_peers(&self) -> ClusterAddress {
        let mut address = self.cluster.address.clone();
        for l in self.coordinators.list(&self.cluster.coordinator_id) {
            if l.record.id == self.cluster.coordinator_id {
                continue;
            }
            if let Ok(other) = l.record.address.parse::<ClusterAddress>() {
                let hp = other.primary();
                if !address.endpoints().contains(&hp) {
                    address.alternates.push(hp);
                }
            }
        }
        address
    }
}

/// Every part of a running coordinator.
pub struct State {
    pub cluster: ClusterIdentity,
    /// The running coordinators and the leader (watch-fed).
    pub coordinators: Arc<crate::coordinators::CoordinatorIndex>,
    /// The issuer: URL history and signing keys.
    pub issuer: Arc<Issuer>,
    /// Workload tokens (whose they are, signing).
    pub minting: Arc<Minting>,
    /// Sandbox placements and active versions (watch-fed).
    pub sandboxes: Arc<crate::sandbox_index::SandboxIndex>,
    pub store: Arc<dyn Store>,
    /// Join tokens and runners.
    pub registry: Arc<Registry>,
    /// Apps, sandboxes, artifacts.
    pub apps: Arc<Apps>,
    /// CI bindings.
    pub ci: Arc<CiBindings>,
    /// Deploy keys.
    pub deploy_keys: Arc<crate::deploy_keys::DeployKeys>,
    /// The OAuth token endpoint and the access-token login.
    pub oauth: Arc<crate::oauth::TokenEndpoint>,
    /// Converges what runs to the records.
    pub reconciler: Arc<crate::reconcile::Reconciler>,
    /// Fetches issuer keys and verifies CI tokens.
    pub oidc: Arc<OidcVerifier>,
    /// Routes and route OIDC providers.
    pub routes: Arc<Routes>,
    /// Route OIDC sessions (labs).
    pub sso: Arc<Sso>,
    /// Labs features turned on (`--labs`).
    pub labs: Labs,
    /// Connection counts and join attempts per source.
    pub door: Arc<FrontDoor>,
    /// Metrics and the audit trail.
    pub observe: Arc<Observe>,
    /// The coordinator's tasks and its shutdown signal.
    pub tasks: Tasks,
    /// The multi-threaded runtime. RPC sessions run pinned to single-thread
    /// workers; CPU-heavy or `Send` work is handed here to use every core.
    pub rt: tokio::runtime::Handle,
}

/// What `cluster status` counts.
pub struct Summary {
    pub runners: u32,
    pub apps: u32,
    pub sandboxes: u32,
    pub join_tokens: u32,
    pub ci_bindings: u32,
    pub signing_keys: u32,
}

impl State {
    /// The counts of `cluster status` at `now`.
    pub fn summary(&self, now: i64) -> Result<Summary, SummaryError> {
        let count =
            |prefix: &str| -> Result<u32, SummaryError> { Ok(self.store.count(prefix)? as u32) };
        let signing_keys = self.issuer.statuses(now)?.len() as u32;
        Ok(Summary {
            runners: count("runner/")?,
            apps: count("app/")?,
            sandboxes: count("sandbox/")?,
            join_tokens: count("jointoken/")?,
            ci_bindings: self.ci.len() as u32,
            signing_keys,
        })
    }

    /// Every runner at `now`, each with the sandboxes our records place on
    /// it (not what its last heartbeat said).
    pub fn runners(&self, now: i64) -> Result<Vec<RunnerView>, RunnersError> {
        let mut runners = self.registry.list(now)?;
        let assigned = self.apps.sandboxes()?;
        for r in runners.iter_mut() {
            r.status.sandboxes = assigned.iter().filter(|s| s.runner == r.record.id).count() as u32;
        }
        Ok(runners)
    }
}

/// Why the counts of `cluster status` could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Issuer(#[from] crate::issuer::IssuerError),
}

/// Why runners could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum RunnersError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Apps(#[from] AppError),
}
