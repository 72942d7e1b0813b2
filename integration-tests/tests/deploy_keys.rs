//! Journey 5 (deploy keys): `miren auth key create` prints one string, and
//! `MIREN_API_KEY=… miren deploy` with nothing else set deploys; Authlib
//! (a standard client) trades the key with HTTP Basic and in the form; the
//! token verifies with PyJWT; the key cannot touch another app or an admin
//! command; rotation keeps both secrets working for the overlap; expired,
//! revoked and rotated-out keys are refused with their reason; `app
//! delete` takes the app's keys with it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{authlib, miren_bin, outside_verify, Cluster, Run};
use serde_json::Value;

/// Runs the CLI as a CI job without OIDC would: only `MIREN_API_KEY` (and
/// `MIREN_APP`), an empty home, no client config.
fn with_key(home: &Path, key: &str, args: &[&str]) -> Run {
    Command::new(miren_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("MIREN_CONFIG", home.join("none.yaml"))
        .env("MIREN_API_KEY", key)
        .env("MIREN_APP", "web")
        .output()
        .expect("running miren")
        .into()
}

fn json(run: &Run) -> Value {
    assert!(run.ok, "{run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[test]
fn a_deploy_key_alone_deploys_its_app_and_nothing_else() {
    let c = Cluster::start(1, &[]);
    let iss = c.server().issuer_url();
    let ca = c.server().ca_file();
    let ca = ca.to_str().unwrap();
    let token_url = format!("{}/oauth2/token", iss.trim_end_matches('/'));
    let api_audience = format!("{}/cluster-api", iss.trim_end_matches('/'));
    let home = c.path().join("job");
    std::fs::create_dir_all(&home).unwrap();

    let made = json(&c.miren(&[
        "auth",
        "key",
        "create",
        "-a",
        "web",
        "--description",
        "jenkins",
        "-o",
        "json",
    ]));
    let key = made["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("miren_key_"), "{made}");
    let (id, secret) = (
        made["client_id"].as_str().unwrap().to_string(),
        made["client_secret"].as_str().unwrap().to_string(),
    );
    let expires = made["expires_at"].as_i64().unwrap() - made["created_at"].as_i64().unwrap();
    assert_eq!(expires, 90 * 86_400, "90 days by default");
    let too_long = c.miren(&["auth", "key", "create", "-a", "web", "--expires", "400d"]);
    assert!(
        !too_long.ok && too_long.stderr.contains("365d"),
        "{too_long:?}"
    );

    // MIREN_API_KEY alone deploys.
    let app_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/example-app");
    let deployed = with_key(&home, &key, &["deploy", "--dir", app_dir.to_str().unwrap()]);
    assert!(deployed.ok, "{deployed:?}");
    assert!(deployed.stdout.contains("Deployed web v1"), "{deployed:?}");
    assert!(!deployed.stdout.contains(&secret) && !deployed.stderr.contains(&secret));
    let status = with_key(&home, &key, &["app", "status", "-a", "web", "-o", "json"]);
    assert!(status.ok, "{status:?}");

    // ... and nothing else: another app, an admin command.
    let other = with_key(&home, &key, &["app", "status", "-a", "api"]);
    assert!(!other.ok, "{other:?}");
    assert!(other.stderr.contains("invalid_scope"), "{other:?}");
    assert!(other.stderr.contains("for app \"web\" only"), "{other:?}");
    for admin in [&["app", "delete", "-a", "web"][..], &["runner", "list"][..]] {
        let r = with_key(&home, &key, admin);
        assert!(!r.ok, "{admin:?}: {r:?}");
        assert!(r.stderr.contains("deploy key"), "{admin:?}: {r:?}");
    }

    // Authlib, with HTTP Basic and in the form; PyJWT verifies the token.
    for how in ["basic", "post"] {
        let (ok, t) = authlib(&[
            "client_credentials",
            how,
            &token_url,
            ca,
            &id,
            &secret,
            "app:web",
        ]);
        assert!(ok, "{how}: {t}");
        let (ok, report) = outside_verify(
            &iss,
            Path::new(ca),
            &api_audience,
            t["access_token"].as_str().unwrap(),
        );
        assert!(ok, "{report}");
        assert_eq!(report["header"]["typ"], "at+jwt");
        let claims = &report["claims"];
        assert_eq!(claims["sub"], format!("key:{id}"));
        assert_eq!(claims["client_id"], id.as_str());
        assert_eq!(
            claims["scope"],
            "app:web:deploy app:web:status app:web:logs"
        );
        assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 900);
        assert!(claims.get("act").is_none());
    }
    let (ok, t) = authlib(&[
        "client_credentials",
        "basic",
        &token_url,
        ca,
        &id,
        "not-the-secret",
        "app:web",
    ]);
    assert!(!ok && t["error"] == "invalid_client", "{t}");

    // The listing shows the use and never a secret.
    let list = c.miren(&["auth", "key", "list", "-a", "web", "-o", "json"]);
    assert!(!list.stdout.contains(&secret), "{list:?}");
    let listed = json(&list);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["description"], "jenkins");
    assert!(listed[0]["last_used_at"].as_i64().is_some(), "{listed}");
    let table = c.miren(&["auth", "key", "list", "-a", "web"]);
    assert!(table.ok && table.stdout.contains("LAST USED") && table.stdout.contains(&id));

    // Rotation: both secrets work during the overlap; after a rotation
    // without overlap the replaced one is refused with its reason.
    let rotated = json(&c.miren(&[
        "auth",
        "key",
        "rotate",
        &id,
        "--overlap",
        "1h",
        "-o",
        "json",
    ]));
    let second = rotated["client_secret"].as_str().unwrap().to_string();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    for s in [&secret, &second] {
        let (ok, t) = authlib(&[
            "client_credentials",
            "post",
            &token_url,
            ca,
            &id,
            s,
            "app:web",
        ]);
        assert!(ok, "during the overlap: {t}");
    }
    let third = json(&c.miren(&[
        "auth",
        "key",
        "rotate",
        &id,
        "--overlap",
        "0s",
        "-o",
        "json",
    ]));
    let (ok, t) = authlib(&[
        "client_credentials",
        "post",
        &token_url,
        ca,
        &id,
        &second,
        "app:web",
    ]);
    assert!(!ok && t["error"] == "invalid_client", "{t}");
    assert!(
        t["error_description"].as_str().unwrap().contains("rotate"),
        "{t}"
    );
    let (ok, t) = authlib(&[
        "client_credentials",
        "post",
        &token_url,
        ca,
        &id,
        &secret,
        "app:web",
    ]);
    assert!(ok, "the first secret's overlap of 1h still runs: {t}");
    let current = third["key"].as_str().unwrap();
    let r = with_key(
        &home.join("fresh"),
        current,
        &["app", "status", "-a", "web"],
    );
    assert!(r.ok, "{r:?}");
    let r = with_key(
        &home.join("fresh2"),
        &new_key,
        &["app", "status", "-a", "web"],
    );
    assert!(!r.ok && r.stderr.contains("rotate"), "{r:?}");

    // A session logged in with the key before it is revoked: `logs -f`
    // asks for logs every second on the capability it bought, and must be
    // refused from the revocation on (a capability never outlives its key).
    let follow_home = home.join("follow");
    std::fs::create_dir_all(&follow_home).unwrap();
    let mut follow = Command::new(miren_bin())
        .args(["logs", "-a", "web", "-f"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &follow_home)
        .env("MIREN_CONFIG", follow_home.join("none.yaml"))
        .env("MIREN_API_KEY", current)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("miren logs -f");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f is running before the revocation"
    );

    // Revoked: refused at once, with its reason.
    let revoke = c.miren(&["auth", "key", "revoke", &id]);
    assert!(revoke.ok, "{revoke:?}");
    let ended = integration_tests::wait_for(std::time::Duration::from_secs(20), || {
        follow.try_wait().unwrap().is_some()
    });
    if !ended {
        let _ = follow.kill();
    }
    let out = follow.wait_with_output().expect("logs -f output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        ended && !out.status.success() && stderr.contains("revoked"),
        "the open session outlived the key's revocation: {stderr}"
    );
    let r = with_key(
        &home.join("fresh3"),
        current,
        &["app", "status", "-a", "web"],
    );
    assert!(!r.ok && r.stderr.contains("revoked"), "{r:?}");

    // Expired: refused with its reason.
    let short = json(&c.miren(&[
        "auth",
        "key",
        "create",
        "-a",
        "web",
        "--expires",
        "1s",
        "-o",
        "json",
    ]));
    std::thread::sleep(Duration::from_millis(2100));
    let (ok, t) = authlib(&[
        "client_credentials",
        "basic",
        &token_url,
        ca,
        short["client_id"].as_str().unwrap(),
        short["client_secret"].as_str().unwrap(),
        "app:web",
    ]);
    assert!(!ok && t["error"] == "invalid_client", "{t}");
    assert!(
        t["error_description"].as_str().unwrap().contains("expired"),
        "{t}"
    );

    // A key for another app cannot touch this one; `app delete` takes the
    // app's keys with it.
    let api = json(&c.miren(&["auth", "key", "create", "-a", "api", "-o", "json"]));
    let r = with_key(
        &home.join("fresh4"),
        api["key"].as_str().unwrap(),
        &["app", "status", "-a", "web"],
    );
    assert!(!r.ok && r.stderr.contains("for app \"api\" only"), "{r:?}");
    let deleted = c.miren(&["app", "delete", "-a", "web"]);
    assert!(deleted.ok, "{deleted:?}");
    let left = json(&c.miren(&["auth", "key", "list", "-a", "web", "-o", "json"]));
    assert_eq!(left, serde_json::json!([]), "{left}");
    let still = json(&c.miren(&["auth", "key", "list", "-a", "api", "-o", "json"]));
    assert_eq!(still.as_array().unwrap().len(), 1);
}
