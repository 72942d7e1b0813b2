//! `client_credentials` grants per second through the coordinator's HTTPS
//! token endpoint, next to the raw RSA-2048 sign rate measured in the same
//! run (target: at least 0.6 of it; every grant is one RS256 signature).
//!
//! `cargo bench -p integration-tests --bench oauth_token` (build the binary
//! first: `cargo build --release -p cli`; `MIREN_BIN` overrides its
//! location):
//!
//! 1. starts `miren server --listen 127.0.0.1:0` (metrics and the audit
//!    trail on, as deployed) and creates [`KEYS`] deploy keys for one app
//!    with `miren auth key create -o json` (a client id gets
//!    `coordinator::oauth::GRANTS_PER_CLIENT_BURST` tokens at once and then
//!    20 a second, so one key alone would measure the rate limit);
//! 2. from this process, four keep-alive HTTPS connections per core
//!    (reqwest, one connection per client, the cluster CA pinned like the
//!    CLI does), each posting `grant_type=client_credentials&scope=app:web`
//!    with HTTP Basic, cycling through its share of the keys; warm-up,
//!    then a fixed time, counting 200 answers with an access token;
//! 3. measures raw aws-lc-rs RSA-2048 PKCS#1 SHA-256 signing on every core
//!    (`common/raw_sign.rs`, shared with the tokens_endpoint bench), in
//!    slices interleaved with the grant phase's;
//! 4. prints grants/s, raw signs/s and their ratio against the target.
//!    Timings are reported, never asserted.
//!
//! The coordinator and this client share the cores; the raw rate has them
//! to itself. Under `cargo test --benches` (no `--bench` argument) a quick
//! pass with small counts shows the bench still works (skipped without the
//! binary).

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use integration_tests::{miren, temp, Server};
use serde_json::Value;

#[allow(dead_code)]
mod common;
#[path = "common/raw_sign.rs"]
mod raw_sign;
use raw_sign::raw_sign;

const TARGET: f64 = 0.6;
/// Deploy keys the grants are spread over.
const KEYS: usize = 64;
const PER_CORE: usize = 4;
/// Slices the grant and raw phases are interleaved in.
const SLICES: u32 = 3;

struct Settings {
    warmup: Duration,
    grants: Duration,
    sign: Duration,
    keys: usize,
}

fn main() -> std::process::ExitCode {
    let benching = std::env::args().any(|a| a == "--bench");
    let s = if benching {
        Settings {
            warmup: Duration::from_millis(500),
            grants: Duration::from_secs(5),
            sign: Duration::from_secs(3),
            keys: KEYS,
        }
    } else {
        Settings {
            warmup: Duration::from_millis(100),
            grants: Duration::from_millis(500),
            sign: Duration::from_millis(300),
            keys: 4,
        }
    };
    common::run_bench(
        "oauth_token",
        benching,
        common::miren_bin().map(drop),
        || bench(&s),
    )
}

/// A keep-alive HTTPS client of the token endpoint, the CA pinned.
fn client(fingerprint: identity::Fingerprint) -> anyhow::Result<reqwest::blocking::Client> {
    let tls = transport::tls::client_config(
        &transport::tls::ServerTrust::Pinned(fingerprint),
        None,
        &[b"http/1.1"],
    )?;
    Ok(reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls.config)
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()?)
}

#[derive(Default)]
struct Counts {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Grants on one connection until `deadline`, cycling through `keys`.
fn drive(
    client: &reqwest::blocking::Client,
    url: &str,
    keys: &[(String, String)],
    deadline: Instant,
) -> Counts {
    let mut c = Counts::default();
    let mut i = 0;
    while Instant::now() < deadline {
        let (id, secret) = &keys[i % keys.len()];
        i += 1;
        let sent = client
            .post(url)
            .basic_auth(id, Some(secret))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&scope=app%3Aweb")
            .send()
            .and_then(|r| Ok((r.status(), r.bytes()?)));
        match sent {
            Ok((status, body))
                if status.is_success() && body.starts_with(b"{\"access_token\":\"ey") =>
            {
                c.ok += 1
            }
            Ok((status, body)) => {
                c.errors += 1;
                c.first_error
                    .get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            Err(e) => {
                c.errors += 1;
                c.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    c
}

/// `conns` connections at once for `limit`: (counts, wall time).
fn parallel(
    clients: &[reqwest::blocking::Client],
    url: &str,
    keys: &[(String, String)],
    limit: Duration,
) -> (Counts, Duration) {
    let conns = clients.len();
    let barrier = Barrier::new(conns + 1);
    let share = keys.len().div_ceil(conns).max(1);
    thread::scope(|sc| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(n, client)| {
                let mine: Vec<(String, String)> = keys
                    .iter()
                    .cycle()
                    .skip(n * share)
                    .take(share)
                    .cloned()
                    .collect();
                let barrier = &barrier;
                sc.spawn(move || {
                    barrier.wait();
                    drive(client, url, &mine, Instant::now() + limit)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut all = Counts::default();
        for h in handles {
            let c = h.join().unwrap_or_default();
            all.ok += c.ok;
            all.errors += c.errors;
            all.first_error = all.first_error.or(c.first_error);
        }
        (all, t0.elapsed())
    })
}

fn bench(s: &Settings) -> anyhow::Result<()> {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let dir = temp();
    let cfg = dir.path().join("admin.yaml");
    let server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);
    let address: identity::ClusterAddress = server
        .address
        .parse()
        .map_err(|e| anyhow!("cluster address: {e}"))?;
    let fingerprint = address.fingerprint.context("no fingerprint")?;
    // The default issuer is `https://<host:port>`, without a path.
    let url = format!("https://{}/oauth2/token", server.host_port());
    let mut keys = Vec::new();
    for _ in 0..s.keys {
        let run = miren(
            &cfg,
            &["auth", "key", "create", "-a", "web", "-o", "json"],
            &[],
        );
        if !run.ok {
            bail!("auth key create: {}", run.stderr);
        }
        let v: Value = serde_json::from_str(&run.stdout)?;
        keys.push((
            v["client_id"].as_str().context("client_id")?.to_string(),
            v["client_secret"]
                .as_str()
                .context("client_secret")?
                .to_string(),
        ));
    }
    let conns = cores * PER_CORE;
    let clients = (0..conns)
        .map(|_| client(fingerprint))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (warm, _) = parallel(&clients, &url, &keys, s.warmup);
    if let Some(e) = warm.first_error {
        bail!("warm-up failed: {e}");
    }
    // Grants and raw signing alternate in slices, so that load from
    // elsewhere on the machine weighs on both alike.
    let (mut grants, mut wall) = (Counts::default(), Duration::ZERO);
    let (mut signs, mut sign_wall) = (0u64, Duration::ZERO);
    for _ in 0..SLICES {
        let (c, w) = parallel(&clients, &url, &keys, s.grants / SLICES);
        grants.ok += c.ok;
        grants.errors += c.errors;
        grants.first_error = grants.first_error.or(c.first_error);
        wall += w;
        let (n, w) = raw_sign(cores, s.sign / SLICES)?;
        signs += n;
        sign_wall += w;
    }
    drop(clients);
    let (_, _stderr) = server.stop();
    let rate = grants.ok as f64 / wall.as_secs_f64();
    let raw = signs as f64 / sign_wall.as_secs_f64();
    let ratio = rate / raw;
    println!(
        "oauth_token: {cores} cores, {conns} keep-alive HTTPS connections, {} deploy keys",
        keys.len()
    );
    println!(
        "  client_credentials grants: {rate:>9.0}/s ({} in {:.2}s, {} errors{})",
        grants.ok,
        wall.as_secs_f64(),
        grants.errors,
        grants
            .first_error
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );
    println!("  raw RSA-2048 sign:         {raw:>9.0}/s (all cores)");
    println!(
        "  grants / raw sign:         {ratio:>9.2}  (target >= {TARGET:.2}: {})",
        if ratio >= TARGET { "met" } else { "NOT met" }
    );
    Ok(())
}
