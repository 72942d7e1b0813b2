//! Verifying CI pipelines' OIDC tokens against the issuers our bindings name.
//!
//! Only issuers some binding names are ever contacted (no fetch for an
//! unknown issuer, so a token cannot make us call an address of its
//! choosing). Per issuer: the discovery document must name that issuer; the
//! JWKS is fetched from its `jwks_uri` (5 s timeout, 1 MiB cap, no
//! redirects) and cached for an hour; a failed refresh keeps the last good
//! set; an unknown kid triggers at most one refetch a minute, and concurrent
//! misses wait for the same fetch. Verification is `identity::Verifier`
//! (algorithm pinned by the JWK), audience = one of the cluster's addresses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use identity::bindings::Binding;
use identity::{DiscoveryDocument, IssuerUrl, KeySet, Verifier};

use crate::ci::CiBindings;

/// How long fetched keys are used before a refresh.
pub const KEYS_TTL: Duration = Duration::from_secs(3600);
/// Least time between refetches caused by unknown kids.
pub const KID_REFETCH_COOLDOWN: Duration = Duration::from_secs(60);
/// Largest discovery document or JWKS accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

#[derive(Default)]
struct IssuerEntry {
    keys: Option<KeySet>,
    fetched: Option<Instant>,
    kid_refetch: Option<Instant>,
    fetches: u64,
}

/// Fetches and caches issuer keys; verifies CI tokens.
pub struct OidcVerifier {
    /// The outbound HTTPS client (also used for route OIDC code exchange):
    /// it connects only to addresses the outbound policy allows.
    pub client: crate::outbound::Outbound,
    audiences: Vec<String>,
    issuers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<IssuerEntry>>>>,
    /// Counts issuer document fetches.
    observe: Arc<crate::observe::Observe>,
}

fn denied(msg: impl std::fmt::Display) -> String {
    format!("OIDC access denied: {msg}")
}

/// `iss` and `kid` of a token, read without trusting them (to pick the
/// issuer to verify against).
fn peek(token: &str) -> Result<(String, Option<String>), String> {
    use base64::Engine as _;
    if token.len() > identity::MAX_TOKEN_BYTES {
        return Err(denied("token larger than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return Err(denied("not a JWT"));
    };
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    };
    let header = decode(h).ok_or_else(|| denied("malformed token header"))?;
    let payload = decode(p).ok_or_else(|| denied("malformed token payload"))?;
    let iss = payload["iss"]
        .as_str()
        .ok_or_else(|| denied("token has no issuer"))?
        .to_string();
    Ok((iss, header["kid"].as_str().map(str::to_string)))
}

/// Reads a response body of at most 1 MiB (the cap on everything fetched
/// from an issuer or provider).
pub async fn read_capped(resp: &mut reqwest::Response, url: &str) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading {url}: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("{url} is larger than 1 MiB"));
        }
    }
    Ok(body)
}

impl OidcVerifier {
    /// `audiences`: the cluster addresses a token may be for; `extra_roots`:
    /// CAs trusted for issuers besides the platform roots; `outbound`: the
    /// addresses issuers and providers may be fetched from.
    pub fn new(
        audiences: Vec<String>,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
        outbound: identity::AddressPolicy,
    ) -> anyhow::Result<Self> {
        let tls = transport::tls::https_client_config(extra_roots)?;
        let client = crate::outbound::Outbound::new(tls, outbound)?;
        Ok(OidcVerifier {
            client,
            audiences,
            issuers: Mutex::new(HashMap::new()),
            observe: Arc::new(crate::observe::Observe::disabled()),
        })
    }

    /// Counts fetches in `observe`.
    pub fn observed(self, observe: Arc<crate::observe::Observe>) -> Self {
        OidcVerifier { observe, ..self }
    }

    /// GETs `url` (5 s, 1 MiB cap, no redirects) and returns the body.
    pub async fn get_json(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self
            .client
            .get(url)
            .map_err(|_| format!("fetching {url}: refused (the coordinator log says why)"))?
            .send()
            .await
            .map_err(|e| format!("fetching {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("fetching {url}: HTTP {}", resp.status()));
        }
        read_capped(&mut resp, url).await
    }

    async fn fetch_keys(&self, issuer: &IssuerUrl) -> Result<KeySet, String> {
        let doc = self.get_json(&issuer.discovery_url()).await;
        let doc = doc.and_then(|d| {
            DiscoveryDocument::parse_for_issuer(&d, issuer).map_err(|e| e.to_string())
        });
        self.observe.issuer_fetch("discovery", doc.is_ok());
        let jwks = self.get_json(&doc?.jwks_uri).await;
        let keys = jwks.and_then(|j| {
            KeySet::from_jwks_json(&j).map_err(|e| format!("JWKS of {}: {e}", issuer.as_str()))
        });
        self.observe.issuer_fetch("jwks", keys.is_ok());
        keys
    }

    /// How many times the keys of `issuer` were fetched (for tests/metrics).
    pub async fn fetch_count(&self, issuer: &str) -> u64 {
        let entry = self
            .issuers
            .lock()
            .ok()
            .and_then(|m| m.get(issuer).cloned());
        match entry {
            Some(e) => e.lock().await.fetches,
            None => 0,
        }
    }

    /// Keys for `issuer`, fetching when absent, stale, or when `kid` is
    /// unknown (at most once per cooldown).
    pub async fn keys(&self, issuer: &IssuerUrl, kid: Option<&str>) -> Result<KeySet, String> {
        let entry = {
            let mut map = self
                .issuers
                .lock()
                .map_err(|_| "issuer cache unavailable".to_string())?;
            map.entry(issuer.as_str().to_string()).or_default().clone()
        };
        let mut e = entry.lock().await;
        let stale = e.fetched.is_none_or(|t| t.elapsed() >= KEYS_TTL);
        let unknown_kid = match (&e.keys, kid) {
            (Some(keys), Some(kid)) => !keys.contains(kid),
            _ => false,
        };
        let may_refetch_for_kid = e
            .kid_refetch
            .is_none_or(|t| t.elapsed() >= KID_REFETCH_COOLDOWN);
        if stale || (unknown_kid && may_refetch_for_kid) {
            if unknown_kid {
                e.kid_refetch = Some(Instant::now());
            }
            e.fetches += 1;
            match self.fetch_keys(issuer).await {
                Ok(keys) => {
                    e.keys = Some(keys);
                    e.fetched = Some(Instant::now());
                }
                Err(err) if e.keys.is_some() => {
                    tracing::warn!(
                        "refreshing keys of {}: {err}; keeping the last good set",
                        issuer.as_str()
                    );
                    e.fetched = Some(Instant::now());
                }
                Err(err) => return Err(denied(err)),
            }
        }
        e.keys
            .clone()
            .ok_or_else(|| denied("no keys for the issuer"))
    }

    /// Verifies a CI token for `app` at `now`; returns the binding it matched.
    pub async fn login(
        &self,
        ci: &CiBindings,
        app: &str,
        token: &str,
        now: i64,
    ) -> Result<Binding, String> {
        let token = token.trim();
        let (iss, kid) = peek(token)?;
        if !ci.names_issuer(&iss) {
            return Err(denied(format!(
                "issuer {iss:?} is not trusted by any CI binding"
            )));
        }
        let issuer = IssuerUrl::parse(&iss).map_err(denied)?;
        let keys = self.keys(&issuer, kid.as_deref()).await?;
        let verified = Verifier::new(keys, [iss.clone()], self.audiences.clone())
            .verify(token, now)
            .map_err(denied)?;
        ci.matching(app, &verified.claims)
    }
}
