//! A deployed app cannot reach outside its sandbox (issue 11), on real
//! processes: a hostile app (`fixtures/hostile-app`), deployed the ordinary
//! way, plants symlinks to a host file under every name the runner writes
//! through, tries to overwrite its token file and redirects its app socket
//! to a host socket. The host file stays as it was (content and mode),
//! nothing of it appears in `miren logs`, and the host socket never gets a
//! connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{
    http_get_host, http_get_with, miren, miren_bin, runners, temp, wait_for, RunnerProc, Server,
};
use serde_json::Value;

const VICTIM_TEXT: &str = "precious host file: never to be touched\n";

/// A coordinator with an ingress and one runner of the given isolation.
struct OneRunner {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    ingress: String,
    _server: Server,
    runner: RunnerProc,
}

fn one_runner(isolation: &str, extra: &[&str]) -> OneRunner {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let server = Server::start(
        &dir.path().join("coord"),
        &cfg,
        "127.0.0.1:0",
        &["--http-listen", "127.0.0.1:0"],
    );
    let ingress = server.printed_address("HTTP ingress: http://");
    let code = miren(&cfg, &["runner", "token", "create"], &[]);
    assert!(code.ok, "{code:?}");
    let mut cmd = Command::new(miren_bin());
    // A variable of the runner's own: no sandbox may see it.
    cmd.env("MIREN_TEST_RUNNER_CANARY", "runner-only");
    let mut args = vec!["--isolation", isolation, "--token-file-ttl", "60s"];
    args.extend_from_slice(extra);
    let runner = RunnerProc::start_with(
        cmd,
        &dir.path().join("runner"),
        Some(code.stdout.trim()),
        &args,
    );
    assert!(
        wait_for(Duration::from_secs(30), || runners(&cfg)
            .iter()
            .any(|r| r["status"] == "ready")),
        "runner never became ready: {}",
        runner.output()
    );
    OneRunner {
        dir,
        cfg,
        ingress,
        _server: server,
        runner,
    }
}

/// Writes the hostile app into `dir` with `extra_toml` after its service.
fn hostile_app(dir: &Path, name: &str, env: &[(&str, String)], extra_toml: &str) -> PathBuf {
    let app = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(app.join(".miren")).expect("app dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hostile-app/hostile.py");
    std::fs::copy(fixture, app.join("hostile.py")).expect("copy fixture");
    let mut toml = format!(
        "name = \"{name}\"\n[services.web]\ncommand = \"python3 hostile.py\"\ninstances = 1\n{extra_toml}\n[services.web.env]\n"
    );
    for (k, v) in env {
        toml.push_str(&format!("{k} = {v:?}\n"));
    }
    std::fs::write(app.join(".miren/app.toml"), toml).expect("app.toml");
    app
}

fn deploy(cfg: &Path, app_dir: &Path, name: &str) {
    let run = miren(
        cfg,
        &[
            "deploy",
            "--dir",
            app_dir.to_str().expect("utf-8"),
            "-a",
            name,
        ],
        &[],
    );
    assert!(run.ok, "{run:?}");
    assert!(
        miren(
            cfg,
            &["route", "set", &format!("{name}.test"), "-a", name],
            &[]
        )
        .ok
    );
}

fn get(c: &OneRunner, app: &str, path: &str) -> (u16, Value) {
    let (code, body) =
        http_get_host(&c.ingress, &format!("{app}.test"), path).unwrap_or((0, String::new()));
    // A body that is not JSON (the ingress's own answers) is kept as text,
    // so that a failed assertion shows it.
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn logs(cfg: &Path, app: &str, lines: &str) -> String {
    let run = miren(cfg, &["logs", "-a", app, "-n", lines], &[]);
    assert!(run.ok, "{run:?}");
    run.stdout
}

/// A host file the app will aim at, and its mode.
fn victim(dir: &Path) -> PathBuf {
    let path = dir.join("victim");
    std::fs::write(&path, VICTIM_TEXT).expect("victim");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("mode");
    path
}

fn assert_untouched(victim: &Path) {
    assert_eq!(
        std::fs::read_to_string(victim).expect("victim readable"),
        VICTIM_TEXT,
        "the host file was written"
    );
    let mode = std::fs::metadata(victim)
        .expect("victim")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the host file's mode changed");
}

/// Sandbox variables: what the runner gives, the app's own, and what the
/// shell and Python add (PWD; LC_CTYPE by PEP 538 locale coercion).
/// Nothing of the runner's environment.
fn assert_own_environment(report: &Value) {
    let names: Vec<&str> = report["env_names"]
        .as_array()
        .expect("env names")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in &names {
        let allowed = name.starts_with("MIREN_") && *name != "MIREN_TEST_RUNNER_CANARY"
            || [
                "PORT",
                "PATH",
                "HOME",
                "PWD",
                "SHLVL",
                "LC_CTYPE",
                "VICTIM",
                "VICTIM_SOCK",
                "RUNNER_PID",
                "LD_PRELOAD",
            ]
            .contains(name);
        assert!(allowed, "the sandbox sees {name}: {names:?}");
    }
    assert!(names.contains(&"MIREN_IDENTITY_TOKEN_URL"), "{names:?}");
    assert!(
        !names.contains(&"RUST_LOG"),
        "runner variable leaked: {names:?}"
    );
}

/// Waits until the runner has rewritten the token file (half-life of the
/// 60 s token), as the app reads it.
fn wait_token_refresh(c: &OneRunner, app: &str) {
    let (_, first) = get(c, app, "/token-file");
    let first = first["token"].as_str().map(str::to_string);
    assert!(
        wait_for(Duration::from_secs(60), || {
            let (_, now) = get(c, app, "/token-file");
            let now = now["token"].as_str().map(str::to_string);
            now != first && now.is_some_and(|t| t.starts_with("ey"))
        }),
        "the token file was never refreshed: {}",
        c.runner.output()
    );
    let (_, now) = get(c, app, "/token-file");
    assert!(
        now["token"].as_str().is_some_and(|t| t.starts_with("ey")),
        "{now}"
    );
}

/// The environment of every bubblewrap process the runner `runner_pid`
/// started (the outer ones, on the host), from `/proc`.
fn bwrap_environments(runner_pid: u32) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the name may hold spaces or ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm != "bwrap" || ppid != Some(runner_pid) {
            continue;
        }
        if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
            found.push(
                environ
                    .split(|b| *b == 0)
                    .filter(|v| !v.is_empty())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect(),
            );
        }
    }
    found
}

#[test]
fn a_hostile_app_in_bubblewrap_reaches_no_host_file_or_socket() {
    let c = one_runner("bwrap", &[]);
    let victim = victim(c.dir.path());
    let victim_sock_path = c.dir.path().join("victim.sock");
    let victim_sock =
        std::os::unix::net::UnixListener::bind(&victim_sock_path).expect("victim socket");
    victim_sock.set_nonblocking(true).expect("nonblocking");
    let env = [
        ("VICTIM", victim.display().to_string()),
        ("VICTIM_SOCK", victim_sock_path.display().to_string()),
        ("RUNNER_PID", c.runner.pid().to_string()),
        // A deployer's code for the dynamic loader: harmless inside the
        // sandbox (the file does not exist), root on the host if it
        // reached bubblewrap's own process.
        ("LD_PRELOAD", "/nonexistent/preload.so".to_string()),
    ];
    let app = hostile_app(c.dir.path(), "hostile", &env, "");
    deploy(&c.cfg, &app, "hostile");

    // Bubblewrap runs on the host before any namespace exists: its own
    // environment is PATH alone; the sandbox's variables (the app's
    // LD_PRELOAD, the token secret) are set inside.
    let outer = bwrap_environments(c.runner.pid());
    assert!(!outer.is_empty(), "no bubblewrap process under the runner");
    for env in &outer {
        assert!(
            env.iter().all(|v| v.starts_with("PATH=")),
            "bubblewrap runs on the host with {env:?}"
        );
    }

    let (code, report) = get(&c, "hostile", "/report");
    assert_eq!(code, 200, "{report}");
    // The dir of the token file is the runner's, read-only inside.
    assert_eq!(
        report["token_dir_entries"],
        serde_json::json!(["token", "token.sock"])
    );
    for (path, outcome) in report["planted"].as_object().expect("planted") {
        if path.starts_with("/run/miren/identity/") {
            assert_eq!(outcome, "refused: Read-only file system", "{path}");
        }
    }
    assert_eq!(report["token_write"], "refused: Read-only file system");
    assert_own_environment(&report);
    assert!(
        report["env_names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "LD_PRELOAD")),
        "the app's own variable did not reach it: {report}"
    );
    // Root-only host files are not there, nested user namespaces fail.
    assert_eq!(
        report["shadow"], "refused: No such file or directory",
        "{report}"
    );
    assert_eq!(report["nested_userns"], "refused", "{report}");

    // The runner logs and rewrites the token file with every name planted.
    wait_token_refresh(&c, "hostile");
    assert_untouched(&victim);
    let printed = logs(&c.cfg, "hostile", "1000");
    assert!(printed.contains("hostile app started"), "{printed}");
    assert!(
        !printed.contains("precious"),
        "host file in the logs: {printed}"
    );

    // The app plants links to a host socket under every name its socket
    // ever had: the socket is the runner's, in a dir the sandbox never
    // sees, so the app goes on answering and the host socket gets nothing.
    let (code, _) = get(&c, "hostile", "/hijack-socket");
    assert_eq!(code, 200);
    assert!(
        wait_for(Duration::from_secs(10), || logs(&c.cfg, "hostile", "50")
            .contains("app.sock hijack:")),
        "the app never tried to swap its socket"
    );
    // A request asking for an upgrade never takes a kept-alive connection:
    // each of these has the runner connect to the app socket by its name
    // again.
    for _ in 0..5 {
        let (code, body) = http_get_with(
            &c.ingress,
            "hostile.test",
            "/report",
            &[("Connection", "Upgrade, close"), ("Upgrade", "websocket")],
        )
        .expect("an answer from the ingress");
        assert_eq!(code, 200, "the app's own socket was not reached: {body}");
    }
    match victim_sock.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the host socket was connected to: {other:?}"),
    }
    assert_untouched(&victim);
}

#[test]
fn plain_process_sandboxes_get_only_their_environment_and_cannot_redirect_writes() {
    // Without namespaces a sandbox is a process of the runner's user: it
    // could write the host file itself. What is checked here is the
    // runner's side: it never writes through a name the app planted, and
    // the app starts with nothing of the runner's environment.
    let c = one_runner("none", &[]);
    let victim = victim(c.dir.path());
    let env = [
        ("VICTIM", victim.display().to_string()),
        ("RUNNER_PID", c.runner.pid().to_string()),
    ];
    let app = hostile_app(c.dir.path(), "plain", &env, "");
    deploy(&c.cfg, &app, "plain");
    let (code, report) = get(&c, "plain", "/report");
    assert_eq!(code, 200, "{report}");
    assert_own_environment(&report);
    // The token file's dir is writable here, and the app planted a link
    // under the runner's old temporary name and under the file's name.
    let token_dir = report["planted"]
        .as_object()
        .expect("planted")
        .iter()
        .find(|(p, o)| p.ends_with(&format!(".token.tmp-{}", c.runner.pid())) && *o == "planted")
        .map(|(p, _)| p.clone());
    assert!(token_dir.is_some(), "nothing planted: {report}");
    wait_token_refresh(&c, "plain");
    assert_untouched(&victim);
    assert!(!logs(&c.cfg, "plain", "1000").contains("precious"));
}

/// Bytes of files under `dir` on `dir`'s own filesystem (mounts below it
/// are not descended into).
fn disk_use_on_its_filesystem(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::symlink_metadata(dir).expect("dir").dev();
    fn walk(dir: &Path, dev: u64) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.dev() != dev {
                continue;
            }
            total += if m.is_dir() {
                walk(&e.path(), dev)
            } else {
                m.len()
            };
        }
        total
    }
    walk(dir, dev)
}

#[test]
fn a_sandbox_writes_to_a_capped_tmpfs_never_to_the_runners_disk() {
    let c = one_runner("bwrap", &[]);
    let app = hostile_app(
        c.dir.path(),
        "filler",
        &[],
        "[services.web.limits]\nmemory = \"256MiB\"\n",
    );
    deploy(&c.cfg, &app, "filler");
    let id = sandbox_of(&c.cfg, "filler")["id"]
        .as_str()
        .expect("sandbox id")
        .to_string();
    let root = c.dir.path().join("runner/sandboxes").join(&id);
    let on_disk_before = disk_use_on_its_filesystem(&root);

    // Its app dir (its cwd), its /tmp and its /dev/shm share one cap, half
    // its memory limit (128 MiB), then say so; the app asks for up to
    // 512 MiB in each (freeing each before the next).
    for place in ["app", "tmp", "shm"] {
        let (code, fill) = get(&c, "filler", &format!("/fill/{place}/bytes/512"));
        assert_eq!(code, 200, "{fill}\nlogs: {}", logs(&c.cfg, "filler", "20"));
        assert_eq!(fill["error"], "No space left on device", "{place}: {fill}");
        let mib = fill["done"].as_u64().expect("done");
        assert!((100..=128).contains(&mib), "{place}: {fill}");
    }
    // Files too: 256 MiB of memory buys 65,536 inodes, wherever made.
    for place in ["app", "tmp"] {
        let (code, fill) = get(&c, "filler", &format!("/fill/{place}/inodes/100000"));
        assert_eq!(code, 200, "{fill}");
        assert_eq!(fill["error"], "No space left on device", "{place}: {fill}");
        assert!(
            fill["done"].as_u64().is_some_and(|n| n < 65_536),
            "{place}: {fill}"
        );
    }
    // /var/tmp and /run are the sandbox's too (in the same tmpfs).
    for place in ["vartmp", "run"] {
        let (code, fill) = get(&c, "filler", &format!("/fill/{place}/bytes/1"));
        assert_eq!(code, 200, "{fill}");
        assert_eq!(fill["error"], Value::Null, "{place}: {fill}");
        assert_eq!(fill["done"], 1, "{place}: {fill}");
    }
    // Its root and /dev (bubblewrap's own tmpfs) take nothing.
    for place in ["root", "dev"] {
        for what in ["bytes", "inodes"] {
            let (code, fill) = get(&c, "filler", &format!("/fill/{place}/{what}/16"));
            assert_eq!(code, 200, "{fill}");
            assert_eq!(fill["error"], "Read-only file system", "{place}: {fill}");
            assert_eq!(fill["done"], 0, "{place}: {fill}");
        }
    }

    // None of it reached the runner's disk: the unpacked app below the
    // sandbox's writes is as it was.
    let on_disk_after = disk_use_on_its_filesystem(&root);
    assert!(
        on_disk_after <= on_disk_before + 1024 * 1024,
        "the runner's disk took {} bytes",
        on_disk_after - on_disk_before
    );
    // The app still answers, and the runner is still ready.
    assert_eq!(get(&c, "filler", "/report").0, 200);
    assert_eq!(runners(&c.cfg)[0]["status"], "ready");

    // SIGKILL: the sandbox dies with its runner and its layer's mounts
    // stay behind until the runner starts again, which detaches them
    // before anything else.
    let runner_dir = c.dir.path().join("runner");
    let old_mounts = mounts_under(&runner_dir);
    assert_eq!(old_mounts.len(), 2, "{old_mounts:?}");
    let killed = c.runner;
    killed.kill();
    assert_eq!(mounts_under(&runner_dir), old_mounts);
    let again = RunnerProc::start(
        &runner_dir,
        None,
        &["--isolation", "bwrap", "--token-file-ttl", "60s"],
    );
    assert!(
        wait_for(Duration::from_secs(60), || {
            http_get_host(&c.ingress, "filler.test", "/report").is_ok_and(|(code, _)| code == 200)
        }),
        "the app never answered after the runner's restart:\n{}",
        again.output()
    );
    // What is mounted now is the layer of the sandbox running now, once.
    let now = sandbox_of(&c.cfg, "filler")["id"]
        .as_str()
        .expect("sandbox id")
        .to_string();
    let sandbox = runner_dir.join("sandboxes").join(&now);
    let mut expected = vec![sandbox.join("scratch"), sandbox.join("view")];
    expected.sort();
    assert_eq!(mounts_under(&runner_dir), expected, "{}", again.output());

    // Killed again, and the app removed while the runner is down: no
    // sandbox of that id comes back, and the restarted runner still leaves
    // no mount of the dead one.
    again.kill();
    assert!(miren(&c.cfg, &["app", "delete", "-a", "filler"], &[]).ok);
    assert_eq!(mounts_under(&runner_dir), expected);
    let last = RunnerProc::start(
        &runner_dir,
        None,
        &["--isolation", "bwrap", "--token-file-ttl", "60s"],
    );
    assert!(
        wait_for(Duration::from_secs(30), || mounts_under(&runner_dir)
            .is_empty()
            && !sandbox.exists()),
        "left behind: {:?}\n{}",
        mounts_under(&runner_dir),
        last.output()
    );
}

/// The mount points under `dir`, sorted (a path mounted twice is listed
/// twice).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort();
    points
}

/// Disk used under `dir` (files only), in bytes.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(m) = std::fs::symlink_metadata(e.path()) {
                total += if m.is_dir() {
                    disk_use(&e.path())
                } else {
                    m.len()
                };
            }
        }
    }
    total
}

fn sandbox_of(cfg: &Path, app: &str) -> Value {
    integration_tests::app_status(cfg, app)["sandboxes"][0].clone()
}

#[test]
fn limits_hold_a_fork_loop_a_log_flood_and_a_memory_hog() {
    let c = one_runner("bwrap", &[]);
    let runner = runners(&c.cfg).into_iter().next().expect("runner");
    assert!(
        runner["limits"]
            .as_str()
            .is_some_and(|l| l.starts_with("cgroup v")),
        "this test needs cgroups (root, memory/pids/cpu controllers): {runner}"
    );
    let app = hostile_app(
        c.dir.path(),
        "hog",
        &[],
        // Memory for the fork loop's children too: each is a Python that
        // writes to ~1 MiB of the pages it shares with its parent, so 127
        // of them fill 128 MiB, and the kernel would kill the app for its
        // memory before its pids stop it.
        "[services.web.limits]\nmemory = \"256MiB\"\npids = 128\ncpus = 1\n",
    );
    deploy(&c.cfg, &app, "hog");
    let id = sandbox_of(&c.cfg, "hog")["id"]
        .as_str()
        .expect("sandbox id")
        .to_string();

    // A fork loop stops at the pids limit.
    let (code, forks) = get(&c, "hog", "/fork-loop/1000");
    assert_eq!(
        code,
        200,
        "{forks}\nlogs: {}\nrunner: {}",
        logs(&c.cfg, "hog", "20"),
        c.runner.output()
    );
    let started = forks["started"].as_u64().expect("started");
    assert!(started < 128, "{forks}");
    assert_eq!(
        forks["error"], "Resource temporarily unavailable",
        "{forks}"
    );

    // A 200 MiB flood and a 16 MiB line: the runner stays up, the logs
    // stay within their budget, the huge line is cut and marked.
    let (code, _) = get(&c, "hog", "/flood/200");
    assert_eq!(code, 200);
    assert!(
        wait_for(Duration::from_secs(120), || logs(&c.cfg, "hog", "5")
            .contains("flood done")),
        "the flood never ended: {}",
        c.runner.output()
    );
    let (code, _) = get(&c, "hog", "/huge-line/16");
    assert_eq!(code, 200);
    assert!(wait_for(Duration::from_secs(60), || logs(
        &c.cfg, "hog", "5"
    )
    .contains("after the huge line")));
    let printed = logs(&c.cfg, "hog", "3");
    assert!(
        printed.contains("[line cut at 16 KiB]"),
        "{}",
        &printed[..printed.len().min(300)]
    );
    let used = disk_use(&c.dir.path().join("runner/sandboxes").join(&id).join("logs"));
    assert!(
        used <= 10 * 1024 * 1024 + 64 * 1024,
        "logs hold {used} bytes"
    );
    assert!(
        runners(&c.cfg)[0]["status"] == "ready",
        "{}",
        c.runner.output()
    );

    // Over its memory: killed, restarted, the reason shown.
    let _ = get(&c, "hog", "/allocate/1024");
    assert!(
        wait_for(Duration::from_secs(60), || {
            let sb = sandbox_of(&c.cfg, "hog");
            sb["restarts"].as_u64().unwrap_or(0) >= 1
                && sb["last_exit"] == "out of memory (limit 256MiB)"
        }),
        "no out-of-memory restart: {}",
        sandbox_of(&c.cfg, "hog")
    );
    let status = miren(&c.cfg, &["app", "status", "-a", "hog"], &[]);
    assert!(
        status.stdout.contains("out of memory (limit 256MiB)"),
        "{status:?}"
    );
    assert!(wait_for(Duration::from_secs(30), || get(
        &c, "hog", "/report"
    )
    .0 == 200));

    // An app asking more than the runner allows is refused with the reason.
    let greedy = hostile_app(
        c.dir.path(),
        "greedy",
        &[],
        "[services.web.limits]\nmemory = \"64TiB\"\n",
    );
    let run = miren(
        &c.cfg,
        &[
            "deploy",
            "--dir",
            greedy.to_str().expect("utf-8"),
            "-a",
            "greedy",
        ],
        &[],
    );
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("memory"), "{run:?}");
}
