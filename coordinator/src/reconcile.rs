//! The reconcile loop: reads desired state from the store and what runners
//! reported, asks [`crate::converge`] what to do, and does it.
//!
//! Level-triggered, like a Kubernetes controller: every pass starts from
//! the records and the live reports, never from memory of earlier passes,
//! so a coordinator killed at any point resumes where the records say. Each
//! store write is a compare-and-set on the revisions the pass read (a
//! concurrent deploy or delete makes it fail, and the next pass decides
//! again); each runner command is idempotent on the runner (starting what
//! runs, or stopping what is gone, is a no-op), and a command already sent
//! is not sent again for [`COMMAND_RETRY`].
//!
//! A pass runs every [`PASS_EVERY`], and at once when a deploy, a report or
//! a heartbeat wakes it. A deploy, cordon or drain made through another
//! coordinator wakes the leader's loop through a store watch of the
//! desired state ([`DESIRED_STATE`], [`Reconciler::wake_on_desired_state`]). On shutdown, versions still deploying are recorded
//! as failed ("interrupted") and their sandboxes forgotten in one write,
//! then their runners are asked to stop them (at most
//! [`STOP_WHILE_STOPPING`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::apps::{
    app_key, sandbox_key, version_generation, AppError, AppRecord, Apps, SandboxRecord, INTERRUPTED,
};
use crate::ci::CiBindings;
use crate::converge::{
    self, AssignmentView, RunnerStep, RunnerView, Step, Timing, VersionState, VersionView,
};
use crate::routes::{route_key, Routes};
use crate::runners::{Registry, Reply, RunnerCommand, SandboxSpec, SendError};
use crate::shutdown::Tasks;
use crate::store::{decode, encode, Condition, Op, Outcome, Store, StoreError, Txn};

/// The prefixes of the desired state whose changes wake the loop (apps and
/// their versions; runners cordoned or drained).
pub const DESIRED_STATE: [&str; 2] = ["app/", "runner/"];

/// Wakes the reconcile loop when the desired state changes in the store,
/// whichever coordinator wrote it.
/// One per prefix of [`DESIRED_STATE`]: a watch of the whole store would
/// stream every artifact chunk and sealed record to every coordinator only
/// to drop them.
struct DesiredStateWake {
    prefix: &'static str,
    wake: Arc<tokio::sync::Notify>,
}

impl crate::watched::Watched for DesiredStateWake {
    const NAME: &'static str = "reconcile wake";

    fn prefix(&self) -> &str {
        self.prefix
    }

    fn reload(&self, store: &dyn Store) -> Result<crate::store::Revision, StoreError> {
        // Nothing is kept; what changed while the watch was down is read
        // by the pass this wakes.
        let now = store.revision()?;
        self.wake.notify_one();
        Ok(now)
    }

    fn apply(&self, batch: &crate::store::WatchBatch) {
        if !batch.events.is_empty() {
            self.wake.notify_one();
        }
    }
}

/// The least time between two passes.
const MIN_PASS_GAP: Duration = Duration::from_millis(100);
/// How often a pass runs without being woken.
pub const PASS_EVERY: Duration = Duration::from_secs(1);
/// A start or stop sent and not yet seen in the runner's inventory is sent
/// again after this long.
pub const COMMAND_RETRY: Duration = Duration::from_secs(30);
/// How long a runner has to answer a start or stop.
const COMMAND_PATIENCE: Duration = Duration::from_secs(60);
/// How long stopping sandboxes may take while the coordinator shuts down.
const STOP_WHILE_STOPPING: Duration = Duration::from_secs(2);
/// Compare-and-set attempts of `app delete` before it reports contention.
const DELETE_ATTEMPTS: usize = 8;

/// The loop's knobs (from `miren server` flags).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub timing: Timing,
    /// How long a runner may be down before its sandboxes are placed on
    /// other runners.
    pub runner_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timing: Timing {
                rollout_timeout_secs: crate::apps::ROLLOUT_TIMEOUT.as_secs() as i64,
                drain_secs: crate::apps::DRAIN.as_secs() as i64,
            },
            runner_grace: Duration::from_secs(60),
        }
    }
}

/// Why a reconcile pass stopped early (the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] crate::runners::RegistryError),
}

/// Why `app delete` failed.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Routes(#[from] crate::routes::RoutesError),
    #[error("app {0:?} kept changing while it was being deleted; try again")]
    Contended(String),
    #[error(transparent)]
    Ci(#[from] crate::ci::CiError),
}

/// Drives the cluster towards its records.
pub struct Reconciler {
    store: Arc<dyn Store>,
    apps: Arc<Apps>,
    registry: Arc<Registry>,
    routes: Arc<Routes>,
    ci: Arc<CiBindings>,
    tasks: Tasks,
    issuer_url: String,
    settings: Settings,
    /// Passes run only while this coordinator leads.
    leadership: crate::leader::Leadership,
    started_unix: i64,
    /// Commands sent and not yet reflected in an inventory, by
    /// (sandbox, is-stop), with when they were sent.
    sent: Mutex<HashMap<(String, bool), tokio::time::Instant>>,
}

/// A record with the revision it was read at.
struct Read<T> {
    rev: u64,
    rec: T,
}

fn read_all<T: for<'de> serde::Deserialize<'de>>(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<Read<T>>, StoreError> {
    let (kvs, _) = store.scan_kv(prefix)?;
    kvs.into_iter()
        .map(|kv| {
            Ok(Read {
                rev: kv.mod_revision,
                rec: decode(&kv.key, &kv.value)?,
            })
        })
        .collect()
}

impl Reconciler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        apps: Arc<Apps>,
        registry: Arc<Registry>,
        routes: Arc<Routes>,
        ci: Arc<CiBindings>,
        tasks: Tasks,
        issuer_url: String,
        settings: Settings,
        leadership: crate::leader::Leadership,
    ) -> Reconciler {
        Reconciler {
            store,
            apps,
            registry,
            routes,
            ci,
            tasks,
            issuer_url,
            settings,
            leadership,
            started_unix: transport::clock::now_unix(),
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Wakes the loop on every change of the desired state in the store
    /// (deploys through other coordinators included) until shutdown.
    pub fn wake_on_desired_state(&self, tasks: &Tasks) -> Result<(), StoreError> {
        for prefix in DESIRED_STATE {
            let wake = Arc::new(DesiredStateWake {
                prefix,
                wake: self.apps.waker().clone(),
            });
            let from = crate::watched::Watched::reload(&*wake, &*self.store)?;
            crate::watched::follow(wake, self.store.clone(), from, tasks);
        }
        Ok(())
    }

    /// Runs passes until shutdown, then records interrupted rollouts.
    pub async fn run(self: Arc<Self>) {
        let wake = self.apps.waker().clone();
        loop {
            tokio::select! {
                _ = self.tasks.stopping() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(PASS_EVERY) => {}
            }
            if self.tasks.is_stopping() {
                break;
            }
            // Another coordinator reconciles; this one stands by.
            if !self.leadership.is_leader() {
                continue;
            }
            if let Err(e) = self.pass().await {
                tracing::warn!("reconcile pass: {e}");
            }
            // Wakes that came during the pass run one more pass, not one
            // each: heartbeats and reports of many runners coalesce.
            tokio::time::sleep(MIN_PASS_GAP).await;
        }
        if self.leadership.is_leader() {
            self.interrupt().await;
        }
    }

    /// The runners as placement sees them at `now`.
    fn runner_views(&self, now: i64) -> Result<Vec<RunnerView>, PassError> {
        let grace = self.settings.runner_grace.as_secs() as i64;
        let list = self.registry.list(now)?;
        Ok(list
            .into_iter()
            .map(|r| {
                let down_for = now - r.last_seen_unix.max(self.started_unix);
                RunnerView {
                    placeable: r.connected && !r.record.cordoned && !r.record.draining,
                    lost: !r.connected && down_for > grace,
                    draining: r.record.draining,
                    id: r.record.id,
                }
            })
            .collect())
    }

    /// One pass over every app and every runner.
    pub async fn pass(&self) -> Result<(), PassError> {
        let now = transport::clock::now_unix();
        let runners = self.runner_views(now)?;
        let apps: Vec<Read<AppRecord>> = read_all(&*self.store, "app/")?;
        let sandboxes: Vec<Read<SandboxRecord>> = read_all(&*self.store, "sandbox/")?;
        let mut load: HashMap<String, usize> = HashMap::new();
        for s in sandboxes.iter().filter(|s| s.rec.retire_at.is_none()) {
            *load.entry(s.rec.runner.clone()).or_default() += 1;
        }
        let reports = self.apps.reports().clone();
        let runner_of: HashMap<&str, &str> = sandboxes
            .iter()
            .map(|s| (s.rec.id.as_str(), s.rec.runner.as_str()))
            .collect();
        let health = |id: &str| match runner_of.get(id) {
            Some(runner) => reports.health(runner, id),
            None => converge::Health::Unknown,
        };

        for app in &apps {
            let mine: Vec<&Read<SandboxRecord>> = sandboxes
                .iter()
                .filter(|s| s.rec.app == app.rec.name)
                .collect();
            let versions: Vec<VersionView> = app
                .rec
                .versions
                .iter()
                .map(|v| VersionView {
                    id: v.id.clone(),
                    accepted_revision: version_generation(&v.id),
                    accepted_unix: v.created_unix,
                    state: v.state,
                    services: v
                        .services
                        .iter()
                        .map(|s| (s.name.clone(), s.instances))
                        .collect::<BTreeMap<_, _>>(),
                })
                .collect();
            let assignments: Vec<AssignmentView> = mine.iter().map(|s| view(&s.rec)).collect();
            let steps = converge::plan_app(
                &versions,
                &assignments,
                &runners,
                &health,
                &load,
                self.settings.timing,
                now,
            );
            for s in &steps {
                if let Step::Assign { runner, .. } = s {
                    *load.entry(runner.clone()).or_default() += 1;
                }
            }
            if !steps.is_empty() {
                self.apply(app, &mine, steps, now)?;
            }
        }

        // Assignments of apps that no longer exist stop at once.
        let orphans: Vec<&Read<SandboxRecord>> = sandboxes
            .iter()
            .filter(|s| s.rec.retire_at.is_none())
            .filter(|s| !apps.iter().any(|a| a.rec.name == s.rec.app))
            .collect();
        if !orphans.is_empty() {
            let mut txn = Txn::default();
            for s in orphans {
                let mut rec = s.rec.clone();
                rec.retire_at = Some(now);
                txn.conditions
                    .push(Condition::ModRevision(rec.key(), s.rev));
                txn.ops.push(Op::Put(rec.key(), encode(&rec)));
            }
            self.store.commit(txn)?;
        }

        // Each runner runs what is assigned to it, and nothing else.
        let by_app: HashMap<&str, &AppRecord> =
            apps.iter().map(|a| (a.rec.name.as_str(), &a.rec)).collect();
        for r in &runners {
            let assigned: Vec<&Read<SandboxRecord>> =
                sandboxes.iter().filter(|s| s.rec.runner == r.id).collect();
            if r.lost {
                // Nothing to wait for: retired records there go now.
                let gone: Vec<&Read<SandboxRecord>> = assigned
                    .into_iter()
                    .filter(|s| s.rec.retire_at.is_some())
                    .collect();
                self.forget(&gone)?;
                continue;
            }
            let Some(inventory) = reports.inventory_of(&r.id) else {
                continue;
            };
            self.clear_sent(&inventory.sandboxes, &assigned);
            let views: Vec<AssignmentView> = assigned.iter().map(|s| view(&s.rec)).collect();
            let mut gone: Vec<&Read<SandboxRecord>> = Vec::new();
            for step in converge::plan_runner(&views, &inventory.sandboxes, now) {
                match step {
                    RunnerStep::Start(id) => {
                        if let Some(s) = assigned.iter().find(|s| s.rec.id == id) {
                            if let Some(spec) = self.spec(&s.rec, &by_app) {
                                self.command(&r.id, id, false, |tx| RunnerCommand::Start(spec, tx));
                            }
                        }
                    }
                    RunnerStep::Stop(id) => {
                        let sid = id.clone();
                        self.command(&r.id, id, true, |tx| RunnerCommand::Stop(sid, tx));
                    }
                    RunnerStep::Forget(id) => {
                        gone.extend(assigned.iter().copied().filter(|s| s.rec.id == id));
                    }
                }
            }
            // One write (and one artifact collection) for all of them.
            self.forget(&gone)?;
        }
        // Runners whose record is gone (removed): their retired records go.
        let known: BTreeSet<&str> = runners.iter().map(|r| r.id.as_str()).collect();
        let unowned: Vec<&Read<SandboxRecord>> = sandboxes
            .iter()
            .filter(|s| s.rec.retire_at.is_some() && !known.contains(s.rec.runner.as_str()))
            .collect();
        self.forget(&unowned)?;
        Ok(())
    }

    /// Applies one app's steps: sandbox records first (one transaction,
    /// conditioned on the app record being unchanged), then the version
    /// states (one compare-and-set of the app record).
    fn apply(
        &self,
        app: &Read<AppRecord>,
        mine: &[&Read<SandboxRecord>],
        steps: Vec<Step>,
        now: i64,
    ) -> Result<(), PassError> {
        let key = app_key(&app.rec.name);
        let mut txn = Txn {
            conditions: vec![Condition::ModRevision(key.clone(), app.rev)],
            ops: vec![],
        };
        let mut rec = app.rec.clone();
        let mut record_changed = false;
        // Rollouts ended by this pass: activated (true) or failed.
        let mut outcomes: Vec<bool> = Vec::new();
        let mut activated = false;
        for step in steps {
            match step {
                Step::Assign {
                    version,
                    service,
                    runner,
                    replaces,
                } => {
                    let Some(v) = app.rec.versions.iter().find(|v| v.id == version) else {
                        continue;
                    };
                    let id = format!(
                        "{}-{}-{}",
                        app.rec.name,
                        service,
                        &uuid::Uuid::new_v4().simple().to_string()[..8]
                    );
                    let s = SandboxRecord {
                        id,
                        app: app.rec.name.clone(),
                        version,
                        service,
                        runner,
                        artifact: v.artifact.clone(),
                        created_unix: now,
                        retire_at: None,
                        replaces,
                    };
                    txn.conditions.push(Condition::Absent(s.key()));
                    txn.ops.push(Op::Put(s.key(), encode(&s)));
                }
                Step::Retire { sandbox, at } => {
                    if let Some(s) = mine.iter().find(|s| s.rec.id == sandbox) {
                        let mut r = s.rec.clone();
                        r.retire_at = Some(at);
                        txn.conditions.push(Condition::ModRevision(r.key(), s.rev));
                        txn.ops.push(Op::Put(r.key(), encode(&r)));
                    }
                }
                Step::Activate { version } => {
                    let previous = rec.active.clone();
                    for v in rec.versions.iter_mut() {
                        if v.id == version {
                            v.state = VersionState::Active;
                            v.message.clear();
                        } else if Some(&v.id) == previous.as_ref() {
                            v.state = VersionState::Superseded;
                        }
                    }
                    rec.active = Some(version);
                    record_changed = true;
                    activated = true;
                    outcomes.push(true);
                }
                Step::Fail { version, reason } => {
                    for v in rec.versions.iter_mut().filter(|v| v.id == version) {
                        v.state = VersionState::Failed;
                        v.message = reason.clone();
                    }
                    record_changed = true;
                    outcomes.push(false);
                }
                Step::Supersede { version } => {
                    for v in rec.versions.iter_mut().filter(|v| v.id == version) {
                        v.state = VersionState::Superseded;
                        v.message = "superseded by a later deploy".into();
                    }
                    record_changed = true;
                }
            }
        }
        if !txn.ops.is_empty() && self.store.commit(txn)? != Outcome::Applied {
            // Something changed under us: the next pass decides again.
            return Ok(());
        }
        if record_changed {
            let applied = self.store.commit(Txn {
                conditions: vec![Condition::ModRevision(key, app.rev)],
                ops: vec![Op::Put(app_key(&rec.name), encode(&rec))],
            })?;
            if applied == Outcome::Applied {
                for activated in &outcomes {
                    self.apps.count_rollout(*activated);
                }
                if activated {
                    let apps = self.apps.clone();
                    let name = rec.name.clone();
                    self.tasks.spawn("collection", async move {
                        let collected =
                            tokio::task::spawn_blocking(move || apps.collect(&name)).await;
                        if let Ok(Err(e)) = collected {
                            tracing::warn!("collecting old versions: {e}");
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Deletes retired records (their sandboxes are gone).
    fn forget(&self, gone: &[&Read<SandboxRecord>]) -> Result<(), StoreError> {
        if gone.is_empty() {
            return Ok(());
        }
        let mut txn = Txn::default();
        for s in gone {
            txn.conditions
                .push(Condition::ModRevision(s.rec.key(), s.rev));
            txn.ops.push(Op::Delete(s.rec.key()));
        }
        if self.store.commit(txn)? == Outcome::Applied {
            // Their artifacts may now be named by nothing.
            let apps = self.apps.clone();
            self.tasks.spawn("collection", async move {
                let _ = tokio::task::spawn_blocking(move || apps.collect_unused()).await;
            });
        }
        Ok(())
    }

    /// What a runner needs to start `s`, from its version's service.
    fn spec(&self, s: &SandboxRecord, apps: &HashMap<&str, &AppRecord>) -> Option<SandboxSpec> {
        let app = apps.get(s.app.as_str())?;
        let version = app.versions.iter().find(|v| v.id == s.version)?;
        let service = version.services.iter().find(|x| x.name == s.service)?;
        Some(SandboxSpec {
            id: s.id.clone(),
            app: s.app.clone(),
            version: s.version.clone(),
            service: service.name.clone(),
            command: service.command.clone(),
            port: service.port,
            env: service.env.clone(),
            limits: service.limits,
            artifact: s.artifact.clone(),
            issuer_url: self.issuer_url.clone(),
        })
    }

    /// Forgets sent commands the inventory now reflects.
    fn clear_sent(&self, inventory: &BTreeSet<String>, assigned: &[&Read<SandboxRecord>]) {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.retain(|(id, stop), _| {
            let running = inventory.contains(id);
            let wanted = assigned
                .iter()
                .any(|s| &s.rec.id == id && s.rec.retire_at.is_none());
            // A start is done once it runs; a stop once it does not.
            if *stop {
                running
            } else {
                !running && wanted
            }
        });
    }

    /// Sends a command to `runner` unless the same was sent recently; the
    /// answer is awaited off the pass.
    fn command(
        &self,
        runner: &str,
        sandbox: String,
        stop: bool,
        make: impl FnOnce(Reply<()>) -> RunnerCommand + Send + 'static,
    ) {
        {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            let key = (sandbox.clone(), stop);
            let now = tokio::time::Instant::now();
            if sent
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < COMMAND_RETRY)
            {
                return;
            }
            sent.insert(key, now);
        }
        let registry = self.registry.clone();
        let reports = self.apps.reports().clone();
        let wake = self.apps.waker().clone();
        let runner = runner.to_string();
        self.tasks.spawn("runner command", async move {
            match registry.send(&runner, make, COMMAND_PATIENCE).await {
                Ok(()) => {}
                // The runner will not run it (over its limits, an artifact it
                // refuses): the sandbox fails with its words, and so does a
                // rollout waiting for it.
                Err(SendError::Refused(why)) if !stop => {
                    tracing::warn!("runner {runner} refused to start {sandbox}: {why}");
                    reports.start_refused(&runner, &sandbox, &why.0, transport::clock::now_unix());
                    wake.notify_one();
                }
                Err(e) => {
                    let what = if stop { "stopping" } else { "starting" };
                    tracing::warn!("{what} sandbox {sandbox} on runner {runner}: {e}");
                }
            }
        });
    }

    /// On shutdown: versions still deploying are recorded as failed
    /// ("interrupted") with their sandboxes forgotten, one write per app;
    /// then their runners are asked to stop them.
    async fn interrupt(&self) {
        let apps: Vec<Read<AppRecord>> = match read_all(&*self.store, "app/") {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("recording interrupted rollouts: {e}");
                return;
            }
        };
        let sandboxes: Vec<Read<SandboxRecord>> =
            read_all(&*self.store, "sandbox/").unwrap_or_default();
        let mut stops = Vec::new();
        for app in apps {
            let deploying: Vec<String> = app
                .rec
                .versions
                .iter()
                .filter(|v| v.state == VersionState::Deploying)
                .map(|v| v.id.clone())
                .collect();
            if deploying.is_empty() {
                continue;
            }
            let mut rec = app.rec.clone();
            for v in rec
                .versions
                .iter_mut()
                .filter(|v| deploying.contains(&v.id))
            {
                v.state = VersionState::Failed;
                v.message = INTERRUPTED.into();
            }
            let key = app_key(&rec.name);
            let mut txn = Txn {
                conditions: vec![Condition::ModRevision(key.clone(), app.rev)],
                ops: vec![Op::Put(key, encode(&rec))],
            };
            let mine: Vec<&Read<SandboxRecord>> = sandboxes
                .iter()
                .filter(|s| s.rec.app == rec.name && deploying.contains(&s.rec.version))
                .collect();
            for s in &mine {
                txn.conditions
                    .push(Condition::ModRevision(s.rec.key(), s.rev));
                txn.ops.push(Op::Delete(s.rec.key()));
            }
            match self.store.commit(txn) {
                Ok(Outcome::Applied) => {
                    for v in &deploying {
                        tracing::warn!(
                            "{} {v}: rollout interrupted by shutdown, recorded as failed",
                            rec.name
                        );
                        self.apps.count_rollout(false);
                    }
                    stops.extend(mine.iter().map(|s| s.rec.clone()));
                }
                Ok(Outcome::ConditionFailed) => {
                    tracing::warn!(
                        "{}: changed during shutdown; its rollout resumes at the next start",
                        rec.name
                    )
                }
                Err(e) => tracing::error!("recording the interrupted rollout of {}: {e}", rec.name),
            }
        }
        let registry = &self.registry;
        let sends = stops.iter().map(|s| {
            let stop = |tx| RunnerCommand::Stop(s.id.clone(), tx);
            registry.send(&s.runner, stop, STOP_WHILE_STOPPING)
        });
        for (s, stopped) in stops.iter().zip(futures::future::join_all(sends).await) {
            if let Err(e) = stopped {
                tracing::warn!("stopping sandbox {} on {} at shutdown: {e}", s.id, s.runner);
            }
        }
    }

    /// `app delete`: in one transaction the app record, its sandbox
    /// assignments, its routes, its deploy keys and its CI bindings go; runners then stop
    /// the sandboxes (asked now, and again by the loop from their
    /// inventories), and artifacts nothing names are collected.
    pub async fn delete_app(&self, name: &str) -> Result<(), DeleteError> {
        for _ in 0..DELETE_ATTEMPTS {
            let key = app_key(name);
            let Some(kv) = self.store.get_kv(&key)? else {
                return Err(AppError::NoSuchApp(name.to_string()).into());
            };
            let sandboxes: Vec<Read<SandboxRecord>> = read_all(&*self.store, "sandbox/")?;
            let mine: Vec<&Read<SandboxRecord>> =
                sandboxes.iter().filter(|s| s.rec.app == name).collect();
            let mut txn = Txn {
                conditions: vec![Condition::ModRevision(key.clone(), kv.mod_revision)],
                ops: vec![Op::Delete(key)],
            };
            for s in &mine {
                txn.conditions
                    .push(Condition::ModRevision(sandbox_key(&s.rec.id), s.rev));
                txn.ops.push(Op::Delete(sandbox_key(&s.rec.id)));
            }
            let routes = self.routes.list()?;
            for r in routes.iter().filter(|r| r.app == name) {
                txn.ops.push(Op::Delete(route_key(&r.host)));
            }
            txn.ops
                .extend(crate::deploy_keys::removal_ops(&*self.store, name)?);
            if self.ci.commit_removing_app(name, txn)? != Outcome::Applied {
                continue;
            }
            let stops: Vec<SandboxRecord> = mine.iter().map(|s| s.rec.clone()).collect();
            for s in stops {
                let id = s.id.clone();
                self.command(&s.runner, s.id, true, move |tx| RunnerCommand::Stop(id, tx));
            }
            self.apps.collect_unused();
            self.apps.waker().notify_one();
            return Ok(());
        }
        Err(DeleteError::Contended(name.to_string()))
    }
}

fn view(s: &SandboxRecord) -> AssignmentView {
    AssignmentView {
        id: s.id.clone(),
        version: s.version.clone(),
        service: s.service.clone(),
        runner: s.runner.clone(),
        retire_at: s.retire_at,
        replaces: s.replaces.clone(),
    }
}
