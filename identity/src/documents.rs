//! The issuer's public documents: JWKS, OIDC discovery, and issuer URLs.
//!
//! Outside verifiers (AWS STS, Vault, any OIDC library) find the cluster's
//! keys by fetching `<issuer>/.well-known/openid-configuration` and then its
//! `jwks_uri`; the coordinator does the same for CI providers. Both sides must
//! agree byte for byte on the issuer string, so the rule for issuer URLs
//! lives here, in one place:
//!
//! * `https://` only (lowercase scheme), with a non-empty host;
//! * no user info, no query, no fragment;
//! * printable ASCII only (IDNs must be given in punycode), no backslash;
//! * no uppercase letters in the host and no explicit `:443`, because
//!   verifiers that normalise URLs would then disagree with those that do not;
//! * no `.`/`..` path segments and no empty segment except a final `/`;
//! * **nothing is normalised**: the string is the issuer, compared exactly
//!   with `iss`. `https://a.example` and `https://a.example/` are two different
//!   issuers; a trailing slash is kept (some providers, such as Auth0, use
//!   one). Well-known URLs are built as OIDC Discovery 1.0 §4 says: one
//!   trailing `/` of the issuer is removed before the path is appended.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::keys::{Algorithm, Jwk, PublicKey};

/// Path of the OIDC discovery document under the issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Path of the cluster's JWKS under its issuer.
pub const JWKS_PATH: &str = "/.well-known/miren/jwks";

/// The claims a workload token carries, for `claims_supported`.
pub const WORKLOAD_CLAIMS_SUPPORTED: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "app",
    "sandbox_id",
    "cluster_id",
    "organization_id",
];

/// Why an issuer URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerUrlError {
    /// The URL is empty.
    #[error("issuer URL is empty")]
    Empty,
    /// The URL does not start with `https://`.
    #[error("issuer URL {0:?} must start with https://")]
    NotHttps(String),
    /// The URL has no host.
    #[error("issuer URL {0:?} has no host")]
    MissingHost(String),
    /// The host contains uppercase letters.
    #[error("issuer URL {0:?} must have a lowercase host")]
    UppercaseHost(String),
    /// The port is not a number in 1..=65535, or is the default `443`.
    #[error("issuer URL {0:?} has an invalid or redundant port (omit :443)")]
    BadPort(String),
    /// The URL has `user@` before the host.
    #[error("issuer URL {0:?} must not contain user info")]
    UserInfo(String),
    /// The URL has a `?query`.
    #[error("issuer URL {0:?} must not contain a query")]
    Query(String),
    /// The URL has a `#fragment`.
    #[error("issuer URL {0:?} must not contain a fragment")]
    Fragment(String),
    /// The URL has a character outside printable ASCII, or a backslash.
    #[error("issuer URL {url:?} contains the forbidden character {ch:?}")]
    ForbiddenChar {
        /// The URL.
        url: String,
        /// The first forbidden character.
        ch: char,
    },
    /// The path has a `.` or `..` segment, or an empty segment before its end.
    #[error("issuer URL {0:?} has an empty, '.' or '..' path segment")]
    BadPathSegment(String),
}

/// A validated issuer URL; see the module documentation for the rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct IssuerUrl(String);

impl IssuerUrl {
    /// Validates `url` as an issuer, keeping it verbatim.
    pub fn parse(url: &str) -> Result<Self, IssuerUrlError> {
        if url.is_empty() {
            return Err(IssuerUrlError::Empty);
        }
        let owned = || url.to_string();
        if let Some(ch) = url.chars().find(|c| !(c.is_ascii_graphic()) || *c == '\\') {
            return Err(IssuerUrlError::ForbiddenChar { url: owned(), ch });
        }
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| IssuerUrlError::NotHttps(owned()))?;
        if rest.contains('#') {
            return Err(IssuerUrlError::Fragment(owned()));
        }
        if rest.contains('?') {
            return Err(IssuerUrlError::Query(owned()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(IssuerUrlError::UserInfo(owned()));
        }
        let (host, port) = split_host_port(authority);
        if host.is_empty() || host == "[]" {
            return Err(IssuerUrlError::MissingHost(owned()));
        }
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(IssuerUrlError::UppercaseHost(owned()));
        }
        if let Some(port) = port {
            let valid = !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && !port.starts_with('0')
                && port.parse::<u16>().is_ok_and(|p| p != 443);
            if !valid {
                return Err(IssuerUrlError::BadPort(owned()));
            }
        }
        if !path.is_empty() {
            // `path` starts with '/'; a final empty segment is a trailing slash.
            let segments: Vec<&str> = path[1..].split('/').collect();
            let last = segments.len() - 1;
            for (i, segment) in segments.iter().enumerate() {
                let bad = *segment == "." || *segment == ".." || (segment.is_empty() && i != last);
                if bad {
                    return Err(IssuerUrlError::BadPathSegment(owned()));
                }
            }
        }
        Ok(IssuerUrl(url.to_string()))
    }

    /// The issuer, exactly as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `path` (starting with `/`) appended to the issuer after removing one
    /// trailing `/` from it.
    pub fn join(&self, path: &str) -> String {
        let base = self.0.strip_suffix('/').unwrap_or(&self.0);
        format!("{base}{path}")
    }

    /// `<issuer>/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        self.join(DISCOVERY_PATH)
    }

    /// `<issuer>/.well-known/miren/jwks`: the cluster's own JWKS.
    pub fn jwks_uri(&self) -> String {
        self.join(JWKS_PATH)
    }
}

/// Splits `host[:port]` / `[v6][:port]`.
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let (host, rest) = authority.split_at(end + 1);
                match rest.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None if rest.is_empty() => (host, None),
                    // Garbage after `]` makes the port check fail.
                    None => (host, Some(rest)),
                }
            }
            None => ("", None),
        };
    }
    match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

impl fmt::Display for IssuerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for IssuerUrl {
    type Err = IssuerUrlError;

    fn from_str(s: &str) -> Result<Self, IssuerUrlError> {
        IssuerUrl::parse(s)
    }
}

impl AsRef<str> for IssuerUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for IssuerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        IssuerUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A JWKS document: `{"keys":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys, active one first by convention.
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The JWKS publishing `keys` in the given order.
    pub fn from_keys<'a, I: IntoIterator<Item = &'a PublicKey>>(keys: I) -> Self {
        Jwks {
            keys: keys.into_iter().map(PublicKey::to_jwk).collect(),
        }
    }

    /// The document as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        // A struct of strings always serialises.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The OIDC discovery document (`/.well-known/openid-configuration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryDocument {
    /// The issuer, exactly as in `iss`.
    pub issuer: String,
    /// Where the JWKS is.
    pub jwks_uri: String,
    /// `["id_token"]`.
    #[serde(default)]
    pub response_types_supported: Vec<String>,
    /// `["public"]`.
    #[serde(default)]
    pub subject_types_supported: Vec<String>,
    /// Algorithms of the published keys, RS256 first.
    #[serde(default)]
    pub id_token_signing_alg_values_supported: Vec<String>,
    /// Claims tokens may carry; omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims_supported: Vec<String>,
    /// The OAuth token endpoint (`<issuer>/oauth2/token`), if served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    /// Grants the token endpoint serves; omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grant_types_supported: Vec<String>,
    /// How clients authenticate there; omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// Why a fetched discovery document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The document is not valid JSON of the expected shape.
    #[error("discovery document is not valid: {0}")]
    Json(String),
    /// Its `issuer` is not the issuer it was fetched for (OIDC Discovery §4.3).
    #[error("discovery document names issuer {got:?}, expected {expected:?}")]
    IssuerMismatch {
        /// The `issuer` in the document.
        got: String,
        /// The issuer the document was fetched for.
        expected: String,
    },
    /// Its `jwks_uri` is not an https URL.
    #[error("discovery document jwks_uri {0:?} is not an https URL")]
    BadJwksUri(String),
}

impl DiscoveryDocument {
    /// The cluster's discovery document for `issuer` publishing `keys`.
    /// `id_token_signing_alg_values_supported` lists the keys' algorithms
    /// once each, RS256 always first (OIDC requires it).
    pub fn new<'a, I: IntoIterator<Item = &'a PublicKey>>(
        issuer: &IssuerUrl,
        keys: I,
        claims_supported: &[&str],
    ) -> Self {
        let mut algs: Vec<Algorithm> = keys.into_iter().map(PublicKey::algorithm).collect();
        algs.push(Algorithm::RS256);
        algs.sort_by_key(|a| (*a != Algorithm::RS256, *a));
        algs.dedup();
        DiscoveryDocument {
            issuer: issuer.as_str().to_string(),
            jwks_uri: issuer.jwks_uri(),
            response_types_supported: vec!["id_token".to_string()],
            subject_types_supported: vec!["public".to_string()],
            id_token_signing_alg_values_supported: algs
                .into_iter()
                .map(|a| a.as_str().to_string())
                .collect(),
            claims_supported: claims_supported.iter().map(|c| c.to_string()).collect(),
            token_endpoint: None,
            grant_types_supported: vec![],
            token_endpoint_auth_methods_supported: vec![],
        }
    }

    /// The same document advertising the cluster's token endpoint
    /// (`crate::oauth`).
    pub fn with_token_endpoint(mut self, issuer: &IssuerUrl) -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        self.token_endpoint = Some(issuer.join(crate::oauth::TOKEN_PATH));
        self.grant_types_supported = strings(crate::oauth::GRANT_TYPES_SUPPORTED);
        self.token_endpoint_auth_methods_supported = strings(crate::oauth::AUTH_METHODS_SUPPORTED);
        self
    }

    /// Reads a discovery document fetched from `expected.discovery_url()`,
    /// refusing one that names another issuer or a non-https `jwks_uri`.
    pub fn parse_for_issuer(bytes: &[u8], expected: &IssuerUrl) -> Result<Self, DiscoveryError> {
        let doc: DiscoveryDocument =
            serde_json::from_slice(bytes).map_err(|e| DiscoveryError::Json(e.to_string()))?;
        if doc.issuer != expected.as_str() {
            return Err(DiscoveryError::IssuerMismatch {
                got: doc.issuer,
                expected: expected.as_str().to_string(),
            });
        }
        let host = doc.jwks_uri.strip_prefix("https://").unwrap_or("");
        let host = host.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty()
            || host.contains('@')
            || doc
                .jwks_uri
                .chars()
                .any(|c| !c.is_ascii_graphic() || c == '\\')
        {
            return Err(DiscoveryError::BadJwksUri(doc.jwks_uri));
        }
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(s: &str) -> IssuerUrl {
        IssuerUrl::parse(s).expect("issuer")
    }

    #[test]
    fn issuer_urls_accepted() {
        for ok in [
            "https://miren.example",
            "https://miren.example:8443",
            "https://10.0.0.1:8443",
            "https://[::1]:8443",
            "https://tenant.auth0.com/",
            "https://gitlab.example/oidc/issuer",
            "https://token.actions.githubusercontent.com",
        ] {
            assert_eq!(issuer(ok).as_str(), ok);
        }
    }

    #[test]
    fn issuer_must_be_https() {
        assert!(matches!(
            IssuerUrl::parse("http://miren.example"),
            Err(IssuerUrlError::NotHttps(_))
        ));
        assert!(matches!(
            IssuerUrl::parse("HTTPS://miren.example"),
            Err(IssuerUrlError::NotHttps(_))
        ));
        assert!(matches!(
            IssuerUrl::parse("miren.example"),
            Err(IssuerUrlError::NotHttps(_))
        ));
    }

    #[test]
    fn issuer_refuses_query_fragment_userinfo() {
        assert!(matches!(
            IssuerUrl::parse("https://a.example?x=1"),
            Err(IssuerUrlError::Query(_))
        ));
        assert!(matches!(
            IssuerUrl::parse("https://a.example/p#f"),
            Err(IssuerUrlError::Fragment(_))
        ));
        assert!(matches!(
            IssuerUrl::parse("https://u@a.example"),
            Err(IssuerUrlError::UserInfo(_))
        ));
    }

    #[test]
    fn issuer_refuses_bad_hosts_and_ports() {
        assert_eq!(IssuerUrl::parse(""), Err(IssuerUrlError::Empty));
        assert!(matches!(
            IssuerUrl::parse("https://"),
            Err(IssuerUrlError::MissingHost(_))
        ));
        assert!(matches!(
            IssuerUrl::parse("https:///path"),
            Err(IssuerUrlError::MissingHost(_))
        ));
        assert!(matches!(
            IssuerUrl::parse("https://Miren.example"),
            Err(IssuerUrlError::UppercaseHost(_))
        ));
        for bad in [
            "https://a.example:",
            "https://a.example:443",
            "https://a.example:99999",
            "https://a.example:x",
            "https://a.example:0",
            "https://[::1]x",
        ] {
            assert!(
                matches!(IssuerUrl::parse(bad), Err(IssuerUrlError::BadPort(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn issuer_refuses_odd_characters_and_segments() {
        assert!(matches!(
            IssuerUrl::parse("https://a.example/ x"),
            Err(IssuerUrlError::ForbiddenChar { ch: ' ', .. })
        ));
        assert!(matches!(
            IssuerUrl::parse("https://a.example\\b"),
            Err(IssuerUrlError::ForbiddenChar { ch: '\\', .. })
        ));
        assert!(matches!(
            IssuerUrl::parse("https://exämple.com"),
            Err(IssuerUrlError::ForbiddenChar { .. })
        ));
        for bad in [
            "https://a.example/../b",
            "https://a.example/./b",
            "https://a.example//b",
            "https://a.example/b//",
        ] {
            assert!(
                matches!(
                    IssuerUrl::parse(bad),
                    Err(IssuerUrlError::BadPathSegment(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn trailing_slash_is_kept_verbatim_and_well_known_joins_once() {
        let with = issuer("https://a.example/");
        let without = issuer("https://a.example");
        assert_ne!(with, without);
        assert_eq!(with.as_str(), "https://a.example/");
        assert_eq!(
            with.discovery_url(),
            "https://a.example/.well-known/openid-configuration"
        );
        assert_eq!(with.discovery_url(), without.discovery_url());
        assert_eq!(
            without.jwks_uri(),
            "https://a.example/.well-known/miren/jwks"
        );
    }

    fn ed25519_key() -> PublicKey {
        PublicKey::ed25519_from_raw(&[7u8; 32]).expect("key")
    }

    #[test]
    fn discovery_without_keys_still_lists_rs256() {
        let doc = DiscoveryDocument::new(&issuer("https://a.example"), [], &[]);
        assert_eq!(doc.id_token_signing_alg_values_supported, vec!["RS256"]);
        let v = serde_json::to_value(&doc).expect("json");
        assert!(v.get("claims_supported").is_none());
        assert!(v.get("token_endpoint").is_none());
    }

    #[test]
    fn discovery_advertises_the_token_endpoint() {
        let iss = issuer("https://a.example/c1/");
        let v =
            serde_json::to_value(DiscoveryDocument::new(&iss, [], &[]).with_token_endpoint(&iss))
                .expect("json");
        assert_eq!(v["token_endpoint"], "https://a.example/c1/oauth2/token");
        assert_eq!(
            v["grant_types_supported"][1],
            crate::oauth::GRANT_TOKEN_EXCHANGE
        );
        assert_eq!(
            v["token_endpoint_auth_methods_supported"],
            serde_json::json!(["client_secret_basic", "client_secret_post"])
        );
    }

    #[test]
    fn discovery_lists_rs256_first_then_legacy_eddsa() {
        let ed = ed25519_key();
        let doc = DiscoveryDocument::new(
            &issuer("https://a.example"),
            [&ed],
            WORKLOAD_CLAIMS_SUPPORTED,
        );
        assert_eq!(
            doc.id_token_signing_alg_values_supported,
            vec!["RS256", "EdDSA"]
        );
        let v = serde_json::to_value(&doc).expect("json");
        assert_eq!(v["issuer"], "https://a.example");
        assert_eq!(v["jwks_uri"], "https://a.example/.well-known/miren/jwks");
        assert_eq!(
            v["response_types_supported"],
            serde_json::json!(["id_token"])
        );
        assert_eq!(v["subject_types_supported"], serde_json::json!(["public"]));
        assert_eq!(v["claims_supported"][0], "iss");
    }

    #[test]
    fn fetched_discovery_must_name_its_issuer() {
        let expected = issuer("https://token.actions.githubusercontent.com");
        let good = br#"{"issuer":"https://token.actions.githubusercontent.com",
            "jwks_uri":"https://token.actions.githubusercontent.com/.well-known/jwks",
            "subject_types_supported":["public","pairwise"],"extra":1}"#;
        let doc = DiscoveryDocument::parse_for_issuer(good, &expected).expect("doc");
        assert_eq!(
            doc.jwks_uri,
            "https://token.actions.githubusercontent.com/.well-known/jwks"
        );
        let other = br#"{"issuer":"https://token.actions.githubusercontent.com/",
            "jwks_uri":"https://x/jwks"}"#;
        assert!(matches!(
            DiscoveryDocument::parse_for_issuer(other, &expected),
            Err(DiscoveryError::IssuerMismatch { .. })
        ));
        let http = br#"{"issuer":"https://token.actions.githubusercontent.com",
            "jwks_uri":"http://x/jwks"}"#;
        assert!(matches!(
            DiscoveryDocument::parse_for_issuer(http, &expected),
            Err(DiscoveryError::BadJwksUri(_))
        ));
        assert!(matches!(
            DiscoveryDocument::parse_for_issuer(b"nope", &expected),
            Err(DiscoveryError::Json(_))
        ));
    }

    #[test]
    fn jwks_document_shape() {
        let ed = ed25519_key();
        let v = Jwks::from_keys([&ed]).to_json();
        assert_eq!(v["keys"][0]["kid"], ed.kid());
        assert_eq!(v["keys"][0]["kty"], "OKP");
        assert_eq!(v["keys"].as_array().map(Vec::len), Some(1));
    }
}
