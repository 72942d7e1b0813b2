//! The ingress next to the reverse proxy people already put in front of an
//! app, driven by the same load generator in the same run.
//!
//! `cargo bench -p integration-tests --bench ingress` (build the binary
//! first: `cargo build --release -p cli`; `MIREN_BIN` overrides it; needs
//! Debian's `nginx` and `wrk`, which `scripts/test.sh` installs):
//!
//! 1. starts Debian's nginx three times on loopback, each with its own
//!    prefix and configuration in a temporary dir (`-p DIR -c CONF`,
//!    `daemon off`, `pid` in DIR, no system file touched): a backend
//!    answering `GET /` with a short fixed body (one worker), a reverse
//!    proxy in front of it with keep-alive upstream connections (workers:
//!    `auto`, as the coordinator's runtime uses every core), and the same
//!    proxy in front of that proxy: two hops, the shape of ingress ->
//!    runner -> app, shown for comparison (the target is against one);
//! 2. starts a coordinator with its HTTP ingress and one runner
//!    (`--isolation none`, as the app journeys do), and deploys the same
//!    nginx backend configuration as an app (a script writes its
//!    configuration with the sandbox's `$PORT`), routed as the default
//!    route;
//! 3. drives the four with `wrk` (same threads, connections and duration,
//!    `--latency`): nginx directly, nginx reverse proxy -> nginx, nginx
//!    proxy -> nginx proxy -> nginx, and ingress -> runner -> sandbox
//!    nginx, after a warm-up of each;
//! 4. prints requests/s, p50 and p99 for each, the CPU each path's
//!    processes used per 1,000 requests (from `/proc`: coordinator and
//!    runner; the proxies' workers), the share of the machine's cores
//!    left idle during each run (`/proc/stat`), and the ratios ingress /
//!    nginx proxy against the targets (requests/s >= 0.5x, p99 <= 3x) and
//!    ingress / the two-proxy chain (no target). Timings are printed,
//!    never asserted. Three rounds are measured (the order
//!    rotated each round; `MIREN_BENCH_ROUNDS=N` for N), the ratios taken
//!    from the means and also shown round by round; `MIREN_BENCH_PERF=DIR` records the
//!    coordinator and the runner with `perf record -g` during each
//!    measured ingress run (`DIR/ingress-<round>.perf.data`;
//!    `MIREN_BENCH_PERF_DWARF=1` unwinds with DWARF, which the release
//!    build's user-space stacks need).
//!
//! Everything shares the machine's cores with `wrk`, so absolute figures
//! move with the load; the ratios are measured side by side. Under `cargo
//! test --benches` (no `--bench`) a short pass shows the bench still works
//! (skipped when the binary, nginx or wrk is missing).

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use integration_tests::{free_port, http_get, wait_for, Cluster};

const RPS_TARGET: f64 = 0.5;
const P99_TARGET: f64 = 3.0;
/// Connections `wrk` keeps open (as in the measurement).
const CONNECTIONS: usize = 32;
/// The body every nginx here answers `GET /` with.
const BODY: &str = "hello from nginx\n";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Rounds a `--bench` run measures unless `MIREN_BENCH_ROUNDS` says: the
/// machine's speed moves between runs seconds apart (the same binary's
/// ratio spans 0.42-0.78 over single rounds), so one round is one sample.
const DEFAULT_ROUNDS: usize = 3;

struct Settings {
    warmup: Duration,
    measure: Duration,
    rounds: usize,
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let rounds = std::env::var("MIREN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
        .max(1);
    let s = if benching {
        Settings {
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(5),
            rounds,
        }
    } else {
        Settings {
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(1),
            rounds: 1,
        }
    };
    let tools = prerequisites();
    let tools = match tools {
        Ok(t) => t,
        Err(e) if !benching => {
            println!("ingress bench skipped (quick pass): {e:#}");
            return;
        }
        Err(e) => {
            eprintln!("ingress bench failed: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = bench(&s, &tools) {
        eprintln!("ingress bench failed: {e:#}");
        std::process::exit(1);
    }
    if !benching {
        println!(
            "(quick pass: run `cargo bench -p integration-tests --bench ingress` for real numbers)"
        );
    }
}

struct Tools {
    nginx: PathBuf,
    wrk: PathBuf,
}

/// Finds `name` on `PATH` or in the sbin dirs (Debian puts nginx there).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn prerequisites() -> anyhow::Result<Tools> {
    common::miren_bin()?;
    let nginx = find_program("nginx")
        .context("nginx is not installed (`apt-get install nginx`, see scripts/test.sh)")?;
    let wrk = find_program("wrk")
        .context("wrk is not installed (`apt-get install wrk`, see scripts/test.sh)")?;
    Ok(Tools { nginx, wrk })
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// What an nginx of this bench does.
enum Role<'a> {
    /// Answers `GET /` itself.
    Backend,
    /// Proxies to the backend at this address with kept-alive upstream
    /// connections.
    Proxy { backend: &'a str },
}

/// The configuration of an nginx listening on `127.0.0.1:{port}` with its
/// files under `dir` (`port` may be a placeholder the app's script fills).
fn nginx_conf(dir: &str, port: &str, workers: &str, role: Role<'_>) -> String {
    let (upstream, location) = match role {
        Role::Backend => (
            String::new(),
            format!("default_type text/plain;\n            return 200 \"{}\\n\";", BODY.trim_end()),
        ),
        Role::Proxy { backend } => (
            format!(
                "upstream backend {{\n        server {backend};\n        keepalive {CONNECTIONS};\n        keepalive_requests 1000000;\n    }}\n"
            ),
            "proxy_pass http://backend;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";".to_string(),
        ),
    };
    format!(
        "worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {location}
        }}
    }}
}}
"
    )
}

/// An nginx started by this bench, stopped when dropped.
struct Nginx {
    child: Child,
    addr: String,
}

impl Nginx {
    fn start(nginx: &Path, dir: &Path, workers: &str, role: Role<'_>) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = free_port();
        let conf = dir.join("nginx.conf");
        let d = dir.to_str().context("UTF-8 temp dir")?;
        std::fs::write(&conf, nginx_conf(d, &port.to_string(), workers, role))?;
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut n = Nginx {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        if !wait_for(READY_TIMEOUT, || {
            http_get(&n.addr, "/").is_ok_and(|(code, _)| code == 200)
        }) {
            let _ = n.child.kill();
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            bail!("nginx on {} did not answer 200: {log}", n.addr);
        }
        Ok(n)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let mut pids = common::children(self.child.id());
        pids.push(self.child.id());
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM to the master stops its workers too (SIGKILL would leave
        // them running); SIGQUIT would wait for kept-alive connections.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
    }
}

/// The same backend nginx as an app: a script writes its configuration
/// with the sandbox's `$PORT` and runs it in the foreground.
fn write_app(parent: &Path, nginx: &Path) -> anyhow::Result<PathBuf> {
    let dir = parent.join("nginx-app");
    std::fs::create_dir_all(dir.join(".miren"))?;
    std::fs::write(
        dir.join(".miren/app.toml"),
        "name = \"nginx\"\n\n[services.web]\ncommand = \"sh run.sh\"\ninstances = 1\n",
    )?;
    std::fs::write(
        dir.join("nginx.conf.in"),
        nginx_conf("@DIR@", "@PORT@", "1", Role::Backend),
    )?;
    std::fs::write(
        dir.join("run.sh"),
        format!(
            "set -e\nd=\"$PWD/nginx\"\nmkdir -p \"$d/tmp\"\nsed -e \"s#@DIR@#$d#g\" -e \"s#@PORT@#$PORT#g\" nginx.conf.in > \"$d/nginx.conf\"\nexec {} -p \"$d\" -e \"$d/error.log\" -c \"$d/nginx.conf\"\n",
            nginx.display()
        ),
    )?;
    Ok(dir)
}

// ---------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Load {
    requests: u64,
    /// Non-2xx/3xx answers and socket errors.
    bad: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds of the path's own processes during the run.
    cpu: f64,
    /// The share of the machine's cores left idle during the run.
    idle: f64,
}

impl Load {
    fn rate(&self) -> f64 {
        (self.requests.saturating_sub(self.bad)) as f64 / self.secs.max(1e-9)
    }
}

/// `12.5us`, `1.20ms`, `2.00s` in microseconds.
fn wrk_duration(v: &str) -> Option<f64> {
    let v = v.trim();
    let (n, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix("m") {
        (n, 60e6)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(n.trim().parse::<f64>().ok()? * scale)
}

fn parse_wrk(out: &str) -> anyhow::Result<Load> {
    let mut load = Load::default();
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("50%") => load.p50_us = words.next().and_then(wrk_duration).unwrap_or(f64::NAN),
            Some("99%") => load.p99_us = words.next().and_then(wrk_duration).unwrap_or(f64::NAN),
            _ => {}
        }
        if let Some((n, rest)) = line.split_once(" requests in ") {
            load.requests = n.trim().parse().context("wrk request count")?;
            let secs = rest.split(',').next().unwrap_or_default();
            load.secs = wrk_duration(secs).context("wrk duration")? / 1e6;
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.bad += n.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(errs) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            load.bad += errs
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if load.requests == 0 || load.secs == 0.0 {
        bail!("wrk printed no result:\n{out}");
    }
    Ok(load)
}

/// Runs wrk against `addr` for `secs`; `pids` are sampled for CPU, and
/// recorded by `perf` as `perf_name` when given ([`common::perf_record`]).
fn wrk(
    tools: &Tools,
    addr: &str,
    secs: Duration,
    pids: &[u32],
    perf_name: Option<&str>,
) -> anyhow::Result<Load> {
    let clk = common::clock_ticks();
    let perf = match perf_name {
        Some(name) => common::perf_record(pids, secs, name)?,
        None => None,
    };
    let before = common::cpu_secs(pids, clk);
    let machine_before = common::machine_ticks();
    let out = Command::new(&tools.wrk)
        .args(["-t", "2", "-c", &CONNECTIONS.to_string(), "--latency"])
        .arg("-d")
        // wrk takes whole seconds.
        .arg(format!("{}s", secs.as_secs().max(1)))
        .arg(format!("http://{addr}/"))
        .stdin(Stdio::null())
        .output()
        .context("running wrk")?;
    let after = common::cpu_secs(pids, clk);
    let machine_after = common::machine_ticks();
    if let Some(mut perf) = perf {
        let _ = perf.wait();
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut load = parse_wrk(&text)?;
    load.cpu = after - before;
    load.idle = common::idle_share(machine_before, machine_after);
    Ok(load)
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// The paths measured, by their index in `paths`.
const DIRECT: usize = 0;
const PROXY: usize = 1;
const CHAIN: usize = 2;
const INGRESS: usize = 3;

struct LoadPath {
    name: &'static str,
    addr: String,
    pids: Vec<u32>,
}

fn bench(s: &Settings, tools: &Tools) -> anyhow::Result<()> {
    let total = Instant::now();
    let tmp = integration_tests::temp();
    let backend = Nginx::start(
        &tools.nginx,
        &tmp.path().join("backend"),
        "1",
        Role::Backend,
    )?;
    let proxy = Nginx::start(
        &tools.nginx,
        &tmp.path().join("proxy"),
        "auto",
        Role::Proxy {
            backend: &backend.addr,
        },
    )?;
    // The same proxy in front of the proxy: two hops, as the ingress and
    // the runner are, so the cost of the second hop shows on nginx too.
    let chain = Nginx::start(
        &tools.nginx,
        &tmp.path().join("chain"),
        "auto",
        Role::Proxy {
            backend: &proxy.addr,
        },
    )?;
    let mut cluster = Cluster::start(1, &[]);
    let app = write_app(tmp.path(), &tools.nginx)?;
    let deployed = cluster.deploy("nginx", &app);
    if !deployed.ok {
        bail!("deploy: {}{}", deployed.stdout, deployed.stderr);
    }
    let routed = cluster.miren(&["route", "set", "--default", "-a", "nginx"]);
    if !routed.ok {
        bail!("route set: {}{}", routed.stdout, routed.stderr);
    }
    let ingress = cluster.ingress.clone();
    if !wait_for(READY_TIMEOUT, || {
        http_get(&ingress, "/").is_ok_and(|(code, body)| code == 200 && body == BODY)
    }) {
        bail!(
            "the ingress did not answer nginx's body: {:?}",
            http_get(&ingress, "/")
        );
    }
    let coordinator = cluster.server().pid();
    let runner = cluster.runner(0).map(|r| r.pid()).context("runner 0")?;
    let paths = [
        LoadPath {
            name: "wrk -> nginx",
            addr: backend.addr.clone(),
            pids: backend.pids(),
        },
        LoadPath {
            name: "wrk -> nginx proxy -> nginx",
            addr: proxy.addr.clone(),
            pids: proxy.pids(),
        },
        LoadPath {
            name: "wrk -> nginx proxy x2 -> nginx",
            addr: chain.addr.clone(),
            pids: [chain.pids(), proxy.pids()].concat(),
        },
        LoadPath {
            name: "wrk -> ingress -> runner -> nginx",
            addr: ingress.clone(),
            pids: vec![coordinator, runner],
        },
    ];
    let mut results: Vec<Vec<Load>> = vec![Vec::new(); paths.len()];
    for round in 0..s.rounds {
        for i in 0..paths.len() {
            let i = (i + round) % paths.len();
            let p = &paths[i];
            wrk(tools, &p.addr, s.warmup, &p.pids, None)?;
            let perf_name = format!("ingress-{round}");
            let perf_name = (i == INGRESS).then_some(perf_name.as_str());
            results[i].push(wrk(tools, &p.addr, s.measure, &p.pids, perf_name)?);
        }
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!(
        "ingress bench: wrk -t2 -c{CONNECTIONS}, {:?} per run after {:?} warm-up, {} round(s); load average before the report: {}",
        s.measure,
        s.warmup,
        s.rounds,
        loadavg.trim()
    );
    println!(
        "{:<36} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "path", "requests", "bad", "req/s", "p50 us", "p99 us", "idle %"
    );
    let mean = |v: &[Load], f: &dyn Fn(&Load) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    for (p, r) in paths.iter().zip(&results) {
        for l in r {
            println!(
                "{:<36} {:>10} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>7.1}",
                p.name,
                l.requests,
                l.bad,
                l.rate(),
                l.p50_us,
                l.p99_us,
                l.idle * 100.0
            );
        }
    }
    // Of a sorted list, the middle one or the mean of the middle two.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let rate = |i: usize| mean(&results[i], &|l| l.rate());
    let p99 = |i: usize| mean(&results[i], &|l| l.p99_us);
    let cpu_per_k = |i: usize| {
        mean(&results[i], &|l| {
            l.cpu * 1e3 / (l.requests.saturating_sub(l.bad)).max(1) as f64 * 1e3
        })
    };
    println!();
    println!(
        "CPU per 1,000 requests (from /proc): nginx backend {:.1} ms, nginx proxy (master + workers) {:.1} ms, both proxies of the chain {:.1} ms, coordinator + runner {:.1} ms",
        cpu_per_k(DIRECT),
        cpu_per_k(PROXY),
        cpu_per_k(CHAIN),
        cpu_per_k(INGRESS)
    );
    let rps_ratio = rate(INGRESS) / rate(PROXY).max(1e-9);
    if s.rounds > 1 {
        let by_round = |of: usize| -> Vec<f64> {
            results[INGRESS]
                .iter()
                .zip(&results[of])
                .map(|(ingress, other)| ingress.rate() / other.rate().max(1e-9))
                .collect()
        };
        for (of, name) in [(PROXY, "nginx proxy"), (CHAIN, "nginx proxy x2")] {
            let per_round = by_round(of);
            let shown: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "ingress / {name} requests/s by round: {} (median {:.2})",
                shown.join(" "),
                median(per_round)
            );
        }
    }
    let p99_ratio = p99(INGRESS) / p99(PROXY).max(1e-9);
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    println!(
        "ingress / nginx proxy requests/s = {rps_ratio:.2} (target >= {RPS_TARGET}) {}",
        verdict(rps_ratio >= RPS_TARGET)
    );
    println!(
        "ingress / nginx proxy p99 = {p99_ratio:.2} (target <= {P99_TARGET}) {}",
        verdict(p99_ratio <= P99_TARGET)
    );
    println!(
        "ingress / nginx proxy x2 requests/s = {:.2}, p99 = {:.2} (the same two hops; no target)",
        rate(INGRESS) / rate(CHAIN).max(1e-9),
        p99(INGRESS) / p99(CHAIN).max(1e-9)
    );
    println!(
        "ingress / nginx direct requests/s = {:.2}; nginx proxy / nginx direct = {:.2}; nginx proxy x2 / nginx proxy = {:.2}",
        rate(INGRESS) / rate(DIRECT).max(1e-9),
        rate(PROXY) / rate(DIRECT).max(1e-9),
        rate(CHAIN) / rate(PROXY).max(1e-9)
    );
    println!("total {:.1} s", total.elapsed().as_secs_f64());
    drop(cluster);
    drop(chain);
    drop(proxy);
    drop(backend);
    Ok(())
}
