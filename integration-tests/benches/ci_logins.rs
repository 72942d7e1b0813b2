//! CI logins per second against a real coordinator with a warm JWKS cache,
//! next to the raw RSA-2048 verify rate of the same machine (issue 6).
//!
//! `cargo bench -p integration-tests --bench ci_logins` (build the binary
//! first: `cargo build --release -p cli`; `MIREN_BIN` overrides its
//! location):
//!
//! 1. starts the GitHub-shaped test issuer (`python/oidc_issuer.py`, HTTPS
//!    on loopback) and `miren server --listen 127.0.0.1:0
//!    --oidc-allow-loopback-issuers --oidc-ca-file <issuer CA>`;
//! 2. adds the binding a pipeline logs in with, through the CLI:
//!    `miren auth ci add -a web --issuer <issuer> --subject repo:acme/web:*`
//!    (push or workflow_dispatch, main or a `v*` tag), then up to 9,999
//!    more bindings of the same issuer (9 more of `web`, 10 for each of 999
//!    other apps) over one admin RPC connection, 64 in flight, within a time
//!    limit (each is a store commit; fewer are reported if the limit is hit);
//! 3. fetches a pool of tokens from the issuer's `/token?count=N` endpoint
//!    (audience: the cluster's `host:port`, repository `acme/web`, a push
//!    to main; each with its own `jti`, since a CI token is accepted once)
//!    and logs in once, which fetches the issuer's discovery document and
//!    JWKS;
//! 4. from this process, over ONE QUIC connection (`transport::dial`, no
//!    client certificate) on a current-thread runtime in a `LocalSet`,
//!    calls `Cluster.ciLogin(token, "web")` repeatedly, 32 in flight, and
//!    counts logins that returned an App capability (a fresh token every
//!    time: each login verifies, matches, and spends the token's `jti` in
//!    the store); interleaved
//!    with that, measures raw aws-lc-rs RSA-2048 PKCS#1 SHA-256 verify on
//!    every core;
//! 5. for comparison (informational), the same 32 logins in flight spread
//!    over one connection per core, and one login at a time (latency);
//! 6. prints logins/s, raw verify/s, their ratio against the target 0.70,
//!    and how much CPU the coordinator and this process used during the
//!    login phases (from `/proc`). Timings are reported, never asserted.
//!
//! The coordinator, this client (QUIC + Cap'n Proto) and the raw measurement
//! share the machine's cores; the raw rate has them to itself, the logins do
//! not. Environment: `CI_LOGINS_BENCH_BINDINGS` (total bindings, default
//! 10000; 1 skips the bulk add), `CI_LOGINS_BENCH_SECS` (measured login
//! time, default 5), `CI_LOGINS_BENCH_TOKENS` (the pool, default 20000;
//! the phases stop early when it runs out, and say so). Under `cargo test --benches` (no `--bench` argument) a
//! quick pass with small counts shows the bench still works (skipped without
//! the binary or the Python issuer).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    KeyPair as _, RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use futures::stream::{FuturesUnordered, StreamExt};
use identity::{Binding, ClusterAddress, Condition};
use integration_tests::{miren, temp, PythonIssuer, Run, Server};
use schema::miren_capnp::cluster;
use transport::tls::ClientIdentity;

#[allow(dead_code)]
mod common;

const TARGET: f64 = 0.70;
const IN_FLIGHT: usize = 32;
const ADD_IN_FLIGHT: usize = 64;
const BEARER: &str = "bench-request-secret";
const EVENTS: &str = "push,workflow_dispatch";
const REFS: &str = "refs/heads/main,refs/tags/v*";
/// Slices the login and raw phases are interleaved in.
const SLICES: u32 = 2;

struct Settings {
    bindings: usize,
    add_limit: Duration,
    logins: Duration,
    raw: Duration,
    sequential: Duration,
    warmup: Duration,
    tokens: usize,
}

/// Fresh CI tokens, each used once.
struct Pool(std::cell::RefCell<Vec<String>>);

impl Pool {
    fn next(&self) -> Option<String> {
        self.0.borrow_mut().pop()
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn main() -> std::process::ExitCode {
    let benching = std::env::args().any(|a| a == "--bench");
    let s = if benching {
        let secs = env_number("CI_LOGINS_BENCH_SECS").unwrap_or(5).max(1);
        Settings {
            bindings: env_number("CI_LOGINS_BENCH_BINDINGS").map_or(10_000, |n| n as usize),
            add_limit: Duration::from_secs(60),
            logins: Duration::from_secs(secs),
            raw: Duration::from_secs(3),
            sequential: Duration::from_secs(1),
            warmup: Duration::from_millis(500),
            tokens: env_number("CI_LOGINS_BENCH_TOKENS").map_or(20_000, |n| n as usize),
        }
    } else {
        Settings {
            bindings: 50,
            add_limit: Duration::from_secs(10),
            logins: Duration::from_millis(400),
            raw: Duration::from_millis(200),
            sequential: Duration::from_millis(100),
            warmup: Duration::from_millis(50),
            tokens: 300,
        }
    };
    common::run_bench("ci_logins", benching, prerequisites(), || {
        bench(&s, benching)
    })
}

/// The `miren` binary ([`common::miren_bin`]) and python3 with PyJWT and
/// cryptography.
fn prerequisites() -> anyhow::Result<()> {
    common::miren_bin()?;
    let py = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running python3")?;
    if !py.success() {
        bail!("python3 lacks PyJWT or cryptography (the test issuer needs them)");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn ok(run: Run) -> anyhow::Result<String> {
    if run.ok {
        Ok(run.stdout)
    } else {
        bail!("{}{}", run.stdout, run.stderr)
    }
}

fn remote(e: capnp::Error) -> anyhow::Error {
    anyhow!(transport::rpc::remote_message(&e))
}

/// The admin identity the server wrote into the client config for `host_port`.
fn admin_identity(cfg: &Path, host_port: &str) -> anyhow::Result<ClientIdentity> {
    let text = std::fs::read_to_string(cfg).context("reading the client config")?;
    let v: serde_json::Value = serde_yaml_ng::from_str(&text).context("client config YAML")?;
    let entry = v["clusters"]
        .as_object()
        .and_then(|m| m.values().find(|e| e["hostname"] == host_port))
        .with_context(|| format!("no cluster {host_port} in the client config"))?;
    let cert = entry["client_cert"].as_str().context("no client_cert")?;
    let key = entry["client_key"].as_str().context("no client_key")?;
    Ok(ClientIdentity {
        chain: vec![transport::pki::cert_der_from_pem(cert)?],
        key: transport::pki::key_der_from_pem(key)?,
    })
}

/// The pid of the `miren server` process serving `data_dir`.
fn server_pid(data_dir: &Path) -> Option<u32> {
    let want = data_dir.to_str()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_server = args.contains(&b"server".as_slice()) && args.contains(&want.as_bytes());
        is_server.then_some(pid)
    })
}

/// CPU time (user + system) used so far by `pid` ("self" for this process).
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------------------
// RPC phases
// ---------------------------------------------------------------------------

/// The bulk bindings: 9 more of `web`, then 10 per other app.
fn bulk_binding(issuer: &str, i: usize) -> anyhow::Result<Binding> {
    let (app, subject) = if i < 9 {
        ("web".to_string(), format!("repo:acme/web-{i}:*"))
    } else {
        let k = i - 9;
        (
            format!("app{:04}", k / 10),
            format!("repo:org{}/svc{}:*", k / 10, k % 10),
        )
    };
    Ok(Binding::generic(
        "pending",
        &app,
        issuer,
        &subject,
        vec![
            Condition::parse("event_name", EVENTS)?,
            Condition::parse("ref", REFS)?,
        ],
        "ci_logins bench",
    )?)
}

struct Added {
    added: usize,
    first_error: Option<String>,
    wall: Duration,
}

/// Adds `n` bindings over one admin connection, `ADD_IN_FLIGHT` at a time,
/// stopping at `limit`.
async fn add_bindings(
    address: &ClusterAddress,
    admin_id: ClientIdentity,
    issuer: &str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<Added> {
    let (endpoint, conn) = transport::dial(address, Some(admin_id)).await?;
    let cluster: cluster::Client = transport::rpc::connect_connection(&conn)
        .await
        .map_err(remote)?;
    let reply = cluster
        .admin_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let admin = reply.get()?.get_admin().map_err(remote)?;
    let mut bindings = Vec::with_capacity(n);
    for i in 0..n {
        bindings.push(bulk_binding(issuer, i)?);
    }
    let started = Instant::now();
    let deadline = started + limit;
    let mut next = bindings.iter();
    let mut pending = FuturesUnordered::new();
    let mut out = Added {
        added: 0,
        first_error: None,
        wall: Duration::ZERO,
    };
    loop {
        while pending.len() < ADD_IN_FLIGHT && Instant::now() < deadline {
            let Some(binding) = next.next() else { break };
            let mut req = admin.add_ci_binding_request();
            coordinator::service::ci_wire::write_binding(req.get().init_binding(), binding);
            pending.push(req.send().promise);
        }
        let Some(result) = pending.next().await else {
            break;
        };
        match result {
            Ok(_) => out.added += 1,
            Err(e) => {
                out.first_error.get_or_insert_with(|| remote(e).to_string());
            }
        }
    }
    out.wall = started.elapsed();
    conn.close(transport::close::CloseCode::Done.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    Ok(out)
}

#[derive(Default)]
struct Logins {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    wall: Duration,
    latencies: Vec<Duration>,
    /// The token pool ran out before the phase's time was up.
    exhausted: bool,
}

impl Logins {
    fn add(&mut self, other: Logins) {
        self.exhausted |= other.exhausted;
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.wall += other.wall;
        self.latencies.extend(other.latencies);
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile in microseconds.
    fn pct_us(&mut self, p: f64) -> f64 {
        self.latencies.sort_unstable();
        let n = self.latencies.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1].as_secs_f64() * 1e6
    }
}

/// One `ciLogin`; Ok when it handed back an App capability.
async fn login(cluster: &cluster::Client, token: String) -> (Instant, Result<(), String>) {
    let started = Instant::now();
    let mut req = cluster.ci_login_request();
    req.get().set_token(&token);
    req.get().set_app("web");
    let result = match req.send().promise.await {
        Ok(reply) => match reply.get().and_then(|r| r.get_app()) {
            Ok(_app) => Ok(()),
            Err(e) => Err(transport::rpc::remote_message(&e)),
        },
        Err(e) => Err(transport::rpc::remote_message(&e)),
    };
    (started, result)
}

/// Logins with `in_flight` outstanding for `duration`; only those that
/// complete inside the window count.
async fn drive(
    cluster: &cluster::Client,
    pool: &Pool,
    in_flight: usize,
    duration: Duration,
) -> Logins {
    let started = Instant::now();
    let deadline = started + duration;
    let mut pending = FuturesUnordered::new();
    for token in std::iter::from_fn(|| pool.next()).take(in_flight) {
        pending.push(login(cluster, token));
    }
    let mut out = Logins::default();
    while let Some((sent, result)) = pending.next().await {
        let now = Instant::now();
        if now >= deadline {
            // Let the rest drain uncounted.
            continue;
        }
        match result {
            Ok(()) => {
                out.ok += 1;
                out.latencies.push(now - sent);
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(e);
            }
        }
        match pool.next() {
            Some(token) => pending.push(login(cluster, token)),
            None => out.exhausted = true,
        }
    }
    out.wall = if out.exhausted {
        started.elapsed().min(duration)
    } else {
        duration
    };
    out
}

/// [`drive`] on every connection at once, `per_connection` in flight each.
async fn drive_many(
    clusters: &[cluster::Client],
    pool: &Pool,
    per_connection: usize,
    duration: Duration,
) -> Logins {
    let parts = futures::future::join_all(
        clusters
            .iter()
            .map(|c| drive(c, pool, per_connection, duration)),
    )
    .await;
    let mut all = Logins::default();
    for part in parts {
        all.add(part);
    }
    // The parts ran in the same window.
    all.wall = duration;
    all
}

/// CPU used by the coordinator and by this process over several windows.
struct Cpu {
    server_pid: Option<String>,
    server: Option<Duration>,
    client: Option<Duration>,
    wall: Duration,
}

impl Cpu {
    fn new(server_pid: Option<String>) -> Cpu {
        Cpu {
            server_pid,
            server: Some(Duration::ZERO),
            client: Some(Duration::ZERO),
            wall: Duration::ZERO,
        }
    }

    /// Runs `f`, adding the CPU both processes used meanwhile.
    fn window<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let pid = self.server_pid.clone();
        let server_before = pid.as_deref().and_then(cpu_time);
        let client_before = cpu_time("self");
        let t0 = Instant::now();
        let out = f();
        self.wall += t0.elapsed();
        let delta = |before: Option<Duration>, pid: Option<&str>| {
            Some(cpu_time(pid?)?.saturating_sub(before?))
        };
        self.server = self
            .server
            .zip(delta(server_before, pid.as_deref()))
            .map(|(a, b)| a + b);
        self.client = self
            .client
            .zip(delta(client_before, Some("self")))
            .map(|(a, b)| a + b);
        out
    }

    fn cores(&self, cpu: Option<Duration>) -> String {
        match cpu {
            Some(c) => format!("{:.2} cores", c.as_secs_f64() / self.wall.as_secs_f64()),
            None => "unknown".to_string(),
        }
    }
}

/// Raw RSA-2048 PKCS#1 SHA-256 verifications of `message` on `threads`
/// threads for `limit`, key parsed once: (count, wall time).
fn raw_verify(
    threads: usize,
    public: &aws_lc_rs::signature::ParsedPublicKey,
    message: &[u8],
    signature: &[u8],
    limit: Duration,
) -> (u64, Duration) {
    let barrier = Barrier::new(threads + 1);
    thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                sc.spawn(move || {
                    barrier.wait();
                    let deadline = Instant::now() + limit;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        if std::hint::black_box(public.verify_sig(message, signature)).is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let count = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        (count, t0.elapsed())
    })
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct Measured {
    added: Added,
    logins: Logins,
    logins_cpu: Cpu,
    many_connections: usize,
    many: Logins,
    many_cpu: Cpu,
    sequential: Logins,
    raws: u64,
    raw_wall: Duration,
    token_len: usize,
}

fn bench(s: &Settings, benching: bool) -> anyhow::Result<()> {
    let total = Instant::now();
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let dir = temp();
    // Panics, naming its log, if it does not start (python3 and PyJWT are
    // checked in `prerequisites`).
    let issuer = PythonIssuer::start(dir.path(), BEARER);
    let cfg = dir.path().join("admin.yaml");
    let data = dir.path().join("coord");
    let ca = issuer
        .ca
        .to_str()
        .context("non-UTF-8 temp path")?
        .to_string();
    let server = Server::try_start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--oidc-allow-loopback-issuers", "--oidc-ca-file", &ca],
    )
    .map_err(|e| anyhow!("server did not start: {e}"))?;
    let result = measure(s, cores, &issuer, &server, &cfg, &data);
    let (clean, err) = server.stop();
    if !clean {
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        eprintln!("note: the server did not exit cleanly: {tail:?}");
    }
    drop(issuer);
    let mut m = result?;

    let raw_rate = m.raws as f64 / m.raw_wall.as_secs_f64().max(1e-9);
    let rate = m.logins.rate();
    let ratio = rate / raw_rate.max(1e-9);
    println!();
    println!(
        "CI logins bench: 1 coordinator (miren server) + the Python test issuer on loopback, \
         {cores} cores, token {} bytes",
        m.token_len
    );
    match &m.added.first_error {
        None => println!(
            "bindings: {} ({} from the CLI + {} over admin RPC in {:.1} s, {:.0}/s), one issuer",
            1 + m.added.added,
            1,
            m.added.added,
            m.added.wall.as_secs_f64(),
            m.added.added as f64 / m.added.wall.as_secs_f64().max(1e-9)
        ),
        Some(e) => println!(
            "bindings: {} ({} added over admin RPC in {:.1} s; first error: {e})",
            1 + m.added.added,
            m.added.added,
            m.added.wall.as_secs_f64()
        ),
    }
    if m.added.added + 1 < s.bindings {
        println!(
            "note: {} of the {} bindings asked for were added within {:?}",
            1 + m.added.added,
            s.bindings,
            s.add_limit
        );
    }
    println!();
    println!(
        "{:<44} {:>9} {:>7} {:>7} {:>10} {:>8} {:>8}",
        "phase", "ok", "errors", "secs", "rate/s", "p50 us", "p99 us"
    );
    let n_many = m.many_connections;
    let rows: [(String, &mut Logins); 3] = [
        (
            format!("ciLogin, {IN_FLIGHT} in flight, 1 QUIC connection"),
            &mut m.logins,
        ),
        (
            format!(
                "  (info) {n_many} connections x {} in flight",
                IN_FLIGHT / n_many
            ),
            &mut m.many,
        ),
        (
            "  (info) 1 connection, 1 in flight".to_string(),
            &mut m.sequential,
        ),
    ];
    for (name, l) in rows {
        let (p50, p99) = (l.pct_us(50.0), l.pct_us(99.0));
        println!(
            "{name:<44} {:>9} {:>7} {:>7.2} {:>10.0} {:>8.0} {:>8.0}",
            l.ok,
            l.errors,
            l.wall.as_secs_f64(),
            l.rate(),
            p50,
            p99
        );
        if let Some(e) = &l.first_error {
            println!("  first error: {e}");
        }
        if l.exhausted {
            println!("  (the token pool ran out; raise CI_LOGINS_BENCH_TOKENS)");
        }
    }
    println!(
        "{:<44} {:>9} {:>7} {:>7.2} {:>10.0} {:>8} {:>8}",
        format!("raw RSA-2048 verify (aws-lc-rs), {cores} thr"),
        m.raws,
        0,
        m.raw_wall.as_secs_f64(),
        raw_rate,
        "-",
        "-"
    );
    println!(
        "CPU, 1 connection:  coordinator {}, this client {}",
        m.logins_cpu.cores(m.logins_cpu.server),
        m.logins_cpu.cores(m.logins_cpu.client)
    );
    println!(
        "CPU, {n_many} connections: coordinator {}, this client {}",
        m.many_cpu.cores(m.many_cpu.server),
        m.many_cpu.cores(m.many_cpu.client)
    );
    println!();
    println!(
        "logins/s / raw verify/s = {rate:.0} / {raw_rate:.0} = {ratio:.3}  (target >= \
         {TARGET:.2}) {}",
        if ratio >= TARGET { "PASS" } else { "MISS" }
    );
    println!(
        "note: the coordinator (QUIC, Cap'n Proto, verification, matching), this bench client \
         (QUIC + Cap'n Proto on one thread) and the raw measurement share the same {cores} \
         cores; the raw rate had them to itself, the logins shared them with the client."
    );
    println!("total {:.1} s", total.elapsed().as_secs_f64());
    if !benching {
        println!(
            "(quick pass: run `cargo bench -p integration-tests --bench ci_logins` for real \
             numbers)"
        );
    }
    Ok(())
}

fn measure(
    s: &Settings,
    cores: usize,
    issuer: &PythonIssuer,
    server: &Server,
    cfg: &Path,
    data: &Path,
) -> anyhow::Result<Measured> {
    let issuer_url = issuer.url();
    ok(miren(
        cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            &issuer_url,
            "--subject",
            "repo:acme/web:*",
            "--allowed-events",
            EVENTS,
            "--allowed-refs",
            REFS,
        ],
        &[],
    ))
    .context("miren auth ci add")?;
    let address: ClusterAddress = server.address.parse()?;
    let audience = server.host_port().to_string();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();

    // Bulk bindings over admin RPC.
    let admin_id = admin_identity(cfg, &audience)?;
    let bulk = s.bindings.saturating_sub(1);
    let added = local.block_on(
        &rt,
        add_bindings(&address, admin_id, &issuer_url, bulk, s.add_limit),
    )?;

    // A fresh token for every login.
    let mut tokens = issuer.tokens(
        &format!("audience={audience}&repository=acme/web&event_name=push&ref=refs/heads/main"),
        s.tokens.max(2),
    )?;
    let token = tokens.pop().context("no token")?;
    let pool = Pool(std::cell::RefCell::new(tokens));

    // Raw material: a fresh RSA-2048 key signing the token's signing input.
    let key = identity::SigningKeyPair::generate().map_err(|e| anyhow!("{e}"))?;
    let raw_key = RsaKeyPair::from_pkcs8(key.pkcs8_der()).map_err(|e| anyhow!("{e}"))?;
    let message = &token.as_bytes()[..token.rfind('.').context("not a JWT")?];
    let mut signature = vec![0u8; raw_key.public_modulus_len()];
    raw_key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            message,
            &mut signature,
        )
        .map_err(|e| anyhow!("raw sign: {e}"))?;
    let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, raw_key.public_key().as_ref())
        .parse()
        .map_err(|e| anyhow!("parse public key: {e}"))?;

    let server_pid = server_pid(data).map(|p| p.to_string());
    let slice = s.logins / SLICES;
    let raw_slice = s.raw / SLICES;

    let (endpoint, conn) = local.block_on(&rt, transport::dial(&address, None))?;
    let cluster: cluster::Client = local
        .block_on(&rt, transport::rpc::connect_connection(&conn))
        .map_err(remote)?;
    // The first login fetches the issuer's discovery document and JWKS.
    let (_, first) = local.block_on(&rt, login(&cluster, token.clone()));
    first.map_err(|e| anyhow!("the first CI login failed: {e}"))?;
    local.block_on(&rt, drive(&cluster, &pool, IN_FLIGHT, s.warmup));

    // For comparison: one connection per core, the same logins in flight
    // in all.
    let mut others = Vec::new();
    for _ in 0..cores.max(2) {
        let (e, c) = local.block_on(&rt, transport::dial(&address, None))?;
        let client: cluster::Client = local
            .block_on(&rt, transport::rpc::connect_connection(&c))
            .map_err(remote)?;
        others.push((e, c, client));
    }
    let clients: Vec<cluster::Client> = others.iter().map(|(_, _, c)| c.clone()).collect();
    let per_connection = (IN_FLIGHT / clients.len()).max(1);
    local.block_on(&rt, drive_many(&clients, &pool, per_connection, s.warmup));

    let mut logins = Logins::default();
    let mut many = Logins::default();
    let mut logins_cpu = Cpu::new(server_pid.clone());
    let mut many_cpu = Cpu::new(server_pid);
    let (mut raws, mut raw_wall) = (0u64, Duration::ZERO);
    for _ in 0..SLICES {
        let part =
            logins_cpu.window(|| local.block_on(&rt, drive(&cluster, &pool, IN_FLIGHT, slice)));
        logins.add(part);
        let (n, wall) = raw_verify(cores, &public, message, &signature, raw_slice);
        raws += n;
        raw_wall += wall;
        let part = many_cpu
            .window(|| local.block_on(&rt, drive_many(&clients, &pool, per_connection, slice)));
        many.add(part);
    }
    let sequential = local.block_on(&rt, drive(&cluster, &pool, 1, s.sequential));

    let mut endpoints = vec![endpoint];
    conn.close(transport::close::CloseCode::Done.into(), b"done");
    for (e, c, _) in others {
        c.close(transport::close::CloseCode::Done.into(), b"done");
        endpoints.push(e);
    }
    local.block_on(&rt, async {
        for e in endpoints {
            let _ = tokio::time::timeout(Duration::from_millis(500), e.wait_idle()).await;
        }
    });
    Ok(Measured {
        added,
        logins,
        logins_cpu,
        many_connections: clients.len(),
        many,
        many_cpu,
        sequential,
        raws,
        raw_wall,
        token_len: token.len(),
    })
}
