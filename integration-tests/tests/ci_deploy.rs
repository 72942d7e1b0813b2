//! Journey 3: a CI pipeline deploys with its OIDC token and no stored secret,
//! against a test issuer shaped like GitHub Actions (our own fixture on
//! loopback over HTTPS). Everything else that presents a token is refused
//! with a message that says why.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{
    miren, miren_bin, runners, temp, wait_for, PythonIssuer, RunnerProc, Server,
};

/// The bearer `/token` wants (`ACTIONS_ID_TOKEN_REQUEST_TOKEN`).
const BEARER: &str = "request-secret";

/// GETs the issuer's `path` (`/rotate`, `/fetches`) as JSON.
fn issuer_get(issuer: &PythonIssuer, path: &str) -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import ssl,sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],context=ssl.create_default_context(cafile=sys.argv[2])).read().decode())",
        ])
        .arg(format!("{}{path}", issuer.url()))
        .arg(&issuer.ca)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the CLI the way a GitHub Actions job would: no config, only
/// MIREN_CLUSTER, MIREN_APP and the Actions variables.
fn ci_miren(
    dir: &Path,
    issuer: &PythonIssuer,
    cluster: &str,
    app: &str,
    query: &str,
    args: &[&str],
) -> (bool, String, String) {
    let out = Command::new(miren_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("MIREN_CONFIG", dir.join("none.yaml"))
        .env("MIREN_CLUSTER", cluster)
        .env("MIREN_APP", app)
        .env("GITHUB_ACTIONS", "true")
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("{}/token?{query}", issuer.url()),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", BEARER)
        .env("SSL_CERT_FILE", &issuer.ca)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pipeline_deploys_with_its_oidc_token_and_everything_else_is_refused() {
    let dir = temp();
    let issuer = PythonIssuer::start(dir.path(), BEARER);
    let cfg = dir.path().join("admin.yaml");
    let server = Server::start(
        &dir.path().join("coord"),
        &cfg,
        "127.0.0.1:0",
        &[
            "--oidc-allow-loopback-issuers",
            "--oidc-ca-file",
            issuer.ca.to_str().unwrap(),
        ],
    );
    let cluster = server.address.clone();
    let code = miren(&cfg, &["runner", "token", "create"], &[]);
    let _runner = RunnerProc::start(
        &dir.path().join("r"),
        Some(code.stdout.trim()),
        &["--isolation", "none"],
    );
    assert!(wait_for(Duration::from_secs(30), || runners(&cfg)
        .iter()
        .any(|r| r["status"] == "ready")));

    let add = miren(
        &cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            &issuer.url(),
            "--subject",
            "repo:acme/web:*",
            "--allowed-events",
            "push,workflow_dispatch",
            "--allowed-refs",
            "refs/heads/main,refs/tags/v*",
        ],
        &[],
    );
    assert!(add.ok, "{add:?}");
    let app_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/example-app");
    let app_dir = app_dir.to_str().unwrap();
    let good = "repository=acme/web&event_name=push&ref=refs/heads/main";

    // The pipeline deploys.
    let (ok, out, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        good,
        &["deploy", "--dir", app_dir],
    );
    assert!(ok, "CI deploy failed: {out}\n{err}");
    assert!(out.contains("Deployed web v1"), "{out}");
    let (ok, out, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        good,
        &["app", "status", "-a", "web", "-o", "json"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"active_version\": \"v1\""), "{out}");

    let mismatch = |err: &str, repo: &str| {
        assert!(
            err.contains(&format!(
                "OIDC token did not match any CI binding (issuer={} subject=",
                issuer.url()
            )) && err.contains(&format!("repository={repo})")),
            "{err}"
        );
    };
    // Another repository.
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        "repository=acme/other&event_name=push&ref=refs/heads/main",
        &["app", "status"],
    );
    assert!(!ok);
    mismatch(&err, "acme/other");
    // A pull_request event.
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        "repository=acme/web&event_name=pull_request&ref=refs/heads/main",
        &["app", "status"],
    );
    assert!(!ok);
    mismatch(&err, "acme/web");
    // Another branch.
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        "repository=acme/web&event_name=push&ref=refs/heads/dev",
        &["app", "status"],
    );
    assert!(!ok);
    mismatch(&err, "acme/web");
    // Expired.
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        &format!("{good}&exp_offset=-3600"),
        &["app", "status"],
    );
    assert!(!ok);
    assert!(
        err.contains("OIDC access denied") && err.contains("expired"),
        "{err}"
    );
    // A token for another cluster's audience.
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        &format!("{good}&aud_override=other.example:8443"),
        &["app", "status"],
    );
    assert!(!ok);
    assert!(
        err.contains("OIDC access denied") && err.contains("audience"),
        "{err}"
    );
    // The token of app web used on app api.
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "api",
        good,
        &["app", "status", "-a", "api"],
    );
    assert!(!ok);
    mismatch(&err, "acme/web");
    // Anything beyond the app's capability.
    for args in [
        vec!["app", "delete", "-a", "web"],
        vec!["auth", "ci", "add", "-a", "web", "--github", "evil/repo"],
        vec!["route", "set", "x.test", "-a", "web"],
    ] {
        let (ok, _, err) = ci_miren(dir.path(), &issuer, &cluster, "web", good, &args);
        assert!(!ok, "{args:?} allowed with a CI token");
        assert!(err.contains("OIDC access denied"), "{args:?}: {err}");
    }
    // Without `permissions: id-token: write` the job has no token variables.
    let out = Command::new(miren_bin())
        .args(["app", "status", "-a", "web"])
        .env_clear()
        .env("MIREN_CONFIG", dir.path().join("none.yaml"))
        .env("MIREN_CLUSTER", &cluster)
        .env("GITHUB_ACTIONS", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("id-token: write"));

    // GitLab without `id_tokens`, and any CI through MIREN_OIDC_TOKEN.
    let run_env = |envs: &[(&str, String)]| {
        let mut cmd = Command::new(miren_bin());
        cmd.args(["app", "status", "-a", "web", "-o", "json"])
            .env_clear()
            .env("MIREN_CONFIG", dir.path().join("none.yaml"))
            .env("MIREN_CLUSTER", &cluster);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run_env(&[("GITLAB_CI", "true".into())]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MIREN_ID_TOKEN"));
    let host_port = cluster.split(';').next().unwrap();
    let token = issuer
        .token(&format!("{good}&audience={host_port}"))
        .expect("a token from the issuer");
    let out = run_env(&[("MIREN_OIDC_TOKEN", token.clone())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_env(&[("GITLAB_CI", "true".into()), ("MIREN_ID_TOKEN", token)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The issuer rotates its key mid-run: one refetch, and it works.
    let before = issuer_get(&issuer, "/fetches")["fetches"].as_u64().unwrap();
    issuer_get(&issuer, "/rotate");
    let (ok, _, err) = ci_miren(
        dir.path(),
        &issuer,
        &cluster,
        "web",
        good,
        &["app", "status"],
    );
    assert!(ok, "after rotation: {err}");
    let after = issuer_get(&issuer, "/fetches")["fetches"].as_u64().unwrap();
    assert_eq!(
        after,
        before + 1,
        "expected exactly one refetch after rotation"
    );

    // 100 tokens with random kids: at most one refetch per minute.
    let mut refused = 0;
    for _ in 0..100 {
        let (ok, _, _) = ci_miren(
            dir.path(),
            &issuer,
            &cluster,
            "web",
            &format!("{good}&kid=random"),
            &["app", "status"],
        );
        if !ok {
            refused += 1;
        }
    }
    assert_eq!(refused, 100, "tokens with unknown kids must be refused");
    let last = issuer_get(&issuer, "/fetches")["fetches"].as_u64().unwrap();
    assert!(
        last <= after + 1,
        "{} refetches for unknown kids",
        last - after
    );
}
