//! The commands of the CI/CD deployment page, pasted as documented
//! (issue 13): `miren version`, `miren auth ci APP …` in each documented
//! form, listing and removing bindings, and a minimal `MIREN_CONFIG` file
//! against a cluster with its own CA (the route OIDC page's forms are
//! walked against a real provider in `route_oidc_provider.rs`).

use integration_tests::{miren, temp, Server};
use serde_json::Value;

fn bindings(cfg: &std::path::Path, app: &str) -> Vec<Value> {
    let run = miren(cfg, &["auth", "ci", "list", "-a", app, "-o", "json"], &[]);
    assert!(run.ok, "{run:?}");
    serde_json::from_str::<Value>(&run.stdout)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn the_ci_deployment_page_works_as_documented() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);

    // The install step runs `miren version` under `set -euo pipefail`.
    let v = miren(&cfg, &["version"], &[]);
    assert!(v.ok, "{v:?}");
    assert!(v.stdout.starts_with("miren "), "{v:?}");
    assert!(
        v.stdout.contains("commit ") && v.stdout.contains("built "),
        "{v:?}"
    );
    let long = miren(&cfg, &["--version"], &[]);
    assert_eq!(long.stdout, v.stdout);
    let status = miren(&cfg, &["cluster", "status", "-o", "json"], &[]);
    let status: Value = serde_json::from_str(&status.stdout).expect("status json");
    assert!(
        status["version"]
            .as_str()
            .is_some_and(|s| s.contains("commit ")),
        "{status}"
    );

    // Step 2 of the quick start, and its variants.
    let add = miren(
        &cfg,
        &["auth", "ci", "myapp", "--github", "acme/web-app"],
        &[],
    );
    assert!(add.ok, "{add:?}");
    for shown in [
        "App          myapp",
        "Provider     github",
        "Issuer       https://token.actions.githubusercontent.com",
        "Subject      repo:acme/web-app:*",
        "event_name=push,workflow_dispatch",
        "repository=acme/web-app",
    ] {
        assert!(
            add.stdout.contains(shown),
            "missing {shown:?}: {}",
            add.stdout
        );
    }
    let runs = [
        vec![
            "auth",
            "ci",
            "myapp",
            "--github",
            "acme/web-app",
            "--subject",
            "repo:acme/web-app:ref:refs/heads/main",
        ],
        vec![
            "auth",
            "ci",
            "myapp",
            "--github",
            "acme/web-app",
            "--allowed-events",
            "push,workflow_dispatch,pull_request",
        ],
        vec![
            "auth",
            "ci",
            "myapp",
            "--github",
            "acme/web-app",
            "--allowed-refs",
            "refs/heads/main",
            "--description",
            "main branch only",
        ],
        vec![
            "auth",
            "ci",
            "myapp",
            "--issuer",
            "https://gitlab.com",
            "--subject",
            "project_path:acme/web-app:ref_type:branch:ref:main",
        ],
        vec!["auth", "ci", "add", "-a", "myapp", "--github", "acme/other"],
    ];
    for args in &runs {
        let run = miren(&cfg, args, &[]);
        assert!(run.ok, "{args:?}: {run:?}");
    }
    // MIREN_APP names the app too.
    let env = miren(
        &cfg,
        &["auth", "ci", "--github", "acme/env"],
        &[("MIREN_APP", "myapp")],
    );
    assert!(env.ok, "{env:?}");
    let list = bindings(&cfg, "myapp");
    assert_eq!(list.len(), runs.len() + 2, "{list:?}");
    let events = list
        .iter()
        .find(|b| b["conditions"].to_string().contains("pull_request"))
        .expect("the comma list became one condition");
    let patterns = events["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["claim"] == "event_name"))
        .map(|c| c["patterns"].clone());
    assert_eq!(
        patterns,
        Some(serde_json::json!([
            "push",
            "workflow_dispatch",
            "pull_request"
        ]))
    );
    assert!(list.iter().any(|b| b["issuer"] == "https://gitlab.com"));
    assert!(list.iter().any(|b| b["description"] == "main branch only"));

    // Without an app, a clear error, and nothing is created.
    let none = miren(&cfg, &["auth", "ci", "--github", "acme/web-app"], &[]);
    assert!(!none.ok && none.stderr.contains("which app"), "{none:?}");
    assert_eq!(bindings(&cfg, "myapp").len(), runs.len() + 2);

    let id = list[0]["id"].as_str().expect("id").to_string();
    let rm = miren(&cfg, &["auth", "ci", "remove", &id], &[]);
    assert!(rm.ok, "{rm:?}");
    assert_eq!(bindings(&cfg, "myapp").len(), runs.len() + 1);

    // The documented minimal client config, against a cluster with its own
    // CA: an error that says what to add, then it works once added.
    let host_port = server.host_port().to_string();
    let minimal = dir.path().join("clientconfig.yaml");
    std::fs::write(
        &minimal,
        format!(
            "active_cluster: production\nclusters:\n  production:\n    hostname: {host_port}\n"
        ),
    )
    .expect("config");
    let bare = |config: &std::path::Path| miren(config, &["cluster", "status"], &[]);
    let refused = bare(&minimal);
    assert!(!refused.ok, "{refused:?}");
    assert!(
        refused.stderr.contains("add `fingerprint: sha1:<hex>`"),
        "{refused:?}"
    );
    let export = miren(&cfg, &["cluster", "export-address"], &[]);
    let fingerprint = export
        .stdout
        .trim()
        .split_once(';')
        .map(|(_, fp)| fp.to_string())
        .expect("address with fingerprint");
    std::fs::write(
        &minimal,
        format!(
            "active_cluster: production\nclusters:\n  production:\n    hostname: {host_port}\n    fingerprint: {fingerprint}\n"
        ),
    )
    .expect("config");
    let pinned = bare(&minimal);
    assert!(pinned.ok, "{pinned:?}");
}
