//! Issue 18, item 2 (and item 3's rotation test): coordinators that share
//! a cluster on etcd share its secrets, sealed, and join with a code.
//!
//! Real processes against a three-member etcd on loopback:
//! - a coordinator joins with `miren cluster coordinator-code` and serves
//!   the first one's issuer, discovery document and JWKS; a reused, an
//!   expired and a runner code are refused and change nothing, as is a code
//!   for a prefix that holds no cluster; a joined data dir needs no code;
//! - tokens minted through either verify with PyJWT against the other's
//!   JWKS; an operator's rotation through one shows in the other's JWKS;
//! - a coordinator that ran before the secrets moved to etcd publishes
//!   them sealed and keeps none of them in the clear, in etcd or on disk;
//! - the leader's scheduled rotation shows in every JWKS, and once the
//!   leader is SIGKILLed the survivor rotates.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::etcd::{join_coordinator, second_coordinator, EtcdCluster};
use integration_tests::{miren, outside_verify_at, temp, wait_for, Cluster, Server};

/// `https://host:port` of a coordinator's discovery and JWKS listener.
fn https_of(server: &Server) -> String {
    format!(
        "https://{}",
        server.printed_address("HTTPS (discovery, JWKS): ")
    )
}

/// The discovery document and JWKS `server` serves for `issuer`.
fn documents(issuer: &str, server: &Server) -> (serde_json::Value, serde_json::Value) {
    // Fetching happens before the token is looked at: a dummy one will do.
    let (_, report) = outside_verify_at(
        issuer,
        Some(&https_of(server)),
        &server.ca_file(),
        "miren",
        "x.y.z",
    );
    (report["discovery"].clone(), report["jwks"].clone())
}

fn kids(jwks: &serde_json::Value) -> BTreeSet<String> {
    jwks["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k["kid"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn mint(cfg: &Path, sandbox: &str) -> String {
    let run = miren(
        cfg,
        &["identity", "token", "--app", "web", "--sandbox", sandbox],
        &[],
    );
    assert!(run.ok, "{run:?}");
    run.stdout.trim().to_string()
}

/// `miren server --etcd … --join CODE` into `data`, expected to fail:
/// its error output.
fn refused_join(dir: &Path, data: &Path, code: &str, etcd_args: &[&str]) -> String {
    let mut args = etcd_args.to_vec();
    args.extend(["--join", code]);
    match Server::try_start(data, &dir.join("refused.yaml"), "127.0.0.1:0", &args) {
        Ok(_) => panic!("a join with {code:?} must be refused"),
        Err(e) => e,
    }
}

#[test]
fn a_coordinator_joins_with_a_code_and_serves_the_same_issuer_and_keys() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let etcd_args = ["--etcd", endpoints.as_str()];
    let c = Cluster::start(0, &etcd_args);
    let a = c.server();

    // Codes that must not admit anyone, each refused with nothing written.
    let runner_code = c.miren(&["runner", "token", "create"]);
    assert!(runner_code.ok, "{runner_code:?}");
    let nowhere = dir.path().join("refused-data");
    let err = refused_join(dir.path(), &nowhere, runner_code.stdout.trim(), &etcd_args);
    assert!(
        err.contains("this join code is for `miren runner --join`"),
        "{err}"
    );
    assert!(!nowhere.exists(), "a refused join leaves no data dir");
    let short = c.miren(&["cluster", "coordinator-code", "--ttl", "1s"]);
    assert!(short.ok, "{short:?}");
    std::thread::sleep(Duration::from_millis(2100));
    let err = refused_join(dir.path(), &nowhere, short.stdout.trim(), &etcd_args);
    assert!(err.contains("join code has expired"), "{err}");
    assert!(!nowhere.exists());
    // A code for a prefix that holds no cluster is refused before it is
    // spent: it still admits a coordinator afterwards.
    let code = c.miren(&["cluster", "coordinator-code"]);
    assert!(code.ok, "{code:?}");
    let code = code.stdout.trim().to_string();
    assert!(code.starts_with("mrenc_"), "{code}");
    let wrong_prefix = ["--etcd", endpoints.as_str(), "--etcd-prefix", "/nobody/"];
    let err = refused_join(dir.path(), &nowhere, &code, &wrong_prefix);
    assert!(err.contains("holds no cluster"), "{err}");
    assert!(!nowhere.exists());

    // A new data dir started on the cluster's prefix without a code would
    // make another cluster there: refused, saying how to join.
    match Server::try_start(
        &nowhere,
        &dir.path().join("refused.yaml"),
        "127.0.0.1:0",
        &etcd_args,
    ) {
        Ok(_) => panic!("a fresh data dir on a claimed prefix must be refused"),
        Err(e) => assert!(e.contains("--join CODE"), "{e}"),
    }
    assert!(!nowhere.exists(), "nothing written");

    let mut b_args = etcd_args.to_vec();
    b_args.extend(["--join", code.as_str()]);
    let b_data = dir.path().join("coord-b");
    let b = Server::start(&b_data, &dir.path().join("b.yaml"), "127.0.0.1:0", &b_args);
    assert!(
        !b_data.join("ca.key").exists() && !b_data.join("keys").exists(),
        "the joined data dir keeps no shared secret in the clear"
    );
    // The code is spent.
    let err = refused_join(dir.path(), &nowhere, &code, &etcd_args);
    assert!(err.contains("already been used"), "{err}");
    assert!(!nowhere.exists());

    // The first coordinator's audit trail holds each spent or refused code
    // by its id, and never the code itself.
    let audit = c.miren(&["audit", "-o", "json", "--action", "coordinator.join"]);
    assert!(audit.ok, "{audit:?}");
    let lines: Vec<serde_json::Value> = audit
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line"))
        .collect();
    let outcomes: Vec<&str> = lines.iter().filter_map(|l| l["result"].as_str()).collect();
    assert_eq!(outcomes, ["refused", "ok", "refused"], "{lines:?}");
    assert!(!audit.stdout.contains(&code), "{}", audit.stdout);

    // One issuer, one discovery document, one JWKS.
    let issuer = a.issuer_url();
    assert_eq!(b.issuer_url(), issuer, "one issuer URL for the cluster");
    let (a_doc, a_jwks) = documents(&issuer, a);
    let (b_doc, b_jwks) = documents(&issuer, &b);
    assert_eq!(a_doc["issuer"], issuer.as_str(), "{a_doc}");
    assert_eq!(a_doc, b_doc);
    assert_eq!(a_jwks, b_jwks);

    // Tokens minted through either verify with PyJWT against the other's
    // JWKS.
    let from_a = mint(&c.cfg, "sb-a");
    let from_b = mint(&b.config, "sb-b");
    for (token, at) in [(&from_a, &b), (&from_b, a)] {
        let (ok, report) =
            outside_verify_at(&issuer, Some(&https_of(at)), &at.ca_file(), "miren", token);
        assert!(
            ok,
            "PyJWT refused a token at the other coordinator: {report}"
        );
    }

    // An operator's rotation through the first shows in the second's JWKS.
    let rotated = c.miren(&["identity", "keys", "rotate", "-o", "json"]);
    assert!(rotated.ok, "{rotated:?}");
    let statuses: serde_json::Value = serde_json::from_str(&rotated.stdout).expect("keys json");
    let pending: BTreeSet<String> = statuses
        .as_array()
        .expect("key list")
        .iter()
        .filter(|k| k["state"] == "pending")
        .filter_map(|k| k["kid"].as_str().map(String::from))
        .collect();
    assert_eq!(pending.len(), 1, "{statuses}");
    assert!(
        wait_for(Duration::from_secs(20), || kids(&documents(&issuer, &b).1)
            .is_superset(&pending)),
        "the second coordinator publishes the new key: {}",
        documents(&issuer, &b).1
    );
    // A second rotation while one waits is refused through the other too:
    // they hold one ring.
    let again = miren(&b.config, &["identity", "keys", "rotate"], &[]);
    assert!(!again.ok, "{again:?}");
    assert!(again.stderr.contains("already waiting"), "{again:?}");

    // Started again with --join, the joined data dir needs no code.
    let (stopped, _) = b.stop();
    assert!(stopped);
    let b = Server::start(&b_data, &dir.path().join("b.yaml"), "127.0.0.1:0", &b_args);
    assert_eq!(b.issuer_url(), issuer);
}

#[test]
fn secrets_moved_into_etcd_are_sealed_and_leave_the_data_dir() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let data = dir.path().join("coord");
    let cfg = dir.path().join("c.yaml");
    // A coordinator that ran before its secrets moved to etcd: its data dir
    // holds them in files.
    let before = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let issuer = before.issuer_url();
    let token = mint(&cfg, "sb-1");
    let (stopped, _) = before.stop();
    assert!(stopped);
    let ca_key = std::fs::read_to_string(data.join("ca.key")).expect("ca.key");
    let cookie_key = std::fs::read(data.join("route-oidc.key")).expect("route-oidc.key");
    let signing_keys: Vec<String> = std::fs::read_dir(data.join("keys"))
        .expect("keys/")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pem"))
        .map(|e| std::fs::read_to_string(e.path()).expect("key file"))
        .collect();
    assert!(!signing_keys.is_empty());

    // Started on etcd (another port): the cluster keeps its issuer.
    let after = Server::start(&data, &cfg, "127.0.0.1:0", &["--etcd", &endpoints]);
    assert_eq!(after.issuer_url(), issuer);
    for gone in ["ca.key", "keys", "route-oidc.key", "issuer.json"] {
        assert!(!data.join(gone).exists(), "{gone} left the data dir");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("cluster.key"))
        .expect("cluster.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The keys moved, not replaced: the token minted before verifies.
    let (ok, report) = outside_verify_at(
        &issuer,
        Some(&https_of(&after)),
        &after.ca_file(),
        "miren",
        &token,
    );
    assert!(ok, "{report}");

    // What etcd holds, raw.
    let raw = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint(0)])
        .args(["get", "--prefix", "/miren/"])
        .output()
        .expect("etcdctl (Debian package etcd-client)");
    assert!(raw.status.success());
    let raw = raw.stdout;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("/miren/secret/ca"), "the records are there");
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(!text.contains("PRIVATE KEY"), "no PEM private key in etcd");
    let pem_body = |pem: &str| -> Vec<String> {
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 40)
            .map(String::from)
            .collect()
    };
    for line in pem_body(&ca_key) {
        assert!(!text.contains(&line), "a line of the CA key is in etcd");
    }
    for key in &signing_keys {
        for line in pem_body(key) {
            assert!(!text.contains(&line), "a line of a signing key is in etcd");
        }
    }
    assert!(!contains(&cookie_key), "the cookie key is in etcd");
    drop(after);
}

#[test]
fn the_leaders_rotation_reaches_every_coordinator_and_survives_its_death() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let args = [
        "--etcd",
        endpoints.as_str(),
        "--signing-key-rotation",
        "6s",
        "--jwks-max-age",
        "1s",
    ];
    let mut c = Cluster::start(0, &args);
    let issuer = c.server().issuer_url();
    let b = second_coordinator(&c, dir.path(), &args);
    let c3 = join_coordinator(&c.cfg, dir.path(), "coord-c", &args);

    // The first leads and rotates; every coordinator publishes its keys.
    let first = kids(&documents(&issuer, &b).1);
    let grown = wait_for(Duration::from_secs(60), || {
        let (a, b_now, c_now) = (
            kids(&documents(&issuer, c.server()).1),
            kids(&documents(&issuer, &b).1),
            kids(&documents(&issuer, &c3).1),
        );
        a == b_now && b_now == c_now && !b_now.is_subset(&first)
    });
    assert!(
        grown,
        "the leader's rotation in every JWKS: {:?} {:?}",
        documents(&issuer, &b).1,
        documents(&issuer, &c3).1
    );

    // The leader dies. One of the others leads and goes on rotating; the
    // two survivors keep publishing the same keys.
    c.kill_coordinator();
    let before = kids(&documents(&issuer, &b).1);
    let rotated = wait_for(Duration::from_secs(90), || {
        let (b_now, c_now) = (
            kids(&documents(&issuer, &b).1),
            kids(&documents(&issuer, &c3).1),
        );
        b_now == c_now && !b_now.is_subset(&before)
    });
    assert!(
        rotated,
        "a survivor rotates after the leader's death: {:?} (before {before:?})",
        documents(&issuer, &b).1
    );
    let status = miren(&b.config, &["cluster", "status", "-o", "json"], &[]);
    assert!(status.ok, "{status:?}");
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    let leaders = status["coordinators"]
        .as_array()
        .map(|l| l.iter().filter(|x| x["leader"] == true).count())
        .unwrap_or_default();
    assert_eq!(leaders, 1, "{status}");

    // Tokens of the survivors verify at each other's JWKS.
    let from_b = mint(&b.config, "sb-b");
    let from_c = mint(&c3.config, "sb-c");
    for (token, at) in [(&from_b, &c3), (&from_c, &b)] {
        let (ok, report) =
            outside_verify_at(&issuer, Some(&https_of(at)), &at.ca_file(), "miren", token);
        assert!(ok, "{report}");
    }
}
