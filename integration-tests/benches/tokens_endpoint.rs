//! Latency and throughput of the per-sandbox workload token endpoint on real
//! processes, against the raw RSA-2048 signature rate underneath minting.
//!
//! `cargo bench -p integration-tests --bench tokens_endpoint` (build the
//! binary first: `cargo build --release -p cli`; `MIREN_BIN` overrides its
//! location):
//!
//! 1. starts `miren server --listen 127.0.0.1:0` and one `miren runner`
//!    joined with a code from `miren runner token create` (sandboxes as
//!    plain processes, `--isolation none`, so that the token endpoint
//!    listens on loopback TCP; the per-sandbox limit on new tokens lifted
//!    with `--token-miss-burst`/`--token-miss-rate`, as the uncached phase
//!    is one sandbox asking as fast as it can), waits until `miren runner list` shows it
//!    ready, and deploys `fixtures/bench-app`, whose `GET /creds` hands out
//!    its token endpoint URL and secret (a benchmark-only fixture);
//! 2. calls the endpoint directly from this process over keep-alive HTTP/1.1
//!    connections (a small client on `std::net::TcpStream`):
//!    - cached: the same `?audience=bench` repeated, sequentially (p50, p99,
//!      rate) and on 2 connections at once (rate);
//!    - uncached: a fresh audience per request (every one minted by the
//!      coordinator through the runner's Cap'n Proto proxy), eight
//!      connections per core, for a fixed duration (rate). One request per
//!      core in flight leaves the cores idle while a token travels the
//!      RPC path (latency-bound, measured at 0.27-0.30 of raw sign). The
//!      runner sends the misses that queued during its two calls in flight
//!      together (`runner::mint_calls`), so the endpoint reaches its
//!      capacity with more requests in flight than one call per miss did:
//!      measured on the release build, four per core gave 2,860-2,870
//!      tokens/s, eight per core 3,490-3,650/s (the coordinator's CPU per
//!      token 1.22-1.28 and 1.15-1.19 raw signatures).
//!      Sandboxes on a runner ask at once; the CPU of this client, the
//!      runner and the coordinator per token is printed beside the rate;
//! 3. measures raw aws-lc-rs RSA-2048 PKCS#1 SHA-256 signing on all cores
//!    with a key from `identity::SigningKeyPair::generate()`;
//! 4. prints a table and three lines against targets (cached p50 < 200 us,
//!    uncached / raw sign >= 0.6, and the coordinator's CPU time per
//!    uncached token over the CPU time of one raw signature <= 1.3, both
//!    from `/proc`, which does not depend on how the cores were shared
//!    with this client), deletes the app and stops the runner and
//!    the server. Timings are reported, never asserted; every phase is
//!    bounded in time.
//!
//! All of it runs twice in one run: with metrics and the audit trail on
//! (the default, plus `--metrics-listen` on both) and with them off
//! (`--no-observe` on the server and the runner), and the last lines put
//! the two side by side (the cost of observing must stay within noise).
//! `MIREN_BENCH_ROUNDS=N` alternates the two N times; `MIREN_BENCH_PERF=DIR`
//! records the coordinator and the runner with `perf record -g` during
//! each uncached phase (`DIR/tokens-uncached-<coordinator pid>.perf.data`).
//!
//! The coordinator, the runner, the sandbox and this client share the
//! machine's cores, so uncached minting competes with the client itself.
//! Under `cargo test --benches` (no `--bench` argument) a quick pass with
//! small counts shows the bench still works (skipped without the binary).

#[allow(dead_code)]
mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use integration_tests::{http_get, miren, temp, wait_for, Run, RunnerProc, Server};
use serde_json::Value;

#[path = "common/raw_sign.rs"]
mod raw_sign;
use raw_sign::raw_sign;

const CACHED_P50_TARGET_US: f64 = 200.0;
const RATIO_TARGET: f64 = 0.6;
/// Coordinator CPU per minted token over the CPU of one raw signature.
const CPU_RATIO_TARGET: f64 = 1.3;
/// Uncached requests in flight per core (see the module doc).
const UNCACHED_CONNS_PER_CORE: usize = 8;
/// Read/write timeout of one HTTP exchange with the endpoint.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(60);
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

struct Settings {
    /// Requests per connection in the cached phases.
    cached_n: usize,
    /// Cached requests before measuring.
    warmup_n: usize,
    /// Upper bound on each cached phase.
    cached_cap: Duration,
    uncached_warmup: Duration,
    uncached: Duration,
    sign: Duration,
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let s = if benching {
        Settings {
            cached_n: 5000,
            warmup_n: 500,
            cached_cap: Duration::from_secs(10),
            uncached_warmup: Duration::from_millis(300),
            uncached: Duration::from_secs(5),
            sign: Duration::from_secs(3),
        }
    } else {
        Settings {
            cached_n: 200,
            warmup_n: 20,
            cached_cap: Duration::from_secs(5),
            uncached_warmup: Duration::from_millis(100),
            uncached: Duration::from_millis(500),
            sign: Duration::from_millis(300),
        }
    };
    if let Err(e) = common::miren_bin() {
        if benching {
            eprintln!("tokens_endpoint bench failed: {e:#}");
            std::process::exit(1);
        }
        println!("tokens_endpoint bench skipped (quick pass): {e:#}");
        return;
    }
    if let Err(e) = bench(&s, benching) {
        eprintln!("tokens_endpoint bench failed: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

struct Cluster {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    server: Option<Server>,
    runner: Option<RunnerProc>,
}

impl Cluster {
    /// `observe`: metrics and audit on (with a metrics listener each), or
    /// `--no-observe`.
    fn start(observe: bool) -> anyhow::Result<Cluster> {
        let dir = temp();
        let cfg = dir.path().join("c.yaml");
        let flags: &[&str] = if observe {
            &["--metrics-listen", "127.0.0.1:0"]
        } else {
            &["--no-observe"]
        };
        let server = Server::try_start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", flags)
            .map_err(|e| anyhow!("server did not start: {e}"))?;
        let code = ok(miren(&cfg, &["runner", "token", "create"], &[]))?;
        // Under namespace isolation the endpoint is reachable only inside
        // the sandbox: ask for plain processes, whose endpoint listens on
        // loopback TCP (binaries without the flag always run them).
        let help = miren(&cfg, &["runner", "--help"], &[]).stdout;
        let mut extra = vec!["--name", "r1"];
        extra.extend(flags);
        if help.contains("--isolation") {
            extra.extend(["--isolation", "none"]);
        }
        // Uncached requests here measure the coordinator's minting capacity
        // through one sandbox, which a sandbox's miss limit (32 at once,
        // then 2/s by default) exists to prevent: lift it for the bench.
        if help.contains("--token-miss-rate") {
            extra.extend([
                "--token-miss-burst",
                "1000000",
                "--token-miss-rate",
                "1000000",
            ]);
        }
        let runner = RunnerProc::start(&dir.path().join("r1"), Some(code.trim()), &extra);
        let mut c = Cluster {
            _dir: dir,
            cfg,
            server: Some(server),
            runner: Some(runner),
        };
        let ready = wait_for(READY_TIMEOUT, || {
            integration_tests::runners(&c.cfg)
                .iter()
                .any(|r| r["status"] == "ready")
        });
        if !ready {
            let out = c.runner.take().map(|r| r.output()).unwrap_or_default();
            bail!("the runner was not ready within {READY_TIMEOUT:?}:\n{out}");
        }
        Ok(c)
    }

    /// The coordinator's and the runner's process ids.
    fn pids(&self) -> (u32, u32) {
        (
            self.server.as_ref().map_or(0, Server::pid),
            self.runner.as_ref().map_or(0, RunnerProc::pid),
        )
    }

    /// Deletes the app (so the runner stops its sandbox), then stops the
    /// runner and the server.
    fn stop(mut self) {
        let del = miren(&self.cfg, &["app", "delete", "-a", "bench"], &[]);
        if del.ok {
            wait_for(DELETE_TIMEOUT, || {
                integration_tests::runners(&self.cfg)
                    .iter()
                    .all(|r| r["sandboxes"] == 0)
            });
        }
        drop(self.runner.take());
        if let Some(server) = self.server.take() {
            let (clean, err) = server.stop();
            if !clean {
                let tail: Vec<&str> = err.lines().rev().take(10).collect();
                eprintln!("note: the server did not exit cleanly: {tail:?}");
            }
        }
    }
}

fn ok(run: Run) -> anyhow::Result<String> {
    if run.ok {
        Ok(run.stdout)
    } else {
        bail!("{}{}", run.stdout, run.stderr)
    }
}

/// Deploys the fixture (bounded in time) and returns the sandbox address.
fn deploy(cfg: &Path) -> anyhow::Result<String> {
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bench-app");
    let (tx, rx) = mpsc::channel();
    let cfg_owned = cfg.to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(miren(
            &cfg_owned,
            &["deploy", "--dir", app.to_str().unwrap_or_default()],
            &[],
        ));
    });
    let run = rx
        .recv_timeout(DEPLOY_TIMEOUT)
        .map_err(|_| anyhow!("deploy did not finish within {DEPLOY_TIMEOUT:?}"))?;
    ok(run).context("miren deploy")?;
    let status = ok(miren(
        cfg,
        &["app", "status", "-a", "bench", "-o", "json"],
        &[],
    ))?;
    let status: Value = serde_json::from_str(&status).context("app status JSON")?;
    let sandbox = &status["sandboxes"][0];
    if sandbox["state"] != "healthy" {
        bail!("the sandbox is not healthy: {status}");
    }
    let address = sandbox["address"]
        .as_str()
        .context("no sandbox address in app status")?;
    if address.starts_with("unix:") {
        bail!("the sandbox is isolated ({address}): its token endpoint is not on loopback TCP");
    }
    Ok(address.to_string())
}

/// The endpoint (host:port, path) and its secret, from the fixture.
fn credentials(sandbox: &str) -> anyhow::Result<(String, String, String)> {
    let (code, body) = http_get(sandbox, "/creds").context("GET /creds")?;
    if code != 200 {
        bail!("GET /creds answered {code}: {body}");
    }
    let v: Value = serde_json::from_str(&body).context("/creds JSON")?;
    let url = v["url"].as_str().context("no url")?;
    let secret = v["secret"].as_str().context("no secret")?.to_string();
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if secret.is_empty() || host.is_empty() {
        bail!("incomplete credentials from the fixture: {body}");
    }
    Ok((host.to_string(), format!("/{path}"), secret))
}

// ---------------------------------------------------------------------------
// A minimal keep-alive HTTP/1.1 client
// ---------------------------------------------------------------------------

struct Client {
    stream: TcpStream,
    host: String,
    /// Received bytes not yet consumed.
    buf: Vec<u8>,
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Client {
    fn connect(host: &str) -> io::Result<Client> {
        let stream = TcpStream::connect(host)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            stream,
            host: host.to_string(),
            buf: Vec::with_capacity(8192),
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// `GET target` with the bearer secret; the reply must carry
    /// Content-Length (axum's does).
    fn get(&mut self, target: &str, secret: &str) -> io::Result<Reply> {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {secret}\r\n\r\n",
            self.host
        );
        self.stream.write_all(req.as_bytes())?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad("no status line"))?;
        let len = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .ok_or_else(|| bad("no Content-Length"))?;
        let body_start = head_end + 4;
        while self.buf.len() < body_start + len {
            self.fill()?;
        }
        let body = self.buf[body_start..body_start + len].to_vec();
        self.buf.drain(..body_start + len);
        Ok(Reply { status, body })
    }
}

fn is_token(r: &Reply) -> bool {
    r.status == 200 && r.body.starts_with(b"{\"value\":\"ey")
}

// ---------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Stats {
    fn merge(parts: Vec<Stats>, wall: Duration) -> Stats {
        let mut all = Stats {
            wall,
            ..Default::default()
        };
        for p in parts {
            all.ok += p.ok;
            all.errors += p.errors;
            all.first_error = all.first_error.or(p.first_error);
            all.latencies.extend(p.latencies);
        }
        all.latencies.sort_unstable();
        all
    }

    fn rate(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile, in microseconds (`latencies` is sorted by
    /// `drive` and `merge`).
    fn pct_us(&self, p: f64) -> f64 {
        let n = self.latencies.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1].as_secs_f64() * 1e6
    }
}

/// Requests on one connection until `max` are done or `deadline` passes.
fn drive(
    client: &mut Client,
    secret: &str,
    max: usize,
    deadline: Instant,
    mut target: impl FnMut() -> String,
) -> Stats {
    let mut s = Stats {
        latencies: Vec::with_capacity(max.min(1 << 20)),
        ..Default::default()
    };
    let started = Instant::now();
    while (s.ok + s.errors) < max as u64 && Instant::now() < deadline {
        let t = target();
        let t0 = Instant::now();
        match client.get(&t, secret) {
            Ok(r) if is_token(&r) => {
                s.latencies.push(t0.elapsed());
                s.ok += 1;
            }
            Ok(r) => {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| {
                    format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
                });
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| e.to_string());
                break;
            }
        }
    }
    s.wall = started.elapsed();
    s.latencies.sort_unstable();
    s
}

/// `conns` connections in parallel threads, all started together.
fn parallel(
    host: &str,
    secret: &str,
    conns: usize,
    max: usize,
    limit: Duration,
    target: &(dyn Fn() -> String + Sync),
) -> anyhow::Result<Stats> {
    let barrier = Barrier::new(conns + 1);
    let (parts, wall) = thread::scope(|sc| -> anyhow::Result<_> {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                let barrier = &barrier;
                sc.spawn(move || -> io::Result<Stats> {
                    let client = Client::connect(host);
                    barrier.wait();
                    let mut client = client?;
                    Ok(drive(
                        &mut client,
                        secret,
                        max,
                        Instant::now() + limit,
                        target,
                    ))
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut parts = Vec::new();
        for h in handles {
            let part = h
                .join()
                .map_err(|_| anyhow!("client thread panicked"))?
                .context("connecting to the token endpoint")?;
            parts.push(part);
        }
        Ok((parts, t0.elapsed()))
    })?;
    Ok(Stats::merge(parts, wall))
}

/// Checks one token from the endpoint: audience `bench`, app `bench`.
fn check_token(body: &[u8]) -> anyhow::Result<String> {
    use base64::Engine as _;
    let v: Value = serde_json::from_slice(body)?;
    let jwt = v["value"].as_str().context("no value")?;
    let payload = jwt.split('.').nth(1).context("not a JWT")?;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    let aud_ok = claims["aud"] == "bench"
        || claims["aud"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "bench"));
    if !aud_ok || claims["app"] != "bench" {
        bail!("unexpected claims: {claims}");
    }
    Ok(claims["sub"].as_str().unwrap_or_default().to_string())
}

fn bench(s: &Settings, benching: bool) -> anyhow::Result<()> {
    let total = Instant::now();
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let rounds: usize = std::env::var("MIREN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut runs: Vec<(bool, Measured)> = Vec::new();
    for round in 0..rounds {
        // Alternate which goes first, so a drift in load favours neither.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for observe in order {
            let cluster = Cluster::start(observe)?;
            let result = measure(s, cores, &cluster.cfg, cluster.pids());
            cluster.stop();
            runs.push((observe, result?));
        }
    }
    for (observe, m) in &runs {
        report(m, *observe, cores);
    }
    compare(&runs);
    println!("total {:.1} s", total.elapsed().as_secs_f64());
    if !benching {
        println!(
            "(quick pass: run `cargo bench -p integration-tests --bench tokens_endpoint` for real numbers)"
        );
    }
    Ok(())
}

/// Mean of the figures with observation on and off, side by side.
fn compare(runs: &[(bool, Measured)]) {
    let mean = |on: bool, f: &dyn Fn(&Measured) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|(o, _)| *o == on)
            .map(|(_, m)| f(m))
            .collect();
        v.iter().sum::<f64>() / (v.len().max(1) as f64)
    };
    println!();
    println!("metrics + audit on vs off (--no-observe), same run:");
    type Figure = (&'static str, fn(&Measured) -> f64);
    let figures: [Figure; 6] = [
        ("cached p50 us (1 conn)", |m| m.cached1.pct_us(50.0)),
        ("cached p99 us (1 conn)", |m| m.cached1.pct_us(99.0)),
        ("cached rate/s (2 conns)", |m| m.cached2.rate()),
        ("uncached rate/s", |m| m.uncached.rate()),
        ("uncached / raw sign", |m| {
            m.uncached.rate() / (m.signs as f64 / m.sign_wall.as_secs_f64().max(1e-9)).max(1e-9)
        }),
        ("coordinator CPU/token / sign", |m| {
            let (coord, _, sign) = m.cpu_per_token_us();
            coord / sign.max(1e-9)
        }),
    ];
    for (name, f) in figures {
        let (on, off) = (mean(true, &f), mean(false, &f));
        println!(
            "  {name:<26} on {on:>10.2}   off {off:>10.2}   on/off {:.3}",
            on / off.max(1e-9)
        );
    }
}

fn report(m: &Measured, observe: bool, cores: usize) {
    let row = |name: &str, st: &Stats, lat: bool| {
        let (p50, p99) = if lat {
            (
                format!("{:.0}", st.pct_us(50.0)),
                format!("{:.0}", st.pct_us(99.0)),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{name:<38} {:>9} {:>7} {:>8.2} {:>10.0} {:>8} {:>8}",
            st.ok,
            st.errors,
            st.wall.as_secs_f64(),
            st.rate(),
            p50,
            p99
        );
    };
    println!();
    println!(
        "token endpoint bench: 1 coordinator + 1 runner + 1 sandbox (plain process) on \
         loopback, {cores} cores; metrics + audit {}",
        if observe { "ON" } else { "OFF (--no-observe)" }
    );
    println!(
        "{:<38} {:>9} {:>7} {:>8} {:>10} {:>8} {:>8}",
        "phase", "ok", "errors", "secs", "rate/s", "p50 us", "p99 us"
    );
    row("cached, 1 connection (sequential)", &m.cached1, true);
    row(
        &format!("cached, {} connections", m.conns),
        &m.cached2,
        true,
    );
    row(
        &format!(
            "uncached (fresh audience), {} conns",
            cores * UNCACHED_CONNS_PER_CORE
        ),
        &m.uncached,
        true,
    );
    let sign_rate = m.signs as f64 / m.sign_wall.as_secs_f64().max(1e-9);
    println!(
        "{:<38} {:>9} {:>7} {:>8.2} {:>10.0} {:>8} {:>8}",
        format!("raw RSA-2048 sign (aws-lc-rs), {cores} thr"),
        m.signs,
        0,
        m.sign_wall.as_secs_f64(),
        sign_rate,
        "-",
        "-"
    );
    for (name, st) in [
        ("cached, 1 connection", &m.cached1),
        ("cached, 2 connections", &m.cached2),
        ("uncached", &m.uncached),
    ] {
        if let Some(e) = &st.first_error {
            println!("first error ({name}): {e}");
        }
    }
    println!();
    let p50 = m.cached1.pct_us(50.0);
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    println!(
        "cached p50 = {p50:.0} us (target < {CACHED_P50_TARGET_US:.0} us) {}",
        verdict(p50 < CACHED_P50_TARGET_US)
    );
    let ratio = m.uncached.rate() / sign_rate.max(1e-9);
    println!(
        "uncached / raw sign = {ratio:.2} (target >= {RATIO_TARGET}) {}",
        verdict(ratio >= RATIO_TARGET)
    );
    let (coord_us, runner_us, sign_us) = m.cpu_per_token_us();
    let cpu_ratio = coord_us / sign_us.max(1e-9);
    println!(
        "CPU per uncached token (from /proc): coordinator {coord_us:.0} us, runner {runner_us:.0} us; \
         raw sign {sign_us:.0} us per signature"
    );
    let tokens = m.uncached.ok.max(1) as f64;
    let client_us = m.client_cpu * 1e6 / tokens;
    let idle_us = ((cores as f64 * m.uncached.wall.as_secs_f64()
        - m.coordinator_cpu
        - m.runner_cpu
        - m.client_cpu)
        * 1e6
        / tokens)
        .max(0.0);
    println!(
        "  the {cores} cores per uncached token: coordinator {coord_us:.0} + runner {runner_us:.0} \
         + this client {client_us:.0} + the rest (sandbox, kernel threads, idle) {idle_us:.0} us"
    );
    println!(
        "coordinator CPU per token / raw sign CPU = {cpu_ratio:.2} (target <= {CPU_RATIO_TARGET}) {}",
        verdict(cpu_ratio <= CPU_RATIO_TARGET)
    );
    println!(
        "note: the coordinator (which signs), the runner (endpoint + minting proxy), the sandbox \
         and this client all share the same {cores} cores, so uncached minting competes with the \
         client driving it; the raw sign rate had the cores to itself."
    );
    println!("sandbox token subject: {}", m.subject);
}

struct Measured {
    conns: usize,
    cached1: Stats,
    cached2: Stats,
    uncached: Stats,
    signs: u64,
    sign_wall: Duration,
    subject: String,
    /// CPU seconds the coordinator and the runner used in the uncached
    /// phase, and this process over the raw signatures.
    coordinator_cpu: f64,
    runner_cpu: f64,
    /// This process (the load client) over the uncached phase.
    client_cpu: f64,
    sign_cpu: f64,
}

impl Measured {
    /// Microseconds of CPU per minted token (coordinator, runner) and per
    /// raw signature.
    fn cpu_per_token_us(&self) -> (f64, f64, f64) {
        let tokens = self.uncached.ok.max(1) as f64;
        (
            self.coordinator_cpu * 1e6 / tokens,
            self.runner_cpu * 1e6 / tokens,
            self.sign_cpu * 1e6 / self.signs.max(1) as f64,
        )
    }
}

/// `pids`: the coordinator's and the runner's, sampled for CPU time.
fn measure(s: &Settings, cores: usize, cfg: &Path, pids: (u32, u32)) -> anyhow::Result<Measured> {
    let sandbox = deploy(cfg)?;
    let (host, path, secret) = credentials(&sandbox)?;
    let cached_target = format!("{path}?audience=bench");

    // Warm-up: the first request mints, the rest come from the cache.
    let mut client = Client::connect(&host).context("connecting to the token endpoint")?;
    let first = client.get(&cached_target, &secret)?;
    if !is_token(&first) {
        bail!(
            "the endpoint answered {}: {}",
            first.status,
            String::from_utf8_lossy(&first.body)
        );
    }
    let subject = check_token(&first.body)?;
    let warm = drive(
        &mut client,
        &secret,
        s.warmup_n,
        Instant::now() + s.cached_cap,
        || cached_target.clone(),
    );
    if let Some(e) = warm.first_error {
        bail!("warm-up failed: {e}");
    }

    // 1. Cached, sequential on one connection, then on two at once.
    let cached1 = drive(
        &mut client,
        &secret,
        s.cached_n,
        Instant::now() + s.cached_cap,
        || cached_target.clone(),
    );
    drop(client);
    let conns = 2;
    let cached2 = parallel(&host, &secret, conns, s.cached_n, s.cached_cap, &|| {
        cached_target.clone()
    })?;

    // 2. Uncached: every request a new audience, so every one is minted.
    let seq = AtomicU64::new(0);
    let mut client = Client::connect(&host)?;
    let deadline = Instant::now() + s.uncached_warmup;
    drive(&mut client, &secret, usize::MAX, deadline, || {
        format!("{path}?audience=w{}", seq.fetch_add(1, Ordering::Relaxed))
    });
    drop(client);
    let uncached_conns = cores * UNCACHED_CONNS_PER_CORE;
    let clk = common::clock_ticks();
    let me = std::process::id();
    let (coord_before, runner_before, client_before) = (
        common::cpu_secs(&[pids.0], clk),
        common::cpu_secs(&[pids.1], clk),
        common::cpu_secs(&[me], clk),
    );
    let perf = common::perf_record(
        &[pids.0, pids.1],
        s.uncached,
        &format!("tokens-uncached-{}", pids.0),
    )?;
    let uncached = parallel(
        &host,
        &secret,
        uncached_conns,
        usize::MAX,
        s.uncached,
        &|| format!("{path}?audience=a{}", seq.fetch_add(1, Ordering::Relaxed)),
    )?;

    let coordinator_cpu = common::cpu_secs(&[pids.0], clk) - coord_before;
    let client_cpu = common::cpu_secs(&[me], clk) - client_before;
    if let Some(mut perf) = perf {
        let _ = perf.wait();
    }
    let runner_cpu = common::cpu_secs(&[pids.1], clk) - runner_before;

    // 3. Raw signing, while the cluster sits idle; this process's CPU
    // time over it is the signatures' (the other threads are idle).
    let sign_before = common::cpu_secs(&[me], clk);
    let (signs, sign_wall) = raw_sign(cores, s.sign)?;
    let sign_cpu = common::cpu_secs(&[me], clk) - sign_before;

    Ok(Measured {
        conns,
        cached1,
        cached2,
        uncached,
        signs,
        sign_wall,
        subject,
        coordinator_cpu,
        runner_cpu,
        client_cpu,
        sign_cpu,
    })
}
