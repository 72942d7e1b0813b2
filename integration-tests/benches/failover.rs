//! Coordinator failover and minting spread over coordinators, on real
//! processes (issue 18's benchmark).
//!
//! `cargo bench -p integration-tests --bench failover` (build the binary
//! first: `cargo build --release -p cli`; `MIREN_BIN` overrides its
//! location; Debian's `etcd-server` must be installed):
//!
//! 1. starts a three-member etcd on loopback, two coordinators on it (the
//!    second from `integration_tests::etcd::second_coordinator`) and two
//!    runners (`--isolation none`, the per-sandbox miss limit lifted), each
//!    holding a session with both coordinators; runner 1 is started knowing
//!    only the first coordinator and runner 2 only the second, so each
//!    mints through a different one (they learn the other at once and hold
//!    a session with it too);
//! 2. deploys `fixtures/bench-app` twice (one sandbox per runner), whose
//!    `GET /creds` hands out its token endpoint and secret, so this process
//!    asks for tokens as the sandbox would;
//! 3. throughput: fresh audiences (every request a real mint), 4
//!    connections per sandbox for a fixed time, through runner 1 alone
//!    (one coordinator mints) and through both runners at once (two
//!    coordinators mint);
//! 4. failover: for each trial, `kill -9` of the coordinator runner 1 says
//!    it mints through ("Runner mints through HOST:PORT"), then a fresh
//!    audience is asked in a loop until a token comes: the time from the
//!    kill to that token, p50 and p99 over the trials; the killed
//!    coordinator is started again on its data dir and addresses, and the
//!    next trial waits until runner 1 is connected to both again.
//!
//! Figures are printed, never asserted. Under `cargo test --benches` (no
//! `--bench` argument) a quick pass with 3 trials shows the bench still
//! works (skipped without the binary or etcd).

#[allow(dead_code)]
mod common;

use std::io::Write as _;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use integration_tests::etcd::{second_coordinator, EtcdCluster};
use integration_tests::{
    miren, read_response, runner_status, temp, wait_for, Cluster, RunnerProc, Server,
};
use serde_json::Value;

const RUNNER_ARGS: [&str; 6] = [
    "--isolation",
    "none",
    "--token-miss-burst",
    "1000000",
    "--token-miss-rate",
    "1000000",
];
/// Connections per sandbox in the throughput phases.
const CONNS_PER_SANDBOX: usize = 4;
/// How long one failover trial may wait for its token.
const TRIAL_LIMIT: Duration = Duration::from_secs(60);
const READY_LIMIT: Duration = Duration::from_secs(90);

struct Settings {
    trials: usize,
    throughput: Duration,
}

fn main() -> std::process::ExitCode {
    let benching = std::env::args().any(|a| a == "--bench");
    let s = if benching {
        Settings {
            trials: 20,
            throughput: Duration::from_secs(5),
        }
    } else {
        Settings {
            trials: 3,
            throughput: Duration::from_millis(500),
        }
    };
    let etcd_missing = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err();
    let ready = common::miren_bin().and_then(|_| {
        if etcd_missing {
            bail!("etcd is not installed (Debian: etcd-server)");
        }
        Ok(())
    });
    common::run_bench("failover", benching, ready, || bench(&s))
}

/// A sandbox's token endpoint (`host:port`, path) and secret.
#[derive(Clone)]
struct Endpoint {
    host: String,
    path: String,
    secret: String,
}

impl Endpoint {
    /// One token for `audience` (a new connection each time); whether it
    /// came, and what came instead.
    fn token(&self, audience: &str) -> Result<(), String> {
        let mut s = TcpStream::connect(&self.host).map_err(|e| e.to_string())?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let req = format!(
            "GET {}?audience={audience} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.path, self.host, self.secret
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        match read_response(&mut s) {
            Ok((200, _, body)) if body.starts_with("{\"value\":\"ey") => Ok(()),
            Ok((status, _, body)) => Err(format!("{status} {body}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Deploys the bench fixture as `app` and returns its sandbox's runner and
/// token endpoint.
fn deploy(cfg: &Path, app: &str) -> anyhow::Result<(String, Endpoint)> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bench-app");
    let fixture = fixture.to_str().context("utf-8 path")?;
    let run = integration_tests::miren_within(
        cfg,
        &["deploy", "--dir", fixture, "-a", app],
        &[],
        Duration::from_secs(180),
    );
    if !run.ok {
        bail!("deploy {app}: {}{}", run.stdout, run.stderr);
    }
    let status = miren(cfg, &["app", "status", "-a", app, "-o", "json"], &[]);
    let status: Value = serde_json::from_str(&status.stdout).context("app status JSON")?;
    let sandbox = &status["sandboxes"][0];
    let address = sandbox["address"].as_str().context("no sandbox address")?;
    let runner = sandbox["runner"].as_str().unwrap_or_default().to_string();
    let (code, body) = integration_tests::http_get(address, "/creds").context("GET /creds")?;
    if code != 200 {
        bail!("GET /creds answered {code}: {body}");
    }
    let v: Value = serde_json::from_str(&body).context("/creds JSON")?;
    let url = v["url"].as_str().context("no url")?;
    let rest = url.strip_prefix("http://").context("not an http URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((
        runner,
        Endpoint {
            host: host.to_string(),
            path: format!("/{path}"),
            secret: v["secret"].as_str().context("no secret")?.to_string(),
        },
    ))
}

/// Fresh-audience mints through `endpoints` (each with
/// [`CONNS_PER_SANDBOX`] connections) for `time`: tokens a second, and the
/// count of failures.
fn throughput(endpoints: &[Endpoint], time: Duration, tag: &str) -> (f64, u64) {
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|sc| {
        for (e, endpoint) in endpoints.iter().enumerate() {
            for c in 0..CONNS_PER_SANDBOX {
                let (ok, failed) = (&ok, &failed);
                sc.spawn(move || {
                    let mut i = 0u64;
                    while started.elapsed() < time {
                        i += 1;
                        match endpoint.token(&format!("{tag}-{e}-{c}-{i}")) {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
            }
        }
    });
    let wall = started.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / wall,
        failed.load(Ordering::Relaxed),
    )
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Starts a runner on `dir` that knows only `coordinator` (its
/// `coordinators.json`), after joining with `code` once.
fn runner_knowing(dir: &Path, code: &str, coordinator: &str) -> anyhow::Result<RunnerProc> {
    let joined = RunnerProc::start(dir, Some(code), &RUNNER_ARGS);
    if !wait_for(READY_LIMIT, || joined.runner_id().is_some()) {
        bail!("the runner did not join: {}", joined.output());
    }
    drop(joined);
    std::fs::write(
        dir.join("coordinators.json"),
        format!("{{\"coordinators\":[\"{coordinator}\"]}}"),
    )?;
    Ok(RunnerProc::start(dir, None, &RUNNER_ARGS))
}

fn bench(s: &Settings) -> anyhow::Result<()> {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let mut c = Cluster::start(0, &["--etcd", &endpoints]);
    let b_ingress = format!("127.0.0.1:{}", integration_tests::free_port());
    let b_args = ["--etcd", endpoints.as_str(), "--http-listen", &b_ingress];
    let mut b: Option<Server> = Some(second_coordinator(&c, dir.path(), &b_args));
    let (b_data, b_cfg, b_listen) = {
        let b = b.as_ref().context("b")?;
        (
            b.data_dir.clone(),
            b.config.clone(),
            b.host_port().to_string(),
        )
    };
    let c_listen = c.listen.clone();
    let code = c.miren(&["runner", "token", "create", "--reusable"]);
    if !code.ok {
        bail!("runner token create: {code:?}");
    }
    let code = code.stdout.trim().to_string();
    let r1 = runner_knowing(&dir.path().join("r1"), &code, &c_listen)?;
    let r2 = runner_knowing(&dir.path().join("r2"), &code, &b_listen)?;
    let ids = [
        r1.runner_id().context("r1 id")?,
        r2.runner_id().context("r2 id")?,
    ];
    let c_cfg = c.cfg.clone();
    let both_ready = |cfg_b: &Path| {
        ids.iter().all(|id| {
            runner_status(&c_cfg, id).as_deref() == Some("ready")
                && runner_status(cfg_b, id).as_deref() == Some("ready")
        })
    };
    if !wait_for(READY_LIMIT, || both_ready(&b_cfg)) {
        bail!(
            "the runners are not connected to both coordinators:\n{}\n{}",
            r1.output(),
            r2.output()
        );
    }
    // One sandbox per runner: the second app goes where there is none.
    let outputs = || format!("runner 1:\n{}\nrunner 2:\n{}", r1.output(), r2.output());
    let (runner_1, sandbox_1) =
        deploy(&c.cfg, "bench-one").with_context(|| format!("deploy bench-one; {}", outputs()))?;
    let (runner_2, sandbox_2) =
        deploy(&c.cfg, "bench-two").with_context(|| format!("deploy bench-two; {}", outputs()))?;
    sandbox_1.token("warm-1").map_err(|e| anyhow!(e))?;
    sandbox_2.token("warm-2").map_err(|e| anyhow!(e))?;
    let mints = |r: &RunnerProc| r.mints_through().unwrap_or_default();
    println!(
        "runner 1 mints through {}, runner 2 through {}; the sandboxes are on {} and {}",
        mints(&r1),
        mints(&r2),
        &runner_1[..8.min(runner_1.len())],
        &runner_2[..8.min(runner_2.len())]
    );
    // The failover trials follow the runner hosting the first sandbox. The
    // placement spreads the two apps one per runner when both runners are
    // seen ready, but need not (a runner's first report may still be on its
    // way): the runner is found by the sandbox, never assumed.
    let minter = if runner_1 == ids[1] { &r2 } else { &r1 };
    let (followed, others) = (sandbox_1.clone(), vec![sandbox_1, sandbox_2]);

    // Throughput.
    let (one, one_failed) = throughput(std::slice::from_ref(&followed), s.throughput, "one");
    let (two, two_failed) = throughput(&others, s.throughput, "two");
    println!(
        "mint throughput (fresh audience each, {CONNS_PER_SANDBOX} connections per sandbox, {:?}):",
        s.throughput
    );
    let spread = if mints(&r1) != mints(&r2) {
        "two runners, two coordinators minting"
    } else {
        "two runners, ONE coordinator minting"
    };
    let single = "one runner, one coordinator minting";
    println!("  {single:<38}: {one:8.0} tokens/s ({one_failed} failed)");
    println!(
        "  {spread:<38}: {two:8.0} tokens/s ({two_failed} failed), x{:.2}",
        two / one
    );

    // Failover.
    let mut times = Vec::new();
    for trial in 0..s.trials {
        followed
            .token(&format!("before-{trial}"))
            .map_err(|e| anyhow!("trial {trial} before the kill: {e}"))?;
        let target = mints(minter);
        let killed_c = target == c_listen;
        if !killed_c && target != b_listen {
            bail!("the sandbox's runner mints through {target:?}, neither coordinator");
        }
        let t0 = Instant::now();
        if killed_c {
            c.kill_coordinator();
        } else if let Some(server) = b.take() {
            server.kill();
        }
        let mut i = 0u64;
        let took = loop {
            i += 1;
            if followed.token(&format!("after-{trial}-{i}")).is_ok() {
                break t0.elapsed();
            }
            if t0.elapsed() > TRIAL_LIMIT {
                bail!("trial {trial}: no token within {TRIAL_LIMIT:?} of the kill");
            }
        };
        times.push(took);
        // The killed one back, and runner 1 connected to it again.
        if killed_c {
            c.start_coordinator();
        } else {
            b = Some(Server::start(&b_data, &b_cfg, &b_listen, &b_args));
        }
        if !wait_for(READY_LIMIT, || both_ready(&b_cfg)) {
            bail!("trial {trial}: the runners did not reconnect to the restarted coordinator");
        }
    }
    times.sort_unstable();
    println!(
        "failover: kill -9 of the minting coordinator -> next token, {} trials: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        times.len(),
        pct(&times, 50.0).as_secs_f64() * 1e3,
        pct(&times, 99.0).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    drop((r1, r2, b));
    Ok(())
}
