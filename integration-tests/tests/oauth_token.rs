//! Journey 5 (CI tokens): standard OAuth clients, not our code, trade a CI
//! pipeline's OIDC token at the coordinator's token endpoint: openid-client
//! (discovery, then an RFC 8693 exchange) and Authlib (RFC 7523 JWT
//! bearer). The issued token verifies with PyJWT against the JWKS as an
//! `at+jwt` access token for one app, is refused where a workload token is
//! expected, and never outlives the CI token; a CI token is spent once;
//! curl shows the RFC error answers.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use integration_tests::{
    authlib, ci_add, miren, openid_client_exchange, outside_verify, temp, PythonIssuer, Server,
};
use serde_json::Value;

const BEARER: &str = "request-secret";
const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

/// The payload of a JWT, unverified.
fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON")
}

/// POSTs `form` (already encoded) to `url` with curl, trusting `ca`;
/// returns the status, the response headers (lowercased) and the body.
fn curl(url: &str, ca: &Path, extra: &[&str], form: &str) -> (u16, String, Value) {
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "--cacert"])
        .arg(ca)
        .args(extra)
        .args(["--data-binary", form, url])
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_lowercase(), body)
}

#[test]
fn standard_clients_trade_ci_tokens_for_one_apps_token_once() {
    let dir = temp();
    let issuer = PythonIssuer::start(dir.path(), BEARER);
    let server = Server::start_trusting(dir.path(), &issuer, &[]);
    let cfg = server.config.clone();
    let iss = server.issuer_url();
    let ca = server.ca_file();
    let token_url = format!("{}/oauth2/token", iss.trim_end_matches('/'));
    let api_audience = format!("{}/cluster-api", iss.trim_end_matches('/'));
    let add = ci_add(
        &cfg,
        "web",
        &["--issuer", &issuer.url(), "--subject", "repo:acme/web:*"],
    );
    assert!(add.ok, "{add:?}");
    let host_port = server.host_port().to_string();
    let good =
        format!("repository=acme/web&event_name=push&ref=refs/heads/main&audience={host_port}");
    let ci_token = |query: &str| issuer.token(query).expect("a CI token");

    // openid-client: discovery, then the exchange.
    let subject = ci_token(&good);
    let (ok, out) = openid_client_exchange(&iss, &ca, &subject, "app:web", None);
    assert!(ok, "openid-client exchange refused: {out}");
    assert_eq!(out["discovered"]["token_endpoint"], token_url.as_str());
    assert!(out["discovered"]["grant_types_supported"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g == EXCHANGE));
    let r = &out["response"];
    assert_eq!(
        r["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(r["scope"], "app:web:deploy app:web:status app:web:logs");
    let access = r["access_token"].as_str().unwrap().to_string();

    // PyJWT verifies it against the JWKS, with the claims of the profile.
    let (ok, report) = outside_verify(&iss, &ca, &api_audience, &access);
    assert!(ok, "PyJWT refused the access token: {report}");
    assert_eq!(report["header"]["typ"], "at+jwt");
    let claims = &report["claims"];
    assert_eq!(claims["sub"], "repo:acme/web:ref:refs/heads/main");
    assert!(claims["client_id"].as_str().unwrap().starts_with("ci:"));
    assert_eq!(claims["act"]["sub"], "repo:acme/web:ref:refs/heads/main");
    assert_eq!(claims["act"]["iss"], issuer.url().as_str());
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(claims.get("sandbox_id").is_none());
    let subject_exp = payload(&subject)["exp"].as_i64().unwrap();
    assert!(claims["exp"].as_i64().unwrap() <= subject_exp);
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 900);
    // ... and it is no workload token, whatever audience it is checked for.
    let as_workload = miren(
        &cfg,
        &["identity", "verify", "--audience", &api_audience, &access],
        &[],
    );
    assert!(!as_workload.ok, "{as_workload:?}");
    assert!(
        as_workload.stderr.contains("not a workload token"),
        "{as_workload:?}"
    );

    // The same CI token again: spent (attack catalogue item 17).
    let (ok, replay) = openid_client_exchange(&iss, &ca, &subject, "app:web", None);
    assert!(!ok, "{replay}");
    assert_eq!(replay["error"], "invalid_grant", "{replay}");
    assert!(
        replay["error_description"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{replay}"
    );
    // The audit trail says it: accepted once, then refused as a replay
    // (never a second "accepted" before the refusal).
    let jti = payload(&subject)["jti"].as_str().unwrap().to_string();
    let audit = miren(&cfg, &["audit", "-o", "json", "--action", "ci.login"], &[]);
    assert!(audit.ok, "{audit:?}");
    let of_token: Vec<Value> = audit
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["jti"] == jti.as_str())
        .collect();
    assert_eq!(of_token.len(), 2, "{of_token:?}");
    assert_eq!(of_token[0]["result"], "ok", "{of_token:?}");
    assert_eq!(of_token[1]["result"], "refused", "{of_token:?}");
    assert!(
        of_token[1]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("replayed")),
        "{of_token:?}"
    );

    // Authlib: the JWT bearer grant with a fresh token.
    let (ok, bearer) = authlib(&[
        "jwt_bearer",
        &token_url,
        ca.to_str().unwrap(),
        &ci_token(&good),
        "app:web:status",
    ]);
    assert!(ok, "Authlib jwt-bearer refused: {bearer}");
    assert_eq!(bearer["scope"], "app:web:status");
    let narrow = bearer["access_token"].as_str().unwrap();
    let (ok, report) = outside_verify(&iss, &ca, &api_audience, narrow);
    assert!(ok, "{report}");
    assert_eq!(report["claims"]["scope"], "app:web:status");

    // The issuer URL is an audience too.
    let (ok, out) = openid_client_exchange(
        &iss,
        &ca,
        &ci_token(&format!("repository=acme/web&audience={iss}")),
        "app:web",
        Some(&iss),
    );
    assert!(ok, "{out}");

    // Refusals, with the RFC codes.
    let refused = |query: &str, scope: &str, audience: Option<&str>| {
        let (ok, out) = openid_client_exchange(&iss, &ca, &ci_token(query), scope, audience);
        assert!(!ok, "{query} {scope}: {out}");
        (
            out["error"].as_str().unwrap_or_default().to_string(),
            out["error_description"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let (code, why) = refused(
        &format!("repository=acme/other&audience={host_port}"),
        "app:web",
        None,
    );
    assert_eq!(code, "invalid_grant");
    assert!(why.contains("did not match any CI binding"), "{why}");
    assert!(why.contains("repository=acme/other"), "{why}");
    let (code, why) = refused(
        "repository=acme/web&audience=https://elsewhere.test",
        "app:web",
        None,
    );
    assert_eq!(code, "invalid_grant");
    assert!(why.contains("audience"), "{why}");
    let (code, why) = refused(&format!("{good}&exp_offset=-1000"), "app:web", None);
    assert_eq!(code, "invalid_grant");
    assert!(why.contains("expired"), "{why}");
    let (code, why) = refused(&good, "app:api", None);
    assert_eq!(code, "invalid_grant");
    assert!(why.contains("did not match"), "{why}");
    let (code, _) = refused(&good, "app:web", Some("https://elsewhere.test"));
    assert_eq!(code, "invalid_target");
    let (code, why) = refused(&good, "openid", None);
    assert_eq!(code, "invalid_scope", "{why}");

    // curl: the error answers themselves.
    // The URNs hold only ':' to escape; JWTs are form-safe.
    let enc = |s: &str| s.replace(':', "%3A");
    let (status, head, body) = curl(&token_url, &ca, &[], "grant_type=password&username=a");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    assert!(head.contains("cache-control: no-store"), "{head}");
    let (status, _, body) = curl(&token_url, &ca, &[], "scope=app%3Aweb");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, _, body) = curl(
        &token_url,
        &ca,
        &["-H", "Content-Type: application/json"],
        "{}",
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, head, body) = curl(
        &token_url,
        &ca,
        &["-u", "0123456789ab:wrong"],
        "grant_type=client_credentials&scope=app%3Aweb",
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(head.contains("www-authenticate: basic"), "{head}");
    assert!(
        !body["error_description"].as_str().unwrap().contains("web"),
        "an anonymous caller learns nothing it did not send: {body}"
    );
    let (status, _, body) = curl(
        &token_url,
        &ca,
        &[],
        "grant_type=client_credentials&grant_type=client_credentials",
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let big = format!(
        "grant_type={}&subject_token_type={}&subject_token={}",
        enc(EXCHANGE),
        enc(ID_TOKEN),
        "a".repeat(64 * 1024)
    );
    let (status, _, body) = curl(&token_url, &ca, &[], &big);
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let fresh = ci_token(&good);
    let (status, head, body) = curl(
        &token_url,
        &ca,
        &[],
        &format!(
            "grant_type={}&subject_token_type={}&subject_token={}&scope=app%3Aweb",
            enc(EXCHANGE),
            enc(ID_TOKEN),
            fresh
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert_eq!(body["token_type"], "Bearer");
}
