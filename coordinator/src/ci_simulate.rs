//! The binding simulator behind `miren auth ci test`: what a CI login
//! would make of a token, without logging in.
//!
//! The token goes through the login's own checks and verification
//! ([`OidcVerifier::begin`], [`OidcVerifier::verify`]: size, structure,
//! issuer named by a binding, signature with the issuer's keys, audience,
//! times); then every binding of the app is explained claim by claim
//! ([`CiBindings::explain`], the matcher's own verdicts). The claims
//! explained are the verified ones, or, when verification refused the
//! token, what it says unverified, so an operator still sees which claim
//! differs. Nothing is changed: no capability, no pinned id, no jti spent.
//! The admin who asks is told the refusal's cause, which a CI caller never
//! is.

use std::sync::Arc;

use identity::Explanation;

use crate::ci::{CiBindings, CiError};
use crate::oidc::{LoginError, OidcVerifier};

/// What a login would make of a token.
pub struct Simulation {
    /// Why a login would refuse the token before matching (with its
    /// cause); `None` when it verifies.
    pub refused: Option<String>,
    /// Every binding of the app against the token's claims.
    pub bindings: Vec<Explanation>,
}

/// The words an admin reads for a refusal: the caller's words and, for a
/// denial, the cause the caller is never told.
fn for_the_admin(e: &LoginError) -> String {
    match e {
        LoginError::Denied(cause) => format!("{e} ({cause})"),
        other => other.to_string(),
    }
}

/// Simulates a CI login with `token` for `app` at `now` (unix seconds);
/// the verification runs on the multi-threaded runtime `rt`, as a login's.
pub async fn simulate(
    oidc: &Arc<OidcVerifier>,
    ci: &Arc<CiBindings>,
    rt: &tokio::runtime::Handle,
    app: &str,
    token: &str,
    now: i64,
) -> Result<Simulation, CiError> {
    let token = token.trim();
    let verified = match oidc.begin(ci, token) {
        Ok(attempt) => {
            let verifier = oidc.clone();
            rt.spawn(async move { verifier.verify(&attempt, now).await })
                .await
                .unwrap_or_else(|e| {
                    tracing::error!("a CI binding test task failed: {e}");
                    Err(LoginError::Denied(crate::oidc::DenialCause::Task))
                })
        }
        Err(e) => Err(e),
    };
    let (refused, claims) = match verified {
        Ok(v) => (None, Some(v.claims)),
        Err(e) => (Some(for_the_admin(&e)), identity::peek_claims(token).ok()),
    };
    let bindings = match claims {
        Some(claims) => ci.explain(app, &claims)?,
        None => Vec::new(),
    };
    Ok(Simulation { refused, bindings })
}
