//! Apps, versions, sandboxes, the artifact store and rollouts.
//!
//! An app version is an uploaded artifact (a `.tar.gz` stored by SHA-256)
//! plus its services. Deploying schedules every instance on a ready,
//! uncordoned runner (spread: fewest sandboxes first), waits until every new
//! sandbox reports healthy, and only then stops the previous version; a
//! version that does not become healthy is stopped and the old one keeps
//! serving. Durable records: `app/<name>`, `sandbox/<id>`. What runners
//! report about sandboxes (state, restarts, address, last log lines) is
//! kept in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::runners::Registry;
use crate::store::{decode, encode, Condition, Op, Outcome, Store, StoreError, Txn};

/// Largest artifact accepted.
pub const MAX_ARTIFACT_BYTES: u64 = 512 * 1024 * 1024;
/// How long the old version keeps running after the new one took over.
pub const DRAIN: Duration = Duration::from_secs(2);
/// How long a new version has to become healthy.
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

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
    #[error("artifact store: {0}")]
    Io(String),
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

/// A service's resource limits as `app.toml` asked for them; 0 = the
/// runner's default. Runners enforce them (cgroups) and refuse values over
/// their maximum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    pub memory_bytes: u64,
    /// Thousandths of a CPU.
    pub cpu_millis: u32,
    pub pids: u32,
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

/// What the coordinator sends to a runner (to the task that owns its agent
/// capability).
pub enum RunnerCommand {
    Start(SandboxSpec, oneshot::Sender<Result<(), String>>),
    Stop(String, oneshot::Sender<Result<(), String>>),
    Logs(String, u32, oneshot::Sender<Result<Vec<String>, String>>),
}

/// Everything a runner needs to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub app: String,
    pub version: String,
    pub service: Service,
    pub artifact: String,
    pub issuer_url: String,
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

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Apps, sandboxes and artifacts.
pub struct Apps {
    store: Arc<dyn Store>,
    /// Where rollouts run (the multi-threaded runtime, not an RPC worker).
    rt: tokio::runtime::Handle,
    artifacts: PathBuf,
    reports: Mutex<HashMap<String, SandboxReport>>,
}

/// An artifact being uploaded: written to a temporary file while hashing.
pub struct Upload {
    file: Option<std::fs::File>,
    tmp: PathBuf,
    dir: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl Upload {
    /// Appends a chunk.
    pub fn write(&mut self, data: &[u8]) -> Result<(), AppError> {
        use std::io::Write;
        self.size += data.len() as u64;
        if self.size > MAX_ARTIFACT_BYTES {
            return Err(AppError::Invalid(format!(
                "artifact larger than {} MiB",
                MAX_ARTIFACT_BYTES / 1024 / 1024
            )));
        }
        self.hasher.update(data);
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| AppError::Invalid("upload already finished".into()))?;
        f.write_all(data).map_err(|e| AppError::Io(e.to_string()))
    }

    /// Checks the digest the client announced and stores the artifact.
    pub fn finish(&mut self, announced: &str) -> Result<u64, AppError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| AppError::Invalid("upload already finished".into()))?;
        file.sync_all().map_err(|e| AppError::Io(e.to_string()))?;
        let digest = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if digest != announced {
            return Err(AppError::Invalid(format!(
                "upload corrupted: received sha256 {digest}, client announced {announced}"
            )));
        }
        std::fs::rename(&self.tmp, self.dir.join(&digest))
            .map_err(|e| AppError::Io(e.to_string()))?;
        Ok(self.size)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Apps {
    pub fn new(
        store: Arc<dyn Store>,
        data_dir: &Path,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, AppError> {
        let artifacts = data_dir.join("artifacts");
        transport::files::ensure_private_dir(&artifacts)
            .map_err(|e| AppError::Io(e.to_string()))?;
        Ok(Apps {
            store,
            rt,
            artifacts,
            reports: Mutex::new(HashMap::new()),
        })
    }

    /// Starts an upload.
    pub fn upload(&self) -> Result<Upload, AppError> {
        let tmp = self
            .artifacts
            .join(format!(".upload-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&tmp).map_err(|e| AppError::Io(e.to_string()))?;
        Ok(Upload {
            file: Some(file),
            tmp,
            dir: self.artifacts.clone(),
            hasher: Sha256::new(),
            size: 0,
        })
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
        use std::io::{Read, Seek, SeekFrom};
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
        let mut f = std::fs::File::open(self.artifacts.join(sha))
            .map_err(|_| AppError::NoSuchArtifact(sha.to_string()))?;
        let size = f.metadata().map_err(|e| AppError::Io(e.to_string()))?.len();
        f.seek(SeekFrom::Start(offset.min(size)))
            .map_err(|e| AppError::Io(e.to_string()))?;
        let mut buf =
            vec![0u8; (length.min(4 << 20) as u64).min(size.saturating_sub(offset)) as usize];
        f.read_exact(&mut buf)
            .map_err(|e| AppError::Io(e.to_string()))?;
        Ok((buf, size))
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

    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, AppError> {
        self.store
            .scan("sandbox/")?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map_err(AppError::from))
            .collect()
    }

    fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, AppError> {
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

    /// App and sandbox of a token request from `runner`, checked against
    /// our own records (never what the runner claims).
    pub fn authorize_token(
        &self,
        runner: &str,
        sandbox_id: &str,
    ) -> Result<SandboxRecord, AppError> {
        match self.sandbox(sandbox_id)? {
            Some(s) if s.runner == runner => Ok(s),
            _ => Err(AppError::NotYourSandbox),
        }
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
        if !is_sha256_hex(artifact) || !self.artifacts.join(artifact).exists() {
            return Err(AppError::NoSuchArtifact(artifact.to_string()));
        }
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
        let mut version_id = String::new();
        self.update_app(app, |rec| {
            let n = rec.versions.len() + 1;
            version_id = format!("v{n}");
            rec.versions.push(Version {
                id: version_id.clone(),
                artifact: artifact.to_string(),
                services: services.clone(),
                created_unix: now,
                state: "deploying".into(),
                message: String::new(),
            });
        })?;
        let me = self.clone();
        let registry = registry.clone();
        let app = app.to_string();
        let version = version_id.clone();
        let artifact = artifact.to_string();
        self.rt.spawn(async move {
            let outcome = me
                .roll_out(&registry, &app, &version, &artifact, &services, &issuer_url)
                .await;
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
            // to the old one finish, then stop it.
            if let Ok(old) = outcome {
                tokio::time::sleep(DRAIN).await;
                me.stop_all(&registry, &old).await;
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
        let now = crate::datadir::now_unix();
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
        let mut started = Vec::new();
        for service in services {
            for _ in 0..service.instances {
                candidates.sort_by_key(|(_, load)| *load);
                let (runner, load) = &mut candidates[0];
                *load += 1;
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
                    service: service.clone(),
                    artifact: artifact.to_string(),
                    issuer_url: issuer_url.to_string(),
                };
                if let Err(e) = send(registry, runner, |tx| RunnerCommand::Start(spec, tx)).await {
                    self.stop_all(registry, &started).await;
                    return Err(format!("starting {id} on runner {runner}: {e}"));
                }
            }
        }
        // Wait until every new sandbox is healthy, or one fails.
        let deadline = tokio::time::Instant::now() + ROLLOUT_TIMEOUT;
        loop {
            let reports: Vec<(String, SandboxReport)> = started
                .iter()
                .map(|s| (s.id.clone(), self.report_of(&s.id)))
                .collect();
            if let Some((id, r)) = reports.iter().find(|(_, r)| r.state == "failed") {
                self.stop_all(registry, &started).await;
                return Err(format!(
                    "sandbox {id} failed to become healthy (restarts: {}); last log lines:\n{}",
                    r.restarts, r.last_log
                ));
            }
            if reports.iter().all(|(_, r)| r.state == "healthy") {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let last = reports
                    .iter()
                    .map(|(id, r)| format!("{id}: {} {}", r.state, r.last_log))
                    .collect::<Vec<_>>()
                    .join("\n");
                self.stop_all(registry, &started).await;
                return Err(format!(
                    "new version did not become healthy within {}s:\n{last}",
                    ROLLOUT_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
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
            if let Err(e) = send(registry, &s.runner, |tx| {
                RunnerCommand::Stop(s.id.clone(), tx)
            })
            .await
            {
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
            let got = match registry.commands(&s.runner) {
                Some(tx) => {
                    let (done, wait) = oneshot::channel();
                    if tx
                        .send(RunnerCommand::Logs(s.id.clone(), lines, done))
                        .is_err()
                    {
                        Err("runner not connected".to_string())
                    } else {
                        match tokio::time::timeout(Duration::from_secs(10), wait).await {
                            Ok(Ok(r)) => r,
                            _ => Err("runner did not answer".into()),
                        }
                    }
                }
                None => Err("runner not connected".into()),
            };
            out.push(match got {
                Ok(l) => serde_json::json!({"sandbox": s.id, "version": s.version, "lines": l}),
                Err(e) => serde_json::json!({"sandbox": s.id, "version": s.version, "lines": [], "error": e}),
            });
        }
        Ok(serde_json::Value::Array(out))
    }

    /// Stops every sandbox of an app and forgets it.
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
        Ok(())
    }
}

async fn send(
    registry: &Registry,
    runner: &str,
    make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> RunnerCommand,
) -> Result<(), String> {
    let tx: mpsc::UnboundedSender<RunnerCommand> = registry
        .commands(runner)
        .ok_or_else(|| format!("runner {runner} is not connected"))?;
    let (done, wait) = oneshot::channel();
    tx.send(make(done))
        .map_err(|_| format!("runner {runner} is not connected"))?;
    match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(format!("runner {runner} went away")),
        Err(_) => Err(format!("runner {runner} did not answer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    #[test]
    fn a_runner_gets_tokens_only_for_sandboxes_it_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let apps = Apps::new(store.clone(), dir.path(), rt.handle().clone()).unwrap();
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
        assert_eq!(
            apps.authorize_token("runner-1", "web-a").unwrap().app,
            "web"
        );
        let refused = apps.authorize_token("runner-2", "web-a").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "not authorized to issue a token for this sandbox"
        );
        assert!(matches!(
            apps.authorize_token("runner-1", "nope"),
            Err(AppError::NotYourSandbox)
        ));
        // Reports and artifacts follow the same rule.
        assert!(apps
            .report("runner-2", "web-a", SandboxReport::default())
            .is_err());
        assert!(apps
            .read_artifact("runner-2", &"0".repeat(64), 0, 10)
            .is_err());
    }

    #[test]
    fn app_names_are_checked() {
        assert!(check_app_name("web-1").is_ok());
        for bad in ["", "-web", "Web", "a/b", "a:b", &"a".repeat(64)] {
            assert!(check_app_name(bad).is_err(), "{bad}");
        }
    }
}
