//! Sandboxes on a runner: fetch and unpack the artifact, start the service
//! process, watch its health, restart it with backoff, serve its token
//! endpoint, keep its token file fresh, report its state.
//!
//! Isolation: this runner starts processes without namespaces
//! (`--isolation none`, shown in `runner list`). Every instance gets its own
//! free loopback port as `PORT`, so instances on one runner do not collide.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::tokens::{self, Broker, TokenKey};

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
    },
}

impl Isolation {
    /// `bwrap` when it works here (unless `none` is asked), else `none`.
    pub fn choose(requested: &str) -> anyhow::Result<Isolation> {
        let bwrap = |user: crate::shim::SandboxUser| -> anyhow::Result<Isolation> {
            if user == crate::shim::SandboxUser::Runner {
                eprintln!("WARNING: this machine allows no user namespaces: sandboxes get their own pid, mount, network, uts and ipc namespaces but run as the runner's user, not as an unprivileged one");
            }
            Ok(Isolation::Bwrap {
                miren: std::env::current_exe()
                    .context("locating the miren binary for the sandbox shim")?,
                user,
            })
        };
        match requested {
            "none" => return Ok(Isolation::None),
            "bwrap" | "auto" => {}
            other => return Err(anyhow!("--isolation {other:?}: use auto, bwrap or none")),
        }
        let support = crate::shim::bwrap_support();
        match (requested, support) {
            ("bwrap" | "auto", Some(user)) => bwrap(user),
            ("bwrap", None) => Err(anyhow!("--isolation bwrap: bubblewrap cannot create namespaces here (is the `bubblewrap` package installed, and are user/pid/net namespaces allowed?)")),
            _ => {
                eprintln!("WARNING: bubblewrap cannot create namespaces on this machine: sandboxes will run as PLAIN PROCESSES without isolation (install `bubblewrap`, or pass --isolation none to silence this)");
                Ok(Isolation::None)
            }
        }
    }

    /// What `runner list` shows.
    pub fn name(&self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Bwrap { .. } => "bwrap",
        }
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
        Target::Unix(p) => Ok(ServiceStream::Unix(
            tokio::net::UnixStream::connect(p).await?,
        )),
    }
}

/// A state change to report to the coordinator.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub id: String,
    pub state: String,
    pub restarts: u32,
    pub address: String,
    pub last_log: String,
}

/// Reads artifact bytes from the coordinator (through the current session).
pub type Fetch = Rc<
    dyn Fn(
        String,
        u64,
        u32,
    ) -> futures::future::LocalBoxFuture<'static, anyhow::Result<(Vec<u8>, u64)>>,
>;

/// Crashes before the first healthy state after which a sandbox is failed.
const FAIL_AFTER: u32 = 3;

struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    endpoint: tokio::task::JoinHandle<()>,
    last: Rc<RefCell<Report>>,
}

/// The sandboxes of this runner (they outlive coordinator sessions).
pub struct Supervisor {
    dir: PathBuf,
    isolation: Isolation,
    token_file_ttl: u32,
    broker: Broker,
    running: RefCell<HashMap<String, Running>>,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
}

impl Supervisor {
    pub fn new(
        dir: PathBuf,
        isolation: Isolation,
        token_file_ttl: u32,
        broker: Broker,
        reports: tokio::sync::mpsc::UnboundedSender<Report>,
    ) -> Self {
        Supervisor {
            dir,
            isolation,
            token_file_ttl,
            broker,
            running: RefCell::new(HashMap::new()),
            reports,
        }
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

    /// Fetches, unpacks and starts a sandbox.
    pub async fn start(self: &Rc<Self>, spec: Spec, fetch: Fetch) -> anyhow::Result<()> {
        if !valid_id(&spec.id) {
            return Err(anyhow!("invalid sandbox id {:?}", spec.id));
        }
        if self.running.borrow().contains_key(&spec.id) {
            return Ok(());
        }
        let artifact = crate::artifacts::ArtifactCache::open(self.dir.join("artifacts"))
            .checkout(&spec.id, &spec.artifact, &*fetch)
            .await?;
        let root = self.dir.join("sandboxes").join(&spec.id);
        if root.exists() {
            std::fs::remove_dir_all(&root).ok();
        }
        let app_dir = root.join("app");
        let run_dir = root.join("run");
        transport::files::ensure_private_dir(&run_dir)?;
        std::fs::create_dir_all(&app_dir)?;
        let file = std::fs::File::open(&artifact)?;
        let dest = app_dir.clone();
        tokio::task::spawn_blocking(move || {
            crate::unpack::unpack(file, &dest, &crate::unpack::Limits::default())
        })
        .await
        .map_err(|e| anyhow!("unpacking: {e}"))?
        .with_context(|| format!("unpacking the artifact of {}", spec.id))?;

        let secret = hex::encode(rand::random::<[u8; 32]>());
        let token_path = run_dir.join("token");
        let (endpoint, port, token_url, address) = match &self.isolation {
            Isolation::None => {
                let (listener, token_addr) = tokens::bind().await?;
                let ep = tokens::serve(
                    listener,
                    spec.id.clone(),
                    secret.clone(),
                    self.broker.clone(),
                );
                let port = free_port()?;
                (
                    ep,
                    port,
                    format!("http://{token_addr}/v1/token"),
                    format!("127.0.0.1:{port}"),
                )
            }
            Isolation::Bwrap { .. } => {
                let sock = run_dir.join(crate::shim::TOKEN_SOCKET);
                let _ = std::fs::remove_file(&sock);
                let listener = tokio::net::UnixListener::bind(&sock)
                    .with_context(|| format!("binding {}", sock.display()))?;
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
                    format!("unix:{}", run_dir.join(crate::shim::APP_SOCKET).display()),
                )
            }
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
        ]);
        if let Isolation::Bwrap { .. } = self.isolation {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
            env.push(("HOME".into(), app_dir.display().to_string()));
        }
        let launch = Launch {
            isolation: self.isolation.clone(),
            app_dir: app_dir.clone(),
            run_dir: run_dir.clone(),
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
            state: "starting".into(),
            address: address.clone(),
            ..Default::default()
        }));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::task::spawn_local(supervise(
            spec.clone(),
            launch,
            run_dir.join("output.log"),
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
            token_path,
            stopped,
        ));
        self.running.borrow_mut().insert(
            spec.id.clone(),
            Running {
                stop,
                task,
                endpoint,
                last,
            },
        );
        Ok(())
    }

    /// Stops a sandbox and removes its files.
    pub async fn stop(&self, id: &str) -> anyhow::Result<()> {
        let running = self.running.borrow_mut().remove(id);
        if let Some(r) = running {
            let _ = r.stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
            r.endpoint.abort();
            self.broker.forget(id);
            let _ = self.reports.send(Report {
                id: id.to_string(),
                state: "stopped".into(),
                ..Default::default()
            });
        }
        if valid_id(id) {
            let _ = std::fs::remove_dir_all(self.dir.join("sandboxes").join(id));
        }
        crate::artifacts::ArtifactCache::open(self.dir.join("artifacts")).release(id);
        Ok(())
    }

    /// Loopback address of a sandbox's service.
    pub fn address(&self, id: &str) -> Option<String> {
        self.running
            .borrow()
            .get(id)
            .map(|r| r.last.borrow().address.clone())
    }

    /// The last `n` lines a sandbox printed.
    pub fn logs(&self, id: &str, n: usize) -> anyhow::Result<Vec<String>> {
        if !self.running.borrow().contains_key(id) || !valid_id(id) {
            return Err(anyhow!("sandbox {id} is not on this runner"));
        }
        let path = self.dir.join("sandboxes").join(id).join("run/output.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        Ok(lines[lines.len().saturating_sub(n)..].to_vec())
    }

    /// Stops everything (runner shutdown).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.running.borrow().keys().cloned().collect();
        for id in ids {
            let _ = self.stop(&id).await;
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
    app_dir: PathBuf,
    run_dir: PathBuf,
    port: u16,
    token_port: u16,
}

impl Launch {
    fn command(&self, spec: &Spec) -> tokio::process::Command {
        match &self.isolation {
            Isolation::None => {
                let mut cmd = tokio::process::Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(format!("exec {}", spec.command))
                    .current_dir(&self.app_dir);
                // If the runner dies, its plain-process sandboxes die with
                // it (bubblewrap does the same with --die-with-parent).
                // SAFETY: prctl is async-signal-safe and touches no memory
                // of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                cmd
            }
            Isolation::Bwrap { miren, user } => {
                let args = vec![
                    "--run-dir".to_string(),
                    self.run_dir.display().to_string(),
                    "--app-port".to_string(),
                    self.port.to_string(),
                    "--token-port".to_string(),
                    self.token_port.to_string(),
                    "--".to_string(),
                    spec.command.clone(),
                ];
                let mut cmd =
                    crate::shim::bwrap_command(*user, miren, &self.app_dir, &self.run_dir, &args);
                cmd.env_clear();
                cmd
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    spec: Spec,
    launch: Launch,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    address: String,
    last: Rc<RefCell<Report>>,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::new()));
    let mut restarts = 0u32;
    let mut ever_healthy = false;
    loop {
        let mut cmd = launch.command(&spec);
        if let Isolation::Bwrap { .. } = launch.isolation {
            let _ = std::fs::remove_file(launch.run_dir.join(crate::shim::APP_SOCKET));
        }
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                send(&reports, &last, |r| {
                    r.state = "failed".into();
                    r.last_log = format!("could not start {:?}: {e}", spec.command);
                });
                return;
            }
        };
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let tail = tail.clone();
            let log_path = log_path.clone();
            tokio::task::spawn_local(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    append_log(&log_path, &line);
                    if let Ok(mut t) = tail.lock() {
                        t.push_back(line);
                        while t.len() > 20 {
                            t.pop_front();
                        }
                    }
                }
            });
        }
        let pid = child.id();
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
                        ever_healthy = true;
                        send(&reports, &last, |r| { r.state = "healthy".into(); r.restarts = restarts; });
                    }
                }
            }
        };
        restarts += 1;
        let log = tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        let failed = !ever_healthy && restarts >= FAIL_AFTER;
        send(&reports, &last, |r| {
            r.state = if failed {
                "failed".into()
            } else {
                "crashed".into()
            };
            r.restarts = restarts;
            r.last_log = format!(
                "{}\n(exit: {})",
                log,
                exit.map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string())
            );
        });
        let wait = crate::backoff::delay(restarts.min(6), rand::random::<f64>())
            .min(Duration::from_secs(10));
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn terminate(pid: Option<u32>, child: &mut tokio::process::Child) {
    if let Some(pid) = pid {
        // The service runs in its own process group: signal all of it.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        if let Some(pid) = pid {
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        let _ = child.wait().await;
    }
}

fn append_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
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
