//! Machine credentials in the CLI: a deploy key (`MIREN_API_KEY`) or a CI
//! OIDC token traded at the cluster's token endpoint for a short-lived
//! access token, which `Cluster.login` turns into the app's capability.
//!
//! The token endpoint is `https://<host:port><issuer path>/oauth2/token`,
//! dialled with the cluster CA pinned like every other connection. A CI
//! token is accepted once, so the access token it bought is kept for the
//! job's later commands (a GitLab `id_tokens` variable is set once per
//! job): a 0600 file under the user's cache dir (`$XDG_CACHE_HOME/miren/
//! tokens` or `~/.cache/miren/tokens`), named by a hash of the cluster,
//! the app and the credential, never printed, removed once expired.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use identity::deploy_key::DeployKey;
use identity::oauth;
use identity::ClusterAddress;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Seconds before its expiry a cached token is no longer used.
const CACHE_MARGIN_SECS: i64 = 30;
/// Largest token endpoint answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The deploy key in `MIREN_API_KEY`, if set.
pub fn api_key() -> anyhow::Result<Option<DeployKey>> {
    match std::env::var("MIREN_API_KEY") {
        Ok(v) if !v.trim().is_empty() => Ok(Some(DeployKey::parse(&v).context("MIREN_API_KEY")?)),
        _ => Ok(None),
    }
}

/// A credential to trade at the token endpoint.
pub enum Credential<'a> {
    /// A deploy key (client_credentials, HTTP Basic).
    Key(&'a DeployKey),
    /// A CI OIDC token (RFC 8693 token exchange).
    CiToken(&'a str),
}

impl Credential<'_> {
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        match self {
            Credential::Key(k) => {
                h.update(b"key\0");
                h.update(k.id.as_bytes());
                h.update([0]);
                h.update(k.secret.as_bytes());
            }
            Credential::CiToken(t) => {
                h.update(b"ci\0");
                h.update(t.as_bytes());
            }
        }
        hex::encode(h.finalize())
    }
}

#[derive(Serialize, Deserialize)]
struct Cached {
    access_token: String,
    expires_at: i64,
}

fn cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("miren").join("tokens"))
}

fn cache_file(address: &ClusterAddress, app: &str, cred: &Credential<'_>) -> Option<PathBuf> {
    let mut h = Sha256::new();
    h.update(address.to_string().as_bytes());
    h.update([0]);
    h.update(app.as_bytes());
    h.update([0]);
    h.update(cred.digest().as_bytes());
    Some(cache_dir()?.join(format!("{}.json", hex::encode(h.finalize()))))
}

fn now() -> i64 {
    transport::clock::now_unix()
}

/// Removes expired tokens from the cache dir.
fn sweep() {
    let Some(dir) = cache_dir() else { return };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let expired = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
            .is_none_or(|c| c.expires_at <= now());
        if expired {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A cached, unexpired access token for `app` bought with `cred`.
pub fn cached(address: &ClusterAddress, app: &str, cred: &Credential<'_>) -> Option<String> {
    sweep();
    let path = cache_file(address, app, cred)?;
    let c: Cached = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    if c.expires_at - CACHE_MARGIN_SECS <= now() {
        let _ = std::fs::remove_file(&path);
        return None;
    }
    Some(c.access_token)
}

/// Forgets the cached token (refused by the cluster).
pub fn forget(address: &ClusterAddress, app: &str, cred: &Credential<'_>) {
    if let Some(path) = cache_file(address, app, cred) {
        let _ = std::fs::remove_file(path);
    }
}

fn store(address: &ClusterAddress, app: &str, cred: &Credential<'_>, token: &str, expires_in: i64) {
    let Some(path) = cache_file(address, app, cred) else {
        return;
    };
    let Some(dir) = path.parent() else { return };
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::debug!("token cache {}: {e}", dir.display());
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let cached = Cached {
        access_token: token.to_string(),
        expires_at: now() + expires_in,
    };
    if let Ok(bytes) = serde_json::to_vec(&cached) {
        if let Err(e) = transport::files::write_atomic(&path, &bytes, 0o600) {
            tracing::debug!("token cache {}: {e}", path.display());
        }
    }
}

/// Why the token endpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TradeError {
    /// The endpoint answered with an RFC error.
    #[error("the cluster refused the credential ({code}): {description}")]
    Refused { code: String, description: String },
    /// The endpoint could not be reached or answered nonsense.
    #[error("the cluster's token endpoint {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// The token endpoint of the cluster at `address` whose issuer is
/// `issuer_url` (only its path is used: the endpoint is reached at the
/// cluster's own address, pinned).
pub fn token_url(address: &ClusterAddress, issuer_url: &str) -> String {
    let rest = issuer_url.strip_prefix("https://").unwrap_or(issuer_url);
    let path = rest
        .find('/')
        .map(|i| rest[i..].trim_end_matches('/'))
        .unwrap_or("");
    format!("https://{}{path}{}", address.host_port(), oauth::TOKEN_PATH)
}

/// Trades `cred` for an access token for the whole of `app`; returns the
/// token and its lifetime in seconds.
pub async fn trade(
    address: &ClusterAddress,
    url: &str,
    app: &str,
    cred: &Credential<'_>,
) -> Result<(String, i64), TradeError> {
    let unreachable = |reason: String| TradeError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let fp = address
        .fingerprint
        .ok_or_else(|| unreachable("the cluster address has no fingerprint to pin".into()))?;
    let tls = transport::tls::client_config(
        &transport::tls::ServerTrust::Pinned(fp),
        None,
        &[b"http/1.1"],
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls.config)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    let scope = format!("app:{app}");
    let mut form: Vec<(&str, &str)> = vec![("scope", &scope)];
    let mut req = client.post(url);
    match cred {
        Credential::Key(k) => {
            form.push(("grant_type", oauth::GRANT_CLIENT_CREDENTIALS));
            // Id (hex) and secret (base64url) need no form-encoding
            // (RFC 6749 §2.3.1).
            req = req.basic_auth(&k.id, Some(&k.secret));
        }
        Credential::CiToken(t) => {
            form.push(("grant_type", oauth::GRANT_TOKEN_EXCHANGE));
            form.push(("subject_token", t));
            form.push(("subject_token_type", oauth::TOKEN_TYPE_ID_TOKEN));
        }
    }
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let resp = req
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| unreachable(format!("{e:#}")))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| unreachable(e.to_string()))?;
    if bytes.len() > MAX_ANSWER_BYTES {
        return Err(unreachable("the answer is too large".into()));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| unreachable(format!("answered {status} without JSON")))?;
    if !status.is_success() {
        return Err(TradeError::Refused {
            code: v["error"].as_str().unwrap_or("unknown").to_string(),
            description: v["error_description"].as_str().unwrap_or("").to_string(),
        });
    }
    let token = v["access_token"]
        .as_str()
        .ok_or_else(|| unreachable("the answer has no access_token".into()))?;
    let expires_in = v["expires_in"].as_i64().unwrap_or(60);
    store(address, app, cred, token, expires_in);
    Ok((token.to_string(), expires_in))
}

/// The error for a deploy key asked to do an admin's work.
pub fn not_admin() -> anyhow::Error {
    anyhow!(
        "permission denied: a deploy key (MIREN_API_KEY) can only deploy its app and read its status and logs; this needs the cluster's admin identity"
    )
}

/// Refuses a key that names another cluster than the one asked for.
pub fn check_same_cluster(key: &DeployKey, address: &ClusterAddress) -> anyhow::Result<()> {
    if !key.address.same_cluster(address) {
        bail!(
            "MIREN_API_KEY is for cluster {} but MIREN_CLUSTER names {}; unset one of them",
            key.address,
            address
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_endpoint_is_at_the_cluster_address_under_the_issuer_path() {
        let a: ClusterAddress = format!("10.0.0.1:8443;sha1:{}", "ab".repeat(20))
            .parse()
            .unwrap();
        assert_eq!(
            token_url(&a, "https://10.0.0.1:8443"),
            "https://10.0.0.1:8443/oauth2/token"
        );
        assert_eq!(
            token_url(&a, "https://id.example.com/c1/"),
            "https://10.0.0.1:8443/c1/oauth2/token"
        );
    }
}
