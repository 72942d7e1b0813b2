//! What an operator sees, on real processes: a real Prometheus (Debian's
//! `prometheus`) scrapes the coordinator and a runner after a scripted
//! journey and its query API returns the expected series; `miren audit`
//! holds every decision of the journey with its fields and no token,
//! secret or cookie; a runner's `/readyz` follows its coordinator.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::{
    http_get, http_get_host, miren, miren_bin, temp, wait_for, PythonIssuer, RunnerProc, Server,
};
use serde_json::Value;

/// The bearer the test issuer's `/token` wants.
const BEARER: &str = "ci-request-bearer-secret";
/// A route OIDC client secret: must never reach the trail.
const CLIENT_SECRET: &str = "route-oidc-client-s3cr3t";

/// The Prometheus binary `scripts/test.sh` installs (Debian's package).
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// `Metrics: http://ADDR/metrics` printed by a server or a runner.
fn metrics_addr(lines: &str) -> Option<String> {
    lines.lines().find_map(|l| {
        l.strip_prefix("Metrics: http://")
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
    })
}

/// A cluster after the scripted journey: join, CI binding, deploy, route,
/// route OIDC, a token fetch from inside the sandbox, a refused and an
/// accepted CI login, a key rotation, a cordon.
struct Journey {
    dir: tempfile::TempDir,
    _issuer: PythonIssuer,
    server: Server,
    runner: RunnerProc,
    cfg: PathBuf,
    coordinator_metrics: String,
    runner_metrics: String,
    join_code: String,
    /// Everything secret the journey handled (none may reach the trail).
    secrets: Vec<String>,
    /// The kid `keys rotate` created.
    new_kid: String,
}

fn ci_deploy(dir: &Path, issuer: &PythonIssuer, cluster: &str, query: &str) -> (bool, String) {
    let app_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app");
    let out = Command::new(miren_bin())
        .args(["deploy", "--dir", app_dir.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("MIREN_CONFIG", dir.join("none.yaml"))
        .env("MIREN_CLUSTER", cluster)
        .env("MIREN_APP", "probe")
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
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The per-sandbox token secrets of the runner's sandboxes, read from
/// their environment (plain processes of our user with `--isolation none`).
fn sandbox_token_secrets() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(env) = std::fs::read(p.path().join("environ")) else {
            continue;
        };
        for var in env.split(|b| *b == 0) {
            if let Some(v) = var.strip_prefix(b"MIREN_IDENTITY_TOKEN_SECRET=") {
                let v = String::from_utf8_lossy(v).into_owned();
                if !v.is_empty() && !out.contains(&v) {
                    out.push(v);
                }
            }
        }
    }
    out
}

impl Journey {
    fn run() -> Journey {
        let dir = temp();
        let issuer = PythonIssuer::start(dir.path(), BEARER);
        let server = Server::start_trusting(
            dir.path(),
            &issuer,
            &[
                "--http-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--labs",
                "routeoidc",
            ],
        );
        let cfg = server.config.clone();
        let coordinator_metrics = metrics_addr(&server.stdout.join("\n"))
            .expect("the server printed its metrics address");
        let code = miren(&cfg, &["runner", "token", "create"], &[]);
        assert!(code.ok, "{code:?}");
        let join_code = code.stdout.trim().to_string();
        let runner = RunnerProc::start_ready(
            &cfg,
            &dir.path().join("runner"),
            &join_code,
            &["--isolation", "none", "--metrics-listen", "127.0.0.1:0"],
        );
        let runner_metrics =
            metrics_addr(&runner.output()).expect("the runner printed its metrics address");

        let bind = miren(
            &cfg,
            &[
                "auth",
                "ci",
                "probe",
                "--issuer",
                &issuer.url(),
                "--subject",
                "repo:acme/web:*",
            ],
            &[],
        );
        assert!(bind.ok, "{bind:?}");
        let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app");
        let deploy = miren(
            &cfg,
            &["deploy", "--dir", probe.to_str().unwrap(), "-a", "probe"],
            &[],
        );
        assert!(deploy.ok, "{deploy:?}");
        for host in ["probe.test", "secure.test"] {
            let r = miren(&cfg, &["route", "set", host, "-a", "probe"], &[]);
            assert!(r.ok, "{r:?}");
        }
        let oidc = miren(
            &cfg,
            &[
                "route",
                "oidc",
                "enable",
                "secure.test",
                "--provider-url",
                "https://login.example.com",
                "--client-id",
                "c",
                "--client-secret",
                CLIENT_SECRET,
                "--claim-header",
                "email:X-User-Email",
            ],
            &[],
        );
        assert!(oidc.ok, "{oidc:?}");

        // A token fetch from inside the sandbox (the probe calls its own
        // endpoint: 2 tokens, and 401, 403, 405 and two 400s).
        let ingress = server.printed_address("HTTP ingress: http://");
        let (status, body) = http_get_host(&ingress, "probe.test", "/probe").unwrap();
        assert_eq!(status, 200, "{body}");
        let report: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["two_audiences"]["status"], 200, "{report}");
        let mut secrets = vec![
            join_code.clone(),
            BEARER.to_string(),
            CLIENT_SECRET.to_string(),
        ];
        for k in ["two_audiences", "default"] {
            secrets.push(report[k]["body"]["value"].as_str().unwrap().to_string());
        }
        secrets.extend(sandbox_token_secrets());
        // The admin identity's private key (each line of its PEM body).
        let cfg_yaml: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        for (_, entry) in cfg_yaml["clusters"].as_mapping().unwrap() {
            if let Some(pem) = entry["client_key"].as_str() {
                secrets.extend(
                    pem.lines()
                        .filter(|l| l.len() >= 40 && !l.starts_with("-----"))
                        .map(str::to_string),
                );
            }
        }

        // A refused CI login (another repository), then an accepted one.
        let cluster = server.address.clone();
        let (ok, out) = ci_deploy(dir.path(), &issuer, &cluster, "repository=evil/repo");
        assert!(!ok, "{out}");
        assert!(out.contains("did not match any CI binding"), "{out}");
        let (ok, out) = ci_deploy(dir.path(), &issuer, &cluster, "repository=acme/web");
        assert!(ok, "{out}");

        let rotate = miren(&cfg, &["identity", "keys", "rotate"], &[]);
        assert!(rotate.ok, "{rotate:?}");
        let new_kid = rotate
            .stdout
            .lines()
            .find(|l| l.contains("pending"))
            .and_then(|l| l.split_whitespace().next())
            .expect("a pending key after rotate")
            .to_string();
        let id = runner.runner_id().unwrap();
        assert!(miren(&cfg, &["runner", "cordon", &id], &[]).ok);
        assert!(miren(&cfg, &["runner", "uncordon", &id], &[]).ok);

        Journey {
            dir,
            _issuer: issuer,
            server,
            runner,
            cfg,
            coordinator_metrics,
            runner_metrics,
            join_code,
            secrets,
            new_kid,
        }
    }
}

/// A Prometheus scraping `targets` (job name, host:port) every second.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, &str)]) -> Prometheus {
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, addr };
        assert!(
            wait_for(Duration::from_secs(60), || http_get(&p.addr, "/-/ready")
                .is_ok_and(|(s, _)| s == 200)),
            "prometheus did not become ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        p
    }

    /// The value of an instant query that must return one series.
    fn value(&self, query: &str) -> Option<f64> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let resp = reqwest::blocking::Client::new()
            .post(url)
            .form(&[("query", query)])
            .send()
            .ok()?;
        let v: Value = resp.json().ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (scrapes are every second) for `query` to be `want`.
    fn expect(&self, query: &str, want: f64) {
        let mut last = None;
        let ok = wait_for(Duration::from_secs(30), || {
            last = self.value(query);
            last == Some(want)
        });
        assert!(ok, "{query}: got {last:?}, want {want}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_coordinator_and_a_runner_and_sees_the_journey() {
    if !Path::new(PROMETHEUS).exists() {
        assert!(
            std::env::var_os("MIREN_SKIP_PROMETHEUS_TEST").is_some(),
            "{PROMETHEUS} is missing: run ./scripts/test.sh (it installs Debian's prometheus), or set MIREN_SKIP_PROMETHEUS_TEST=1"
        );
        eprintln!("skipped: no prometheus and MIREN_SKIP_PROMETHEUS_TEST is set");
        return;
    }
    let j = Journey::run();
    let prom = Prometheus::start(
        j.dir.path(),
        &[
            ("coordinator", j.coordinator_metrics.as_str()),
            ("runner", j.runner_metrics.as_str()),
        ],
    );
    prom.expect("up{job=\"coordinator\"}", 1.0);
    prom.expect("up{job=\"runner\"}", 1.0);
    // The CI logins: one refused for want of a binding, one accepted.
    prom.expect(
        "miren_ci_logins_total{result=\"refused\",reason=\"no_binding\"}",
        1.0,
    );
    prom.expect(
        "miren_ci_logins_total{result=\"accepted\",reason=\"ok\"}",
        1.0,
    );
    // The issuer's documents were fetched once (cached afterwards).
    prom.expect(
        "miren_oidc_issuer_fetches_total{document=\"jwks\",result=\"ok\"}",
        1.0,
    );
    // Two deploys (admin, CI), both rolled out.
    prom.expect("miren_rollouts_total{result=\"succeeded\"}", 2.0);
    prom.expect(
        "sum(miren_rpc_calls_total{interface=\"App\",method=\"deploy\",result=\"ok\"})",
        2.0,
    );
    // The sandbox's own requests, by status, at its runner.
    for (status, n) in [
        ("200", 2.0),
        ("400", 2.0),
        ("401", 1.0),
        ("403", 1.0),
        ("405", 1.0),
    ] {
        prom.expect(
            &format!("miren_runner_token_requests_total{{status=\"{status}\"}}"),
            n,
        );
    }
    // Tokens minted for the runner: at least the two asked for (the token
    // files of the sandboxes also get theirs).
    let minted = prom
        .value("miren_workload_tokens_minted_total{via=\"runner\"}")
        .unwrap_or(0.0);
    assert!(minted >= 2.0, "minted {minted}");
    prom.expect("miren_workload_token_mint_seconds_count > 0", minted);
    prom.expect("miren_joins_total{result=\"redeemed\",reason=\"ok\"}", 1.0);
    prom.expect("miren_runners{state=\"ready\"}", 1.0);
    prom.expect("miren_runner_coordinator_connected", 1.0);
    prom.expect("miren_sandboxes{state=\"healthy\"}", 1.0);
    prom.expect("miren_runner_sandboxes{state=\"healthy\"}", 1.0);
    prom.expect(
        "miren_ingress_requests_total{app=\"probe\",status=\"2xx\"}",
        1.0,
    );
    prom.expect("miren_ingress_request_seconds_count{app=\"probe\"}", 1.0);
    // A rotation is pending: the countdown is the publish window (5 min).
    let rotation = prom
        .value("miren_signing_key_rotation_seconds")
        .expect("rotation countdown");
    assert!((0.0..=300.0).contains(&rotation), "{rotation}");
    let cert = prom
        .value("miren_certificate_expiry_seconds{certificate=\"server\"}")
        .expect("certificate countdown");
    assert!(cert > 300.0 * 86_400.0, "{cert}");
    // No label value is a subject, a sandbox id or a token.
    let (_, text) = http_get(&j.coordinator_metrics, "/metrics").unwrap();
    let (_, runner_text) = http_get(&j.runner_metrics, "/metrics").unwrap();
    for t in [&text, &runner_text] {
        assert!(!t.contains("sandbox:"), "a subject became a label");
        assert!(!t.contains("probe-web-"), "a sandbox id became a label");
        assert!(!t.contains("eyJ"), "a token reached the metrics");
    }
}

#[test]
fn the_audit_trail_holds_every_decision_and_no_secret() {
    let j = Journey::run();
    let audit = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["audit", "-o", "json"];
        all.extend_from_slice(args);
        let r = miren(&j.cfg, &all, &[]);
        assert!(r.ok, "{r:?}");
        r.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    // Key changes are noticed within a second; wait for the new key.
    let mut lines = Vec::new();
    assert!(
        wait_for(Duration::from_secs(20), || {
            lines = audit(&[]);
            lines
                .iter()
                .any(|l| l["action"] == "key.created" && l["kid"] == j.new_kid.as_str())
        }),
        "no key.created for {}: {lines:#?}",
        j.new_kid
    );
    let find = |action: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        lines
            .iter()
            .find(|l| l["action"] == action && pred(l))
            .cloned()
            .unwrap_or_else(|| panic!("no {action} line: {lines:#?}"))
    };
    let id = j.runner.runner_id().unwrap();
    let join = find("runner.join", &|l| l["result"] == "ok");
    assert_eq!(join["runner"], id.as_str());
    assert_eq!(join["actor"], format!("runner:{id}"));
    // The join code's id, never the code.
    let code_id = join["join_code"].as_str().unwrap();
    assert!(!code_id.is_empty() && j.join_code != code_id, "{join}");

    let minted = find("token.minted", &|l| {
        l["aud"] == serde_json::json!(["sts.amazonaws.com", "vault"])
    });
    assert_eq!(minted["app"], "probe");
    assert_eq!(minted["runner"], id.as_str());
    assert!(
        minted["sub"]
            .as_str()
            .unwrap()
            .starts_with("app:probe:sandbox:probe-web-"),
        "{minted}"
    );
    assert!(
        minted["jti"].as_str().is_some_and(|j| j.len() >= 32),
        "{minted}"
    );
    assert!(minted["exp"].as_i64().is_some(), "{minted}");

    let refused = find("ci.login", &|l| l["result"] == "refused");
    assert_eq!(refused["app"], "probe");
    assert_eq!(refused["repository"], "evil/repo");
    assert_eq!(refused["actor"], "anonymous");
    assert!(refused["issuer"]
        .as_str()
        .unwrap()
        .starts_with("https://127.0.0.1:"));
    assert!(refused["subject"]
        .as_str()
        .unwrap()
        .starts_with("repo:evil/repo"));
    assert!(refused["jti"].as_str().is_some(), "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .starts_with("no_binding: "),
        "{refused}"
    );
    let accepted = find("ci.login", &|l| l["result"] == "ok");
    let binding = accepted["binding"].as_str().unwrap().to_string();
    assert_eq!(accepted["actor"], format!("ci:{binding}"));
    assert_eq!(accepted["repository"], "acme/web");
    find("binding.added", &|l| {
        l["binding"] == binding.as_str() && l["app"] == "probe"
    });
    // The CI pipeline's deploy, by its binding.
    find("rpc", &|l| {
        l["method"] == "deploy" && l["actor"] == format!("ci:{binding}").as_str()
    });
    // The operator's changes, by the admin identity.
    find("rpc", &|l| {
        l["method"] == "deploy" && l["actor"].as_str().unwrap().starts_with("admin:")
    });
    find("route.set", &|l| {
        l["host"] == "probe.test" && l["app"] == "probe"
    });
    find("route.oidc.enabled", &|l| l["host"] == "secure.test");
    find("rpc", &|l| {
        l["method"] == "rotateSigningKey" && l["result"] == "ok"
    });
    find("runner.cordoned", &|l| {
        l["cordoned"] == true && l["runner"] == id.as_str()
    });
    find("runner.cordoned", &|l| l["cordoned"] == false);
    // Every line has a time, an actor, an action and a result.
    for l in &lines {
        for k in ["seq", "time", "actor", "action", "result"] {
            assert!(l.get(k).is_some(), "{k} missing: {l}");
        }
    }

    // Never a token, a secret or a cookie.
    let raw = std::fs::read_to_string(j.server.data_dir.join("audit/audit.log")).unwrap();
    assert!(!raw.contains("eyJ"), "a JWT reached the audit trail");
    assert!(j.secrets.len() >= 6, "{:?}", j.secrets);
    for s in &j.secrets {
        assert!(
            !raw.contains(s.as_str()),
            "a secret reached the audit trail: {s}"
        );
    }
    // The trail is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(j.server.data_dir.join("audit/audit.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);

    // Filters.
    let tokens = audit(&["--action", "token", "-a", "probe", "--since", "1h"]);
    assert!(!tokens.is_empty());
    assert!(tokens
        .iter()
        .all(|l| l["action"].as_str().unwrap().starts_with("token.") && l["app"] == "probe"));
    assert!(audit(&["--since", "2000-01-01T00:00:00Z", "--action", "ci.login"]).len() >= 2);
    let future = audit(&["--since", "2999-01-01T00:00:00Z"]);
    assert!(future.is_empty());
    let bad = miren(&j.cfg, &["audit", "--since", "yesterday"], &[]);
    assert!(!bad.ok && bad.stderr.contains("--since"), "{bad:?}");
    // The table.
    let table = miren(&j.cfg, &["audit", "--action", "route"], &[]);
    assert!(table.ok, "{table:?}");
    assert!(table.stdout.starts_with("TIME"), "{}", table.stdout);
    assert!(table.stdout.contains("route.set"), "{}", table.stdout);
}

#[test]
fn a_runners_readiness_follows_its_coordinator() {
    let dir = temp();
    let cfg = dir.path().join("admin.yaml");
    let coord = dir.path().join("coord");
    let server = Server::start(
        &coord,
        &cfg,
        "127.0.0.1:0",
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let listen = server.host_port().to_string();
    let https = listen.clone();
    let code = miren(&cfg, &["runner", "token", "create"], &[]);
    let runner = RunnerProc::start(
        &dir.path().join("runner"),
        Some(code.stdout.trim()),
        &["--isolation", "none", "--metrics-listen", "127.0.0.1:0"],
    );
    let mut addr = None;
    assert!(wait_for(Duration::from_secs(30), || {
        addr = metrics_addr(&runner.output());
        addr.is_some()
    }));
    let addr = addr.unwrap();
    let ready = |a: &str| http_get(a, "/readyz").map(|(s, _)| s).unwrap_or(0);
    assert!(
        wait_for(Duration::from_secs(30), || ready(&addr) == 200),
        "runner never ready: {}",
        runner.output()
    );
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
    // The coordinator: ready on its metrics listener and on HTTPS.
    let coord_metrics = metrics_addr(&server.stdout.join("\n")).unwrap();
    let (status, body) = http_get(&coord_metrics, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ready");
    let client = reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{https}/readyz"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("https://{https}/healthz"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    // The coordinator dies: the runner is no longer ready, and says why.
    drop(server);
    assert!(
        wait_for(Duration::from_secs(60), || ready(&addr) == 503),
        "runner still ready without its coordinator: {}",
        runner.output()
    );
    let (_, body) = http_get(&addr, "/readyz").unwrap();
    assert!(body.contains("coordinator"), "{body}");
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200, "still alive");

    // It comes back on the same address: ready again.
    let _server = Server::start(&coord, &cfg, &listen, &["--metrics-listen", "127.0.0.1:0"]);
    assert!(
        wait_for(Duration::from_secs(90), || ready(&addr) == 200),
        "runner not ready after its coordinator came back: {}",
        runner.output()
    );
}
