//! SIGTERM in the middle of a deploy, on real processes: every task of the
//! coordinator ends within its shutdown bound and the process exits 0; no
//! temporary file is left in the data dir; after a restart on the same data
//! dir the version that was rolling out is recorded with its outcome, and
//! only the sandboxes of the serving version are on record.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{app_status, miren, miren_bin, temp, wait_for, RunnerProc, Server};
use serde_json::Value;

/// An app dir whose one service runs `command`.
fn app(dir: &Path, command: &str) {
    std::fs::create_dir_all(dir.join(".miren")).unwrap();
    std::fs::write(
        dir.join(".miren/app.toml"),
        format!("name = \"slow\"\n[services.web]\ncommand = '''{command}'''\ninstances = 1\n"),
    )
    .unwrap();
}

fn version<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status["versions"]
        .as_array()?
        .iter()
        .find(|v| v["id"] == id)
}

/// Every file name under `dir`, at any depth.
fn names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.push(entry.file_name().to_string_lossy().into_owned());
        if path.is_dir() {
            out.extend(names(&path));
        }
    }
    out
}

#[test]
fn sigterm_during_a_deploy_ends_every_task_and_leaves_consistent_records() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("coord");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let listen = server.host_port().to_string();
    let code = miren(&cfg, &["runner", "token", "create", "--reusable"], &[]);
    assert!(code.ok, "{code:?}");
    let _runner = RunnerProc::start(
        &dir.path().join("r1"),
        Some(code.stdout.trim()),
        &["--isolation", "none"],
    );
    assert!(wait_for(Duration::from_secs(30), || {
        integration_tests::runners(&cfg)
            .iter()
            .any(|r| r["status"] == "ready")
    }));

    // v1 serves.
    let v1 = dir.path().join("v1");
    app(
        &v1,
        r#"sh -c 'exec python3 -m http.server "$PORT" --bind 127.0.0.1'"#,
    );
    let deployed = miren(&cfg, &["deploy", "--dir", v1.to_str().unwrap()], &[]);
    assert!(deployed.ok, "{deployed:?}");
    assert_eq!(app_status(&cfg, "slow")["active_version"], "v1");

    // v2 never listens: its rollout waits for health until SIGTERM.
    let v2 = dir.path().join("v2");
    app(&v2, "sh -c 'echo v2 never listens; exec sleep 600'");
    let mut deploying = Command::new(miren_bin())
        .args(["deploy", "--dir", v2.to_str().unwrap()])
        .env("MIREN_CONFIG", &cfg)
        .env_remove("MIREN_CLUSTER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("miren deploy");
    let rolling_out = wait_for(Duration::from_secs(60), || {
        let st = app_status(&cfg, "slow");
        let v2_deploying = version(&st, "v2").is_some_and(|v| v["state"] == "deploying");
        let v2_placed = st["sandboxes"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["version"] == "v2"));
        v2_deploying && v2_placed
    });
    assert!(rolling_out, "{}", app_status(&cfg, "slow"));

    let asked = Instant::now();
    let (exited_ok, log) = server.stop();
    let took = asked.elapsed();
    let _ = deploying.kill();
    let _ = deploying.wait();
    assert!(
        exited_ok,
        "the coordinator did not exit 0 on SIGTERM: {log}"
    );
    assert!(
        took < Duration::from_secs(12),
        "SIGTERM took {took:?}, over the 10 s shutdown bound: {log}"
    );
    assert!(!log.contains("still running"), "tasks left behind: {log}");
    let temporary: Vec<String> = names(&data)
        .into_iter()
        .filter(|n| n.contains(".tmp-") || n.starts_with(".upload-"))
        .collect();
    assert!(temporary.is_empty(), "left in the data dir: {temporary:?}");

    // Restarted on the same data dir: v1 still serves; v2 is recorded as
    // failed (interrupted), none of its sandboxes is on record.
    let _server = Server::start(&data, &cfg, &listen, &[]);
    let st = app_status(&cfg, "slow");
    assert_eq!(st["active_version"], "v1", "{st}");
    let v2 = version(&st, "v2").expect("v2 recorded");
    assert_eq!(v2["state"], "failed", "{st}");
    assert!(
        v2["message"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{st}"
    );
    let states: Vec<&Value> = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["state"])
        .collect();
    assert!(!states.iter().any(|s| *s == "deploying"), "{st}");
    let sandboxes = st["sandboxes"].as_array().unwrap();
    assert!(!sandboxes.is_empty(), "{st}");
    assert!(sandboxes.iter().all(|s| s["version"] == "v1"), "{st}");
    let list = miren(&cfg, &["app", "list", "-o", "json"], &[]);
    assert!(list.ok && list.stdout.contains("\"slow\""), "{list:?}");
}
