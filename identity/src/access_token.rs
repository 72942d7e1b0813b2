//! Access tokens for the cluster API (RFC 9068 JWT profile): what the token
//! endpoint issues and `Cluster.login` accepts.
//!
//! They come from the same issuer and keys as workload tokens, so nothing
//! may let one pass for the other: an access token has header
//! `typ: at+jwt`, its own audience ([`api_audience`]), a `client_id` and a
//! `scope`, and never a `sandbox_id`; [`verify_access_token`] refuses
//! anything else, and [`refuse_access_token`] is what every workload-token
//! path calls to refuse one. A token can only narrow: its scope is at most
//! what the key or binding grants ([`AccessGrant::claims`] checks it), and
//! it lives at most [`MAX_TTL_SECS`] and never past the token it was
//! exchanged for.

use serde::{Deserialize, Serialize};

use crate::oauth::Scope;
use crate::verify::{VerifiedToken, Verifier, VerifyError};

/// Header `typ` of an access token (RFC 9068 §2.1).
pub const TYP: &str = "at+jwt";
/// Default and longest lifetime of an access token, in seconds.
pub const MAX_TTL_SECS: i64 = 900;

/// The audience of access tokens of the cluster whose issuer is `issuer`:
/// not an audience any workload token is minted for by default, and a
/// workload token that asks for it is still refused for its `typ`.
pub fn api_audience(issuer: &str) -> String {
    format!("{}/cluster-api", issuer.trim_end_matches('/'))
}

/// Who acts through an exchanged token (RFC 8693 §4.1): the CI identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActClaim {
    /// The CI token's `sub`.
    pub sub: String,
    /// The CI token's `iss`.
    pub iss: String,
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    /// The cluster's issuer.
    pub iss: String,
    /// `key:<id>` for a deploy key, `ci:<binding id>` for a CI identity.
    pub sub: String,
    /// [`api_audience`].
    pub aud: String,
    /// The deploy key id, or the binding id for a CI token.
    pub client_id: String,
    /// `app:NAME:ACTION …`.
    pub scope: String,
    /// Unique id.
    pub jti: String,
    /// Issued at.
    pub iat: i64,
    /// Not before (= `iat`).
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// The CI identity, for an exchanged token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<ActClaim>,
}

/// Whose credential an access token came from, read from its `client_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A deploy key (its id).
    DeployKey(String),
    /// A CI identity, by the binding its token matched.
    Ci(String),
}

/// The `client_id` of tokens a CI token matching binding `id` buys.
pub fn ci_client_id(binding: &str) -> String {
    format!("ci:{binding}")
}

impl AccessTokenClaims {
    /// Whose credential this token came from.
    pub fn caller(&self) -> Caller {
        match self.client_id.strip_prefix("ci:") {
            Some(binding) => Caller::Ci(binding.to_string()),
            None => Caller::DeployKey(self.client_id.clone()),
        }
    }
}

/// Who gets a token and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    /// `sub`.
    pub subject: String,
    /// `client_id`.
    pub client_id: String,
    /// The most the key or binding allows.
    pub granted: Scope,
    /// The CI identity of an exchange.
    pub act: Option<ActClaim>,
    /// The latest `exp` allowed (the subject token's `exp`, the key's
    /// expiry).
    pub not_after: Option<i64>,
}

/// Why a token could not be issued or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessTokenError {
    /// The scope asks more than the grant holds.
    #[error("scope {asked:?} is more than this credential grants ({granted:?})")]
    BeyondGrant {
        /// What was asked.
        asked: String,
        /// What is granted.
        granted: String,
    },
    /// The grant ends before the token could start.
    #[error("the credential it was traded for has expired")]
    GrantExpired,
    /// The JWT did not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The header `typ` is not `at+jwt`: a workload token, or another.
    #[error("not a cluster access token (header typ {0:?}, expected \"at+jwt\")")]
    NotAnAccessToken(Option<String>),
    /// An access token where a workload token is expected.
    #[error("this is a cluster access token (typ at+jwt), not a workload token")]
    NotAWorkloadToken,
    /// A claim of the profile is missing or malformed.
    #[error("access token claim {0:?} is missing or malformed")]
    BadClaim(&'static str),
}

impl AccessGrant {
    /// The claims of a token asking `asked` at `now`, living `ttl_secs`
    /// (clamped to 1..=[`MAX_TTL_SECS`] and to `not_after`).
    pub fn claims(
        &self,
        issuer: &str,
        asked: &Scope,
        ttl_secs: i64,
        now: i64,
        jti: String,
    ) -> Result<AccessTokenClaims, AccessTokenError> {
        if !asked.within(&self.granted) {
            return Err(AccessTokenError::BeyondGrant {
                asked: asked.to_scope_string(),
                granted: self.granted.to_scope_string(),
            });
        }
        let mut exp = now + ttl_secs.clamp(1, MAX_TTL_SECS);
        if let Some(limit) = self.not_after {
            exp = exp.min(limit);
        }
        if exp <= now {
            return Err(AccessTokenError::GrantExpired);
        }
        Ok(AccessTokenClaims {
            iss: issuer.to_string(),
            sub: self.subject.clone(),
            aud: api_audience(issuer),
            client_id: self.client_id.clone(),
            scope: asked.to_scope_string(),
            jti,
            iat: now,
            nbf: now,
            exp,
            act: self.act.clone(),
        })
    }
}

/// A verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// Its claims.
    pub claims: AccessTokenClaims,
    /// Its scope, parsed.
    pub scope: Scope,
}

/// Verifies an access token with `verifier` (the cluster's keys, issuers
/// and [`api_audience`]) at `now`: signature, times, issuer, audience,
/// then the profile: `typ at+jwt`, the claims, no `sandbox_id`.
pub fn verify_access_token(
    verifier: &Verifier,
    token: &str,
    now: i64,
) -> Result<AccessToken, AccessTokenError> {
    let verified = verifier.verify(token, now)?;
    if verified.typ.as_deref() != Some(TYP) {
        return Err(AccessTokenError::NotAnAccessToken(verified.typ));
    }
    if verified.claims.contains_key("sandbox_id") {
        return Err(AccessTokenError::BadClaim("sandbox_id"));
    }
    let claims: AccessTokenClaims =
        serde_json::from_value(serde_json::Value::Object(verified.claims))
            .map_err(|_| AccessTokenError::BadClaim("client_id/scope/jti"))?;
    let scope = Scope::parse(&claims.scope).map_err(|_| AccessTokenError::BadClaim("scope"))?;
    Ok(AccessToken { claims, scope })
}

/// Refuses an access token where a workload token is expected.
pub fn refuse_access_token(verified: &VerifiedToken) -> Result<(), AccessTokenError> {
    if verified.typ.as_deref().is_some_and(|t| {
        t.eq_ignore_ascii_case(TYP) || t.eq_ignore_ascii_case("application/at+jwt")
    }) || verified.claims.contains_key("client_id")
    {
        return Err(AccessTokenError::NotAWorkloadToken);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::{Subject, WorkloadClaims};
    use crate::keys::SigningKeyPair;
    use crate::mint::Minter;
    use crate::oauth::Action;
    use crate::verify::KeySet;

    const ISS: &str = "https://cluster.test";

    fn grant(not_after: Option<i64>) -> AccessGrant {
        AccessGrant {
            subject: "key:abc".into(),
            client_id: "abc".into(),
            granted: Scope::whole_app("web"),
            act: None,
            not_after,
        }
    }

    #[test]
    fn a_token_narrows_and_never_outlives_its_grant() {
        let now = 1_000_000;
        let c = grant(None)
            .claims(ISS, &Scope::whole_app("web"), 3600, now, "j".into())
            .unwrap();
        assert_eq!(c.exp, now + MAX_TTL_SECS);
        assert_eq!(c.aud, "https://cluster.test/cluster-api");
        assert_eq!(c.scope, "app:web:deploy app:web:status app:web:logs");
        let c = grant(Some(now + 100))
            .claims(ISS, &Scope::whole_app("web"), 900, now, "j".into())
            .unwrap();
        assert_eq!(c.exp, now + 100);
        assert_eq!(
            grant(Some(now)).claims(ISS, &Scope::whole_app("web"), 900, now, "j".into()),
            Err(AccessTokenError::GrantExpired)
        );
        let other = grant(None).claims(ISS, &Scope::whole_app("api"), 900, now, "j".into());
        assert!(matches!(other, Err(AccessTokenError::BeyondGrant { .. })));
        let mut narrow = grant(None);
        narrow.granted = Scope {
            app: "web".into(),
            actions: vec![Action::Status],
        };
        assert!(narrow
            .claims(ISS, &Scope::whole_app("web"), 900, now, "j".into())
            .is_err());
    }

    #[test]
    fn access_and_workload_tokens_cannot_pass_for_each_other() {
        let now = 1_700_000_000;
        let key = SigningKeyPair::generate().unwrap();
        let minter = Minter::new(&key).unwrap();
        let keys = KeySet::from_keys([key.public_key().clone()]).unwrap();
        let aud = api_audience(ISS);
        let verifier = Verifier::new(keys.clone(), [ISS], [aud.clone()]);
        let claims = grant(None)
            .claims(ISS, &Scope::whole_app("web"), 900, now, "j1".into())
            .unwrap();
        let access = minter.mint_access(&claims).unwrap();
        let ok = verify_access_token(&verifier, &access, now).unwrap();
        assert_eq!(ok.scope, Scope::whole_app("web"));
        assert_eq!(ok.claims.client_id, "abc");
        assert_eq!(ok.claims.caller(), Caller::DeployKey("abc".into()));
        // A workload token minted for the API audience is still refused.
        let subject = Subject::new("", "web", "web-1").unwrap();
        let workload =
            WorkloadClaims::new(ISS, "c", &subject, &[aud], Some(600), now, "j2".into()).unwrap();
        let workload = minter.mint(&workload).unwrap();
        assert!(matches!(
            verify_access_token(&verifier, &workload, now),
            Err(AccessTokenError::NotAnAccessToken(Some(t))) if t == "JWT"
        ));
        // And the workload paths refuse the access token.
        let as_workload = verifier.verify(&access, now).unwrap();
        assert!(refuse_access_token(&as_workload).is_err());
        let real_workload = verifier.verify(&workload, now).unwrap();
        assert!(refuse_access_token(&real_workload).is_ok());
        // Expired.
        assert!(matches!(
            verify_access_token(&verifier, &access, now + 2000),
            Err(AccessTokenError::Verify(VerifyError::Expired { .. }))
        ));
    }
}
