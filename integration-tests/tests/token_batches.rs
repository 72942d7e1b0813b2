//! Token misses from several sandboxes leave a runner together in
//! `issueWorkloadTokens` calls (`runner::mint_calls`); each sandbox must
//! still get exactly the tokens it asked for. Two apps (the probe fixture
//! deployed twice on one runner) each ask their own endpoint for 24 new
//! audiences at once, both at the same time, so the runner's calls carry
//! both sandboxes' misses: every answer must be a token of the asking
//! sandbox's app and sandbox with the asked audience (the first of each
//! verified by PyJWT against the cluster's JWKS), and no token handed out
//! twice.

use std::collections::HashSet;
use std::thread;

use integration_tests::{http_get_host, miren, outside_verify, temp, ProbeCluster};
use serde_json::Value;

const PER_SANDBOX: usize = 24;

#[test]
fn concurrent_misses_of_two_sandboxes_each_get_their_own_tokens() {
    let dir = temp();
    let cluster = ProbeCluster::start(dir.path(), &["--http-listen", "127.0.0.1:0"], "alpha");
    cluster.deploy_probe("beta");
    for (host, app) in [("alpha.test", "alpha"), ("beta.test", "beta")] {
        let route = miren(&cluster.config, &["route", "set", host, "-a", app], &[]);
        assert!(route.ok, "{route:?}");
    }
    let ingress = cluster.server.printed_address("HTTP ingress: http://");

    let bursts: Vec<(&str, Value)> = thread::scope(|s| {
        let asks: Vec<_> = ["alpha", "beta"]
            .into_iter()
            .map(|app| {
                let ingress = ingress.clone();
                s.spawn(move || {
                    let path = format!("/token-burst?n={PER_SANDBOX}&tag={app}");
                    let (code, body) = http_get_host(&ingress, &format!("{app}.test"), &path)
                        .unwrap_or_else(|e| panic!("{app} unreachable: {e}"));
                    assert_eq!(code, 200, "{app}: {body}");
                    (
                        app,
                        serde_json::from_str(&body).expect("the probe reports JSON"),
                    )
                })
            })
            .collect();
        asks.into_iter()
            .map(|a| a.join().expect("asking thread"))
            .collect()
    });

    let issuer = cluster.server.issuer_url();
    let ca = cluster.server.ca_file();
    let mut seen = HashSet::new();
    let mut subjects = HashSet::new();
    for (app, report) in &bursts {
        let results = report.as_array().expect("a list of answers");
        assert_eq!(results.len(), PER_SANDBOX, "{report}");
        for (i, r) in results.iter().enumerate() {
            let audience = format!("{app}-{i}");
            assert_eq!(r["audience"], audience.as_str(), "{r}");
            assert_eq!(
                r["status"],
                200,
                "{app} refused: {r}\n{}",
                cluster.runner.output()
            );
            let token = r["token"].as_str().expect("a token");
            assert!(seen.insert(token.to_string()), "a token handed out twice");
            if i == 0 {
                let (accepted, report) = outside_verify(&issuer, &ca, &audience, token);
                assert!(accepted, "{app}'s token for {audience}: {report}");
            }
            let claims = identity::peek_claims(token).expect("a JWT");
            assert_eq!(claims["app"], *app, "{claims:?}");
            assert_eq!(claims["aud"], serde_json::json!([audience]), "{claims:?}");
            let sub = claims["sub"].as_str().expect("sub").to_string();
            assert!(
                sub.starts_with(&format!("app:{app}:sandbox:")),
                "{app} got {sub}"
            );
            subjects.insert(sub);
        }
    }
    assert_eq!(subjects.len(), 2, "one subject per sandbox: {subjects:?}");
}
