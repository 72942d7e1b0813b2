//! Journey 3, first part: CI authentication bindings through the real CLI.

use integration_tests::{miren, temp, Server};
use serde_json::Value;

#[test]
fn bindings_are_added_listed_refused_and_removed() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("data"), &cfg, "127.0.0.1:0", &[]);

    let empty = miren(&cfg, &["auth", "ci", "list", "-a", "web"], &[]);
    assert!(empty.ok, "{empty:?}");
    assert_eq!(
        empty.stdout.trim(),
        "No CI authentication bindings found for app web"
    );

    let add = miren(
        &cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--github",
            "acme/web-app",
            "--allowed-refs",
            "refs/heads/main,refs/tags/v*",
        ],
        &[],
    );
    assert!(add.ok, "{add:?}");
    let id = add
        .stdout
        .trim()
        .strip_prefix("Added CI authentication binding ")
        .and_then(|r| r.split_whitespace().next())
        .expect("id in the output")
        .to_string();

    let list = miren(
        &cfg,
        &["auth", "ci", "list", "-a", "web", "-o", "json"],
        &[],
    );
    let v: Value = serde_json::from_str(&list.stdout).unwrap();
    let b = &v[0];
    assert_eq!(b["id"], id.as_str());
    assert_eq!(b["provider"], "github");
    assert_eq!(b["issuer"], "https://token.actions.githubusercontent.com");
    assert_eq!(b["subject"], "repo:acme/web-app:*");
    let table = miren(&cfg, &["auth", "ci", "list", "-a", "web"], &[]);
    for col in ["ID", "PROVIDER", "ISSUER", "SUBJECT", "CONDITIONS"] {
        assert!(table.stdout.contains(col), "{}", table.stdout);
    }
    assert!(
        table.stdout.contains("event_name=push,workflow_dispatch"),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("ref=refs/heads/main,refs/tags/v*"),
        "{}",
        table.stdout
    );

    for bad in ["acme", "/web-app", "acme/", "acme/web-app/extra"] {
        let r = miren(
            &cfg,
            &["auth", "ci", "add", "-a", "web", "--github", bad],
            &[],
        );
        assert!(!r.ok, "{bad} accepted");
    }
    // A binding that pins no caller.
    let r = miren(
        &cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            "https://gitlab.example.com",
            "--subject",
            "*",
            "--allowed-events",
            "push",
        ],
        &[],
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("pin"), "{}", r.stderr);
    // Not https; and a loopback issuer without --oidc-allow-loopback-issuers.
    let r = miren(
        &cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            "http://ci.example.com",
            "--subject",
            "project_path:g/p:*",
        ],
        &[],
    );
    assert!(!r.ok);
    let r = miren(
        &cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            "https://127.0.0.1:8443",
            "--subject",
            "project_path:g/p:*",
        ],
        &[],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("--oidc-allow-loopback-issuers"),
        "{}",
        r.stderr
    );
    // GitLab-style generic binding.
    let r = miren(
        &cfg,
        &[
            "auth",
            "ci",
            "add",
            "-a",
            "web",
            "--issuer",
            "https://gitlab.example.com",
            "--subject",
            "project_path:acme/web:ref_type:branch:ref:main",
        ],
        &[],
    );
    assert!(r.ok, "{r:?}");

    let status = miren(&cfg, &["cluster", "status", "-o", "json"], &[]);
    let s: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["ci_bindings"], 2);

    let rm = miren(&cfg, &["auth", "ci", "remove", &id], &[]);
    assert!(rm.ok, "{rm:?}");
    assert_eq!(
        rm.stdout.trim(),
        format!("Removed CI authentication binding {id}")
    );
    let again = miren(&cfg, &["auth", "ci", "remove", &id], &[]);
    assert!(!again.ok);
    let list = miren(
        &cfg,
        &["auth", "ci", "list", "-a", "web", "-o", "json"],
        &[],
    );
    let v: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
}
