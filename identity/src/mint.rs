//! Minting RS256 JWTs with the cluster's signing key.
//!
//! The coordinator mints a token for every sandbox fetch, so this path is hot:
//! the key is parsed once into an aws-lc-rs [`RsaKeyPair`] and the header is
//! encoded once, leaving one JSON serialisation and one RSA signature per
//! token. (`jsonwebtoken::encode` re-parses the DER key on every call and
//! reaches less than half of the machine's RSA limit, hence this module.)

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;

use crate::access_token::AccessTokenClaims;
use crate::claims::WorkloadClaims;
use crate::keys::SigningKeyPair;

/// Why a token could not be minted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MintError {
    /// aws-lc-rs refused the private key.
    #[error("signing key refused by aws-lc-rs: {0}")]
    KeyRejected(#[source] aws_lc_rs::error::KeyRejected),
    /// The claims could not be serialised to JSON.
    #[error("could not serialise claims: {0}")]
    Serialize(String),
    /// The claims did not serialise to a JSON object.
    #[error("claims must serialise to a JSON object")]
    ClaimsNotObject,
    /// The RSA signature operation failed.
    #[error("RSA signing failed")]
    Signing,
}

// `KeyRejected` compares its static description only, an equivalence.
impl Eq for MintError {}

/// Signs JWTs with one RSA key: header `{"alg":"RS256","kid":..,"typ":"JWT"}`.
///
/// `Send + Sync`; share one behind an `Arc` across tasks.
pub struct Minter {
    key: RsaKeyPair,
    kid: String,
    header_b64: String,
    /// The header of access tokens (`typ: at+jwt`, RFC 9068).
    access_header_b64: String,
    rng: SystemRandom,
}

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minter")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

impl Minter {
    /// A minter for `key`, parsing its PKCS#8 DER once.
    pub fn new(key: &SigningKeyPair) -> Result<Self, MintError> {
        let pair = RsaKeyPair::from_pkcs8(key.pkcs8_der()).map_err(MintError::KeyRejected)?;
        let header = |typ| {
            serde_json::to_vec(&Header {
                alg: "RS256",
                kid: key.kid(),
                typ,
            })
            .map(|h| URL_SAFE_NO_PAD.encode(h))
            .map_err(|e| MintError::Serialize(e.to_string()))
        };
        Ok(Minter {
            key: pair,
            kid: key.kid().to_string(),
            header_b64: header("JWT")?,
            access_header_b64: header(crate::access_token::TYP)?,
            rng: SystemRandom::new(),
        })
    }

    /// The kid written in every header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a workload identity token.
    pub fn mint(&self, claims: &WorkloadClaims) -> Result<String, MintError> {
        self.mint_claims(claims)
    }

    /// Mints a token for any claims that serialise to a JSON object (other
    /// token kinds, such as app-scoped cluster tokens). The claims are
    /// written as given: no time or audience rule is applied here.
    pub fn mint_claims<T: Serialize + ?Sized>(&self, claims: &T) -> Result<String, MintError> {
        self.sign_with_header(&self.header_b64, claims)
    }

    /// Mints a cluster API access token: header `typ: at+jwt`, so that it
    /// can never pass for a workload token.
    pub fn mint_access(&self, claims: &AccessTokenClaims) -> Result<String, MintError> {
        self.sign_with_header(&self.access_header_b64, claims)
    }

    fn sign_with_header<T: Serialize + ?Sized>(
        &self,
        header_b64: &str,
        claims: &T,
    ) -> Result<String, MintError> {
        let payload =
            serde_json::to_vec(claims).map_err(|e| MintError::Serialize(e.to_string()))?;
        if payload.first() != Some(&b'{') {
            return Err(MintError::ClaimsNotObject);
        }
        let sig_len = self.key.public_modulus_len();
        let payload_b64_len = base64::encoded_len(payload.len(), false).unwrap_or(0);
        let sig_b64_len = base64::encoded_len(sig_len, false).unwrap_or(0);
        let mut token = String::with_capacity(header_b64.len() + payload_b64_len + sig_b64_len + 2);
        token.push_str(header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);

        let mut signature = vec![0u8; sig_len];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &self.rng,
                token.as_bytes(),
                &mut signature,
            )
            .map_err(|_| MintError::Signing)?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Minter>();
    }
}
