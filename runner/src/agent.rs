//! The runner's life: join once, then stay connected to the coordinator
//! with mTLS, heartbeat, renew the certificate at half-life, and reconnect
//! with jittered exponential backoff whenever the link drops.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use std::cell::RefCell;
use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use schema::miren_capnp::{cluster, runner_agent, runner_session};
use tokio::sync::mpsc;

use crate::call::CallError;
use crate::sandbox::{Fetch, IsolationMode, Report, Spec, Supervisor};
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

/// How often a runner heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

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
    let current: Current = Rc::new(RefCell::new(None));
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
    let supervisor = Rc::new(Supervisor::new(
        opts.data_dir.clone(),
        isolation,
        opts.token_file_ttl,
        Broker::new(mint_tx, opts.token_misses).with_metrics(opts.metrics.clone()),
        report_tx,
        crate::sandbox::Containment { policy, cgroups },
    ));
    tokio::task::spawn_local(mint_through_coordinator(current.clone(), mint_rx));
    let metrics = opts.metrics.clone();
    tokio::task::spawn_local(forward_reports(current.clone(), report_rx, metrics));
    let result = serve(&data, &opts, shutdown, &current, &supervisor).await;
    supervisor.stop_all().await;
    result
}

/// The session in use, shared by the pieces that talk to the coordinator.
type Current = Rc<RefCell<Option<runner_session::Client>>>;

async fn serve(
    data: &DataDir,
    opts: &RunnerOptions,
    shutdown: impl Future<Output = ()>,
    current: &Current,
    supervisor: &Rc<Supervisor>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    loop {
        let ended = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ended = session(data, opts, &mut attempt, current, supervisor) => ended,
        };
        *current.borrow_mut() = None;
        opts.metrics.set_connected(false);
        match ended {
            SessionEnd::Removed => {
                return Err(RunError::Removed {
                    data_dir: opts.data_dir.clone(),
                })
            }
            SessionEnd::Lost(e) => {
                tracing::warn!("connection to the coordinator lost: {}", Chain(&e))
            }
        }
        let wait = backoff::delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tracing::info!("reconnecting in {wait:?}");
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn session(
    data: &DataDir,
    opts: &RunnerOptions,
    attempt: &mut u32,
    current: &Current,
    supervisor: &Rc<Supervisor>,
) -> SessionEnd {
    let id = match data.load() {
        Ok(id) => id,
        Err(e) => return e.into(),
    };
    let identity = match id.client_identity() {
        Ok(i) => i,
        Err(e) => return e.into(),
    };
    let conn = match transport::dial(&id.address, Some(identity)).await {
        Ok((_endpoint, conn)) => conn,
        // Told during the handshake.
        Err(e) if e.close_code() == Some(CloseCode::RunnerRemoved) => return SessionEnd::Removed,
        Err(e) => return e.into(),
    };
    let end = match session_inner(id, &conn, data, opts, attempt, current, supervisor).await {
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
    mut id: crate::state::Identity,
    conn: &quinn::Connection,
    data: &DataDir,
    opts: &RunnerOptions,
    attempt: &mut u32,
    current: &Current,
    supervisor: &Rc<Supervisor>,
) -> Result<Never, SessionEnd> {
    let cluster: cluster::Client = connect_connection(conn).await.map_err(CallError::from)?;
    let mut req = cluster.runner_request();
    req.get().set_agent(capnp_rpc::new_client(AgentService {
        supervisor: supervisor.clone(),
        current: current.clone(),
    }));
    let reply = req.send().promise.await.map_err(CallError::from)?;
    let session: runner_session::Client = reply.get()?.get_session()?;
    *current.borrow_mut() = Some(session.clone());
    // Ingress traffic arrives as streams the coordinator opens.
    let proxy = tokio::task::spawn_local(accept_proxied(conn.clone(), supervisor.clone()));
    let _proxy_guard = AbortOnDrop(proxy);
    // Tell the coordinator how the sandboxes it may have lost track of are.
    for r in supervisor.all_reports() {
        send_report(&session, r);
    }
    opts.metrics.set_connected(true);
    println!(
        "Runner runner-{} connected to {}",
        id.config.runner_id,
        id.address.host_port()
    );
    *attempt = 0;
    loop {
        let mut req = session.heartbeat_request();
        {
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
        req.send().promise.await.map_err(CallError::from)?;

        if renewal_due(&id.cert_pem, transport::clock::now_unix())? {
            let (key_pem, csr) = pki::key_and_csr()?;
            let mut req = session.renew_request();
            req.get().set_csr_der(&csr);
            let reply = req.send().promise.await.map_err(CallError::from)?;
            let cert_pem = reply
                .get()?
                .get_cert_pem()?
                .to_string()
                .map_err(capnp::Error::from)?;
            data.save_identity(&cert_pem, &key_pem)?;
            tracing::info!("runner certificate renewed");
            id = data.load()?;
        }
        tokio::select! {
            closed = conn.closed() => return Err(SessionError::Closed(closed).into()),
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Whether more than half of the certificate's lifetime has passed.
fn renewal_due(cert_pem: &str, now: i64) -> Result<bool, pki::PkiError> {
    let not_after = pki::not_after_unix(cert_pem)?;
    let not_before = pki::not_before_unix(cert_pem)?;
    Ok(now >= not_before + (not_after - not_before) / 2)
}

/// Mints through whichever session is current; fails fast when there is none
/// (the broker then serves a cached, unexpired token if it has one).
async fn mint_through_coordinator(current: Current, mut rx: mpsc::UnboundedReceiver<MintRequest>) {
    while let Some((key, done)) = rx.recv().await {
        let session = current.borrow().clone();
        let Some(session) = session else {
            let _ = done.send(Err(CallError::Unreachable));
            continue;
        };
        tokio::task::spawn_local(async move {
            let mut req = session.issue_workload_token_request();
            {
                let mut p = req.get();
                p.set_sandbox_id(&key.sandbox);
                p.set_ttl_secs(key.ttl);
                let mut list = p.init_audiences(key.audiences.len() as u32);
                for (i, a) in key.audiences.iter().enumerate() {
                    list.set(i as u32, a);
                }
            }
            let result =
                match tokio::time::timeout(Duration::from_secs(5), req.send().promise).await {
                    Ok(Ok(reply)) => reply
                        .get()
                        .and_then(|r| r.get_token())
                        .and_then(|t| t.to_string().map_err(Into::into))
                        .map_err(CallError::from),
                    Ok(Err(e)) => Err(CallError::from(e)),
                    Err(_) => Err(CallError::NoAnswer),
                };
            let _ = done.send(result);
        });
    }
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

async fn forward_reports(
    current: Current,
    mut rx: mpsc::UnboundedReceiver<Report>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    while let Some(r) = rx.recv().await {
        metrics.report(&r);
        let session = current.borrow().clone();
        if let Some(s) = session {
            send_report(&s, r);
        }
    }
}

/// What the coordinator calls on this runner.
struct AgentService {
    supervisor: Rc<Supervisor>,
    current: Current,
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
        let current = self.current.clone();
        let fetch: Fetch = Rc::new(move |sha: String, offset: u64, len: u32| {
            let session = current.borrow().clone();
            Box::pin(async move {
                let session = session.ok_or(CallError::Unreachable)?;
                let mut req = session.fetch_artifact_request();
                req.get().set_sha256(&sha);
                req.get().set_offset(offset);
                req.get().set_length(len);
                let reply = req.send().promise.await?;
                let r = reply.get()?;
                Ok((r.get_data()?.to_vec(), r.get_size()))
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
