//! The runner's life: join once, then hold a session with **every**
//! coordinator it knows, each over its own mTLS QUIC connection with its
//! own loop: heartbeat, serve the agent capability (the leader's commands
//! come through whichever session reaches it), accept ingress streams, and
//! reconnect with jittered exponential backoff whenever that link drops.
//!
//! Losing a coordinator is therefore a switch, not a reconnect: workload
//! tokens, artifact chunks and certificate renewals go to one live session
//! and move to another at once when its connection is lost
//! ([`crate::sessions`]); sandbox reports go to every live session (each
//! coordinator's ingress and the leader's reconcile loop read their own).
//! The set of coordinators is learned from `Cluster.info` at each session
//! start and every [`REFRESH_EVERY`] ([`crate::known_coordinators`]) and
//! kept in the data dir. A `RunnerRemoved` close from any coordinator ends
//! the runner.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use capnp::capability::Rc as CapRc;
use schema::miren_capnp::{cluster, runner_agent, runner_session};
use tokio::sync::mpsc;

use identity::address::HostPort;

use crate::call::CallError;
use crate::known_coordinators::KnownCoordinators;
use crate::sandbox::{Fetch, IsolationMode, Report, Spec, Supervisor};
use crate::sessions::{OnRefusal, Patience, Sessions};
use crate::token_limits::MissLimit;
use crate::tokens::{Broker, MintRequest};
use transport::close::{CloseCode, RUNNER_REMOVED_REASON};
use transport::pki;
use transport::report::Chain;
use transport::rpc::{connect_connection, remote_message};

use crate::backoff;
use crate::join::{join, JoinError};
use crate::sandbox::SandboxError;
use crate::state::{DataDir, StateError};

/// How often a runner heartbeats (each session).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A heartbeat not answered within this ends its session (a coordinator
/// killed outright is otherwise noticed only at the idle timeout).
pub const HEARTBEAT_PATIENCE: Duration = Duration::from_secs(10);
/// How often the runner asks a coordinator for the cluster's coordinators.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// A mint tries the next session after this long without an answer.
pub const MINT_PATIENCE: Patience = Patience {
    attempt: Duration::from_secs(1),
    total: Duration::from_secs(5),
    on_refusal: OnRefusal::Final,
};
/// An artifact chunk may take longer (a coordinator reads it from disk),
/// and may be held by some coordinators only.
const FETCH_PATIENCE: Patience = Patience {
    attempt: Duration::from_secs(15),
    total: Duration::from_secs(120),
    on_refusal: OnRefusal::TryNext,
};
/// A renewal, or a refresh of the coordinator list.
const ONE_CALL_PATIENCE: Patience = Patience {
    attempt: Duration::from_secs(5),
    total: Duration::from_secs(20),
    on_refusal: OnRefusal::Final,
};

/// How a runner is started.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// What this binary is, as `runner list` reports it.
    pub build: transport::build_info::BuildInfo,
    pub data_dir: PathBuf,
    /// Join token, needed only until the runner has joined.
    pub join: Option<String>,
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// The isolation asked for (`--isolation`); once the runner runs, the
    /// one in force, which it reports.
    pub isolation: IsolationMode,
    /// Lifetime of the token kept in each sandbox's token file (seconds;
    /// 0 = the default hour). It is rewritten at half-life.
    pub token_file_ttl: u32,
    /// What a sandbox gets when its app.toml asks nothing
    /// (`--sandbox-memory`, `--sandbox-cpus`, `--sandbox-pids`); unset
    /// values take the built-in defaults.
    pub sandbox_limits: crate::limits::Limits,
    /// How many new (uncached) tokens each sandbox may have minted: a burst,
    /// then a rate; over it its endpoint answers 429.
    pub token_misses: MissLimit,
    /// What this runner counts, and its readiness (connected or not).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No identity in the data dir and no join code to get one.
    #[error("this runner has not joined a cluster yet: pass --join <join code> (an operator creates one with `miren runner token create`)")]
    NotJoined,
    /// The join code was refused or the join failed.
    #[error("join failed: {0}")]
    Join(#[source] JoinError),
    /// The data dir could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// The isolation asked for cannot be had here.
    #[error(transparent)]
    Isolation(#[from] SandboxError),
    /// The default sandbox limits are more than this host has.
    #[error("sandbox limits (--sandbox-memory, --sandbox-cpus, --sandbox-pids): {0}")]
    Limits(#[source] crate::limits::LimitError),
    /// The coordinator removed this runner.
    #[error("{RUNNER_REMOVED_REASON}\nthis runner was removed from the cluster; to join again, move {} aside and run with a new --join code", data_dir.display())]
    Removed {
        /// The runner's data dir, which holds the removed identity.
        data_dir: PathBuf,
    },
}

/// Why a session with the coordinator ended (the runner reconnects).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Dial(#[from] transport::DialError),
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Certificate(#[from] pki::PkiError),
    #[error("the coordinator's reply could not be read: {0}")]
    Reply(#[from] capnp::Error),
    #[error("{0}")]
    Closed(#[source] quinn::ConnectionError),
    #[error("no answer to a heartbeat within {HEARTBEAT_PATIENCE:?}")]
    Silent,
}

enum SessionEnd {
    /// The coordinator closed the connection with
    /// [`CloseCode::RunnerRemoved`]: it no longer knows this runner, and
    /// retrying is pointless.
    Removed,
    /// Anything else: reconnect.
    Lost(SessionError),
}

impl<E: Into<SessionError>> From<E> for SessionEnd {
    fn from(e: E) -> Self {
        SessionEnd::Lost(e.into())
    }
}

/// An error answered to the coordinator: the whole chain, each cause once.
fn failed(e: &(dyn std::error::Error + 'static)) -> capnp::Error {
    capnp::Error::failed(Chain(e).to_string())
}

/// Runs the runner until `shutdown` resolves. Must run inside a `LocalSet`.
pub async fn run(opts: RunnerOptions, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let data = DataDir::new(&opts.data_dir);
    if !data.has_joined() {
        let Some(token) = &opts.join else {
            return Err(RunError::NotJoined);
        };
        let cfg = join(&data, token, &opts.name, &opts.labels)
            .await
            .map_err(RunError::Join)?;
        println!(
            "Runner joined cluster {} as runner-{} (data in {})",
            cfg.cluster,
            cfg.runner_id,
            opts.data_dir.display()
        );
    } else if opts.join.is_some() {
        let id = data.load()?;
        eprintln!(
            "note: this runner already joined {} as runner-{}; ignoring --join",
            id.config.cluster, id.config.runner_id
        );
    }
    let sessions: Rc<Live> = Rc::new(Sessions::default());
    let (mint_tx, mint_rx) = mpsc::unbounded_channel::<MintRequest>();
    let (report_tx, report_rx) = mpsc::unbounded_channel::<Report>();
    let isolation = crate::sandbox::Isolation::choose(opts.isolation)?;
    let opts = RunnerOptions {
        isolation: isolation.mode(),
        ..opts
    };
    match transport::rlimit::raise_open_files_limit(crate::sandbox::RUNNER_OPEN_FILES) {
        Ok(limit) if limit < 4096 => eprintln!(
            "WARNING: the open files limit is {limit}: sandboxes' connections to their token endpoints and ingress streams share it; raise it (LimitNOFILE=, ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("could not read or raise the open files limit: {e}"),
    }
    let policy =
        crate::limits::LimitPolicy::for_this_host(opts.sandbox_limits).map_err(RunError::Limits)?;
    let runner_id = data.load()?.config.runner_id;
    // Also removes what an earlier run of this runner left (its sandboxes
    // died with it).
    let cgroups = crate::cgroup::Cgroups::detect(&runner_id);
    if cgroups.is_available() {
        tracing::info!("sandbox limits: {}", cgroups.describe());
    } else {
        eprintln!(
            "WARNING: sandboxes will run WITHOUT resource limits: {} (run the runner as root on a host with the memory, pids and cpu cgroup controllers)",
            cgroups.describe()
        );
    }
    // Like the cgroups: what sandboxes of an earlier run left, their
    // writable layers' mounts included, goes before any sandbox starts.
    match crate::layout::remove_leftovers(&opts.data_dir).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed what {n} sandboxes of an earlier run left"),
        Err(e) => tracing::warn!("removing what sandboxes of an earlier run left: {e}"),
    }
    let scratch = match &isolation {
        crate::sandbox::Isolation::Bwrap { .. } => {
            crate::scratch::ScratchSupport::detect(&opts.data_dir)
        }
        crate::sandbox::Isolation::None => {
            crate::scratch::ScratchSupport::Uncapped("plain-process sandboxes".into())
        }
    };
    if let (
        crate::sandbox::Isolation::Bwrap { .. },
        crate::scratch::ScratchSupport::Uncapped(why),
    ) = (&isolation, &scratch)
    {
        eprintln!(
            "WARNING: sandboxes' writes to their app dir go to this runner's disk WITHOUT a size limit ({why}); run the runner as root to give each sandbox a capped tmpfs for them"
        );
    }
    let supervisor = Rc::new(Supervisor::new(
        opts.data_dir.clone(),
        isolation,
        opts.token_file_ttl,
        Broker::new(mint_tx, opts.token_misses).with_metrics(opts.metrics.clone()),
        report_tx,
        crate::sandbox::Containment {
            policy,
            cgroups,
            scratch,
        },
    ));
    let _minting = AbortOnDrop(tokio::task::spawn_local(
        crate::mint_calls::mint_through_coordinators(
            sessions.clone(),
            mint_rx,
            |c: &SessionClients| c.session.clone(),
            MINT_PATIENCE,
        ),
    ));
    let metrics = opts.metrics.clone();
    let _reports = AbortOnDrop(tokio::task::spawn_local(forward_reports(
        sessions.clone(),
        report_rx,
        metrics,
    )));
    let shared = Rc::new(Shared {
        data,
        opts,
        supervisor: supervisor.clone(),
        sessions,
        open: Default::default(),
    });
    let _renewal = AbortOnDrop(tokio::task::spawn_local(renew_certificate_forever(
        shared.clone(),
    )));
    let result = serve(shared, shutdown).await;
    supervisor.stop_all().await;
    result
}

/// The clients of one live session: its `RunnerSession`, and the
/// connection's `Cluster` (for the coordinator list).
#[derive(Clone)]
struct SessionClients {
    session: runner_session::Client,
    cluster: cluster::Client,
}

/// The live sessions, one per coordinator.
type Live = Sessions<SessionClients>;

/// What every session loop shares.
struct Shared {
    data: DataDir,
    opts: RunnerOptions,
    supervisor: Rc<Supervisor>,
    sessions: Rc<Live>,
    /// Every connection to a coordinator, for [`hang_up`].
    open: std::cell::RefCell<OpenConnections>,
}

/// The connections the session loops hold, each with its endpoint.
#[derive(Default)]
struct OpenConnections {
    next: u64,
    conns: HashMap<u64, (quinn::Endpoint, quinn::Connection)>,
}

/// Takes a connection out of [`OpenConnections`] when its session ends.
struct Opened {
    shared: Rc<Shared>,
    id: u64,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.shared.open.borrow_mut().conns.remove(&self.id);
    }
}

/// How long a stopping runner waits for its goodbyes to be sent.
const HANG_UP_PATIENCE: Duration = Duration::from_millis(500);

/// Closes every connection to a coordinator (`CloseCode::Done`) and waits,
/// at most [`HANG_UP_PATIENCE`], until the closes are sent. Each
/// coordinator then knows at once that this runner is gone: it places
/// nothing more on it, and the runner started again on the same data dir
/// replaces the closed session at once, without the coordinator first
/// waiting for the silent one to answer (`PROBE_PATIENCE`, 2 s).
async fn hang_up(shared: &Shared) {
    let open: Vec<(quinn::Endpoint, quinn::Connection)> =
        shared.open.borrow().conns.values().cloned().collect();
    for (_, conn) in &open {
        transport::close::close(conn, CloseCode::Done, b"runner stopping");
    }
    let idle = futures::future::join_all(open.iter().map(|(e, _)| e.wait_idle()));
    let _ = tokio::time::timeout(HANG_UP_PATIENCE, idle).await;
}

/// What a session loop tells [`serve`].
enum Event {
    /// A coordinator closed its session with `RunnerRemoved`.
    Removed,
    /// A coordinator listed the cluster's coordinators.
    Listed(Vec<HostPort>),
}

/// Holds a session loop per known coordinator until shutdown or removal,
/// starting loops for coordinators learned and stopping those forgotten.
async fn serve(shared: Rc<Shared>, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    let id = shared.data.load()?;
    let start_from = match shared.data.load_coordinators() {
        Ok(Some(list)) => list,
        Ok(None) => id.address.endpoints(),
        Err(e) => {
            tracing::warn!("{e}; starting from the join code's coordinators");
            id.address.endpoints()
        }
    };
    let mut known = KnownCoordinators::new(start_from);
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut loops: HashMap<String, AbortOnDrop> = HashMap::new();
    let start = |loops: &mut HashMap<String, AbortOnDrop>, endpoint: HostPort| {
        let task = session_loop(shared.clone(), endpoint.clone(), events_tx.clone());
        loops.insert(
            endpoint.to_string(),
            AbortOnDrop(tokio::task::spawn_local(task)),
        );
    };
    for endpoint in known.endpoints() {
        start(&mut loops, endpoint);
    }
    let _refresh = AbortOnDrop(tokio::task::spawn_local(refresh_forever(
        shared.sessions.clone(),
        events_tx.clone(),
    )));
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = transport::clock::now_unix();
        let before = known.clone();
        tokio::select! {
            _ = &mut shutdown => {
                hang_up(&shared).await;
                return Ok(());
            }
            event = events.recv() => match event {
                Some(Event::Removed) | None => {
                    return Err(RunError::Removed {
                        data_dir: shared.opts.data_dir.clone(),
                    })
                }
                Some(Event::Listed(list)) => {
                    for endpoint in known.listed(&list, now) {
                        println!("Runner learned coordinator {endpoint}");
                        start(&mut loops, endpoint);
                    }
                }
            },
            _ = refresh.tick() => {
                let live = |e: &HostPort| shared.sessions.has(&e.to_string());
                for endpoint in known.forget_gone(now, live) {
                    tracing::info!("{endpoint} is no longer a coordinator of the cluster: forgotten");
                    loops.remove(&endpoint.to_string());
                }
            }
        }
        if known != before {
            if let Err(e) = shared.data.save_coordinators(&known.endpoints()) {
                tracing::warn!("saving the coordinator list: {e}");
            }
        }
    }
}

/// Asks one live session for the cluster's coordinators every
/// [`REFRESH_EVERY`].
async fn refresh_forever(sessions: Rc<Live>, events: mpsc::UnboundedSender<Event>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        match (sessions)
            .call_any(ONE_CALL_PATIENCE, |c| list_coordinators(c.cluster))
            .await
        {
            Ok(list) => {
                if events.send(Event::Listed(list)).is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!("listing the coordinators: {e}"),
        }
    }
}

/// The coordinators `cluster` lists (at most a bounded number read).
async fn list_coordinators(cluster: cluster::Client) -> Result<Vec<HostPort>, CallError> {
    let reply = cluster.info_request().send().promise.await?;
    let list = reply.get()?.get_info()?.get_coordinators()?;
    let mut out = Vec::new();
    for one in list.iter().take(crate::known_coordinators::MAX_KNOWN) {
        let text = one?.to_str().map_err(capnp::Error::from)?;
        match identity::address::split_host_port(text) {
            Ok((host, port)) => out.push(HostPort { host, port }),
            Err(e) => tracing::warn!("a coordinator listed {text:?}: {e}"),
        }
    }
    Ok(out)
}

/// Takes the session with `endpoint` out of the live set when its loop
/// ends, however it ends.
struct Detach {
    shared: Rc<Shared>,
    endpoint: String,
}

impl Drop for Detach {
    fn drop(&mut self) {
        self.shared.sessions.detach(&self.endpoint);
        (self.shared.opts.metrics).set_connected(self.shared.sessions.count() > 0);
    }
}

/// One coordinator's session, reconnected with jittered backoff until the
/// runner is removed (or the loop is dropped).
async fn session_loop(
    shared: Rc<Shared>,
    endpoint: HostPort,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut attempt = 0u32;
    loop {
        let ended = {
            let _detach = Detach {
                shared: shared.clone(),
                endpoint: endpoint.to_string(),
            };
            session(&shared, &endpoint, &mut attempt, &events).await
        };
        match ended {
            SessionEnd::Removed => {
                let _ = events.send(Event::Removed);
                return;
            }
            SessionEnd::Lost(e) => {
                tracing::warn!(
                    "connection to the coordinator {endpoint} lost: {}",
                    Chain(&e)
                )
            }
        }
        let wait = backoff::delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tracing::info!("reconnecting to {endpoint} in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

async fn session(
    shared: &Rc<Shared>,
    endpoint: &HostPort,
    attempt: &mut u32,
    events: &mpsc::UnboundedSender<Event>,
) -> SessionEnd {
    let id = match shared.data.load() {
        Ok(id) => id,
        Err(e) => return e.into(),
    };
    let identity = match id.client_identity() {
        Ok(i) => i,
        Err(e) => return e.into(),
    };
    let (conn, _opened) = match transport::dial(&id.address.at(endpoint), Some(identity)).await {
        Ok((quic, conn)) => {
            let mut open = shared.open.borrow_mut();
            let id = open.next;
            open.next += 1;
            open.conns.insert(id, (quic, conn.clone()));
            let opened = Opened {
                shared: shared.clone(),
                id,
            };
            (conn, opened)
        }
        // Told during the handshake.
        Err(e) if e.close_code() == Some(CloseCode::RunnerRemoved) => return SessionEnd::Removed,
        Err(e) => return e.into(),
    };
    let end = match session_inner(&id, &conn, shared, endpoint, attempt, events).await {
        Ok(never) => match never {},
        Err(end) => end,
    };
    // The error a call saw may say only "connection lost"; the
    // connection knows whether the coordinator closed it for removal.
    if transport::close::is_runner_removed(&conn) {
        return SessionEnd::Removed;
    }
    end
}

enum Never {}

async fn session_inner(
    id: &crate::state::Identity,
    conn: &quinn::Connection,
    shared: &Rc<Shared>,
    endpoint: &HostPort,
    attempt: &mut u32,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Never, SessionEnd> {
    let supervisor = &shared.supervisor;
    let cluster: cluster::Client = connect_connection(conn).await.map_err(CallError::from)?;
    let mut req = cluster.runner_request();
    req.get().set_agent(capnp_rpc::new_client(AgentService {
        supervisor: supervisor.clone(),
        sessions: shared.sessions.clone(),
    }));
    let reply = req.send().promise.await.map_err(CallError::from)?;
    let session: runner_session::Client = reply.get()?.get_session()?;
    // Ingress traffic arrives as streams the coordinator opens.
    let proxy = tokio::task::spawn_local(accept_proxied(conn.clone(), supervisor.clone()));
    let _proxy_guard = AbortOnDrop(proxy);
    // Tell the coordinator how the sandboxes it may have lost track of are.
    for r in supervisor.all_reports() {
        send_report(&session, r);
    }
    let key = endpoint.to_string();
    shared.sessions.attach(
        &key,
        SessionClients {
            session: session.clone(),
            cluster: cluster.clone(),
        },
    );
    shared.opts.metrics.set_connected(true);
    println!("Runner runner-{} connected to {key}", id.config.runner_id);
    *attempt = 0;
    // Which coordinators there are now: new ones get a session.
    match list_coordinators(cluster.clone()).await {
        Ok(list) => {
            let _ = events.send(Event::Listed(list));
        }
        Err(e) => tracing::info!("{key}: listing the coordinators: {e}"),
    }
    loop {
        let mut req = session.heartbeat_request();
        {
            let opts = &shared.opts;
            let mut s = req.get().init_status();
            s.set_version(opts.build.to_string());
            s.set_sandboxes(supervisor.count());
            s.set_isolation(opts.isolation.to_wire());
            s.set_limits(supervisor.limits_description());
            let ids = supervisor.inventory();
            let mut list = s.init_running(ids.len() as u32);
            for (i, id) in ids.iter().enumerate() {
                list.set(i as u32, id);
            }
        }
        match tokio::time::timeout(HEARTBEAT_PATIENCE, req.send().promise).await {
            Ok(answer) => answer.map_err(CallError::from)?,
            Err(_) => return Err(SessionError::Silent.into()),
        };
        tokio::select! {
            closed = conn.closed() => return Err(SessionError::Closed(closed).into()),
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Renews the certificate at half-life through one live session; a failed
/// renewal is tried again a heartbeat later (sessions are not ended for it:
/// the certificate is still valid).
async fn renew_certificate_forever(shared: Rc<Shared>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if shared.sessions.count() == 0 {
            continue;
        }
        if let Err(e) = renew_if_due(&shared).await {
            tracing::warn!("certificate renewal: {}; trying again", Chain(&e));
        }
    }
}

async fn renew_if_due(shared: &Shared) -> Result<(), SessionError> {
    let id = shared.data.load()?;
    if !renewal_due(&id.cert_pem, transport::clock::now_unix())? {
        return Ok(());
    }
    let (key_pem, csr) = pki::key_and_csr()?;
    let cert_pem = shared
        .sessions
        .call_any(ONE_CALL_PATIENCE, |c| {
            let csr = csr.clone();
            async move {
                let mut req = c.session.renew_request();
                req.get().set_csr_der(&csr);
                let reply = req.send().promise.await?;
                Ok(reply
                    .get()?
                    .get_cert_pem()?
                    .to_string()
                    .map_err(capnp::Error::from)?)
            }
        })
        .await?;
    shared.data.save_identity(&cert_pem, &key_pem)?;
    tracing::info!("runner certificate renewed");
    Ok(())
}

/// Whether more than half of the certificate's lifetime has passed.
fn renewal_due(cert_pem: &str, now: i64) -> Result<bool, pki::PkiError> {
    let not_after = pki::not_after_unix(cert_pem)?;
    let not_before = pki::not_before_unix(cert_pem)?;
    Ok(now >= not_before + (not_after - not_before) / 2)
}

fn send_report(session: &runner_session::Client, r: Report) {
    let mut req = session.report_sandbox_request();
    {
        let mut b = req.get().init_report();
        b.set_id(&r.id);
        b.set_state(r.state.into());
        b.set_restarts(r.restarts);
        b.set_address(&r.address);
        b.set_last_log(&r.last_log);
        b.set_last_exit(&r.last_exit);
    }
    tokio::task::spawn_local(async move {
        if let Err(e) = req.send().promise.await {
            tracing::debug!("report not delivered: {}", remote_message(&e));
        }
    });
}

/// Sends each report to every live session: every coordinator's ingress and
/// the leader's reconcile loop read the reports they got.
async fn forward_reports(
    sessions: Rc<Live>,
    mut rx: mpsc::UnboundedReceiver<Report>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    while let Some(r) = rx.recv().await {
        metrics.report(&r);
        for c in sessions.all() {
            send_report(&c.session, r.clone());
        }
    }
}

/// What the coordinator calls on this runner.
struct AgentService {
    supervisor: Rc<Supervisor>,
    sessions: Rc<Live>,
}

impl runner_agent::Server for AgentService {
    async fn start_sandbox(
        self: CapRc<Self>,
        params: runner_agent::StartSandboxParams,
        _: runner_agent::StartSandboxResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_spec()?;
        let mut env = Vec::new();
        for l in s.get_env()? {
            env.push((l.get_key()?.to_string()?, l.get_value()?.to_string()?));
        }
        let spec = Spec {
            id: s.get_id()?.to_string()?,
            app: s.get_app()?.to_string()?,
            version: s.get_version()?.to_string()?,
            service: s.get_service()?.to_string()?,
            command: s.get_command()?.to_string()?,
            env,
            artifact: s.get_artifact_sha256()?.to_string()?,
            issuer_url: s.get_issuer_url()?.to_string()?,
            port: s.get_port(),
            limits: if s.has_limits() {
                let l = s.get_limits()?;
                // 0 = not asked: the runner's default.
                crate::limits::Limits {
                    memory_bytes: Some(l.get_memory_bytes()).filter(|v| *v > 0),
                    cpu_millis: Some(l.get_cpu_millis()).filter(|v| *v > 0),
                    pids: Some(l.get_pids()).filter(|v| *v > 0),
                }
            } else {
                crate::limits::Limits::default()
            },
        };
        let sessions = self.sessions.clone();
        let fetch: Fetch = Rc::new(move |sha: String, offset: u64, len: u32| {
            let sessions = sessions.clone();
            Box::pin(async move {
                sessions
                    .call_any(FETCH_PATIENCE, |c| {
                        let sha = sha.clone();
                        async move {
                            let mut req = c.session.fetch_artifact_request();
                            req.get().set_sha256(&sha);
                            req.get().set_offset(offset);
                            req.get().set_length(len);
                            let reply = req.send().promise.await?;
                            let r = reply.get()?;
                            Ok((r.get_data()?.to_vec(), r.get_size()))
                        }
                    })
                    .await
            })
        });
        self.supervisor
            .start(spec, fetch)
            .await
            .map_err(|e| failed(&e))
    }

    async fn logs(
        self: CapRc<Self>,
        params: runner_agent::LogsParams,
        mut results: runner_agent::LogsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = p.get_id()?.to_string()?;
        let lines = self
            .supervisor
            .logs(&id, p.get_lines() as usize)
            .map_err(|e| failed(&e))?;
        let mut list = results.get().init_lines(lines.len() as u32);
        for (i, l) in lines.iter().enumerate() {
            list.set(i as u32, l);
        }
        Ok(())
    }

    /// The coordinator asks before a new connection with this runner's
    /// identity takes this session's place: answering keeps it.
    async fn ping(
        self: CapRc<Self>,
        _: runner_agent::PingParams,
        _: runner_agent::PingResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }

    async fn stop_sandbox(
        self: CapRc<Self>,
        params: runner_agent::StopSandboxParams,
        _: runner_agent::StopSandboxResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id()?.to_string()?;
        self.supervisor.stop(&id).await;
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts the streams the coordinator opens for ingress traffic: the first
/// line names a sandbox hosted here; the rest is spliced to its service.
async fn accept_proxied(conn: quinn::Connection, supervisor: Rc<Supervisor>) {
    while let Ok((send, mut recv)) = conn.accept_bi().await {
        let supervisor = supervisor.clone();
        tokio::task::spawn_local(async move {
            // Read the preamble byte by byte up to the newline (at most 256).
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < 256 {
                match recv.read_exact(&mut byte).await {
                    Ok(()) if byte[0] == b'\n' => break,
                    Ok(()) => line.push(byte[0]),
                    Err(_) => return,
                }
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let Some(id) = line.strip_prefix("miren-proxy/1 ") else {
                return;
            };
            let Some(addr) = supervisor.address(id.trim()) else {
                return;
            };
            let mut stream = tokio::io::join(recv, send);
            match crate::sandbox::connect_service(&addr).await {
                Ok(crate::sandbox::ServiceStream::Tcp(mut s)) => {
                    // A request body written in parts reaches the app part
                    // by part (no wait on its ACK); best effort.
                    let _ = s.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut s).await;
                }
                Ok(crate::sandbox::ServiceStream::Unix(mut s)) => {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut s).await;
                }
                Err(_) => {}
            }
        });
    }
}
