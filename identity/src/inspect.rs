//! What a token says about itself before any key is trusted, and whether
//! it may cost a key fetch.
//!
//! A CI login must learn which issuer a token claims before it can verify
//! it, and that issuer's keys may have to be fetched: the one step of a
//! login that reaches out of the coordinator. So a token is inspected first,
//! at the cost of decoding at most [`MAX_TOKEN_BYTES`], and one that nobody
//! could have signed is refused before it names an issuer to anyone:
//!
//! - longer than [`MAX_TOKEN_BYTES`] (checked before anything else);
//! - not three base64url parts, a header that is not a JSON object, no
//!   `kid` or a malformed one, a `crit` member, a payload without a string
//!   `iss` (the rules of [`crate::verify`]);
//! - an `alg` this verifier does not take (`none`, `HS256`, ...);
//! - a signature whose length no key of that algorithm produces (RSA keys
//!   of 2048 to 8192 bits sign 256 to 1024 bytes; ES256 and Ed25519 sign
//!   64, ES384 96).
//!
//! [`UnverifiedToken::lookup`] then decides, against the keys already known
//! for the issuer, whether an unknown kid may trigger a refetch: only when
//! some known key of the issuer uses the token's algorithm. A token that
//! names a bound issuer but is malformed therefore costs nothing, and the
//! rate-limited refetch is left for tokens a new key of the issuer could
//! have signed. An issuer that moves to another algorithm is picked up by
//! the regular refresh of its keys instead.
//!
//! [`peek_claims`] reads only the payload, for the IO crates' uses that
//! trust nothing in it: when a token the runner was handed expires, what a
//! refused CI token claimed (for the audit trail). With [`inspect`] it is
//! the only reader of a payload whose signature was not checked.
//!
//! [`MAX_TOKEN_BYTES`]: crate::verify::MAX_TOKEN_BYTES

use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::keys::Algorithm;
use serde_json::{Map, Value};

use crate::verify::{
    decode_claims, decode_header, split_compact, string_claim, KeySet, MalformedToken, VerifyError,
};

/// Why a token was refused before any key was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// A rule shared with verification (size, structure, kid, `iss`).
    #[error(transparent)]
    Token(#[from] VerifyError),
    /// The header's `alg` is not one this verifier takes.
    #[error("token alg {0:?} is not an algorithm accepted here")]
    UnsupportedAlgorithm(String),
    /// No key of the token's algorithm makes a signature of this length.
    #[error("a {alg} signature cannot be {len} bytes long")]
    SignatureLength {
        /// The header's algorithm.
        alg: Algorithm,
        /// The decoded signature's length.
        len: usize,
    },
}

/// What a token claims about itself, none of it verified yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedToken {
    /// The header's `alg`.
    pub alg: Algorithm,
    /// The header's `kid`.
    pub kid: String,
    /// The payload's `iss`.
    pub issuer: String,
    /// Bytes of the decoded signature.
    pub signature_len: usize,
}

/// Whether an unknown kid is worth asking the issuer about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KidLookup {
    /// A known key has this kid: verify with it.
    Known,
    /// No known key has this kid, and a new key of the issuer could have
    /// signed the token: a refetch may find it.
    Unknown,
    /// No known key has this kid, and none of the issuer's keys uses the
    /// token's algorithm: no refetch.
    ForeignAlgorithm,
}

/// Signature lengths a key of `alg` can produce.
fn plausible_signature_len(alg: Algorithm, len: usize) -> bool {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => (256..=1024).contains(&len),
        Algorithm::ES256 | Algorithm::EdDSA => len == 64,
        Algorithm::ES384 => len == 96,
    }
}

/// Reads what `token` claims, refusing a token nobody could have signed
/// (see the module docs). Does not verify anything.
pub fn inspect(token: &str) -> Result<UnverifiedToken, InspectError> {
    let [header_b64, payload_b64, signature_b64] = split_compact(token)?;
    let header = decode_header(header_b64)?;
    let alg = Algorithm::from_str(&header.alg)
        .map_err(|_| InspectError::UnsupportedAlgorithm(header.alg.clone()))?;
    let signature_len = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| VerifyError::Malformed(MalformedToken::SignatureEncoding))?
        .len();
    if !plausible_signature_len(alg, signature_len) {
        return Err(InspectError::SignatureLength {
            alg,
            len: signature_len,
        });
    }
    let claims = decode_claims(payload_b64)?;
    let issuer = string_claim(&claims, "iss")?.to_string();
    Ok(UnverifiedToken {
        alg,
        kid: header.kid,
        issuer,
        signature_len,
    })
}

/// The claims `token`'s payload carries, read without verifying anything:
/// for deciding what to do with a token before (or without) trusting it,
/// such as when a token we were handed expires or what a refused CI token
/// claimed, for the audit trail. Never a reason to trust a claim.
///
/// The token must be at most [`MAX_TOKEN_BYTES`](crate::verify::MAX_TOKEN_BYTES), three dot-separated
/// parts, and its payload base64url of a JSON object without repeated
/// members (the rules of [`crate::verify`]); the header and signature are
/// not looked at.
pub fn peek_claims(token: &str) -> Result<Map<String, Value>, VerifyError> {
    let [_, payload_b64, _] = split_compact(token)?;
    decode_claims(payload_b64)
}

impl UnverifiedToken {
    /// Whether this token's kid is known in `keys`, and if not, whether a
    /// refetch of the issuer's keys could find it. An empty set (nothing
    /// known yet) says [`KidLookup::Unknown`].
    pub fn lookup(&self, keys: &KeySet) -> KidLookup {
        if keys.contains(&self.kid) {
            KidLookup::Known
        } else if keys.is_empty() || keys.iter().any(|k| k.algorithm() == self.alg) {
            KidLookup::Unknown
        } else {
            KidLookup::ForeignAlgorithm
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{PublicKey, SigningKeyPair};
    use crate::verify::MAX_TOKEN_BYTES;
    use serde_json::json;

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(header: serde_json::Value, payload: serde_json::Value, sig_len: usize) -> String {
        format!(
            "{}.{}.{}",
            b64(&header),
            b64(&payload),
            URL_SAFE_NO_PAD.encode(vec![7u8; sig_len])
        )
    }

    fn rs256(kid: &str) -> String {
        token(
            json!({"alg": "RS256", "kid": kid, "typ": "JWT"}),
            json!({"iss": "https://issuer.example", "sub": "x"}),
            256,
        )
    }

    fn rsa_keys() -> KeySet {
        let pair = SigningKeyPair::generate().expect("RSA key");
        KeySet::from_keys([pair.public_key().clone()]).expect("key set")
    }

    #[test]
    fn peeking_reads_the_payload_and_nothing_else() {
        // The header and signature are not looked at: a token we were
        // handed (or a refused one) still shows what it claims.
        let claims = peek_claims(&format!(
            "h.{}.s",
            b64(&json!({"iat": 10, "exp": 610, "iss": "i"}))
        ))
        .expect("payload");
        assert_eq!(claims.get("exp").and_then(Value::as_i64), Some(610));
        assert_eq!(claims.get("iss").and_then(Value::as_str), Some("i"));
        assert_eq!(
            peek_claims(&rs256("k1"))
                .expect("payload")
                .get("sub")
                .and_then(Value::as_str),
            Some("x")
        );
        // The payload rules are verification's.
        assert_eq!(
            peek_claims("a.b"),
            Err(VerifyError::Malformed(MalformedToken::PartCount(2)))
        );
        assert_eq!(
            peek_claims("h.!.s"),
            Err(VerifyError::Malformed(MalformedToken::PayloadEncoding))
        );
        assert_eq!(
            peek_claims(&format!(
                "h.{}.s",
                URL_SAFE_NO_PAD.encode(r#"{"a":1,"a":2}"#)
            )),
            Err(VerifyError::DuplicateClaim("a".into()))
        );
        assert!(matches!(
            peek_claims(&format!("h.{}.s", b64(&json!([1])))),
            Err(VerifyError::Malformed(MalformedToken::PayloadJson(_)))
        ));
        assert!(matches!(
            peek_claims(&"a.b.".repeat(MAX_TOKEN_BYTES)),
            Err(VerifyError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_well_formed_token_tells_issuer_kid_and_alg() {
        let t = inspect(&rs256("k1")).expect("well formed");
        assert_eq!(t.issuer, "https://issuer.example");
        assert_eq!(t.kid, "k1");
        assert_eq!(t.alg, Algorithm::RS256);
        assert_eq!(t.signature_len, 256);
    }

    #[test]
    fn size_is_checked_before_anything_is_parsed() {
        // Not even a JWT: the size alone refuses it.
        let huge = "!".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            inspect(&huge),
            Err(InspectError::Token(VerifyError::TooLarge {
                len: MAX_TOKEN_BYTES + 1,
                max: MAX_TOKEN_BYTES
            }))
        );
        // A well-formed token just over the cap is refused the same way.
        let mut t = rs256("k1");
        let pad = MAX_TOKEN_BYTES + 1 - t.len();
        t = t.replacen('.', &format!("{}.", "A".repeat(pad)), 1);
        assert!(matches!(
            inspect(&t),
            Err(InspectError::Token(VerifyError::TooLarge { .. }))
        ));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let payload = json!({"iss": "https://issuer.example"});
        let cases = [
            ("two parts", "a.b".to_string()),
            ("four parts", format!("{}.x", rs256("k"))),
            ("header not base64", format!("*.{}.AAAA", b64(&payload))),
            (
                "header not JSON",
                format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode("nope"),
                    b64(&payload),
                    URL_SAFE_NO_PAD.encode([0u8; 256])
                ),
            ),
            (
                "no kid",
                token(json!({"alg": "RS256"}), payload.clone(), 256),
            ),
            (
                "bad kid",
                token(json!({"alg": "RS256", "kid": "a b"}), payload.clone(), 256),
            ),
            (
                "crit",
                token(
                    json!({"alg": "RS256", "kid": "k", "crit": ["b64"]}),
                    payload.clone(),
                    256,
                ),
            ),
            (
                "alg none",
                token(json!({"alg": "none", "kid": "k"}), payload.clone(), 0),
            ),
            (
                "alg HS256",
                token(json!({"alg": "HS256", "kid": "k"}), payload.clone(), 32),
            ),
            (
                "RS256 signature too short",
                token(json!({"alg": "RS256", "kid": "k"}), payload.clone(), 255),
            ),
            (
                "RS256 signature too long",
                token(json!({"alg": "RS256", "kid": "k"}), payload.clone(), 1025),
            ),
            (
                "ES256 signature of 65",
                token(json!({"alg": "ES256", "kid": "k"}), payload.clone(), 65),
            ),
            (
                "signature not base64",
                format!(
                    "{}.{}.***",
                    b64(&json!({"alg": "RS256", "kid": "k"})),
                    b64(&payload)
                ),
            ),
            (
                "no iss",
                token(
                    json!({"alg": "RS256", "kid": "k"}),
                    json!({"sub": "x"}),
                    256,
                ),
            ),
            (
                "iss not a string",
                token(json!({"alg": "RS256", "kid": "k"}), json!({"iss": 1}), 256),
            ),
            (
                "payload not JSON",
                format!(
                    "{}.{}.{}",
                    b64(&json!({"alg": "RS256", "kid": "k"})),
                    URL_SAFE_NO_PAD.encode("{"),
                    URL_SAFE_NO_PAD.encode([0u8; 256])
                ),
            ),
        ];
        for (what, t) in cases {
            assert!(inspect(&t).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn an_unknown_kid_may_refetch_only_for_an_algorithm_the_issuer_uses() {
        let keys = rsa_keys();
        let known = keys.iter().next().expect("a key").kid().to_string();
        let t = inspect(&rs256(&known)).expect("well formed");
        assert_eq!(t.lookup(&keys), KidLookup::Known);
        let t = inspect(&rs256("rotated-key")).expect("well formed");
        assert_eq!(t.lookup(&keys), KidLookup::Unknown);
        // A larger RSA key of the same issuer may appear: any RSA length.
        let t = inspect(&token(
            json!({"alg": "RS256", "kid": "bigger"}),
            json!({"iss": "https://issuer.example"}),
            512,
        ))
        .expect("well formed");
        assert_eq!(t.lookup(&keys), KidLookup::Unknown);
        // ES256 or EdDSA against an RS256 issuer: no refetch.
        for alg in ["ES256", "EdDSA"] {
            let t = inspect(&token(
                json!({"alg": alg, "kid": "new"}),
                json!({"iss": "https://issuer.example"}),
                64,
            ))
            .expect("well formed");
            assert_eq!(t.lookup(&keys), KidLookup::ForeignAlgorithm, "{alg}");
        }
        // Nothing known yet: the first fetch is needed anyway.
        assert_eq!(t.lookup(&KeySet::new()), KidLookup::Unknown);
    }

    #[test]
    fn an_rs256_token_against_an_eddsa_issuer_is_foreign() {
        let keys = KeySet::from_keys([PublicKey::ed25519_from_raw(&[7u8; 32]).expect("key")])
            .expect("set");
        let t = inspect(&token(
            json!({"alg": "EdDSA", "kid": "other"}),
            json!({"iss": "https://issuer.example"}),
            64,
        ))
        .expect("well formed");
        assert_eq!(t.lookup(&keys), KidLookup::Unknown);
        let t = inspect(&rs256("other")).expect("well formed");
        assert_eq!(t.lookup(&keys), KidLookup::ForeignAlgorithm);
    }
}
