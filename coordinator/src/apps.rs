//! Apps, versions, sandboxes and rollouts (the artifacts themselves live in
//! [`crate::artifacts`]).
//!
//! An app version is an uploaded artifact (a `.tar.gz` stored by SHA-256)
//! plus its services. Deploying schedules every instance on a ready,
//! uncordoned runner (spread: fewest sandboxes first, the pure rule
//! [`placement`]), waits until every new sandbox reports healthy (the pure
//! rule [`health_wait`]), and only then stops the previous version; a
//! version that does not become healthy is stopped and the old one keeps
//! serving. Durable records: `app/<name>`, `sandbox/<id>`. What runners
//! report about sandboxes (state, restarts, address, last log lines) is
//! kept in memory.
//!
//! A rollout is a task of the coordinator's [`Tasks`]: when the
//! coordinator shuts down mid-rollout it records the version as failed
//! ("interrupted") and forgets its new sandboxes in one write, so a restart
//! finds the version either recorded with its outcome or not at all.
//!
//! Retention: when a rollout ends, an app keeps its active version, any
//! still deploying, and the [`KEEP_PREVIOUS_VERSIONS`] newest others
//! ([`versions_to_keep`]); the others leave its record in one conditional
//! write, and then the artifact store ([`crate::artifacts`]) deletes the
//! artifacts no version and no sandbox record names. `app delete` does the
//! same for all of the app's versions.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::artifacts::{is_sha256_hex, ArtifactError, ArtifactStore, Upload, UploadLimits};
pub use crate::runners::ResourceLimits;
use crate::runners::{Registry, RunnerCommand, SandboxSpec, SendError};
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
/// How long a runner has to answer a start or stop.
const COMMAND_PATIENCE: Duration = Duration::from_secs(60);
/// How long a runner has to answer for its sandboxes' logs.
const LOGS_PATIENCE: Duration = Duration::from_secs(10);
/// How long stopping sandboxes may take while the coordinator shuts down
/// (their records are gone already; this is a courtesy to the runners).
const STOP_WHILE_STOPPING: Duration = Duration::from_secs(2);
/// The message of a version whose rollout the coordinator's shutdown cut.
pub const INTERRUPTED: &str =
    "interrupted: the coordinator shut down during the rollout; deploy again";

/// App and rollout failures, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("app {0:?} does not exist (see `miren app list`)")]
    NoSuchApp(String),
    #[error("{0}")]
    Invalid(String),
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
    /// deploying | active | failed | superseded
    pub state: String,
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
}

/// What a runner last reported about a sandbox.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SandboxReport {
    pub state: String,
    pub restarts: u32,
    pub address: String,
    pub last_log: String,
    /// Why the sandbox's last run ended, as its runner saw it.
    pub last_exit: String,
}

/// Checks an app name: 1-63 of `[a-z0-9-]`, starting with a letter or digit.
pub fn check_app_name(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(AppError::Invalid(format!(
            "app name {name:?} must be 1-63 of [a-z0-9-], not starting with '-'"
        )))
    }
}

/// The versions an app keeps (their ids): the active one, every one still
/// deploying (its rollout has yet to record how it went), and the
/// `keep_previous` newest of the others (`versions` is in deploy order).
pub fn versions_to_keep(
    versions: &[Version],
    active: Option<&str>,
    keep_previous: usize,
) -> HashSet<String> {
    let pinned = |v: &Version| Some(v.id.as_str()) == active || v.state == "deploying";
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

/// Where the new sandboxes of a rollout go: for each instance of each
/// service in order, the runner with the fewest sandboxes so far
/// (`candidates`: ready runners with the sandboxes they hold; those placed
/// here count too; among equals, the one that came first at the previous
/// pick). Returns the runner of each
/// instance, in the order of `services` and their instances.
pub fn placement(mut candidates: Vec<(String, usize)>, services: &[Service]) -> Vec<String> {
    let mut placed = Vec::new();
    if candidates.is_empty() {
        return placed;
    }
    for service in services {
        for _ in 0..service.instances {
            candidates.sort_by_key(|(_, load)| *load);
            let (runner, load) = &mut candidates[0];
            *load += 1;
            placed.push(runner.clone());
        }
    }
    placed
}

/// Where a rollout's wait for health stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthWait {
    /// Every new sandbox is healthy: the version may take the traffic.
    Healthy,
    /// Not yet: look again shortly.
    Waiting,
    /// One failed, or time ran out: the version fails with this message.
    Failed(String),
}

/// The health-wait rule: a failed sandbox fails the version at once (with
/// its restarts and last log lines); all healthy, it goes on; past the
/// deadline, it fails naming each sandbox's state; else it waits.
pub fn health_wait(reports: &[(String, SandboxReport)], past_deadline: bool) -> HealthWait {
    if let Some((id, r)) = reports.iter().find(|(_, r)| r.state == "failed") {
        return HealthWait::Failed(format!(
            "sandbox {id} failed to become healthy (restarts: {}); last log lines:\n{}",
            r.restarts, r.last_log
        ));
    }
    if reports.iter().all(|(_, r)| r.state == "healthy") {
        return HealthWait::Healthy;
    }
    if past_deadline {
        let last = reports
            .iter()
            .map(|(id, r)| format!("{id}: {} {}", r.state, r.last_log))
            .collect::<Vec<_>>()
            .join("\n");
        return HealthWait::Failed(format!(
            "new version did not become healthy within {}s:\n{last}",
            ROLLOUT_TIMEOUT.as_secs()
        ));
    }
    HealthWait::Waiting
}

/// Apps, sandboxes and artifacts.
pub struct Apps {
    store: Arc<dyn Store>,
    /// Where rollouts run (the multi-threaded runtime, not an RPC worker),
    /// and what tells them the coordinator is shutting down.
    tasks: Tasks,
    artifacts: ArtifactStore,
    reports: Mutex<HashMap<String, SandboxReport>>,
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
            reports: Mutex::new(HashMap::new()),
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
            return Err(AppError::Invalid("not a sha256".into()));
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

    /// The last reported state of every placed sandbox (`""` before its
    /// first report), for the metrics.
    pub fn sandbox_states(&self) -> Result<Vec<String>, AppError> {
        Ok(self
            .sandboxes()?
            .iter()
            .map(|s| self.report_of(&s.id).state)
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
        let key = format!("sandbox/{id}");
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
        let key = format!("app/{name}");
        loop {
            let old = self.store.get(&key)?;
            let mut rec = match &old {
                Some(b) => decode(&key, b)?,
                None => AppRecord {
                    name: name.to_string(),
                    versions: vec![],
                    active: None,
                },
            };
            change(&mut rec);
            let cond = match old {
                Some(b) => Condition::Equals(key.clone(), b),
                None => Condition::Absent(key.clone()),
            };
            if self.store.commit(Txn {
                conditions: vec![cond],
                ops: vec![Op::Put(key.clone(), encode(&rec))],
            })? == Outcome::Applied
            {
                return Ok(rec);
            }
        }
    }

    /// Records what a runner says about one of its sandboxes.
    pub fn report(&self, runner: &str, id: &str, report: SandboxReport) -> Result<(), AppError> {
        match self.sandbox(id)? {
            Some(s) if s.runner == runner => {
                if let Ok(mut r) = self.reports.lock() {
                    r.insert(id.to_string(), report);
                }
                Ok(())
            }
            _ => Err(AppError::NotYourSandbox),
        }
    }

    fn report_of(&self, id: &str) -> SandboxReport {
        self.reports
            .lock()
            .ok()
            .and_then(|r| r.get(id).cloned())
            .unwrap_or_default()
    }

    /// Healthy sandboxes to route `app`'s traffic to: those of the active
    /// version, or (before any version is active) any healthy one.
    pub fn healthy_sandboxes(&self, app: &str) -> Vec<SandboxRecord> {
        let active = self.app(app).ok().flatten().and_then(|a| a.active);
        let healthy: Vec<SandboxRecord> = self
            .sandboxes()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.app == app && self.report_of(&s.id).state == "healthy")
            .collect();
        let of_active: Vec<SandboxRecord> = healthy
            .iter()
            .filter(|s| Some(&s.version) == active.as_ref())
            .cloned()
            .collect();
        if of_active.is_empty() {
            healthy
        } else {
            of_active
        }
    }

    /// Status of one app as JSON (versions, sandboxes with runner, state,
    /// restarts, address).
    pub fn status_json(&self, name: &str) -> Result<serde_json::Value, AppError> {
        let app = self
            .app(name)?
            .ok_or_else(|| AppError::NoSuchApp(name.to_string()))?;
        let sandboxes: Vec<serde_json::Value> = self
            .sandboxes()?
            .into_iter()
            .filter(|s| s.app == name)
            .map(|s| {
                let r = self.report_of(&s.id);
                serde_json::json!({
                    "id": s.id, "version": s.version, "service": s.service, "runner": s.runner,
                    "state": if r.state.is_empty() { "scheduled".to_string() } else { r.state },
                    "restarts": r.restarts, "address": r.address, "last_exit": r.last_exit,
                })
            })
            .collect();
        Ok(serde_json::json!({
            "name": app.name,
            "active_version": app.active,
            "versions": app.versions.iter().map(|v| serde_json::json!({
                "id": v.id, "state": v.state, "message": v.message, "artifact": v.artifact,
                "created_unix": v.created_unix,
                "services": v.services.iter().map(|s| serde_json::json!({"name": s.name, "instances": s.instances, "port": s.port, "limits": s.limits})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "sandboxes": sandboxes,
        }))
    }

    /// Creates a version and starts rolling it out in the background.
    pub fn deploy(
        self: &Arc<Self>,
        registry: &Arc<Registry>,
        app: &str,
        artifact: &str,
        services: Vec<Service>,
        issuer_url: String,
        now: i64,
    ) -> Result<String, AppError> {
        check_app_name(app)?;
        if services.is_empty() {
            return Err(AppError::Invalid("the app defines no services".into()));
        }
        for s in &services {
            if s.command.trim().is_empty() || s.instances == 0 || s.instances > 100 {
                return Err(AppError::Invalid(format!(
                    "service {}: needs a command and 1-100 instances",
                    s.name
                )));
            }
        }
        if self.tasks.is_stopping() {
            return Err(AppError::Invalid(
                "the coordinator is shutting down; deploy again once it is back".into(),
            ));
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
                state: "deploying".into(),
                message: String::new(),
            });
        })?;
        held.recorded(artifact);
        drop(held);
        let me = self.clone();
        let registry = registry.clone();
        let app = app.to_string();
        let version = version_id.clone();
        let artifact = artifact.to_string();
        self.tasks.spawn(crate::shutdown::ROLLOUT, async move {
            let rollout = me.roll_out(&registry, &app, &version, &artifact, &services, &issuer_url);
            let outcome = tokio::select! {
                outcome = rollout => outcome,
                _ = me.tasks.stopping() => {
                    me.observe.rollout::<()>(&Err(INTERRUPTED.into()));
                    me.interrupted(&registry, &app, &version).await;
                    return;
                }
            };
            me.observe.rollout(&outcome);
            let (state, message) = match &outcome {
                Ok(_) => ("active", String::new()),
                Err(e) => ("failed", e.clone()),
            };
            let result = me.update_app(&app, |rec| {
                let previous = rec.active.clone();
                for v in rec.versions.iter_mut() {
                    if v.id == version {
                        v.state = state.into();
                        v.message = message.clone();
                    } else if state == "active" && Some(&v.id) == previous.as_ref() {
                        v.state = "superseded".into();
                    }
                }
                if state == "active" {
                    rec.active = Some(version.clone());
                }
            });
            if let Err(e) = result {
                tracing::error!("recording rollout of {app} {version}: {e}");
            }
            // The new version now takes the traffic; let requests in flight
            // to the old one finish, then stop it (at once when shutting
            // down).
            if let Ok(old) = outcome {
                tokio::select! {
                    _ = tokio::time::sleep(DRAIN) => me.stop_all(&registry, &old).await,
                    _ = me.tasks.stopping() => {
                        me.stop_all_now(&registry, &old).await;
                        return;
                    }
                }
            }
            if me.tasks.is_stopping() {
                // Collected at the next start.
                return;
            }
            // Retention: the versions this app no longer keeps, and their
            // artifacts once no sandbox runs them.
            let collected = {
                let me = me.clone();
                let app = app.clone();
                tokio::task::spawn_blocking(move || me.collect(&app)).await
            };
            match collected {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("collecting old versions of {app}: {e}"),
                Err(e) => tracing::warn!("collecting old versions of {app}: {e}"),
            }
        });
        Ok(version_id)
    }

    async fn roll_out(
        &self,
        registry: &Registry,
        app: &str,
        version: &str,
        artifact: &str,
        services: &[Service],
        issuer_url: &str,
    ) -> Result<Vec<SandboxRecord>, String> {
        let now = transport::clock::now_unix();
        let mut candidates: Vec<(String, usize)> = registry
            .list(now)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| r.connected && !r.record.cordoned)
            .map(|r| (r.record.id, 0usize))
            .collect();
        if candidates.is_empty() {
            return Err("no ready runner to schedule on (see `miren runner list`)".into());
        }
        let existing = self.sandboxes().map_err(|e| e.to_string())?;
        for (id, load) in candidates.iter_mut() {
            *load = existing.iter().filter(|s| &s.runner == id).count();
        }
        let instances = services
            .iter()
            .flat_map(|s| std::iter::repeat_n(s, s.instances as usize));
        let mut started = Vec::new();
        for (service, runner) in instances.zip(placement(candidates, services)) {
            let id = format!(
                "{app}-{}-{}",
                service.name,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            let rec = SandboxRecord {
                id: id.clone(),
                app: app.to_string(),
                version: version.to_string(),
                service: service.name.clone(),
                runner: runner.clone(),
                artifact: artifact.to_string(),
                created_unix: now,
            };
            self.store
                .commit(Txn {
                    conditions: vec![Condition::Absent(format!("sandbox/{id}"))],
                    ops: vec![Op::Put(format!("sandbox/{id}"), encode(&rec))],
                })
                .map_err(|e| e.to_string())?;
            started.push(rec.clone());
            let spec = SandboxSpec {
                id: id.clone(),
                app: app.to_string(),
                version: version.to_string(),
                service: service.name.clone(),
                command: service.command.clone(),
                port: service.port,
                env: service.env.clone(),
                limits: service.limits,
                artifact: artifact.to_string(),
                issuer_url: issuer_url.to_string(),
            };
            let start = |tx| RunnerCommand::Start(spec, tx);
            if let Err(e) = registry.send(&runner, start, COMMAND_PATIENCE).await {
                self.stop_all(registry, &started).await;
                return Err(format!("starting {id} on runner {runner}: {e}"));
            }
        }
        // Wait until every new sandbox is healthy, or one fails.
        let deadline = tokio::time::Instant::now() + ROLLOUT_TIMEOUT;
        loop {
            let reports: Vec<(String, SandboxReport)> = started
                .iter()
                .map(|s| (s.id.clone(), self.report_of(&s.id)))
                .collect();
            let past_deadline = tokio::time::Instant::now() >= deadline;
            match health_wait(&reports, past_deadline) {
                HealthWait::Healthy => break,
                HealthWait::Waiting => tokio::time::sleep(Duration::from_millis(200)).await,
                HealthWait::Failed(why) => {
                    self.stop_all(registry, &started).await;
                    return Err(why);
                }
            }
        }
        // Healthy: every other sandbox of this app is to be retired (after
        // the new version takes the traffic).
        Ok(self
            .sandboxes()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|s| s.app == app && s.version != version)
            .collect())
    }

    async fn stop_all(&self, registry: &Registry, sandboxes: &[SandboxRecord]) {
        for s in sandboxes {
            let stop = |tx| RunnerCommand::Stop(s.id.clone(), tx);
            if let Err(e) = registry.send(&s.runner, stop, COMMAND_PATIENCE).await {
                tracing::warn!("stopping sandbox {} on {}: {e}", s.id, s.runner);
            }
            let _ = self.store.commit(Txn {
                conditions: vec![],
                ops: vec![Op::Delete(format!("sandbox/{}", s.id))],
            });
            if let Ok(mut r) = self.reports.lock() {
                r.remove(&s.id);
            }
        }
    }

    /// Stopping while the coordinator shuts down: the records go first, in
    /// one write; then each runner is asked to stop its sandbox, all at
    /// once and at most [`STOP_WHILE_STOPPING`].
    async fn stop_all_now(&self, registry: &Registry, sandboxes: &[SandboxRecord]) {
        let ops = sandboxes
            .iter()
            .map(|s| Op::Delete(format!("sandbox/{}", s.id)))
            .collect();
        if let Err(e) = self.store.commit(Txn {
            conditions: vec![],
            ops,
        }) {
            tracing::warn!("forgetting stopped sandboxes: {e}");
        }
        self.stop_on_runners(registry, sandboxes).await;
    }

    /// Asks the runners to stop `sandboxes` (already forgotten), all at
    /// once, at most [`STOP_WHILE_STOPPING`].
    async fn stop_on_runners(&self, registry: &Registry, sandboxes: &[SandboxRecord]) {
        if let Ok(mut r) = self.reports.lock() {
            for s in sandboxes {
                r.remove(&s.id);
            }
        }
        let stops = sandboxes.iter().map(|s| {
            let stop = |tx| RunnerCommand::Stop(s.id.clone(), tx);
            registry.send(&s.runner, stop, STOP_WHILE_STOPPING)
        });
        for (s, stopped) in sandboxes.iter().zip(futures::future::join_all(stops).await) {
            if let Err(e) = stopped {
                tracing::warn!("stopping sandbox {} on {} at shutdown: {e}", s.id, s.runner);
            }
        }
    }

    /// A rollout cut by shutdown: in one write, the version is recorded as
    /// failed ([`INTERRUPTED`]) and its sandboxes are forgotten; then their
    /// runners are asked to stop them.
    async fn interrupted(&self, registry: &Registry, app: &str, version: &str) {
        let key = format!("app/{app}");
        let forgotten = loop {
            let attempt = (|| -> Result<Option<Vec<SandboxRecord>>, AppError> {
                let Some(old) = self.store.get(&key)? else {
                    return Ok(Some(vec![]));
                };
                let mut rec: AppRecord = decode(&key, &old)?;
                for v in rec.versions.iter_mut().filter(|v| v.id == version) {
                    v.state = "failed".into();
                    v.message = INTERRUPTED.into();
                }
                let mine: Vec<SandboxRecord> = self
                    .sandboxes()?
                    .into_iter()
                    .filter(|s| s.app == app && s.version == version)
                    .collect();
                let mut ops = vec![Op::Put(key.clone(), encode(&rec))];
                ops.extend(mine.iter().map(|s| Op::Delete(format!("sandbox/{}", s.id))));
                let applied = self.store.commit(Txn {
                    conditions: vec![Condition::Equals(key.clone(), old)],
                    ops,
                })?;
                Ok((applied == Outcome::Applied).then_some(mine))
            })();
            match attempt {
                Ok(Some(mine)) => break mine,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("recording the interrupted rollout of {app} {version}: {e}");
                    return;
                }
            }
        };
        tracing::warn!("{app} {version}: rollout interrupted by shutdown, recorded as failed");
        self.stop_on_runners(registry, &forgotten).await;
    }

    /// The last `lines` output lines of every sandbox of `app`.
    pub async fn logs(
        &self,
        registry: &Registry,
        app: &str,
        lines: u32,
    ) -> Result<serde_json::Value, AppError> {
        if self.app(app)?.is_none() {
            return Err(AppError::NoSuchApp(app.to_string()));
        }
        let mut out = Vec::new();
        for s in self.sandboxes()?.into_iter().filter(|s| s.app == app) {
            let logs = |tx| RunnerCommand::Logs(s.id.clone(), lines, tx);
            let got = match registry.send(&s.runner, logs, LOGS_PATIENCE).await {
                Ok(lines) => Ok(lines),
                Err(SendError::Refused(e)) => Err(e),
                Err(SendError::NotConnected(_)) => Err("runner not connected".to_string()),
                Err(SendError::WentAway(_) | SendError::NoAnswer(_)) => {
                    Err("runner did not answer".to_string())
                }
            };
            out.push(match got {
                Ok(l) => serde_json::json!({"sandbox": s.id, "version": s.version, "lines": l}),
                Err(e) => serde_json::json!({"sandbox": s.id, "version": s.version, "lines": [], "error": e}),
            });
        }
        Ok(serde_json::Value::Array(out))
    }

    /// Stops every sandbox of an app, forgets it, and deletes its
    /// artifacts that no other app uses.
    pub async fn delete(&self, registry: &Registry, app: &str) -> Result<(), AppError> {
        if self.app(app)?.is_none() {
            return Err(AppError::NoSuchApp(app.to_string()));
        }
        let mine: Vec<SandboxRecord> = self
            .sandboxes()?
            .into_iter()
            .filter(|s| s.app == app)
            .collect();
        self.stop_all(registry, &mine).await;
        self.store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::Delete(format!("app/{app}"))],
        })?;
        // The app is gone either way; what fails here is collected later.
        if let Err(e) = self.collect_artifacts() {
            tracing::warn!("deleting the artifacts of {app}: {e}");
        }
        Ok(())
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
        };
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put("sandbox/web-a".into(), encode(&rec))],
            })
            .unwrap();
        // Tokens follow the same rule: see `crate::minting`.
        assert!(apps
            .report("runner-1", "web-a", SandboxReport::default())
            .is_ok());
        assert!(apps
            .report("runner-2", "web-a", SandboxReport::default())
            .is_err());
        assert!(apps
            .read_artifact("runner-2", &"0".repeat(64), 0, 10)
            .is_err());
    }

    fn service(name: &str, instances: u32) -> Service {
        Service {
            name: name.into(),
            command: "run".into(),
            port: 8080,
            instances,
            env: vec![],
            limits: ResourceLimits::default(),
        }
    }

    #[test]
    fn instances_go_to_the_least_loaded_runner_counting_those_just_placed() {
        let candidates = vec![
            ("a".to_string(), 2),
            ("b".to_string(), 0),
            ("c".to_string(), 1),
        ];
        let placed = placement(candidates, &[service("web", 3), service("worker", 2)]);
        // Each pick takes the least loaded runner at that moment, those just
        // placed counted: b (0), b (1, before c at 1), c (1), c (2, before
        // b and a at 2), b (2, before a at 2).
        assert_eq!(placed, ["b", "b", "c", "c", "b"]);
        let loads = |r: &str| placed.iter().filter(|p| *p == r).count();
        assert_eq!((loads("a"), loads("b"), loads("c")), (0, 3, 2));
        // Two idle runners and two instances: one each.
        let two = placement(
            vec![("r1".to_string(), 0), ("r2".to_string(), 0)],
            &[service("web", 2)],
        );
        assert_eq!(two, ["r1", "r2"]);
        assert!(placement(vec![], &[service("web", 1)]).is_empty());
    }

    fn report(state: &str) -> SandboxReport {
        SandboxReport {
            state: state.into(),
            restarts: 3,
            last_log: "boom".into(),
            ..SandboxReport::default()
        }
    }

    #[test]
    fn the_health_wait_fails_fast_succeeds_when_all_are_healthy_and_times_out() {
        let r = |pairs: &[(&str, &str)]| -> Vec<(String, SandboxReport)> {
            pairs
                .iter()
                .map(|(id, s)| (id.to_string(), report(s)))
                .collect()
        };
        assert_eq!(
            health_wait(&r(&[("a", "healthy"), ("b", "healthy")]), false),
            HealthWait::Healthy
        );
        assert_eq!(
            health_wait(&r(&[("a", "healthy"), ("b", "starting")]), false),
            HealthWait::Waiting
        );
        // A failed sandbox fails the version even before the deadline.
        let HealthWait::Failed(why) = health_wait(&r(&[("a", "healthy"), ("b", "failed")]), false)
        else {
            panic!("a failed sandbox must fail the version");
        };
        assert!(
            why.starts_with("sandbox b failed to become healthy (restarts: 3)"),
            "{why}"
        );
        assert!(why.ends_with("last log lines:\nboom"), "{why}");
        let HealthWait::Failed(why) = health_wait(&r(&[("a", "healthy"), ("b", "")]), true) else {
            panic!("past the deadline the version fails");
        };
        assert!(
            why.starts_with("new version did not become healthy within 90s:"),
            "{why}"
        );
        assert!(why.contains("a: healthy boom\nb:  boom"), "{why}");
        // All healthy right at the deadline still counts.
        assert_eq!(
            health_wait(&r(&[("a", "healthy")]), true),
            HealthWait::Healthy
        );
    }

    fn version(id: &str, state: &str, artifact: &str) -> Version {
        Version {
            id: id.into(),
            artifact: artifact.into(),
            services: vec![],
            created_unix: 0,
            state: state.into(),
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
        web.versions[7].state = "active".into();
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
        let registry = Registry::new(f.store.clone(), Duration::from_secs(3600));
        f.rt.block_on(apps.delete(&registry, "web")).unwrap();
        assert!(apps.app("web").unwrap().is_none());
        assert!(apps.sandboxes().unwrap().is_empty());
        assert_eq!(f.stored(), [shas[1].clone(), fresh]);
        assert!(matches!(
            f.rt.block_on(apps.delete(&registry, "web")),
            Err(AppError::NoSuchApp(_))
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
