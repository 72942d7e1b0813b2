//! Route OIDC's client side of a provider: its endpoints (from its
//! discovery document, read by [`crate::oidc::OidcVerifier::discover`] like
//! a CI issuer's, cached an hour, a failure remembered
//! `META_FAILURE_SECS`), the token endpoint, and verifying the ID tokens
//! it hands back with the `identity` verifier and the issuer key cache of
//! [`crate::oidc`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use identity::{IssuerUrl, VerifiedToken, Verifier, VerifyError};

use crate::oidc::{FetchError, KeysError, OidcVerifier};
use crate::outbound::OutboundError;
use crate::routes::Provider;

/// Why a provider's endpoints could not be had (cached, hence `Clone`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    /// Its discovery document could not be fetched or read.
    #[error(transparent)]
    Fetch(Arc<FetchError>),
    #[error("provider has no https authorization_endpoint")]
    NoAuthorizationEndpoint,
    #[error("provider has no https token_endpoint")]
    NoTokenEndpoint,
}

/// Why the token endpoint gave no JSON answer.
#[derive(Debug, thiserror::Error)]
pub enum TokenRequestError {
    /// The outbound policy refused its address (logged there).
    #[error("token endpoint: refused (the coordinator log says why)")]
    Refused(#[source] OutboundError),
    #[error("token endpoint: {0}")]
    Send(#[source] reqwest::Error),
    #[error("the provider refused the token request ({0})")]
    Status(reqwest::StatusCode),
    /// The body broke off or was over the cap.
    #[error(transparent)]
    Read(#[from] FetchError),
    #[error("token response: {0}")]
    Json(#[source] serde_json::Error),
}

/// Why an ID token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    /// The provider's keys are not at hand.
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("ID token refused: {0}")]
    Refused(#[source] VerifyError),
}

/// How long a failed discovery fetch is remembered, so an unreachable
/// provider is not asked again by every anonymous request.
const META_FAILURE_SECS: u64 = 5;
/// How long a provider's endpoints are used before they are read again.
const META_SECS: u64 = 3600;

/// Endpoints of a provider, from its discovery document.
#[derive(Debug, Clone)]
pub struct ProviderMeta {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub end_session_endpoint: Option<String>,
}

/// A provider's endpoints (or why they could not be had) and when.
type MetaEntry = (Result<ProviderMeta, MetaError>, Instant);

/// Providers' endpoints by issuer.
#[derive(Default)]
pub(super) struct ProviderCache {
    meta: Mutex<HashMap<String, MetaEntry>>,
    /// One fetch per issuer at a time: anonymous requests (a logout, a
    /// page of a protected host) need the endpoints, and when the entry is
    /// stale they wait for the one fetch under way instead of each
    /// starting its own.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ProviderCache {
    /// The endpoints of `issuer`, cached.
    pub(super) async fn meta(
        &self,
        oidc: &OidcVerifier,
        issuer: &IssuerUrl,
    ) -> Result<ProviderMeta, MetaError> {
        self.cached(issuer.as_str(), || fetch_meta(oidc, issuer))
            .await
    }

    /// The cached entry of `issuer` while fresh, else the result of one
    /// `fetch` (those who asked meanwhile get the same).
    async fn cached<F, Fut>(&self, issuer: &str, fetch: F) -> Result<ProviderMeta, MetaError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ProviderMeta, MetaError>>,
    {
        if let Some(fresh) = self.fresh(issuer) {
            return fresh;
        }
        let gate = self.fetching.lock().ok().map(|mut f| {
            f.entry(issuer.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        });
        let _turn = match &gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        // Fetched by whoever held the turn before.
        if let Some(fresh) = self.fresh(issuer) {
            return fresh;
        }
        let fetched = fetch().await;
        if let Ok(mut m) = self.meta.lock() {
            m.insert(issuer.to_string(), (fetched.clone(), Instant::now()));
        }
        fetched
    }

    fn fresh(&self, issuer: &str) -> Option<Result<ProviderMeta, MetaError>> {
        let m = self.meta.lock().ok()?;
        let (meta, at) = m.get(issuer)?;
        let fresh_for = match meta {
            Ok(_) => Duration::from_secs(META_SECS),
            Err(_) => Duration::from_secs(META_FAILURE_SECS),
        };
        (at.elapsed() < fresh_for).then(|| meta.clone())
    }
}

async fn fetch_meta(oidc: &OidcVerifier, issuer: &IssuerUrl) -> Result<ProviderMeta, MetaError> {
    let doc = (oidc.discover(issuer).await).map_err(|e| MetaError::Fetch(Arc::new(e)))?;
    // Only HTTPS endpoints: the token request carries the client secret
    // and the code.
    Ok(ProviderMeta {
        authorization_endpoint: doc
            .authorization_endpoint
            .ok_or(MetaError::NoAuthorizationEndpoint)?,
        token_endpoint: doc.token_endpoint.ok_or(MetaError::NoTokenEndpoint)?,
        end_session_endpoint: doc.end_session_endpoint,
    })
}

/// POSTs a form to the provider's token endpoint with the client's
/// credentials (client_secret_basic) and returns the JSON answer.
pub(super) async fn token_request(
    oidc: &OidcVerifier,
    provider: &Provider,
    meta: &ProviderMeta,
    form: String,
) -> Result<serde_json::Value, TokenRequestError> {
    let basic = STANDARD.encode(format!(
        "{}:{}",
        form_urlencoded::byte_serialize(provider.client_id.as_bytes()).collect::<String>(),
        form_urlencoded::byte_serialize(provider.client_secret.as_bytes()).collect::<String>()
    ));
    let mut resp = oidc
        .client
        .post(&meta.token_endpoint)
        .map_err(TokenRequestError::Refused)?
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", format!("Basic {basic}"))
        .body(form)
        .send()
        .await
        .map_err(TokenRequestError::Send)?;
    if !resp.status().is_success() {
        return Err(TokenRequestError::Status(resp.status()));
    }
    let body = crate::oidc::read_capped(&mut resp, &meta.token_endpoint).await?;
    serde_json::from_slice(&body).map_err(TokenRequestError::Json)
}

/// Verifies an ID token from `provider` with the `identity` verifier:
/// signature by a key of the issuer's JWKS (cached like CI issuers'),
/// issuer, audience = client id, expiry.
pub(super) async fn verify_id_token(
    oidc: &OidcVerifier,
    provider: &Provider,
    issuer: &IssuerUrl,
    id_token: &str,
    now: i64,
) -> Result<VerifiedToken, IdTokenError> {
    let keys = oidc.provider_keys(issuer, id_token).await?;
    Verifier::new(
        keys,
        [issuer.as_str().to_string()],
        [provider.client_id.clone()],
    )
    .verify(id_token, now)
    .map_err(IdTokenError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn requests_that_find_the_endpoints_stale_wait_for_one_fetch() {
        let cache = ProviderCache::default();
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            // A slow provider: every other request arrives meanwhile.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(ProviderMeta {
                authorization_endpoint: "https://idp.test/authorize".into(),
                token_endpoint: "https://idp.test/token".into(),
                end_session_endpoint: None,
            })
        };
        let asked = (0..50).map(|_| cache.cached("https://idp.test", fetch));
        let answers = futures::future::join_all(asked).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // A failure is shared the same way, and remembered for a moment.
        let failing = ProviderCache::default();
        let failed = AtomicUsize::new(0);
        let fail = || async {
            failed.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(MetaError::NoTokenEndpoint)
        };
        let asked = (0..50).map(|_| failing.cached("https://idp.test", fail));
        let answers = futures::future::join_all(asked).await;
        assert!(answers.iter().all(Result::is_err));
        assert_eq!(failed.load(Ordering::SeqCst), 1);
    }
}
