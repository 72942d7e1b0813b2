//! Issue 15's benchmark: a coordinator restarted under 500 sandbox records
//! on 50 runners, how long until it knows again what runs and what that
//! costs it; and the ingress with the watch-fed index next to the
//! per-request store scan it replaced.
//!
//! `cargo bench -p integration-tests --bench converge` (build the binary
//! first: `cargo build --release -p cli`; `MIREN_BIN` overrides where it is
//! looked for):
//!
//! 1. starts `miren server` on fixed loopback ports (QUIC, HTTP ingress,
//!    metrics) so it can be started again on the same data dir and
//!    addresses, and re-executes itself as the "swarm" process, which joins
//!    N runners (`runner::join::join`) and runs them all with `runner::run`
//!    (`--isolation none`) on one thread, as the `runners` bench does;
//! 2. deploys the sandboxes: an app `web` of a few instances that the
//!    ingress routes to, and apps of at most 100 instances (the deploy
//!    limit) for the rest. Each sandbox is this bench binary again, run as
//!    `converge-… sandbox-serve`: a listener on `$PORT` answering `200 ok`,
//!    about the cheapest process the runner's health check (a TCP connect)
//!    calls healthy. A process that never listens cannot be used: its
//!    version never becomes active, the rollout fails after its timeout
//!    and its sandboxes are retired;
//! 3. notes every sandbox's process id on `/proc`, SIGKILLs the coordinator
//!    and starts it again, then polls its `/metrics` (cheap: one scan of the
//!    records, no CLI process) until every runner is `ready` and every
//!    sandbox is `healthy` again, i.e. reported on the runner's new session
//!    (a restarted coordinator shows `unknown` until then). "Converged"
//!    then also means: `app status -o json` shows every sandbox reported
//!    since the restart, the sandbox ids are those of before, and each
//!    still runs as the same process (nothing was stopped, restarted or
//!    started again). Coordinator CPU from `/proc/<pid>/stat`. The
//!    restarted coordinator runs with `quinn_proto::endpoint=debug`, so the
//!    stateless resets it sends to the runners' old connections, and those
//!    quinn holds back (at most one per 20 ms), are counted: they decide
//!    how soon each runner notices;
//! 4. a steady window (30 s): coordinator CPU, and reconcile passes counted
//!    from the store's metered `range` reads (each pass reads `app/` and
//!    `sandbox/` with one `range` each; nothing else calls `range` once the
//!    index is loaded), so CPU per pass is an upper bound (heartbeats and
//!    keep-alives are in it too);
//! 5. drives the ingress (`Host: web.bench`) with an in-process hyper
//!    client, keep-alive, 32 connections for 10 s: requests/s, latency,
//!    coordinator CPU per request;
//! 6. stops everything, then on a copy of the coordinator's store (the
//!    same 500 records) measures per call the ingress's old choice of
//!    sandboxes (the app record plus a scan and decode of every `sandbox/`
//!    record, as `Apps::healthy_sandboxes` did before the index) next to
//!    `SandboxIndex::healthy`, and one `Reconciler::pass` over those
//!    records with every runner's inventory matching its assignments.
//!
//! Timings are printed, never asserted. Environment: `CONVERGE_BENCH_RUNNERS`
//! (50), `CONVERGE_BENCH_SANDBOXES` (500), `CONVERGE_BENCH_WEB` (instances
//! of `web`, 4), `CONVERGE_BENCH_STEADY_SECS` (30), `CONVERGE_BENCH_LOAD_SECS`
//! (10), `CONVERGE_BENCH_CONNECTIONS` (32). Under `cargo test --benches` (no
//! `--bench` argument) a quick pass with a few runners and sandboxes shows
//! the bench still works.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(dead_code)]
mod common;
#[path = "common/swarm.rs"]
mod swarm;

use common::{
    clock_ticks, cpu_secs_between, cpu_share, mib, miren, miren_bin, open_files_limit, sample,
    status_field, wait_until, ServerProc,
};
use swarm::{Swarm, SwarmArgs, SwarmReport, TAG};

/// Set in the environment of the re-executed swarm process.
const SWARM_ENV: &str = "MIREN_CONVERGE_BENCH_SWARM";
/// The first argument of a sandbox's process (this binary again).
const SANDBOX_ARG: &str = "sandbox-serve";
/// The ingress host routed to app `web`.
const WEB_HOST: &str = "web.bench";

const SERVER_START: Duration = Duration::from_secs(60);
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(300);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(SANDBOX_ARG) {
        if let Err(e) = sandbox_serve() {
            eprintln!("sandbox-serve: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    if let Some(end) = swarm::run_if_swarm(SWARM_ENV, swarm_main) {
        return end;
    }
    let benching = args.iter().any(|a| a == "--bench");
    common::run_bench("converge", benching, miren_bin().map(drop), || {
        bench_main(benching)
    })
}

// ---------------------------------------------------------------------------
// The sandbox: a listener on $PORT answering every request with `200 ok`
// ---------------------------------------------------------------------------

fn sandbox_serve() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = std::net::TcpListener::bind(format!("127.0.0.1:{port}"))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // Health checks connect and close; the ingress sends one request
        // per connection. A small stack: this is meant to be cheap.
        let _ = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || serve_connection(conn));
    }
    Ok(())
}

fn serve_connection(mut conn: std::net::TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        // One request head (bodies are not expected: GETs).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let close = head.contains("\r\nconnection: close");
        buf.drain(..end);
        let answer: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nok\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\n\r\nok\n"
        };
        if conn.write_all(answer).is_err() || close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// /proc and /metrics sampling
// ---------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/smaps_rollup` (e.g. `Private_Dirty`).
fn smaps_field(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// The coordinator's `/metrics` text (plain HTTP on loopback).
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(|| anyhow::anyhow!("no HTTP body from {addr}"))?;
    Ok(body)
}

/// The value of the series `series` (name with labels, exactly as printed).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Every live process whose environment names a sandbox of one of `apps`
/// and whose working directory is under `under`: sandbox id -> pid.
fn sandbox_processes(apps: &BTreeSet<String>, under: &Path) -> BTreeMap<String, u32> {
    apps.iter()
        .flat_map(|app| integration_tests::app_processes(app))
        .filter(|p| p.cwd.starts_with(under))
        .map(|p| (p.sandbox, p.pid))
        .collect()
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A loopback port free for both UDP and TCP.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no loopback port free for both TCP and UDP")
}

struct Ports {
    quic: u16,
    http: u16,
    metrics: u16,
}

/// Starts `miren server` on `ports` and waits for the end of its banner.
/// The whole swarm joins from 127.0.0.1: the per-address join rate is
/// lifted.
fn start_server(
    bin: &Path,
    data: &Path,
    config: &Path,
    ports: &Ports,
    run: usize,
    rust_log: Option<&str>,
) -> anyhow::Result<ServerProc> {
    let mut cmd = Command::new(bin);
    cmd.env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    cmd.arg("server")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{}", ports.quic)])
        .args(["--http-listen", &format!("127.0.0.1:{}", ports.http)])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", ports.metrics)])
        .args(["--join-burst", "1000000"])
        .env("MIREN_CONFIG", config)
        .env_remove("MIREN_CLUSTER");
    common::start_server(
        cmd,
        data.with_extension(format!("stderr.{run}")),
        SERVER_START,
    )
}

/// `miren app status -a APP -o json`.
fn app_status(bin: &Path, config: &Path, app: &str) -> anyhow::Result<serde_json::Value> {
    let out = miren(bin, config, &["app", "status", "-a", app, "-o", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

// ---------------------------------------------------------------------------
// The swarm, seen from the bench
// ---------------------------------------------------------------------------

#[derive(Default)]
struct SwarmOut {
    join_done: Option<String>,
    join_errors: Vec<String>,
    /// When each "Runner … connected to …" line arrived.
    connected: Vec<Instant>,
    runner_failures: Vec<String>,
    stopped: Option<String>,
    fatal: Option<String>,
    other: Vec<String>,
    closed: bool,
}

impl SwarmReport for SwarmOut {
    fn handle(&mut self, at: Instant, line: String) {
        let o = self;
        let Some(msg) = line.strip_prefix(TAG) else {
            if line.starts_with("Runner ") && line.contains(" connected to ") {
                o.connected.push(at);
            } else if line.starts_with("Runner mints through ")
                || line.starts_with("Runner learned coordinator ")
            {
                // The runners' own status lines: where minting goes, which
                // coordinators they learned.
            } else if o.other.len() < 20 {
                o.other.push(line);
            }
            return;
        };
        let (kind, rest) = msg.split_once(' ').unwrap_or((msg, ""));
        match kind {
            "JOIN_ERR" if o.join_errors.len() < 5 => o.join_errors.push(rest.to_string()),
            "JOIN_ERR" => {}
            "JOIN_DONE" => o.join_done = Some(rest.to_string()),
            "RUNNER_FAILED" => o.runner_failures.push(rest.to_string()),
            "STOPPED" => o.stopped = Some(rest.to_string()),
            "FATAL" => o.fatal = Some(rest.to_string()),
            _ => o.other.push(line),
        }
    }

    fn ended(&self) -> bool {
        self.fatal.is_some() || self.closed
    }

    fn set_closed(&mut self) {
        self.closed = true;
    }
}

// ---------------------------------------------------------------------------
// The bench
// ---------------------------------------------------------------------------

struct Settings {
    runners: usize,
    sandboxes: usize,
    web: usize,
    steady: Duration,
    load: Duration,
    connections: usize,
    /// Iterations bound of the in-process measures.
    micro: Duration,
}

/// The apps to deploy: `web` first, then `bulk-<i>` of at most 100.
fn plan_apps(s: &Settings) -> Vec<(String, usize)> {
    let mut apps = vec![("web".to_string(), s.web)];
    let mut left = s.sandboxes.saturating_sub(s.web);
    let mut i = 0;
    while left > 0 {
        let n = left.min(100);
        apps.push((format!("bulk-{i}"), n));
        left -= n;
        i += 1;
    }
    apps
}

/// An app dir whose one service is this binary serving `200 ok`.
fn write_app(parent: &Path, name: &str, instances: usize) -> anyhow::Result<PathBuf> {
    let dir = parent.join(format!("app-{name}"));
    std::fs::create_dir_all(dir.join(".miren"))?;
    std::fs::write(
        dir.join("README"),
        "converge bench: the sandbox is the bench binary itself\n",
    )?;
    let exe = std::env::current_exe()?;
    let exe = exe
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    anyhow::ensure!(!exe.contains('\''), "bench path contains a quote: {exe}");
    let toml = format!(
        "name = \"{name}\"\n[services.web]\ncommand = '''{exe:?} {SANDBOX_ARG}'''\ninstances = {instances}\n"
    );
    std::fs::write(dir.join(".miren/app.toml"), toml)?;
    Ok(dir)
}

/// The log target of quinn's endpoint (stateless resets).
const QUIC_RESET_LOG: &str = "quinn_proto::endpoint=debug";

/// Metric series the bench reads.
const HEALTHY: &str = "miren_sandboxes{state=\"healthy\"}";
const READY: &str = "miren_runners{state=\"ready\"}";
const RANGES: &str = "miren_store_operation_seconds_count{op=\"range\"}";
const COMMITS: &str = "miren_store_operation_seconds_count{op=\"commit\"}";

/// What the load generator saw.
#[derive(Default)]
struct Load {
    ok: u64,
    other_status: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    micros: Vec<u32>,
    secs: f64,
}

fn bench_main(benching: bool) -> anyhow::Result<()> {
    let s = if benching {
        Settings {
            runners: env_number("CONVERGE_BENCH_RUNNERS").unwrap_or(50).max(1) as usize,
            sandboxes: env_number("CONVERGE_BENCH_SANDBOXES").unwrap_or(500).max(1) as usize,
            web: env_number("CONVERGE_BENCH_WEB").unwrap_or(4).max(1) as usize,
            steady: Duration::from_secs(env_number("CONVERGE_BENCH_STEADY_SECS").unwrap_or(30)),
            load: Duration::from_secs(env_number("CONVERGE_BENCH_LOAD_SECS").unwrap_or(10)),
            connections: env_number("CONVERGE_BENCH_CONNECTIONS")
                .unwrap_or(32)
                .max(1) as usize,
            micro: Duration::from_secs(2),
        }
    } else {
        Settings {
            runners: 3,
            sandboxes: 8,
            web: 2,
            steady: Duration::from_secs(2),
            load: Duration::from_secs(1),
            connections: 4,
            micro: Duration::from_millis(200),
        }
    };
    let bin = miren_bin()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clk = clock_ticks();
    let apps = plan_apps(&s);
    let total: usize = apps.iter().map(|(_, n)| n).sum();
    let app_names: BTreeSet<String> = apps.iter().map(|(a, _)| a.clone()).collect();

    // The swarm holds a UDP socket per runner and, per sandbox, a token
    // listener, two pipes and a child.
    let need = (s.runners + 6 * total + 256) as u64;
    match open_files_limit() {
        Some(limit) if limit < need => anyhow::bail!(
            "open files limit is {limit}; {} runners with {total} sandboxes need about {need}: raise it (`ulimit -n {need}`)",
            s.runners
        ),
        Some(_) => {}
        None => eprintln!("warning: could not read /proc/self/limits; continuing"),
    }

    let tmp = tempfile::Builder::new()
        .prefix("miren-bench-converge-")
        .tempdir()?;
    let config = tmp.path().join("cfg.yaml");
    let data = tmp.path().join("data");
    let ports = Ports {
        quic: free_port()?,
        http: free_port()?,
        metrics: free_port()?,
    };
    let metrics_addr: SocketAddr = ([127, 0, 0, 1], ports.metrics).into();
    let http_addr: SocketAddr = ([127, 0, 0, 1], ports.http).into();
    let mut server = start_server(&bin, &data, &config, &ports, 1, None)?;
    println!(
        "coordinator pid {} at {} ({cores} cores, CLK_TCK {clk}); {} runners, {total} sandboxes in {} apps",
        server.pid,
        server.address,
        s.runners,
        apps.len()
    );
    let code = miren(
        &bin,
        &config,
        &["runner", "token", "create", "--reusable", "--ttl", "1h"],
    )?
    .trim()
    .to_string();

    // The swarm.
    let runners_dir = tmp.path().join("runners");
    std::fs::create_dir_all(&runners_dir)?;
    let swarm_stderr_path = tmp.path().join("swarm.stderr");
    let mut swarm = Swarm::spawn(
        SWARM_ENV,
        &SwarmArgs {
            code,
            dir: runners_dir.clone(),
            runners: s.runners,
            concurrency: 16,
        },
        std::fs::File::create(&swarm_stderr_path)?.into(),
        SwarmOut::default(),
    )?;
    let swarm_pid = swarm.pid;
    if !swarm.pump_until(JOIN_TIMEOUT, |o| o.join_done.is_some()) {
        anyhow::bail!(
            "the joins did not finish (fatal: {:?}, errors: {:?}, other: {:?})",
            swarm.out.fatal,
            swarm.out.join_errors,
            swarm.out.other
        );
    }
    let runners = s.runners;
    if !swarm.pump_until(READY_TIMEOUT, |o| o.connected.len() >= runners) {
        anyhow::bail!(
            "{} of {runners} runners connected (failures: {:?}, fatal: {:?})",
            swarm.out.connected.len(),
            swarm.out.runner_failures,
            swarm.out.fatal
        );
    }
    wait_metric(
        &mut swarm,
        metrics_addr,
        READY,
        runners as f64,
        READY_TIMEOUT,
    )?;

    // The apps. Deploys wait until their version is active.
    let deploy_start = Instant::now();
    let mut deploy_failures: Vec<String> = Vec::new();
    for (name, n) in &apps {
        let dir = write_app(tmp.path(), name, *n)?;
        let dir = dir
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("non-UTF-8 dir"))?;
        let t = Instant::now();
        // A deploy can fail for a reason outside this bench (see
        // `deploy_failures` in the report): deploy again, a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match miren(&bin, &config, &["deploy", "--dir", dir, "-a", name]) {
                Ok(_) => break,
                Err(e) if attempt < 4 => {
                    let text = format!("{e:#}");
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(5)..].join(" / ");
                    println!(
                        "deploy of {name} failed (attempt {attempt}), deploying again: {tail}"
                    );
                    deploy_failures.push(format!("{name}: {tail}"));
                }
                Err(e) => return Err(e),
            }
        }
        swarm.drain();
        println!(
            "deployed {name}: {n} sandboxes active after {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    miren(&bin, &config, &["route", "set", WEB_HOST, "-a", "web"])?;
    wait_metric(
        &mut swarm,
        metrics_addr,
        HEALTHY,
        total as f64,
        HEALTHY_TIMEOUT,
    )?;
    let deploy_secs = deploy_start.elapsed().as_secs_f64();
    let before = sandbox_processes(&app_names, &runners_dir);
    let mut records_before: BTreeSet<String> = BTreeSet::new();
    for (name, _) in &apps {
        let st = app_status(&bin, &config, name)?;
        for sb in st["sandboxes"].as_array().into_iter().flatten() {
            records_before.insert(sb["id"].as_str().unwrap_or_default().to_string());
        }
    }
    let one_sandbox = before.values().next().copied();
    let sandbox_rss = one_sandbox.and_then(|p| status_field(p, "VmRSS"));
    let sandbox_private = one_sandbox.and_then(|p| {
        Some(smaps_field(p, "Private_Dirty")? + smaps_field(p, "Private_Clean").unwrap_or(0))
    });
    let swarm_rss_before = status_field(swarm_pid, "VmRSS").unwrap_or(0);
    let rss_before = status_field(server.pid, "VmRSS").unwrap_or(0);

    // Pre-restart steady window, for comparison with the one after.
    let pre_window = s.steady.min(Duration::from_secs(10));
    let pre_m_a = scrape(metrics_addr)?;
    let pre_a = sample(server.pid);
    swarm.pump_until(pre_window, |_| false);
    let pre_b = sample(server.pid);
    let pre_m_b = scrape(metrics_addr)?;
    let pre_passes =
        (metric(&pre_m_b, RANGES).unwrap_or(0.0) - metric(&pre_m_a, RANGES).unwrap_or(0.0)) / 2.0;

    // The restart.
    println!(
        "{} sandbox records, {} sandbox processes; SIGKILL to the coordinator",
        records_before.len(),
        before.len()
    );
    let connected_before_kill = swarm.out.connected.len();
    let swarm_log_at_kill = std::fs::metadata(&swarm_stderr_path).map_or(0, |m| m.len());
    let _ = Command::new("kill")
        .args(["-KILL", &server.pid.to_string()])
        .status();
    let _ = wait_until(&mut server.guard.0, Duration::from_secs(10));
    drop(server);
    let killed_at = Instant::now();
    let restart_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    // quinn's endpoint says at debug level when it sends a stateless
    // reset to a runner's old connection and when it holds one back.
    let server2 = start_server(
        &bin,
        &data,
        &config,
        &ports,
        2,
        Some(&format!("warn,{QUIC_RESET_LOG}")),
    )?;
    let pid = server2.pid;
    let t0 = server2.spawned;
    let banner_secs = server2.ready.duration_since(t0).as_secs_f64();
    // Poll /metrics until every runner is ready and every sandbox healthy.
    let mut polls = 0u32;
    let mut first_ready_all: Option<Instant> = None;
    let mut last_text = String::new();
    let converged_at = loop {
        swarm.drain();
        if let Ok(text) = scrape(metrics_addr) {
            polls += 1;
            let ready = metric(&text, READY).unwrap_or(0.0) as usize;
            let healthy = metric(&text, HEALTHY).unwrap_or(0.0) as usize;
            if ready >= runners && first_ready_all.is_none() {
                first_ready_all = Some(Instant::now());
            }
            last_text = text;
            if ready >= runners && healthy >= total {
                break Some(Instant::now());
            }
        }
        if t0.elapsed() > CONVERGE_TIMEOUT || swarm.out.fatal.is_some() || swarm.out.closed {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let conv_sample = sample(pid);
    let Some(converged_at) = converged_at else {
        anyhow::bail!(
            "no convergence within {CONVERGE_TIMEOUT:?}: ready {:?}, healthy {:?} (swarm fatal {:?})",
            metric(&last_text, READY),
            metric(&last_text, HEALTHY),
            swarm.out.fatal
        );
    };
    let converge_secs = converged_at.duration_since(t0).as_secs_f64();
    let converge_cpu = conv_sample.ticks as f64 / clk;
    swarm.drain();
    let reconnects: Vec<Instant> = swarm.out.connected[connected_before_kill..].to_vec();
    let reconnect_first = reconnects
        .first()
        .map(|t| t.duration_since(t0).as_secs_f64());
    let reconnect_last = reconnects
        .last()
        .map(|t| t.duration_since(t0).as_secs_f64());
    // Reconnections by whole second after the spawn.
    let mut reconnect_hist: BTreeMap<u64, usize> = BTreeMap::new();
    for t in &reconnects {
        *reconnect_hist
            .entry(t.duration_since(t0).as_secs())
            .or_default() += 1;
    }
    let runner_log = runner_log_since(&swarm_stderr_path, swarm_log_at_kill);
    let commits_at_convergence = metric(&last_text, COMMITS).unwrap_or(0.0);
    let passes_at_convergence = (metric(&last_text, RANGES).unwrap_or(0.0) - 2.0).max(0.0) / 2.0;

    // What an operator sees, and what runs on the machine.
    let mut status_states: BTreeMap<String, usize> = BTreeMap::new();
    let mut stale = 0usize;
    let mut records_after: BTreeSet<String> = BTreeSet::new();
    for (name, _) in &apps {
        let st = app_status(&bin, &config, name)?;
        for sb in st["sandboxes"].as_array().into_iter().flatten() {
            let state = sb["state"].as_str().unwrap_or("?").to_string();
            *status_states.entry(state).or_default() += 1;
            if sb["reported_unix"].as_i64().unwrap_or(0) < restart_unix {
                stale += 1;
            }
            records_after.insert(sb["id"].as_str().unwrap_or_default().to_string());
        }
    }
    let after = sandbox_processes(&app_names, &runners_dir);
    let same_pid = before
        .iter()
        .filter(|(id, pid)| after.get(*id) == Some(pid))
        .count();
    let gone = before.keys().filter(|id| !after.contains_key(*id)).count();
    let new = after.keys().filter(|id| !before.contains_key(*id)).count();
    let restarted = before.len() - same_pid - gone;

    // Steady window after the convergence.
    let m_a = scrape(metrics_addr)?;
    let win_a = sample(pid);
    let swarm_a = sample(swarm_pid);
    swarm.pump_until(s.steady, |o| o.fatal.is_some() || o.closed);
    let win_b = sample(pid);
    let swarm_b = sample(swarm_pid);
    let m_b = scrape(metrics_addr)?;
    let window_passes =
        (metric(&m_b, RANGES).unwrap_or(0.0) - metric(&m_a, RANGES).unwrap_or(0.0)) / 2.0;
    let window_commits =
        metric(&m_b, COMMITS).unwrap_or(0.0) - metric(&m_a, COMMITS).unwrap_or(0.0);
    let rss_after = status_field(pid, "VmRSS").unwrap_or(0);
    let after_window = sandbox_processes(&app_names, &runners_dir);
    let steady_same = before
        .iter()
        .filter(|(id, pid)| after_window.get(*id) == Some(pid))
        .count();

    // The ingress.
    let requests_before = ingress_requests(&m_b);
    let load_a = sample(pid);
    let load_swarm_a = sample(swarm_pid);
    let load = drive_ingress(http_addr, s.connections, s.load)?;
    let load_b = sample(pid);
    let load_swarm_b = sample(swarm_pid);
    let m_c = scrape(metrics_addr)?;
    let requests_counted = ingress_requests(&m_c) - requests_before;

    // Stop the runners, then the coordinator.
    drop(swarm.stdin.take());
    swarm.pump_until(STOP_TIMEOUT, |o| o.stopped.is_some());
    let swarm_status = wait_until(&mut swarm.guard.0, Duration::from_secs(10));
    let mut server2 = server2;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let server_status = wait_until(&mut server2.guard.0, STOP_TIMEOUT);
    let stderr1 = std::fs::read_to_string(data.with_extension("stderr.1")).unwrap_or_default();
    let stderr2 = std::fs::read_to_string(&server2.stderr_path).unwrap_or_default();
    let swarm_stderr = std::fs::read_to_string(&swarm_stderr_path).unwrap_or_default();

    // In-process, on a copy of the store: the ingress's old and new choice
    // of sandboxes, and one reconcile pass.
    let micro = micro_measures(&data.join("store.redb"), tmp.path(), s.micro)?;

    // Report.
    let rule = "-".repeat(100);
    let row = |label: &str, value: String| println!("  {label:<44} {value}");
    let pct = |share: f64| {
        format!(
            "{:6.2} % of one core ({:5.2} % of {cores})",
            share * 100.0,
            share * 100.0 / cores as f64
        )
    };
    println!();
    println!(
        "converge bench: {} simulated runners (one swarm process, --isolation none), {total} sandboxes in {} apps, {} build",
        s.runners,
        apps.len(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!("{rule}");
    println!("setup");
    row(
        "deploys until all healthy",
        format!(
            "{deploy_secs:.1} s for {total} sandboxes ({})",
            apps.iter()
                .map(|(a, n)| format!("{a}:{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    row(
        "failed deploys, deployed again",
        if deploy_failures.is_empty() {
            "0".to_string()
        } else {
            format!("{}: {}", deploy_failures.len(), deploy_failures.join(" | "))
        },
    );
    row(
        "one sandbox process",
        format!(
            "RSS {:.1} MiB, private {:.2} MiB (this bench binary serving `200 ok` on $PORT)",
            sandbox_rss.map_or(0.0, mib),
            sandbox_private.map_or(0.0, mib)
        ),
    );
    row(
        "coordinator RSS / swarm RSS",
        format!(
            "{:.1} MiB / {:.1} MiB",
            mib(rss_before),
            mib(swarm_rss_before)
        ),
    );
    row(
        "before restart: CPU, passes",
        format!(
            "{} over {:.1} s; {pre_passes:.0} passes ({:.1}/s)",
            pct(cpu_share(pre_a, pre_b, clk)),
            pre_b.at.duration_since(pre_a.at).as_secs_f64(),
            pre_passes / pre_b.at.duration_since(pre_a.at).as_secs_f64().max(1e-9)
        ),
    );
    println!("restart (SIGKILL, then `miren server` again on the same data dir and ports)");
    row(
        "killed -> new process spawned",
        format!("{:.3} s", t0.duration_since(killed_at).as_secs_f64()),
    );
    row("spawn -> ready banner", format!("{banner_secs:.2} s"));
    row(
        "spawn -> first / last runner reconnected",
        format!(
            "{} / {} s ({} reconnects seen)",
            reconnect_first.map_or("-".into(), |t| format!("{t:.2}")),
            reconnect_last.map_or("-".into(), |t| format!("{t:.2}")),
            reconnects.len()
        ),
    );
    row(
        "reconnects by second after the spawn",
        reconnect_hist
            .iter()
            .map(|(s, n)| format!("{s}s:{n}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    row(
        "runners' log: sessions lost / reconnect waits",
        format!(
            "{} / {} (backoff {})",
            runner_log.lost,
            runner_log.waits.len(),
            summarize_waits(&runner_log.waits)
        ),
    );
    for (reason, n) in runner_log.reasons.iter().take(4) {
        row("  lost because", format!("{n} x {reason}"));
    }
    let count = |needle: &str| stderr2.lines().filter(|l| l.contains(needle)).count();
    row(
        "coordinator: stateless resets sent / held",
        format!(
            "{} / {} (held: within quinn's min_reset_interval of the last one, 20 ms) / {} (packet too small)",
            count("sending stateless reset"),
            count("within minimum stateless reset interval"),
            count("not larger than minimum stateless reset size")
        ),
    );
    row(
        "spawn -> all runners ready (/metrics)",
        first_ready_all.map_or("-".into(), |t| {
            format!("{:.2} s", t.duration_since(t0).as_secs_f64())
        }),
    );
    row(
        "spawn -> CONVERGED",
        format!(
            "{converge_secs:.2} s (all {runners} runners ready, all {total} sandboxes healthy on the new sessions; {polls} scrapes)"
        ),
    );
    row(
        "coordinator CPU, spawn -> converged",
        format!(
            "{converge_cpu:.2} s CPU ({:.0} % of one core over {converge_secs:.2} s)",
            100.0 * converge_cpu / converge_secs.max(1e-9)
        ),
    );
    row(
        "reconcile passes / store commits until then",
        format!("{passes_at_convergence:.0} / {commits_at_convergence:.0}"),
    );
    row(
        "`app status` after convergence",
        format!("{status_states:?}; {stale} reported before the restart"),
    );
    row(
        "sandbox records before / after",
        format!(
            "{} / {} ({} the same ids)",
            records_before.len(),
            records_after.len(),
            records_before.intersection(&records_after).count()
        ),
    );
    row(
        "sandbox processes after convergence",
        format!(
            "{same_pid}/{} the same pid, {restarted} restarted, {gone} gone, {new} new",
            before.len()
        ),
    );
    println!(
        "steady state after convergence ({:.1} s window)",
        win_b.at.duration_since(win_a.at).as_secs_f64()
    );
    let wsecs = win_b.at.duration_since(win_a.at).as_secs_f64().max(1e-9);
    row("coordinator CPU", pct(cpu_share(win_a, win_b, clk)));
    row(
        "reconcile passes (range reads / 2)",
        format!(
            "{window_passes:.0} ({:.1}/s; woken by each heartbeat: {} runners / 5 s = {:.0}/s)",
            window_passes / wsecs,
            s.runners,
            s.runners as f64 / 5.0
        ),
    );
    row(
        "coordinator CPU per pass (upper bound)",
        if window_passes > 0.0 {
            format!(
                "{:.2} ms (all of the window's CPU / passes)",
                1000.0 * cpu_secs_between(win_a, win_b, clk) / window_passes
            )
        } else {
            "-".into()
        },
    );
    row(
        "one pass in-process (same records)",
        format!(
            "{:.3} ms ({} passes timed)",
            micro.pass_secs * 1000.0,
            micro.pass_n
        ),
    );
    row(
        "store commits in the window",
        format!("{window_commits:.0}"),
    );
    row(
        "sandbox processes at the window's end",
        format!("{steady_same}/{} the same pid", before.len()),
    );
    row(
        "swarm CPU (all runners)",
        pct(cpu_share(swarm_a, swarm_b, clk)),
    );
    row(
        "coordinator RSS at the window's end",
        format!("{:.1} MiB", mib(rss_after)),
    );
    println!(
        "ingress (Host: {WEB_HOST}, app web with {} healthy sandboxes; {} keep-alive connections, {:.1} s)",
        s.web, s.connections, load.secs
    );
    let done = load.ok + load.other_status.values().sum::<u64>();
    let rate = done as f64 / load.secs.max(1e-9);
    let mut lat = load.micros.clone();
    lat.sort_unstable();
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |u| *u as f64 / 1000.0)
    };
    row(
        "requests/s (watch-fed index, measured)",
        format!(
            "{rate:.0}  ({} x 200, other {:?}, {} errors{}; coordinator counted {requests_counted:.0})",
            load.ok,
            load.other_status,
            load.errors,
            load.first_error
                .as_deref()
                .map_or(String::new(), |e| format!(": {e}"))
        ),
    );
    row(
        "latency",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            q(0.5),
            q(0.99),
            q(1.0)
        ),
    );
    let coord_cpu = cpu_secs_between(load_a, load_b, clk);
    let coord_per_req = if done > 0 {
        coord_cpu / done as f64
    } else {
        0.0
    };
    row(
        "coordinator CPU / per request",
        format!(
            "{} / {:.1} us",
            pct(cpu_share(load_a, load_b, clk)),
            coord_per_req * 1e6
        ),
    );
    row(
        "swarm CPU (runners proxying)",
        pct(cpu_share(load_swarm_a, load_swarm_b, clk)),
    );
    println!(
        "choosing the sandboxes of a request, in-process on a copy of the store ({} sandbox records, {} of web)",
        micro.records, micro.web
    );
    row(
        "before: app record + scan/decode sandbox/",
        format!("{:9.1} us per call", micro.old_secs * 1e6),
    );
    row(
        "now: SandboxIndex::healthy (memory)",
        format!("{:9.3} us per call", micro.new_secs * 1e6),
    );
    row(
        "ratio",
        format!("{:.0}x", micro.old_secs / micro.new_secs.max(1e-12)),
    );
    let extra = (micro.old_secs - micro.new_secs).max(0.0);
    if coord_per_req > 0.0 {
        let est = rate * coord_per_req / (coord_per_req + extra);
        row(
            "rate before (ESTIMATE, not measured)",
            format!(
                "~{est:.0} requests/s: the same coordinator CPU budget at {:.1} + {:.1} us per request",
                coord_per_req * 1e6,
                extra * 1e6
            ),
        );
    }
    println!("shutdown");
    row(
        "runners",
        format!(
            "{}; swarm {}",
            swarm.out.stopped.as_deref().unwrap_or("stop NOT CONFIRMED"),
            swarm_status.map_or("still running, killed".to_string(), |s| s.to_string())
        ),
    );
    row(
        "coordinator (SIGTERM)",
        server_status.map_or("did not exit, killed".to_string(), |s| s.to_string()),
    );
    println!("{rule}");

    let mut problems = Vec::new();
    if !swarm.out.join_errors.is_empty() {
        problems.push(format!("join errors: {:?}", swarm.out.join_errors));
    }
    if !swarm.out.runner_failures.is_empty() {
        problems.push(format!("runners failed: {:?}", swarm.out.runner_failures));
    }
    if let Some(f) = &swarm.out.fatal {
        problems.push(format!("swarm: {f}"));
    }
    if !swarm.out.other.is_empty() {
        problems.push(format!("unexpected swarm output: {:?}", swarm.out.other));
    }
    if same_pid != before.len() || new > 0 || records_before != records_after {
        problems.push("the restart changed what runs (see above)".into());
    }
    for (name, text) in [
        ("first coordinator", &stderr1),
        ("restarted coordinator", &stderr2),
    ] {
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("DEBUG")).collect();
        let warns = lines.iter().filter(|l| l.contains("WARN")).count();
        let errors = lines.iter().filter(|l| l.contains("ERROR")).count();
        println!(
            "{name} stderr: {} lines ({warns} WARN, {errors} ERROR)",
            lines.len()
        );
        let mut shown: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(4)
            .collect();
        if shown.is_empty() {
            shown = lines.iter().take(2).collect();
        }
        for l in shown {
            println!("  {l}");
        }
    }
    let swarm_lines: Vec<&str> = swarm_stderr.lines().collect();
    println!("swarm stderr: {} lines; first:", swarm_lines.len());
    for l in swarm_lines.iter().take(3) {
        println!("  {l}");
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if !benching {
        println!(
            "(quick pass: run `cargo bench -p integration-tests --bench converge` for real numbers)"
        );
    }
    Ok(())
}

/// What the runners logged after the coordinator was killed.
#[derive(Default)]
struct RunnerLog {
    lost: usize,
    reasons: Vec<(String, usize)>,
    /// Backoff waits before reconnecting, in seconds.
    waits: Vec<f64>,
}

fn runner_log_since(path: &Path, offset: u64) -> RunnerLog {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned();
    let mut log = RunnerLog::default();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        if let Some((_, why)) = line.split_once("connection to the coordinator lost: ") {
            log.lost += 1;
            let why: String = why.chars().take(90).collect();
            *reasons.entry(why).or_default() += 1;
        } else if let Some((_, wait)) = line.split_once("reconnecting in ") {
            let wait = wait.trim();
            let secs = if let Some(ms) = wait.strip_suffix("ms") {
                ms.parse::<f64>().ok().map(|v| v / 1000.0)
            } else {
                wait.strip_suffix('s').and_then(|v| v.parse::<f64>().ok())
            };
            if let Some(secs) = secs {
                log.waits.push(secs);
            }
        }
    }
    log.reasons = reasons.into_iter().collect();
    log.reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    log
}

fn summarize_waits(waits: &[f64]) -> String {
    if waits.is_empty() {
        return "-".into();
    }
    let max = waits.iter().copied().fold(0.0, f64::max);
    let min = waits.iter().copied().fold(f64::INFINITY, f64::min);
    format!("{min:.2}..{max:.2} s")
}

/// The ingress requests the coordinator counted, every app and status.
fn ingress_requests(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("miren_ingress_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the series `series` reaches `want`.
fn wait_metric(
    swarm: &mut Swarm<SwarmOut>,
    addr: SocketAddr,
    series: &str,
    want: f64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        swarm.drain();
        if let Ok(text) = scrape(addr) {
            last = metric(&text, series);
            if last.unwrap_or(0.0) >= want {
                return Ok(());
            }
        }
        if Instant::now() >= deadline || swarm.out.fatal.is_some() || swarm.out.closed {
            anyhow::bail!(
                "{series} is {last:?}, want {want} (swarm fatal: {:?}, failures: {:?})",
                swarm.out.fatal,
                swarm.out.runner_failures
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------
// The ingress load
// ---------------------------------------------------------------------------

fn drive_ingress(addr: SocketAddr, connections: usize, secs: Duration) -> anyhow::Result<Load> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let until = started + secs;
        let workers: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(load_worker(addr, until)))
            .collect();
        let mut total = Load::default();
        for w in workers {
            let l = w.await?;
            total.ok += l.ok;
            for (k, v) in l.other_status {
                *total.other_status.entry(k).or_default() += v;
            }
            total.errors += l.errors;
            if total.first_error.is_none() {
                total.first_error = l.first_error;
            }
            total.micros.extend(l.micros);
        }
        total.secs = started.elapsed().as_secs_f64();
        Ok(total)
    })
}

async fn load_worker(addr: SocketAddr, until: Instant) -> Load {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    let mut load = Load::default();
    let fail = |load: &mut Load, e: String| {
        load.errors += 1;
        if load.first_error.is_none() {
            load.first_error = Some(e);
        }
    };
    'connect: while Instant::now() < until {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                fail(&mut load, format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(x) => x,
            Err(e) => {
                fail(&mut load, format!("handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            if let Err(e) = sender.ready().await {
                fail(&mut load, format!("connection: {e}"));
                continue 'connect;
            }
            let req = match hyper::Request::get("/")
                .header(hyper::header::HOST, WEB_HOST)
                .body(Empty::<Bytes>::new())
            {
                Ok(r) => r,
                Err(e) => {
                    fail(&mut load, format!("request: {e}"));
                    return load;
                }
            };
            let t = Instant::now();
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    fail(&mut load, format!("send: {e}"));
                    continue 'connect;
                }
            };
            let status = resp.status().as_u16();
            if let Err(e) = resp.into_body().collect().await {
                fail(&mut load, format!("body: {e}"));
                continue 'connect;
            }
            load.micros
                .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if status == 200 {
                load.ok += 1;
            } else {
                *load.other_status.entry(status).or_default() += 1;
            }
        }
    }
    load
}

// ---------------------------------------------------------------------------
// In-process measures on a copy of the store
// ---------------------------------------------------------------------------

struct Micro {
    records: usize,
    web: usize,
    old_secs: f64,
    new_secs: f64,
    pass_secs: f64,
    pass_n: u64,
}

/// Runs `f` repeatedly for about `budget`; seconds per call and calls.
fn per_call(budget: Duration, mut f: impl FnMut() -> usize) -> (f64, u64) {
    // Warm up.
    for _ in 0..3 {
        std::hint::black_box(f());
    }
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < budget || n < 10 {
        std::hint::black_box(f());
        n += 1;
    }
    (started.elapsed().as_secs_f64() / n as f64, n)
}

fn micro_measures(store_file: &Path, tmp: &Path, budget: Duration) -> anyhow::Result<Micro> {
    use coordinator::apps::{AppRecord, Apps, SandboxRecord, SandboxReport, SandboxState};
    use coordinator::observed::Observed;
    use coordinator::sandbox_index::SandboxIndex;
    use coordinator::store::{decode, RedbStore, Store};

    let dir = tmp.join("micro");
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("store.redb");
    std::fs::copy(store_file, &copy)?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&copy)?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;

    // Every sandbox reported healthy on its runner's live session, every
    // runner's inventory its assignments: the steady state.
    let records: Vec<SandboxRecord> = store
        .scan("sandbox/")?
        .into_iter()
        .map(|(k, v)| decode(&k, &v))
        .collect::<Result<_, _>>()?;
    let mut by_runner: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &records {
        by_runner
            .entry(r.runner.clone())
            .or_default()
            .insert(r.id.clone());
    }
    let fill = |o: &Observed| {
        for (runner, ids) in &by_runner {
            o.session_started(runner, 1);
            for id in ids {
                let report = SandboxReport {
                    state: SandboxState::Healthy,
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                };
                o.report(runner, 1, id, report, now);
            }
            o.inventory(runner, 1, ids.clone(), now);
        }
    };
    let observed = Observed::new(now - 10);
    fill(&observed);

    // Before: what `Apps::healthy_sandboxes` did per request.
    let old = |app: &str| -> usize {
        let key = format!("app/{app}");
        let active = store
            .get(&key)
            .ok()
            .flatten()
            .and_then(|b| decode::<AppRecord>(&key, &b).ok())
            .and_then(|a| a.active);
        let healthy: Vec<SandboxRecord> = store
            .scan("sandbox/")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| decode::<SandboxRecord>(&k, &v).ok())
            .filter(|s| s.app == app && observed.is_healthy(&s.runner, &s.id))
            .collect();
        let of_active: Vec<&SandboxRecord> = healthy
            .iter()
            .filter(|s| Some(&s.version) == active.as_ref())
            .collect();
        if of_active.is_empty() {
            healthy.len()
        } else {
            of_active.len()
        }
    };
    let (index, _) = SandboxIndex::load(&*store)?;
    let web_old = old("web");
    let web_new = index.healthy("web", &observed).len();
    anyhow::ensure!(
        web_old == web_new,
        "the old and new choices differ: {web_old} vs {web_new} sandboxes"
    );
    let (old_secs, _) = per_call(budget, || old("web"));
    let (new_secs, _) = per_call(budget, || index.healthy("web", &observed).len());

    // One reconcile pass over the same records.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tasks = coordinator::shutdown::Tasks::new(rt.handle().clone());
    let apps = Arc::new(Apps::new(store.clone(), &dir, tasks.clone())?);
    fill(apps.reports().as_ref());
    let registry = Arc::new(coordinator::runners::Registry::new(
        store.clone(),
        Duration::from_secs(3600),
    ));
    let routes = Arc::new(coordinator::routes::Routes::open(store.clone())?);
    let ci = Arc::new(coordinator::ci::CiBindings::load(
        store.clone(),
        identity::AddressPolicy::new(false, vec![]),
    )?);
    let reconciler = coordinator::reconcile::Reconciler::new(
        store.clone(),
        apps,
        registry,
        routes,
        ci,
        tasks.clone(),
        "https://converge.bench".into(),
        coordinator::reconcile::Settings::default(),
        coordinator::leader::Leadership::always(),
    );
    let revision = store.revision()?;
    let (pass_secs, pass_n) = rt.block_on(async {
        for _ in 0..3 {
            reconciler.pass().await?;
        }
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < budget || n < 10 {
            reconciler.pass().await?;
            n += 1;
        }
        Ok::<_, anyhow::Error>((started.elapsed().as_secs_f64() / n as f64, n))
    })?;
    anyhow::ensure!(
        store.revision()? == revision,
        "the timed passes wrote to the store (they should have found nothing to do)"
    );
    tasks.stop();
    Ok(Micro {
        records: records.len(),
        web: web_new,
        old_secs,
        new_secs,
        pass_secs,
        pass_n,
    })
}

// ---------------------------------------------------------------------------
// The swarm process
// ---------------------------------------------------------------------------

fn swarm_main() -> anyhow::Result<()> {
    let args = SwarmArgs::from_env()?;
    // The runners' own account of losing and regaining the coordinator
    // ("connection to the coordinator lost: …", "reconnecting in …") goes
    // to our stderr, a file the bench reads.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,runner=info"))
        .init();

    let stop = swarm::stop_on_stdin_close();
    swarm::block_on_local(async move {
        let joined = swarm::join_runners(&args).await;
        swarm::say(&format!("JOIN_DONE {}", joined.len()));
        let data = joined.into_iter().map(|(data, _)| data).collect();
        swarm::run_runners(data, stop, Duration::from_secs(20)).await;
    })
}
