//! The "swarm" of the `runners` and `converge` benches: the bench binary
//! re-executed as one process that joins many runners and runs them all on
//! one thread (`--isolation none`), and the bench's side of it, which reads
//! the swarm's tagged protocol lines from its stdout. Both sides live here
//! so the two benches speak the same protocol. Included with
//! `#[path = "common/swarm.rs"] mod swarm;` next to `mod common;`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::common::{pump_lines, Guard};

/// Prefix of the swarm's protocol lines on its stdout.
pub const TAG: &str = "SWARM ";

/// What the bench tells the swarm process, through its environment.
pub struct SwarmArgs {
    /// A reusable join code.
    pub code: String,
    /// Where the runners' data dirs go (`dir/rNNNN`).
    pub dir: PathBuf,
    /// How many runners to join and run.
    pub runners: usize,
    /// Joins in flight at once.
    pub concurrency: usize,
}

const CODE_ENV: &str = "MIREN_BENCH_SWARM_CODE";
const DIR_ENV: &str = "MIREN_BENCH_SWARM_DIR";
const RUNNERS_ENV: &str = "MIREN_BENCH_SWARM_RUNNERS";
const CONCURRENCY_ENV: &str = "MIREN_BENCH_SWARM_CONCURRENCY";

impl SwarmArgs {
    /// In the swarm process: what [`Swarm::spawn`] put in its environment.
    pub fn from_env() -> anyhow::Result<SwarmArgs> {
        let var = |k: &str| {
            std::env::var(k).map_err(|_| anyhow::anyhow!("{k} is not set (swarm started by hand?)"))
        };
        Ok(SwarmArgs {
            code: var(CODE_ENV)?,
            dir: PathBuf::from(var(DIR_ENV)?),
            runners: var(RUNNERS_ENV)?.parse()?,
            concurrency: var(CONCURRENCY_ENV)?.parse()?,
        })
    }
}

// ---------------------------------------------------------------------------
// The bench's side
// ---------------------------------------------------------------------------

/// What a bench keeps of the swarm's output.
pub trait SwarmReport {
    /// One line of the swarm's stdout and when it arrived.
    fn handle(&mut self, at: Instant, line: String);
    /// The swarm said FATAL or its stdout closed: nothing more will come.
    fn ended(&self) -> bool;
    /// The swarm's stdout closed.
    fn set_closed(&mut self);
}

/// The running swarm process: killed when dropped, its runners stopped
/// when `stdin` is dropped.
pub struct Swarm<R> {
    pub pid: u32,
    pub stdin: Option<ChildStdin>,
    pub guard: Guard,
    rx: mpsc::Receiver<(Instant, String)>,
    pub out: R,
}

impl<R: SwarmReport> Swarm<R> {
    /// Spawns this bench binary as the swarm: `marker` set (it tells
    /// `main` to run the swarm) and `args`, stdin and stdout piped, stderr
    /// to `stderr`.
    pub fn spawn(marker: &str, args: &SwarmArgs, stderr: Stdio, out: R) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(marker, "1")
            .env(CODE_ENV, &args.code)
            .env(DIR_ENV, &args.dir)
            .env(RUNNERS_ENV, args.runners.to_string())
            .env(CONCURRENCY_ENV, args.concurrency.to_string())
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let rx = pump_lines(child.stdout.take().context("swarm stdout not piped")?);
        Ok(Swarm {
            pid,
            stdin,
            guard: Guard(child),
            rx,
            out,
        })
    }

    /// Handles lines until `done` holds (true), the swarm dies or says
    /// FATAL, or `timeout` passes (false).
    pub fn pump_until(&mut self, timeout: Duration, done: impl Fn(&R) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.out) {
                return true;
            }
            if self.out.ended() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left) {
                Ok((at, line)) => self.out.handle(at, line),
                Err(mpsc::RecvTimeoutError::Timeout) => return done(&self.out),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.out.set_closed(),
            }
        }
    }

    /// Handles whatever has arrived, without waiting.
    pub fn drain(&mut self) {
        while let Ok((at, line)) = self.rx.try_recv() {
            self.out.handle(at, line);
        }
    }
}

// ---------------------------------------------------------------------------
// The swarm process
// ---------------------------------------------------------------------------

/// When this process is the swarm (`marker` set by [`Swarm::spawn`]):
/// runs `swarm_main` and returns how the process ends, its error said as
/// `FATAL <error>`; `None` in the bench itself.
pub fn run_if_swarm(
    marker: &str,
    swarm_main: impl FnOnce() -> anyhow::Result<()>,
) -> Option<ExitCode> {
    std::env::var_os(marker)?;
    Some(match swarm_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("FATAL {e:#}"));
            ExitCode::FAILURE
        }
    })
}

/// Prints one protocol line (`SWARM <line>`) on stdout, flushed.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{TAG}{line}");
    let _ = out.flush();
}

/// A stop signal that turns true once our stdin closes (the bench dropped
/// it, or died).
pub fn stop_on_stdin_close() -> tokio::sync::watch::Receiver<bool> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = stop_tx.send(true);
    });
    stop_rx
}

/// Runs `work` on a current-thread runtime inside a `LocalSet` (the
/// runners are spawned with `spawn_local`).
pub fn block_on_local<F: std::future::Future>(work: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(tokio::task::LocalSet::new().block_on(&rt, work))
}

/// Joins `args.runners` runners with `args.code`, `args.concurrency` at a
/// time, each with its own data dir `dir/rNNNN`; says `JOIN_ERR <i>:
/// <error>` for each that fails. The joined ones, each with how long its
/// join took, in the order they finished.
pub async fn join_runners(args: &SwarmArgs) -> Vec<(runner::state::DataDir, Duration)> {
    let SwarmArgs {
        code,
        dir,
        runners: n,
        concurrency,
    } = args;
    let (n, concurrency) = (*n, *concurrency);
    let mut pending = FuturesUnordered::new();
    let mut next = 0usize;
    let mut joined = Vec::with_capacity(n);
    while next < n || !pending.is_empty() {
        while next < n && pending.len() < concurrency {
            let data = runner::state::DataDir::new(&dir.join(format!("r{next:04}")));
            let i = next;
            pending.push(async move {
                let t = Instant::now();
                let r = runner::join::join(&data, code, "", &[]).await;
                (i, data, t.elapsed(), r)
            });
            next += 1;
        }
        if let Some((i, data, took, r)) = pending.next().await {
            match r {
                Ok(_) => joined.push((data, took)),
                Err(e) => say(&format!("JOIN_ERR {i}: {e:#}")),
            }
        }
    }
    joined
}

/// Runs every joined runner (`runner::run`, `--isolation none`) at once
/// until `stop` turns true, then waits up to `stop_timeout` for them to end
/// and says `STOPPED <clean>/<total> …`. A runner that stops with an error
/// says `RUNNER_FAILED <i>: <error>`.
pub async fn run_runners(
    joined: Vec<runner::state::DataDir>,
    stop: tokio::sync::watch::Receiver<bool>,
    stop_timeout: Duration,
) {
    let mut tasks = Vec::with_capacity(joined.len());
    for (i, data) in joined.into_iter().enumerate() {
        let mut stop = stop.clone();
        let opts = runner::RunnerOptions {
            build: Default::default(),
            data_dir: data.dir,
            join: None,
            name: String::new(),
            labels: vec![],
            isolation: runner::sandbox::IsolationMode::None,
            token_file_ttl: 3600,
            token_misses: Default::default(),
            metrics: runner::metrics::Metrics::new(true),
            sandbox_limits: Default::default(),
        };
        tasks.push(tokio::task::spawn_local(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = runner::run(opts, shutdown).await {
                let msg = format!("{e:#}").replace('\n', " / ");
                say(&format!("RUNNER_FAILED {i}: {msg}"));
            }
        }));
    }

    let mut stop = stop;
    let _ = stop.wait_for(|s| *s).await;
    let stopping = Instant::now();
    let total = tasks.len();
    let all = futures::future::join_all(tasks);
    let clean = match tokio::time::timeout(stop_timeout, all).await {
        Ok(results) => results.iter().filter(|r| r.is_ok()).count(),
        Err(_) => 0,
    };
    say(&format!(
        "STOPPED {clean}/{total} runner tasks ended {:.2} s after stop",
        stopping.elapsed().as_secs_f64()
    ));
}
