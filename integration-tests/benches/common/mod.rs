//! What several benches need alike: the `miren` binary they drive, the
//! `miren server` and CLI processes they start, and the CPU time and memory
//! of a process from `/proc`. Included with `mod common;` (each bench is its
//! own crate, so each uses only part of it).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// The `miren` binary: `MIREN_BIN`, or `miren` next to the bench's profile
/// dir (`target/release/deps/<bench>-… -> target/release/miren`); an error
/// saying how to build it when it is not there.
pub fn miren_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MIREN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target dir of the bench executable")?
        .join("miren");
    if !bin.exists() {
        bail!(
            "{} does not exist: build it first (`cargo build --release -p cli`, same CARGO_TARGET_DIR) or set MIREN_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// The end of a bench's `main`, which returns what this returns. When
/// `ready` is an error (the `miren` binary or a tool it needs is missing),
/// a quick pass (`cargo test`, not `benching`) says it skipped and a real
/// run (`cargo bench`) fails; otherwise `bench` runs, and its error fails
/// the process. `name` starts those lines.
pub fn run_bench(
    name: &str,
    benching: bool,
    ready: anyhow::Result<()>,
    bench: impl FnOnce() -> anyhow::Result<()>,
) -> ExitCode {
    if let Err(e) = ready {
        if benching {
            eprintln!("{name} bench failed: {e:#}");
            return ExitCode::FAILURE;
        }
        println!("{name} bench skipped (quick pass): {e:#}");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = bench() {
        eprintln!("{name} bench failed: {e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The processes whose parent is `pid` (an nginx master's workers).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// CPU seconds of `pids` together (ticks converted with [`clock_ticks`]).
pub fn cpu_secs(pids: &[u32], clk: f64) -> f64 {
    pids.iter().filter_map(|p| cpu_ticks(*p)).sum::<u64>() as f64 / clk
}

/// When `MIREN_BENCH_PERF=DIR` is set: `perf record -g` of `pids` for
/// `secs` into `DIR/<name>.perf.data`, started now; wait for the returned
/// child after the measured phase. `MIREN_BENCH_PERF_DWARF=1` unwinds
/// with DWARF instead of frame pointers (the release build has none, so
/// only that shows which of our callers a library's time is spent for).
pub fn perf_record(
    pids: &[u32],
    secs: std::time::Duration,
    name: &str,
) -> anyhow::Result<Option<std::process::Child>> {
    let Some(dir) = std::env::var_os("MIREN_BENCH_PERF").map(PathBuf::from) else {
        return Ok(None);
    };
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let call_graph = match std::env::var("MIREN_BENCH_PERF_DWARF").as_deref() {
        Ok("1") => "dwarf,16384",
        _ => "fp",
    };
    let child = Command::new("perf")
        .args(["record", "-F", "999", "--call-graph", call_graph, "-o"])
        .arg(dir.join(format!("{name}.perf.data")))
        .args(["-p", &list.join(",")])
        .args(["--", "sleep"])
        .arg(format!("{}", secs.as_secs_f64()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record")?;
    Ok(Some(child))
}

/// A `kB` (or plain number) field of `/proc/<pid>/status`.
pub fn status_field(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// A process's CPU ticks ([`cpu_ticks`], 0 when gone) and when they were read.
#[derive(Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub ticks: u64,
}

pub fn sample(pid: u32) -> Sample {
    Sample {
        at: Instant::now(),
        ticks: cpu_ticks(pid).unwrap_or(0),
    }
}

/// CPU seconds between two samples.
pub fn cpu_secs_between(a: Sample, b: Sample, clk: f64) -> f64 {
    b.ticks.saturating_sub(a.ticks) as f64 / clk
}

/// CPU used between two samples, as a fraction of one core.
pub fn cpu_share(a: Sample, b: Sample, clk: f64) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    cpu_secs_between(a, b, clk) / wall
}

/// The machine's CPU time from `/proc/stat` (all cores, in ticks): how
/// much was idle (idle + iowait) and how much there was.
#[derive(Clone, Copy, Default)]
pub struct MachineTicks {
    pub idle: u64,
    pub total: u64,
}

pub fn machine_ticks() -> MachineTicks {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineTicks::default();
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    MachineTicks {
        idle: fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0),
        // user .. steal; guest and guest_nice are already inside user and
        // nice.
        total: fields.iter().take(8).sum(),
    }
}

/// The share of the machine's cores left idle between two samples.
pub fn idle_share(a: MachineTicks, b: MachineTicks) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return 0.0;
    }
    b.idle.saturating_sub(a.idle) as f64 / total as f64
}

/// Soft limit on open files of this process (inherited by its children).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

/// RSS in kB as MiB.
pub fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// A child process killed when dropped (unless it was waited for).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for `child` until `timeout`; `None` if it is still running.
pub fn wait_until(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Reads `reader` line by line into a channel, each with when it arrived,
/// until it ends (so the writer never blocks on a full pipe, even once
/// nobody listens).
pub fn pump_lines(reader: impl Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send((Instant::now(), line));
        }
    });
    rx
}

/// A `miren server` started by [`start_server`].
pub struct ServerProc {
    pub guard: Guard,
    pub pid: u32,
    pub spawned: Instant,
    /// When the ready banner ended.
    pub ready: Instant,
    pub address: String,
    pub stderr_path: PathBuf,
}

/// Spawns `server` (a `miren server …` command; its stdout piped here, its
/// stderr to `stderr_path`) and waits up to `timeout` for the end of its
/// ready banner.
pub fn start_server(
    mut server: Command,
    stderr_path: PathBuf,
    timeout: Duration,
) -> anyhow::Result<ServerProc> {
    let stderr = std::fs::File::create(&stderr_path)?;
    let spawned = Instant::now();
    let mut child = server
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()?;
    let pid = child.id();
    let rx = pump_lines(child.stdout.take().context("server stdout not piped")?);
    let guard = Guard(child);
    let deadline = Instant::now() + timeout;
    let mut address = None;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((at, line)) => {
                if let Some(a) = line.strip_prefix("Cluster address: ") {
                    address = Some(a.trim().to_string());
                }
                let done = line.contains("export MIREN_CLUSTER=");
                lines.push(line);
                if let (true, Some(address)) = (done, address.clone()) {
                    return Ok(ServerProc {
                        guard,
                        pid,
                        spawned,
                        ready: at,
                        address,
                        stderr_path,
                    });
                }
            }
            Err(_) => {
                drop(guard);
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                bail!("server did not become ready within {timeout:?}\nstdout: {lines:?}\nstderr: {err}");
            }
        }
    }
}

/// Runs `miren args…` against the cluster of `config`: its stdout, or an
/// error with its stderr.
pub fn miren(bin: &Path, config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("MIREN_CONFIG", config)
        .env_remove("MIREN_CLUSTER")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "`miren {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
