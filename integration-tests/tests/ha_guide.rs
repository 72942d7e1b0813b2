//! `deploy/ha/README.md`, followed as written: the three-machine guide's own
//! files run here, not a copy of their flags. The certificates come from
//! `deploy/ha/etcd-certs.sh`, each etcd member is started with the
//! variables of `deploy/ha/etcd.env` (filled in as the guide's `sed` does),
//! and the coordinators run the `ExecStart` line of
//! `deploy/systemd/miren-server-etcd.service` with the environment the guide
//! puts in `/etc/miren/etcd.env`. Three "machines" are 127.0.0.11–13 on
//! loopback (each member's certificate also names 127.0.0.1, the source
//! address of loopback connections, which etcd checks against a peer's
//! certificate).
//!
//! Checked: etcd with client and peer TLS comes up healthy; the first
//! coordinator creates the cluster on it; a second joins with
//! `miren cluster coordinator-code`, given as `MIREN_JOIN_CODE` in the
//! unit's environment file (never on the command line); both
//! are listed by `cluster status` and `export-address`; the backup of
//! section 7 is taken with the guide's `etcdctl` environment and holds no
//! private key in the clear; a coordinator removed as section 6 says lapses
//! from `cluster status`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::{free_port, miren_within, repo_root, temp, wait_for, Server};

const MEMBERS: [(&str, &str); 3] = [
    ("m1", "127.0.0.11"),
    ("m2", "127.0.0.12"),
    ("m3", "127.0.0.13"),
];

/// The etcd members, killed when the test ends.
struct Members(Vec<Child>);

impl Drop for Members {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `KEY=VALUE` lines of an environment file (comments and blanks skipped).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The guide's `etcdctl` environment (section 3), with the test's paths;
/// `one` replaces the endpoints with one member's, as section 7 does.
fn etcdctl(pki: &Path, one: Option<&str>, args: &[&str]) -> std::process::Output {
    let endpoints = match one {
        Some(e) => e.to_string(),
        None => MEMBERS
            .iter()
            .map(|(_, ip)| format!("https://{ip}:2379"))
            .collect::<Vec<_>>()
            .join(","),
    };
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_CACERT", pki.join("ca.crt"))
        .env("ETCDCTL_CERT", pki.join("client.crt"))
        .env("ETCDCTL_KEY", pki.join("client.key"))
        .env("ETCDCTL_ENDPOINTS", endpoints)
        .args(args)
        .output()
        .expect("etcdctl (Debian's etcd-client)")
}

/// The arguments after `miren` in the unit's `ExecStart`, with systemd's
/// substitutions done from `env` (`${X}` one word, `$X` split on spaces and
/// gone when empty) and `%H` the host name.
fn unit_args(unit: &str, env: &HashMap<&str, String>, host: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart line");
    let mut words = Vec::new();
    for word in line.split_whitespace().skip(1) {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = word.strip_prefix('$') {
            let value = env.get(name).cloned().unwrap_or_default();
            words.extend(value.split_whitespace().map(str::to_string));
        } else {
            words.push(word.replace("%H", host));
        }
    }
    words
}

/// A coordinator started from the unit's command line: the data dir,
/// listen address and file paths are the test's, every other flag the
/// unit's own.
fn coordinator_from_unit(
    dir: &Path,
    name: &str,
    pki_for_miren: &Path,
    env: &HashMap<&str, String>,
) -> Server {
    let unit =
        std::fs::read_to_string(repo_root().join("deploy/systemd/miren-server-etcd.service"))
            .expect("the coordinator's unit on etcd");
    let mut args = unit_args(&unit, env, "127.0.0.1");
    assert_eq!(args.first().map(String::as_str), Some("server"), "{args:?}");
    args.remove(0);
    // Server::start gives --data-dir and --listen itself.
    for flag in ["--data-dir", "--listen"] {
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the unit gives {flag}: {args:?}"));
        args.drain(at..at + 2);
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    for a in &mut args {
        if a.starts_with("/etc/miren/etcd/") {
            *a = a.replace("/etc/miren/etcd", &pki_for_miren.display().to_string());
        } else if a == "127.0.0.1:9464" {
            a.clone_from(&metrics);
        }
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // The environment file reaches the process too (systemd exports it).
    let environment: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_env(
        &dir.join(format!("data-{name}")),
        &dir.join(format!("{name}.yaml")),
        "127.0.0.1:0",
        &refs,
        &environment,
    )
}

fn status(server: &Server) -> serde_json::Value {
    let run = miren_within(
        &server_config(server),
        &["cluster", "status", "-o", "json"],
        &[],
        Duration::from_secs(60),
    );
    assert!(run.ok, "{run:?}");
    serde_json::from_str(&run.stdout).expect("cluster status -o json")
}

fn server_config(server: &Server) -> PathBuf {
    server.config.clone()
}

/// GET `path` on `server`'s HTTPS listener, trusting the cluster CA of `ca`.
fn https_get(server: &Server, ca: &Path, path: &str) -> (u16, String) {
    let pem = std::fs::read(ca).expect("the cluster CA");
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"))
        .build()
        .expect("HTTPS client");
    let response = client
        .get(format!("https://{}{path}", server.host_port()))
        .send()
        .expect("HTTPS GET");
    let code = response.status().as_u16();
    (code, response.text().unwrap_or_default())
}

#[test]
fn the_three_machine_guide_works_as_written() {
    let dir = temp();
    let pki = dir.path().join("etcd-pki");
    let guide = repo_root().join("deploy/ha");

    // 2. TLS for etcd.
    let mut certs = Command::new(guide.join("etcd-certs.sh"));
    certs.arg(&pki);
    for (name, ip) in MEMBERS {
        certs.arg(format!("{name}={ip},127.0.0.1"));
    }
    let made = certs.output().expect("etcd-certs.sh");
    assert!(
        made.status.success(),
        "etcd-certs.sh: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    // 3. etcd, each member from etcd.env filled in.
    let template = std::fs::read_to_string(guide.join("etcd.env")).expect("etcd.env");
    let cluster = MEMBERS
        .iter()
        .map(|(n, ip)| format!("{n}=https://{ip}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Members(Vec::new());
    for (name, ip) in MEMBERS {
        let filled = template
            .replace("@NAME@", name)
            .replace("@IP@", ip)
            .replace("@CLUSTER@", &cluster)
            .replace("/etc/etcd/pki", &pki.display().to_string())
            .replace(
                "/var/lib/etcd/miren",
                &dir.path()
                    .join(format!("etcd-{name}"))
                    .display()
                    .to_string(),
            );
        let log = std::fs::File::create(dir.path().join(format!("etcd-{name}.log"))).expect("log");
        let mut cmd = Command::new("etcd");
        cmd.env_clear()
            .envs(env_file(&filled))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        members
            .0
            .push(cmd.spawn().expect("etcd (Debian's etcd-server)"));
    }
    let healthy = wait_for(Duration::from_secs(60), || {
        etcdctl(&pki, None, &["endpoint", "health"])
            .status
            .success()
    });
    let logs = || {
        MEMBERS
            .iter()
            .map(|(n, _)| {
                let log = std::fs::read_to_string(dir.path().join(format!("etcd-{n}.log")))
                    .unwrap_or_default();
                format!("--- {n}\n{}", integration_tests::tail(&log, 15))
            })
            .collect::<String>()
    };
    assert!(
        healthy,
        "etcd with the guide's TLS never became healthy\n{}",
        logs()
    );

    // 4. The first coordinator, from the unit.
    let endpoints = MEMBERS
        .iter()
        .map(|(_, ip)| format!("https://{ip}:2379"))
        .collect::<Vec<_>>()
        .join(",");
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("MIREN_ETCD", endpoints.clone());
    env.insert("MIREN_ISSUER_URL", "https://miren.example.com".to_string());
    let first = coordinator_from_unit(dir.path(), "first", &pki, &env);

    // 5. A coordinator added with a code, in the environment file.
    let code = miren_within(
        &server_config(&first),
        &["cluster", "coordinator-code", "--ttl", "30m"],
        &[],
        Duration::from_secs(60),
    );
    assert!(code.ok, "{code:?}");
    env.insert("MIREN_JOIN_CODE", code.stdout.trim().to_string());
    let second = coordinator_from_unit(dir.path(), "second", &pki, &env);
    // Never on its command line, where every user of the machine reads it.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", second.pid())).expect("cmdline");
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(code.stdout.trim()),
        "the join code is on the command line"
    );
    let listed = wait_for(Duration::from_secs(30), || {
        status(&first)["coordinators"]
            .as_array()
            .is_some_and(|l| l.len() == 2)
    });
    assert!(listed, "{}", status(&first));
    // Health as `cluster status` probes it: each answers on its own address.
    let st = status(&first);
    for row in st["coordinators"].as_array().into_iter().flatten() {
        assert_eq!(row["reachable"], true, "{st}");
        assert!(row["rtt_ms"].is_u64(), "{st}");
    }
    let exported = miren_within(
        &server_config(&first),
        &["cluster", "export-address"],
        &[],
        Duration::from_secs(60),
    );
    assert!(
        exported.ok
            && exported.stdout.contains(first.host_port())
            && exported.stdout.contains(second.host_port()),
        "{exported:?}"
    );
    // One issuer for the cluster: both serve the unit's issuer URL.
    for s in [&first, &second] {
        let (code, body) = https_get(s, &first.ca_file(), "/.well-known/openid-configuration");
        assert_eq!(code, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("discovery JSON");
        assert_eq!(doc["issuer"], "https://miren.example.com", "{doc}");
    }

    // 7. Backup: the snapshot holds the records, never a key in the clear.
    let snap = dir.path().join("backup.db");
    let saved = etcdctl(
        &pki,
        Some("https://127.0.0.11:2379"),
        &["snapshot", "save", &snap.display().to_string()],
    );
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let bytes = std::fs::read(&snap).expect("the snapshot");
    assert!(bytes.len() > 1024, "a snapshot of {} bytes", bytes.len());
    assert!(
        !bytes.windows(11).any(|w| w == b"PRIVATE KEY"),
        "a private key is in the clear in the etcd snapshot"
    );
    assert!(
        bytes
            .windows(b"coordinator/".len())
            .any(|w| w == b"coordinator/"),
        "the snapshot holds the cluster's records"
    );

    // 6. Removing a coordinator: shown unreachable, never healthy, until
    // its entry lapses.
    let second_address = second.host_port().to_string();
    let (_, _) = second.stop();
    let lapsed = wait_for(Duration::from_secs(40), || {
        let st = status(&first);
        let rows = st["coordinators"].as_array().cloned().unwrap_or_default();
        for row in &rows {
            if row["address"] == second_address.as_str() {
                assert_eq!(
                    row["reachable"], false,
                    "a stopped coordinator shown healthy: {st}"
                );
                assert!(row["error"].is_string(), "{st}");
            }
        }
        rows.len() == 1
    });
    assert!(lapsed, "{}", status(&first));
    drop(members);
}
