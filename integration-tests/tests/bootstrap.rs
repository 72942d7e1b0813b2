//! Journey 1, cluster bootstrap, on real processes: `miren server` on a fresh
//! data dir, the CLI pinned by `MIREN_CLUSTER`, restarts, corrupt data dirs.

use std::os::unix::fs::PermissionsExt;

use integration_tests::{miren, temp, Server};

fn signing_key_files(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(data.join("keys"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .collect();
    v.sort();
    v
}

#[test]
fn pinned_cli_gets_status_and_wrong_fingerprint_is_refused() {
    let dir = temp();
    let admin_cfg = dir.path().join("admin.yaml");
    let server = Server::start(&dir.path().join("data"), &admin_cfg, "127.0.0.1:0", &[]);
    let addr = server.address.clone();
    let (_, fp) = addr
        .split_once(";sha1:")
        .expect("address has a fingerprint");
    assert_eq!(fp.len(), 40);
    assert!(fp
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));

    // The admin config written by the server exports the same address.
    let exported = miren(&admin_cfg, &["cluster", "export-address"], &[]);
    assert!(exported.ok, "{exported:?}");
    assert_eq!(exported.stdout.trim(), addr);

    // A CI-like client: no config, only MIREN_CLUSTER.
    let ci_cfg = dir.path().join("ci.yaml");
    let status = miren(
        &ci_cfg,
        &["cluster", "status", "-o", "json"],
        &[("MIREN_CLUSTER", &addr)],
    );
    assert!(status.ok, "{status:?}");
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(doc["identity"], "anonymous");
    // The server's build: `0.1.0 (commit …, built …)`.
    assert!(
        doc["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(&format!("{} (commit ", env!("CARGO_PKG_VERSION")))),
        "{doc}"
    );
    assert!(doc["issuer_url"].as_str().unwrap().starts_with("https://"));
    assert!(
        doc.get("uptime_secs").is_none(),
        "anonymous must not see counts"
    );

    // Upper-case hex and no `sha1:` prefix are the same address.
    let relaxed = format!("{};{}", server.host_port(), fp.to_uppercase());
    let status = miren(
        &ci_cfg,
        &["cluster", "status"],
        &[("MIREN_CLUSTER", &relaxed)],
    );
    assert!(status.ok, "{status:?}");

    // The same address with one wrong hex digit.
    let mut wrong = addr.clone();
    let last = if wrong.ends_with('0') { '1' } else { '0' };
    wrong.pop();
    wrong.push(last);
    let refused = miren(
        &ci_cfg,
        &["cluster", "status"],
        &[("MIREN_CLUSTER", &wrong)],
    );
    assert!(!refused.ok);
    let expected_fp = wrong.rsplit(':').next().unwrap();
    assert!(
        refused.stderr.contains(&format!(
            "TLS certificate fingerprint mismatch: got {fp}, expected {expected_fp}"
        )),
        "{}",
        refused.stderr
    );

    // MIREN_CLUSTER naming the configured address uses the admin identity.
    let status = miren(
        &admin_cfg,
        &["cluster", "status", "-o", "json"],
        &[("MIREN_CLUSTER", &addr)],
    );
    assert!(status.ok, "{status:?}");
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(doc["identity"], "admin");
    assert!(doc["uptime_secs"].is_u64());
    assert_eq!(doc["runners"], 0);
    assert_eq!(doc["signing_keys"], 1);

    let (ok, err) = server.stop();
    assert!(ok, "graceful shutdown on SIGTERM failed: {err}");
}

#[test]
fn restart_keeps_fingerprint_and_key() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let first = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let addr1 = first.address.clone();
    let keys1 = miren(&cfg, &["identity", "keys", "list", "-o", "json"], &[]);
    assert!(keys1.ok, "{keys1:?}");
    let key_files = signing_key_files(&data);
    assert_eq!(key_files.len(), 1);
    let key_pem = std::fs::read(&key_files[0]).unwrap();
    assert!(String::from_utf8_lossy(&key_pem).starts_with("-----BEGIN PRIVATE KEY-----"));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_files[0]), 0o600);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("ca.key")), 0o600);
    let (ok, err) = first.stop();
    assert!(ok, "{err}");

    let port = addr1.split(';').next().unwrap().rsplit(':').next().unwrap();
    let second = Server::start(&data, &cfg, &format!("127.0.0.1:{port}"), &[]);
    assert_eq!(
        second.address, addr1,
        "fingerprint or port changed on restart"
    );
    let keys2 = miren(&cfg, &["identity", "keys", "list", "-o", "json"], &[]);
    assert_eq!(keys1.stdout, keys2.stdout);
    assert_eq!(std::fs::read(&key_files[0]).unwrap(), key_pem);
    let status = miren(&cfg, &["cluster", "status"], &[("MIREN_CLUSTER", &addr1)]);
    assert!(status.ok, "{status:?}");
}

#[test]
fn corrupt_or_half_written_data_dir_is_refused_naming_the_file() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let (ok, err) = server.stop();
    assert!(ok, "{err}");

    // A corrupt signing key.
    let key = signing_key_files(&data).remove(0);
    let original = std::fs::read(&key).unwrap();
    std::fs::write(
        &key,
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Server::try_start(&data, &cfg, "127.0.0.1:0", &[])
        .err()
        .expect("a corrupt key must be refused");
    let name = key.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "error does not name {name}: {err}");
    // Nothing was regenerated behind our back.
    assert_eq!(signing_key_files(&data).len(), 1);
    std::fs::write(&key, &original).unwrap();

    // A corrupt CA certificate.
    let ca = data.join("ca.crt");
    let ca_pem = std::fs::read(&ca).unwrap();
    std::fs::write(&ca, b"not a certificate").unwrap();
    let err = Server::try_start(&data, &cfg, "127.0.0.1:0", &[])
        .err()
        .expect("a corrupt CA must be refused");
    assert!(err.contains("ca.crt"), "{err}");
    std::fs::write(&ca, &ca_pem).unwrap();

    // Half-written: material without cluster.json.
    std::fs::remove_file(data.join("cluster.json")).unwrap();
    let err = Server::try_start(&data, &cfg, "127.0.0.1:0", &[])
        .err()
        .expect("a half-written data dir must be refused");
    assert!(err.contains("half-written"), "{err}");
    assert_eq!(
        std::fs::read(&ca).unwrap(),
        ca_pem,
        "CA must not be regenerated"
    );
}

#[test]
fn cluster_add_switch_list_and_unreachable() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let server = Server::start(
        &dir.path().join("data"),
        &cfg,
        "127.0.0.1:0",
        &["--cluster-name", "one"],
    );

    let other_cfg = dir.path().join("other.yaml");
    let bad = miren(
        &other_cfg,
        &["cluster", "add", "x", server.host_port()],
        &[],
    );
    assert!(!bad.ok);
    assert!(bad.stderr.contains("no fingerprint"), "{}", bad.stderr);

    let add = miren(
        &other_cfg,
        &["cluster", "add", "prod", &server.address],
        &[],
    );
    assert!(add.ok, "{add:?}");
    let list = miren(&other_cfg, &["cluster", "list", "-o", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(doc[0]["name"], "prod");
    assert_eq!(doc[0]["address"], server.address.as_str());
    assert_eq!(doc[0]["active"], true);
    assert_eq!(doc[0]["identity"], "none");

    // A second, unreachable cluster; -C picks it, switch makes it active.
    let fp = server.address.split(";sha1:").nth(1).unwrap();
    let dead = format!("127.0.0.1:9;sha1:{fp}");
    assert!(miren(&other_cfg, &["cluster", "add", "dead", &dead], &[]).ok);
    let exported = miren(
        &other_cfg,
        &["-C", "dead", "cluster", "export-address"],
        &[],
    );
    assert_eq!(exported.stdout.trim(), dead);
    let unreachable = miren(&other_cfg, &["-C", "dead", "cluster", "status"], &[]);
    assert!(!unreachable.ok);
    assert!(
        unreachable.stderr.contains("127.0.0.1:9"),
        "{}",
        unreachable.stderr
    );
    assert!(
        unreachable.stderr.contains("check"),
        "{}",
        unreachable.stderr
    );

    let status = miren(&other_cfg, &["cluster", "status", "-o", "json"], &[]);
    assert!(status.ok, "{status:?}");
    assert!(miren(&other_cfg, &["cluster", "switch", "dead"], &[]).ok);
    let list = miren(&other_cfg, &["cluster", "list", "-o", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let dead_entry = doc
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dead")
        .unwrap();
    assert_eq!(dead_entry["active"], true);
    let nope = miren(&other_cfg, &["cluster", "switch", "nope"], &[]);
    assert!(!nope.ok);
    assert!(
        nope.stderr.contains("no cluster named \"nope\""),
        "{}",
        nope.stderr
    );

    // Anonymous peers cannot reach admin methods.
    let keys = miren(&other_cfg, &["-C", "prod", "identity", "keys", "list"], &[]);
    assert!(!keys.ok);
    assert!(keys.stderr.contains("permission denied"), "{}", keys.stderr);
}

#[test]
fn dev_mode_is_ready_and_configures_the_cli() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let server = Server::start(&dir.path().join("data"), &cfg, "127.0.0.1:0", &["--dev"]);
    assert!(server
        .stdout
        .iter()
        .any(|l| l.contains("miren cluster status")));
    let status = miren(&cfg, &["cluster", "status", "-o", "json"], &[]);
    assert!(status.ok, "{status:?}");
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(doc["name"], "dev");
    assert_eq!(doc["identity"], "admin");
}

#[test]
fn a_rotation_interrupted_by_a_crash_leaves_a_usable_key_set() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let (ok, err) = server.stop();
    assert!(ok, "{err}");
    // A crash after the new key file was written but before the index named
    // it: an orphan RSA key and a leftover temporary index.
    let orphan = data.join("keys/rs256-9999999999-orphan00.pem");
    let made = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys;from cryptography.hazmat.primitives.asymmetric import rsa;from cryptography.hazmat.primitives import serialization as s;k=rsa.generate_private_key(public_exponent=65537,key_size=2048);open(sys.argv[1],'wb').write(k.private_bytes(s.Encoding.PEM,s.PrivateFormat.PKCS8,s.NoEncryption()))",
        ])
        .arg(&orphan)
        .status()
        .expect("python3");
    assert!(
        made.success(),
        "python cryptography is needed (./scripts/test.sh installs it)"
    );
    std::fs::write(data.join("keys/.index.json.tmp-4242"), b"{\"keys\": [").unwrap();
    let _server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let keys = miren(&cfg, &["identity", "keys", "list", "-o", "json"], &[]);
    assert!(keys.ok, "{keys:?}");
    let keys: serde_json::Value = serde_json::from_str(&keys.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys[0]["state"], "active");
    let token = miren(
        &cfg,
        &["identity", "token", "--app", "a", "--sandbox", "s"],
        &[],
    );
    assert!(token.ok, "{token:?}");
}
