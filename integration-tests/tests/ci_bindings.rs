//! Journey 3, first part: CI authentication bindings through the real CLI.

use integration_tests::{ci_add, miren, temp, Server};
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

    let add = ci_add(
        &cfg,
        "web",
        &[
            "--github",
            "acme/web-app",
            "--allowed-refs",
            "refs/heads/main,refs/tags/v*",
        ],
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
        let r = ci_add(&cfg, "web", &["--github", bad]);
        assert!(!r.ok, "{bad} accepted");
    }
    // A binding that pins no caller.
    let r = ci_add(
        &cfg,
        "web",
        &[
            "--issuer",
            "https://gitlab.example.com",
            "--subject",
            "*",
            "--allowed-events",
            "push",
        ],
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("pin"), "{}", r.stderr);
    // Not https; and a loopback issuer without --oidc-allow-loopback-issuers.
    let r = ci_add(
        &cfg,
        "web",
        &[
            "--issuer",
            "http://ci.example.com",
            "--subject",
            "project_path:g/p:*",
        ],
    );
    assert!(!r.ok);
    let r = ci_add(
        &cfg,
        "web",
        &[
            "--issuer",
            "https://127.0.0.1:8443",
            "--subject",
            "project_path:g/p:*",
        ],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("--oidc-allow-loopback-issuers"),
        "{}",
        r.stderr
    );
    // GitLab-style generic binding.
    let r = ci_add(
        &cfg,
        "web",
        &[
            "--issuer",
            "https://gitlab.example.com",
            "--subject",
            "project_path:acme/web:ref_type:branch:ref:main",
        ],
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

/// Issue 17: a pattern that admits other repositories or branches than
/// the binding names is refused, showing what else it would admit, unless
/// `--allow-broad` says it is meant; immutable ids are checked and listed.
#[test]
fn broad_patterns_are_refused_unless_allowed_and_ids_are_listed() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("data"), &cfg, "127.0.0.1:0", &[]);
    let add = |extra: &[&str]| ci_add(&cfg, "web", extra);
    let owner_wide = [
        "--issuer",
        "https://ci.example.com",
        "--subject",
        "repo:acme/*",
    ];
    let r = add(&owner_wide);
    assert!(!r.ok, "{r:?}");
    assert!(
        r.stderr.contains(
            "subject pattern \"repo:acme/*\" admits other repositories than it names, for \
             example \"repo:acme/other\"; name them exactly, or add --allow-broad if that is meant"
        ),
        "{}",
        r.stderr
    );
    let r = add(&["--github", "acme/web", "--allowed-refs", "refs/heads/main*"]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains(
            "condition ref pattern \"refs/heads/main*\" admits other branches than it names, \
             for example \"refs/heads/main-other\""
        ),
        "{}",
        r.stderr
    );
    let empty = miren(
        &cfg,
        &["auth", "ci", "list", "-a", "web", "-o", "json"],
        &[],
    );
    assert_eq!(empty.stdout.trim(), "[]", "a refused binding is not stored");

    let mut allowed = owner_wide.to_vec();
    allowed.push("--allow-broad");
    let r = add(&allowed);
    assert!(r.ok, "{r:?}");
    assert!(r.stdout.contains("Broad        allowed"), "{}", r.stdout);
    // A family of branches named on purpose needs no flag.
    let r = add(&[
        "--github",
        "acme/web",
        "--allowed-refs",
        "refs/heads/release/*,refs/tags/v*",
    ]);
    assert!(r.ok, "{r:?}");
    // GitLab's immutable ids.
    let r = add(&[
        "--issuer",
        "https://gitlab.example.com",
        "--subject",
        "project_path:acme/web:*",
        "--project-id",
        "4242",
        "--namespace-id",
        "17",
    ]);
    assert!(r.ok, "{r:?}");
    let r = add(&[
        "--issuer",
        "https://gitlab.example.com",
        "--subject",
        "project_path:acme/web:*",
        "--project-id",
        "42x",
    ]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("project_id \"42x\" is not an id"),
        "{}",
        r.stderr
    );
    // GitHub ids only with --github.
    let r = add(&[
        "--issuer",
        "https://gitlab.example.com",
        "--subject",
        "p:*",
        "--repository-id",
        "1",
    ]);
    assert!(!r.ok);

    let list = miren(
        &cfg,
        &["auth", "ci", "list", "-a", "web", "-o", "json"],
        &[],
    );
    let v: Value = serde_json::from_str(&list.stdout).unwrap();
    let all = v.as_array().unwrap();
    assert_eq!(all.len(), 3);
    let broad = all.iter().find(|b| b["subject"] == "repo:acme/*").unwrap();
    assert_eq!(broad["allow_broad"], true);
    let gitlab = all
        .iter()
        .find(|b| b["subject"] == "project_path:acme/web:*")
        .unwrap();
    assert_eq!(
        gitlab["ids"],
        serde_json::json!([
            {"claim": "project_id", "value": "4242"},
            {"claim": "namespace_id", "value": "17"}
        ])
    );
    let table = miren(&cfg, &["auth", "ci", "list", "-a", "web"], &[]);
    assert!(table.stdout.contains("IDS"), "{}", table.stdout);
    assert!(
        table.stdout.contains("project_id=4242 namespace_id=17"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains("repository_id,repository_owner_id pinned at first login"),
        "{}",
        table.stdout
    );
}
