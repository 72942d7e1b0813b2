//! One real coordinator with many runners connected and heartbeating: how
//! fast runners join, and what the connections cost the coordinator in
//! memory and CPU.
//!
//! `cargo bench -p integration-tests --bench runners` (build the binary first:
//! `cargo build --release -p cli`; `MIREN_BIN` overrides its location):
//!
//! 1. starts `miren server --listen 127.0.0.1:0` as its own process and
//!    creates a reusable join code with `miren runner token create`;
//! 2. measures the idle coordinator (RSS, CPU);
//! 3. re-executes itself as the "swarm" process: on one current-thread tokio
//!    runtime it joins N runners (`runner::join::join`, bounded concurrency,
//!    each with its own data dir) and reports the join rate, then starts all
//!    of them with `runner::run` (one QUIC connection each, heartbeat every
//!    5 s). The swarm runs in a separate process so that the runners' own
//!    output ("Runner … connected") is counted here rather than printed, and
//!    so the coordinator's and the runners' CPU are measured apart;
//! 4. waits until `miren runner list -o json` shows every runner `ready`,
//!    then measures the coordinator over a fixed window: CPU from
//!    `/proc/<pid>/stat` (utime + stime), RSS from `/proc/<pid>/status`;
//! 5. stops the runners (closing the swarm's stdin), then the server
//!    (SIGTERM), and prints a summary table. Timings are reported, never
//!    asserted.
//!
//! Environment: `RUNNERS_BENCH_N` (default 500), `RUNNERS_BENCH_CONCURRENCY`
//! (joins in flight, default 16), `RUNNERS_BENCH_SECS` (measured window,
//! default 30). Under `cargo test --benches` (no `--bench` argument) a quick
//! pass with a handful of runners shows the bench still works.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)]
mod common;
#[path = "common/swarm.rs"]
mod swarm;

use common::{
    clock_ticks, cpu_share, mib, miren, miren_bin, open_files_limit, sample, status_field,
    wait_until,
};
use swarm::{say, Swarm, SwarmArgs, SwarmReport, TAG};

/// Set in the environment of the re-executed swarm process.
const SWARM_ENV: &str = "MIREN_RUNNERS_BENCH_SWARM";

const SERVER_START: Duration = Duration::from_secs(30);
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(75);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn main() -> ExitCode {
    if let Some(end) = swarm::run_if_swarm(SWARM_ENV, swarm_main) {
        return end;
    }
    let benching = std::env::args().any(|a| a == "--bench");
    common::run_bench("runners", benching, miren_bin().map(drop), || {
        coordinator_main(benching)
    })
}

/// Starts `miren server` and waits for the end of its ready banner. The
/// whole swarm joins from 127.0.0.1, where in a cluster each runner has its
/// own address: the per-address join rate is lifted accordingly.
fn start_server(bin: &Path, data: &Path, config: &Path) -> anyhow::Result<common::ServerProc> {
    let mut cmd = Command::new(bin);
    cmd.arg("server")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(["--join-burst", "1000000"])
        .env("MIREN_CONFIG", config)
        .env_remove("MIREN_CLUSTER");
    common::start_server(cmd, data.with_extension("stderr"), SERVER_START)
}

/// Runner statuses from `miren runner list -o json`: status -> count.
fn runner_statuses(bin: &Path, config: &Path) -> anyhow::Result<BTreeMap<String, usize>> {
    let out = miren(bin, config, &["runner", "list", "-o", "json"])?;
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    let mut counts = BTreeMap::new();
    for r in rows.as_array().into_iter().flatten() {
        let s = r["status"].as_str().unwrap_or("?").to_string();
        *counts.entry(s).or_insert(0) += 1;
    }
    Ok(counts)
}

// ---------------------------------------------------------------------------
// The swarm, seen from the coordinator side of the bench
// ---------------------------------------------------------------------------

#[derive(Default)]
struct JoinReport {
    ok: usize,
    failed: usize,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// What the swarm process has said so far.
#[derive(Default)]
struct SwarmOut {
    join_started: Option<Instant>,
    join: Option<JoinReport>,
    join_errors: Vec<String>,
    join_error_count: usize,
    /// "Runner … connected to …" lines (first connections and reconnects).
    connected: usize,
    runner_failures: Vec<String>,
    runner_failure_count: usize,
    stopped: Option<String>,
    fatal: Option<String>,
    other: Vec<String>,
    closed: bool,
}

impl SwarmReport for SwarmOut {
    fn handle(&mut self, _at: Instant, line: String) {
        let Some(msg) = line.strip_prefix(TAG) else {
            if line.starts_with("Runner ") && line.contains(" connected to ") {
                self.connected += 1;
            } else if self.other.len() < 20 {
                self.other.push(line);
            }
            return;
        };
        let (kind, rest) = msg.split_once(' ').unwrap_or((msg, ""));
        match kind {
            "JOIN_START" => self.join_started = Some(Instant::now()),
            "JOIN_ERR" => {
                self.join_error_count += 1;
                if self.join_errors.len() < 5 {
                    self.join_errors.push(rest.to_string());
                }
            }
            "JOIN_DONE" => {
                let v: Vec<f64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if let [ok, failed, secs, p50, p99, max] = v[..] {
                    self.join = Some(JoinReport {
                        ok: ok as usize,
                        failed: failed as usize,
                        secs,
                        p50_ms: p50,
                        p99_ms: p99,
                        max_ms: max,
                    });
                } else {
                    self.fatal = Some(format!("unparsable JOIN_DONE line: {rest}"));
                }
            }
            "RUNNER_FAILED" => {
                self.runner_failure_count += 1;
                if self.runner_failures.len() < 5 {
                    self.runner_failures.push(rest.to_string());
                }
            }
            "STOPPED" => self.stopped = Some(rest.to_string()),
            "FATAL" => self.fatal = Some(rest.to_string()),
            _ => self.other.push(line),
        }
    }

    fn ended(&self) -> bool {
        self.fatal.is_some() || self.closed
    }

    fn set_closed(&mut self) {
        self.closed = true;
    }
}

struct Settings {
    n: usize,
    concurrency: usize,
    idle: Duration,
    window: Duration,
    settle: Duration,
}

fn coordinator_main(benching: bool) -> anyhow::Result<()> {
    let s = if benching {
        Settings {
            n: env_number("RUNNERS_BENCH_N").unwrap_or(500) as usize,
            concurrency: env_number("RUNNERS_BENCH_CONCURRENCY").unwrap_or(16).max(1) as usize,
            idle: Duration::from_secs(5),
            window: Duration::from_secs(env_number("RUNNERS_BENCH_SECS").unwrap_or(30).max(1)),
            settle: Duration::from_secs(2),
        }
    } else {
        Settings {
            n: 8,
            concurrency: 4,
            idle: Duration::from_secs(1),
            window: Duration::from_secs(2),
            settle: Duration::from_millis(200),
        }
    };
    let bin = miren_bin()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clk = clock_ticks();

    // Every runner holds one UDP socket; a join in flight holds one more
    // plus a few files. The coordinator serves all of them on one socket.
    let need = (s.n + 2 * s.concurrency + 128) as u64;
    match open_files_limit() {
        Some(limit) if limit < need => anyhow::bail!(
            "open files limit is {limit} but {} runners need about {need} descriptors in the swarm process: raise it (`ulimit -n {need}`) and run again",
            s.n
        ),
        Some(_) => {}
        None => eprintln!("warning: could not read /proc/self/limits; continuing"),
    }

    let tmp = tempfile::Builder::new()
        .prefix("miren-bench-runners-")
        .tempdir()?;
    let config = tmp.path().join("cfg.yaml");
    let mut server = start_server(&bin, &tmp.path().join("data"), &config)?;
    let pid = server.pid;
    println!(
        "coordinator pid {pid} at {} ({} cores, CLK_TCK {clk}); {} runners, {} joins in flight",
        server.address, cores, s.n, s.concurrency
    );
    let code = miren(
        &bin,
        &config,
        &["runner", "token", "create", "--reusable", "--ttl", "1h"],
    )?
    .trim()
    .to_string();

    // Idle coordinator.
    std::thread::sleep(Duration::from_millis(500));
    let idle_a = sample(pid);
    std::thread::sleep(s.idle);
    let idle_b = sample(pid);
    let rss_idle = status_field(pid, "VmRSS").unwrap_or(0);
    let threads_idle = status_field(pid, "Threads").unwrap_or(0);

    // The swarm.
    let runners_dir = tmp.path().join("runners");
    std::fs::create_dir_all(&runners_dir)?;
    let mut swarm = Swarm::spawn(
        SWARM_ENV,
        &SwarmArgs {
            code,
            dir: runners_dir,
            runners: s.n,
            concurrency: s.concurrency,
        },
        Stdio::inherit(),
        SwarmOut::default(),
    )?;
    let swarm_pid = swarm.pid;

    // Joins.
    swarm.pump_until(JOIN_TIMEOUT, |o| o.join_started.is_some());
    let join_a = sample(pid);
    let swarm_join_a = sample(swarm_pid);
    let joined = swarm.pump_until(JOIN_TIMEOUT, |o| o.join.is_some());
    let join_b = sample(pid);
    let swarm_join_b = sample(swarm_pid);
    let rss_joined = status_field(pid, "VmRSS").unwrap_or(0);
    if !joined {
        anyhow::bail!(
            "the joins did not finish within {JOIN_TIMEOUT:?} (fatal: {:?}, errors: {:?}, other output: {:?})",
            swarm.out.fatal,
            swarm.out.join_errors,
            swarm.out.other
        );
    }
    let join = swarm.out.join.take().unwrap_or_default();
    let expected = join.ok;

    // Sessions: every runner connected, then every runner `ready`.
    let connect_start = Instant::now();
    let all_connected = swarm.pump_until(READY_TIMEOUT, |o| o.connected >= expected);
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connect_b = sample(pid);
    let ready_deadline = connect_start + READY_TIMEOUT;
    let mut statuses = BTreeMap::new();
    let mut list_error: Option<String>;
    loop {
        match runner_statuses(&bin, &config) {
            Ok(st) => {
                list_error = None;
                let ready = st.get("ready").copied().unwrap_or(0);
                statuses = st;
                if ready >= expected {
                    break;
                }
            }
            Err(e) => list_error = Some(format!("{e:#}")),
        }
        swarm.drain();
        if Instant::now() >= ready_deadline || swarm.out.fatal.is_some() || swarm.out.closed {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let ready_secs = connect_start.elapsed().as_secs_f64();
    let ready_count = statuses.get("ready").copied().unwrap_or(0);

    // Steady state: runners heartbeating, nobody else talking.
    swarm.pump_until(s.settle, |_| false);
    let connected_before_window = swarm.out.connected;
    let win_a = sample(pid);
    let swarm_a = sample(swarm_pid);
    let rss_connected = status_field(pid, "VmRSS").unwrap_or(0);
    swarm.pump_until(s.window, |o| o.fatal.is_some() || o.closed);
    let win_b = sample(pid);
    let swarm_b = sample(swarm_pid);
    let rss_end = status_field(pid, "VmRSS").unwrap_or(0);
    let hwm = status_field(pid, "VmHWM").unwrap_or(0);
    let threads_end = status_field(pid, "Threads").unwrap_or(0);
    let swarm_rss = status_field(swarm_pid, "VmRSS").unwrap_or(0);
    let reconnects_in_window = swarm.out.connected - connected_before_window;
    let statuses_end = runner_statuses(&bin, &config).map_err(|e| format!("{e:#}"));

    // Stop the runners, then the coordinator.
    let stop_start = Instant::now();
    drop(swarm.stdin.take());
    swarm.pump_until(STOP_TIMEOUT, |o| o.stopped.is_some());
    let swarm_status = wait_until(&mut swarm.guard.0, Duration::from_secs(5));
    let swarm_stop_secs = stop_start.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let server_status = wait_until(&mut server.guard.0, STOP_TIMEOUT);
    let server_stderr = std::fs::read_to_string(&server.stderr_path).unwrap_or_default();

    // Report.
    let idle_cpu = cpu_share(idle_a, idle_b, clk);
    let join_cpu = cpu_share(join_a, join_b, clk);
    let connect_cpu = cpu_share(join_b, connect_b, clk);
    let win_cpu = cpu_share(win_a, win_b, clk);
    let swarm_cpu = cpu_share(swarm_a, swarm_b, clk);
    let join_rate = if join.secs > 0.0 {
        join.ok as f64 / join.secs
    } else {
        0.0
    };
    // Per connection: from just before the sessions (records already
    // stored) to the end of the window.
    let per_conn_kib = if ready_count > 0 {
        (rss_end as f64 - rss_joined as f64) / ready_count as f64
    } else {
        0.0
    };
    let pct = |share: f64| {
        format!(
            "{:6.2} % of one core  ({:5.2} % of {cores} cores)",
            share * 100.0,
            share * 100.0 / cores as f64
        )
    };
    let window_secs = win_b.at.duration_since(win_a.at).as_secs_f64();
    let row = |label: &str, value: String| println!("  {label:<36} {value}");
    let rule = "-".repeat(96);

    println!();
    println!(
        "runners bench: 1 coordinator process, {} simulated runners over QUIC (loopback)",
        s.n
    );
    println!("{rule}");
    println!("joins ({} in flight)", s.concurrency);
    row("joined", format!("{} ok, {} failed", join.ok, join.failed));
    row(
        "join rate",
        format!("{join_rate:.1} joins/s  ({:.2} s for all)", join.secs),
    );
    row(
        "join latency",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            join.p50_ms, join.p99_ms, join.max_ms
        ),
    );
    row("coordinator CPU while joining", pct(join_cpu));
    row(
        "swarm CPU while joining",
        pct(cpu_share(swarm_join_a, swarm_join_b, clk)),
    );
    println!("sessions (all started at once)");
    row(
        "connected",
        format!(
            "{}/{expected} in {connect_secs:.2} s{}",
            swarm.out.connected.min(expected),
            if all_connected { "" } else { "  (TIMED OUT)" }
        ),
    );
    row(
        "`runner list` ready",
        format!("{ready_count}/{expected} after {ready_secs:.2} s  {statuses:?}"),
    );
    row("coordinator CPU while connecting", pct(connect_cpu));
    println!("steady state ({window_secs:.1} s window, heartbeat every 5 s)");
    row("coordinator CPU, idle (0 runners)", pct(idle_cpu));
    row(
        &format!("coordinator CPU, {ready_count} runners"),
        pct(win_cpu),
    );
    row("swarm CPU (all runners)", pct(swarm_cpu));
    row(
        "reconnects / runner errors",
        format!(
            "{reconnects_in_window} / {}",
            swarm.out.runner_failure_count
        ),
    );
    row(
        "`runner list` after the window",
        match &statuses_end {
            Ok(st) => format!("{st:?}"),
            Err(e) => format!("error: {e}"),
        },
    );
    println!("memory (coordinator RSS)");
    row(
        "idle, 0 runners",
        format!("{:7.1} MiB  ({threads_idle} threads)", mib(rss_idle)),
    );
    row(
        &format!("after {} joins, 0 connected", join.ok),
        format!("{:7.1} MiB", mib(rss_joined)),
    );
    row(
        &format!("{ready_count} connected, window start"),
        format!("{:7.1} MiB", mib(rss_connected)),
    );
    row(
        &format!("{ready_count} connected, window end"),
        format!(
            "{:7.1} MiB  ({threads_end} threads; peak VmHWM {:.1} MiB)",
            mib(rss_end),
            mib(hwm)
        ),
    );
    row(
        "per connected runner",
        format!("{per_conn_kib:7.1} KiB  (window end - after joins)"),
    );
    row(
        "swarm process RSS (all runners)",
        format!("{:7.1} MiB", mib(swarm_rss)),
    );
    println!("shutdown");
    row(
        "runners",
        format!(
            "{}; swarm exited in {swarm_stop_secs:.2} s ({})",
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
    if join.failed > 0 {
        problems.push(format!(
            "{} joins failed, e.g. {:?}",
            swarm.out.join_error_count, swarm.out.join_errors
        ));
    }
    if swarm.out.runner_failure_count > 0 {
        problems.push(format!(
            "{} runners stopped with an error, e.g. {:?}",
            swarm.out.runner_failure_count, swarm.out.runner_failures
        ));
    }
    if let Some(e) = list_error {
        problems.push(format!("`miren runner list` failed: {e}"));
    }
    if let Some(f) = &swarm.out.fatal {
        problems.push(format!("swarm: {f}"));
    }
    if !swarm.out.other.is_empty() {
        problems.push(format!("unexpected swarm output: {:?}", swarm.out.other));
    }
    let stderr_lines: Vec<&str> = server_stderr.lines().collect();
    if !stderr_lines.is_empty() {
        let warns = stderr_lines.iter().filter(|l| l.contains("WARN")).count();
        let errors = stderr_lines.iter().filter(|l| l.contains("ERROR")).count();
        println!(
            "coordinator stderr: {} lines ({warns} WARN, {errors} ERROR); first lines:",
            stderr_lines.len()
        );
        for l in stderr_lines.iter().take(5) {
            println!("  {l}");
        }
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if !benching {
        println!(
            "(quick pass: run `cargo bench -p integration-tests --bench runners` for real numbers)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The swarm process
// ---------------------------------------------------------------------------

fn swarm_main() -> anyhow::Result<()> {
    let args = SwarmArgs::from_env()?;
    let n = args.runners;

    let stop = swarm::stop_on_stdin_close();
    swarm::block_on_local(async move {
        // Joins, `concurrency` at a time.
        say("JOIN_START");
        let started = Instant::now();
        let joined = swarm::join_runners(&args).await;
        let failed = n - joined.len();
        let secs = started.elapsed().as_secs_f64();
        let mut latencies: Vec<Duration> = joined.iter().map(|(_, took)| *took).collect();
        latencies.sort();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        say(&format!(
            "JOIN_DONE {} {failed} {secs:.4} {:.2} {:.2} {:.2}",
            joined.len(),
            pick(0.5),
            pick(0.99),
            pick(1.0)
        ));

        // Sessions: all at once, like runners coming back after an outage.
        let data = joined.into_iter().map(|(data, _)| data).collect();
        swarm::run_runners(data, stop, Duration::from_secs(10)).await;
    })
}
