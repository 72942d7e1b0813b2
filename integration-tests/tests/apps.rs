//! Journey 4 on real processes: `miren deploy` puts an app on two runners,
//! each sandbox fetches its workload token through its runner, and an
//! outside JWT library verifies it against the served JWKS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use integration_tests::{http_get_host, miren, outside_verify, temp, wait_for, RunnerProc, Server};
use serde_json::Value;

use integration_tests::{app_status as status, repo_root as repo};

fn sandboxes(status: &Value) -> Vec<Value> {
    status["sandboxes"].as_array().cloned().unwrap_or_default()
}

struct Cluster {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    data: PathBuf,
    server: Option<Server>,
    ingress: String,
    _runners: Vec<RunnerProc>,
}

fn cluster_with_two_runners() -> Cluster {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("coord");
    let server = Server::start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--http-listen", "127.0.0.1:0", "--labs", "routeoidc"],
    );
    let ingress = server.printed_address("HTTP ingress: http://");
    let code = miren(&cfg, &["runner", "token", "create", "--reusable"], &[]);
    assert!(code.ok, "{code:?}");
    let code = code.stdout.trim().to_string();
    // r1 isolates with namespaces where bubblewrap works; r2 runs plain
    // processes, so both paths serve the same app.
    let runners: Vec<RunnerProc> = [("r1", "auto"), ("r2", "none")]
        .iter()
        .map(|(n, iso)| {
            RunnerProc::start(
                &dir.path().join(n),
                Some(&code),
                &["--name", n, "--isolation", iso, "--token-file-ttl", "60s"],
            )
        })
        .collect();
    assert!(wait_for(Duration::from_secs(30), || {
        integration_tests::runners(&cfg)
            .iter()
            .filter(|r| r["status"] == "ready")
            .count()
            == 2
    }));
    Cluster {
        cfg,
        data,
        server: Some(server),
        ingress,
        _runners: runners,
        _dir: dir,
    }
}

fn issuer_of(server: &Server) -> String {
    server
        .stdout
        .iter()
        .find_map(|l| l.strip_prefix("Issuer URL: "))
        .unwrap()
        .to_string()
}

#[test]
fn deployed_app_runs_on_two_runners_and_its_tokens_verify_outside() {
    let c = cluster_with_two_runners();
    let issuer = issuer_of(c.server.as_ref().unwrap());
    let app_dir = repo().join("deploy/example-app");
    let deploy = miren(&c.cfg, &["deploy", "--dir", app_dir.to_str().unwrap()], &[]);
    assert!(deploy.ok, "{deploy:?}");
    assert!(deploy.stdout.contains("Deployed hello v1"), "{deploy:?}");

    let st = status(&c.cfg, "hello");
    assert_eq!(st["active_version"], "v1");
    let sbs = sandboxes(&st);
    assert_eq!(sbs.len(), 2);
    assert!(sbs.iter().all(|s| s["state"] == "healthy"), "{st}");
    assert_ne!(
        sbs[0]["runner"], sbs[1]["runner"],
        "instances must spread over runners"
    );

    // Through the ingress, each sandbox hands out its own verifiable token.
    assert!(miren(&c.cfg, &["route", "set", "hello.test", "-a", "hello"], &[]).ok);
    let mut verified = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (code, body) = http_get_host(
            &c.ingress,
            "hello.test",
            "/whoami?audience=sts.amazonaws.com",
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let sub = v["claims"]["sub"].as_str().unwrap().to_string();
        let id = sub
            .strip_prefix("app:hello:sandbox:")
            .expect("subject names the sandbox")
            .to_string();
        assert!(
            sbs.iter().any(|s| s["id"] == id.as_str()),
            "unknown sandbox in {sub}"
        );
        assert_eq!(v["claims"]["app"], "hello");
        if verified.insert(id) {
            let (ok, report) = outside_verify(
                &issuer,
                &c.data.join("ca.crt"),
                "sts.amazonaws.com",
                v["token"].as_str().unwrap(),
            );
            assert!(ok, "outside verifier refused a sandbox token: {report}");
        }
        if verified.len() == 2 {
            break;
        }
    }
    assert_eq!(verified.len(), 2, "did not reach both sandboxes");
    let (code, body) = http_get_host(&c.ingress, "hello.test", "/").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("hello from miren"), "{body}");

    let list = miren(&c.cfg, &["app", "list", "-o", "json"], &[]);
    assert!(list.stdout.contains("\"hello\""), "{list:?}");
    let runners = integration_tests::runners(&c.cfg);
    assert!(runners.iter().all(|r| r["sandboxes"] == 1), "{runners:?}");

    // A broken version does not replace the serving one. Its last log
    // lines (hostile ones among them) reach the operator escaped.
    let broken = temp();
    std::fs::create_dir_all(broken.path().join(".miren")).unwrap();
    std::fs::write(
        broken.path().join(".miren/app.toml"),
        format!(
            "name = \"hello\"\n[services.web]\ncommand = '''sh -c '{HOSTILE_PRINTF}; echo booting; echo cannot start >&2; exit 3' '''\ninstances = 2\n"
        ),
    )
    .unwrap();
    let failed = miren(
        &c.cfg,
        &["deploy", "--dir", broken.path().to_str().unwrap()],
        &[],
    );
    assert!(!failed.ok, "{failed:?}");
    assert!(
        failed.stderr.contains("previous version keeps serving"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("cannot start"),
        "last log lines missing: {}",
        failed.stderr
    );
    assert_escaped(&failed.stderr);
    // `-o json` stays JSON: the characters are JSON escapes, and the
    // message parses back as the sandbox printed it.
    let json = miren(&c.cfg, &["app", "status", "-a", "hello", "-o", "json"], &[]);
    assert!(json.ok, "{json:?}");
    assert_no_raw_controls(&json.stdout);
    let st: Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(
        st["versions"][1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\x1b]0;pwned\x07title")),
        "{st}"
    );
    let st = status(&c.cfg, "hello");
    assert_eq!(st["active_version"], "v1");
    let sbs_after = sandboxes(&st);
    assert_eq!(sbs_after.len(), 2, "{st}");
    assert!(sbs_after.iter().all(|s| s["version"] == "v1"));
    let (code, body) = http_get_host(&c.ingress, "hello.test", "/").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"v1\""), "{body}");

    // A working new version replaces the old one.
    let again = miren(&c.cfg, &["deploy", "--dir", app_dir.to_str().unwrap()], &[]);
    assert!(again.ok, "{again:?}");
    let st = status(&c.cfg, "hello");
    assert_eq!(st["active_version"], "v3");
    // The old version drains for a moment, then goes.
    assert!(
        wait_for(Duration::from_secs(15), || {
            let s = sandboxes(&status(&c.cfg, "hello"));
            s.len() == 2 && s.iter().all(|s| s["version"] == "v3")
        }),
        "{}",
        status(&c.cfg, "hello")
    );

    // Delete stops everything.
    let del = miren(&c.cfg, &["app", "delete", "-a", "hello"], &[]);
    assert!(del.ok, "{del:?}");
    assert!(wait_for(Duration::from_secs(10), || {
        integration_tests::runners(&c.cfg)
            .iter()
            .all(|r| r["sandboxes"] == 0)
    }));
    let (code, _) = http_get_host(&c.ingress, "hello.test", "/").unwrap();
    assert!(
        code == 503 || code == 404,
        "deleted app still served: {code}"
    );
}

#[test]
fn token_endpoint_rules_and_cached_tokens_through_an_outage() {
    let mut c = cluster_with_two_runners();
    let probe_dir = repo().join("integration-tests/fixtures/probe-app");
    let deploy = miren(
        &c.cfg,
        &[
            "deploy",
            "--dir",
            probe_dir.to_str().unwrap(),
            "-a",
            "probe",
        ],
        &[],
    );
    assert!(deploy.ok, "{deploy:?}");
    let st = status(&c.cfg, "probe");
    let sb = &sandboxes(&st)[0];
    let id = sb["id"].as_str().unwrap().to_string();
    assert!(miren(&c.cfg, &["route", "set", "probe.test", "-a", "probe"], &[]).ok);
    let ingress = c.ingress.clone();
    let probe = |path: &str| http_get_host(&ingress, "probe.test", path).unwrap();

    let (code, body) = probe("/probe");
    assert_eq!(code, 200, "{body}");
    let p: Value = serde_json::from_str(&body).unwrap();
    let env = &p["env"];
    // Isolation as the sandbox sees it.
    let isolation = integration_tests::runners(&c.cfg)
        .into_iter()
        .find(|r| r["id"] == sb["runner"])
        .and_then(|r| r["isolation"].as_str().map(str::to_string))
        .unwrap_or_default();
    if isolation == "bwrap" {
        assert!(p["pid"].as_i64().unwrap() < 10, "no pid namespace: {p}");
        // Not root inside: nobody, with no capabilities.
        assert_eq!(p["uid"], 65534, "{p}");
        assert_eq!(p["cap_eff"], "0000000000000000", "{p}");
        assert_eq!(p["proc_sys_writable"], false, "{p}");
        assert_eq!(
            p["interfaces"],
            serde_json::json!(["lo"]),
            "network not private: {p}"
        );
        let root = p["root_entries"].as_array().unwrap();
        assert!(
            !root.iter().any(|e| e == "root" || e == "home"),
            "host homes visible: {p}"
        );
    } else {
        println!("NOTE: runners here have no namespace isolation (bubblewrap unusable)");
    }
    for k in [
        "MIREN_IDENTITY_TOKEN_URL",
        "MIREN_IDENTITY_TOKEN_PATH",
        "MIREN_OIDC_ISSUER_URL",
        "MIREN_APP",
        "MIREN_SANDBOX_ID",
    ] {
        assert!(env.get(k).is_some(), "{k} missing: {env}");
    }
    assert_eq!(env["MIREN_SANDBOX_ID"], id.as_str());
    assert_eq!(p["no_header"]["status"], 401, "{p}");
    assert_eq!(p["wrong_secret"]["status"], 403, "{p}");
    assert_eq!(p["post"]["status"], 405, "{p}");
    assert_eq!(p["bad_ttl"]["status"], 400, "{p}");
    assert_eq!(p["empty_audience"]["status"], 400, "{p}");
    assert!(p["no_header"]["body"]["error"].is_string());
    let two = &p["two_audiences"];
    assert_eq!(two["status"], 200, "{p}");
    let token = two["body"]["value"].as_str().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["aud"],
        serde_json::json!(["sts.amazonaws.com", "vault"])
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
    assert_eq!(claims["sub"], format!("app:probe:sandbox:{id}"));
    assert_eq!(p["default"]["status"], 200);
    let file_token = p["token_file"].as_str().expect("token file written");
    let (ok, report) = outside_verify(
        env["MIREN_OIDC_ISSUER_URL"].as_str().unwrap(),
        &c.data.join("ca.crt"),
        "miren",
        file_token.trim(),
    );
    assert!(ok, "token file does not hold a valid token: {report}");

    // The probe's secret at another sandbox's endpoint: refused.
    let second = miren(
        &c.cfg,
        &[
            "deploy",
            "--dir",
            probe_dir.to_str().unwrap(),
            "-a",
            "probe2",
        ],
        &[],
    );
    assert!(second.ok, "{second:?}");
    let other = sandboxes(&status(&c.cfg, "probe2"))[0].clone();
    assert!(
        miren(
            &c.cfg,
            &["route", "set", "probe2.test", "-a", "probe2"],
            &[]
        )
        .ok
    );
    let (_, other_body) = http_get_host(&c.ingress, "probe2.test", "/secret-free-url").unwrap();
    let other_url: Value = serde_json::from_str(&other_body).unwrap();
    let (_, body) = probe(&format!(
        "/probe?other={}",
        other_url["url"].as_str().unwrap()
    ));
    let p: Value = serde_json::from_str(&body).unwrap();
    // The caller is identified by where it stands: the other sandbox's
    // endpoint refuses our secret (shared loopback), is unreachable, or,
    // from inside our own namespace, that address is our own endpoint. Never a token
    // for the other sandbox.
    let o = &p["other_endpoint"];
    match o["status"].as_i64() {
        // Refused, or not even reachable from inside our network namespace.
        Some(403) | Some(0) => {}
        Some(200) => {
            let t = o["body"]["value"].as_str().unwrap();
            let claims: Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t.split('.').nth(1).unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(
                claims["sandbox_id"],
                id.as_str(),
                "got another sandbox's token: {claims}"
            );
            assert_ne!(claims["sandbox_id"], other["id"]);
        }
        other => panic!("unexpected answer from the other endpoint: {other:?} {p}"),
    }

    // The token file is rewritten at half-life (runners here: 60 s tokens).
    let first_file = file_token.to_string();
    assert!(
        wait_for(Duration::from_secs(50), || {
            let (_, body) = probe("/probe");
            serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|p| p["token_file"].as_str().map(|t| t != first_file))
                .unwrap_or(false)
        }),
        "token file not refreshed: first {} / now via probe {:?} / on disk {:?}",
        &first_file[first_file.len().saturating_sub(20)..],
        serde_json::from_str::<Value>(&probe("/probe").1)
            .ok()
            .map(|p| p["token_file"].to_string()),
        std::fs::read_to_string(env["MIREN_IDENTITY_TOKEN_PATH"].as_str().unwrap()).ok()
    );

    // Upgrades (as WebSocket uses) pass through the ingress both ways.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&c.ingress).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /echo-upgrade HTTP/1.1\r\nHost: probe.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(b"ping through the ingress").unwrap();
        let mut echo = [0u8; 24];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping through the ingress");
    }

    // A crashed process is restarted and the restart shows in `app status`.
    let _ = http_get_host(&c.ingress, "probe.test", "/crash");
    assert!(
        wait_for(Duration::from_secs(30), || {
            let st = status(&c.cfg, "probe");
            let s = &sandboxes(&st)[0];
            s["restarts"].as_u64().unwrap_or(0) >= 1 && s["state"] == "healthy"
        }),
        "crash not restarted: {}",
        status(&c.cfg, "probe")
    );
    let (code, _) = probe("/probe");
    assert_eq!(code, 200);

    // Coordinator down: the cached token is still served.
    let (ok, err) = c.server.take().unwrap().stop();
    assert!(ok, "{err}");
    // The ingress went with the coordinator; reach the sandbox the way a
    // process beside it would.
    let addr = sb["address"].as_str().unwrap().to_string();
    let body = get_direct(&addr, "/probe");
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        p["default"]["status"], 200,
        "cached token not served during the outage: {p}"
    );
    assert_eq!(p["two_audiences"]["status"], 200, "{p}");
}

#[test]
fn ingress_routes_by_host_without_downtime_and_bad_artifacts_are_refused() {
    let c = cluster_with_two_runners();
    let app_dir = repo().join("deploy/example-app");
    let deploy = miren(&c.cfg, &["deploy", "--dir", app_dir.to_str().unwrap()], &[]);
    assert!(deploy.ok, "{deploy:?}");

    // Unknown host: 404 before any route exists.
    let (code, _) = http_get_host(&c.ingress, "hello.test", "/").unwrap();
    assert_eq!(code, 404);
    assert!(miren(&c.cfg, &["route", "set", "hello.test", "-a", "hello"], &[]).ok);
    let (code, body) = http_get_host(&c.ingress, "Hello.Test:80", "/").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from miren"), "{body}");
    let (code, _) = http_get_host(&c.ingress, "other.test", "/").unwrap();
    assert_eq!(code, 404);
    // A default route catches every other host.
    assert!(miren(&c.cfg, &["route", "set", "--default", "-a", "hello"], &[]).ok);
    let (code, _) = http_get_host(&c.ingress, "other.test", "/").unwrap();
    assert_eq!(code, 200);
    // Route OIDC configuration (labs): secrets never come back out.
    let bad = enable_inline(&c.cfg, "hello.test", "c", "s3cr3t-value", "email:Host", &[]);
    assert!(!bad.ok, "a reserved header was accepted");
    let en = enable_inline(
        &c.cfg,
        "hello.test",
        "c",
        "s3cr3t-value",
        "email:X-User-Email",
        &[],
    );
    assert!(en.ok, "{en:?}");
    let show = miren(&c.cfg, &["route", "oidc", "show", "hello.test"], &[]);
    assert!(show.ok, "{show:?}");
    assert!(
        !show.stdout.contains("s3cr3t-value"),
        "secret printed: {}",
        show.stdout
    );
    assert!(
        show.stdout.contains("email:X-User-Email"),
        "{}",
        show.stdout
    );
    let providers = miren(&c.cfg, &["route", "oidc", "providers", "-o", "json"], &[]);
    assert!(!providers.stdout.contains("s3cr3t-value"));
    let pv: Value = serde_json::from_str(&providers.stdout).unwrap();
    assert_eq!(pv[0]["name"], "login-example-com");
    let busy = miren(
        &c.cfg,
        &["route", "oidc", "remove-provider", "login-example-com"],
        &[],
    );
    assert!(!busy.ok, "a provider in use was removed");
    // Another client under the same provider name would change it under
    // every route that uses it: refused, and the provider is unchanged.
    let other = enable_inline(
        &c.cfg,
        "--default",
        "another-client",
        "x",
        "email:X-User-Email",
        &[],
    );
    assert!(!other.ok, "{other:?}");
    assert!(
        other.stderr.contains("--provider login-example-com"),
        "{}",
        other.stderr
    );
    let providers = miren(&c.cfg, &["route", "oidc", "providers", "-o", "json"], &[]);
    let pv: Value = serde_json::from_str(&providers.stdout).unwrap();
    assert_eq!(pv[0]["client_id"], "c", "{pv}");
    // Rotating the secret is asked for explicitly.
    let rotate = enable_inline(
        &c.cfg,
        "hello.test",
        "c",
        "n3w-s3cr3t",
        "email:X-User-Email",
        &["--replace-provider"],
    );
    assert!(rotate.ok, "{rotate:?}");
    assert!(!rotate.stdout.contains("n3w-s3cr3t"));
    assert!(miren(&c.cfg, &["route", "oidc", "disable", "hello.test"], &[]).ok);
    // The provider stays for reuse.
    assert!(
        miren(
            &c.cfg,
            &[
                "route",
                "oidc",
                "enable",
                "hello.test",
                "--provider",
                "login-example-com",
                "--claim-header",
                "sub:X-User"
            ],
            &[]
        )
        .ok
    );
    assert!(miren(&c.cfg, &["route", "oidc", "disable", "hello.test"], &[]).ok);
    assert!(
        miren(
            &c.cfg,
            &["route", "oidc", "remove-provider", "login-example-com"],
            &[]
        )
        .ok
    );

    let routes = miren(&c.cfg, &["route", "list", "-o", "json"], &[]);
    assert!(routes.stdout.contains("hello.test"), "{routes:?}");
    assert!(miren(&c.cfg, &["route", "remove", "--default"], &[]).ok);

    // Both sandboxes serve through the ingress.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (_, body) = http_get_host(&c.ingress, "hello.test", "/").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        seen.insert(v["sandbox"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "requests did not spread: {seen:?}");

    // Redeploy while requests flow: none fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ingress = c.ingress.clone();
    let flag = stop.clone();
    let load = std::thread::spawn(move || {
        let (mut ok, mut failed, mut versions) =
            (0u32, Vec::new(), std::collections::BTreeSet::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !flag.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            match http_get_host(&ingress, "hello.test", "/") {
                Ok((200, body)) => {
                    ok += 1;
                    if let Ok(v) = serde_json::from_str::<Value>(&body) {
                        versions.insert(v["version"].as_str().unwrap_or_default().to_string());
                    }
                }
                other => failed.push(format!("{other:?}")),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, failed, versions)
    });
    let again = miren(&c.cfg, &["deploy", "--dir", app_dir.to_str().unwrap()], &[]);
    assert!(again.ok, "{again:?}");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, versions) = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed during the rollout: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} requests went through");
    assert!(
        versions.contains("v1") && versions.contains("v2"),
        "{versions:?}"
    );

    // Logs of the app's sandboxes.
    let logs = miren(&c.cfg, &["logs", "-a", "hello"], &[]);
    assert!(logs.ok, "{logs:?}");
    assert!(
        logs.stdout.contains("listening on 127.0.0.1:"),
        "{}",
        logs.stdout
    );

    // What a sandbox prints cannot take over the operator's terminal.
    let noisy = temp();
    std::fs::create_dir_all(noisy.path().join(".miren")).unwrap();
    std::fs::write(
        noisy.path().join(".miren/app.toml"),
        format!(
            "name = \"noisy\"\n[services.web]\ncommand = '''sh -c '{HOSTILE_PRINTF}; exec python3 -m http.server \"$PORT\" --bind 127.0.0.1' '''\n"
        ),
    )
    .unwrap();
    let deploy = miren(
        &c.cfg,
        &["deploy", "--dir", noisy.path().to_str().unwrap()],
        &[],
    );
    assert!(deploy.ok, "{deploy:?}");
    let mut logs = miren(&c.cfg, &["logs", "-a", "noisy"], &[]);
    wait_for(Duration::from_secs(10), || {
        logs = miren(&c.cfg, &["logs", "-a", "noisy"], &[]);
        logs.stdout.contains("gnp.exe")
    });
    assert!(logs.ok, "{logs:?}");
    assert_escaped(&logs.stdout);
    // A line stays one line, after its sandbox's id.
    assert!(
        logs.stdout
            .lines()
            .any(|l| l.ends_with(r": innocent\rEVIL")),
        "{}",
        logs.stdout
    );

    // A malicious artifact: traversal, an absolute path, an escaping symlink.
    let evil_dir = temp();
    let marker = evil_dir.path().join("escaped");
    for (i, kind) in ["traversal", "absolute", "symlink"].iter().enumerate() {
        let tgz = evil_dir.path().join(format!("evil{i}.tar.gz"));
        let script = r#"
import io, sys, tarfile
kind, out, marker = sys.argv[1], sys.argv[2], sys.argv[3]
with tarfile.open(out, "w:gz") as t:
    def add(name, data=b"x", typ=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name); info.type = typ; info.linkname = link; info.size = len(data) if typ == tarfile.REGTYPE else 0
        t.addfile(info, io.BytesIO(data) if typ == tarfile.REGTYPE else None)
    add("server.py", b"print('hi')")
    if kind == "traversal":
        add("../../../../../../.." + marker)
    elif kind == "absolute":
        add(marker)
    else:
        add("link", typ=tarfile.SYMTYPE, link="../../../../../../.." + marker.rsplit("/", 1)[0])
        add("link/escaped")
"#;
        let made = std::process::Command::new("python3")
            .args([
                "-c",
                script,
                kind,
                tgz.to_str().unwrap(),
                marker.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(made.success());
        let bad = miren(
            &c.cfg,
            &[
                "deploy",
                "--dir",
                app_dir.to_str().unwrap(),
                "-a",
                "evil",
                "--artifact",
                tgz.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!bad.ok, "{kind} artifact deployed: {bad:?}");
        assert!(bad.stderr.contains("unpacking"), "{kind}: {}", bad.stderr);
        assert!(
            !marker.exists(),
            "{kind} artifact wrote outside the app dir"
        );
    }
    // The serving app is untouched.
    let (code, _) = http_get_host(&c.ingress, "hello.test", "/").unwrap();
    assert_eq!(code, 200);
}

/// A `printf` (for `sh`) of what a hostile sandbox prints to take over the
/// operator's terminal: a window title (OSC … BEL), a line overwritten
/// through CR, the one-character C1 CSI (U+009B, UTF-8 C2 9B) and a bidi
/// override (U+202E, UTF-8 E2 80 AE).
const HOSTILE_PRINTF: &str =
    r#"printf "\033]0;pwned\007title\ninnocent\rEVIL\n\302\23331mred\n\342\200\256gnp.exe\n""#;

/// None of [`HOSTILE_PRINTF`]'s characters that act on a terminal is in `out`.
fn assert_no_raw_controls(out: &str) {
    for raw in ['\x1b', '\x07', '\r', '\u{9b}', '\u{202e}'] {
        assert!(!out.contains(raw), "raw {raw:?} printed: {out:?}");
    }
}

/// `out` shows what [`HOSTILE_PRINTF`] printed, escaped.
fn assert_escaped(out: &str) {
    assert_no_raw_controls(out);
    for shown in [
        r"\x1b]0;pwned\x07title",
        r"innocent\rEVIL",
        r"\u{9b}31mred",
        r"\u{202e}gnp.exe",
    ] {
        assert!(out.contains(shown), "{shown} not shown: {out}");
    }
}

/// GET on a sandbox's service address (`host:port` or `unix:<path>`).
/// `miren route oidc enable TARGET` with an inline provider at
/// `https://login.example.com` (client `id`, `secret`) and one claim header,
/// plus `extra` flags.
fn enable_inline(
    cfg: &Path,
    target: &str,
    id: &str,
    secret: &str,
    claim_header: &str,
    extra: &[&str],
) -> integration_tests::Run {
    let mut args = vec![
        "route",
        "oidc",
        "enable",
        target,
        "--provider-url",
        "https://login.example.com",
        "--client-id",
        id,
        "--client-secret",
        secret,
        "--claim-header",
        claim_header,
    ];
    args.extend_from_slice(extra);
    miren(cfg, &args, &[])
}

fn get_direct(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut raw = Vec::new();
    if let Some(p) = addr.strip_prefix("unix:") {
        let mut s = std::os::unix::net::UnixStream::connect(p).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        s.read_to_end(&mut raw).unwrap();
    } else {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        s.read_to_end(&mut raw).unwrap();
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
