//! Finding the CI pipeline's OIDC token, so `miren deploy` in CI needs no
//! stored secret.
//!
//! Order: `MIREN_OIDC_TOKEN` (any CI); GitHub Actions (requests a token with
//! the cluster address as audience from `ACTIONS_ID_TOKEN_REQUEST_URL`);
//! GitLab CI (`id_tokens` into `MIREN_ID_TOKEN`); CircleCI
//! (`CIRCLE_OIDC_TOKEN_V2`). Inside a known CI without a token the error says
//! exactly what to add; there is never a silent fallback.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether this process runs where a CI OIDC token is (or should be) found.
pub fn in_ci() -> bool {
    [
        "MIREN_OIDC_TOKEN",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "MIREN_ID_TOKEN",
        "CIRCLE_OIDC_TOKEN_V2",
    ]
    .iter()
    .any(|v| var(v).is_some())
        || var("GITHUB_ACTIONS").as_deref() == Some("true")
        || var("GITLAB_CI").as_deref() == Some("true")
        || var("CIRCLECI").as_deref() == Some("true")
}

/// The pipeline's OIDC token for `audience` (the cluster's `host:port`).
pub async fn oidc_token(audience: &str) -> anyhow::Result<String> {
    if let Some(t) = var("MIREN_OIDC_TOKEN") {
        return Ok(t.trim().to_string());
    }
    let in_github = var("GITHUB_ACTIONS").as_deref() == Some("true");
    match (
        var("ACTIONS_ID_TOKEN_REQUEST_URL"),
        var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) {
        (Some(url), Some(token)) => return github_token(&url, &token, audience).await,
        _ if in_github => bail!("{}", github_missing_token()),
        _ => {}
    }
    if var("GITLAB_CI").as_deref() == Some("true") {
        return var("MIREN_ID_TOKEN").ok_or_else(|| {
            anyhow!(
                "GitLab CI job without an OIDC token: add to the job\n  id_tokens:\n    MIREN_ID_TOKEN:\n      aud: {audience}"
            )
        });
    }
    if var("CIRCLECI").as_deref() == Some("true") {
        return var("CIRCLE_OIDC_TOKEN_V2").ok_or_else(|| {
            anyhow!("CircleCI job without CIRCLE_OIDC_TOKEN_V2: OIDC tokens need a CircleCI context-enabled job")
        });
    }
    bail!(
        "no admin identity for this cluster and no CI OIDC token: run where `miren server` wrote its client config, or in CI (GitHub Actions with `permissions: id-token: write`, GitLab `id_tokens`, CircleCI, or MIREN_OIDC_TOKEN)"
    )
}

/// Why a GitHub job has no token: a fork pull request, or missing permission.
fn github_missing_token() -> String {
    let event = var("GITHUB_EVENT_NAME").unwrap_or_default();
    if event == "pull_request" {
        let from_fork = var("GITHUB_EVENT_PATH")
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["pull_request"]["head"]["repo"]["fork"].as_bool())
            .unwrap_or(false);
        if from_fork {
            return "this GitHub Actions run is a pull request from a fork: GitHub gives such runs no OIDC token, so it cannot deploy (deploy from the base repository after merging)".into();
        }
    }
    "GitHub Actions job without an OIDC token: ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN are unset; add `permissions: id-token: write` to the job (or workflow)".into()
}

async fn github_token(url: &str, bearer: &str, audience: &str) -> anyhow::Result<String> {
    let extra = match var("MIREN_OIDC_EXTRA_CA") {
        Some(path) => transport::pki::certs_from_pem_file(std::path::Path::new(&path))
            .context("MIREN_OIDC_EXTRA_CA")?,
        None => vec![],
    };
    let tls = transport::tls::https_client_config(&extra)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTPS client")?;
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!(
        "{url}{sep}audience={}",
        form_urlencoded::byte_serialize(audience.as_bytes()).collect::<String>()
    );
    let resp = client
        .get(&full)
        .header("Authorization", format!("bearer {bearer}"))
        .send()
        .await
        .with_context(|| "requesting the GitHub Actions OIDC token")?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .context("reading the GitHub Actions OIDC token")?;
    if !status.is_success() {
        bail!(
            "GitHub Actions refused the OIDC token request ({status}): {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&body).context("GitHub Actions OIDC token response is not JSON")?;
    v["value"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("GitHub Actions OIDC token response has no \"value\""))
}
