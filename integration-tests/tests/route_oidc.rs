//! Route OIDC (labs): the labs gate and configuration errors. The browser
//! login flow at the ingress, against a real OpenID provider, lives in
//! `route_oidc_provider.rs`.

use integration_tests::{miren, temp, Server};

#[test]
fn route_oidc_is_gated_by_labs() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("data"), &cfg, "127.0.0.1:0", &[]);
    let r = miren(&cfg, &["route", "oidc", "providers"], &[]);
    assert!(!r.ok);
    assert!(r.stderr.contains("--labs routeoidc"), "{}", r.stderr);
    assert!(r.stderr.contains("MIREN_LABS=routeoidc"), "{}", r.stderr);
}

#[test]
fn route_oidc_needs_a_route() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(
        &dir.path().join("data"),
        &cfg,
        "127.0.0.1:0",
        &["--labs", "routeoidc"],
    );
    // The full configuration round trip runs in tests/apps.rs, where a
    // deployed app has a route.
    let r = miren(
        &cfg,
        &["route", "oidc", "enable", "app.test", "--provider", "x"],
        &[],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("miren route set app.test"),
        "{}",
        r.stderr
    );
}
