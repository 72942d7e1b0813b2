//! The login flow at a protected route: what the gate does with each
//! request ([`Sso::gate`]): proxy with the session's claims, refresh them,
//! send the browser to the provider, take the callback, log out.
//!
//! Login: authorization code with PKCE S256, `state` (accepted once,
//! `identity::UsedStates`) and `nonce`, the login state in a sealed cookie
//! of its own, the return target only a path on the same host. A session's
//! claims last no longer than the ID token; with a refresh token they are
//! renewed (one refresh per session at a time, so a rotated refresh token
//! is never spent twice) up to [`MAX_SESSION_SECS`]. Logout ends the
//! session for copies of its cookie too, across restarts. A callback that
//! would ask the provider takes from its source address's bucket first
//! (over it: 429 with `Retry-After`, before any store read).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use identity::route_oidc::{
    pkce_challenge_s256, pkce_verifier, random_token, safe_return_path, tokens_match, ClaimHeader,
    SessionClaims, SessionState,
};
use identity::{IssuerUrl, StateRefusal};
use serde::{Deserialize, Serialize};

use super::cookie::{
    cookie_values, login_cookie_for, CookieScope, LOGIN_COOKIE, MAX_COOKIE_VALUE_BYTES,
    SESSION_COOKIE,
};
use super::provider::{
    token_request, verify_id_token, IdTokenError, MetaError, ProviderMeta, TokenRequestError,
};
use super::shared::{self, ConsumeError, RecordError, RefreshRecord};
use super::Sso;
use crate::oidc::OidcVerifier;
use crate::routes::Provider;

/// Where the provider sends the browser back.
pub const CALLBACK_PATH: &str = "/.well-known/miren/oidc/callback";
/// Ends the session.
pub const LOGOUT_PATH: &str = "/.well-known/miren/oidc/logout";
/// Where the session's own id is kept among its claims.
pub const SESSION_ID_CLAIM: &str = "_miren_session_id";
/// Longest session, even when the ID token lives longer.
pub const MAX_SESSION_SECS: i64 = 8 * 3600;
/// How long a login may take.
pub const LOGIN_SECS: i64 = 600;

/// How long a refused refresh is remembered: requests of that session get
/// the refusal without asking the provider again.
const REFRESH_FAILURE_SECS: i64 = 30;

/// How long a coordinator that claimed a session's refresh has to ask the
/// provider before another one takes over (the token request's own limit
/// is shorter).
const REFRESH_CLAIM_SECS: i64 = 30;
/// How often a coordinator waiting for another's refresh looks again.
const REFRESH_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a session was not renewed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("session without id")]
    NoSessionId,
    /// A thread panicked holding the refresh table's lock.
    #[error("refresh lock poisoned")]
    Poisoned,
    #[error("no refresh token")]
    NoRefreshToken,
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    TokenRequest(#[from] TokenRequestError),
    #[error("the provider's refresh returned no id_token")]
    NoIdToken,
    /// The provider refused this session's refresh lately (asked by this
    /// or another coordinator): not asked again so soon.
    #[error("the provider refused this session's last refresh")]
    RefusedLately,
    /// The shared refresh record could not be read or written.
    #[error("the session's refresh record: {0}")]
    Record(#[from] RecordError),
    #[error(transparent)]
    IdToken(#[from] IdTokenError),
    /// The renewed ID token does not continue the session.
    #[error(transparent)]
    Session(#[from] identity::route_oidc::RefreshError),
}

#[derive(Serialize, Deserialize)]
struct LoginState {
    state: String,
    nonce: String,
    verifier: String,
    ret: String,
    exp: i64,
}

/// A request to a protected route, as the gate sees it.
pub struct GateRequest<'a> {
    /// The normalised host (no port).
    pub host: &'a str,
    /// The Host header as sent (with port), for the callback URL.
    pub authority: &'a str,
    pub path_and_query: &'a str,
    /// Every `Cookie` header, joined with "; ".
    pub cookies: &'a str,
    /// Whether `Accept` names `text/html` (a browser).
    pub accepts_html: bool,
    /// Whether the request came over HTTPS.
    pub secure: bool,
    /// The TCP peer address the ingress accepted the connection from (never
    /// a header the client sets): what callbacks are limited by.
    pub source: IpAddr,
    /// The route's claim mappings: only these claims are kept in the
    /// session.
    pub claim_headers: &'a [ClaimHeader],
    pub now: i64,
}

/// What the gate decided for a request.
pub enum Gate {
    /// Proxy, after setting these claim headers; add these headers (a
    /// refreshed session cookie) to the app's response.
    Proxy(
        serde_json::Map<String, serde_json::Value>,
        Vec<(String, String)>,
    ),
    /// Answer directly: status, headers, body.
    Respond(u16, Vec<(String, String)>, String),
}

/// The claims a session keeps: those the route maps to headers. Keeping
/// no more makes the cookie small and holds no more of the user's data
/// than the app gets.
fn kept_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
    mappings: &[ClaimHeader],
) -> serde_json::Map<String, serde_json::Value> {
    claims
        .iter()
        .filter(|(k, _)| mappings.iter().any(|m| m.claim() == k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn redirect(location: &str, cookies: Vec<(String, String)>) -> Gate {
    let mut headers = vec![("location".to_string(), location.to_string())];
    headers.extend(cookies);
    Gate::Respond(302, headers, String::new())
}

fn refuse(status: u16, msg: &str) -> Gate {
    Gate::Respond(status, vec![], format!("{msg}\n"))
}

impl Sso {
    /// The session of this request for `host`, if its cookie opens, it
    /// was not ended by logout and it is not over at `now` (it may still
    /// need a refresh).
    pub fn session(
        &self,
        scope: &CookieScope<'_>,
        cookies: &str,
        now: i64,
    ) -> Option<SessionClaims> {
        let name = scope.cookie_name(SESSION_COOKIE);
        let aad = scope.aad("session");
        let s: SessionClaims = cookie_values(cookies, &name)
            .filter_map(|sealed| self.key.open(&aad, sealed))
            .find_map(|plain| serde_json::from_slice(&plain).ok())?;
        let sid = s.claims.get(SESSION_ID_CLAIM)?.as_str()?;
        let ended = self.ended.contains(sid, now);
        (s.state(now) != SessionState::Over && !ended).then_some(s)
    }

    /// Ends `session` (logout): it is refused from now on, copies of its
    /// cookie included, by every coordinator and after a restart (the
    /// record leaves the store when the session would have ended anyway).
    pub fn end(&self, session: &SessionClaims, now: i64) {
        let Some(sid) = session
            .claims
            .get(SESSION_ID_CLAIM)
            .and_then(|v| v.as_str())
        else {
            return;
        };
        // Until the cookie itself would have lapsed (refresh included).
        let until = session.ends_at.max(session.expires_at);
        if let Err(e) = crate::blocking::wait_here(|| self.ended.end(&*self.store, sid, until, now))
        {
            tracing::warn!(
                "logout recorded in this coordinator's memory only (the others and a restart would not know it): {e}"
            );
        }
    }

    /// Seals `session` into a cookie value for `scope` (AES-256-GCM, the
    /// scope as associated data).
    pub fn seal_session(&self, scope: &CookieScope<'_>, session: &SessionClaims) -> Option<String> {
        serde_json::to_vec(session)
            .ok()
            .and_then(|j| self.key.seal(&scope.aad("session"), &j))
    }

    /// The `Set-Cookie` of `session`, or the answer when it cannot be set.
    fn session_cookie(
        &self,
        scope: &CookieScope<'_>,
        session: &SessionClaims,
        now: i64,
    ) -> Result<(String, String), Gate> {
        let sealed = self
            .seal_session(scope, session)
            .ok_or_else(|| refuse(500, "could not seal the session"))?;
        if sealed.len() > MAX_COOKIE_VALUE_BYTES {
            return Err(refuse(
                500,
                &format!(
                    "the session does not fit in a cookie ({} bytes, at most {MAX_COOKIE_VALUE_BYTES}): map fewer or smaller claims with --claim-header",
                    sealed.len()
                ),
            ));
        }
        Ok(scope.set_cookie(SESSION_COOKIE, &sealed, session.max_age_secs(now)))
    }

    /// Renews an expired session with its refresh token. Concurrent
    /// requests of one session, on this coordinator or any other sharing
    /// the store, share one refresh: the one that claims the session's
    /// refresh record (compare-and-set) asks the provider, the others wait
    /// and read its result, so a provider that rotates refresh tokens never
    /// sees one twice.
    async fn refresh(
        &self,
        oidc: &OidcVerifier,
        (host, provider): (&str, &Provider),
        issuer: &IssuerUrl,
        session: &SessionClaims,
        mappings: &[ClaimHeader],
        now: i64,
    ) -> Result<SessionClaims, Arc<RefreshError>> {
        let sid = session
            .claims
            .get(SESSION_ID_CLAIM)
            .and_then(|v| v.as_str())
            .ok_or(RefreshError::NoSessionId)?
            .to_string();
        // A session that never had a refresh token never gets one: nothing
        // to share, nothing to write.
        if session.refresh_token.is_none() {
            return Err(Arc::new(RefreshError::NoRefreshToken));
        }
        let local = {
            let mut all = self.refreshes.lock().map_err(|_| RefreshError::Poisoned)?;
            // Keep the locks in use; forget the rest.
            all.retain(|_, l| Arc::strong_count(l) > 1);
            all.entry(sid.clone()).or_default().clone()
        };
        let _mine = local.lock().await;
        let store = &*self.store;
        let (read, current, claimed_at) = loop {
            let read = crate::blocking::wait_here(|| shared::read_refresh(store, &self.key, &sid))
                .map_err(|e| RefreshError::Record(e.into()))?;
            let clock = transport::clock::now_unix().max(now);
            let record = &read.record;
            // A newer refresh token from an earlier refresh of this session
            // wins over the one in a stale cookie.
            if let Some(latest) = &record.latest {
                if latest.state(clock) == SessionState::Active {
                    return Ok(latest.clone());
                }
            }
            if record
                .failed_at
                .is_some_and(|at| clock - at < REFRESH_FAILURE_SECS)
            {
                return Err(Arc::new(RefreshError::RefusedLately));
            }
            if record.refreshing_until.is_some_and(|until| until > clock) {
                // Another coordinator is asking the provider.
                tokio::time::sleep(REFRESH_POLL).await;
                continue;
            }
            let current = record.latest.clone().unwrap_or_else(|| session.clone());
            let claim = RefreshRecord {
                latest: record.latest.clone(),
                refreshing_until: Some(clock + REFRESH_CLAIM_SECS),
                failed_at: None,
            };
            let ends_at = current.ends_at.max(session.ends_at);
            match crate::blocking::wait_here(|| {
                shared::write_refresh(store, &self.key, &sid, &read, &claim, ends_at, clock)
            })
            .map_err(RefreshError::from)?
            {
                Some((revision, lease)) => {
                    let read = shared::ReadRefresh {
                        record: claim,
                        revision,
                        lease: Some(lease),
                    };
                    break (read, current, clock);
                }
                // Another coordinator claimed it first: look again.
                None => continue,
            }
        };
        let result = self
            .renew(oidc, provider, issuer, &current, mappings, now)
            .await
            .map_err(Arc::new);
        // Counted (and a refusal audited) when the provider was asked, not
        // when a remembered refusal is repeated.
        self.observe
            .route_oidc_refresh(host, &provider.name, &result);
        let outcome = match &result {
            Ok(renewed) => RefreshRecord {
                latest: Some(renewed.clone()),
                refreshing_until: None,
                failed_at: None,
            },
            Err(_) => RefreshRecord {
                latest: read.record.latest.clone(),
                refreshing_until: None,
                failed_at: Some(claimed_at),
            },
        };
        // Over our own claim only: when it lapsed and another coordinator
        // took over, its result stands.
        let ends_at = current.ends_at;
        if let Err(e) = crate::blocking::wait_here(|| {
            shared::write_refresh(store, &self.key, &sid, &read, &outcome, ends_at, claimed_at)
        }) {
            tracing::warn!(host, "route OIDC: the refresh's result was not shared: {e}");
        }
        result
    }

    /// Asks the provider to renew `current` with its refresh token, and
    /// verifies the answer.
    async fn renew(
        &self,
        oidc: &OidcVerifier,
        provider: &Provider,
        issuer: &IssuerUrl,
        current: &SessionClaims,
        mappings: &[ClaimHeader],
        now: i64,
    ) -> Result<SessionClaims, RefreshError> {
        let Some(refresh_token) = current.refresh_token.clone() else {
            return Err(RefreshError::NoRefreshToken);
        };
        let meta = self.providers.meta(oidc, issuer).await?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", &refresh_token)
            .finish();
        let body = token_request(oidc, provider, &meta, form).await?;
        let id_token = body["id_token"].as_str().ok_or(RefreshError::NoIdToken)?;
        let verified = verify_id_token(oidc, provider, issuer, id_token, now).await?;
        Ok(current.refreshed(
            &verified.subject,
            kept_claims(&verified.claims, mappings),
            verified.expires_at,
            body["refresh_token"].as_str().map(str::to_string),
            now,
            &[SESSION_ID_CLAIM],
        )?)
    }

    /// Decides what to do with a request to a protected route.
    pub async fn gate(
        &self,
        oidc: &OidcVerifier,
        provider: &Provider,
        req: &GateRequest<'_>,
    ) -> Gate {
        let GateRequest {
            host,
            path_and_query,
            cookies,
            accepts_html,
            secure,
            now,
            ..
        } = *req;
        let path = path_and_query.split('?').next().unwrap_or("/");
        let issuer = match IssuerUrl::parse(&provider.issuer) {
            Ok(i) => i,
            Err(e) => return refuse(500, &format!("provider URL: {e}")),
        };
        let scheme = if secure { "https" } else { "http" };
        let redirect_uri = format!("{scheme}://{}{CALLBACK_PATH}", req.authority);
        let scope = CookieScope {
            secure,
            host,
            issuer: issuer.as_str(),
            client_id: &provider.client_id,
        };
        if path == LOGOUT_PATH {
            if let Some(s) = self.session(&scope, cookies, now) {
                self.end(&s, now);
                self.observe.route_oidc_logout(host, &provider.name);
            }
            let after = match self.providers.meta(oidc, &issuer).await {
                Ok(ProviderMeta {
                    end_session_endpoint: Some(e),
                    ..
                }) => {
                    let sep = if e.contains('?') { '&' } else { '?' };
                    let q = form_urlencoded::Serializer::new(String::new())
                        .append_pair("client_id", &provider.client_id)
                        .finish();
                    format!("{e}{sep}{q}")
                }
                _ => "/".to_string(),
            };
            return redirect(&after, vec![scope.set_cookie(SESSION_COOKIE, "", 0)]);
        }
        if path == CALLBACK_PATH {
            let answer = (self.callback(oidc, provider, &issuer, &scope, req, &redirect_uri)).await;
            if let Gate::Respond(status @ 400.., _, why) = &answer {
                let answer_of = (*status, why.as_str());
                (self.observe).route_oidc_login_refused(
                    host,
                    &provider.name,
                    answer_of,
                    req.source,
                );
            }
            return answer;
        }
        let mut clear_session = None;
        if let Some(s) = self.session(&scope, cookies, now) {
            if s.state(now) == SessionState::Active {
                return Gate::Proxy(s.claims, vec![]);
            }
            match self
                .refresh(oidc, (host, provider), &issuer, &s, req.claim_headers, now)
                .await
            {
                Ok(renewed) => {
                    return match self.session_cookie(&scope, &renewed, now) {
                        Ok(cookie) => Gate::Proxy(renewed.claims, vec![cookie]),
                        Err(answer) => answer,
                    };
                }
                Err(e) => {
                    tracing::info!(host, "route OIDC session not refreshed: {e}");
                    // The cookie is of no more use: stop sending it.
                    clear_session = Some(scope.set_cookie(SESSION_COOKIE, "", 0));
                }
            }
        }
        if !accepts_html {
            return Gate::Respond(
                401,
                clear_session.into_iter().collect(),
                "login required (open this address in a browser to sign in)\n".into(),
            );
        }
        let meta = match self.providers.meta(oidc, &issuer).await {
            Ok(m) => m,
            Err(e) => return refuse(502, &format!("identity provider unavailable: {e}")),
        };
        let login = LoginState {
            state: random_token(rand::random()),
            nonce: random_token(rand::random()),
            verifier: pkce_verifier(rand::random()),
            ret: safe_return_path(path_and_query),
            exp: now + LOGIN_SECS,
        };
        let Some(sealed) = serde_json::to_vec(&login)
            .ok()
            .and_then(|j| self.key.seal(&scope.aad("login"), &j))
        else {
            return refuse(500, "could not start the login");
        };
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &provider.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", &provider.scope)
            .append_pair("state", &login.state)
            .append_pair("nonce", &login.nonce)
            .append_pair("code_challenge", &pkce_challenge_s256(&login.verifier))
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if meta.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        redirect(
            &format!("{}{sep}{q}", meta.authorization_endpoint),
            [scope.set_cookie(
                &login_cookie_for(&login.state).unwrap_or_else(|| LOGIN_COOKIE.to_string()),
                &sealed,
                LOGIN_SECS,
            )]
            .into_iter()
            .chain(clear_session)
            .collect(),
        )
    }

    async fn callback(
        &self,
        oidc: &OidcVerifier,
        provider: &Provider,
        issuer: &IssuerUrl,
        scope: &CookieScope<'_>,
        req: &GateRequest<'_>,
        redirect_uri: &str,
    ) -> Gate {
        let GateRequest {
            path_and_query,
            cookies,
            now,
            ..
        } = *req;
        let query = path_and_query.split_once('?').map(|(_, q)| q).unwrap_or("");
        let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        if let Some(err) = params.get("error") {
            return refuse(
                401,
                &format!(
                    "the identity provider refused the login: {err}{}",
                    params
                        .get("error_description")
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
            );
        }
        // RFC 9207: a provider that names itself must be the route's.
        if params.get("iss").is_some_and(|i| i != issuer.as_str()) {
            return refuse(400, "the callback names another identity provider");
        }
        let (Some(code), Some(state)) = (params.get("code"), params.get("state")) else {
            return refuse(400, "callback without code and state");
        };
        let Some(cookie_base) = login_cookie_for(state) else {
            return refuse(400, "login state does not match");
        };
        let (name, aad) = (scope.cookie_name(&cookie_base), scope.aad("login"));
        let logins: Vec<LoginState> = cookie_values(cookies, &name)
            .filter_map(|c| self.key.open(&aad, c))
            .filter_map(|p| serde_json::from_slice::<LoginState>(&p).ok())
            .filter(|l| l.exp > now)
            .collect();
        if logins.is_empty() {
            return refuse(
                400,
                "login expired or not started here; open the page again",
            );
        }
        let Some(login) = logins.into_iter().find(|l| tokens_match(&l.state, state)) else {
            return refuse(400, "login state does not match");
        };
        // A state used here or through another coordinator is refused
        // before the provider is asked. Only reads: anyone can get a sealed
        // login cookie and its state from the gate, so neither the memory
        // here nor the store takes the state before the provider completed
        // the login (else junk codes would fill the bound or burn the state
        // of a login in progress).
        {
            let Ok(used) = self.used_states.lock() else {
                return refuse(500, "state cache unavailable");
            };
            if used.is_used(&login.state, now) {
                return refuse(400, "login state already used");
            }
        }
        // From here on the callback costs a store read and a request to the
        // provider, which anyone may cause with a cookie and state from the
        // gate: its address takes from its bucket first.
        if let Err(wait) = self.callback_attempt(req.source, Instant::now()) {
            let secs = wait.as_secs().max(1);
            return Gate::Respond(
                429,
                vec![("retry-after".to_string(), secs.to_string())],
                format!("too many sign-in attempts from this address; retry after {secs} s\n"),
            );
        }
        let store = &*self.store;
        match crate::blocking::wait_here(|| shared::state_used(store, &login.state)) {
            Ok(false) => {}
            Ok(true) => return refuse(400, "login state already used"),
            Err(e) => {
                return refuse(
                    503,
                    &format!("the login could not be checked ({e}); open the page again"),
                )
            }
        }
        let meta = match self.providers.meta(oidc, issuer).await {
            Ok(m) => m,
            Err(e) => return refuse(502, &format!("identity provider unavailable: {e}")),
        };
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("code_verifier", &login.verifier)
            .finish();
        let body = match token_request(oidc, provider, &meta, form).await {
            Ok(b) => b,
            Err(e) => return refuse(502, &e.to_string()),
        };
        let Some(id_token) = body["id_token"].as_str() else {
            return refuse(502, "the provider returned no id_token");
        };
        let verified = match verify_id_token(oidc, provider, issuer, id_token, now).await {
            Ok(v) => v,
            Err(e) => return refuse(401, &e.to_string()),
        };
        if !verified
            .claim_str("nonce")
            .is_some_and(|n| tokens_match(&login.nonce, n))
        {
            return refuse(401, "ID token nonce does not match the login");
        }
        let mut claims = kept_claims(&verified.claims, req.claim_headers);
        claims.insert(
            SESSION_ID_CLAIM.to_string(),
            serde_json::Value::String(random_token(rand::random())),
        );
        let session = SessionClaims::start(
            verified.subject.clone(),
            claims,
            verified.expires_at,
            body["refresh_token"].as_str().map(str::to_string),
            now,
            MAX_SESSION_SECS,
        );
        let cookie = match self.session_cookie(scope, &session, now) {
            Ok(c) => c,
            Err(answer) => return answer,
        };
        // The login is complete: the state is taken now, first here, then
        // in the store. Memory first: its check-and-insert is one step under
        // the lock, so of two callbacks with this state on this coordinator
        // that both got this far exactly one goes on (without a store round
        // trip for the other); and a refusal for want of room leaves the
        // store untouched, so it never burns the state on every
        // coordinator. A state taken here whose store write then fails
        // stays taken here: that answer tells the user to open the page
        // again, which starts a login with a new state.
        {
            let Ok(mut used) = self.used_states.lock() else {
                return refuse(500, "state cache unavailable");
            };
            match used.accept(&login.state, login.exp, now) {
                Ok(()) => {}
                Err(StateRefusal::AlreadyUsed) => return refuse(400, "login state already used"),
                Err(StateRefusal::Full) => {
                    return refuse(
                        503,
                        "too many logins in progress; try again in a few minutes",
                    )
                }
            }
        }
        // The store decides for every coordinator: of two callbacks with
        // this state (through any coordinators) that both got this far, the
        // one whose create-only write lands gets the session.
        match crate::blocking::wait_here(|| {
            shared::consume_state(store, &self.state_lease, &login.state, login.exp, now)
        }) {
            Ok(()) => {}
            Err(ConsumeError::AlreadyUsed) => return refuse(400, "login state already used"),
            Err(ConsumeError::Store(e)) => {
                return refuse(
                    503,
                    &format!("the login could not be recorded ({e}); open the page again"),
                )
            }
        }
        (self.observe).route_oidc_login(scope.host, &provider.name, &verified.subject);
        redirect(
            &login.ret,
            vec![cookie, scope.set_cookie(&cookie_base, "", 0)],
        )
    }
}
