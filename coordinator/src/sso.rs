//! Route OIDC at the ingress (labs): the login flow and the session.
//!
//! An unauthenticated browser request is sent to the provider (authorization
//! code with PKCE S256, `state`, `nonce`); the callback at
//! [`CALLBACK_PATH`] exchanges the code, verifies the ID token with the
//! `identity` verifier against the provider's JWKS (the same key cache as CI
//! issuers), and sets a session cookie sealed with AES-256-GCM (HttpOnly,
//! SameSite=Lax, Secure when the ingress serves HTTPS), bound to the host.
//! The claims last no longer than the ID token; when the provider gave a
//! refresh token, it renews them (one refresh per session at a time, so a
//! rotated refresh token is never spent twice) up to the session cap.
//! Login state travels in a sealed cookie of its own, one per login (named
//! after the state, so logins in several tabs do not clash); each `state` is
//! accepted once. The pure rules (return paths, PKCE, header filtering, session
//! lifetime) are in `identity::route_oidc`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use identity::route_oidc::{
    pkce_challenge_s256, pkce_verifier, random_token, safe_return_path, tokens_match, ClaimHeader,
    SessionClaims, SessionState,
};
use identity::{IssuerUrl, VerifiedToken, Verifier};
use serde::{Deserialize, Serialize};

use crate::route_oidc::Provider;
use crate::store::{Op, Store, Txn};

/// Store prefix of sessions ended by logout: `routeoidc-ended/<session id>`
/// holds the time (Unix seconds) the session would have ended anyway.
const ENDED_PREFIX: &str = "routeoidc-ended/";

/// Where the provider sends the browser back.
pub const CALLBACK_PATH: &str = "/.well-known/miren/oidc/callback";
/// Ends the session.
pub const LOGOUT_PATH: &str = "/.well-known/miren/oidc/logout";
/// The session cookie (`__Host-` prefixed over HTTPS; see
/// [`CookieScope::cookie_name`]).
pub const SESSION_COOKIE: &str = "miren_oidc_session";
/// The login-in-progress cookies: `miren_oidc_login_<state prefix>`, one
/// per login, so logins started in several tabs do not clash.
pub const LOGIN_COOKIE: &str = "miren_oidc_login";
/// How many characters of `state` name its login cookie.
const LOGIN_COOKIE_STATE_CHARS: usize = 12;

/// The login cookie's base name for `state` (None when `state` is too
/// short to be one of ours).
fn login_cookie_for(state: &str) -> Option<String> {
    let prefix = state.get(..LOGIN_COOKIE_STATE_CHARS)?;
    prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        .then(|| format!("{LOGIN_COOKIE}_{prefix}"))
}
/// Cookies of ours, by any of their names: never passed to the app.
pub fn is_our_cookie(name: &[u8]) -> bool {
    let name = name.strip_prefix(b"__Host-").unwrap_or(name);
    name.starts_with(b"miren_oidc_")
}
/// Largest sealed session cookie value set: browsers drop cookies over
/// about 4 KiB (name and attributes included), which would loop the user
/// through the login forever.
pub const MAX_COOKIE_VALUE_BYTES: usize = 3800;
/// Logins in progress remembered for replay protection at most; beyond it
/// new callbacks are refused until older logins expire.
pub const MAX_LOGINS_IN_PROGRESS: usize = 100_000;
/// How long a failed discovery fetch is remembered, so an unreachable
/// provider is not asked again by every anonymous request.
const META_FAILURE_SECS: u64 = 5;
/// Where the session's own id is kept among its claims.
pub const SESSION_ID_CLAIM: &str = "_miren_session_id";
/// Longest session, even when the ID token lives longer.
pub const MAX_SESSION_SECS: i64 = 8 * 3600;
/// How long a login may take.
pub const LOGIN_SECS: i64 = 600;

/// Endpoints of a provider, from its discovery document.
#[derive(Debug, Clone)]
pub struct ProviderMeta {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub end_session_endpoint: Option<String>,
}

/// A provider's endpoints (or why they could not be had) and when.
type MetaEntry = (Result<ProviderMeta, String>, Instant);

/// How long a refused refresh is remembered: requests of that session get
/// the refusal without asking the provider again.
const REFRESH_FAILURE_SECS: i64 = 30;

/// The last refresh of one session.
#[derive(Default)]
enum RefreshSlot {
    #[default]
    Never,
    Done(SessionClaims),
    /// Refused at `at` (Unix seconds), for this reason.
    Failed {
        at: i64,
        why: String,
    },
}

/// `state`s of finished logins, for replay protection, bounded.
pub struct UsedStates {
    /// state -> the login's expiry (Unix seconds).
    states: HashMap<String, i64>,
    /// Size at which expired states are next pruned.
    prune_at: usize,
    max: usize,
}

/// Why a login's `state` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRefusal {
    AlreadyUsed,
    /// `max` logins are in progress and none has expired.
    Full,
}

impl UsedStates {
    /// Remembers at most `max` unexpired states.
    pub fn new(max: usize) -> UsedStates {
        UsedStates {
            states: HashMap::new(),
            prune_at: 4096.min(max),
            max,
        }
    }

    /// Accepts `state` (of a login valid until `exp`) once. Expired states
    /// are pruned now and then, and always before refusing for want of room.
    pub fn accept(&mut self, state: &str, exp: i64, now: i64) -> Result<(), StateRefusal> {
        if self.states.len() >= self.prune_at.min(self.max) {
            self.states.retain(|_, e| *e > now);
            self.prune_at = (self.states.len() * 2).max(4096);
        }
        if self.states.contains_key(state) {
            return Err(StateRefusal::AlreadyUsed);
        }
        if self.states.len() >= self.max {
            return Err(StateRefusal::Full);
        }
        self.states.insert(state.to_string(), exp);
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct LoginState {
    state: String,
    nonce: String,
    verifier: String,
    ret: String,
    exp: i64,
}

/// Sealing key, used states and provider metadata.
pub struct Sso {
    key: LessSafeKey,
    store: std::sync::Arc<dyn Store>,
    used_states: Mutex<UsedStates>,
    /// Sessions ended by logout (session id -> expiry), refused until they
    /// would have expired anyway; kept in the store too, so a restart does
    /// not bring a logged-out cookie back.
    ended: Mutex<HashMap<String, i64>>,
    meta: Mutex<HashMap<String, MetaEntry>>,
    /// Refreshes by session id: the latest refreshed session, behind a lock
    /// held while the provider is asked, so concurrent requests of one
    /// session share one refresh.
    refreshes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<RefreshSlot>>>>,
    /// Counts and audits logins, refreshes and logouts.
    observe: Arc<crate::observe::Observe>,
}

/// What a sealed cookie is bound to: the scheme, the host, and the
/// provider's issuer and client. A cookie sealed for one never opens for
/// another: not at another host, not on the other listener, not after the
/// route's provider changed.
#[derive(Debug, Clone, Copy)]
pub struct CookieScope<'a> {
    pub secure: bool,
    pub host: &'a str,
    pub issuer: &'a str,
    pub client_id: &'a str,
}

impl CookieScope<'_> {
    fn aad(&self, kind: &str) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!(
            "{kind}|{scheme}|{}|{}|{}",
            self.host, self.issuer, self.client_id
        )
    }

    /// The name of cookie `base` here: `__Host-<base>` over HTTPS, which a
    /// browser accepts only from this exact host (Secure, Path=/, no
    /// Domain), so a sibling host cannot plant one.
    pub fn cookie_name(&self, base: &str) -> String {
        if self.secure {
            format!("__Host-{base}")
        } else {
            base.to_string()
        }
    }

    /// A `Set-Cookie` header for cookie `base` (HttpOnly, SameSite=Lax,
    /// Path=/, and Secure over HTTPS).
    fn set_cookie(&self, base: &str, value: &str, max_age: i64) -> (String, String) {
        (
            "set-cookie".into(),
            format!(
                "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
                self.cookie_name(base),
                max_age.max(0),
                if self.secure { "; Secure" } else { "" }
            ),
        )
    }
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

/// Every value of cookie `name`, in order: a browser may send several
/// (another path's, a planted one), and the first need not be ours.
fn cookie_values<'a>(cookies: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    cookies.split(';').filter_map(move |c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
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
    /// Loads the sealing key from `dir/route-oidc.key` (creating it once)
    /// and the sessions ended by logout from `store`.
    pub fn load_or_create(dir: &Path, store: Arc<dyn Store>) -> anyhow::Result<Sso> {
        let path = dir.join("route-oidc.key");
        let bytes = match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => b,
            Ok(_) => anyhow::bail!(
                "{} is corrupt (expected 32 bytes); delete it to end every route OIDC session",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k: [u8; 32] = rand::random();
                transport::files::write_atomic(&path, &k, 0o600)?;
                k.to_vec()
            }
            Err(e) => return Err(e.into()),
        };
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| anyhow::anyhow!("{}: not an AES-256 key", path.display()))?;
        let ended = store
            .scan(ENDED_PREFIX)?
            .into_iter()
            .filter_map(|(k, v)| {
                let sid = k.strip_prefix(ENDED_PREFIX)?.to_string();
                let exp = std::str::from_utf8(&v).ok()?.parse::<i64>().ok()?;
                Some((sid, exp))
            })
            .collect();
        Ok(Sso {
            key: LessSafeKey::new(key),
            store,
            used_states: Mutex::new(UsedStates::new(MAX_LOGINS_IN_PROGRESS)),
            ended: Mutex::new(ended),
            meta: Mutex::new(HashMap::new()),
            refreshes: Mutex::new(HashMap::new()),
            observe: Arc::new(crate::observe::Observe::disabled()),
        })
    }

    /// Counts and audits in `observe`.
    pub fn observed(self, observe: Arc<crate::observe::Observe>) -> Self {
        Sso { observe, ..self }
    }

    fn seal(&self, aad: &str, plain: &[u8]) -> Option<String> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .ok()?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        Some(URL_SAFE_NO_PAD.encode(out))
    }

    fn open(&self, aad: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN + 16 || raw.len() > 16 * 1024 {
            return None;
        }
        let (n, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }

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
            .filter_map(|sealed| self.open(&aad, sealed))
            .find_map(|plain| serde_json::from_slice(&plain).ok())?;
        let sid = s.claims.get(SESSION_ID_CLAIM)?.as_str()?;
        let ended = self.ended.lock().ok()?.contains_key(sid);
        (s.state(now) != SessionState::Over && !ended).then_some(s)
    }

    /// Ends `session` (logout): it is refused from now on, copies of its
    /// cookie included, also after a restart. Forgets sessions that would
    /// have ended by `now` anyway.
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
        let mut ops = vec![Op::Put(
            format!("{ENDED_PREFIX}{sid}"),
            until.to_string().into_bytes(),
        )];
        if let Ok(mut ended) = self.ended.lock() {
            ended.retain(|old, exp| {
                let keep = *exp > now;
                if !keep {
                    ops.push(Op::Delete(format!("{ENDED_PREFIX}{old}")));
                }
                keep
            });
            ended.insert(sid.to_string(), until);
        }
        if let Err(e) = self.store.commit(Txn {
            conditions: vec![],
            ops,
        }) {
            tracing::warn!("logout recorded in memory only (a restart would forget it): {e}");
        }
    }

    /// Seals `session` into a cookie value for `scope` (AES-256-GCM, the
    /// scope as associated data).
    pub fn seal_session(&self, scope: &CookieScope<'_>, session: &SessionClaims) -> Option<String> {
        serde_json::to_vec(session)
            .ok()
            .and_then(|j| self.seal(&scope.aad("session"), &j))
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
    /// requests of one session wait for one refresh and share its result,
    /// so a provider that rotates refresh tokens never sees one twice.
    async fn refresh(
        &self,
        oidc: &crate::oidc::OidcVerifier,
        (host, provider): (&str, &Provider),
        issuer: &IssuerUrl,
        session: &SessionClaims,
        mappings: &[ClaimHeader],
        now: i64,
    ) -> Result<SessionClaims, String> {
        let sid = session
            .claims
            .get(SESSION_ID_CLAIM)
            .and_then(|v| v.as_str())
            .ok_or("session without id")?
            .to_string();
        let slot = {
            let mut all = self.refreshes.lock().map_err(|_| "refresh lock poisoned")?;
            // Keep slots in use (their Arc is held) and finished refreshes of
            // sessions that have not ended; forget the rest.
            all.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.try_lock().is_ok_and(|g| match &*g {
                        RefreshSlot::Done(r) => r.ends_at > now,
                        RefreshSlot::Failed { at, .. } => now - at < REFRESH_FAILURE_SECS,
                        RefreshSlot::Never => false,
                    })
            });
            all.entry(sid).or_default().clone()
        };
        let mut latest = slot.lock().await;
        // A newer refresh token from an earlier refresh of this session wins
        // over the one in a stale cookie.
        let current = match &*latest {
            RefreshSlot::Done(done) if done.state(now) == SessionState::Active => {
                return Ok(done.clone())
            }
            RefreshSlot::Done(done) => done.clone(),
            RefreshSlot::Failed { at, why } if now - at < REFRESH_FAILURE_SECS => {
                return Err(why.clone())
            }
            _ => session.clone(),
        };
        let result = self
            .renew(oidc, provider, issuer, &current, mappings, now)
            .await;
        // Counted (and a refusal audited) when the provider was asked, not
        // when a remembered refusal is repeated.
        self.observe
            .route_oidc_refresh(host, &provider.name, &result);
        *latest = match &result {
            Ok(renewed) => RefreshSlot::Done(renewed.clone()),
            Err(why) => RefreshSlot::Failed {
                at: now,
                why: why.clone(),
            },
        };
        result
    }

    /// Asks the provider to renew `current` with its refresh token, and
    /// verifies the answer.
    async fn renew(
        &self,
        oidc: &crate::oidc::OidcVerifier,
        provider: &Provider,
        issuer: &IssuerUrl,
        current: &SessionClaims,
        mappings: &[ClaimHeader],
        now: i64,
    ) -> Result<SessionClaims, String> {
        let Some(refresh_token) = current.refresh_token.clone() else {
            return Err("no refresh token".into());
        };
        let meta = self.meta(oidc, issuer).await?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", &refresh_token)
            .finish();
        let body = token_request(oidc, provider, &meta, form).await?;
        let id_token = body["id_token"]
            .as_str()
            .ok_or("the provider's refresh returned no id_token")?;
        let verified = verify_id_token(oidc, provider, issuer, id_token, now).await?;
        current
            .refreshed(
                &verified.subject,
                kept_claims(&verified.claims, mappings),
                verified.expires_at,
                body["refresh_token"].as_str().map(str::to_string),
                now,
                &[SESSION_ID_CLAIM],
            )
            .map_err(|e| e.to_string())
    }

    async fn meta(
        &self,
        oidc: &crate::oidc::OidcVerifier,
        issuer: &IssuerUrl,
    ) -> Result<ProviderMeta, String> {
        if let Ok(m) = self.meta.lock() {
            if let Some((meta, at)) = m.get(issuer.as_str()) {
                let fresh_for = match meta {
                    Ok(_) => Duration::from_secs(3600),
                    Err(_) => Duration::from_secs(META_FAILURE_SECS),
                };
                if at.elapsed() < fresh_for {
                    return meta.clone();
                }
            }
        }
        let fetched = self.fetch_meta(oidc, issuer).await;
        if let Ok(mut m) = self.meta.lock() {
            m.insert(
                issuer.as_str().to_string(),
                (fetched.clone(), Instant::now()),
            );
        }
        fetched
    }

    async fn fetch_meta(
        &self,
        oidc: &crate::oidc::OidcVerifier,
        issuer: &IssuerUrl,
    ) -> Result<ProviderMeta, String> {
        let body = oidc.get_json(&issuer.discovery_url()).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        if v["issuer"].as_str() != Some(issuer.as_str()) {
            return Err(format!(
                "discovery document of {} names another issuer",
                issuer.as_str()
            ));
        }
        // Only HTTPS endpoints: the token request carries the client secret
        // and the code.
        let field = |k: &str| {
            v[k].as_str()
                .filter(|s| reqwest::Url::parse(s).is_ok_and(|u| u.scheme() == "https"))
                .map(str::to_string)
        };
        Ok(ProviderMeta {
            authorization_endpoint: field("authorization_endpoint")
                .ok_or("provider has no https authorization_endpoint")?,
            token_endpoint: field("token_endpoint")
                .ok_or("provider has no https token_endpoint")?,
            end_session_endpoint: field("end_session_endpoint"),
        })
    }

    /// Decides what to do with a request to a protected route.
    pub async fn gate(
        &self,
        oidc: &crate::oidc::OidcVerifier,
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
            let after = match self.meta(oidc, &issuer).await {
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
                (self.observe).route_oidc_login_refused(host, &provider.name, *status, why);
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
        let meta = match self.meta(oidc, &issuer).await {
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
            .and_then(|j| self.seal(&scope.aad("login"), &j))
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
        oidc: &crate::oidc::OidcVerifier,
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
            .filter_map(|c| self.open(&aad, c))
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
        let meta = match self.meta(oidc, issuer).await {
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
            Err(e) => return refuse(502, &e),
        };
        let Some(id_token) = body["id_token"].as_str() else {
            return refuse(502, "the provider returned no id_token");
        };
        let verified = match verify_id_token(oidc, provider, issuer, id_token, now).await {
            Ok(v) => v,
            Err(e) => return refuse(401, &e),
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
        (self.observe).route_oidc_login(scope.host, &provider.name, &verified.subject);
        redirect(
            &login.ret,
            vec![cookie, scope.set_cookie(&cookie_base, "", 0)],
        )
    }
}

/// POSTs a form to the provider's token endpoint with the client's
/// credentials (client_secret_basic) and returns the JSON answer.
async fn token_request(
    oidc: &crate::oidc::OidcVerifier,
    provider: &Provider,
    meta: &ProviderMeta,
    form: String,
) -> Result<serde_json::Value, String> {
    let basic = STANDARD.encode(format!(
        "{}:{}",
        form_urlencoded::byte_serialize(provider.client_id.as_bytes()).collect::<String>(),
        form_urlencoded::byte_serialize(provider.client_secret.as_bytes()).collect::<String>()
    ));
    let mut resp = oidc
        .client
        .post(&meta.token_endpoint)
        .map_err(|_| "token endpoint: refused (the coordinator log says why)".to_string())?
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", format!("Basic {basic}"))
        .body(form)
        .send()
        .await
        .map_err(|e| format!("token endpoint: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "the provider refused the token request ({})",
            resp.status()
        ));
    }
    let body = crate::oidc::read_capped(&mut resp, &meta.token_endpoint).await?;
    serde_json::from_slice(&body).map_err(|e| format!("token response: {e}"))
}

/// Verifies an ID token from `provider` with the `identity` verifier:
/// signature by a key of the issuer's JWKS (cached like CI issuers'),
/// issuer, audience = client id, expiry.
async fn verify_id_token(
    oidc: &crate::oidc::OidcVerifier,
    provider: &Provider,
    issuer: &IssuerUrl,
    id_token: &str,
    now: i64,
) -> Result<VerifiedToken, String> {
    let keys = oidc.provider_keys(issuer, id_token).await?;
    Verifier::new(
        keys,
        [issuer.as_str().to_string()],
        [provider.client_id.clone()],
    )
    .verify(id_token, now)
    .map_err(|e| format!("ID token refused: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    const A: CookieScope<'static> = CookieScope {
        secure: false,
        host: "a.test",
        issuer: "https://login.example.com",
        client_id: "client-1",
    };

    fn session(now: i64) -> SessionClaims {
        let mut claims = serde_json::Map::new();
        claims.insert(
            SESSION_ID_CLAIM.into(),
            serde_json::Value::String(random_token([7; 32])),
        );
        SessionClaims::start(
            "alice".into(),
            claims,
            now + 60,
            Some("rt".into()),
            now,
            MAX_SESSION_SECS,
        )
    }

    #[test]
    fn a_session_cookie_opens_only_for_its_host_and_unaltered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("store.redb")).unwrap());
        let sso = Sso::load_or_create(dir.path(), store).unwrap();
        let now = 1_700_000_000;
        let sealed = sso.seal_session(&A, &session(now)).unwrap();
        let cookie = format!("other=1; {SESSION_COOKIE}={sealed}");
        assert!(sso.session(&A, &cookie, now).is_some());
        // Bound to the host, the scheme and the provider's client.
        for other in [
            CookieScope {
                host: "b.test",
                ..A
            },
            CookieScope { secure: true, ..A },
            CookieScope {
                client_id: "client-2",
                ..A
            },
            CookieScope {
                issuer: "https://other.example.com",
                ..A
            },
        ] {
            let name = other.cookie_name(SESSION_COOKIE);
            let moved = format!("{name}={sealed}");
            assert!(sso.session(&other, &moved, now).is_none(), "{other:?}");
        }
        // A planted cookie of the same name first does not hide ours.
        let planted = format!("{SESSION_COOKIE}=garbage; {cookie}");
        assert!(sso.session(&A, &planted, now).is_some());
        let mut bytes = sealed.into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{SESSION_COOKIE}={}", String::from_utf8(bytes).unwrap());
        assert!(sso.session(&A, &tampered, now).is_none());
        // Refreshable after the ID token, over at the cap.
        let cookie = format!(
            "{SESSION_COOKIE}={}",
            sso.seal_session(&A, &session(now)).unwrap()
        );
        assert!(sso.session(&A, &cookie, now + 61).is_some());
        assert!(sso.session(&A, &cookie, now + MAX_SESSION_SECS).is_none());
    }

    #[test]
    fn a_state_is_accepted_once() {
        let mut used = UsedStates::new(10);
        assert_eq!(used.accept("s1", 100, 0), Ok(()));
        assert_eq!(used.accept("s1", 100, 1), Err(StateRefusal::AlreadyUsed));
    }

    #[test]
    fn used_states_are_bounded_and_room_comes_back_when_logins_expire() {
        let max = 10_000;
        let mut used = UsedStates::new(max);
        // Fill it with live logins (expiring at 600), growing past every
        // pruning point on the way.
        for i in 0..max {
            assert_eq!(used.accept(&format!("s{i}"), 600, 0), Ok(()), "{i}");
        }
        assert_eq!(used.accept("late", 600, 1), Err(StateRefusal::Full));
        // Once they have expired, a new login gets in: expired states are
        // pruned before refusing, whatever the next pruning point was.
        assert_eq!(used.accept("after", 1200, 601), Ok(()));
        // A replay of a state still in its login window is refused.
        assert_eq!(
            used.accept("after", 1200, 602),
            Err(StateRefusal::AlreadyUsed)
        );
    }

    #[test]
    fn logout_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("store.redb")).unwrap());
        let now = 1_700_000_000;
        let s = session(now);
        let cookie = {
            let sso = Sso::load_or_create(dir.path(), store.clone()).unwrap();
            let cookie = format!("{SESSION_COOKIE}={}", sso.seal_session(&A, &s).unwrap());
            assert!(sso.session(&A, &cookie, now).is_some());
            sso.end(&s, now);
            assert!(sso.session(&A, &cookie, now).is_none());
            cookie
        };
        // A restart: same key file, same store.
        let sso = Sso::load_or_create(dir.path(), store.clone()).unwrap();
        assert!(sso.session(&A, &cookie, now + 1).is_none());
        // Records of sessions that have lapsed are dropped at the next logout.
        let mut later = session(now);
        later.claims.insert(
            SESSION_ID_CLAIM.into(),
            serde_json::Value::String(random_token([8; 32])),
        );
        sso.end(&later, now + MAX_SESSION_SECS + 1);
        let kept: Vec<String> = store
            .scan(ENDED_PREFIX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kept,
            vec![format!("{ENDED_PREFIX}{}", random_token([8; 32]))]
        );
    }
}
