//! Journey 3: a CI pipeline deploys with its OIDC token and no stored secret,
//! against a test issuer shaped like GitHub Actions (our own fixture on
//! loopback over HTTPS). Everything else that presents a token is refused
//! with a message that says why.

use std::path::Path;
use std::process::Command;

use integration_tests::{ci_add, miren, miren_bin, temp, PythonIssuer, RunnerProc, Server};

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

#[test]
fn pipeline_deploys_with_its_oidc_token_and_everything_else_is_refused() {
    let dir = temp();
    let issuer = PythonIssuer::start(dir.path(), BEARER);
    let server = Server::start_trusting(dir.path(), &issuer, &[]);
    let cfg = server.config.clone();
    let cluster = server.address.clone();
    // The pipeline's CLI, with the test's bearer.
    let ci = |app: &str, query: &str, args: &[&str]| {
        issuer.ci_miren(dir.path(), &cluster, app, query, args)
    };
    let code = miren(&cfg, &["runner", "token", "create"], &[]);
    let _runner = RunnerProc::start_ready(
        &cfg,
        &dir.path().join("r"),
        code.stdout.trim(),
        &["--isolation", "none"],
    );

    let add = ci_add(
        &cfg,
        "web",
        &[
            "--issuer",
            &issuer.url(),
            "--subject",
            "repo:acme/web:*",
            "--allowed-events",
            "push,workflow_dispatch",
            "--allowed-refs",
            "refs/heads/main,refs/tags/v*",
        ],
    );
    assert!(add.ok, "{add:?}");
    let app_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/example-app");
    let app_dir = app_dir.to_str().unwrap();
    let good = "repository=acme/web&event_name=push&ref=refs/heads/main";

    // The pipeline deploys.
    let (ok, out, err) = ci("web", good, &["deploy", "--dir", app_dir]);
    assert!(ok, "CI deploy failed: {out}\n{err}");
    assert!(out.contains("Deployed web v1"), "{out}");
    let (ok, out, err) = ci("web", good, &["app", "status", "-a", "web", "-o", "json"]);
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
    let (ok, _, err) = ci(
        "web",
        "repository=acme/other&event_name=push&ref=refs/heads/main",
        &["app", "status"],
    );
    assert!(!ok);
    mismatch(&err, "acme/other");
    // A pull_request event.
    let (ok, _, err) = ci(
        "web",
        "repository=acme/web&event_name=pull_request&ref=refs/heads/main",
        &["app", "status"],
    );
    assert!(!ok);
    mismatch(&err, "acme/web");
    // Another branch.
    let (ok, _, err) = ci(
        "web",
        "repository=acme/web&event_name=push&ref=refs/heads/dev",
        &["app", "status"],
    );
    assert!(!ok);
    mismatch(&err, "acme/web");
    // Expired.
    let (ok, _, err) = ci(
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
    let (ok, _, err) = ci(
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
    let (ok, _, err) = ci("api", good, &["app", "status", "-a", "api"]);
    assert!(!ok);
    mismatch(&err, "acme/web");
    // Anything beyond the app's capability.
    for args in [
        vec!["app", "delete", "-a", "web"],
        vec!["auth", "ci", "add", "-a", "web", "--github", "evil/repo"],
        vec!["route", "set", "x.test", "-a", "web"],
    ] {
        let (ok, _, err) = ci("web", good, &args);
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
    let (ok, _, err) = ci("web", good, &["app", "status"]);
    assert!(ok, "after rotation: {err}");
    let after = issuer_get(&issuer, "/fetches")["fetches"].as_u64().unwrap();
    assert_eq!(
        after,
        before + 1,
        "expected exactly one refetch after rotation"
    );

    // 20 tokens with random kids: at most one refetch per minute. (Not
    // more: with the refusals above they stay within the failures one
    // address may have before its logins are slowed down, which the front
    // door test shows.)
    let mut refused = 0;
    for _ in 0..20 {
        let (ok, _, _) = ci("web", &format!("{good}&kid=random"), &["app", "status"]);
        if !ok {
            refused += 1;
        }
    }
    assert_eq!(refused, 20, "tokens with unknown kids must be refused");
    let last = issuer_get(&issuer, "/fetches")["fetches"].as_u64().unwrap();
    assert!(
        last <= after + 1,
        "{} refetches for unknown kids",
        last - after
    );
}

/// `miren audit -o json` lines of `action`.
fn audit_lines(cfg: &Path, action: &str) -> Vec<serde_json::Value> {
    let r = miren(cfg, &["audit", "-o", "json", "--action", action], &[]);
    assert!(r.ok, "{r:?}");
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Issue 17, CI identities that cannot drift: a GitHub binding pins the
/// repository and owner ids of its first login; the same names with
/// another id (the repository deleted and recreated by someone else) are
/// refused, naming the drift; ids given when the binding is made refuse a
/// mismatch from the first login; `auth ci test` explains claim by claim.
#[test]
fn a_recreated_repository_is_refused_after_the_first_login_pinned_its_id() {
    let dir = temp();
    let issuer = PythonIssuer::start(dir.path(), BEARER);
    let server = Server::start_trusting(dir.path(), &issuer, &[]);
    let cfg = server.config.clone();
    let cluster = server.address.clone();
    // The pipeline's CLI, with the test's bearer.
    let ci = |app: &str, query: &str, args: &[&str]| {
        issuer.ci_miren(dir.path(), &cluster, app, query, args)
    };
    // A GitHub binding on this (GitHub Enterprise-like) issuer, no ids.
    let add = ci_add(
        &cfg,
        "web",
        &["--github", "acme/web", "--issuer", &issuer.url()],
    );
    assert!(add.ok, "{add:?}");
    assert!(
        add.stdout.contains("pinned at first login"),
        "{}",
        add.stdout
    );
    let list = || -> serde_json::Value {
        let r = miren(
            &cfg,
            &["auth", "ci", "list", "-a", "web", "-o", "json"],
            &[],
        );
        assert!(r.ok, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap()
    };
    let before = list();
    let id = before[0]["id"].as_str().unwrap().to_string();
    assert_eq!(before[0]["ids"], serde_json::json!([]));
    assert_eq!(before[0]["provider"], "github");
    assert!(before[0]["created_unix"].as_i64().unwrap() > 0);

    // The first login pins repository 1000 of owner 2000. (The app has
    // never been deployed: the login succeeds, the status call says so.)
    let original = "repository=acme/web&repository_id=1000&repository_owner_id=2000";
    let (ok, _, err) = ci("web", original, &["app", "status"]);
    assert!(!ok);
    assert!(err.contains("app \"web\" does not exist"), "{err}");
    let pinned = list();
    let ids = pinned[0]["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 2, "{pinned}");
    assert_eq!(ids[0]["claim"], "repository_id");
    assert_eq!(ids[0]["value"], "1000");
    assert!(ids[0]["learned_unix"].as_i64().unwrap() > 0);
    assert_eq!(ids[1]["claim"], "repository_owner_id");
    assert_eq!(ids[1]["value"], "2000");
    let table = miren(&cfg, &["auth", "ci", "list", "-a", "web"], &[]);
    assert!(
        table.stdout.contains("repository_id=1000 (learned"),
        "{}",
        table.stdout
    );
    let audited = audit_lines(&cfg, "binding.pinned");
    assert_eq!(audited.len(), 2, "{audited:?}");
    assert_eq!(audited[0]["binding"], id.as_str());
    assert_eq!(audited[0]["app"], "web");
    assert_eq!(audited[0]["claim"], "repository_id");
    assert_eq!(audited[0]["value"], "1000");
    assert_eq!(audited[0]["actor"], format!("ci:{id}"));

    // The same repository logs in again; nothing more is pinned.
    let (_, _, err) = ci("web", original, &["app", "status"]);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(audit_lines(&cfg, "binding.pinned").len(), 2);

    // Deleted and recreated under the same name by someone else.
    let recreated = "repository=acme/web&repository_id=5555&repository_owner_id=2000";
    let (ok, _, err) = ci("web", recreated, &["app", "status"]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "OIDC token matches CI binding {id} by name, but its repository_id is 5555 where the \
             binding pinned 1000"
        )),
        "{err}"
    );
    let refused = audit_lines(&cfg, "ci.login");
    assert!(
        refused.iter().any(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("id_drift"))),
        "{refused:?}"
    );

    // `auth ci test` explains it claim by claim, without logging in.
    let host_port = cluster.split(';').next().unwrap();
    let token = issuer
        .token(&format!(
            "{recreated}&audience={host_port}&ref=refs/heads/dev"
        ))
        .expect("a token");
    let test = miren(
        &cfg,
        &["auth", "ci", "test", "-a", "web", "--token", &token],
        &[],
    );
    assert!(!test.ok, "a refused token must fail the test: {test:?}");
    assert!(test.stdout.contains("Token: verified"), "{}", test.stdout);
    assert!(
        test.stdout
            .contains(&format!("Binding {id} (github): refuses:")),
        "{}",
        test.stdout
    );
    let row = |claim: &str| row_of(&test.stdout, claim);
    assert_eq!(
        row("repository_id"),
        ["repository_id", "1000", "5555", "MISMATCH"]
    );
    assert_eq!(
        row("repository_owner_id"),
        ["repository_owner_id", "2000", "2000", "match"]
    );
    assert_eq!(
        row("repository"),
        ["repository", "acme/web", "acme/web", "match"]
    );
    assert_eq!(
        row("event_name"),
        ["event_name", "push,workflow_dispatch", "push", "match"]
    );
    assert!(test.stderr.contains("would be refused"), "{}", test.stderr);
    // As JSON, and from stdin.
    let mut child = Command::new(miren_bin())
        .args([
            "auth", "ci", "test", "-a", "web", "--token", "-", "-o", "json",
        ])
        .env("MIREN_CONFIG", &cfg)
        .env_remove("MIREN_CLUSTER")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(token.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_valid"], true);
    assert_eq!(v["accepted"], false);
    assert_eq!(v["bindings"][0]["verdict"], "drift");
    let checks = v["bindings"][0]["checks"].as_array().unwrap();
    let id_check = checks
        .iter()
        .find(|c| c["claim"] == "repository_id")
        .unwrap();
    assert_eq!(id_check["expected"], serde_json::json!(["1000"]));
    assert_eq!(id_check["token_value"], "5555");
    assert_eq!(id_check["outcome"], "mismatch");
    // Testing spent nothing and pinned nothing; no login was recorded.
    assert_eq!(audit_lines(&cfg, "binding.pinned").len(), 2);
    // An expired token: the verification's refusal comes first, with its
    // cause, and the claims are still explained.
    let expired = issuer
        .token(&format!("{original}&audience={host_port}&exp_offset=-3600"))
        .expect("a token");
    let test = miren(
        &cfg,
        &["auth", "ci", "test", "-a", "web", "--token", &expired],
        &[],
    );
    assert!(!test.ok);
    assert!(
        test.stdout.contains(
            "Token: refused before any binding: OIDC access denied: the token has expired"
        ),
        "{}",
        test.stdout
    );
    assert_eq!(
        row_of(&test.stdout, "repository_id"),
        ["repository_id", "1000", "1000", "match"]
    );
    // In a CI job the test fetches the job's own token.
    let out = Command::new(miren_bin())
        .args(["auth", "ci", "test", "-a", "web"])
        .env("MIREN_CONFIG", &cfg)
        .env_remove("MIREN_CLUSTER")
        .env("GITHUB_ACTIONS", "true")
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("{}/token?{original}", issuer.url()),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", BEARER)
        .env("SSL_CERT_FILE", &issuer.ca)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("Binding {id} (github): accepts the token")),
        "{stdout}"
    );

    // Ids given when the binding is made refuse a mismatch at the first login.
    let add = ci_add(
        &cfg,
        "api",
        &[
            "--github",
            "acme/api",
            "--issuer",
            &issuer.url(),
            "--repository-id",
            "77",
            "--owner-id",
            "2000",
        ],
    );
    assert!(add.ok, "{add:?}");
    let api = "repository=acme/api&repository_id=78&repository_owner_id=2000";
    let (ok, _, err) = ci("api", api, &["app", "status"]);
    assert!(!ok);
    assert!(
        err.contains("its repository_id is 78 where the binding pinned 77"),
        "{err}"
    );
    let api = "repository=acme/api&repository_id=77&repository_owner_id=2000";
    let (_, _, err) = ci("api", api, &["app", "status"]);
    assert!(err.contains("app \"api\" does not exist"), "{err}");
    assert_eq!(
        audit_lines(&cfg, "binding.pinned").len(),
        2,
        "given ids are not learned again"
    );
}

/// The cells of the table row whose first cell is `claim`.
fn row_of(stdout: &str, claim: &str) -> Vec<String> {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(claim))
        .unwrap_or_else(|| panic!("no {claim} row in {stdout}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
