//! The OAuth 2.0 token endpoint (`<issuer>/oauth2/token` on the HTTPS
//! listener) and the login that turns its access tokens into the
//! app-confined capability.
//!
//! Every credential ends here: a deploy key (`client_credentials`), a CI
//! OIDC token (RFC 8693 token exchange, RFC 7523 JWT bearer, and
//! `ciLogin`, an exchange whose claims go to the login without being
//! signed, [`TokenEndpoint::ci_login`]); [`TokenEndpoint::login`] verifies
//! a signed access token into the same [`AccessToken`].
//! The request rules are `identity::oauth`, the token rules
//! `identity::access_token`; CI tokens are verified exactly as `ciLogin`
//! always did (`crate::oidc::login`) and spent once
//! (`crate::spent_tokens`); keys are `crate::deploy_keys`.
//!
//! Anyone on the internet can post here, so: the body is capped before it
//! is read ([`identity::oauth::MAX_BODY_BYTES`]); a source that keeps
//! failing is slowed down ([`FAILURES_PER_SOURCE_BURST`], one budget for
//! its token requests and its `ciLogin` calls); a client id
//! gets at most [`GRANTS_PER_CLIENT_BURST`] tokens at once and then one
//! per [`GRANT_INTERVAL_PER_CLIENT`]; CI logins keep the concurrency bound
//! of `crate::oidc`. Every decision is audited (`oauth.token`).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use identity::access_token::{
    self, AccessGrant, AccessToken, AccessTokenClaims, AccessTokenError, ActClaim, Caller,
};
use identity::deploy_key::KeyRefusal;
use identity::oauth::{
    self, CiTokenGrant, ErrorCode, Grant, OAuthError, Scope, TOKEN_TYPE_ACCESS_TOKEN,
};

use crate::audit::{Actor, Event, Text};
use crate::ci::CiBindings;
use crate::deploy_keys::DeployKeys;
use crate::frontdoor::{source_key, RateLimiter};
use crate::issuer::Issuer;
use crate::observe::{CiRefusal, Observe};
use crate::oidc::{DenialCause, LoginError, OidcVerifier};
use crate::spent_tokens::{SpendError, SpentTokens};

/// Failed requests a source may make at once ...
pub const FAILURES_PER_SOURCE_BURST: u32 = 30;
/// ... and then one every this long.
pub const FAILURE_INTERVAL_PER_SOURCE: Duration = Duration::from_secs(2);
/// Tokens one client id may get at once ...
pub const GRANTS_PER_CLIENT_BURST: u32 = 120;
/// ... and then one every this long.
pub const GRANT_INTERVAL_PER_CLIENT: Duration = Duration::from_millis(50);
/// Sources and clients whose buckets are remembered.
pub const MAX_TRACKED: usize = 4096;

/// The token endpoint and its login.
pub struct TokenEndpoint {
    issuer: Arc<Issuer>,
    oidc: Arc<OidcVerifier>,
    ci: Arc<CiBindings>,
    keys: Arc<DeployKeys>,
    spent: Arc<SpentTokens>,
    observe: Arc<Observe>,
    rt: tokio::runtime::Handle,
    /// `audience`/`resource` values that name this cluster.
    targets: Vec<String>,
    failures: Mutex<RateLimiter<IpAddr>>,
    clients: Mutex<RateLimiter<String>>,
}

/// An issued token.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_token: String,
    pub expires_in: i64,
    pub scope: Scope,
    /// Set for a token exchange (RFC 8693 §2.2.1).
    pub issued_token_type: Option<&'static str>,
    pub caller: Caller,
}

/// Why an access token was not accepted at login.
#[derive(Debug, thiserror::Error)]
pub enum LoginRefusal {
    #[error("access token refused: {0}")]
    Token(#[from] AccessTokenError),
    #[error("access token refused: it is for app {token_app:?}, not {asked:?}")]
    OtherApp { token_app: String, asked: String },
    #[error("access token refused: the issuer's keys are unavailable")]
    Keys,
}

fn err(code: ErrorCode, d: impl Into<String>) -> OAuthError {
    OAuthError::new(code, d)
}

fn unavailable(what: impl std::fmt::Display) -> OAuthError {
    tracing::error!("token endpoint: {what}");
    err(
        ErrorCode::TemporarilyUnavailable,
        "the coordinator cannot issue tokens right now; retry shortly",
    )
}

impl TokenEndpoint {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        issuer: Arc<Issuer>,
        oidc: Arc<OidcVerifier>,
        ci: Arc<CiBindings>,
        keys: Arc<DeployKeys>,
        spent: Arc<SpentTokens>,
        observe: Arc<Observe>,
        rt: tokio::runtime::Handle,
        addresses: Vec<String>,
    ) -> TokenEndpoint {
        let mut targets = addresses;
        targets.push(issuer.url.as_str().to_string());
        targets.push(access_token::api_audience(issuer.url.as_str()));
        TokenEndpoint {
            issuer,
            oidc,
            ci,
            keys,
            spent,
            observe,
            rt,
            targets,
            failures: Mutex::new(RateLimiter::new(
                FAILURES_PER_SOURCE_BURST,
                FAILURE_INTERVAL_PER_SOURCE,
                MAX_TRACKED,
            )),
            clients: Mutex::new(RateLimiter::new(
                GRANTS_PER_CLIENT_BURST,
                GRANT_INTERVAL_PER_CLIENT,
                MAX_TRACKED,
            )),
        }
    }

    /// Answers one token request from `source`: its form `body` and
    /// `Authorization` header.
    pub async fn request(
        self: &Arc<Self>,
        body: &[u8],
        authorization: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<Issued, OAuthError> {
        let now = Instant::now();
        if source.is_some_and(|ip| self.slowed(ip, now)) {
            return Err(err(
                ErrorCode::SlowDown,
                "too many failed token requests from this address; wait a minute",
            ));
        }
        let result = match oauth::parse_form(body)
            .and_then(|pairs| oauth::parse_request(pairs, authorization, &self.targets))
        {
            Ok(grant) => self.grant(grant, source).await,
            Err(e) => {
                self.audit_refusal("unknown", None, &e, source);
                Err(e)
            }
        };
        if let (Err(e), Some(ip)) = (&result, source) {
            self.note_failure(e, ip, now);
        }
        result
    }

    /// Whether `source` has failed too often to be heard now (token
    /// requests and `ciLogin`s share its budget).
    fn slowed(&self, source: IpAddr, now: Instant) -> bool {
        self.failures
            .lock()
            .map(|f| !f.would_allow(&source_key(source), now))
            .unwrap_or(false)
    }

    /// Counts refusal `e` against `source`: a credential refused or a
    /// request malformed, not the coordinator's own trouble
    /// (`temporarily_unavailable`) or a budget that was full (`slow_down`).
    fn note_failure(&self, e: &OAuthError, source: IpAddr, now: Instant) {
        if matches!(
            e.code,
            ErrorCode::TemporarilyUnavailable | ErrorCode::SlowDown
        ) {
            return;
        }
        if let Ok(mut f) = self.failures.lock() {
            let _ = f.take(source_key(source), now);
        }
    }

    /// Issues a token for a well-formed `grant` asked from `source`.
    pub async fn grant(
        self: &Arc<Self>,
        grant: Grant,
        source: Option<IpAddr>,
    ) -> Result<Issued, OAuthError> {
        match grant {
            Grant::ClientCredentials { client, scope } => {
                let out = self.client_credentials(&client.id, &client.secret, &scope);
                if let Err(e) = &out {
                    self.audit_refusal(oauth::GRANT_CLIENT_CREDENTIALS, Some(&scope), e, source);
                }
                out
            }
            Grant::CiToken { kind, token, scope } => {
                let name = match kind {
                    CiTokenGrant::Exchange => oauth::GRANT_TOKEN_EXCHANGE,
                    CiTokenGrant::JwtBearer => oauth::GRANT_JWT_BEARER,
                };
                let out = self.ci_token(&token, &scope, kind, source).await;
                if let Err(e) = &out {
                    self.audit_refusal(name, Some(&scope), e, source);
                }
                out
            }
        }
    }

    fn client_credentials(
        &self,
        id: &str,
        secret: &str,
        scope: &Scope,
    ) -> Result<Issued, OAuthError> {
        let now = transport::clock::now_unix();
        // The per-client budget is spent only by a caller that holds the
        // secret: a client id is no secret, and strangers sending it with
        // wrong secrets must not starve the real pipeline (their failures
        // count against their source instead).
        let record = match self.keys.authenticate(id, secret, now) {
            Ok(Ok(record)) => record,
            Ok(Err(refusal)) => {
                let description = match refusal {
                    KeyRefusal::Unknown => "invalid client credentials (check the deploy key's client_id and client_secret)".to_string(),
                    other => other.to_string(),
                };
                return Err(err(ErrorCode::InvalidClient, description));
            }
            Err(e) => return Err(unavailable(e)),
        };
        let limited = self
            .clients
            .lock()
            .map_err(|_| unavailable("client rate limiter poisoned"))?
            .take(record.id.clone(), Instant::now());
        if let Err(wait) = limited {
            return Err(err(
                ErrorCode::SlowDown,
                format!(
                    "this client asked for too many tokens; retry in {}s (reuse a token until it expires)",
                    wait.as_secs()
                ),
            ));
        }
        if scope.app != record.app {
            return Err(err(
                ErrorCode::InvalidScope,
                format!(
                    "this deploy key is for app {:?} only; ask scope=app:{}",
                    record.app, record.app
                ),
            ));
        }
        let grant = AccessGrant {
            subject: identity::deploy_key::subject(&record.id),
            client_id: record.id.clone(),
            granted: Scope::whole_app(&record.app),
            act: None,
            not_after: Some(record.expires_at),
        };
        self.issue(
            oauth::GRANT_CLIENT_CREDENTIALS,
            &grant,
            scope,
            None,
            Actor::DeployKey(record.id.clone()),
        )
    }

    async fn ci_token(
        &self,
        token: &str,
        scope: &Scope,
        kind: CiTokenGrant,
        source: Option<IpAddr>,
    ) -> Result<Issued, OAuthError> {
        let (grant, actor) = self.ci_grant(token, scope, source).await?;
        let (name, issued_type) = match kind {
            CiTokenGrant::Exchange => (oauth::GRANT_TOKEN_EXCHANGE, Some(TOKEN_TYPE_ACCESS_TOKEN)),
            CiTokenGrant::JwtBearer => (oauth::GRANT_JWT_BEARER, None),
        };
        self.issue(name, &grant, scope, issued_type, actor)
    }

    /// What a CI token grants: verified exactly as `ciLogin` always did
    /// (`crate::oidc::login`), matched against the bindings of the app the
    /// scope names, and spent.
    async fn ci_grant(
        &self,
        token: &str,
        scope: &Scope,
        source: Option<IpAddr>,
    ) -> Result<(AccessGrant, Actor), OAuthError> {
        if token.len() > identity::MAX_TOKEN_BYTES {
            return Err(err(
                ErrorCode::InvalidGrant,
                "the CI token is larger than 16 KiB",
            ));
        }
        let (login, seen) = crate::oidc::login(
            &self.oidc,
            &self.ci,
            &self.observe,
            &self.rt,
            &scope.app,
            token,
            source,
        )
        .await
        .map_err(|e| match e {
            LoginError::Busy => err(ErrorCode::TemporarilyUnavailable, e.to_string()),
            // Not the token's fault: the caller may try again, and its
            // address is not charged a failure for it.
            LoginError::Denied(DenialCause::Keys(k)) if k.is_transient() => err(
                ErrorCode::TemporarilyUnavailable,
                "the CI token cannot be checked right now (its issuer's keys cannot be fetched); retry shortly",
            ),
            LoginError::Denied(DenialCause::BindingsUnavailable | DenialCause::Task) => err(
                ErrorCode::TemporarilyUnavailable,
                "the CI token cannot be checked right now (the coordinator's binding index is unavailable); retry shortly",
            ),
            other => err(ErrorCode::InvalidGrant, other.to_string()),
        })?;
        let verified = &login.token;
        let jti = verified
            .claim_str("jti")
            .filter(|j| !j.is_empty())
            .ok_or_else(|| {
                err(
                    ErrorCode::InvalidGrant,
                    "the CI token has no jti claim, so it cannot be accepted only once",
                )
            })?;
        let now = transport::clock::now_unix();
        // Remembered for as long as the verifier would still accept it:
        // its `exp` plus the verifier's leeway.
        let accepted_until = verified
            .expires_at
            .saturating_add(i64::from(identity::DEFAULT_LEEWAY_SECS));
        // A store commit, which may wait out its bound on a lost etcd: on
        // the blocking pool, never on the RPC worker of `ciLogin`.
        let spent = self.spent.clone();
        let (issuer, jti) = (verified.issuer.clone(), jti.to_string());
        let (observe, app, binding) = (
            self.observe.clone(),
            scope.app.clone(),
            login.binding.clone(),
        );
        // Spent and audited together, on the blocking pool: accepted only
        // once spent, and audited even when the caller has gone meanwhile
        // (its retry would otherwise be the only line, as a replay).
        let spent = crate::blocking::off_thread(move || {
            let spent = spent.spend(&issuer, &jti, accepted_until, now);
            match &spent {
                Ok(()) => observe.ci_login(&app, seen, Ok(&binding), source),
                Err(e) => {
                    let why = match e {
                        SpendError::AlreadySpent => CiRefusal::Replayed,
                        _ => CiRefusal::Unrecorded,
                    };
                    observe.ci_login(&app, seen, Err((why, e)), source);
                }
            }
            spent
        })
        .await
        .unwrap_or(Err(SpendError::Unavailable));
        spent.map_err(|e| match e {
            SpendError::AlreadySpent => err(ErrorCode::InvalidGrant, e.to_string()),
            SpendError::Full => err(ErrorCode::SlowDown, e.to_string()),
            other => unavailable(other),
        })?;
        let grant = AccessGrant {
            subject: verified.subject.clone(),
            client_id: access_token::ci_client_id(&login.binding.id),
            granted: Scope::whole_app(&login.binding.app),
            act: Some(ActClaim {
                sub: verified.subject.clone(),
                iss: verified.issuer.clone(),
            }),
            not_after: Some(verified.expires_at),
        };
        Ok((grant, Actor::Ci(login.binding.id.clone())))
    }

    fn issue(
        &self,
        grant_name: &'static str,
        grant: &AccessGrant,
        asked: &Scope,
        issued_token_type: Option<&'static str>,
        actor: Actor,
    ) -> Result<Issued, OAuthError> {
        let now = transport::clock::now_unix();
        let claims = self.claims(grant_name, grant, asked, actor, now)?;
        let minter = self
            .issuer
            .keys
            .read()
            .map_err(|_| unavailable("key ring lock poisoned"))?
            .active(now)
            .map_err(unavailable)?;
        let token = minter.mint_access(&claims).map_err(unavailable)?;
        Ok(Issued {
            access_token: token,
            expires_in: claims.exp - now,
            scope: asked.clone(),
            issued_token_type,
            caller: claims.caller(),
        })
    }

    /// The claims of the token `grant` buys for `asked` at `now`, audited.
    fn claims(
        &self,
        grant_name: &'static str,
        grant: &AccessGrant,
        asked: &Scope,
        actor: Actor,
        now: i64,
    ) -> Result<AccessTokenClaims, OAuthError> {
        let claims = grant
            .claims(
                self.issuer.url.as_str(),
                asked,
                access_token::MAX_TTL_SECS,
                now,
                uuid::Uuid::new_v4().to_string(),
            )
            .map_err(|e| match e {
                AccessTokenError::BeyondGrant { .. } => err(ErrorCode::InvalidScope, e.to_string()),
                other => err(ErrorCode::InvalidGrant, other.to_string()),
            })?;
        self.observe.oauth_token(
            actor,
            Event::OAuthToken {
                grant: grant_name,
                app: Some(Text::new(&asked.app)),
                client: Some(Text::new(&claims.client_id)),
                jti: Some(Text::new(&claims.jti)),
                exp: Some(claims.exp),
                reason: None,
            },
        );
        Ok(claims)
    }

    fn audit_refusal(
        &self,
        grant: &'static str,
        scope: Option<&Scope>,
        e: &OAuthError,
        source: Option<IpAddr>,
    ) {
        self.observe.oauth_token_refused(
            Event::OAuthToken {
                grant,
                app: scope.map(|s| Text::new(&s.app)),
                client: None,
                jti: None,
                exp: None,
                reason: Some(Text::new(&e.to_string())),
            },
            source,
        );
    }

    /// Verifies an access token for `app` at `now`: what `Cluster.login`
    /// turns into the app's capability.
    pub fn login(&self, token: &str, app: &str, now: i64) -> Result<AccessToken, LoginRefusal> {
        let verifier = self
            .issuer
            .verifier(&access_token::api_audience(self.issuer.url.as_str()), now)
            .map_err(|e| {
                tracing::error!("access token login: {e}");
                LoginRefusal::Keys
            })?;
        let token = access_token::verify_access_token(&verifier, token.trim(), now)?;
        if token.scope.app != app {
            return Err(LoginRefusal::OtherApp {
                token_app: token.scope.app.clone(),
                asked: app.to_string(),
            });
        }
        Ok(token)
    }

    /// `ciLogin` from `source`: a token exchange of the CI `token` for the whole of
    /// `app` (the same verification, matching, spending, claims and audit
    /// as at the endpoint), logged in at once: the token the exchange would
    /// sign is handed to the login as its verified claims, since it never
    /// leaves the coordinator.
    pub async fn ci_login(
        &self,
        token: &str,
        app: &str,
        source: IpAddr,
    ) -> Result<AccessToken, OAuthError> {
        // Anyone may call it: a source that keeps failing is refused
        // before its token is read, like at the token endpoint.
        let now = Instant::now();
        if self.slowed(source, now) {
            return Err(err(
                ErrorCode::SlowDown,
                "too many failed CI logins from this address; wait a minute",
            ));
        }
        let scope = Scope::whole_app(app);
        let out = async {
            let (grant, actor) = self.ci_grant(token, &scope, Some(source)).await?;
            let now = transport::clock::now_unix();
            let claims = self.claims("ciLogin", &grant, &scope, actor, now)?;
            Ok(AccessToken {
                claims,
                scope: scope.clone(),
            })
        }
        .await;
        if let Err(e) = &out {
            self.audit_refusal("ciLogin", Some(&scope), e, Some(source));
            self.note_failure(e, source, now);
        }
        out
    }
}

/// The axum router of the token endpoint under the issuer's path `prefix`.
pub fn router(endpoint: Arc<TokenEndpoint>, prefix: &str) -> Router {
    Router::new()
        .route(&format!("{prefix}{}", oauth::TOKEN_PATH), post(token))
        .with_state(endpoint)
}

fn no_store(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
}

/// The RFC 6749 §5.2 answer for `e`.
pub fn error_response(e: &OAuthError) -> Response {
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut resp = (status, e.to_json().to_string()).into_response();
    no_store(&mut resp);
    if e.code == ErrorCode::InvalidClient {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"miren\""),
        );
    }
    resp
}

fn issued_response(i: &Issued) -> Response {
    let mut body = serde_json::json!({
        "access_token": i.access_token,
        "token_type": "Bearer",
        "expires_in": i.expires_in,
        "scope": i.scope.to_scope_string(),
    });
    if let Some(t) = i.issued_token_type {
        body["issued_token_type"] = serde_json::Value::from(t);
    }
    let mut resp = (StatusCode::OK, body.to_string()).into_response();
    no_store(&mut resp);
    resp
}

/// How much of an oversized body is read and dropped, and for how long,
/// so that a client still sending gets the refusal rather than a reset
/// connection (unread data at close makes the kernel reset it).
const DRAIN_BYTES: usize = 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a token request's body (a form of at most
/// [`oauth::MAX_BODY_BYTES`]) may take to arrive once its head has: the
/// listener's idle timer restarts with every byte, so without this a client
/// sending one byte a minute held a connection of the HTTPS listener (which
/// also serves discovery and JWKS to outside verifiers) for ever.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body, when it is at most `limit` bytes; `Err` when it is longer or
/// was cut off (what follows the limit is drained within bounds first).
async fn read_capped(body: Body, limit: usize) -> Result<bytes::Bytes, ()> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            None => return Ok(out.into()),
            Some(Err(_)) => return Err(()),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if out.len() + data.len() > limit {
                    let mut drained = 0usize;
                    let _ = tokio::time::timeout(DRAIN_TIME, async {
                        while drained < DRAIN_BYTES {
                            match body.frame().await {
                                Some(Ok(f)) => {
                                    drained += f.into_data().map(|d| d.len()).unwrap_or(0)
                                }
                                _ => break,
                            }
                        }
                    })
                    .await;
                    return Err(());
                }
                out.extend_from_slice(&data);
            }
        }
    }
}

async fn token(
    AxumState(endpoint): AxumState<Arc<TokenEndpoint>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return error_response(&err(
            ErrorCode::InvalidRequest,
            "send the request as application/x-www-form-urlencoded (RFC 6749)",
        ));
    }
    let bytes =
        match tokio::time::timeout(BODY_TIMEOUT, read_capped(body, oauth::MAX_BODY_BYTES)).await {
            Ok(Ok(b)) => b,
            Err(_) => {
                let mut resp = error_response(&err(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the request body did not arrive within {} s; send it whole",
                        BODY_TIMEOUT.as_secs()
                    ),
                ));
                // The rest of it is not waited for.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
            Ok(Err(())) => {
                return error_response(&err(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the request body is larger than {} bytes or was cut off",
                        oauth::MAX_BODY_BYTES
                    ),
                ))
            }
        };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let source = peer.map(|axum::Extension(ConnectInfo(addr))| addr.ip());
    match endpoint.request(&bytes, authorization, source).await {
        Ok(issued) => issued_response(&issued),
        Err(e) => error_response(&e),
    }
}
