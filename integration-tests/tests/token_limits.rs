//! A sandbox's token endpoint is bounded, seen from inside a deployed
//! sandbox on real processes: the probe app (`fixtures/probe-app`,
//! `/token-limits`) asks its own endpoint for 9 audiences, then for new
//! audiences until it is refused, then for a cached one and a new one in
//! turn, then for a new one after waiting the `Retry-After` it was given,
//! and reports every answer. The runner uses its default limits.

use integration_tests::{http_get_host, miren, temp, ProbeCluster};
use runner::token_limits::MissLimit;
use serde_json::Value;

#[test]
fn a_sandbox_is_refused_nine_audiences_and_rate_limited_on_new_tokens_but_served_cached_ones() {
    let dir = temp();
    let cluster = ProbeCluster::start(dir.path(), &["--http-listen", "127.0.0.1:0"], "probe");
    let ingress = cluster.server.printed_address("HTTP ingress: http://");
    let route = miren(
        &cluster.config,
        &["route", "set", "probe.test", "-a", "probe"],
        &[],
    );
    assert!(route.ok, "{route:?}");

    let (code, body) = http_get_host(&ingress, "probe.test", "/token-limits")
        .unwrap_or_else(|e| panic!("probe unreachable: {e}\n{}", cluster.runner.output()));
    assert_eq!(code, 200, "{body}\n{}", cluster.runner.output());
    let report: Value = serde_json::from_str(&body).expect("the probe reports JSON");

    // More than 8 audiences: a clear 400, like the other refusals.
    let nine = &report["nine_audiences"];
    assert_eq!(nine["status"], 400, "{report}");
    assert_eq!(nine["body"]["error"], "at most 8 audiences per token");

    // The whole burst is served, then a 429 that says when and what to do.
    let minted = report["minted"].as_u64().expect("a count");
    assert!(
        minted >= u64::from(MissLimit::DEFAULT_BURST),
        "refused within the burst ({minted} minted): {report}"
    );
    let refusal = &report["first_refusal"];
    assert_eq!(refusal["status"], 429, "never limited: {report}");
    let retry_after: u64 = refusal["retry_after"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {refusal}"));
    assert!(retry_after >= 1, "{refusal}");
    let message = refusal["body"]["error"].as_str().expect("an error message");
    assert!(
        message.contains("retry after") && message.contains("reuse audiences"),
        "{message}"
    );

    // While limited, a cached token is served (the same one) every time, and
    // a new audience right after it is refused at some point.
    let rounds = report["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty(), "{report}");
    for r in rounds {
        assert_eq!(r["cached_status"], 200, "cached token refused: {report}");
        assert_eq!(r["cached_same"], true, "cached token not reused: {report}");
    }
    let last = &rounds[rounds.len() - 1]["new"];
    assert_eq!(
        last["status"],
        429,
        "new tokens kept coming faster than {}/s: {report}",
        MissLimit::DEFAULT_PER_SEC
    );

    // Retry-After is honest: after waiting it, a new token is minted.
    assert_eq!(
        report["after_retry_after"]["status"], 200,
        "still refused after Retry-After: {report}"
    );
}
