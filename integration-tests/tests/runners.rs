//! Journey 2, runners joining with tokens, on real processes: a coordinator
//! and runners as separate `miren` processes on loopback.

use std::time::Duration;

use integration_tests::{miren, runner_status, runners, temp, wait_for, RunnerProc, Server};

const READY: Duration = Duration::from_secs(30);

fn create_token(cfg: &std::path::Path, args: &[&str]) -> String {
    let mut full = vec!["runner", "token", "create"];
    full.extend_from_slice(args);
    let run = miren(cfg, &full, &[]);
    assert!(run.ok, "{run:?}");
    run.stdout.trim().to_string()
}

fn joined(r: &RunnerProc) -> String {
    assert!(
        wait_for(READY, || r.runner_id().is_some()),
        "runner did not join: {}",
        r.output()
    );
    r.runner_id().unwrap()
}

fn refused_join(dir: &std::path::Path, code: &str) -> String {
    let mut r = RunnerProc::start(dir, Some(code), &[]);
    let (ok, out) = r
        .wait_exit(Duration::from_secs(20))
        .expect("a refused runner must exit");
    assert!(!ok, "join should have been refused: {out}");
    assert!(
        r.runner_id().is_none(),
        "a refused runner saved an identity"
    );
    out
}

#[test]
fn two_runners_join_and_the_registry_tracks_them() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);

    let one_time = create_token(&cfg, &["--label", "zone=a"]);
    let r1 = RunnerProc::start(
        &dir.path().join("r1"),
        Some(&one_time),
        &["--name", "alpha"],
    );
    let id1 = joined(&r1);
    let reusable = create_token(&cfg, &["--reusable", "--name", "pool"]);
    let r2 = RunnerProc::start(
        &dir.path().join("r2"),
        Some(&reusable),
        &["--label", "gpu=no"],
    );
    let id2 = joined(&r2);
    assert_ne!(id1, id2);
    assert!(wait_for(READY, || runner_status(&cfg, &id1).as_deref()
        == Some("ready")
        && runner_status(&cfg, &id2).as_deref() == Some("ready")));

    let list = runners(&cfg);
    let a = list.iter().find(|r| r["id"] == id1.as_str()).unwrap();
    assert_eq!(a["name"], "alpha");
    assert_eq!(a["labels"], serde_json::json!(["zone=a"]));
    assert!(
        a["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(env!("CARGO_PKG_VERSION"))),
        "{a}"
    );
    let b = list.iter().find(|r| r["id"] == id2.as_str()).unwrap();
    assert_eq!(b["name"], "pool");
    assert_eq!(b["labels"], serde_json::json!(["gpu=no"]));
    // Certificates are short-lived: about 7 days.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expires = a["cert_expires_unix"].as_i64().unwrap();
    assert!(
        (expires - now - 7 * 86400).abs() < 600,
        "cert expiry {expires}"
    );
    // The saved identity has a private key that never left the runner (0600).
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir.path().join("r1/identity.pem")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The text listing has the documented columns.
    let table = miren(&cfg, &["runner", "list"], &[]);
    for col in [
        "ID",
        "NAME",
        "STATUS",
        "LABELS",
        "SANDBOXES",
        "LAST SEEN",
        "VERSION",
    ] {
        assert!(table.stdout.contains(col), "{}", table.stdout);
    }

    // One-time code used twice: refused the second time.
    let out = refused_join(&dir.path().join("r3"), &one_time);
    assert!(
        out.contains("join code has already been used or revoked"),
        "{out}"
    );
    // The store kept only a hash: the secret is nowhere in the token list.
    let tokens = miren(&cfg, &["runner", "token", "list", "-o", "json"], &[]);
    let secret_part = &one_time[one_time.len() - 20..];
    assert!(!tokens.stdout.contains(secret_part));
    let tokens: serde_json::Value = serde_json::from_str(&tokens.stdout).unwrap();
    assert!(tokens
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["state"] == "used" && t["uses"] == 1));
    assert!(tokens
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["reusable"] == true && t["uses"] == 1));

    // Cordon shows in the listing and comes back off.
    assert!(miren(&cfg, &["runner", "cordon", "alpha"], &[]).ok);
    let a = runners(&cfg)
        .into_iter()
        .find(|r| r["id"] == id1.as_str())
        .unwrap();
    assert_eq!(a["cordoned"], true);
    assert!(miren(&cfg, &["runner", "uncordon", &id1], &[]).ok);
    let a = runners(&cfg)
        .into_iter()
        .find(|r| r["id"] == id1.as_str())
        .unwrap();
    assert_eq!(a["cordoned"], false);

    // Restarting the coordinator brings both runners back by themselves.
    let port = server.host_port().rsplit(':').next().unwrap().to_string();
    let (ok, err) = server.stop();
    assert!(ok, "{err}");
    let _server = Server::start(
        &dir.path().join("coord"),
        &cfg,
        &format!("127.0.0.1:{port}"),
        &[],
    );
    assert!(
        wait_for(Duration::from_secs(60), || runner_status(&cfg, &id1)
            .as_deref()
            == Some("ready")
            && runner_status(&cfg, &id2).as_deref() == Some("ready")),
        "runners did not come back: {:?}\n{}\n{}",
        runners(&cfg),
        r1.output(),
        r2.output()
    );
}

#[test]
fn expired_revoked_and_malformed_codes_are_refused() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);

    let short = create_token(&cfg, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let out = refused_join(&dir.path().join("r-exp"), &short);
    assert!(out.contains("join code has expired"), "{out}");

    let revoked = create_token(&cfg, &[]);
    let list = miren(&cfg, &["runner", "token", "list", "-o", "json"], &[]);
    let tokens: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["state"] == "valid")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(miren(&cfg, &["runner", "token", "revoke", &id], &[]).ok);
    let out = refused_join(&dir.path().join("r-rev"), &revoked);
    assert!(
        out.contains("join code has already been used or revoked"),
        "{out}"
    );

    let out = refused_join(&dir.path().join("r-bad"), "mren_not-base64-json");
    assert!(out.contains("invalid join code format"), "{out}");
    let out = refused_join(&dir.path().join("r-empty"), "");
    assert!(out.contains("join code is required"), "{out}");

    // A one-time code may not live longer than 168h.
    let long = miren(&cfg, &["runner", "token", "create", "--ttl", "169h"], &[]);
    assert!(!long.ok);
    assert!(long.stderr.contains("168h"), "{}", long.stderr);
    // Without a code a fresh runner says what to do.
    let mut r = RunnerProc::start(&dir.path().join("r-none"), None, &[]);
    let (ok, out) = r.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!ok);
    assert!(out.contains("--join"), "{out}");
}

#[test]
fn code_pointing_at_another_cluster_is_refused_before_the_secret_is_sent() {
    let dir = temp();
    let cfg_a = dir.path().join("a.yaml");
    let cfg_b = dir.path().join("b.yaml");
    let _a = Server::start(&dir.path().join("a"), &cfg_a, "127.0.0.1:0", &[]);
    let b = Server::start(
        &dir.path().join("b"),
        &cfg_b,
        "127.0.0.1:0",
        &["--cluster-name", "b"],
    );
    let code = create_token(&cfg_a, &[]);

    // An attacker redirects the code to cluster B (which it controls).
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut wire: serde_json::Value =
        serde_json::from_slice(&engine.decode(&code["mren_".len()..]).unwrap()).unwrap();
    wire["addr"] = b.host_port().into();
    let redirected = format!("mren_{}", engine.encode(wire.to_string()));

    let out = refused_join(&dir.path().join("r"), &redirected);
    assert!(
        out.contains("TLS certificate fingerprint mismatch"),
        "{out}"
    );
    // B never saw a join: no runner registered there, and A's code is intact.
    assert!(runners(&cfg_b).is_empty());
    let good = RunnerProc::start(&dir.path().join("r-good"), Some(&code), &[]);
    joined(&good);
}

#[test]
fn removed_runner_is_cut_off_and_cannot_reconnect() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);
    let code = create_token(&cfg, &[]);
    let mut r = RunnerProc::start(&dir.path().join("r"), Some(&code), &[]);
    let id = joined(&r);
    assert!(wait_for(READY, || runner_status(&cfg, &id).as_deref()
        == Some("ready")));

    let removed = miren(&cfg, &["runner", "remove", &id], &[]);
    assert!(removed.ok, "{removed:?}");
    let (ok, out) = r
        .wait_exit(Duration::from_secs(20))
        .expect("a removed runner is disconnected at once");
    assert!(!ok);
    assert!(out.contains("removed from the cluster"), "{out}");
    assert!(runners(&cfg).is_empty());

    // Its certificate no longer opens a session.
    let mut again = RunnerProc::start(&dir.path().join("r"), None, &[]);
    let (ok, out) = again.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "the removed runner must not stay connected:\n{}",
            again.output()
        )
    });
    assert!(!ok);
    assert!(out.contains("removed"), "{out}");
    // It knows at the first attempt, from the connection's close reason,
    // rather than retrying while the refusal reads as a lost connection.
    assert!(!out.contains("reconnecting"), "{out}");
    let unknown = miren(&cfg, &["runner", "remove", &id], &[]);
    assert!(!unknown.ok);
    assert!(unknown.stderr.contains("no runner"), "{}", unknown.stderr);
}

#[test]
fn certificates_are_renewed_and_a_duplicate_runner_id_is_refused() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(
        &dir.path().join("coord"),
        &cfg,
        "127.0.0.1:0",
        &["--runner-cert-validity", "20s"],
    );
    let code = create_token(&cfg, &[]);
    let r = RunnerProc::start(&dir.path().join("r"), Some(&code), &[]);
    let id = joined(&r);
    assert!(wait_for(READY, || runner_status(&cfg, &id).as_deref()
        == Some("ready")));
    let expiry = |cfg: &std::path::Path| {
        runners(cfg)
            .into_iter()
            .find(|x| x["id"] == id.as_str())
            .and_then(|x| x["cert_expires_unix"].as_i64())
            .unwrap_or(0)
    };
    let first = expiry(&cfg);
    let pem_before = std::fs::read_to_string(dir.path().join("r/identity.pem")).unwrap();
    assert!(
        wait_for(Duration::from_secs(40), || expiry(&cfg) > first),
        "certificate not renewed: {}",
        r.output()
    );
    let pem_after = std::fs::read_to_string(dir.path().join("r/identity.pem")).unwrap();
    assert_ne!(
        pem_before, pem_after,
        "renewal must replace the saved identity"
    );
    assert!(wait_for(READY, || runner_status(&cfg, &id).as_deref()
        == Some("ready")));

    // A copy of the runner's identity cannot open a second session.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["runner.json", "identity.pem", "ca.crt"] {
        std::fs::copy(dir.path().join("r").join(f), copy.join(f)).unwrap();
    }
    let dup = RunnerProc::start(&copy, None, &[]);
    assert!(
        wait_for(Duration::from_secs(20), || dup
            .output()
            .contains("duplicate runner id")),
        "{}",
        dup.output()
    );
}

#[test]
fn a_killed_runner_started_again_at_once_takes_its_dead_sessions_place() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);
    let code = create_token(&cfg, &[]);
    let data = dir.path().join("r");
    let first = RunnerProc::start_ready(&cfg, &data, &code, &[]);
    let id = joined(&first);

    // SIGKILL: no goodbye. Its connection has not timed out and its last
    // heartbeat is recent, so the coordinator still counts it alive when
    // the same runner comes back on its data dir (systemd's restart).
    first.kill();
    let again = RunnerProc::start(&data, None, &[]);
    assert!(
        wait_for(READY, || again.output().contains("connected to")),
        "the restarted runner never connected:\n{}",
        again.output()
    );
    // The dead session did not answer the coordinator's probe, so the new
    // one took its place at its first try rather than being refused as a
    // duplicate until the dead one timed out.
    assert!(
        !again.output().contains("duplicate runner id"),
        "the runner restarted after SIGKILL was refused as a duplicate of its dead self:\n{}",
        again.output()
    );
    assert!(wait_for(READY, || runner_status(&cfg, &id).as_deref()
        == Some("ready")));
}

#[test]
fn a_stopped_runner_hangs_up_so_that_it_is_down_at_once_and_its_restart_is_not_a_duplicate() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);
    let code = create_token(&cfg, &[]);
    let data = dir.path().join("r");
    let first = RunnerProc::start_ready(&cfg, &data, &code, &[]);
    let id = joined(&first);

    // SIGTERM (the fixture's drop): the runner closes its connections
    // before it exits, so the coordinator does not go on counting it ready
    // until the silent session times out.
    drop(first);
    let status = runner_status(&cfg, &id);
    assert_ne!(
        status.as_deref(),
        Some("ready"),
        "a runner that said goodbye is still shown ready"
    );

    // Started again on its data dir, it takes its place at the first try.
    let again = RunnerProc::start(&data, None, &[]);
    assert!(
        wait_for(READY, || again.output().contains("connected to")),
        "the restarted runner never connected:\n{}",
        again.output()
    );
    assert!(
        !again.output().contains("duplicate runner id"),
        "the restarted runner was refused as a duplicate of its stopped self:\n{}",
        again.output()
    );
    assert!(wait_for(READY, || runner_status(&cfg, &id).as_deref()
        == Some("ready")));
}
