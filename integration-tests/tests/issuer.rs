//! The coordinator as an OIDC issuer, checked by an independent JWT library
//! (PyJWT) against the discovery document and JWKS it serves over HTTPS:
//! minting, rotation across a restart, legacy Ed25519 keys, issuer changes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{miren, outside_verify, temp, Server};
use serde_json::Value;

fn mint(cfg: &Path, args: &[&str]) -> String {
    let mut full = vec!["identity", "token"];
    full.extend_from_slice(args);
    let run = miren(cfg, &full, &[]);
    assert!(run.ok, "{run:?}");
    run.stdout.trim().to_string()
}

fn issuer_of(server: &Server) -> String {
    server
        .stdout
        .iter()
        .find_map(|l| l.strip_prefix("Issuer URL: "))
        .expect("issuer line")
        .to_string()
}

fn kid_of(token: &str) -> String {
    use std::io::Write;
    let header = token.split('.').next().unwrap();
    // base64url without padding -> JSON, via python to stay independent.
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys,base64,json;h=sys.stdin.read().strip();h+='='*(-len(h)%4);print(json.loads(base64.urlsafe_b64decode(h))['kid'])",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(header.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn tokens_verify_with_an_independent_library_across_rotation_and_restart() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let ca = data.join("ca.crt");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &["--jwks-max-age", "1s"]);
    let issuer = issuer_of(&server);

    let token = mint(
        &cfg,
        &[
            "--app",
            "web",
            "--sandbox",
            "sb-1",
            "--org",
            "acme",
            "--audience",
            "sts.amazonaws.com",
            "--ttl",
            "5m",
        ],
    );
    let (ok, report) = outside_verify(&issuer, &ca, "sts.amazonaws.com", &token);
    assert!(ok, "PyJWT refused our token: {report}");
    assert_eq!(report["discovery_content_type"], "application/json");
    assert_eq!(report["jwks_content_type"], "application/json");
    assert_eq!(report["jwks_cache_control"], "public, max-age=1");
    assert_eq!(
        report["discovery"]["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert_eq!(
        report["discovery"]["subject_types_supported"],
        serde_json::json!(["public"])
    );
    assert_eq!(
        report["discovery"]["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    let claims = &report["claims"];
    assert_eq!(claims["sub"], "org:acme:app:web:sandbox:sb-1");
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], serde_json::json!(["sts.amazonaws.com"]));
    assert_eq!(claims["app"], "web");
    assert_eq!(claims["sandbox_id"], "sb-1");
    assert_eq!(claims["organization_id"], "acme");
    assert_eq!(claims["iat"], claims["nbf"]);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
    assert_eq!(report["header"]["alg"], "RS256");
    assert_eq!(report["header"]["typ"], "JWT");

    // Wrong audience and a tampered payload are refused by the outside verifier.
    let (ok, report) = outside_verify(&issuer, &ca, "vault", &token);
    assert!(!ok, "wrong audience accepted: {report}");
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = parts[1].replacen('e', "f", 1);
    let (ok, _) = outside_verify(&issuer, &ca, "sts.amazonaws.com", &parts.join("."));
    assert!(!ok, "tampered token accepted");

    // Default audience and TTL.
    let default = mint(&cfg, &["--app", "web", "--sandbox", "sb-2"]);
    let (ok, report) = outside_verify(&issuer, &ca, "miren", &default);
    assert!(ok, "{report}");
    assert_eq!(report["claims"]["sub"], "app:web:sandbox:sb-2");
    assert!(report["claims"].get("organization_id").is_none());
    let c = &report["claims"];
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );

    // A ':' in a value is refused with the field named.
    let bad = miren(
        &cfg,
        &["identity", "token", "--app", "we:b", "--sandbox", "s"],
        &[],
    );
    assert!(!bad.ok);
    assert!(bad.stderr.contains("app"), "{}", bad.stderr);

    // Rotate: the new key is published first, signs after the cache lifetime.
    let old_kid = kid_of(&token);
    let rotated = miren(&cfg, &["identity", "keys", "rotate", "-o", "json"], &[]);
    assert!(rotated.ok, "{rotated:?}");
    let keys: Value = serde_json::from_str(&rotated.stdout).unwrap();
    let pending = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "pending")
        .expect("a pending key after rotate");
    let new_kid = pending["kid"].as_str().unwrap().to_string();
    assert_ne!(new_kid, old_kid);
    let (_, report) = outside_verify(&issuer, &ca, "sts.amazonaws.com", &token);
    let published: Vec<&str> = report["jwks"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        published.contains(&new_kid.as_str()),
        "pending key not published"
    );
    std::thread::sleep(Duration::from_millis(2200));

    // Restart on the same port; the old token still verifies, a new one
    // carries the new kid.
    let (ok, err) = server.stop();
    assert!(ok, "{err}");
    let port = issuer.rsplit(':').next().unwrap();
    let server = Server::start(
        &data,
        &cfg,
        &format!("127.0.0.1:{port}"),
        &["--jwks-max-age", "1s"],
    );
    assert_eq!(issuer_of(&server), issuer);
    let (ok, report) = outside_verify(&issuer, &ca, "sts.amazonaws.com", &token);
    assert!(
        ok,
        "token minted before rotation no longer verifies: {report}"
    );
    let fresh = mint(
        &cfg,
        &[
            "--app",
            "web",
            "--sandbox",
            "sb-1",
            "--audience",
            "sts.amazonaws.com",
        ],
    );
    assert_eq!(kid_of(&fresh), new_kid);
    let (ok, report) = outside_verify(&issuer, &ca, "sts.amazonaws.com", &fresh);
    assert!(ok, "{report}");
    let list = miren(&cfg, &["identity", "keys", "list", "-o", "json"], &[]);
    let keys: Value = serde_json::from_str(&list.stdout).unwrap();
    let state = |kid: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid)
            .map(|k| k["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state(&old_kid).as_deref(), Some("retired"));
    assert_eq!(state(&new_kid).as_deref(), Some("active"));
    let retired = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == old_kid.as_str())
        .unwrap();
    assert!(retired["retires_unix"].as_i64().unwrap() > 0);
}

#[test]
fn legacy_ed25519_key_is_published_but_never_signs() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let (ok, err) = server.stop();
    assert!(ok, "{err}");
    // An older data dir held an Ed25519 signing key.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/make_ed25519.py");
    let made = Command::new("python3")
        .arg(script)
        .arg(data.join("keys/legacy-ed25519.pem"))
        .status()
        .expect("python3");
    assert!(
        made.success(),
        "python cryptography is needed (./scripts/test.sh installs it)"
    );

    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let issuer = issuer_of(&server);
    let token = mint(&cfg, &["--app", "web", "--sandbox", "s1"]);
    let (ok, report) = outside_verify(&issuer, &data.join("ca.crt"), "miren", &token);
    assert!(ok, "{report}");
    assert_eq!(
        report["header"]["alg"], "RS256",
        "the legacy key must never sign"
    );
    assert_eq!(
        report["discovery"]["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256", "EdDSA"])
    );
    let okp = report["jwks"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "OKP")
        .expect("the Ed25519 key is published");
    assert_eq!(okp["alg"], "EdDSA");
    assert_eq!(okp["crv"], "Ed25519");
    let list = miren(&cfg, &["identity", "keys", "list", "-o", "json"], &[]);
    assert!(list.stdout.contains("\"legacy\""), "{}", list.stdout);
}

#[test]
fn previous_issuer_stays_accepted_after_issuer_url_changes() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let old_issuer = issuer_of(&server);
    let token = mint(&cfg, &["--app", "web", "--sandbox", "s1"]);
    let (ok, err) = server.stop();
    assert!(ok, "{err}");

    let bad = Server::try_start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--issuer-url", "http://insecure.example"],
    );
    let err = bad.err().expect("http issuer must be refused");
    assert!(err.contains("https"), "{err}");
    let bad = Server::try_start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--issuer-url", "https://x.example/?q=1"],
    );
    assert!(bad.is_err(), "issuer with a query must be refused");

    let server = Server::start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--issuer-url", "https://id.example.com/cluster"],
    );
    assert_eq!(issuer_of(&server), "https://id.example.com/cluster");
    let verified = miren(&cfg, &["identity", "verify", &token], &[]);
    assert!(
        verified.ok,
        "token of the previous issuer refused: {verified:?}"
    );
    assert!(verified.stdout.contains(&old_issuer));
    let fresh = mint(&cfg, &["--app", "web", "--sandbox", "s1"]);
    let verified = miren(&cfg, &["identity", "verify", &fresh], &[]);
    assert!(verified.ok, "{verified:?}");
    assert!(verified.stdout.contains("https://id.example.com/cluster"));
    // Forged: a token whose signature does not match.
    let mut forged: Vec<&str> = fresh.split('.').collect();
    forged[2] = "AAAA";
    let refused = miren(&cfg, &["identity", "verify", &forged.join(".")], &[]);
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("token refused"),
        "{}",
        refused.stderr
    );
}

#[test]
fn signing_key_rotates_automatically_and_old_tokens_keep_verifying() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--signing-key-rotation", "4s", "--jwks-max-age", "1s"],
    );
    let issuer = issuer_of(&server);
    let first = mint(&cfg, &["--app", "web", "--sandbox", "s1"]);
    let first_kid = kid_of(&first);
    let mut later = String::new();
    assert!(
        integration_tests::wait_for(Duration::from_secs(30), || {
            later = mint(&cfg, &["--app", "web", "--sandbox", "s1"]);
            kid_of(&later) != first_kid
        }),
        "no automatic rotation happened"
    );
    let (ok, report) = outside_verify(&issuer, &data.join("ca.crt"), "miren", &first);
    assert!(ok, "token of the rotated-out key refused: {report}");
    let (ok, report) = outside_verify(&issuer, &data.join("ca.crt"), "miren", &later);
    assert!(ok, "{report}");
    let list = miren(&cfg, &["identity", "keys", "list", "-o", "json"], &[]);
    let keys: Value = serde_json::from_str(&list.stdout).unwrap();
    assert!(keys
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == first_kid.as_str() && k["state"] == "retired"));
}
