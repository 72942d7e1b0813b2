//! Issue 18: several coordinators on a three-member etcd, each a real
//! process, and a runner that holds a session with every one of them.
//! Losing the coordinator a runner mints through costs its sandboxes no
//! token and the survivor's ingress no request; a runner removed through
//! one coordinator is cut off by all; a coordinator added later is learned
//! by the runner; losing etcd altogether leaves tokens and the ingress
//! working and makes writes fail clearly until it is back; a CI binding
//! removed through one coordinator refuses the next login through another.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::etcd::{second_coordinator, EtcdCluster};
use integration_tests::{
    free_port, http_get, http_get_host, miren, miren_within, outside_verify, runner_status,
    runners, tail, temp, wait_for, Cluster, PythonIssuer, Run, RunnerProc, Server,
};

/// The bearer the test OIDC issuer's `/token` wants.
const CI_BEARER: &str = "request-secret";

/// Runner flags: sandboxes as plain processes, and a per-sandbox rate of
/// new tokens above what the token loop asks (10 a second).
const RUNNER_ARGS: [&str; 6] = [
    "--isolation",
    "none",
    "--token-miss-burst",
    "64",
    "--token-miss-rate",
    "40",
];

/// An app whose sandbox fetches a token with a fresh audience every 100 ms
/// and counts failures (`fixtures/token-loop-app`).
fn token_loop_app(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(format!("{name}-src"));
    std::fs::create_dir_all(dir.join(".miren")).expect("app dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/token-loop-app/loop.py");
    std::fs::copy(fixture, dir.join("loop.py")).expect("copy the fixture");
    let toml =
        format!("name = \"{name}\"\n[services.web]\ncommand = 'python3 loop.py'\ninstances = 1\n");
    std::fs::write(dir.join(".miren/app.toml"), toml).expect("app.toml");
    dir
}

/// `miren deploy` of `dir` as `app` through the coordinator of `cfg`.
fn deploy(cfg: &Path, app: &str, dir: &Path) -> Run {
    let dir = dir.to_str().expect("utf-8 path");
    miren_within(
        cfg,
        &["deploy", "--dir", dir, "-a", app],
        &[],
        Duration::from_secs(180),
    )
}

/// The sandbox's token loop counters, read through `ingress` (`None` while
/// it does not answer).
fn loop_stats(ingress: &str, host: &str) -> Option<serde_json::Value> {
    match http_get_host(ingress, host, "/stats") {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Lets pipelines of `issuer` whose subject matches `subject` deploy `app`
/// (added through the coordinator of `cfg`).
fn bind_pipeline(cfg: &Path, app: &str, issuer: &PythonIssuer, subject: &str) -> Run {
    let run = miren(
        cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            app,
            "--issuer",
            &issuer.url(),
            "--subject",
            subject,
        ],
        &[],
    );
    assert!(run.ok, "{run:?}");
    run
}

/// A three-member etcd, a first coordinator (the fixture's) and a second
/// one with an ingress of its own, each listing the other.
struct TwoCoordinators {
    c: Cluster,
    b: Option<Server>,
    b_ingress: String,
    /// Kept running for the coordinators (dropped last).
    _etcd: EtcdCluster,
}

impl TwoCoordinators {
    /// Both coordinators with `extra` server flags.
    fn start(dir: &Path, extra: &[&str]) -> TwoCoordinators {
        let etcd = EtcdCluster::start(dir, 3);
        let endpoints = etcd.endpoints();
        let mut c_args = vec!["--etcd", endpoints.as_str()];
        c_args.extend(extra);
        let c = Cluster::start(0, &c_args);
        let b_ingress = format!("127.0.0.1:{}", free_port());
        let mut b_args = vec!["--etcd", endpoints.as_str(), "--http-listen", &b_ingress];
        b_args.extend(extra);
        let b = second_coordinator(&c, dir, &b_args);
        let b_addr = b.host_port().to_string();
        assert!(
            wait_for(Duration::from_secs(30), || {
                let e = c.miren(&["cluster", "export-address"]);
                e.ok && e.stdout.contains(&b_addr)
            }),
            "the first coordinator never listed the second"
        );
        TwoCoordinators {
            c,
            b: Some(b),
            b_ingress,
            _etcd: etcd,
        }
    }

    fn b(&self) -> &Server {
        self.b.as_ref().expect("the second coordinator runs")
    }

    fn b_cfg(&self) -> PathBuf {
        self.b().config.clone()
    }

    /// A runner joined with a code from the first coordinator (which names
    /// both), connected to both.
    fn runner(&self, dir: &Path) -> (RunnerProc, String) {
        let code = self.c.miren(&["runner", "token", "create"]);
        assert!(code.ok, "{code:?}");
        let r = RunnerProc::start(dir, Some(code.stdout.trim()), &RUNNER_ARGS);
        assert!(
            wait_for(Duration::from_secs(60), || r.runner_id().is_some()),
            "{}",
            r.output()
        );
        let id = r.runner_id().expect("joined");
        let b_cfg = self.b_cfg();
        assert!(
            wait_for(Duration::from_secs(60), || runner_status(&self.c.cfg, &id)
                .as_deref()
                == Some("ready")
                && runner_status(&b_cfg, &id).as_deref() == Some("ready")),
            "the runner is not connected to both coordinators: {:?} / {:?}\n{}",
            runners(&self.c.cfg),
            runners(&b_cfg),
            tail(&r.output(), 30)
        );
        (r, id)
    }
}

#[test]
fn losing_the_coordinator_a_runner_mints_through_costs_no_token_and_no_request() {
    let dir = temp();
    // A GitHub-shaped OIDC issuer on loopback, for the CI deploy at the end.
    let issuer = PythonIssuer::start(dir.path(), CI_BEARER);
    let ca = issuer.ca.to_str().expect("utf-8 path").to_string();
    let mut t = TwoCoordinators::start(
        dir.path(),
        &["--oidc-allow-loopback-issuers", "--oidc-ca-file", &ca],
    );
    let (runner, _id) = t.runner(&dir.path().join("r0"));
    let b_cfg = t.b_cfg();

    // Deployed and routed through the second coordinator; the leader's
    // loop (whichever leads) starts it, and both ingresses serve it.
    let app = format!("loop-{}", std::process::id());
    let src = token_loop_app(dir.path(), &app);
    let run = deploy(&b_cfg, &app, &src);
    assert!(run.ok, "deploy through the second coordinator: {run:?}");
    let host = format!("{app}.test");
    assert!(miren(&b_cfg, &["route", "set", &host, "-a", &app], &[]).ok);
    for ingress in [t.c.ingress.clone(), t.b_ingress.clone()] {
        assert!(
            wait_for(Duration::from_secs(60), || loop_stats(&ingress, &host)
                .is_some_and(|s| s["ok"].as_u64() > Some(5))),
            "the app does not serve through {ingress}: {:?}\n{}",
            http_get_host(&ingress, &host, "/stats"),
            tail(&runner.output(), 30)
        );
    }
    let before = loop_stats(&t.c.ingress, &host).expect("stats");
    assert_eq!(before["failed"], 0, "{before}");
    // The app's pipeline may deploy it.
    bind_pipeline(&t.c.cfg, &app, &issuer, "repo:acme/loop:*");
    let addresses = (t.c.server().address.clone(), t.b().address.clone());

    // Which coordinator the runner mints through; the other survives.
    assert!(
        wait_for(Duration::from_secs(10), || runner.mints_through().is_some()),
        "the runner never said where it mints: {}",
        runner.output()
    );
    let minting = runner.mints_through().expect("said");
    let b_addr = t.b().host_port().to_string();
    let (survivor_address, survivor_ingress) = if minting == b_addr {
        (addresses.0.clone(), t.c.ingress.clone())
    } else {
        assert_eq!(minting, t.c.listen, "mints through neither coordinator");
        (addresses.1.clone(), t.b_ingress.clone())
    };

    // A client loads the survivor's ingress all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, served, refused) = (stop.clone(), served.clone(), refused.clone());
        let (ingress, host) = (survivor_ingress.clone(), host.clone());
        std::thread::spawn(move || {
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                match http_get_host(&ingress, &host, "/") {
                    Ok((200, _)) => served.fetch_add(1, Ordering::Relaxed),
                    other => {
                        last_error = Some(format!("{other:?}"));
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(50));
            }
            last_error
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // kill -9 of the coordinator the runner mints through.
    if minting == b_addr {
        t.b.take().expect("runs").kill();
    } else {
        t.c.kill_coordinator();
    }
    let at_kill = loop_stats(&survivor_ingress, &host).expect("stats at the kill");
    // The loop keeps minting, through the survivor now.
    let minted_after = |n: u64| {
        loop_stats(&survivor_ingress, &host)
            .is_some_and(|s| s["ok"].as_u64() >= Some(at_kill["ok"].as_u64().unwrap_or(0) + n))
    };
    assert!(
        wait_for(Duration::from_secs(30), || minted_after(50)),
        "the token loop stalled after the kill: {:?}\n{}",
        loop_stats(&survivor_ingress, &host),
        tail(&runner.output(), 30)
    );
    stop.store(true, Ordering::Relaxed);
    let last_error = client.join().expect("client thread");
    let after = loop_stats(&survivor_ingress, &host).expect("stats");
    assert_eq!(
        after["failed"],
        0,
        "token fetches failed across the failover: {after}\n{}",
        tail(&runner.output(), 30)
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "the survivor's ingress failed requests ({} served); last: {last_error:?}\nrunner: {}",
        served.load(Ordering::Relaxed),
        tail(&runner.output(), 30)
    );
    assert!(served.load(Ordering::Relaxed) > 20);
    assert!(
        runner.mints_through().is_some_and(|m| m != minting),
        "the runner did not switch its minting: {}",
        tail(&runner.output(), 20)
    );

    // The survivor takes the lead, and the app's pipeline deploys a new
    // version through it with its OIDC token alone.
    std::fs::write(src.join("v2.txt"), "2").expect("change the app");
    let ci_deploy = || {
        issuer.ci_miren(
            dir.path(),
            &survivor_address,
            &app,
            "repository=acme/loop&event_name=push&ref=refs/heads/main",
            &["deploy", "--dir", src.to_str().expect("utf-8 path")],
        )
    };
    let mut last = (false, String::new(), String::new());
    assert!(
        wait_for(Duration::from_secs(120), || {
            last = ci_deploy();
            last.0
        }),
        "CI deploy through the survivor failed: {last:?}"
    );
    assert!(last.1.contains(&format!("Deployed {app} v")), "{last:?}");
    assert!(
        wait_for(Duration::from_secs(60), || loop_stats(
            &survivor_ingress,
            &host
        )
        .is_some()),
        "the new version does not serve"
    );
    drop(t);
}

#[test]
fn coordinators_added_later_are_learned_and_a_removal_anywhere_cuts_a_runner_off() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let c = Cluster::start(0, &["--etcd", &endpoints]);
    // Two runners join while the cluster has one coordinator: they know
    // only it.
    let code = c.miren(&["runner", "token", "create", "--reusable"]);
    assert!(code.ok, "{code:?}");
    let start = |name: &str| {
        let r = RunnerProc::start(
            &dir.path().join(name),
            Some(code.stdout.trim()),
            &RUNNER_ARGS,
        );
        assert!(
            wait_for(Duration::from_secs(60), || r.runner_id().is_some()),
            "{}",
            r.output()
        );
        let id = r.runner_id().expect("joined");
        assert!(
            wait_for(Duration::from_secs(60), || runner_status(&c.cfg, &id)
                .as_deref()
                == Some("ready")),
            "{}",
            r.output()
        );
        (r, id)
    };
    let (learner, learner_id) = start("r-learner");
    let (mut removed, removed_id) = start("r-removed");

    // A second coordinator starts.
    let b = second_coordinator(&c, dir.path(), &["--etcd", &endpoints]);
    let b_addr = b.host_port().to_string();

    // Removed through the new coordinator, which the runner has no session
    // with: the first one closes its session at once, and it stops.
    assert!(
        !removed.output().contains(&format!("connected to {b_addr}")),
        "the runner already has a session with the new coordinator"
    );
    let rm = miren(&b.config, &["runner", "remove", &removed_id], &[]);
    assert!(rm.ok, "{rm:?}");
    let exit = removed.wait_exit(Duration::from_secs(20));
    let out = removed.output();
    assert!(
        exit.is_some_and(|(ok, _)| !ok),
        "the removed runner still runs: {}",
        tail(&out, 20)
    );
    assert!(
        out.contains("removed from the cluster")
            && !out.contains(&format!("connected to {b_addr}")),
        "{out}"
    );

    // The other runner learns the new coordinator and holds a session with
    // it: that coordinator lists it connected.
    assert!(
        wait_for(Duration::from_secs(90), || runner_status(
            &b.config,
            &learner_id
        )
        .as_deref()
            == Some("ready")),
        "the runner never connected to the coordinator added after it joined: {:?}\n{}",
        runners(&b.config),
        tail(&learner.output(), 20)
    );
    assert!(learner
        .output()
        .contains(&format!("Runner learned coordinator {b_addr}")));
    // It keeps the list in its data dir.
    let saved = std::fs::read_to_string(dir.path().join("r-learner/coordinators.json"))
        .expect("coordinators.json");
    assert!(saved.contains(&b_addr), "{saved}");
    drop(b);
    drop(etcd);
}

#[test]
fn without_etcd_tokens_and_ingress_keep_working_and_writes_fail_clearly_until_it_is_back() {
    let dir = temp();
    let mut etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let c = Cluster::start(0, &["--etcd", &endpoints]);
    let code = c.miren(&["runner", "token", "create"]);
    assert!(code.ok, "{code:?}");
    let runner = RunnerProc::start(
        &dir.path().join("r0"),
        Some(code.stdout.trim()),
        &RUNNER_ARGS,
    );
    assert!(wait_for(Duration::from_secs(60), || runner
        .runner_id()
        .is_some_and(
            |id| runner_status(&c.cfg, &id).as_deref() == Some("ready")
        )));
    let app = format!("noetcd-{}", std::process::id());
    let src = token_loop_app(dir.path(), &app);
    let run = c.deploy(&app, &src);
    assert!(run.ok, "{run:?}");
    let host = format!("{app}.test");
    assert!(c.miren(&["route", "set", &host, "-a", &app]).ok);
    assert!(wait_for(Duration::from_secs(60), || loop_stats(
        &c.ingress, &host
    )
    .is_some_and(|s| s["ok"].as_u64() > Some(3))));

    // Every member stopped.
    for i in 0..3 {
        etcd.kill(i);
    }
    let stopped = loop_stats(&c.ingress, &host).expect("stats");
    // Fresh tokens (a new audience each) keep coming, and the ingress
    // serves: the loop goes on without a failure.
    assert!(
        wait_for(Duration::from_secs(30), || loop_stats(&c.ingress, &host)
            .is_some_and(
                |s| s["ok"].as_u64() >= Some(stopped["ok"].as_u64().unwrap_or(0) + 30)
            )),
        "tokens stopped without etcd: {:?}\n{}",
        loop_stats(&c.ingress, &host),
        tail(&runner.output(), 20)
    );
    let during = loop_stats(&c.ingress, &host).expect("stats");
    assert_eq!(during["failed"], 0, "{during}");
    // A fresh token (new audience) verifies with an outside JWT library
    // against the discovery document and JWKS served now.
    let audience = format!("fresh-{}", std::process::id());
    let (status, body) =
        http_get_host(&c.ingress, &host, &format!("/mint?audience={audience}")).expect("mint");
    let minted: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let token = minted["token"].as_str().unwrap_or_default();
    assert!(status == 200 && !token.is_empty(), "{body}");
    let (ok, report) = outside_verify(
        &c.server().issuer_url(),
        &c.server().ca_file(),
        &audience,
        token,
    );
    assert!(ok, "without etcd, the token does not verify: {report}");
    // Asked again: the cached one.
    let again = http_get_host(&c.ingress, &host, &format!("/mint?audience={audience}"));
    assert!(
        matches!(&again, Ok((200, body)) if body.contains(token)),
        "{again:?}"
    );

    // Writes fail with a message that names etcd.
    for args in [
        vec!["runner", "token", "create"],
        vec!["deploy", "--dir", src.to_str().expect("utf-8"), "-a", &app],
        vec!["auth", "ci", "add", "-a", &app, "--github", "acme/noetcd"],
    ] {
        let w = miren_within(&c.cfg, &args, &[], Duration::from_secs(120));
        assert!(!w.ok, "{args:?} succeeded without etcd");
        assert!(w.stderr.contains("etcd"), "{args:?}: {}", w.stderr);
    }

    // Members back: writes work and a deploy completes.
    for i in 0..3 {
        etcd.restart(i);
    }
    for i in 0..3 {
        etcd.wait_member(i);
    }
    assert!(
        wait_for(Duration::from_secs(60), || c
            .miren(&["runner", "token", "create"])
            .ok),
        "writes do not work again: {:?}",
        c.miren(&["runner", "token", "create"])
    );
    std::fs::write(src.join("v2.txt"), "2").expect("change the app");
    let run = c.deploy(&app, &src);
    assert!(run.ok, "deploy after etcd came back: {run:?}");
    assert!(wait_for(Duration::from_secs(60), || loop_stats(
        &c.ingress, &host
    )
    .is_some()));
    let _ = http_get(&c.ingress, "/");
    drop(runner);
}

#[test]
fn a_binding_removed_through_one_coordinator_refuses_the_next_ci_login_through_the_other() {
    let dir = temp();
    let issuer = PythonIssuer::start(dir.path(), CI_BEARER);
    let ca = issuer.ca.to_str().expect("utf-8 path").to_string();
    let t = TwoCoordinators::start(
        dir.path(),
        &["--oidc-allow-loopback-issuers", "--oidc-ca-file", &ca],
    );
    let app = format!("bound-{}", std::process::id());
    // Another repository's binding keeps the issuer known to the cluster,
    // so the refusal names the mismatch rather than an unknown issuer.
    bind_pipeline(&t.c.cfg, &app, &issuer, "repo:acme/other:*");
    let add = bind_pipeline(&t.c.cfg, &app, &issuer, "repo:acme/bound:*");
    // "Added CI authentication binding ID for app …"
    let id = add
        .stdout
        .split_whitespace()
        .nth(4)
        .expect("the binding's id")
        .to_string();
    // A pipeline's login through B: past the binding (the app has no
    // version yet, so status says so, after the login).
    let b_address = t.b().address.clone();
    let ci_status = || {
        issuer.ci_miren(
            dir.path(),
            &b_address,
            &app,
            "repository=acme/bound&event_name=push&ref=refs/heads/main",
            &["app", "status"],
        )
    };
    let refused = |out: &(bool, String, String)| out.2.contains("did not match any CI binding");
    let mut last = ci_status();
    assert!(
        wait_for(Duration::from_secs(30), || {
            last = ci_status();
            last.2.contains("does not exist")
        }),
        "B never matched the binding added through A: {last:?}"
    );
    // Removed through A: B refuses the login (its binding set follows the
    // store by a watch).
    let remove = miren(&t.c.cfg, &["auth", "ci", "remove", &id], &[]);
    assert!(remove.ok, "{remove:?}");
    // Its watch brings the removal within moments; a login that still
    // passes is not a failure, so asking again costs no failure budget.
    let mut out = ci_status();
    let gone = wait_for(Duration::from_secs(5), || {
        out = ci_status();
        refused(&out)
    });
    assert!(
        gone && !out.0,
        "B admits a login on a removed binding: {out:?}"
    );
}
