//! The OAuth 2.0 token endpoint's request rules: a form body (and an
//! `Authorization: Basic` header) in, a typed [`Grant`] or an RFC error out.
//!
//! The coordinator is a standard token endpoint (`<issuer>/oauth2/token`) so
//! that any OAuth client can trade a deploy key (`client_credentials`, RFC
//! 6749 §4.4), or a CI OIDC token (token exchange, RFC 8693; JWT bearer, RFC
//! 7523) for a short-lived, app-scoped access token. Everything about the
//! request that needs no key, no store and no clock is decided here:
//! parameters appear at most once (RFC 6749 §3.2), a client authenticates
//! one way only (§2.3), the grant type is known, the subject token type is
//! one we verify, the `scope` names one app (`app:NAME[:ACTION]`, the same
//! syntax for every grant), and an `audience`/`resource` names this cluster
//! or the request is `invalid_target` (RFC 8693 §2.2.2). The error
//! descriptions say what the caller sent and how to fix it, never anything
//! the caller did not send.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::names::check_app_name;

/// Path of the token endpoint under the issuer.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// Largest form body accepted (a CI token is at most
/// [`crate::MAX_TOKEN_BYTES`]; the rest is a few short parameters).
pub const MAX_BODY_BYTES: usize = crate::verify::MAX_TOKEN_BYTES + 4096;
/// Largest `client_id` or `client_secret`.
pub const MAX_CLIENT_FIELD_BYTES: usize = 256;

/// `grant_type` of client credentials.
pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
/// `grant_type` of RFC 8693 token exchange.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `grant_type` of RFC 7523 JWT bearer assertions.
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Every grant type the endpoint serves, for discovery.
pub const GRANT_TYPES_SUPPORTED: &[&str] = &[
    GRANT_CLIENT_CREDENTIALS,
    GRANT_TOKEN_EXCHANGE,
    GRANT_JWT_BEARER,
];
/// Client authentication methods, for discovery.
pub const AUTH_METHODS_SUPPORTED: &[&str] = &["client_secret_basic", "client_secret_post"];
/// RFC 8693 token type of an OIDC ID token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// RFC 8693 token type of any JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 token type of an access token (what the endpoint issues).
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The RFC error codes the endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A parameter is missing, repeated or malformed.
    InvalidRequest,
    /// Client authentication failed (401).
    InvalidClient,
    /// The grant (a CI token, a key's state) is invalid, expired or used.
    InvalidGrant,
    /// The client may not use this grant for this app.
    UnauthorizedClient,
    /// The grant type is not served.
    UnsupportedGrantType,
    /// The scope is malformed or more than the grant allows.
    InvalidScope,
    /// The audience or resource is not this cluster (RFC 8693).
    InvalidTarget,
    /// Too many requests (RFC 6585 429; not an RFC 6749 code, named
    /// `slow_down` like RFC 8628's).
    SlowDown,
    /// The endpoint cannot answer now (a store or key failure).
    TemporarilyUnavailable,
}

impl ErrorCode {
    /// The `error` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::InvalidTarget => "invalid_target",
            ErrorCode::SlowDown => "slow_down",
            ErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }

    /// The HTTP status of the answer (RFC 6749 §5.2).
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidClient => 401,
            ErrorCode::SlowDown => 429,
            ErrorCode::TemporarilyUnavailable => 503,
            _ => 400,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An RFC 6749 §5.2 error: a code and a description for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {description}")]
pub struct OAuthError {
    /// The `error` code.
    pub code: ErrorCode,
    /// The `error_description`.
    pub description: String,
}

impl OAuthError {
    /// An error with `code` and `description`.
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        OAuthError {
            code,
            description: description.into(),
        }
    }

    fn request(description: impl Into<String>) -> Self {
        OAuthError::new(ErrorCode::InvalidRequest, description)
    }

    /// The JSON body of the answer.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.code.as_str(),
            "error_description": self.description,
        })
    }
}

/// What an access token lets its holder do in its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Upload artifacts and deploy them.
    Deploy,
    /// Read the app's status.
    Status,
    /// Read the app's logs.
    Logs,
}

impl Action {
    /// Every action, the most a binding or a deploy key grants.
    pub const ALL: [Action; 3] = [Action::Deploy, Action::Status, Action::Logs];

    /// Its name in a scope.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Status => "status",
            Action::Logs => "logs",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// A scope: one app and what may be done there. Written
/// `app:NAME` (every action the grant allows) or as space-separated
/// `app:NAME:ACTION` items, all naming the same app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The app.
    pub app: String,
    /// The actions, sorted, without repeats; never empty.
    pub actions: Vec<Action>,
}

impl Scope {
    /// The whole of `app`.
    pub fn whole_app(app: &str) -> Scope {
        Scope {
            app: app.to_string(),
            actions: Action::ALL.to_vec(),
        }
    }

    /// Parses a scope parameter; errors are `invalid_scope`.
    pub fn parse(text: &str) -> Result<Scope, OAuthError> {
        let bad = |d: String| OAuthError::new(ErrorCode::InvalidScope, d);
        let mut app: Option<&str> = None;
        let mut actions = Vec::new();
        let mut whole = false;
        let items: Vec<&str> = text.split(' ').filter(|s| !s.is_empty()).collect();
        if items.is_empty() {
            return Err(bad(
                "scope is required: app:NAME (or app:NAME:deploy, app:NAME:status, app:NAME:logs)"
                    .into(),
            ));
        }
        for item in items {
            let Some(rest) = item.strip_prefix("app:") else {
                return Err(bad(format!("scope item {item:?} is not app:NAME[:ACTION]")));
            };
            let (name, action) = match rest.split_once(':') {
                Some((n, a)) => (n, Some(a)),
                None => (rest, None),
            };
            check_app_name(name).map_err(|e| bad(format!("scope item {item:?}: {e}")))?;
            match app {
                Some(a) if a != name => {
                    return Err(bad(format!(
                        "a token serves one app; the scope names both {a:?} and {name:?}"
                    )))
                }
                _ => app = Some(name),
            }
            match action {
                None => whole = true,
                Some(a) => actions.push(Action::parse(a).ok_or_else(|| {
                    bad(format!(
                        "scope item {item:?}: unknown action {a:?} (deploy, status or logs)"
                    ))
                })?),
            }
        }
        if whole {
            actions = Action::ALL.to_vec();
        }
        actions.sort();
        actions.dedup();
        Ok(Scope {
            app: app.unwrap_or_default().to_string(),
            actions,
        })
    }

    /// The scope as written in a token and a response: one
    /// `app:NAME:ACTION` item per action.
    pub fn to_scope_string(&self) -> String {
        self.actions
            .iter()
            .map(|a| format!("app:{}:{}", self.app, a.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether it allows `action`.
    pub fn allows(&self, action: Action) -> bool {
        self.actions.contains(&action)
    }

    /// Whether every action of `self` is within `granted` (the same app).
    pub fn within(&self, granted: &Scope) -> bool {
        self.app == granted.app && self.actions.iter().all(|a| granted.allows(*a))
    }
}

/// How a client presented its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `Authorization: Basic`.
    Basic,
    /// `client_id` and `client_secret` in the form.
    Post,
}

/// A client's id and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// `client_id`.
    pub id: String,
    /// `client_secret`.
    pub secret: String,
    /// How it came.
    pub method: AuthMethod,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("id", &self.id)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

/// What a CI token came as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiTokenGrant {
    /// RFC 8693 token exchange (`subject_token`); the answer carries
    /// `issued_token_type`.
    Exchange,
    /// RFC 7523 JWT bearer (`assertion`).
    JwtBearer,
}

/// A well-formed token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A deploy key trades itself for a token.
    ClientCredentials {
        /// The key.
        client: ClientCredentials,
        /// What is asked.
        scope: Scope,
    },
    /// A CI OIDC token trades itself for a token.
    CiToken {
        /// How it came.
        kind: CiTokenGrant,
        /// The CI token (not yet verified).
        token: String,
        /// What is asked.
        scope: Scope,
    },
}

/// Decodes an `application/x-www-form-urlencoded` body into pairs.
/// Errors are `invalid_request`.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(OAuthError::request(format!(
            "the request body is larger than {MAX_BODY_BYTES} bytes"
        )));
    }
    let count = body.split(|b| *b == b'&').filter(|p| !p.is_empty()).count();
    if count > MAX_PARAMS {
        return Err(OAuthError::request(format!(
            "the request has {count} parameters; at most {MAX_PARAMS} are accepted"
        )));
    }
    let mut out = Vec::new();
    for part in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match part.iter().position(|b| *b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &part[..0]),
        };
        let name = percent_decode(k)?;
        let value = percent_decode(v)?;
        out.push((name, value));
    }
    Ok(out)
}

fn percent_decode(bytes: &[u8]) -> Result<String, OAuthError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| OAuthError::request("the form body has a malformed %-escape"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| OAuthError::request("the form body is not UTF-8"))
}

/// Reads an `Authorization` header value for HTTP Basic client
/// authentication (RFC 6749 §2.3.1: id and secret form-encoded, then
/// `id:secret` in base64). `None` when the header is not Basic.
pub fn parse_basic(header: &str) -> Option<Result<(String, String), OAuthError>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bad = || OAuthError::new(ErrorCode::InvalidClient, "malformed HTTP Basic credentials");
    let decoded = match STANDARD.decode(rest.trim()) {
        Ok(d) => d,
        Err(_) => return Some(Err(bad())),
    };
    let Some(colon) = decoded.iter().position(|b| *b == b':') else {
        return Some(Err(bad()));
    };
    let id = percent_decode(&decoded[..colon]);
    let secret = percent_decode(&decoded[colon + 1..]);
    Some(match (id, secret) {
        (Ok(id), Ok(secret)) => Ok((id, secret)),
        _ => Err(bad()),
    })
}

/// Most parameters one request may carry (every grant needs fewer than
/// ten): a body of thousands of empty ones is refused before any work.
pub const MAX_PARAMS: usize = 32;

/// The parameters of one request, each at most once.
struct Params(Vec<(String, String)>);

impl Params {
    fn new(pairs: Vec<(String, String)>) -> Result<Params, OAuthError> {
        if pairs.len() > MAX_PARAMS {
            return Err(OAuthError::request(format!(
                "the request has {} parameters; at most {MAX_PARAMS} are accepted",
                pairs.len()
            )));
        }
        for (i, (k, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(p, _)| p == k) {
                return Err(OAuthError::request(format!(
                    "parameter {k:?} appears more than once"
                )));
            }
        }
        Ok(Params(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn require(&self, name: &str, grant: &str) -> Result<&str, OAuthError> {
        self.get(name).ok_or_else(|| {
            OAuthError::request(format!("the {grant} grant needs the {name:?} parameter"))
        })
    }
}

/// Parses a token request: the form `pairs`, the `Authorization` header
/// (if any) and the audiences/resources that name this cluster
/// (`targets`). Every refusal is an RFC error.
pub fn parse_request(
    pairs: Vec<(String, String)>,
    authorization: Option<&str>,
    targets: &[String],
) -> Result<Grant, OAuthError> {
    let params = Params::new(pairs)?;
    let basic = match authorization.and_then(parse_basic) {
        Some(r) => Some(r?),
        None => None,
    };
    let posted = params.get("client_secret").is_some();
    let client = match (basic, posted) {
        (Some(_), true) => {
            return Err(OAuthError::request(
                "the client authenticated twice (HTTP Basic and client_secret); use one",
            ))
        }
        (Some((id, secret)), false) => Some(ClientCredentials {
            id,
            secret,
            method: AuthMethod::Basic,
        }),
        (None, true) => Some(ClientCredentials {
            id: params
                .get("client_id")
                .ok_or_else(|| {
                    OAuthError::new(ErrorCode::InvalidClient, "client_secret without client_id")
                })?
                .to_string(),
            secret: params.get("client_secret").unwrap_or_default().to_string(),
            method: AuthMethod::Post,
        }),
        (None, false) => None,
    };
    if let Some(c) = &client {
        if c.id.len() > MAX_CLIENT_FIELD_BYTES || c.secret.len() > MAX_CLIENT_FIELD_BYTES {
            return Err(OAuthError::new(
                ErrorCode::InvalidClient,
                "client_id or client_secret is too long",
            ));
        }
    }
    for name in ["audience", "resource"] {
        if let Some(t) = params.get(name) {
            if !targets.iter().any(|ok| ok == t) {
                return Err(OAuthError::new(
                    ErrorCode::InvalidTarget,
                    format!(
                        "{name} {t:?} is not this cluster; leave it out or name {}",
                        targets
                            .first()
                            .map(String::as_str)
                            .unwrap_or("this cluster")
                    ),
                ));
            }
        }
    }
    let grant_type = params
        .get("grant_type")
        .ok_or_else(|| OAuthError::request("the \"grant_type\" parameter is required"))?;
    let scope = || Scope::parse(params.get("scope").unwrap_or_default());
    let no_client = |grant: &str| {
        match &client {
        Some(_) => Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            format!("a deploy key may only use client_credentials, not {grant}; send the CI token without client credentials"),
        )),
        None => Ok(()),
    }
    };
    match grant_type {
        GRANT_CLIENT_CREDENTIALS => {
            let client = client.ok_or_else(|| {
                OAuthError::new(
                    ErrorCode::InvalidClient,
                    "client_credentials needs the deploy key's client_id and client_secret (HTTP Basic or in the form)",
                )
            })?;
            Ok(Grant::ClientCredentials {
                client,
                scope: scope()?,
            })
        }
        GRANT_TOKEN_EXCHANGE => {
            no_client("token-exchange")?;
            let token = params.require("subject_token", "token-exchange")?;
            let kind = params.require("subject_token_type", "token-exchange")?;
            if kind != TOKEN_TYPE_ID_TOKEN && kind != TOKEN_TYPE_JWT {
                return Err(OAuthError::request(format!(
                    "subject_token_type {kind:?} is not served; use {TOKEN_TYPE_ID_TOKEN} or {TOKEN_TYPE_JWT}"
                )));
            }
            if params.get("actor_token").is_some() {
                return Err(OAuthError::request("actor_token is not supported"));
            }
            if let Some(asked) = params.get("requested_token_type") {
                if asked != TOKEN_TYPE_ACCESS_TOKEN && asked != TOKEN_TYPE_JWT {
                    return Err(OAuthError::request(format!(
                        "requested_token_type {asked:?} is not issued; only {TOKEN_TYPE_ACCESS_TOKEN}"
                    )));
                }
            }
            Ok(Grant::CiToken {
                kind: CiTokenGrant::Exchange,
                token: token.to_string(),
                scope: scope()?,
            })
        }
        GRANT_JWT_BEARER => {
            no_client("jwt-bearer")?;
            let token = params.require("assertion", "jwt-bearer")?;
            Ok(Grant::CiToken {
                kind: CiTokenGrant::JwtBearer,
                token: token.to_string(),
                scope: scope()?,
            })
        }
        other => Err(OAuthError::new(
            ErrorCode::UnsupportedGrantType,
            format!(
                "grant_type {other:?} is not served; use one of {}",
                GRANT_TYPES_SUPPORTED.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn targets() -> Vec<String> {
        vec!["cluster.test:8443".into(), "https://cluster.test".into()]
    }

    #[test]
    fn a_form_body_decodes_with_escapes_and_plus() {
        let got =
            parse_form(b"grant_type=client_credentials&scope=app%3Aweb+app%3Aweb%3Alogs").unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("grant_type", "client_credentials"),
                ("scope", "app:web app:web:logs")
            ])
        );
        assert_eq!(
            parse_form(b"a=%zz").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        let big = vec![b'a'; MAX_BODY_BYTES + 1];
        assert_eq!(
            parse_form(&big).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        // Thousands of tiny parameters are refused before any is decoded.
        let many: Vec<u8> = (0..MAX_PARAMS + 1)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes();
        assert!(parse_form(&many)
            .unwrap_err()
            .description
            .contains("at most"));
        let enough: Vec<u8> = (0..MAX_PARAMS)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes();
        assert_eq!(parse_form(&enough).unwrap().len(), MAX_PARAMS);
    }

    #[test]
    fn scopes_name_one_app_and_known_actions() {
        assert_eq!(Scope::parse("app:web").unwrap(), Scope::whole_app("web"));
        let s = Scope::parse("app:web:logs app:web:status app:web:logs").unwrap();
        assert_eq!(s.actions, vec![Action::Status, Action::Logs]);
        assert_eq!(s.to_scope_string(), "app:web:status app:web:logs");
        assert!(s.within(&Scope::whole_app("web")));
        assert!(!Scope::whole_app("web").within(&s));
        assert!(!s.within(&Scope::whole_app("api")));
        for bad in [
            "",
            "web",
            "app:web app:api",
            "app:web:admin",
            "app:Web!",
            "openid",
        ] {
            assert_eq!(
                Scope::parse(bad).unwrap_err().code,
                ErrorCode::InvalidScope,
                "{bad}"
            );
        }
    }

    #[test]
    fn client_credentials_by_basic_or_post_but_not_both() {
        let basic = format!("Basic {}", STANDARD.encode("key-1:s%3Acret"));
        let g = parse_request(
            pairs(&[("grant_type", "client_credentials"), ("scope", "app:web")]),
            Some(&basic),
            &targets(),
        )
        .unwrap();
        assert_eq!(
            g,
            Grant::ClientCredentials {
                client: ClientCredentials {
                    id: "key-1".into(),
                    secret: "s:cret".into(),
                    method: AuthMethod::Basic
                },
                scope: Scope::whole_app("web")
            }
        );
        let post = pairs(&[
            ("grant_type", "client_credentials"),
            ("client_id", "key-1"),
            ("client_secret", "s"),
            ("scope", "app:web"),
        ]);
        assert!(matches!(
            parse_request(post.clone(), None, &targets()).unwrap(),
            Grant::ClientCredentials {
                client: ClientCredentials {
                    method: AuthMethod::Post,
                    ..
                },
                ..
            }
        ));
        let twice = parse_request(post, Some(&basic), &targets()).unwrap_err();
        assert_eq!(twice.code, ErrorCode::InvalidRequest);
        let none = parse_request(
            pairs(&[("grant_type", "client_credentials"), ("scope", "app:web")]),
            None,
            &targets(),
        )
        .unwrap_err();
        assert_eq!(
            (none.code, none.code.status()),
            (ErrorCode::InvalidClient, 401)
        );
        let garbled = parse_request(
            pairs(&[("grant_type", "client_credentials")]),
            Some("Basic !!!"),
            &targets(),
        )
        .unwrap_err();
        assert_eq!(garbled.code, ErrorCode::InvalidClient);
    }

    #[test]
    fn exchange_and_bearer_need_their_token_and_a_known_type() {
        let ok = parse_request(
            pairs(&[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("subject_token", "a.b.c"),
                ("subject_token_type", TOKEN_TYPE_ID_TOKEN),
                ("scope", "app:web:deploy"),
                ("audience", "https://cluster.test"),
            ]),
            None,
            &targets(),
        )
        .unwrap();
        assert_eq!(
            ok,
            Grant::CiToken {
                kind: CiTokenGrant::Exchange,
                token: "a.b.c".into(),
                scope: Scope {
                    app: "web".into(),
                    actions: vec![Action::Deploy]
                }
            }
        );
        let wrong_type = parse_request(
            pairs(&[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("subject_token", "a.b.c"),
                ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
                ("scope", "app:web"),
            ]),
            None,
            &targets(),
        )
        .unwrap_err();
        assert_eq!(wrong_type.code, ErrorCode::InvalidRequest);
        let other_target = parse_request(
            pairs(&[
                ("grant_type", GRANT_JWT_BEARER),
                ("assertion", "a.b.c"),
                ("resource", "https://elsewhere.test"),
                ("scope", "app:web"),
            ]),
            None,
            &targets(),
        )
        .unwrap_err();
        assert_eq!(other_target.code, ErrorCode::InvalidTarget);
        let missing = parse_request(
            pairs(&[("grant_type", GRANT_JWT_BEARER), ("scope", "app:web")]),
            None,
            &targets(),
        )
        .unwrap_err();
        assert!(missing.description.contains("assertion"), "{missing}");
        let dup = parse_request(
            pairs(&[
                ("grant_type", GRANT_JWT_BEARER),
                ("grant_type", GRANT_JWT_BEARER),
            ]),
            None,
            &targets(),
        )
        .unwrap_err();
        assert_eq!(dup.code, ErrorCode::InvalidRequest);
        let unknown =
            parse_request(pairs(&[("grant_type", "password")]), None, &targets()).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnsupportedGrantType);
        assert_eq!(unknown.to_json()["error"], "unsupported_grant_type");
    }
}
