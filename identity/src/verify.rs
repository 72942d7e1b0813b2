//! Verifying JWTs: our own workload tokens and outside CI / OIDC tokens.
//!
//! A token is the only thing standing between a pipeline and a deploy, so
//! verification is strict and every refusal has its own [`VerifyError`]
//! variant. The rules, in the order they are applied:
//!
//! 1. a token longer than [`MAX_TOKEN_BYTES`] is refused before any parsing;
//! 2. it must be exactly three dot-separated parts (compact JWS);
//! 3. the header must be base64url (no padding) of a JSON object without
//!    duplicate members, with a string `alg`;
//! 4. `kid` is required and must match `[A-Za-z0-9_-]{1,128}`;
//! 5. any `crit` member is refused (no extension is understood);
//! 6. the key is looked up by kid only — `jku`, `x5u`, `jwk` and `x5c` are
//!    ignored, never fetched nor trusted;
//! 7. the algorithm belongs to the key: a header `alg` that differs (`none`,
//!    `HS256` against an RSA key, ...) is refused;
//! 8. the signature is verified with aws-lc-rs against the pre-parsed key;
//! 9. the payload must be a JSON object without duplicate top-level claims
//!    (serde_json would silently keep the last one);
//! 10. `exp` is required and enforced with the leeway (expired once
//!     `now >= exp + leeway`); `nbf` and `iat`, when present, may not be
//!     later than `now + leeway`; NumericDates may be integers or decimals
//!     (decimals are floored, out-of-range values saturate);
//! 11. `iss` must be one of the accepted issuers, compared byte for byte;
//! 12. `aud` (string or array) must contain one of the accepted audiences;
//! 13. `sub` is required.
//!
//! Keys are parsed once into a [`KeySet`] so a verification costs one
//! signature check plus JSON parsing.

use std::collections::{HashMap, HashSet};
use std::fmt;

use aws_lc_rs::signature::{
    ParsedPublicKey, RsaParameters, RsaPublicKeyComponents, VerificationAlgorithm,
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512, RSA_PSS_2048_8192_SHA256,
    RSA_PSS_2048_8192_SHA384, RSA_PSS_2048_8192_SHA512,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::{DeserializeSeed, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::keys::{is_valid_kid, Algorithm, Jwk, KeyError, KeyMaterial, PublicKey};

/// Longest token accepted, in bytes (16 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u32 = 60;

/// A public key ready to verify signatures.
#[derive(Clone)]
struct VerifyingKey {
    public: PublicKey,
    parsed: ParsedPublicKey,
}

/// A key that [`KeySet::from_jwks`] left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    /// The key's kid, when it had a string one.
    pub kid: Option<String>,
    /// Why it was left out.
    pub reason: String,
}

/// Why a key set could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// The JWKS is not valid JSON.
    #[error("JWKS is not valid JSON: {0}")]
    Json(String),
    /// The JWKS is not `{"keys":[...]}`.
    #[error("JWKS must be a JSON object with a \"keys\" array")]
    NotAJwks,
    /// Two keys share a kid, so tokens naming it would be ambiguous.
    #[error("JWKS has more than one key with kid {0:?}")]
    DuplicateKid(String),
    /// A key was refused.
    #[error("key {kid:?} refused: {error}")]
    Key {
        /// The key's kid.
        kid: String,
        /// Why it was refused.
        error: KeyError,
    },
    /// The key cannot verify signatures: its algorithm does not fit it,
    /// or aws-lc-rs refused its material.
    #[error("key {kid:?} refused: {reason}")]
    Rejected {
        /// The key's kid.
        kid: String,
        /// Why.
        #[source]
        reason: KeyRejection,
    },
}

/// Why a public key cannot be made ready to verify signatures.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum KeyRejection {
    /// The key's algorithm does not fit its material (an EC algorithm on
    /// an RSA key, ...).
    #[error("algorithm {0} does not fit the key")]
    AlgorithmMismatch(Algorithm),
    /// aws-lc-rs refused the key material.
    #[error("aws-lc-rs: {0}")]
    Material(#[source] aws_lc_rs::error::KeyRejected),
}

// `KeyRejected` compares its static description only, an equivalence.
impl Eq for KeyRejection {}

/// The public keys a [`Verifier`] trusts, by kid, each pinned to one
/// algorithm.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    skipped: Vec<SkippedKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<(&str, Algorithm)> = self
            .keys
            .values()
            .map(|k| (k.public.kid(), k.public.algorithm()))
            .collect();
        kids.sort();
        f.debug_struct("KeySet")
            .field("keys", &kids)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl KeySet {
    /// An empty key set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A key set of the given keys; refuses duplicate kids.
    pub fn from_keys<I: IntoIterator<Item = PublicKey>>(keys: I) -> Result<Self, KeySetError> {
        let mut set = KeySet::new();
        for key in keys {
            set.insert(key)?;
        }
        Ok(set)
    }

    /// Adds a key; refuses a kid already present.
    pub fn insert(&mut self, key: PublicKey) -> Result<(), KeySetError> {
        if self.keys.contains_key(key.kid()) {
            return Err(KeySetError::DuplicateKid(key.kid().to_string()));
        }
        let parsed = parse_key(&key).map_err(|reason| KeySetError::Rejected {
            kid: key.kid().to_string(),
            reason,
        })?;
        self.keys.insert(
            key.kid().to_string(),
            VerifyingKey {
                public: key,
                parsed,
            },
        );
        Ok(())
    }

    /// A key set from a JWKS document (`{"keys":[...]}`) as JSON bytes.
    pub fn from_jwks_json(bytes: &[u8]) -> Result<Self, KeySetError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| KeySetError::Json(e.to_string()))?;
        Self::from_jwks(&value)
    }

    /// A key set from a JWKS document.
    ///
    /// Keys that cannot serve this verifier are left out and listed in
    /// [`KeySet::skipped`] rather than failing the whole set (an identity
    /// provider may publish encryption or symmetric keys beside its signing
    /// keys): `oct` keys, unknown key types and curves, `use` other than
    /// `sig`, unsupported algorithms, keys without a kid or with a kid outside
    /// `[A-Za-z0-9_-]{1,128}`, and malformed keys. Two keys with the same kid
    /// fail the whole set, since the choice between them would be a guess.
    pub fn from_jwks(jwks: &Value) -> Result<Self, KeySetError> {
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeySetError::NotAJwks)?;
        let mut set = KeySet::new();
        for entry in keys {
            let kid = entry.get("kid").and_then(Value::as_str).map(str::to_string);
            let skip = |set: &mut KeySet, reason: String| {
                set.skipped.push(SkippedKey {
                    kid: kid.clone(),
                    reason,
                });
            };
            let jwk: Jwk = match serde_json::from_value(entry.clone()) {
                Ok(jwk) => jwk,
                Err(e) => {
                    skip(&mut set, format!("not a JWK: {e}"));
                    continue;
                }
            };
            let key = match PublicKey::from_jwk(&jwk) {
                Ok(Some(key)) => key,
                Ok(None) => {
                    skip(
                        &mut set,
                        format!(
                            "not a supported signature key (kty {:?}, alg {:?}, use {:?})",
                            jwk.kty, jwk.alg, jwk.use_
                        ),
                    );
                    continue;
                }
                Err(e) => {
                    skip(&mut set, e.to_string());
                    continue;
                }
            };
            match set.insert(key) {
                Ok(()) => {}
                Err(e @ KeySetError::DuplicateKid(_)) => return Err(e),
                Err(e) => skip(&mut set, e.to_string()),
            }
        }
        Ok(set)
    }

    /// The key with this kid.
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid).map(|k| &k.public)
    }

    /// Whether a key has this kid.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no usable key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The usable keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values().map(|k| &k.public)
    }

    /// Keys of the JWKS that were left out, for logging.
    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }
}

fn rsa_params(alg: Algorithm) -> Option<&'static RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA => return None,
    })
}

fn parse_key(key: &PublicKey) -> Result<ParsedPublicKey, KeyRejection> {
    let alg = key.algorithm();
    let mismatch = KeyRejection::AlgorithmMismatch(alg);
    match key.material() {
        KeyMaterial::Rsa { n, e } => {
            let params = rsa_params(alg).ok_or(mismatch)?;
            RsaPublicKeyComponents {
                n: n.as_slice(),
                e: e.as_slice(),
            }
            .to_parsed_public_key(params)
            .map_err(KeyRejection::Material)
        }
        KeyMaterial::Ec { x, y, .. } => {
            let verification: &'static dyn VerificationAlgorithm = match alg {
                Algorithm::ES256 => &ECDSA_P256_SHA256_FIXED,
                Algorithm::ES384 => &ECDSA_P384_SHA384_FIXED,
                _ => return Err(mismatch),
            };
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(0x04);
            point.extend_from_slice(x);
            point.extend_from_slice(y);
            ParsedPublicKey::new(verification, point).map_err(KeyRejection::Material)
        }
        KeyMaterial::Ed25519 { x } => {
            if alg != Algorithm::EdDSA {
                return Err(mismatch);
            }
            ParsedPublicKey::new(&ED25519, x).map_err(KeyRejection::Material)
        }
    }
}

/// How a token's structure was broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MalformedToken {
    /// Not exactly three dot-separated parts; holds the number found.
    PartCount(usize),
    /// The header is not base64url without padding.
    HeaderEncoding,
    /// The header is not a JSON object.
    HeaderJson(String),
    /// The header repeats a member.
    DuplicateHeader(String),
    /// The header has no string `alg`.
    MissingAlg,
    /// A header member has the wrong JSON type.
    HeaderMemberType(&'static str),
    /// The signature is not base64url without padding.
    SignatureEncoding,
    /// The payload is not base64url without padding.
    PayloadEncoding,
    /// The payload is not a JSON object.
    PayloadJson(String),
}

impl fmt::Display for MalformedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MalformedToken::PartCount(n) => {
                write!(f, "expected 3 dot-separated parts, found {n}")
            }
            MalformedToken::HeaderEncoding => f.write_str("header is not base64url"),
            MalformedToken::HeaderJson(e) => write!(f, "header is not a JSON object: {e}"),
            MalformedToken::DuplicateHeader(name) => {
                write!(f, "header member {name:?} appears more than once")
            }
            MalformedToken::MissingAlg => f.write_str("header has no \"alg\""),
            MalformedToken::HeaderMemberType(name) => {
                write!(f, "header member {name:?} must be a string")
            }
            MalformedToken::SignatureEncoding => f.write_str("signature is not base64url"),
            MalformedToken::PayloadEncoding => f.write_str("payload is not base64url"),
            MalformedToken::PayloadJson(e) => write!(f, "payload is not a JSON object: {e}"),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The token is longer than [`MAX_TOKEN_BYTES`].
    #[error("token is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Length of the token.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The token is not a well-formed compact JWS.
    #[error("malformed token: {0}")]
    Malformed(MalformedToken),
    /// The header has no `kid`.
    #[error("token header has no \"kid\"")]
    MissingKid,
    /// The `kid` is not `[A-Za-z0-9_-]{1,128}`.
    #[error("token kid {0:?} is not 1 to 128 characters of A-Z a-z 0-9 _ -")]
    BadKid(String),
    /// No trusted key has this kid.
    #[error("no trusted key has kid {0:?}")]
    UnknownKid(String),
    /// The header's `alg` is not the algorithm of the key.
    #[error("token alg {header:?} does not match the key's algorithm {key}")]
    AlgorithmMismatch {
        /// The `alg` in the header.
        header: String,
        /// The algorithm the key is pinned to.
        key: Algorithm,
    },
    /// The header has `crit`; no extension is understood.
    #[error("token header has critical extensions {0}, none of which is understood")]
    UnsupportedCrit(String),
    /// The signature does not verify with the key.
    #[error("token signature is invalid")]
    BadSignature,
    /// A top-level claim appears more than once.
    #[error("token claim {0:?} appears more than once")]
    DuplicateClaim(String),
    /// A required claim is absent.
    #[error("token has no {0:?} claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong type.
    #[error("token claim {claim:?} {reason}")]
    InvalidClaim {
        /// The claim.
        claim: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `exp` has passed (beyond the leeway).
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// `iat` is in the future (beyond the leeway).
    #[error("token was issued in the future at {iat} (now {now})")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// `iss` is not an accepted issuer.
    #[error("token issuer {0:?} is not trusted")]
    WrongIssuer(String),
    /// `aud` contains no accepted audience.
    #[error("token audience {0:?} contains no accepted audience")]
    WrongAudience(Vec<String>),
}

/// A verified token: its header facts and its claims.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The kid of the key that verified it.
    pub kid: String,
    /// The algorithm of that key (equal to the header's `alg`).
    pub alg: Algorithm,
    /// The header's `typ`, if any.
    pub typ: Option<String>,
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `aud`, as a list even when the token had a single string.
    pub audiences: Vec<String>,
    /// `exp`, in unix seconds.
    pub expires_at: i64,
    /// Every claim of the payload.
    pub claims: Map<String, Value>,
}

impl VerifiedToken {
    /// A string claim, if present and a string.
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }
}

/// Verifies tokens against a key set, accepted issuers and audiences.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: KeySet,
    issuers: HashSet<String>,
    audiences: HashSet<String>,
    leeway: i64,
}

impl Verifier {
    /// A verifier trusting `keys` for tokens from any of `issuers` whose
    /// `aud` names any of `audiences`, with [`DEFAULT_LEEWAY_SECS`] of leeway.
    /// Empty issuer or audience sets refuse every token.
    pub fn new<I, A>(keys: KeySet, issuers: I, audiences: A) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
        A: IntoIterator,
        A::Item: Into<String>,
    {
        Verifier {
            keys,
            issuers: issuers.into_iter().map(Into::into).collect(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            leeway: i64::from(DEFAULT_LEEWAY_SECS),
        }
    }

    /// The same verifier with another leeway, in seconds.
    pub fn with_leeway(mut self, secs: u32) -> Self {
        self.leeway = i64::from(secs);
        self
    }

    /// The trusted keys.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Verifies `token` at time `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, VerifyError> {
        let [header_b64, payload_b64, signature_b64] = split_compact(token)?;

        let header = decode_header(header_b64)?;
        let verifying_key = self
            .keys
            .keys
            .get(&header.kid)
            .ok_or_else(|| VerifyError::UnknownKid(header.kid.clone()))?;
        let key_alg = verifying_key.public.algorithm();
        if header.alg != key_alg.as_str() {
            return Err(VerifyError::AlgorithmMismatch {
                header: header.alg,
                key: key_alg,
            });
        }

        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| VerifyError::Malformed(MalformedToken::SignatureEncoding))?;
        let signing_input = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        verifying_key
            .parsed
            .verify_sig(signing_input, &signature)
            .map_err(|_| VerifyError::BadSignature)?;

        let claims = decode_claims(payload_b64)?;

        let exp = numeric_claim(&claims, "exp")?.ok_or(VerifyError::MissingClaim("exp"))?;
        if exp.saturating_add(self.leeway) <= now {
            return Err(VerifyError::Expired { exp, now });
        }
        if let Some(nbf) = numeric_claim(&claims, "nbf")? {
            if nbf > now.saturating_add(self.leeway) {
                return Err(VerifyError::NotYetValid { nbf, now });
            }
        }
        if let Some(iat) = numeric_claim(&claims, "iat")? {
            if iat > now.saturating_add(self.leeway) {
                return Err(VerifyError::IssuedInFuture { iat, now });
            }
        }

        let issuer = string_claim(&claims, "iss")?;
        if !self.issuers.contains(issuer) {
            return Err(VerifyError::WrongIssuer(issuer.to_string()));
        }

        let audiences = audience_claim(&claims)?;
        if !audiences.iter().any(|a| self.audiences.contains(a)) {
            return Err(VerifyError::WrongAudience(audiences));
        }

        let subject = string_claim(&claims, "sub")?.to_string();
        let issuer = issuer.to_string();
        Ok(VerifiedToken {
            kid: header.kid,
            alg: key_alg,
            typ: header.typ,
            issuer,
            subject,
            audiences,
            expires_at: exp,
            claims,
        })
    }
}

/// The three parts of a compact JWS (header, payload, signature), still
/// base64url, after the size rule: at most [`MAX_TOKEN_BYTES`], exactly
/// three dot-separated parts.
pub(crate) fn split_compact(token: &str) -> Result<[&str; 3], VerifyError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(VerifyError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    let parts = token.bytes().filter(|b| *b == b'.').count() + 1;
    let mut split = token.splitn(3, '.');
    match (split.next(), split.next(), split.next(), parts) {
        (Some(h), Some(p), Some(s), 3) => Ok([h, p, s]),
        _ => Err(VerifyError::Malformed(MalformedToken::PartCount(parts))),
    }
}

/// The claims of a base64url payload: a JSON object without repeated
/// top-level members.
pub(crate) fn decode_claims(payload_b64: &str) -> Result<Map<String, Value>, VerifyError> {
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| VerifyError::Malformed(MalformedToken::PayloadEncoding))?;
    match parse_strict_object(&payload) {
        Ok(claims) => Ok(claims),
        Err(StrictError::Duplicate(name)) => Err(VerifyError::DuplicateClaim(name)),
        Err(StrictError::Json(e)) => Err(VerifyError::Malformed(MalformedToken::PayloadJson(e))),
    }
}

pub(crate) struct Header {
    pub(crate) alg: String,
    pub(crate) kid: String,
    pub(crate) typ: Option<String>,
}

pub(crate) fn decode_header(header_b64: &str) -> Result<Header, VerifyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| VerifyError::Malformed(MalformedToken::HeaderEncoding))?;
    let mut header = match parse_strict_object(&bytes) {
        Ok(header) => header,
        Err(StrictError::Duplicate(name)) => {
            return Err(VerifyError::Malformed(MalformedToken::DuplicateHeader(
                name,
            )))
        }
        Err(StrictError::Json(e)) => {
            return Err(VerifyError::Malformed(MalformedToken::HeaderJson(e)))
        }
    };
    let alg = match header.remove("alg") {
        Some(Value::String(alg)) => alg,
        Some(_) => {
            return Err(VerifyError::Malformed(MalformedToken::HeaderMemberType(
                "alg",
            )))
        }
        None => return Err(VerifyError::Malformed(MalformedToken::MissingAlg)),
    };
    let kid = match header.remove("kid") {
        Some(Value::String(kid)) => kid,
        Some(_) => {
            return Err(VerifyError::Malformed(MalformedToken::HeaderMemberType(
                "kid",
            )))
        }
        None => return Err(VerifyError::MissingKid),
    };
    if !is_valid_kid(&kid) {
        return Err(VerifyError::BadKid(kid));
    }
    if let Some(crit) = header.get("crit") {
        return Err(VerifyError::UnsupportedCrit(crit.to_string()));
    }
    let typ = match header.remove("typ") {
        Some(Value::String(typ)) => Some(typ),
        Some(_) => {
            return Err(VerifyError::Malformed(MalformedToken::HeaderMemberType(
                "typ",
            )))
        }
        None => None,
    };
    Ok(Header { alg, kid, typ })
}

fn numeric_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, VerifyError> {
    let invalid = VerifyError::InvalidClaim {
        claim: name,
        reason: "must be a number of seconds",
    };
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if n.is_u64() {
                Ok(Some(i64::MAX))
            } else {
                match n.as_f64() {
                    // `as` saturates, which is what a far-off date should do.
                    Some(f) if f.is_finite() => Ok(Some(f.floor() as i64)),
                    _ => Err(invalid),
                }
            }
        }
        Some(_) => Err(invalid),
    }
}

pub(crate) fn string_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, VerifyError> {
    match claims.get(name) {
        None => Err(VerifyError::MissingClaim(name)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(VerifyError::InvalidClaim {
            claim: name,
            reason: "must be a string",
        }),
    }
}

fn audience_claim(claims: &Map<String, Value>) -> Result<Vec<String>, VerifyError> {
    let invalid = VerifyError::InvalidClaim {
        claim: "aud",
        reason: "must be a string or an array of strings",
    };
    match claims.get("aud") {
        None => Err(VerifyError::MissingClaim("aud")),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or(invalid.clone()))
            .collect(),
        Some(_) => Err(invalid),
    }
}

pub(crate) enum StrictError {
    Duplicate(String),
    Json(String),
}

/// Parses a JSON object, refusing a repeated top-level member (serde_json
/// alone would keep the last one). Nested objects follow serde_json's rules.
pub(crate) fn parse_strict_object(bytes: &[u8]) -> Result<Map<String, Value>, StrictError> {
    let mut duplicate = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result = StrictObject {
        duplicate: &mut duplicate,
    }
    .deserialize(&mut de)
    .and_then(|map| de.end().map(|()| map));
    match (result, duplicate) {
        (_, Some(name)) => Err(StrictError::Duplicate(name)),
        (Ok(map), None) => Ok(map),
        (Err(e), None) => Err(StrictError::Json(e.to_string())),
    }
}

struct StrictObject<'a> {
    duplicate: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for StrictObject<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for StrictObject<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut access: M) -> Result<Self::Value, M::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                let message = format!("duplicate member {key:?}");
                *self.duplicate = Some(key);
                return Err(M::Error::custom(message));
            }
            let value: Value = access.next_value()?;
            map.insert(key, value);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(s: &str) -> Result<Map<String, Value>, StrictError> {
        parse_strict_object(s.as_bytes())
    }

    #[test]
    fn verifier_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Verifier>();
        assert_send_sync::<KeySet>();
    }

    #[test]
    fn strict_object_accepts_plain_objects() {
        let m = strict(r#"{"a":1,"b":{"a":2}}"#).ok().expect("object");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn strict_object_refuses_duplicates() {
        assert!(
            matches!(strict(r#"{"sub":"a","sub":"b"}"#), Err(StrictError::Duplicate(k)) if k == "sub")
        );
    }

    #[test]
    fn strict_object_refuses_non_objects_and_trailing_data() {
        for bad in ["[]", "1", "\"x\"", "{} {}", "{", ""] {
            assert!(matches!(strict(bad), Err(StrictError::Json(_))), "{bad}");
        }
    }

    #[test]
    fn numeric_claims_accept_floats_and_saturate() {
        let m = strict(r#"{"a":1.9,"b":1e300,"c":18446744073709551615,"d":"1"}"#)
            .ok()
            .expect("object");
        assert_eq!(numeric_claim(&m, "a"), Ok(Some(1)));
        assert_eq!(numeric_claim(&m, "b"), Ok(Some(i64::MAX)));
        assert_eq!(numeric_claim(&m, "c"), Ok(Some(i64::MAX)));
        assert!(matches!(
            numeric_claim(&m, "d"),
            Err(VerifyError::InvalidClaim { claim: "d", .. })
        ));
        assert_eq!(numeric_claim(&m, "e"), Ok(None));
    }
}
