//! Outbound fetches resolve then check: the coordinator fetches a CI
//! issuer named by a DNS name only when every address the name resolves to
//! is allowed, and connects to those addresses. The name is `localhost`
//! (resolved through /etc/hosts to 127.0.0.1), served by the test issuer,
//! whose certificate names it and which calls itself
//! `https://localhost:<port>` to requests sent to that name.

use std::path::Path;
use std::process::Command;

use integration_tests::{miren, miren_bin, temp, PythonIssuer, Server};

/// The bearer `/token` wants (`ACTIONS_ID_TOKEN_REQUEST_TOKEN`).
const BEARER: &str = "request-secret";

/// Runs `miren app status -a web` the way a GitHub Actions job would, with
/// a token from `issuer_url` (a token for the cluster's audience, minted by
/// the issuer under that name); returns (success, stderr).
fn ci_status(dir: &Path, issuer_url: &str, ca: &Path, cluster: &str) -> (bool, String) {
    let out = Command::new(miren_bin())
        .args(["app", "status", "-a", "web"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("MIREN_CONFIG", dir.join("none.yaml"))
        .env("MIREN_CLUSTER", cluster)
        .env("GITHUB_ACTIONS", "true")
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("{issuer_url}/token?repository=acme/web&event_name=push&ref=refs/heads/main"),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", BEARER)
        .env("SSL_CERT_FILE", ca)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How many times the issuer's JWKS was fetched.
fn jwks_fetches(issuer: &PythonIssuer) -> u64 {
    let out = Command::new("python3")
        .args([
            "-c",
            "import ssl,sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],context=ssl.create_default_context(cafile=sys.argv[2])).read().decode())",
        ])
        .arg(format!("{}/fetches", issuer.url()))
        .arg(&issuer.ca)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["fetches"].as_u64().unwrap()
}

fn add_binding(cfg: &Path, issuer_url: &str) -> integration_tests::Run {
    miren(
        cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            issuer_url,
            "--subject",
            "repo:acme/web:*",
            "--allowed-events",
            "push",
        ],
        &[],
    )
}

#[test]
fn an_issuer_name_resolving_to_loopback_is_fetched_only_when_allowed() {
    let dir = temp();
    let issuer = PythonIssuer::start(dir.path(), BEARER);
    let named = format!("https://localhost:{}", issuer.port);
    let ca = issuer.ca.to_str().unwrap();
    let cfg = dir.path().join("admin.yaml");
    let data = dir.path().join("coord");
    // The app exists for no one: a CI login that worked gets this far.
    let logged_in = |err: &str| err.contains("app \"web\" does not exist");

    // Without the flag a binding naming localhost is refused, and the
    // refusal says which flag allows it.
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &["--oidc-ca-file", ca]);
    let listen = server.host_port().to_string();
    let add = add_binding(&cfg, &named);
    assert!(!add.ok, "{add:?}");
    assert!(
        add.stderr.contains("loopback") && add.stderr.contains("--oidc-allow-loopback-issuers"),
        "{}",
        add.stderr
    );
    let (stopped, _) = server.stop();
    assert!(stopped);

    // With it, the binding is kept and a CI login through the name works:
    // localhost resolved, was checked, and was connected to.
    let server = Server::start(
        &data,
        &cfg,
        &listen,
        &["--oidc-allow-loopback-issuers", "--oidc-ca-file", ca],
    );
    let cluster = server.address.clone();
    let add = add_binding(&cfg, &named);
    assert!(add.ok, "{add:?}");
    let (ok, err) = ci_status(dir.path(), &named, &issuer.ca, &cluster);
    assert!(!ok && logged_in(&err), "{err}");
    let fetched = jwks_fetches(&issuer);
    assert!(fetched >= 1);
    let (stopped, _) = server.stop();
    assert!(stopped);

    // Restarted without the flag, the stored binding still names the
    // issuer, but its name resolves to loopback: the login is refused
    // without any fetch, and the log says which name resolved to what and
    // which flag allows it.
    let server = Server::start(&data, &cfg, &listen, &["--oidc-ca-file", ca]);
    assert_eq!(server.address, cluster);
    let (ok, err) = ci_status(dir.path(), &named, &issuer.ca, &cluster);
    assert!(!ok, "{err}");
    assert!(
        err.contains("OIDC access denied") && !logged_in(&err),
        "{err}"
    );
    assert_eq!(jwks_fetches(&issuer), fetched);
    let (stopped, log) = server.stop();
    assert!(stopped);
    assert!(
        log.contains("localhost resolved to 127.0.0.1")
            && log.contains("loopback")
            && log.contains("--oidc-allow-loopback-issuers"),
        "{log}"
    );

    // An explicit allow-list admits it as well.
    let server = Server::start(
        &data,
        &cfg,
        &listen,
        &["--outbound-allow", "127.0.0.0/8", "--oidc-ca-file", ca],
    );
    let (ok, err) = ci_status(dir.path(), &named, &issuer.ca, &cluster);
    assert!(!ok && logged_in(&err), "{err}");
    assert!(jwks_fetches(&issuer) > fetched);
    drop(server);

    // A malformed range is refused at start with a clear message.
    let bad = Server::try_start(&data, &cfg, &listen, &["--outbound-allow", "10.1.2.3/8"]);
    let Err(msg) = bad else {
        panic!("a server started with --outbound-allow 10.1.2.3/8")
    };
    assert!(msg.contains("did you mean 10.0.0.0/8"), "{msg}");
}
