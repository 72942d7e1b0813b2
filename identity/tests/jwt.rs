//! Minting and verifying JWTs end to end, and the attacks the verifier must
//! refuse. Every case passes `now` in; RSA keys are generated once for the
//! whole binary.

use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use identity::documents::Jwks;
use identity::keys::PublicKey;
use identity::verify::MalformedToken;
use identity::{
    Algorithm, KeySet, Minter, SigningKeyPair, Subject, Verifier, VerifyError, WorkloadClaims,
};
use serde_json::{json, Value};

const NOW: i64 = 1_700_000_000;
const ISS: &str = "https://miren.example";

struct Fixture {
    ours: SigningKeyPair,
    attacker: SigningKeyPair,
    minter: Minter,
}

fn fx() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ours = SigningKeyPair::generate().expect("generate our key");
        let attacker = SigningKeyPair::generate().expect("generate attacker key");
        let minter = Minter::new(&ours).expect("minter");
        Fixture {
            ours,
            attacker,
            minter,
        }
    })
}

fn verifier() -> Verifier {
    let keys = KeySet::from_keys([fx().ours.public_key().clone()]).expect("key set");
    Verifier::new(keys, [ISS], ["miren"])
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs arbitrary header and payload text with RS256 under `key`.
fn sign_raw(key: &SigningKeyPair, header: &str, payload: &str) -> String {
    let pair = RsaKeyPair::from_pkcs8(key.pkcs8_der()).expect("aws-lc key");
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let mut sig = vec![0u8; pair.public_modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn our_header() -> String {
    json!({"alg": "RS256", "kid": fx().ours.kid(), "typ": "JWT"}).to_string()
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "sub": "app:web:sandbox:sb-1",
        "aud": ["miren"],
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 3600,
    })
}

fn with(mutate: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut c = claims();
    if let Value::Object(map) = &mut c {
        mutate(map);
    }
    c.to_string()
}

fn signed(payload: &str) -> String {
    sign_raw(&fx().ours, &our_header(), payload)
}

fn verify(token: &str) -> Result<identity::VerifiedToken, VerifyError> {
    verifier().verify(token, NOW)
}

fn workload_claims(ttl: Option<u64>) -> WorkloadClaims {
    let subject = Subject::new("acme", "web", "sb-1").expect("subject");
    WorkloadClaims::new(
        ISS,
        "cluster-1",
        &subject,
        &[],
        ttl,
        NOW,
        "0b7c5d7e-6a43-4f6e-9c36-3f2b6b9b7f10".to_string(),
    )
    .expect("claims")
}

fn decode_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64")).expect("json")
}

// ---- round trips -------------------------------------------------------

#[test]
fn mint_then_verify_round_trip() {
    let token = fx().minter.mint(&workload_claims(None)).expect("mint");
    let verified = verify(&token).expect("verify");
    assert_eq!(verified.kid, fx().ours.kid());
    assert_eq!(verified.alg, Algorithm::RS256);
    assert_eq!(verified.typ.as_deref(), Some("JWT"));
    assert_eq!(verified.issuer, ISS);
    assert_eq!(verified.subject, "org:acme:app:web:sandbox:sb-1");
    assert_eq!(verified.audiences, vec!["miren".to_string()]);
    assert_eq!(verified.expires_at, NOW + 3600);
    assert_eq!(verified.claim_str("app"), Some("web"));
    assert_eq!(verified.claim_str("organization_id"), Some("acme"));
}

#[test]
fn minted_header_and_times() {
    let token = fx().minter.mint(&workload_claims(Some(300))).expect("mint");
    let header = decode_part(&token, 0);
    assert_eq!(
        header,
        json!({"alg": "RS256", "kid": fx().ours.kid(), "typ": "JWT"})
    );
    let payload = decode_part(&token, 1);
    assert!(payload["iat"].is_i64());
    assert!(payload["exp"].is_i64());
    assert_eq!(payload["iat"], json!(NOW));
    assert_eq!(payload["nbf"], json!(NOW));
    assert_eq!(payload["exp"], json!(NOW + 300));
    assert_eq!(payload["aud"], json!(["miren"]));
}

#[test]
fn minted_token_verifies_with_only_the_jwks_json() {
    let jwks_text =
        serde_json::to_string(&Jwks::from_keys([fx().ours.public_key()])).expect("jwks");
    let jwks: Value = serde_json::from_str(&jwks_text).expect("json");
    let key = &jwks["keys"][0];
    assert_eq!(key["kid"], fx().ours.kid());
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["alg"], "RS256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["e"], "AQAB");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(key["n"].as_str().expect("n"))
            .expect("n base64")
            .len(),
        256
    );

    let keys = KeySet::from_jwks_json(jwks_text.as_bytes()).expect("key set");
    assert!(keys.skipped().is_empty());
    let token = fx().minter.mint(&workload_claims(None)).expect("mint");
    let verified = Verifier::new(keys, [ISS], ["miren"])
        .verify(&token, NOW)
        .expect("verify");
    assert_eq!(verified.subject, "org:acme:app:web:sandbox:sb-1");
}

#[test]
fn an_independent_library_accepts_minted_tokens() {
    let jwk = fx().ours.public_key().to_jwk();
    let key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk.n.as_deref().expect("n"),
        jwk.e.as_deref().expect("e"),
    )
    .expect("decoding key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_exp = false; // the token's clock is NOW, not the wall clock
    validation.set_audience(&["miren"]);
    validation.set_issuer(&[ISS]);
    let token = fx().minter.mint(&workload_claims(None)).expect("mint");
    let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).expect("decode");
    assert_eq!(data.claims["sub"], "org:acme:app:web:sandbox:sb-1");
    assert_eq!(data.header.kid.as_deref(), Some(fx().ours.kid()));
}

#[test]
fn signing_key_pem_round_trip_keeps_kid() {
    let pem = fx().ours.to_pkcs8_pem().expect("pem");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let again = SigningKeyPair::from_pkcs8_pem(&pem).expect("parse");
    assert_eq!(again.kid(), fx().ours.kid());
    assert_eq!(again.public_key(), fx().ours.public_key());
}

#[test]
fn kid_is_sha256_of_spki() {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    use sha2::{Digest, Sha256};
    let key = rsa::RsaPrivateKey::from_pkcs8_der(fx().ours.pkcs8_der()).expect("rsa");
    let spki = key.to_public_key().to_public_key_der().expect("spki");
    assert_eq!(fx().ours.kid(), b64(&Sha256::digest(spki.as_bytes())));
    assert_eq!(fx().ours.kid().len(), 43);
}

#[test]
fn jwks_keeps_legacy_ed25519_key_beside_rsa() {
    let legacy = PublicKey::ed25519_from_raw(&[9u8; 32]).expect("ed25519");
    let jwks = Jwks::from_keys([fx().ours.public_key(), &legacy]).to_json();
    let keys = KeySet::from_jwks(&jwks).expect("key set");
    assert_eq!(keys.len(), 2);
    assert_eq!(
        keys.get(legacy.kid()).map(PublicKey::algorithm),
        Some(Algorithm::EdDSA)
    );
}

// ---- algorithm attacks -------------------------------------------------

#[test]
fn alg_none_is_refused() {
    let header = json!({"alg": "none", "kid": fx().ours.kid(), "typ": "JWT"}).to_string();
    let token = format!(
        "{}.{}.",
        b64(header.as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    assert_eq!(
        verify(&token),
        Err(VerifyError::AlgorithmMismatch {
            header: "none".to_string(),
            key: Algorithm::RS256
        })
    );
}

#[test]
fn hs256_keyed_with_the_rsa_public_key_is_refused() {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::from_pkcs8_der(fx().ours.pkcs8_der()).expect("rsa");
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(fx().ours.kid().to_string());
    let token = jsonwebtoken::encode(
        &header,
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .expect("encode");
    assert_eq!(
        verify(&token),
        Err(VerifyError::AlgorithmMismatch {
            header: "HS256".to_string(),
            key: Algorithm::RS256
        })
    );
}

#[test]
fn rs384_header_on_an_rs256_key_is_refused() {
    let header = json!({"alg": "RS384", "kid": fx().ours.kid()}).to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert!(matches!(
        verify(&token),
        Err(VerifyError::AlgorithmMismatch { .. })
    ));
}

// ---- kid ---------------------------------------------------------------

#[test]
fn unknown_kid_is_refused() {
    let header = json!({"alg": "RS256", "kid": "someone-elses-key"}).to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert_eq!(
        verify(&token),
        Err(VerifyError::UnknownKid("someone-elses-key".to_string()))
    );
}

#[test]
fn missing_kid_is_refused() {
    let header = json!({"alg": "RS256", "typ": "JWT"}).to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert_eq!(verify(&token), Err(VerifyError::MissingKid));
}

#[test]
fn kid_with_bad_characters_is_refused() {
    for kid in ["../../etc/passwd", "kid with space", "kid=", "ключ"] {
        let header = json!({"alg": "RS256", "kid": kid}).to_string();
        let token = sign_raw(&fx().ours, &header, &claims().to_string());
        assert_eq!(
            verify(&token),
            Err(VerifyError::BadKid(kid.to_string())),
            "{kid}"
        );
    }
}

#[test]
fn kid_too_long_is_refused() {
    let kid = "a".repeat(129);
    let header = json!({"alg": "RS256", "kid": kid}).to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert_eq!(verify(&token), Err(VerifyError::BadKid(kid)));
}

#[test]
fn non_string_kid_is_malformed() {
    let header = json!({"alg": "RS256", "kid": 7}).to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert_eq!(
        verify(&token),
        Err(VerifyError::Malformed(MalformedToken::HeaderMemberType(
            "kid"
        )))
    );
}

#[test]
fn foreign_key_reusing_our_kid_fails_the_signature() {
    let token = sign_raw(&fx().attacker, &our_header(), &claims().to_string());
    assert_eq!(verify(&token), Err(VerifyError::BadSignature));
}

#[test]
fn jku_and_embedded_jwk_are_ignored() {
    let attacker_jwk = serde_json::to_value(fx().attacker.public_key().to_jwk()).expect("jwk");
    let header = json!({
        "alg": "RS256",
        "kid": fx().ours.kid(),
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "jwk": attacker_jwk,
    })
    .to_string();
    let token = sign_raw(&fx().attacker, &header, &claims().to_string());
    assert_eq!(verify(&token), Err(VerifyError::BadSignature));

    let attacker_kid = json!({
        "alg": "RS256",
        "kid": fx().attacker.kid(),
        "jwk": attacker_jwk,
    })
    .to_string();
    let token = sign_raw(&fx().attacker, &attacker_kid, &claims().to_string());
    assert_eq!(
        verify(&token),
        Err(VerifyError::UnknownKid(fx().attacker.kid().to_string()))
    );
}

#[test]
fn jku_header_on_a_genuine_token_does_not_matter() {
    let header = json!({
        "alg": "RS256",
        "kid": fx().ours.kid(),
        "jku": "https://attacker.example/jwks.json",
    })
    .to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert!(verify(&token).is_ok());
}

#[test]
fn tampered_payload_fails_the_signature() {
    let token = signed(&claims().to_string());
    let mut parts: Vec<&str> = token.split('.').collect();
    let evil = b64(with(|c| {
        c.insert("sub".into(), json!("app:admin:sandbox:x"));
    })
    .as_bytes());
    parts[1] = &evil;
    assert_eq!(verify(&parts.join(".")), Err(VerifyError::BadSignature));
}

// ---- crit --------------------------------------------------------------

#[test]
fn unknown_crit_is_refused() {
    let header = json!({
        "alg": "RS256",
        "kid": fx().ours.kid(),
        "crit": ["exp"],
        "exp": 1,
    })
    .to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert!(matches!(
        verify(&token),
        Err(VerifyError::UnsupportedCrit(_))
    ));
}

#[test]
fn b64_false_crit_is_refused() {
    let header =
        json!({"alg": "RS256", "kid": fx().ours.kid(), "b64": false, "crit": ["b64"]}).to_string();
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert!(matches!(
        verify(&token),
        Err(VerifyError::UnsupportedCrit(_))
    ));
}

// ---- time --------------------------------------------------------------

#[test]
fn expired_token_is_refused() {
    let token = signed(&with(|c| {
        c.insert("iat".into(), json!(NOW - 7200));
        c.insert("nbf".into(), json!(NOW - 7200));
        c.insert("exp".into(), json!(NOW - 3600));
    }));
    assert_eq!(
        verify(&token),
        Err(VerifyError::Expired {
            exp: NOW - 3600,
            now: NOW
        })
    );
}

#[test]
fn expired_within_leeway_is_accepted() {
    let token = signed(&with(|c| {
        c.insert("iat".into(), json!(NOW - 3630));
        c.insert("exp".into(), json!(NOW - 30));
    }));
    assert!(verify(&token).is_ok());
}

#[test]
fn expired_just_beyond_leeway_is_refused() {
    let token = signed(&with(|c| {
        c.insert("exp".into(), json!(NOW - 60));
    }));
    assert!(matches!(verify(&token), Err(VerifyError::Expired { .. })));
}

#[test]
fn missing_exp_is_refused() {
    let token = signed(&with(|c| {
        c.remove("exp");
    }));
    assert_eq!(verify(&token), Err(VerifyError::MissingClaim("exp")));
}

#[test]
fn string_exp_is_refused() {
    let token = signed(&with(|c| {
        c.insert("exp".into(), json!("9999999999"));
    }));
    assert!(matches!(
        verify(&token),
        Err(VerifyError::InvalidClaim { claim: "exp", .. })
    ));
}

#[test]
fn nbf_in_the_future_beyond_leeway_is_refused() {
    let token = signed(&with(|c| {
        c.insert("nbf".into(), json!(NOW + 61));
    }));
    assert_eq!(
        verify(&token),
        Err(VerifyError::NotYetValid {
            nbf: NOW + 61,
            now: NOW
        })
    );
}

#[test]
fn nbf_in_the_future_within_leeway_is_accepted() {
    let token = signed(&with(|c| {
        c.insert("nbf".into(), json!(NOW + 60));
    }));
    assert!(verify(&token).is_ok());
}

#[test]
fn iat_in_the_future_beyond_leeway_is_refused() {
    let token = signed(&with(|c| {
        c.insert("iat".into(), json!(NOW + 120));
        c.remove("nbf");
    }));
    assert_eq!(
        verify(&token),
        Err(VerifyError::IssuedInFuture {
            iat: NOW + 120,
            now: NOW
        })
    );
}

#[test]
fn iat_in_the_future_within_leeway_is_accepted() {
    let token = signed(&with(|c| {
        c.insert("iat".into(), json!(NOW + 30));
        c.insert("nbf".into(), json!(NOW + 30));
    }));
    assert!(verify(&token).is_ok());
}

#[test]
fn leeway_can_be_changed() {
    let token = signed(&with(|c| {
        c.insert("nbf".into(), json!(NOW + 30));
    }));
    assert!(matches!(
        verifier().with_leeway(0).verify(&token, NOW),
        Err(VerifyError::NotYetValid { .. })
    ));
}

// ---- issuer, audience, subject -----------------------------------------

#[test]
fn wrong_issuer_is_refused() {
    let token = signed(&with(|c| {
        c.insert("iss".into(), json!("https://evil.example"));
    }));
    assert_eq!(
        verify(&token),
        Err(VerifyError::WrongIssuer("https://evil.example".to_string()))
    );
}

#[test]
fn issuer_with_trailing_slash_is_a_different_issuer() {
    let token = signed(&with(|c| {
        c.insert("iss".into(), json!(format!("{ISS}/")));
    }));
    assert_eq!(
        verify(&token),
        Err(VerifyError::WrongIssuer(format!("{ISS}/")))
    );
}

#[test]
fn missing_issuer_is_refused() {
    let token = signed(&with(|c| {
        c.remove("iss");
    }));
    assert_eq!(verify(&token), Err(VerifyError::MissingClaim("iss")));
}

#[test]
fn wrong_audience_is_refused() {
    let token = signed(&with(|c| {
        c.insert("aud".into(), json!(["sts.amazonaws.com", "vault"]));
    }));
    assert_eq!(
        verify(&token),
        Err(VerifyError::WrongAudience(vec![
            "sts.amazonaws.com".to_string(),
            "vault".to_string()
        ]))
    );
}

#[test]
fn audience_as_a_string_is_accepted() {
    let token = signed(&with(|c| {
        c.insert("aud".into(), json!("miren"));
    }));
    let verified = verify(&token).expect("verify");
    assert_eq!(verified.audiences, vec!["miren".to_string()]);
}

#[test]
fn audience_as_an_array_is_accepted() {
    let token = signed(&with(|c| {
        c.insert("aud".into(), json!(["vault", "miren"]));
    }));
    let verified = verify(&token).expect("verify");
    assert_eq!(
        verified.audiences,
        vec!["vault".to_string(), "miren".to_string()]
    );
}

#[test]
fn missing_audience_is_refused() {
    let token = signed(&with(|c| {
        c.remove("aud");
    }));
    assert_eq!(verify(&token), Err(VerifyError::MissingClaim("aud")));
}

#[test]
fn audience_of_wrong_type_is_refused() {
    let token = signed(&with(|c| {
        c.insert("aud".into(), json!(["miren", 7]));
    }));
    assert!(matches!(
        verify(&token),
        Err(VerifyError::InvalidClaim { claim: "aud", .. })
    ));
}

#[test]
fn missing_subject_is_refused() {
    let token = signed(&with(|c| {
        c.remove("sub");
    }));
    assert_eq!(verify(&token), Err(VerifyError::MissingClaim("sub")));
}

#[test]
fn duplicate_sub_is_refused() {
    let payload = format!(
        r#"{{"iss":"{ISS}","sub":"app:web:sandbox:sb-1","aud":"miren","exp":{},"sub":"app:admin:sandbox:x"}}"#,
        NOW + 600
    );
    let token = signed(&payload);
    assert_eq!(
        verify(&token),
        Err(VerifyError::DuplicateClaim("sub".to_string()))
    );
}

#[test]
fn duplicate_header_member_is_refused() {
    let header = format!(
        r#"{{"alg":"RS256","kid":"{}","alg":"none"}}"#,
        fx().ours.kid()
    );
    let token = sign_raw(&fx().ours, &header, &claims().to_string());
    assert_eq!(
        verify(&token),
        Err(VerifyError::Malformed(MalformedToken::DuplicateHeader(
            "alg".to_string()
        )))
    );
}

// ---- shape -------------------------------------------------------------

#[test]
fn token_of_17_kib_is_refused_before_parsing() {
    let token = "a".repeat(17 * 1024);
    assert_eq!(
        verify(&token),
        Err(VerifyError::TooLarge {
            len: 17 * 1024,
            max: 16 * 1024
        })
    );
}

#[test]
fn large_genuine_token_is_also_refused() {
    let token = signed(&with(|c| {
        c.insert("pad".into(), json!("x".repeat(13 * 1024)));
    }));
    assert!(matches!(verify(&token), Err(VerifyError::TooLarge { .. })));
}

#[test]
fn four_part_token_is_refused() {
    let token = format!("{}.extra", signed(&claims().to_string()));
    assert_eq!(
        verify(&token),
        Err(VerifyError::Malformed(MalformedToken::PartCount(4)))
    );
}

#[test]
fn empty_string_is_refused() {
    assert_eq!(
        verify(""),
        Err(VerifyError::Malformed(MalformedToken::PartCount(1)))
    );
}

#[test]
fn not_a_jwt_is_refused() {
    assert_eq!(
        verify("not-a-jwt"),
        Err(VerifyError::Malformed(MalformedToken::PartCount(1)))
    );
}

#[test]
fn a_b_c_is_refused() {
    assert_eq!(
        verify("a.b.c"),
        Err(VerifyError::Malformed(MalformedToken::HeaderEncoding))
    );
}

#[test]
fn dots_only_is_refused() {
    assert_eq!(
        verify("....."),
        Err(VerifyError::Malformed(MalformedToken::PartCount(6)))
    );
    assert!(matches!(
        verify(".."),
        Err(VerifyError::Malformed(MalformedToken::HeaderJson(_)))
    ));
}

#[test]
fn header_that_is_not_an_object_is_refused() {
    let token = format!("{}.{}.sig", b64(b"[1,2]"), b64(b"{}"));
    assert!(matches!(
        verify(&token),
        Err(VerifyError::Malformed(MalformedToken::HeaderJson(_)))
    ));
}

#[test]
fn padded_base64_is_refused() {
    let token = signed(&claims().to_string());
    let (header, rest) = token.split_once('.').expect("dot");
    let padded = format!("{header}==.{rest}");
    assert_eq!(
        verify(&padded),
        Err(VerifyError::Malformed(MalformedToken::HeaderEncoding))
    );
}

#[test]
fn payload_that_is_not_json_is_refused() {
    let token = signed("not json");
    assert!(matches!(
        verify(&token),
        Err(VerifyError::Malformed(MalformedToken::PayloadJson(_)))
    ));
}

#[test]
fn error_messages_read_well() {
    assert_eq!(
        VerifyError::UnknownKid("k1".into()).to_string(),
        "no trusted key has kid \"k1\""
    );
    assert_eq!(
        VerifyError::Malformed(MalformedToken::PartCount(4)).to_string(),
        "malformed token: expected 3 dot-separated parts, found 4"
    );
    assert_eq!(
        VerifyError::MissingClaim("exp").to_string(),
        "token has no \"exp\" claim"
    );
}

// ---- key sets from JWKS ------------------------------------------------

#[test]
fn jwks_ignores_symmetric_and_kidless_keys() {
    let mut jwks = Jwks::from_keys([fx().ours.public_key()]).to_json();
    if let Some(keys) = jwks["keys"].as_array_mut() {
        keys.push(json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}));
        let mut kidless = serde_json::to_value(fx().attacker.public_key().to_jwk()).expect("jwk");
        if let Some(obj) = kidless.as_object_mut() {
            obj.remove("kid");
        }
        keys.push(kidless);
        keys.push(json!("not an object"));
    }
    let keys = KeySet::from_jwks(&jwks).expect("key set");
    assert_eq!(keys.len(), 1);
    assert!(keys.contains(fx().ours.kid()));
    assert!(!keys.contains("hmac"));
    assert_eq!(keys.skipped().len(), 3);
}

#[test]
fn jwks_with_duplicate_kid_is_refused() {
    let jwk = serde_json::to_value(fx().ours.public_key().to_jwk()).expect("jwk");
    let jwks = json!({"keys": [jwk.clone(), jwk]});
    assert!(matches!(
        KeySet::from_jwks(&jwks),
        Err(identity::KeySetError::DuplicateKid(_))
    ));
}

#[test]
fn jwks_must_have_a_keys_array() {
    assert!(matches!(
        KeySet::from_jwks(&json!({"keys": {}})),
        Err(identity::KeySetError::NotAJwks)
    ));
    assert!(matches!(
        KeySet::from_jwks_json(b"{"),
        Err(identity::KeySetError::Json(_))
    ));
}

#[test]
fn jwk_without_alg_defaults_to_rs256() {
    let mut jwk = serde_json::to_value(fx().ours.public_key().to_jwk()).expect("jwk");
    if let Some(obj) = jwk.as_object_mut() {
        obj.remove("alg");
        obj.remove("use");
    }
    let keys = KeySet::from_jwks(&json!({"keys": [jwk]})).expect("key set");
    let token = fx().minter.mint(&workload_claims(None)).expect("mint");
    assert!(Verifier::new(keys, [ISS], ["miren"])
        .verify(&token, NOW)
        .is_ok());
}

#[test]
fn jwk_pinned_to_ps256_refuses_rs256_tokens() {
    let mut jwk = serde_json::to_value(fx().ours.public_key().to_jwk()).expect("jwk");
    jwk["alg"] = json!("PS256");
    let keys = KeySet::from_jwks(&json!({"keys": [jwk]})).expect("key set");
    let token = fx().minter.mint(&workload_claims(None)).expect("mint");
    assert_eq!(
        Verifier::new(keys, [ISS], ["miren"]).verify(&token, NOW),
        Err(VerifyError::AlgorithmMismatch {
            header: "RS256".to_string(),
            key: Algorithm::PS256
        })
    );
}

#[test]
fn ecdsa_p256_tokens_verify() {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("ec");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .expect("ec pair");
    let point = pair.public_key().as_ref();
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "ci-key-1", "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    let keys = KeySet::from_jwks(&jwks).expect("key set");
    assert_eq!(
        keys.get("ci-key-1").map(PublicKey::algorithm),
        Some(Algorithm::ES256)
    );

    let header = json!({"alg": "ES256", "kid": "ci-key-1", "typ": "JWT"}).to_string();
    let input = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let sig = pair.sign(&rng, input.as_bytes()).expect("sign");
    let token = format!("{input}.{}", b64(sig.as_ref()));
    let verified = Verifier::new(keys, [ISS], ["miren"])
        .verify(&token, NOW)
        .expect("verify");
    assert_eq!(verified.alg, Algorithm::ES256);
}

#[test]
fn eddsa_tokens_verify_with_a_legacy_key() {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
    let pkcs8 = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).expect("ed");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
    let legacy = PublicKey::ed25519_from_raw(pair.public_key().as_ref()).expect("key");
    let keys = KeySet::from_keys([fx().ours.public_key().clone(), legacy.clone()]).expect("set");
    let header = json!({"alg": "EdDSA", "kid": legacy.kid()}).to_string();
    let input = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let token = format!("{input}.{}", b64(pair.sign(input.as_bytes()).as_ref()));
    let verifier = Verifier::new(keys, [ISS], ["miren"]);
    assert_eq!(
        verifier.verify(&token, NOW).map(|v| v.alg),
        Ok(Algorithm::EdDSA)
    );
}
