//! Signing keys, public keys, kids and their JWK form.
//!
//! The cluster signs workload tokens with one RSA key; outside verifiers (AWS
//! STS, Vault, any JWT library) find its public half in the JWKS by `kid`.
//! This module owns how that key is generated and stored (PKCS#8 PEM), how the
//! kid is derived (`base64url(SHA-256(SPKI DER))`, so it is stable across
//! restarts and identical on every coordinator), and how public keys are
//! written as and read from JWKs, including the retired Ed25519 keys of older
//! clusters that stay published for verification only.
//!
//! The `rsa` crate is used to generate and encode keys and never to sign or
//! decrypt (RUSTSEC-2023-0071); signing lives in [`crate::mint`] on aws-lc-rs.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs8::der::zeroize::Zeroizing;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding, SecretDocument};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Size in bits of the RSA keys this cluster generates.
pub const RSA_KEY_BITS: usize = 2048;

/// Smallest RSA modulus, in bits, accepted for signing or verification.
pub const MIN_RSA_BITS: usize = 2048;

/// Largest RSA modulus, in bits, accepted for verification.
pub const MAX_RSA_BITS: usize = 8192;

/// DER prefix of a SubjectPublicKeyInfo holding an Ed25519 key (RFC 8410),
/// followed by the 32 raw public key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A JWS signature algorithm this crate can verify.
///
/// The algorithm always belongs to the key: a token header naming another one
/// is refused, never honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256: what this cluster signs with.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519 (the only EdDSA curve supported).
    EdDSA,
}

impl Algorithm {
    /// The JOSE name (`"RS256"`, `"EdDSA"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// Whether this algorithm takes an RSA key.
    pub fn is_rsa(self) -> bool {
        matches!(
            self,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        )
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = KeyError;

    /// Exact, case-sensitive JOSE names only.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Ok(match s {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(KeyError::UnsupportedAlgorithm(other.to_string())),
        })
    }
}

/// An elliptic curve usable with ECDSA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EcCurve {
    /// NIST P-256, used with ES256.
    P256,
    /// NIST P-384, used with ES384.
    P384,
}

impl EcCurve {
    /// The JWK `crv` name.
    pub fn as_str(self) -> &'static str {
        match self {
            EcCurve::P256 => "P-256",
            EcCurve::P384 => "P-384",
        }
    }

    /// Length in bytes of one coordinate.
    pub fn coordinate_len(self) -> usize {
        match self {
            EcCurve::P256 => 32,
            EcCurve::P384 => 48,
        }
    }

    fn algorithm(self) -> Algorithm {
        match self {
            EcCurve::P256 => Algorithm::ES256,
            EcCurve::P384 => Algorithm::ES384,
        }
    }
}

/// Why a key could not be generated, parsed or described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// RSA key generation failed (the system random source refused).
    #[error("could not generate an RSA key: {0}")]
    Generate(String),
    /// The PEM text is not a PKCS#8 private key.
    #[error("signing key is not a valid PKCS#8 PEM private key: {0}")]
    BadPem(#[source] PemError),
    /// The DER bytes are not a PKCS#8 private key of the expected type.
    #[error("signing key is not a valid PKCS#8 {expected} private key: {reason}")]
    BadPrivateKey {
        /// The key type that was expected (`RSA`, `Ed25519`).
        expected: &'static str,
        /// What the decoder reported.
        reason: String,
    },
    /// Encoding a key failed.
    #[error("could not encode key: {0}")]
    Encode(#[source] EncodeError),
    /// The RSA modulus is outside the accepted size.
    #[error("RSA key of {bits} bits refused: {min}..={max} bits required")]
    RsaKeySize {
        /// Size of the offered modulus.
        bits: usize,
        /// Smallest accepted size.
        min: usize,
        /// Largest accepted size.
        max: usize,
    },
    /// The RSA public exponent is zero or absurdly large (over 64 bits).
    #[error("RSA public exponent is zero or longer than 64 bits")]
    BadRsaExponent,
    /// A raw Ed25519 public key was not 32 bytes.
    #[error("Ed25519 public key must be 32 bytes, got {0}")]
    Ed25519Length(usize),
    /// An EC coordinate had the wrong length for its curve.
    #[error("{curve} coordinate must be {expected} bytes, got {got}")]
    EcCoordinateLength {
        /// The curve name.
        curve: &'static str,
        /// Required length.
        expected: usize,
        /// Offered length.
        got: usize,
    },
    /// The algorithm name is not one this crate verifies.
    #[error("unsupported JWS algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The algorithm does not fit the key type (e.g. ES256 on an RSA key).
    #[error("algorithm {alg} cannot be used with a {key_type} key")]
    AlgorithmKeyMismatch {
        /// The algorithm requested.
        alg: Algorithm,
        /// The key type (`RSA`, `EC P-256`, `Ed25519`).
        key_type: &'static str,
    },
    /// A kid does not match `[A-Za-z0-9_-]{1,128}`.
    #[error("key id {0:?} refused: it must be 1 to 128 characters of A-Z a-z 0-9 _ -")]
    BadKid(String),
}

/// Why PEM text holds no PKCS#8 private key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// The text is not a PEM document (or its base64 or DER is broken).
    #[error(transparent)]
    Decode(#[from] rsa::pkcs8::der::Error),
    /// The PEM block is not labelled `PRIVATE KEY`.
    #[error("expected a \"PRIVATE KEY\" PEM block, found {0:?}")]
    Label(String),
}

/// Why a key could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// As PKCS#8 DER.
    #[error(transparent)]
    Pkcs8(#[from] rsa::pkcs8::Error),
    /// Its public half as SPKI DER.
    #[error(transparent)]
    Spki(#[from] rsa::pkcs8::spki::Error),
    /// As PEM.
    #[error(transparent)]
    Pem(#[from] rsa::pkcs8::der::Error),
}

/// Whether `kid` matches `[A-Za-z0-9_-]{1,128}`, the only key ids this crate
/// publishes or looks up.
pub fn is_valid_kid(kid: &str) -> bool {
    (1..=128).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The kid of a public key: `base64url-no-pad(SHA-256(SPKI DER))`.
pub fn kid_for_spki_der(spki_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(spki_der))
}

/// The public part of a key, as published in a JWKS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyMaterial {
    /// An RSA public key: big-endian modulus and exponent, no leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// An ECDSA public key: the affine coordinates, each of the curve's length.
    Ec {
        /// The curve.
        curve: EcCurve,
        /// X coordinate.
        x: Vec<u8>,
        /// Y coordinate.
        y: Vec<u8>,
    },
    /// An Ed25519 public key.
    Ed25519 {
        /// The 32 raw key bytes.
        x: [u8; 32],
    },
}

impl KeyMaterial {
    /// A short human name of the key type (`RSA`, `EC P-256`, `Ed25519`).
    pub fn type_name(&self) -> &'static str {
        match self {
            KeyMaterial::Rsa { .. } => "RSA",
            KeyMaterial::Ec {
                curve: EcCurve::P256,
                ..
            } => "EC P-256",
            KeyMaterial::Ec {
                curve: EcCurve::P384,
                ..
            } => "EC P-384",
            KeyMaterial::Ed25519 { .. } => "Ed25519",
        }
    }

    fn accepts(&self, alg: Algorithm) -> bool {
        match self {
            KeyMaterial::Rsa { .. } => alg.is_rsa(),
            KeyMaterial::Ec { curve, .. } => curve.algorithm() == alg,
            KeyMaterial::Ed25519 { .. } => alg == Algorithm::EdDSA,
        }
    }
}

/// A public key with its kid and the one algorithm it may verify.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    kid: String,
    alg: Algorithm,
    material: KeyMaterial,
}

impl PublicKey {
    /// A public key from its parts, checking that the kid is well formed, that
    /// the algorithm fits the key type and that the key has a sane size.
    pub fn new(kid: String, alg: Algorithm, material: KeyMaterial) -> Result<Self, KeyError> {
        if !is_valid_kid(&kid) {
            return Err(KeyError::BadKid(kid));
        }
        if !material.accepts(alg) {
            return Err(KeyError::AlgorithmKeyMismatch {
                alg,
                key_type: material.type_name(),
            });
        }
        let material = match material {
            KeyMaterial::Rsa { n, e } => {
                let n = strip_leading_zeros(n);
                let e = strip_leading_zeros(e);
                let bits = bit_len(&n);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    return Err(KeyError::RsaKeySize {
                        bits,
                        min: MIN_RSA_BITS,
                        max: MAX_RSA_BITS,
                    });
                }
                if e.is_empty() || e.len() > 8 {
                    return Err(KeyError::BadRsaExponent);
                }
                KeyMaterial::Rsa { n, e }
            }
            KeyMaterial::Ec { curve, x, y } => {
                for coordinate in [&x, &y] {
                    if coordinate.len() != curve.coordinate_len() {
                        return Err(KeyError::EcCoordinateLength {
                            curve: curve.as_str(),
                            expected: curve.coordinate_len(),
                            got: coordinate.len(),
                        });
                    }
                }
                KeyMaterial::Ec { curve, x, y }
            }
            ed @ KeyMaterial::Ed25519 { .. } => ed,
        };
        Ok(PublicKey { kid, alg, material })
    }

    /// A legacy Ed25519 public key from its 32 raw bytes, published for
    /// verification only. The kid is derived from its SPKI DER.
    pub fn ed25519_from_raw(raw: &[u8]) -> Result<Self, KeyError> {
        let x: [u8; 32] = raw
            .try_into()
            .map_err(|_| KeyError::Ed25519Length(raw.len()))?;
        let mut spki = Vec::with_capacity(ED25519_SPKI_PREFIX.len() + 32);
        spki.extend_from_slice(&ED25519_SPKI_PREFIX);
        spki.extend_from_slice(&x);
        Ok(PublicKey {
            kid: kid_for_spki_der(&spki),
            alg: Algorithm::EdDSA,
            material: KeyMaterial::Ed25519 { x },
        })
    }

    /// The public half of a legacy Ed25519 private key given as PKCS#8 PEM
    /// (`-----BEGIN PRIVATE KEY-----`). The private key is dropped at once:
    /// Ed25519 keys are published, never used to sign.
    pub fn ed25519_from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pkcs8_pem_to_der(pem)?;
        Self::ed25519_from_pkcs8_der(der.as_bytes())
    }

    /// Like [`PublicKey::ed25519_from_pkcs8_pem`], from PKCS#8 DER (v1 or v2).
    pub fn ed25519_from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|e| KeyError::BadPrivateKey {
            expected: "Ed25519",
            reason: e.to_string(),
        })?;
        Self::ed25519_from_raw(pair.public_key().as_ref())
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The key material.
    pub fn material(&self) -> &KeyMaterial {
        &self.material
    }

    /// The JWK describing this key (`use` = `sig`).
    pub fn to_jwk(&self) -> Jwk {
        let b64 = |bytes: &[u8]| Some(URL_SAFE_NO_PAD.encode(bytes));
        let mut jwk = Jwk {
            kty: String::new(),
            use_: Some("sig".to_string()),
            alg: Some(self.alg.as_str().to_string()),
            kid: Some(self.kid.clone()),
            n: None,
            e: None,
            crv: None,
            x: None,
            y: None,
        };
        match &self.material {
            KeyMaterial::Rsa { n, e } => {
                jwk.kty = "RSA".to_string();
                jwk.n = b64(n);
                jwk.e = b64(e);
            }
            KeyMaterial::Ec { curve, x, y } => {
                jwk.kty = "EC".to_string();
                jwk.crv = Some(curve.as_str().to_string());
                jwk.x = b64(x);
                jwk.y = b64(y);
            }
            KeyMaterial::Ed25519 { x } => {
                jwk.kty = "OKP".to_string();
                jwk.crv = Some("Ed25519".to_string());
                jwk.x = b64(x);
            }
        }
        jwk
    }

    /// Reads a JWK. Returns `Ok(None)` for keys that are not signature keys
    /// this crate handles and should be skipped rather than refused: symmetric
    /// (`oct`) keys, unknown key types or curves, `use` other than `sig`, and
    /// algorithms outside [`Algorithm`]. A JWK without `alg` gets the natural
    /// one for its type: RS256 for RSA, ES256/ES384 by curve, EdDSA for
    /// Ed25519. A JWK without `kid` is refused ([`JwkError::MissingKid`]), since
    /// tokens select keys by kid only.
    pub fn from_jwk(jwk: &Jwk) -> Result<Option<Self>, JwkError> {
        if let Some(u) = &jwk.use_ {
            if u != "sig" {
                return Ok(None);
            }
        }
        let material = match jwk.kty.as_str() {
            "RSA" => KeyMaterial::Rsa {
                n: jwk_field(&jwk.n, "n")?,
                e: jwk_field(&jwk.e, "e")?,
            },
            "EC" => {
                let curve = match jwk.crv.as_deref() {
                    Some("P-256") => EcCurve::P256,
                    Some("P-384") => EcCurve::P384,
                    Some(_) => return Ok(None),
                    None => return Err(JwkError::MissingField("crv")),
                };
                KeyMaterial::Ec {
                    curve,
                    x: jwk_field(&jwk.x, "x")?,
                    y: jwk_field(&jwk.y, "y")?,
                }
            }
            "OKP" => match jwk.crv.as_deref() {
                Some("Ed25519") => {
                    let x = jwk_field(&jwk.x, "x")?;
                    let x: [u8; 32] = x
                        .as_slice()
                        .try_into()
                        .map_err(|_| JwkError::Key(KeyError::Ed25519Length(x.len())))?;
                    KeyMaterial::Ed25519 { x }
                }
                Some(_) => return Ok(None),
                None => return Err(JwkError::MissingField("crv")),
            },
            _ => return Ok(None),
        };
        let alg = match jwk.alg.as_deref() {
            Some(name) => match name.parse::<Algorithm>() {
                Ok(alg) => alg,
                Err(_) => return Ok(None),
            },
            None => match &material {
                KeyMaterial::Rsa { .. } => Algorithm::RS256,
                KeyMaterial::Ec { curve, .. } => curve.algorithm(),
                KeyMaterial::Ed25519 { .. } => Algorithm::EdDSA,
            },
        };
        let kid = jwk.kid.clone().ok_or(JwkError::MissingKid)?;
        PublicKey::new(kid, alg, material)
            .map(Some)
            .map_err(JwkError::Key)
    }
}

/// Why a JWK could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    /// The JWK has no `kid`.
    #[error("JWK has no kid")]
    MissingKid,
    /// A member the key type needs is absent.
    #[error("JWK has no {0:?} member")]
    MissingField(&'static str),
    /// A member is not base64url without padding.
    #[error("JWK member {0:?} is not base64url")]
    BadBase64(&'static str),
    /// The key itself was refused.
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn jwk_field(value: &Option<String>, name: &'static str) -> Result<Vec<u8>, JwkError> {
    let text = value.as_deref().ok_or(JwkError::MissingField(name))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| JwkError::BadBase64(name))
}

/// A JSON Web Key (RFC 7517) with the members this crate reads and writes.
/// Unknown members are ignored when reading; in particular `x5c`/`x5u` are
/// never consulted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `RSA`, `EC`, `OKP`, `oct`, ...
    pub kty: String,
    /// Intended use; `sig` for every key this crate publishes.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// The algorithm the key is pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Curve of an EC or OKP key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// X coordinate (EC) or public key (OKP), base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// Y coordinate (EC), base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// The cluster's RSA signing key: PKCS#8 private key plus its public JWK.
///
/// Holds the private key only as PKCS#8 DER (wiped on drop); hand it to
/// [`crate::mint::Minter::new`] to sign.
pub struct SigningKeyPair {
    pkcs8: SecretDocument,
    public: PublicKey,
}

impl fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKeyPair {
    /// Generates a fresh RSA-2048 key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, RSA_KEY_BITS)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Self::from_rsa(&key)
    }

    /// Parses a PKCS#8 PEM RSA private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pkcs8_pem_to_der(pem)?;
        Self::from_pkcs8_der(der.as_bytes())
    }

    /// Parses a PKCS#8 DER RSA private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(|e| KeyError::BadPrivateKey {
            expected: "RSA",
            reason: e.to_string(),
        })?;
        Self::from_rsa(&key)
    }

    fn from_rsa(key: &rsa::RsaPrivateKey) -> Result<Self, KeyError> {
        let bits = key.size() * 8;
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(KeyError::RsaKeySize {
                bits,
                min: MIN_RSA_BITS,
                max: MAX_RSA_BITS,
            });
        }
        let pkcs8 = key.to_pkcs8_der().map_err(|e| KeyError::Encode(e.into()))?;
        let public = key.to_public_key();
        let spki = public
            .to_public_key_der()
            .map_err(|e| KeyError::Encode(e.into()))?;
        let public = PublicKey::new(
            kid_for_spki_der(spki.as_bytes()),
            Algorithm::RS256,
            KeyMaterial::Rsa {
                n: public.n().to_bytes_be(),
                e: public.e().to_bytes_be(),
            },
        )?;
        Ok(SigningKeyPair { pkcs8, public })
    }

    /// The private key as PKCS#8 PEM (LF line endings), wiped when dropped.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        self.pkcs8
            .to_pem("PRIVATE KEY", LineEnding::LF)
            .map_err(|e| KeyError::Encode(EncodeError::Pem(e)))
    }

    /// The private key as PKCS#8 DER.
    pub fn pkcs8_der(&self) -> &[u8] {
        self.pkcs8.as_bytes()
    }

    /// The key id: base64url(SHA-256(SPKI DER)).
    pub fn kid(&self) -> &str {
        &self.public.kid
    }

    /// The public key (RS256), for the JWKS and for verification.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }
}

fn pkcs8_pem_to_der(pem: &str) -> Result<SecretDocument, KeyError> {
    let (label, doc) = SecretDocument::from_pem(pem).map_err(|e| KeyError::BadPem(e.into()))?;
    if label != "PRIVATE KEY" {
        return Err(KeyError::BadPem(PemError::Label(label.to_string())));
    }
    Ok(doc)
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

fn bit_len(be: &[u8]) -> usize {
    match be.first() {
        None => 0,
        Some(first) => (be.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;

    fn ed25519_pem() -> (String, Vec<u8>) {
        let doc = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).expect("generate");
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("parse");
        let body = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n");
        (pem, pair.public_key().as_ref().to_vec())
    }

    #[test]
    fn kid_charset() {
        assert!(is_valid_kid("abc-DEF_012"));
        assert!(is_valid_kid(&"a".repeat(128)));
        assert!(!is_valid_kid(&"a".repeat(129)));
        assert!(!is_valid_kid(""));
        assert!(!is_valid_kid("a b"));
        assert!(!is_valid_kid("../etc"));
        assert!(!is_valid_kid("kid="));
    }

    #[test]
    fn algorithm_names_round_trip() {
        for alg in [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ] {
            assert_eq!(alg.as_str().parse::<Algorithm>(), Ok(alg));
        }
        assert!(matches!(
            "none".parse::<Algorithm>(),
            Err(KeyError::UnsupportedAlgorithm(_))
        ));
        assert!("rs256".parse::<Algorithm>().is_err());
        assert!("HS256".parse::<Algorithm>().is_err());
    }

    #[test]
    fn corrupt_pem_is_refused() {
        assert!(matches!(
            SigningKeyPair::from_pkcs8_pem("not a pem"),
            Err(KeyError::BadPem(_))
        ));
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            SigningKeyPair::from_pkcs8_pem(garbage),
            Err(KeyError::BadPem(_))
        ));
        let truncated = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            SigningKeyPair::from_pkcs8_pem(truncated),
            Err(KeyError::BadPem(_))
        ));
        let empty_sequence = "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            SigningKeyPair::from_pkcs8_pem(empty_sequence),
            Err(KeyError::BadPrivateKey { .. })
        ));
        let public_label = "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n";
        assert!(matches!(
            SigningKeyPair::from_pkcs8_pem(public_label),
            Err(KeyError::BadPem(_))
        ));
    }

    #[test]
    fn ed25519_key_is_not_an_rsa_signing_key() {
        let (pem, _) = ed25519_pem();
        assert!(matches!(
            SigningKeyPair::from_pkcs8_pem(&pem),
            Err(KeyError::BadPrivateKey {
                expected: "RSA",
                ..
            })
        ));
    }

    #[test]
    fn ed25519_legacy_key_from_pem_and_raw_agree() {
        let (pem, raw) = ed25519_pem();
        let from_pem = PublicKey::ed25519_from_pkcs8_pem(&pem).expect("pem");
        let from_raw = PublicKey::ed25519_from_raw(&raw).expect("raw");
        assert_eq!(from_pem, from_raw);
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&raw);
        assert_eq!(from_pem.kid(), kid_for_spki_der(&spki));
        let jwk = from_pem.to_jwk();
        assert_eq!(jwk.kty, "OKP");
        assert_eq!(jwk.crv.as_deref(), Some("Ed25519"));
        assert_eq!(jwk.alg.as_deref(), Some("EdDSA"));
        assert_eq!(jwk.use_.as_deref(), Some("sig"));
        assert_eq!(jwk.x, Some(URL_SAFE_NO_PAD.encode(&raw)));
        assert_eq!(PublicKey::from_jwk(&jwk), Ok(Some(from_pem)));
    }

    #[test]
    fn ed25519_raw_wrong_length() {
        assert_eq!(
            PublicKey::ed25519_from_raw(&[0u8; 31]),
            Err(KeyError::Ed25519Length(31))
        );
    }

    #[test]
    fn jwk_skips_symmetric_and_encryption_keys() {
        let oct: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "oct", "kid": "k", "k": "c2VjcmV0"
        }))
        .expect("jwk");
        assert_eq!(PublicKey::from_jwk(&oct), Ok(None));
        let enc: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "use": "enc", "kid": "k",
            "x": URL_SAFE_NO_PAD.encode([1u8; 32])
        }))
        .expect("jwk");
        assert_eq!(PublicKey::from_jwk(&enc), Ok(None));
    }

    #[test]
    fn jwk_algorithm_must_fit_key_type() {
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "RS256", "kid": "k",
            "x": URL_SAFE_NO_PAD.encode([1u8; 32])
        }))
        .expect("jwk");
        assert!(matches!(
            PublicKey::from_jwk(&jwk),
            Err(JwkError::Key(KeyError::AlgorithmKeyMismatch { .. }))
        ));
    }

    #[test]
    fn small_rsa_key_in_jwk_is_refused() {
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "RSA", "kid": "k",
            "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]),
            "e": "AQAB"
        }))
        .expect("jwk");
        assert!(matches!(
            PublicKey::from_jwk(&jwk),
            Err(JwkError::Key(KeyError::RsaKeySize { bits: 1024, .. }))
        ));
    }
}
