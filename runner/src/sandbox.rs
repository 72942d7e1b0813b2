//! Sandboxes on a runner: fetch and unpack the artifact, start the service
//! process, watch its health, restart it with backoff, serve its token
//! endpoint, keep its token file fresh, report its state.
//!
//! Isolation: bubblewrap namespaces where the machine allows them, else
//! plain processes (`--isolation none`, shown in `runner list`), which then
//! get their own free loopback port as `PORT`. Either way the runner never
//! resolves a path through a dir the sandbox can write ([`crate::layout`]),
//! captures output from pipes into bounded runner-private logs
//! ([`crate::logs`]), and starts the sandbox with only the environment it
//! is given.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use transport::files::PathError;

use crate::call::CallError;
use crate::cgroup::SandboxCgroup;
use crate::layout::{SandboxDirs, INSIDE_IDENTITY, TOKEN_FILE, TOKEN_SOCKET};
use crate::logs::{ByteRate, LineCutter, SandboxLog, Tail};
use crate::tokens::{self, Broker, TokenKey};

/// Open files each process of a sandbox may hold.
const SANDBOX_OPEN_FILES: libc::rlim_t = 4096;
/// The runner's own open-files soft limit is raised towards this: every
/// connection a sandbox makes to its token socket and every ingress stream
/// is one of the runner's descriptors.
pub const RUNNER_OPEN_FILES: u64 = 65_536;
/// `PATH` inside every sandbox.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Most bytes of log lines one `logs` call returns per sandbox.
pub const LOGS_REPLY_BYTES: usize = 1024 * 1024;

/// Why a sandbox could not be started, its logs read, or this runner's
/// isolation set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The id cannot name a sandbox dir.
    #[error("invalid sandbox id {0:?}")]
    InvalidId(String),
    /// The app asked for more than this runner allows.
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitError),
    /// The artifact could not be had.
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    /// A file or dir of the sandbox could not be made, opened or bound.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The token endpoint or the service port could not be had.
    #[error("{what}: {source}")]
    Listen {
        /// Which (`the token endpoint`, `a port for the service`).
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The unpacking task died.
    #[error("unpacking: {0}")]
    UnpackTask(#[source] tokio::task::JoinError),
    /// The artifact is not a safe archive.
    #[error("unpacking the artifact of {id}: {source}")]
    Unpack {
        /// The sandbox.
        id: String,
        /// What was refused.
        #[source]
        source: crate::unpack::UnpackError,
    },
    /// Its cgroup could not be made.
    #[error("creating the cgroup of {id}: {source}")]
    Cgroup {
        /// The sandbox.
        id: String,
        /// Why.
        #[source]
        source: crate::cgroup::CgroupError,
    },
    /// It does not run here.
    #[error("sandbox {0} is not on this runner")]
    NotHere(String),
    /// A stop of it came while it was being started.
    #[error("sandbox {0} was stopped while it was being started")]
    StoppedWhileStarting(String),
    /// Its logs could not be read.
    #[error("reading the logs of {id}: {source}")]
    Logs {
        /// The sandbox.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--isolation bwrap` on a machine where bubblewrap cannot make
    /// namespaces.
    #[error("--isolation bwrap: bubblewrap cannot create namespaces here (is the `bubblewrap` package installed, and are user/pid/net namespaces allowed?)")]
    NoNamespaces,
    /// The shim is this binary, and it could not be found.
    #[error("locating the miren binary for the sandbox shim: {0}")]
    CurrentExe(#[source] std::io::Error),
}

/// What the coordinator asked for.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: String,
    pub app: String,
    pub version: String,
    pub service: String,
    pub command: String,
    pub env: Vec<(String, String)>,
    pub artifact: String,
    pub issuer_url: String,
    /// The service's port inside an isolated sandbox (its own namespace).
    pub port: u16,
    /// What the app asked for; the runner's defaults fill the rest.
    pub limits: crate::limits::Limits,
}

/// How this runner bounds what a sandbox may use: the defaults and maximum
/// of its limits, and the cgroups that enforce them (or why there are none).
pub struct Containment {
    pub policy: crate::limits::LimitPolicy,
    pub cgroups: crate::cgroup::Cgroups,
    /// Whether a sandbox's writes go to a capped tmpfs ([`crate::scratch`]).
    pub scratch: crate::scratch::ScratchSupport,
}

/// How sandboxes are confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Plain processes (machines without namespaces); said loudly.
    None,
    /// bubblewrap: own pid, mount, network (loopback only), uts, ipc
    /// namespaces; `miren` is this binary, run inside as the shim.
    Bwrap {
        miren: PathBuf,
        user: crate::shim::SandboxUser,
        /// This bubblewrap takes `--size` for a tmpfs (0.7 and later).
        takes_size: bool,
    },
}

/// The isolation an operator asks for (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsolationMode {
    /// bubblewrap where it works here, else plain processes (said loudly).
    #[default]
    Auto,
    /// bubblewrap, or refuse to start.
    Bwrap,
    /// Plain processes.
    None,
}

impl IsolationMode {
    /// Every mode, as `--isolation` takes them.
    pub const ALL: [IsolationMode; 3] = [
        IsolationMode::Auto,
        IsolationMode::Bwrap,
        IsolationMode::None,
    ];

    /// The flag's word: `auto`, `bwrap`, `none`. A runner reports what it
    /// got in the same words (`bwrap` or `none`, [`Isolation::name`]).
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationMode::Auto => "auto",
            IsolationMode::Bwrap => "bwrap",
            IsolationMode::None => "none",
        }
    }
}

impl IsolationMode {
    /// What a runner running in this mode reports (`RunnerStatus.isolation`).
    pub fn to_wire(self) -> schema::miren_capnp::Isolation {
        use schema::miren_capnp::Isolation as Wire;
        match self {
            IsolationMode::Auto => Wire::Unknown,
            IsolationMode::Bwrap => Wire::Bwrap,
            IsolationMode::None => Wire::None,
        }
    }

    /// The mode a runner reported, `None` when it has not.
    pub fn from_wire(w: schema::miren_capnp::Isolation) -> Option<IsolationMode> {
        use schema::miren_capnp::Isolation as Wire;
        match w {
            Wire::Unknown => None,
            Wire::Bwrap => Some(IsolationMode::Bwrap),
            Wire::None => Some(IsolationMode::None),
        }
    }
}

impl std::fmt::Display for IsolationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An isolation mode that is not one of `auto`, `bwrap`, `none`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--isolation {0:?}: use auto, bwrap or none")]
pub struct UnknownIsolation(pub String);

impl std::str::FromStr for IsolationMode {
    type Err = UnknownIsolation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IsolationMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownIsolation(s.to_string()))
    }
}

impl Isolation {
    /// `bwrap` when it works here (unless `none` is asked), else `none`.
    pub fn choose(requested: IsolationMode) -> Result<Isolation, SandboxError> {
        let bwrap = |user: crate::shim::SandboxUser| -> Result<Isolation, SandboxError> {
            match user {
                crate::shim::SandboxUser::Runner => eprintln!("WARNING: this machine allows no user namespaces: sandboxes get their own pid, mount, network, uts and ipc namespaces but run as the runner's user, not as an unprivileged one"),
                crate::shim::SandboxUser::NobodyNestable => eprintln!("WARNING: this bubblewrap cannot forbid nested user namespaces (--disable-userns needs bubblewrap 0.8 or later): a sandbox could lift its own cgroup limits on a cgroup v1 host; upgrade bubblewrap"),
                crate::shim::SandboxUser::Nobody => {}
            }
            Ok(Isolation::Bwrap {
                miren: std::env::current_exe().map_err(SandboxError::CurrentExe)?,
                user,
                takes_size: crate::shim::bwrap_takes_size(user),
            })
        };
        if requested == IsolationMode::None {
            return Ok(Isolation::None);
        }
        let support = crate::shim::bwrap_support();
        match (requested, support) {
            (_, Some(user)) => bwrap(user),
            (IsolationMode::Bwrap, None) => Err(SandboxError::NoNamespaces),
            _ => {
                eprintln!("WARNING: bubblewrap cannot create namespaces on this machine: sandboxes will run as PLAIN PROCESSES without isolation (install `bubblewrap`, or pass --isolation none to silence this)");
                Ok(Isolation::None)
            }
        }
    }

    /// The mode in force: [`IsolationMode::Bwrap`] or [`IsolationMode::None`].
    pub fn mode(&self) -> IsolationMode {
        match self {
            Isolation::None => IsolationMode::None,
            Isolation::Bwrap { .. } => IsolationMode::Bwrap,
        }
    }

    /// What `runner list` shows (`bwrap` or `none`).
    pub fn name(&self) -> &'static str {
        self.mode().as_str()
    }
}

/// Token port inside an isolated sandbox (moved when the service uses it).
const TOKEN_PORT: u16 = 47400;

/// How the runner reaches a sandbox's service.
fn connect_target(address: &str) -> Target {
    match address.strip_prefix("unix:") {
        Some(path) => Target::Unix(PathBuf::from(path)),
        None => Target::Tcp(address.to_string()),
    }
}

enum Target {
    Tcp(String),
    Unix(PathBuf),
}

/// A connection to a sandbox's service (TCP or through the shim's socket).
pub enum ServiceStream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Connects to the service at `address` (`host:port` or `unix:<path>`).
pub async fn connect_service(address: &str) -> std::io::Result<ServiceStream> {
    match connect_target(address) {
        Target::Tcp(a) => Ok(ServiceStream::Tcp(
            tokio::net::TcpStream::connect(a.as_str()).await?,
        )),
        // Bound by the runner in its own dir, which the sandbox never
        // sees: no name planted by the sandbox can stand in for it.
        Target::Unix(p) => Ok(ServiceStream::Unix(
            tokio::net::UnixStream::connect(p).await?,
        )),
    }
}

/// The states a sandbox is reported in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SandboxState {
    /// Started, not yet answering its health check.
    #[default]
    Starting,
    /// Its service accepts connections.
    Healthy,
    /// Its process exited; it is started again after a delay.
    Crashed,
    /// It cannot run: its command could not be started, or it is
    /// crash-looping ([`crate::restart_policy`]).
    Failed,
    /// Stopped by the coordinator; its files are gone.
    Stopped,
}

impl SandboxState {
    /// Every state.
    pub const ALL: [SandboxState; 5] = [
        SandboxState::Starting,
        SandboxState::Healthy,
        SandboxState::Crashed,
        SandboxState::Failed,
        SandboxState::Stopped,
    ];

    /// The word sent to the coordinator (`SandboxReport.state`).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Healthy => "healthy",
            SandboxState::Crashed => "crashed",
            SandboxState::Failed => "failed",
            SandboxState::Stopped => "stopped",
        }
    }

    /// The state a reported word names, if it is one of ours.
    pub fn parse(word: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

impl From<SandboxState> for schema::miren_capnp::SandboxState {
    /// The state as `SandboxReport.state` carries it.
    fn from(s: SandboxState) -> Self {
        use schema::miren_capnp::SandboxState as Wire;
        match s {
            SandboxState::Starting => Wire::Starting,
            SandboxState::Healthy => Wire::Healthy,
            SandboxState::Crashed => Wire::Crashed,
            SandboxState::Failed => Wire::Failed,
            SandboxState::Stopped => Wire::Stopped,
        }
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change to report to the coordinator, as it goes on the wire.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub id: String,
    pub state: SandboxState,
    pub restarts: u32,
    pub address: String,
    pub last_log: String,
    /// Why the last run ended; kept once the sandbox is healthy again.
    pub last_exit: String,
}

/// How an OOM kill is reported as a sandbox's last exit
/// (`out of memory (limit 256MiB)`).
pub fn out_of_memory_exit(memory_limit: u64) -> String {
    format!(
        "{OUT_OF_MEMORY} (limit {})",
        crate::limits::format_memory(memory_limit)
    )
}

/// Whether a reported last exit is an OOM kill ([`out_of_memory_exit`]).
/// The schema carries the exit as text; this is the one reader of it.
pub fn is_out_of_memory_exit(last_exit: &str) -> bool {
    last_exit.starts_with(OUT_OF_MEMORY)
}

const OUT_OF_MEMORY: &str = "out of memory";

/// Reads artifact bytes from the coordinator (through the current session).
pub type Fetch = Rc<
    dyn Fn(
        String,
        u64,
        u32,
    ) -> futures::future::LocalBoxFuture<'static, Result<(Vec<u8>, u64), CallError>>,
>;

struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    endpoint: tokio::task::JoinHandle<()>,
    last: Rc<RefCell<Report>>,
    cgroup: Option<Arc<SandboxCgroup>>,
}

/// The sandboxes of this runner (they outlive coordinator sessions).
pub struct Supervisor {
    dir: PathBuf,
    isolation: Isolation,
    token_file_ttl: u32,
    broker: Broker,
    running: RefCell<HashMap<String, Running>>,
    /// Sandboxes whose start is in flight (fetching, unpacking), and how
    /// a stop tells that start to give up.
    starting: RefCell<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    /// One start or stop of an id at a time ([`Supervisor::turn`]).
    turns: RefCell<HashMap<String, std::rc::Weak<tokio::sync::Mutex<()>>>>,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
    containment: Containment,
}

impl Supervisor {
    pub fn new(
        dir: PathBuf,
        isolation: Isolation,
        token_file_ttl: u32,
        broker: Broker,
        reports: tokio::sync::mpsc::UnboundedSender<Report>,
        containment: Containment,
    ) -> Self {
        Supervisor {
            dir,
            isolation,
            token_file_ttl,
            broker,
            running: RefCell::new(HashMap::new()),
            starting: RefCell::new(Default::default()),
            turns: RefCell::new(HashMap::new()),
            reports,
            containment,
        }
    }

    /// How sandboxes are limited here, for `runner list`.
    pub fn limits_description(&self) -> String {
        self.containment.cgroups.describe()
    }

    /// How many sandboxes run here.
    pub fn count(&self) -> u32 {
        self.running.borrow().len() as u32
    }

    /// The last report of every sandbox (re-sent after a reconnect).
    pub fn all_reports(&self) -> Vec<Report> {
        self.running
            .borrow()
            .values()
            .map(|r| r.last.borrow().clone())
            .collect()
    }

    /// The ids of every sandbox here, those still starting included: what
    /// the coordinator reconciles against (each heartbeat carries it).
    pub fn inventory(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running.borrow().keys().cloned().collect();
        ids.extend(self.starting.borrow().keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Fetches, unpacks and starts a sandbox. Starting one that already
    /// runs, or is being started, succeeds without starting it again (the
    /// coordinator's reconcile loop may ask twice).
    pub async fn start(self: &Rc<Self>, spec: Spec, fetch: Fetch) -> Result<(), SandboxError> {
        if !valid_id(&spec.id) {
            return Err(SandboxError::InvalidId(spec.id));
        }
        if self.running.borrow().contains_key(&spec.id)
            || self.starting.borrow().contains_key(&spec.id)
        {
            return Ok(());
        }
        let id = spec.id.clone();
        let (cancel, cancelled) = tokio::sync::watch::channel(false);
        self.starting.borrow_mut().insert(id.clone(), cancel);
        // Out of `starting` however this ends, the call dropped with its
        // session included.
        let _starting = StartInFlight {
            starting: &self.starting,
            id: id.clone(),
        };
        let turn = self.turn(&id);
        let _turn = turn.lock().await;
        if self.running.borrow().contains_key(&id) {
            return Ok(());
        }
        self.start_new(spec, fetch, cancelled).await
    }

    /// The lock that orders the starts and stops of sandbox `id`, first
    /// come first served. The coordinator's calls run concurrently, each
    /// pausing at its awaits: a stop removing a sandbox's dirs while a
    /// start of the same id unpacks and mounts them, or a start's fresh
    /// dirs removed by the end of an earlier stop, would leave a sandbox
    /// without its files or a stopped one running.
    fn turn(&self, id: &str) -> Rc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.borrow_mut();
        turns.retain(|_, t| t.strong_count() > 0);
        if let Some(turn) = turns.get(id).and_then(std::rc::Weak::upgrade) {
            return turn;
        }
        let turn = Rc::new(tokio::sync::Mutex::new(()));
        turns.insert(id.to_string(), Rc::downgrade(&turn));
        turn
    }

    async fn start_new(
        self: &Rc<Self>,
        spec: Spec,
        fetch: Fetch,
        mut cancelled: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SandboxError> {
        // Over this runner's maximum: refused before anything is fetched.
        let limits = self.containment.policy.resolve(spec.limits)?;
        let stopped = SandboxError::StoppedWhileStarting(spec.id.clone());
        if *cancelled.borrow() {
            return Err(stopped);
        }
        // The download may take minutes: a stop ends it (its temporary
        // file goes with it).
        let cache = crate::artifacts::ArtifactCache::open(self.dir.join("artifacts"));
        let artifact = tokio::select! {
            artifact = cache.checkout(&spec.id, &spec.artifact, &*fetch) => artifact?,
            _ = cancelled.wait_for(|c| *c) => return Err(stopped),
        };
        let dirs = SandboxDirs::new(&self.dir, &spec.id);
        dirs.create()
            .await
            .map_err(PathError::at("creating", &dirs.root))?;
        let file = std::fs::File::open(&artifact).map_err(PathError::at("opening", &artifact))?;
        let dest = dirs.app.clone();
        tokio::task::spawn_blocking(move || {
            crate::unpack::unpack(file, &dest, &crate::unpack::Limits::default())
        })
        .await
        .map_err(SandboxError::UnpackTask)?
        .map_err(|source| SandboxError::Unpack {
            id: spec.id.clone(),
            source,
        })?;
        if *cancelled.borrow() {
            // The stop waiting for its turn removes what was unpacked.
            return Err(stopped);
        }

        let secret = hex::encode(rand::random::<[u8; 32]>());
        let (endpoint, port, token_url, address, token_path) = match &self.isolation {
            Isolation::None => {
                let (listener, token_addr) =
                    tokens::bind()
                        .await
                        .map_err(|source| SandboxError::Listen {
                            what: "the token endpoint",
                            source,
                        })?;
                let port = free_port().map_err(|source| SandboxError::Listen {
                    what: "a port for the service",
                    source,
                })?;
                let ep = tokens::serve(
                    listener,
                    spec.id.clone(),
                    secret.clone(),
                    self.broker.clone(),
                );
                (
                    ep,
                    port,
                    format!("http://{token_addr}/v1/token"),
                    format!("127.0.0.1:{port}"),
                    dirs.identity.join(TOKEN_FILE),
                )
            }
            Isolation::Bwrap { .. } => {
                // In the identity dir: the sandbox sees it read-only.
                let sock = dirs.identity.join(TOKEN_SOCKET);
                let listener = tokio::net::UnixListener::bind(&sock)
                    .map_err(PathError::at("binding", &sock))?;
                let ep = tokens::serve(
                    listener,
                    spec.id.clone(),
                    secret.clone(),
                    self.broker.clone(),
                );
                let port = if spec.port == 0 { 8080 } else { spec.port };
                let token_port = if port == TOKEN_PORT {
                    TOKEN_PORT + 1
                } else {
                    TOKEN_PORT
                };
                (
                    ep,
                    port,
                    format!("http://127.0.0.1:{token_port}/v1/token"),
                    format!("unix:{}", dirs.app_socket().display()),
                    Path::new(INSIDE_IDENTITY).join(TOKEN_FILE),
                )
            }
        };
        // From here on, a failure undoes what was set up.
        let mut undo = Unstarted {
            id: spec.id.clone(),
            broker: self.broker.clone(),
            endpoint: Some(endpoint.abort_handle()),
            layer: None,
            cgroup: None,
        };
        let mut env: Vec<(String, String)> = spec.env.clone();
        env.extend([
            ("PORT".into(), port.to_string()),
            ("MIREN_APP".into(), spec.app.clone()),
            ("MIREN_SANDBOX_ID".into(), spec.id.clone()),
            ("MIREN_VERSION".into(), spec.version.clone()),
            ("MIREN_IDENTITY_TOKEN_URL".into(), token_url.clone()),
            ("MIREN_IDENTITY_TOKEN_SECRET".into(), secret),
            (
                "MIREN_IDENTITY_TOKEN_PATH".into(),
                token_path.display().to_string(),
            ),
            ("MIREN_OIDC_ISSUER_URL".into(), spec.issuer_url.clone()),
            // The whole environment of the sandbox: the runner's own
            // variables never reach it (the command is started with a
            // cleared environment).
            ("PATH".into(), SANDBOX_PATH.into()),
            ("HOME".into(), dirs.app.display().to_string()),
        ]);
        // What the sandbox writes goes to a capped tmpfs over the unpacked
        // app, or (where the runner cannot mount) to the app dir itself.
        let capped = match (&self.isolation, &self.containment.scratch) {
            (Isolation::Bwrap { .. }, crate::scratch::ScratchSupport::Capped) => {
                crate::scratch::mount(
                    &dirs.layer,
                    &dirs.app,
                    crate::scratch::ScratchCap::for_memory(limits.memory_bytes),
                )
                .map_err(PathError::at("mounting the writable layer at", &dirs.root))?;
                undo.layer = Some(dirs.layer.clone());
                true
            }
            _ => false,
        };
        let cgroup = if self.containment.cgroups.is_available() {
            let cgroup = self
                .containment
                .cgroups
                .create(&spec.id, &limits)
                .map_err(|source| SandboxError::Cgroup {
                    id: spec.id.clone(),
                    source,
                })?;
            let cgroup = Arc::new(cgroup);
            undo.cgroup = Some(cgroup.clone());
            Some(cgroup)
        } else {
            None
        };
        let launch = Launch {
            isolation: self.isolation.clone(),
            dirs: dirs.clone(),
            capped,
            cgroup: cgroup.clone(),
            memory_limit: limits.memory_bytes,
            port,
            token_port: token_url
                .rsplit(':')
                .next()
                .and_then(|p| p.split('/').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(TOKEN_PORT),
        };
        let last = Rc::new(RefCell::new(Report {
            id: spec.id.clone(),
            state: SandboxState::Starting,
            address: address.clone(),
            ..Default::default()
        }));
        undo.started();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::task::spawn_local(supervise(
            spec.clone(),
            launch,
            env,
            address,
            last.clone(),
            self.reports.clone(),
            stopped.clone(),
        ));
        tokio::task::spawn_local(refresh_token_file(
            self.broker.clone(),
            self.token_file_ttl,
            spec.id.clone(),
            dirs.identity.join(TOKEN_FILE),
            stopped,
        ));
        self.running.borrow_mut().insert(
            spec.id.clone(),
            Running {
                stop,
                task,
                endpoint,
                last,
                cgroup,
            },
        );
        Ok(())
    }

    /// Stops a sandbox and removes its files. A start in flight is told to
    /// give up (it ends at its next step, its download included), and the
    /// stop comes after it.
    pub async fn stop(&self, id: &str) {
        if let Some(cancel) = self.starting.borrow().get(id) {
            let _ = cancel.send(true);
        }
        let turn = self.turn(id);
        let _turn = turn.lock().await;
        let running = self.running.borrow_mut().remove(id);
        if let Some(r) = running {
            let _ = r.stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
            r.endpoint.abort();
            if let Some(cgroup) = r.cgroup {
                // Whatever escaped the process group dies with the cgroup.
                // Killing may wait on processes: off this thread.
                let result = tokio::task::spawn_blocking(move || match Arc::try_unwrap(cgroup) {
                    Ok(cgroup) => cgroup.remove(),
                    Err(shared) => shared.kill_all(),
                })
                .await;
                if let Ok(Err(e)) = result {
                    tracing::warn!("cgroup of {id}: {e}");
                }
            }
            self.broker.forget(id);
            let _ = self.reports.send(Report {
                id: id.to_string(),
                state: SandboxState::Stopped,
                ..Default::default()
            });
        }
        if valid_id(id) {
            if let Err(e) = SandboxDirs::new(&self.dir, id).remove().await {
                tracing::warn!("sandbox {id}: {e}");
            }
        }
        crate::artifacts::ArtifactCache::open(self.dir.join("artifacts")).release(id);
    }

    /// Loopback address of a sandbox's service.
    pub fn address(&self, id: &str) -> Option<String> {
        self.running
            .borrow()
            .get(id)
            .map(|r| r.last.borrow().address.clone())
    }

    /// The last `n` lines a sandbox printed (at most [`LOGS_REPLY_BYTES`]),
    /// from the runner-private copy the sandbox cannot touch.
    pub fn logs(&self, id: &str, n: usize) -> Result<Vec<String>, SandboxError> {
        if !self.running.borrow().contains_key(id) || !valid_id(id) {
            return Err(SandboxError::NotHere(id.to_string()));
        }
        let dirs = SandboxDirs::new(&self.dir, id);
        crate::logs::tail(&dirs.logs, n, LOGS_REPLY_BYTES).map_err(|source| SandboxError::Logs {
            id: id.to_string(),
            source,
        })
    }

    /// Stops everything (runner shutdown) and removes this runner's
    /// cgroups (after a crash, the next start removes them).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.running.borrow().keys().cloned().collect();
        for id in ids {
            self.stop(&id).await;
        }
        self.containment.cgroups.remove_all();
    }
}

use crate::layout::valid_sandbox_id as valid_id;

/// A start in flight, listed in the supervisor's `starting` until it ends
/// in any way (its call dropped with its session too).
struct StartInFlight<'a> {
    starting: &'a RefCell<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    id: String,
}

impl Drop for StartInFlight<'_> {
    fn drop(&mut self) {
        self.starting.borrow_mut().remove(&self.id);
    }
}

/// What a start has set up so far, undone if it fails before the sandbox
/// runs: its token endpoint (and its entry in the broker), its writable
/// layer's mounts, its cgroup (no process is in it yet).
struct Unstarted {
    id: String,
    broker: Broker,
    endpoint: Option<tokio::task::AbortHandle>,
    layer: Option<crate::scratch::Layer>,
    cgroup: Option<Arc<SandboxCgroup>>,
}

impl Unstarted {
    /// The start went through: everything is the running sandbox's now.
    fn started(mut self) {
        self.endpoint = None;
        self.layer = None;
        self.cgroup = None;
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.abort();
            self.broker.forget(&self.id);
        }
        if let Some(layer) = self.layer.take() {
            crate::scratch::unmount(&layer);
        }
        if let Some(cgroup) = self.cgroup.take().and_then(|c| Arc::try_unwrap(c).ok()) {
            if let Err(e) = cgroup.remove() {
                tracing::warn!("cgroup of {}: {e}", self.id);
            }
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn send(
    tx: &tokio::sync::mpsc::UnboundedSender<Report>,
    last: &Rc<RefCell<Report>>,
    change: impl FnOnce(&mut Report),
) {
    let mut r = last.borrow_mut();
    change(&mut r);
    let _ = tx.send(r.clone());
}

/// How to launch a sandbox's process.
struct Launch {
    isolation: Isolation,
    dirs: SandboxDirs,
    /// Whether its writable layer is mounted ([`crate::scratch`]): its app
    /// dir, `/tmp` and `/dev/shm` are then in one capped tmpfs.
    capped: bool,
    /// The sandbox's cgroup, joined by the process before it execs.
    cgroup: Option<Arc<SandboxCgroup>>,
    memory_limit: u64,
    port: u16,
    token_port: u16,
}

impl Launch {
    /// The command that starts the sandbox with exactly `env` as its
    /// environment; an isolated one gets `listener`, the service's socket
    /// (bound, not listening), as an inherited descriptor.
    fn command(
        &self,
        spec: &Spec,
        env: &[(String, String)],
        listener: Option<std::os::fd::RawFd>,
    ) -> tokio::process::Command {
        let mut cmd = match &self.isolation {
            Isolation::None => {
                let mut cmd = tokio::process::Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(format!("exec {}", spec.command))
                    .current_dir(&self.dirs.app);
                // Only what the sandbox is given: never the runner's
                // variables.
                cmd.env_clear()
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                // If the runner dies, each plain-process sandbox's first
                // process dies with it (bubblewrap takes the sandbox's whole
                // pid namespace with --die-with-parent); what that process
                // forked goes with the cgroup leftovers at the next start.
                let die_with_parent = || {
                    // SAFETY: prctl sets a flag of this (child) process and
                    // touches no memory.
                    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                    Ok(())
                };
                // SAFETY: the hook only calls prctl, which is
                // async-signal-safe and touches no memory of the parent.
                unsafe { cmd.pre_exec(die_with_parent) };
                cmd
            }
            Isolation::Bwrap {
                miren,
                user,
                takes_size,
            } => {
                let args = vec![
                    "--token-socket".to_string(),
                    crate::shim::inside_token_socket().display().to_string(),
                    "--app-listener-fd".to_string(),
                    listener.unwrap_or(-1).to_string(),
                    "--app-port".to_string(),
                    self.port.to_string(),
                    "--token-port".to_string(),
                    self.token_port.to_string(),
                    "--".to_string(),
                    spec.command.clone(),
                ];
                // The sandbox's variables are set inside by bubblewrap,
                // never on bubblewrap itself: it runs on the host, before
                // any namespace, and an app's LD_PRELOAD there would run
                // the app's code as the runner's user outside the sandbox.
                let layer = &self.dirs.layer;
                let (tmp, shm, run) = (layer.tmp(), layer.shm(), layer.run());
                let (writable, private) = if self.capped {
                    (
                        &layer.view,
                        crate::shim::Private::Scratch {
                            tmp: &tmp,
                            shm: &shm,
                            run: &run,
                        },
                    )
                } else {
                    let cap = crate::scratch::ScratchCap::for_memory(self.memory_limit);
                    (
                        &self.dirs.app,
                        crate::shim::Private::Own {
                            size: takes_size.then_some(cap.bytes),
                        },
                    )
                };
                crate::shim::bwrap_command(
                    *user,
                    miren,
                    &crate::shim::Mounts {
                        app: &self.dirs.app,
                        writable,
                        identity: &self.dirs.identity,
                        private,
                    },
                    SANDBOX_PATH,
                    env,
                    &args,
                )
            }
        };
        if let Some(cgroup) = &self.cgroup {
            let join = cgroup.join_hook();
            // SAFETY: the hook only writes this process's pid to the
            // cgroup's files with open/write/close on paths prepared before
            // the fork (async-signal-safe; see `SandboxCgroup::join_hook`).
            unsafe {
                cmd.pre_exec(join);
            }
        }
        let confine_descriptors = move || {
            // Nothing the runner holds leaks into the sandbox: every
            // descriptor past stdio closes at exec (CLOEXEC rather than
            // closing now, so the spawn's own error pipe still works).
            // SAFETY: close_range only flags this child's own descriptors.
            let flagged = unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                )
            };
            if flagged != 0 {
                // Before Linux 5.11: one by one, up to the open-files
                // limit (no descriptor can be above it).
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit writes the struct we own.
                if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let last = libc::c_int::try_from(lim.rlim_cur).unwrap_or(libc::c_int::MAX);
                for fd in 3..last {
                    // SAFETY: fcntl flags this child's own descriptor (or
                    // fails harmlessly on one that is not open).
                    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                }
            }
            // But the service's socket, handed down to the shim.
            if let Some(fd) = listener {
                // SAFETY: fcntl clears a flag of this child's own descriptor.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // A sandbox's processes hold few descriptors each; the
            // runner's own raised limit is not theirs.
            let lim = libc::rlimit {
                rlim_cur: SANDBOX_OPEN_FILES,
                rlim_max: SANDBOX_OPEN_FILES,
            };
            // SAFETY: setrlimit reads the struct we own and sets this
            // child's own limit.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
            Ok(())
        };
        // SAFETY: the hook only makes the system calls above, which are
        // async-signal-safe and touch no memory of the parent.
        unsafe { cmd.pre_exec(confine_descriptors) };
        cmd
    }
}

/// Reads one of a sandbox's output pipes into its logs: cut into bounded
/// lines, paced by the sandbox's byte rate, appended to the runner-private
/// log and kept in the in-memory tail.
async fn capture(
    mut pipe: Box<dyn tokio::io::AsyncRead + Unpin>,
    log: Rc<RefCell<SandboxLog>>,
    tail: Rc<RefCell<Tail>>,
    rate: Rc<RefCell<ByteRate>>,
) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut cutter = LineCutter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let keep = |line: String| {
        if let Err(e) = log.borrow_mut().append(&line) {
            tracing::debug!("sandbox log: {e}");
        }
        tail.borrow_mut().push(&line);
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut lines = 0usize;
        cutter.feed(&buf[..n], |line| {
            lines += 1;
            keep(line)
        });
        if let Err(e) = log.borrow_mut().flush() {
            tracing::debug!("sandbox log: {e}");
        }
        // Lines cost too: a flood of empty lines is paced like bytes.
        let cost = n + lines * crate::logs::LINE_COST;
        let wait = rate
            .borrow_mut()
            .take(cost, started.elapsed().as_secs_f64());
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait.min(5.0))).await;
        }
    }
    if let Some(line) = cutter.finish() {
        keep(line);
    }
    let _ = log.borrow_mut().flush();
}

async fn supervise(
    spec: Spec,
    launch: Launch,
    env: Vec<(String, String)>,
    address: String,
    last: Rc<RefCell<Report>>,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let log = Rc::new(RefCell::new(SandboxLog::new(launch.dirs.logs.clone())));
    let tail = Rc::new(RefCell::new(Tail::default()));
    // One budget for both pipes, over the sandbox's whole life.
    let rate = Rc::new(RefCell::new(ByteRate::new(
        crate::logs::BYTES_PER_SEC,
        crate::logs::BURST_BYTES,
        0.0,
    )));
    let mut history = crate::restart_policy::History::default();
    loop {
        // A fresh socket for each run: the last run's went with its
        // processes, so nothing connects to a dead service's backlog.
        let listener = match &launch.isolation {
            Isolation::Bwrap { .. } => match bound_socket(&launch.dirs.app_socket()) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    send(&reports, &last, |r| {
                        r.state = SandboxState::Failed;
                        r.last_log = format!("could not bind the service's socket: {e}");
                    });
                    return;
                }
            },
            Isolation::None => None,
        };
        let mut cmd = launch.command(
            &spec,
            &env,
            listener.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        );
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // Spawned on this (long-lived) thread on purpose: the parent-death
        // signal (PR_SET_PDEATHSIG, bubblewrap's --die-with-parent) fires
        // when the *thread* that forked exits, so spawning from tokio's
        // blocking pool (to keep cgroup v1's 15-25 ms join off this
        // thread) killed sandboxes whenever an idle pool thread retired.
        let spawned = cmd.spawn();
        // The shim holds its own copy now.
        drop(listener);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                send(&reports, &last, |r| {
                    r.state = SandboxState::Failed;
                    r.last_log = format!("could not start {:?}: {e}", spec.command);
                });
                return;
            }
        };
        let stdout = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin>);
        let stderr = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin>);
        for pipe in [stdout, stderr].into_iter().flatten() {
            tokio::task::spawn_local(capture(pipe, log.clone(), tail.clone(), rate.clone()));
        }
        let pid = child.id();
        let oom_before = launch.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let mut healthy = false;
        let exit = loop {
            tokio::select! {
                _ = stopped.changed() => {
                    terminate(pid, &mut child).await;
                    return;
                }
                status = child.wait() => break status,
                _ = tokio::time::sleep(Duration::from_millis(200)), if !healthy => {
                    if connect_service(&address).await.is_ok() {
                        healthy = true;
                        history.healthy();
                        send(&reports, &last, |r| {
                            r.state = SandboxState::Healthy;
                            r.restarts = history.exits;
                        });
                    }
                }
            }
        };
        let verdict = history.exited(rand::random::<f64>());
        let mut out_of_memory = false;
        if let Some(cgroup) = &launch.cgroup {
            out_of_memory = cgroup.oom_kills() > oom_before;
            // What escaped the process group (setsid) goes with it.
            let cgroup = cgroup.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cgroup.kill_all()).await {
                tracing::warn!("cgroup of {}: {e}", spec.id);
            }
        }
        let exit = if out_of_memory {
            out_of_memory_exit(launch.memory_limit)
        } else {
            exit.map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        let log_text = tail.borrow().text();
        send(&reports, &last, |r| {
            r.state = verdict.state();
            r.restarts = history.exits;
            r.last_log = format!("{log_text}\n(exit: {exit})");
            r.last_exit = exit;
        });
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(verdict.restart_after()) => {}
        }
    }
}

/// A Unix stream socket bound at `path` (whatever was there first is
/// removed: the path is in the runner-only root) and not yet listening: a
/// connection is refused until the shim, which inherits it, listens once
/// the service accepts connections — so a connection means "healthy".
fn bound_socket(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    Ok(socket.into())
}

async fn terminate(pid: Option<u32>, child: &mut tokio::process::Child) {
    if let Some(pid) = pid {
        // The service runs in its own process group: signal all of it.
        // SAFETY: kill only sends a signal, to the group the sandbox's
        // process leads (it was spawned with process_group(0)).
        unsafe {
            libc::kill(-(pid as i32), libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        if let Some(pid) = pid {
            // SAFETY: as above.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        let _ = child.wait().await;
    }
}

/// Keeps `MIREN_IDENTITY_TOKEN_PATH` holding a valid default token,
/// rewritten (atomically) at half-life.
async fn refresh_token_file(
    broker: Broker,
    ttl: u32,
    sandbox: String,
    path: PathBuf,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let key = TokenKey {
            sandbox: sandbox.clone(),
            audiences: vec![],
            ttl,
        };
        let wait = match broker.get(key).await {
            Ok(token) => {
                if let Err(e) = transport::files::write_atomic(&path, token.as_bytes(), 0o644) {
                    tracing::warn!("writing token file of {sandbox}: {e}");
                }
                Duration::from_secs(crate::tokens::half_life_secs(&token).max(5) as u64)
            }
            Err(e) => {
                tracing::warn!("token for {sandbox}: {e}");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An artifact holding `run.sh` with `body`, and its digest.
    fn artifact(body: &[u8]) -> (Vec<u8>, String) {
        use sha2::Digest;
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        b.append_data(&mut header, "run.sh", body).expect("append");
        let bytes = b.into_inner().expect("tar").finish().expect("gz");
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        (bytes, sha)
    }

    fn supervisor(dir: &Path) -> Rc<Supervisor> {
        let (mint, _) = tokio::sync::mpsc::unbounded_channel();
        let (reports, _) = tokio::sync::mpsc::unbounded_channel();
        let limit = crate::token_limits::MissLimit::new(4, 2).expect("limit");
        Rc::new(Supervisor::new(
            dir.to_path_buf(),
            Isolation::None,
            60,
            Broker::new(mint, limit),
            reports,
            Containment {
                policy: crate::limits::LimitPolicy::for_this_host(Default::default())
                    .expect("policy"),
                cgroups: crate::cgroup::Cgroups::Unavailable {
                    reason: Arc::new(crate::cgroup::SetupError::InvalidRunnerId("-".into())),
                },
                scratch: crate::scratch::ScratchSupport::Uncapped("test".into()),
            },
        ))
    }

    fn spec(id: &str, sha: &str) -> Spec {
        Spec {
            id: id.into(),
            app: "a".into(),
            version: "v1".into(),
            service: "web".into(),
            command: "./run.sh".into(),
            env: Vec::new(),
            artifact: sha.into(),
            issuer_url: "https://issuer.test".into(),
            port: 0,
            limits: Default::default(),
        }
    }

    /// A fetch that waits for `gate` before answering with `bytes`.
    fn gated_fetch(bytes: Vec<u8>, gate: Rc<tokio::sync::Notify>) -> Fetch {
        let bytes = Rc::new(bytes);
        Rc::new(move |_, offset: u64, len: u32| {
            let (bytes, gate) = (bytes.clone(), gate.clone());
            Box::pin(async move {
                gate.notified().await;
                gate.notify_one();
                let start = (offset as usize).min(bytes.len());
                let end = (start + len as usize).min(bytes.len());
                Ok((bytes[start..end].to_vec(), bytes.len() as u64))
            })
        })
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_stop_during_a_start_ends_it_and_leaves_nothing() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let d = tempfile::tempdir().expect("tempdir");
                let sup = supervisor(d.path());
                let (bytes, sha) = artifact(b"#!/bin/sh\nexec sleep 30\n");
                let gate = Rc::new(tokio::sync::Notify::new());
                let start = tokio::task::spawn_local({
                    let sup = sup.clone();
                    let fetch = gated_fetch(bytes, gate.clone());
                    let spec = spec("s1", &sha);
                    async move { sup.start(spec, fetch).await }
                });
                settle().await;
                // The start waits in its download; a stop comes.
                let stop = tokio::task::spawn_local({
                    let sup = sup.clone();
                    async move { sup.stop("s1").await }
                });
                // The download never ends (the gate stays shut): the stop
                // ends the start instead of waiting for it.
                stop.await.expect("stop task");
                let started = start.await.expect("start task");
                assert!(
                    matches!(started, Err(SandboxError::StoppedWhileStarting(ref id)) if id == "s1"),
                    "{started:?}"
                );
                // Nothing runs, nothing is left.
                assert_eq!(sup.address("s1"), None);
                assert!(sup.inventory().is_empty());
                assert!(!d.path().join("sandboxes/s1").exists());
            })
            .await;
    }

    #[tokio::test]
    async fn a_start_whose_call_is_dropped_is_not_left_starting() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let d = tempfile::tempdir().expect("tempdir");
                let sup = supervisor(d.path());
                let (bytes, sha) = artifact(b"#!/bin/sh\nexec sleep 30\n");
                let gate = Rc::new(tokio::sync::Notify::new());
                let start = tokio::task::spawn_local({
                    let sup = sup.clone();
                    let fetch = gated_fetch(bytes.clone(), gate.clone());
                    let spec = spec("s1", &sha);
                    async move { sup.start(spec, fetch).await }
                });
                settle().await;
                assert_eq!(sup.inventory(), ["s1"]);
                // The coordinator's session ends: its call is dropped.
                start.abort();
                let _ = start.await;
                assert!(sup.inventory().is_empty(), "{:?}", sup.inventory());
                // A start asked again does start it.
                gate.notify_one();
                sup.start(spec("s1", &sha), gated_fetch(bytes, gate.clone()))
                    .await
                    .expect("started again");
                assert!(sup.address("s1").is_some());
                sup.stop_all().await;
            })
            .await;
    }

    #[tokio::test]
    async fn a_start_during_a_stop_comes_after_it_with_its_own_files() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let d = tempfile::tempdir().expect("tempdir");
                let sup = supervisor(d.path());
                // Deaf to SIGTERM: the stop waits 5 s before its SIGKILL.
                let (bytes, sha) =
                    artifact(b"#!/bin/sh\ntrap '' TERM\ntouch deaf\nwhile :; do sleep 1; done\n");
                let open = Rc::new(tokio::sync::Notify::new());
                open.notify_one();
                sup.start(spec("s1", &sha), gated_fetch(bytes.clone(), open.clone()))
                    .await
                    .expect("first start");
                assert!(sup.address("s1").is_some());
                let ready = d.path().join("sandboxes/s1/app/deaf");
                for _ in 0..500 {
                    if ready.exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(ready.exists(), "the sandbox never started");
                // The stop waits for the sandbox to end (SIGTERM, then
                // SIGKILL after 5 s); a start of the same id comes meanwhile.
                let stop = tokio::task::spawn_local({
                    let sup = sup.clone();
                    async move { sup.stop("s1").await }
                });
                tokio::task::yield_now().await;
                let start = tokio::task::spawn_local({
                    let sup = sup.clone();
                    let fetch = gated_fetch(bytes, open.clone());
                    let spec = spec("s1", &sha);
                    async move { sup.start(spec, fetch).await }
                });
                stop.await.expect("stop task");
                start.await.expect("start task").expect("second start");
                // The second start's sandbox runs, with its files.
                assert!(sup.address("s1").is_some());
                assert!(d.path().join("sandboxes/s1/app/run.sh").exists());
                assert!(!ready.exists(), "the first sandbox's files are still there");
                assert!(d.path().join("sandboxes/s1/identity").is_dir());
                sup.stop_all().await;
            })
            .await;
    }
}
