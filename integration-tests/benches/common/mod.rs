//! What several benches need alike: the `miren` binary they drive and the
//! CPU time of a process from `/proc`. Included with `mod common;` (each
//! bench is its own crate, so each uses only part of it).

use std::path::PathBuf;
use std::process::Command;

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
/// child after the measured phase.
pub fn perf_record(
    pids: &[u32],
    secs: std::time::Duration,
    name: &str,
) -> anyhow::Result<Option<std::process::Child>> {
    let Some(dir) = std::env::var_os("MIREN_BENCH_PERF").map(PathBuf::from) else {
        return Ok(None);
    };
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
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
