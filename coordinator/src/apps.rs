//! Apps, versions and sandbox assignments: the desired state of the
//! cluster as store records (the artifacts themselves live in
//! [`crate::artifacts`]).
//!
//! An app version is an uploaded artifact (a `.tar.gz` stored by SHA-256)
//! plus its services. A deploy only records a new version as `deploying`
//! and returns: placing its instances on runners, waiting for them to be
//! healthy, activating it and retiring what it replaces is the work of the
//! reconcile loop ([`crate::reconcile`], deciding with the pure
//! [`crate::converge`]), which reads these records and can be restarted at
//! any point. Durable records: `app/<name>` (versions, the active one),
//! `sandbox/<id>` (an assignment of one instance to one runner, with the
//! time it retires once it is to stop). What runners report lives in
//! [`crate::observed`], valid only on their live session.
//!
//! Retention: once a version is active, an app keeps it, any still
//! deploying, and the [`KEEP_PREVIOUS_VERSIONS`] newest others
//! ([`versions_to_keep`]); the others leave its record in one conditional
//! write, and then the artifact store ([`crate::artifacts`]) deletes the
//! artifacts no version and no sandbox record names. `app delete` does the
//! same for all of the app's versions.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::artifacts::{is_sha256_hex, ArtifactError, ArtifactStore, Upload, UploadLimits};
use crate::converge::VersionState;
use crate::observed::{Observed, Seen};
pub use crate::observed::{SandboxReport, SandboxState};
pub use crate::runners::ResourceLimits;
use crate::runners::{Registry, RunnerCommand, SendError};
use crate::shutdown::Tasks;
use crate::store::{decode, encode, Condition, Op, Outcome, Store, StoreError, Txn};

/// Versions kept besides the active one and those deploying: enough to see
/// why the last deploys failed and to go back a few steps; their artifacts
/// (up to 512 MiB each) stay on disk with them.
pub const KEEP_PREVIOUS_VERSIONS: usize = 3;
/// How long the old version keeps running after the new one took over.
pub const DRAIN: Duration = Duration::from_secs(2);
/// How long a new version has to become healthy.
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a runner has to answer for its sandboxes' logs.
const LOGS_PATIENCE: Duration = Duration::from_secs(10);
/// The message of a version whose rollout the coordinator's shutdown cut.
pub const INTERRUPTED: &str =
    "interrupted: the coordinator shut down during the rollout; deploy again";

/// App and rollout failures, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("app {0:?} does not exist (see `miren app list`)")]
    NoSuchApp(String),
    /// An artifact name that is not a SHA-256 digest.
    #[error("not a sha256")]
    NotSha256,
    /// A deploy with no service.
    #[error("the app defines no services")]
    NoServices,
    /// A service without a command, or with an instance count out of range.
    #[error("service {0}: needs a command and 1-100 instances")]
    BadService(String),
    /// A deploy while the coordinator shuts down.
    #[error("the coordinator is shutting down; deploy again once it is back")]
    ShuttingDown,
    /// The app name breaks the one name rule.
    #[error(transparent)]
    Name(#[from] identity::NameError),
    #[error("artifact {0} is not on the coordinator; upload it first")]
    NoSuchArtifact(String),
    #[error("not authorized to issue a token for this sandbox")]
    NotYourSandbox,
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One service of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub command: String,
    pub port: u16,
    pub instances: u32,
    pub env: Vec<(String, String)>,
    /// What each sandbox of the service may use (records from before
    /// limits existed read as "the runner's defaults").
    #[serde(default)]
    pub limits: ResourceLimits,
}

/// A deployed version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub id: String,
    pub artifact: String,
    pub services: Vec<Service>,
    pub created_unix: i64,
    /// Stored as its word: deploying | active | failed | superseded.
    pub state: VersionState,
    pub message: String,
}

/// `app/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    pub versions: Vec<Version>,
    pub active: Option<String>,
}

/// `sandbox/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub app: String,
    pub version: String,
    pub service: String,
    pub runner: String,
    pub artifact: String,
    pub created_unix: i64,
    /// Once set, the sandbox is to stop at this time (after requests in
    /// flight drain) and its record goes once its runner no longer has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<i64>,
    /// The assignment this one replaces (moved off a draining or lost
    /// runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl SandboxRecord {
    /// Its store key.
    pub fn key(&self) -> String {
        sandbox_key(&self.id)
    }
}

/// What `app status` shows of one app (and `app list` of every app),
/// shared by the coordinator, which builds it, and the CLI, which prints
/// it as a table or as this very JSON (`-o json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppStatus {
    pub name: String,
    pub active_version: Option<String>,
    pub versions: Vec<VersionStatus>,
    pub sandboxes: Vec<SandboxStatus>,
}

/// One version in [`AppStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionStatus {
    pub id: String,
    pub state: VersionState,
    pub message: String,
    pub artifact: String,
    pub created_unix: i64,
    pub services: Vec<ServiceStatus>,
}

/// One service of a version in [`AppStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub instances: u32,
    pub port: u16,
    pub limits: ResourceLimits,
}

/// One sandbox assignment in [`AppStatus`] and what was seen of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxStatus {
    pub id: String,
    pub version: String,
    pub service: String,
    pub runner: String,
    pub retiring: bool,
    #[serde(flatten)]
    pub seen: SeenStatus,
}

/// What was seen of a sandbox, as `app status -o json` has always shown
/// it: `state` is the reported one or `unknown` (then with
/// `unknown_since_unix`, and `reported_unix` 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenStatus {
    #[serde(serialize_with = "state_or_unknown")]
    pub state: Option<SandboxState>,
    pub reported_unix: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_since_unix: Option<i64>,
    pub restarts: u32,
    pub address: String,
    pub last_exit: String,
}

impl SeenStatus {
    /// Nothing reported on a live session since `since`.
    pub fn unknown_since(since: i64) -> SeenStatus {
        SeenStatus {
            state: None,
            reported_unix: 0,
            unknown_since_unix: Some(since),
            restarts: 0,
            address: String::new(),
            last_exit: String::new(),
        }
    }
}

impl From<Seen> for SeenStatus {
    fn from(seen: Seen) -> SeenStatus {
        match seen {
            Seen::Reported(r) => SeenStatus {
                state: Some(r.report.state),
                reported_unix: r.at_unix,
                unknown_since_unix: None,
                restarts: r.report.restarts,
                address: r.report.address,
                last_exit: r.report.last_exit,
            },
            Seen::UnknownSince(since) => SeenStatus::unknown_since(since),
        }
    }
}

/// A reported state's word, or `unknown` when nothing was reported.
fn state_or_unknown<S: serde::Serializer>(
    state: &Option<SandboxState>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.map_or("unknown", SandboxState::as_str))
}

/// The last output lines of one sandbox (`miren logs`), or why its runner
/// gave none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLogs {
    pub sandbox: String,
    pub version: String,
    pub lines: Vec<String>,
    pub error: Option<String>,
}

/// The store key of sandbox `id`.
pub fn sandbox_key(id: &str) -> String {
    format!("sandbox/{id}")
}

/// The store key of app `name`.
pub fn app_key(name: &str) -> String {
    format!("app/{name}")
}

/// The order in which versions of one app were accepted: `vN` → N (each
/// is handed out once, under compare-and-set on the app record).
pub fn version_generation(id: &str) -> u64 {
    id.strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Checks an app name by the one rule, `identity::check_app_name`.
pub fn check_app_name(name: &str) -> Result<(), AppError> {
    Ok(identity::check_app_name(name)?)
}

/// The versions an app keeps (their ids): the active one, every one still
/// deploying (its rollout has yet to record how it went), and the
/// `keep_previous` newest of the others (`versions` is in deploy order).
pub fn versions_to_keep(
    versions: &[Version],
    active: Option<&str>,
    keep_previous: usize,
) -> HashSet<String> {
    let pinned = |v: &Version| Some(v.id.as_str()) == active || v.state == VersionState::Deploying;
    let mut keep: HashSet<String> = versions
        .iter()
        .filter(|v| pinned(v))
        .map(|v| v.id.clone())
        .collect();
    keep.extend(
        versions
            .iter()
            .rev()
            .filter(|v| !pinned(v))
            .take(keep_previous)
            .map(|v| v.id.clone()),
    );
    keep
}

/// The id of the next version: `v<N>` with N one more than any version ever
/// kept (the list shrinks as old versions are dropped, so its length would
/// hand out an id again).
pub fn next_version_id(versions: &[Version]) -> String {
    let highest = versions
        .iter()
        .filter_map(|v| v.id.strip_prefix('v')?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        .max(versions.len() as u64);
    format!("v{}", highest + 1)
}

/// Apps, sandboxes and artifacts.
pub struct Apps {
    store: Arc<dyn Store>,
    /// Where rollouts run (the multi-threaded runtime, not an RPC worker),
    /// and what tells them the coordinator is shutting down.
    tasks: Tasks,
    artifacts: ArtifactStore,
    /// What runners reported, on their live sessions.
    observed: Arc<Observed>,
    /// Wakes the reconcile loop after a change of desired state.
    wake: Arc<tokio::sync::Notify>,
    /// Counts rollouts.
    observe: Arc<crate::observe::Observe>,
}

impl Apps {
    /// Opens the artifact store in `<data_dir>/artifacts` (removing what
    /// interrupted uploads left) and collects what earlier runs left to
    /// collect.
    pub fn new(store: Arc<dyn Store>, data_dir: &Path, tasks: Tasks) -> Result<Self, AppError> {
        Self::with_limits(store, data_dir, tasks, UploadLimits::default())
    }

    /// [`Apps::new`] with other upload limits.
    pub fn with_limits(
        store: Arc<dyn Store>,
        data_dir: &Path,
        tasks: Tasks,
        limits: UploadLimits,
    ) -> Result<Self, AppError> {
        let artifacts = ArtifactStore::open(data_dir.join("artifacts"), limits)?;
        let apps = Apps {
            store,
            tasks,
            artifacts,
            observed: Arc::new(Observed::new(transport::clock::now_unix())),
            wake: Arc::new(tokio::sync::Notify::new()),
            observe: Arc::new(crate::observe::Observe::disabled()),
        };
        match apps.apps() {
            Ok(all) => {
                for app in all {
                    if let Err(e) = apps.drop_old_versions(&app.name) {
                        tracing::warn!("dropping old versions of {}: {e}", app.name);
                    }
                }
            }
            Err(e) => tracing::warn!("dropping old versions: {e}"),
        }
        if let Err(e) = apps.collect_artifacts() {
            tracing::warn!("collecting unused artifacts: {e}");
        }
        Ok(apps)
    }

    /// Shares artifacts with the other coordinators through `store`
    /// (`--etcd`; see `crate::artifact_chunks`).
    pub fn share_artifacts(&self, store: Arc<dyn Store>) {
        self.artifacts.share_through(store);
    }

    /// Starts an upload for `app` (at most a few at a time per app). Old
    /// uploads that no deploy ever named are collected first, so uploads
    /// alone cannot fill the disk.
    pub fn upload(&self, app: &str) -> Result<Upload, AppError> {
        check_app_name(app)?;
        if let Err(e) = self.collect_artifacts() {
            tracing::warn!("collecting unused artifacts: {e}");
        }
        Ok(self.artifacts.begin_upload(app, Instant::now())?)
    }

    /// Reads part of a stored artifact for `runner`, which must host a
    /// sandbox that uses it.
    pub fn read_artifact(
        &self,
        runner: &str,
        sha: &str,
        offset: u64,
        length: u32,
    ) -> Result<(Vec<u8>, u64), AppError> {
        if !is_sha256_hex(sha) {
            return Err(AppError::NotSha256);
        }
        let allowed = self
            .sandboxes()?
            .iter()
            .any(|s| s.runner == runner && s.artifact == sha);
        if !allowed {
            return Err(AppError::NoSuchArtifact(sha.to_string()));
        }
        self.artifacts
            .read(sha, offset, length)
            .map_err(|e| match e {
                ArtifactError::Missing(sha) => AppError::NoSuchArtifact(sha),
                other => other.into(),
            })
    }

    /// Drops the versions `app` no longer keeps ([`versions_to_keep`]) from
    /// its record, then deletes the artifacts nothing names any more.
    /// Returns the digests deleted.
    pub fn collect(&self, app: &str) -> Result<Vec<String>, AppError> {
        self.drop_old_versions(app)?;
        self.collect_artifacts()
    }

    /// One conditional write of `app/<app>` without the versions it no
    /// longer keeps.
    fn drop_old_versions(&self, app: &str) -> Result<(), AppError> {
        let key = format!("app/{app}");
        loop {
            let Some(old) = self.store.get(&key)? else {
                return Ok(());
            };
            let mut rec: AppRecord = decode(&key, &old)?;
            let keep =
                versions_to_keep(&rec.versions, rec.active.as_deref(), KEEP_PREVIOUS_VERSIONS);
            let (kept, dropped): (Vec<Version>, Vec<Version>) =
                rec.versions.into_iter().partition(|v| keep.contains(&v.id));
            if dropped.is_empty() {
                return Ok(());
            }
            rec.versions = kept;
            let applied = self.store.commit(Txn {
                conditions: vec![Condition::Equals(key.clone(), old)],
                ops: vec![Op::Put(key.clone(), encode(&rec))],
            })?;
            if applied == Outcome::Applied {
                tracing::info!(
                    "{app}: dropped {} old version(s) ({})",
                    dropped.len(),
                    dropped
                        .iter()
                        .map(|v| v.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(());
            }
        }
    }

    /// Deletes stored artifacts no version of any app and no sandbox record
    /// names (but fresh uploads waiting for their deploy).
    fn collect_artifacts(&self) -> Result<Vec<String>, AppError> {
        self.artifacts
            .collect(Instant::now(), || self.referenced_artifacts())
    }

    /// Every artifact a version or a sandbox record names.
    fn referenced_artifacts(&self) -> Result<HashSet<String>, AppError> {
        let mut referenced: HashSet<String> = self
            .apps()?
            .into_iter()
            .flat_map(|a| a.versions.into_iter().map(|v| v.artifact))
            .collect();
        referenced.extend(self.sandboxes()?.into_iter().map(|s| s.artifact));
        Ok(referenced)
    }

    pub fn app(&self, name: &str) -> Result<Option<AppRecord>, AppError> {
        let key = format!("app/{name}");
        Ok(match self.store.get(&key)? {
            Some(b) => Some(decode(&key, &b)?),
            None => None,
        })
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, AppError> {
        self.store
            .scan("app/")?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map_err(AppError::from))
            .collect()
    }

    /// Counts rollouts in `observe`.
    pub fn observed(self, observe: Arc<crate::observe::Observe>) -> Self {
        Apps { observe, ..self }
    }

    /// What runners reported (shared with the runner sessions and the
    /// reconcile loop).
    pub fn reports(&self) -> &Arc<Observed> {
        &self.observed
    }

    /// Tells the reconcile loop that desired state changed.
    pub fn waker(&self) -> &Arc<tokio::sync::Notify> {
        &self.wake
    }

    /// The artifact store's guard for records that name artifacts.
    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// Counts a rollout's outcome.
    pub fn count_rollout(&self, activated: bool) {
        let outcome: Result<(), ()> = if activated { Ok(()) } else { Err(()) };
        self.observe.rollout(&outcome);
    }

    /// The last reported state of every placed sandbox (`"unknown"` when
    /// nothing was reported on a live session), for the metrics.
    pub fn sandbox_states(&self) -> Result<Vec<String>, AppError> {
        Ok(self
            .sandboxes()?
            .iter()
            .map(|s| match self.observed.seen(&s.runner, &s.id) {
                Seen::Reported(r) => r.report.state.as_str().to_string(),
                Seen::UnknownSince(_) => "unknown".to_string(),
            })
            .collect())
    }

    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, AppError> {
        self.store
            .scan("sandbox/")?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map_err(AppError::from))
            .collect()
    }

    /// The record of sandbox `id`, if there is one.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, AppError> {
        let key = sandbox_key(id);
        Ok(match self.store.get(&key)? {
            Some(b) => Some(decode(&key, &b)?),
            None => None,
        })
    }

    fn update_app(
        &self,
        name: &str,
        mut change: impl FnMut(&mut AppRecord),
    ) -> Result<AppRecord, AppError> {
        let key = app_key(name);
        loop {
            let old = self.store.get_kv(&key)?;
            let mut rec = match &old {
                Some(kv) => decode(&key, &kv.value)?,
                None => AppRecord {
                    name: name.to_string(),
                    versions: vec![],
                    active: None,
                },
            };
            change(&mut rec);
            let read = old.map_or(0, |kv| kv.mod_revision);
            if self.store.commit(Txn {
                conditions: vec![Condition::ModRevision(key.clone(), read)],
                ops: vec![Op::Put(key.clone(), encode(&rec))],
            })? == Outcome::Applied
            {
                return Ok(rec);
            }
        }
    }

    /// Records what a runner says, on its session `session`, about one of
    /// the sandboxes assigned to it.
    pub fn report(
        &self,
        runner: &str,
        session: u64,
        id: &str,
        report: SandboxReport,
        now: i64,
    ) -> Result<(), AppError> {
        match self.sandbox(id)? {
            Some(s) if s.runner == runner => {
                self.observed.report(runner, session, id, report, now);
                self.wake.notify_one();
                Ok(())
            }
            _ => Err(AppError::NotYourSandbox),
        }
    }

    /// Status of one app: versions, and each sandbox with its runner and
    /// what was reported of it on a live session, or `unknown` since when.
    pub fn status(&self, name: &str) -> Result<AppStatus, AppError> {
        let app = self
            .app(name)?
            .ok_or_else(|| AppError::NoSuchApp(name.to_string()))?;
        let sandboxes = self
            .sandboxes()?
            .into_iter()
            .filter(|s| s.app == name)
            .map(|s| SandboxStatus {
                seen: self.observed.seen(&s.runner, &s.id).into(),
                retiring: s.retire_at.is_some(),
                id: s.id,
                version: s.version,
                service: s.service,
                runner: s.runner,
            })
            .collect();
        let versions = app
            .versions
            .iter()
            .map(|v| VersionStatus {
                id: v.id.clone(),
                state: v.state,
                message: v.message.clone(),
                artifact: v.artifact.clone(),
                created_unix: v.created_unix,
                services: (v.services.iter())
                    .map(|s| ServiceStatus {
                        name: s.name.clone(),
                        instances: s.instances,
                        port: s.port,
                        limits: s.limits,
                    })
                    .collect(),
            })
            .collect();
        Ok(AppStatus {
            name: app.name,
            active_version: app.active,
            versions,
            sandboxes,
        })
    }

    /// Records a new version of `app` as `deploying` and returns its id;
    /// the reconcile loop rolls it out. A later deploy supersedes it.
    pub fn deploy(
        &self,
        app: &str,
        artifact: &str,
        services: Vec<Service>,
        now: i64,
    ) -> Result<String, AppError> {
        check_app_name(app)?;
        if services.is_empty() {
            return Err(AppError::NoServices);
        }
        for s in &services {
            if s.command.trim().is_empty() || s.instances == 0 || s.instances > 100 {
                return Err(AppError::BadService(s.name.clone()));
            }
        }
        if self.tasks.is_stopping() {
            return Err(AppError::ShuttingDown);
        }
        let mut version_id = String::new();
        // No collection between the check and the record naming it.
        let mut held = self.artifacts.hold();
        if !self.artifacts.contains(artifact) {
            return Err(AppError::NoSuchArtifact(artifact.to_string()));
        }
        self.update_app(app, |rec| {
            version_id = next_version_id(&rec.versions);
            rec.versions.push(Version {
                id: version_id.clone(),
                artifact: artifact.to_string(),
                services: services.clone(),
                created_unix: now,
                state: VersionState::Deploying,
                message: String::new(),
            });
        })?;
        held.recorded(artifact);
        drop(held);
        self.wake.notify_one();
        Ok(version_id)
    }

    /// The last `lines` output lines of every sandbox of `app`.
    pub async fn logs(
        &self,
        registry: &Registry,
        app: &str,
        lines: u32,
    ) -> Result<Vec<SandboxLogs>, AppError> {
        if self.app(app)?.is_none() {
            return Err(AppError::NoSuchApp(app.to_string()));
        }
        let mut out = Vec::new();
        for s in self.sandboxes()?.into_iter().filter(|s| s.app == app) {
            let logs = |tx| RunnerCommand::Logs(s.id.clone(), lines, tx);
            let got = match registry.send(&s.runner, logs, LOGS_PATIENCE).await {
                Ok(lines) => Ok(lines),
                Err(SendError::Refused(e)) => Err(e.0),
                Err(SendError::NotConnected(_)) => Err("runner not connected".to_string()),
                Err(SendError::WentAway(_) | SendError::NoAnswer(_)) => {
                    Err("runner did not answer".to_string())
                }
            };
            let (lines, error) = match got {
                Ok(l) => (l, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            out.push(SandboxLogs {
                sandbox: s.id,
                version: s.version,
                lines,
                error,
            });
        }
        Ok(out)
    }

    /// Deletes the artifacts that nothing names any more (after an app
    /// was deleted).
    pub fn collect_unused(&self) {
        if let Err(e) = self.collect_artifacts() {
            tracing::warn!("collecting unused artifacts: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    #[test]
    fn a_runner_reports_and_reads_only_for_sandboxes_it_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let apps = Apps::new(store.clone(), dir.path(), Tasks::new(rt.handle().clone())).unwrap();
        let rec = SandboxRecord {
            id: "web-a".into(),
            app: "web".into(),
            version: "v1".into(),
            service: "web".into(),
            runner: "runner-1".into(),
            artifact: "0".repeat(64),
            created_unix: 0,
            retire_at: None,
            replaces: None,
        };
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put("sandbox/web-a".into(), encode(&rec))],
            })
            .unwrap();
        // Tokens follow the same rule: see `crate::minting`.
        assert!(apps
            .report("runner-1", 1, "web-a", SandboxReport::default(), 0)
            .is_ok());
        assert!(apps
            .report("runner-2", 1, "web-a", SandboxReport::default(), 0)
            .is_err());
        assert!(apps
            .read_artifact("runner-2", &"0".repeat(64), 0, 10)
            .is_err());
    }

    fn version(id: &str, state: &str, artifact: &str) -> Version {
        Version {
            id: id.into(),
            artifact: artifact.into(),
            services: vec![],
            created_unix: 0,
            state: serde_json::from_value(serde_json::json!(state)).expect("a version state word"),
            message: String::new(),
        }
    }

    #[test]
    fn an_app_keeps_its_active_version_those_deploying_and_three_more() {
        let versions = [
            version("v1", "superseded", "a"),
            version("v2", "failed", "b"),
            version("v3", "superseded", "c"),
            version("v4", "deploying", "d"),
            version("v5", "superseded", "e"),
            version("v6", "active", "f"),
            version("v7", "failed", "g"),
            version("v8", "deploying", "h"),
        ];
        let mut keep: Vec<String> = versions_to_keep(&versions, Some("v6"), 3)
            .into_iter()
            .collect();
        keep.sort();
        assert_eq!(keep, ["v3", "v4", "v5", "v6", "v7", "v8"]);
        // Few versions: all stay.
        assert_eq!(versions_to_keep(&versions[..2], None, 3).len(), 2);
        // Nothing active yet (the first deploys failed): the newest stay.
        let mut keep: Vec<String> = versions_to_keep(&versions[..3], None, 1)
            .into_iter()
            .collect();
        keep.sort();
        assert_eq!(keep, ["v3"]);
    }

    #[test]
    fn version_ids_are_never_handed_out_twice() {
        assert_eq!(next_version_id(&[]), "v1");
        let kept = [
            version("v4", "superseded", "a"),
            version("v5", "active", "b"),
        ];
        assert_eq!(next_version_id(&kept), "v6");
        // Ids of another shape count by the length of the list.
        assert_eq!(next_version_id(&[version("x", "active", "a")]), "v2");
    }

    struct Fixture {
        dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        rt: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> =
                Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            Fixture { dir, store, rt }
        }

        fn apps(&self) -> Apps {
            Apps::new(self.store.clone(), self.dir.path(), self.tasks()).unwrap()
        }

        fn tasks(&self) -> Tasks {
            Tasks::new(self.rt.handle().clone())
        }

        /// Stores an artifact file (as an upload long done would have).
        fn artifact(&self, name: &str) -> String {
            let sha = "0".repeat(63) + name;
            let dir = self.dir.path().join("artifacts");
            std::fs::create_dir_all(&dir).unwrap();
            let file = std::fs::File::create(dir.join(&sha)).unwrap();
            std::io::Write::write_all(&mut &file, name.as_bytes()).unwrap();
            // Uploaded long ago: only references keep it.
            file.set_modified(std::time::SystemTime::now() - crate::artifacts::UPLOAD_GRACE * 2)
                .unwrap();
            sha
        }

        fn put<T: Serialize>(&self, key: &str, value: &T) {
            self.store
                .commit(Txn {
                    conditions: vec![],
                    ops: vec![Op::Put(key.into(), encode(value))],
                })
                .unwrap();
        }

        fn stored(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join("artifacts"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    #[test]
    fn old_versions_and_their_artifacts_go_unless_still_used() {
        let f = Fixture::new();
        let shas: Vec<String> = (0..8).map(|i| f.artifact(&i.to_string())).collect();
        // v1 and v5 share an artifact; v2's is api's too; a sandbox of v3
        // still drains; shas[4] was uploaded long ago and never deployed.
        let versions: Vec<Version> = [0, 1, 2, 3, 0, 5, 6, 7]
            .iter()
            .enumerate()
            .map(|(i, a)| version(&format!("v{}", i + 1), "superseded", &shas[*a]))
            .collect();
        let mut web = AppRecord {
            name: "web".into(),
            versions,
            active: Some("v8".into()),
        };
        web.versions[7].state = VersionState::Active;
        f.put("app/web", &web);
        f.put(
            "app/api",
            &AppRecord {
                name: "api".into(),
                versions: vec![version("v1", "active", &shas[1])],
                active: Some("v1".into()),
            },
        );
        f.put(
            "sandbox/web-old",
            &SandboxRecord {
                id: "web-old".into(),
                app: "web".into(),
                version: "v3".into(),
                service: "web".into(),
                runner: "r".into(),
                artifact: shas[2].clone(),
                created_unix: 0,
                retire_at: None,
                replaces: None,
            },
        );
        // An upload finished just before a restart, its deploy to come.
        let fresh = "f".repeat(64);
        std::fs::write(f.dir.path().join("artifacts").join(&fresh), "new").unwrap();

        // At start: web keeps v8 and the three before; of the artifacts of
        // v1-v4 only v4's goes (v1's is v5's, v2's api's, v3's the
        // draining sandbox's); the old orphan goes, the fresh upload stays.
        let apps = f.apps();
        let ids: Vec<String> = apps
            .app("web")
            .unwrap()
            .unwrap()
            .versions
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(ids, ["v5", "v6", "v7", "v8"]);
        let mut expected: Vec<String> = [0, 1, 2, 5, 6, 7]
            .iter()
            .map(|i| shas[*i].clone())
            .collect();
        expected.push(fresh.clone());
        assert_eq!(f.stored(), expected);
        assert!(apps.collect("web").unwrap().is_empty());

        // Deleting web (which stops its sandboxes) leaves only api's
        // artifact and the fresh upload.
        let apps = Arc::new(apps);
        let reconciler = crate::reconcile::Reconciler::new(
            f.store.clone(),
            apps.clone(),
            Arc::new(Registry::new(f.store.clone(), Duration::from_secs(3600))),
            Arc::new(crate::routes::Routes::open(f.store.clone()).unwrap()),
            Arc::new(
                crate::ci::CiBindings::load(
                    f.store.clone(),
                    identity::AddressPolicy::new(false, vec![]),
                )
                .unwrap(),
            ),
            f.tasks(),
            "https://issuer.test".into(),
            crate::reconcile::Settings::default(),
            crate::leader::Leadership::always(),
        );
        f.rt.block_on(reconciler.delete_app("web")).unwrap();
        assert!(apps.app("web").unwrap().is_none());
        assert!(apps.sandboxes().unwrap().is_empty());
        assert_eq!(f.stored(), [shas[1].clone(), fresh]);
        assert!(matches!(
            f.rt.block_on(reconciler.delete_app("web")),
            Err(crate::reconcile::DeleteError::App(AppError::NoSuchApp(_)))
        ));
    }

    #[test]
    fn uploads_are_bounded_per_app() {
        let f = Fixture::new();
        let apps = Apps::with_limits(
            f.store.clone(),
            f.dir.path(),
            f.tasks(),
            UploadLimits {
                max_artifact_bytes: 1024,
                per_app: 2,
                idle: Duration::from_secs(60),
            },
        )
        .unwrap();
        let _a = apps.upload("web").unwrap();
        let _b = apps.upload("web").unwrap();
        let third = apps.upload("web").err().unwrap();
        assert!(
            third
                .to_string()
                .contains("already has 2 uploads in progress"),
            "{third}"
        );
        assert!(apps.upload("api").is_ok());
        assert!(apps.upload("../x").is_err());
    }

    #[test]
    fn app_names_are_checked() {
        assert!(check_app_name("web-1").is_ok());
        for bad in ["", "-web", "Web", "a/b", "a:b", &"a".repeat(64)] {
            assert!(check_app_name(bad).is_err(), "{bad}");
        }
    }
}
