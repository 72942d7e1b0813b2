//! Verifying CI pipelines' OIDC tokens against the issuers our bindings name.
//!
//! Only issuers some binding names are ever contacted (no fetch for an
//! unknown issuer, so a token cannot make us call an address of its
//! choosing). Per issuer: the discovery document must name that issuer; the
//! JWKS is fetched from its `jwks_uri` (5 s timeout, 1 MiB cap, no
//! redirects) and cached for an hour; a failed refresh keeps the last good
//! set; an unknown kid triggers at most one refetch a minute, and concurrent
//! misses wait for the same fetch. Verification is `identity::Verifier`
//! (algorithm pinned by the JWK), audience = one of the cluster's addresses.
//!
//! `ciLogin` is open to anyone, so a login's cost is bounded before it is
//! paid ([`OidcVerifier::begin`], on the caller's RPC thread): a token over
//! `identity::MAX_TOKEN_BYTES` is refused before it is parsed, one nobody
//! could have signed before its issuer is looked at (`identity::inspect`),
//! and at most [`MAX_CONCURRENT_LOGINS`] logins run at once (over that, a
//! "busy, retry" refusal the CLI retries). A failed fetch is remembered per
//! issuer for [`FETCH_FAILURE_TTL`], so a down issuer is asked at most once
//! per that time however many logins name it, and the unknown-kid refetch
//! is spent only on a well-formed token whose algorithm the issuer uses.
//! The rules are pure ([`IssuerEntry::plan`], `now` passed in).
//!
//! What a refused caller learns is fixed text ([`LoginError`]): never which
//! issuers are bound nor why a fetch failed; those go to the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use identity::bindings::Binding;
use identity::{
    inspect, DiscoveryDocument, IssuerUrl, KeySet, KidLookup, UnverifiedToken, Verifier,
};

use crate::ci::CiBindings;
use crate::observe::CiRefusal;

/// How long fetched keys are used before a refresh.
pub const KEYS_TTL: Duration = Duration::from_secs(3600);
/// Least time between refetches caused by unknown kids.
pub const KID_REFETCH_COOLDOWN: Duration = Duration::from_secs(60);
/// Largest discovery document or JWKS accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// How long a failed discovery or JWKS fetch is remembered: logins naming
/// that issuer meanwhile use the last good keys, or are refused at once.
pub const FETCH_FAILURE_TTL: Duration = Duration::from_secs(10);
/// CI logins verified at the same time. Verifying is about 30 µs of CPU, so
/// this is far above what the cores can use; it bounds the logins waiting
/// on a slow issuer (at most two 5 s fetches) and the tasks they hold.
pub const MAX_CONCURRENT_LOGINS: usize = 64;
/// Of those, the most naming one issuer: a bound issuer that is slow or
/// down (its logins wait on its fetch, up to two 5 s timeouts) holds at
/// most half the slots, and logins through every other issuer go on.
pub const MAX_LOGINS_PER_ISSUER: usize = MAX_CONCURRENT_LOGINS / 2;

/// Why a CI login was refused, in the words the caller gets. Only the
/// binding mismatch names anything, and only what the token itself says.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// More than [`MAX_CONCURRENT_LOGINS`] logins are running, or more
    /// than [`MAX_LOGINS_PER_ISSUER`] naming the same issuer.
    #[error("the coordinator is busy with other CI logins; retry in a few seconds")]
    Busy,
    /// The token was refused: the caller is told only its [`Denial`]; the
    /// cause is for the log, the metrics and the audit trail (not a
    /// `source`, so that no chain printer tells the caller).
    #[error("OIDC access denied{}", .0.denial().suffix())]
    Denied(DenialCause),
    /// A verified token that no binding of the app matches.
    #[error(transparent)]
    NoMatch(#[from] identity::NoMatch),
    /// A binding matches the token's names but pinned other ids.
    #[error(transparent)]
    Drift(#[from] identity::IdDrift),
}

impl LoginError {
    /// The metric label of this refusal, by variant.
    pub fn refusal(&self) -> CiRefusal {
        use identity::{InspectError, VerifyError as V};
        let verify = |v: &V| match v {
            V::TooLarge { .. }
            | V::Malformed(_)
            | V::MissingKid
            | V::BadKid(_)
            | V::UnsupportedCrit(_)
            | V::DuplicateClaim(_)
            | V::MissingClaim(_)
            | V::InvalidClaim { .. } => CiRefusal::MalformedToken,
            V::Expired { .. } => CiRefusal::Expired,
            V::WrongAudience(_) => CiRefusal::WrongAudience,
            _ => CiRefusal::InvalidToken,
        };
        match self {
            LoginError::NoMatch(_) => CiRefusal::NoBinding,
            LoginError::Drift(_) => CiRefusal::IdDrift,
            LoginError::Denied(cause) => match cause {
                DenialCause::UnboundIssuer(_) | DenialCause::BadIssuer { .. } => {
                    CiRefusal::UntrustedIssuer
                }
                DenialCause::Inspect(InspectError::Token(v)) | DenialCause::Verify(v) => verify(v),
                DenialCause::Inspect(_) => CiRefusal::MalformedToken,
                DenialCause::Keys(_) => CiRefusal::IssuerUnavailable,
                DenialCause::BindingsUnavailable | DenialCause::Task => CiRefusal::InvalidToken,
            },
            LoginError::Busy => CiRefusal::InvalidToken,
        }
    }
}

/// Why a token was refused, precisely. Never told to the caller, who
/// learns only [`DenialCause::denial`].
#[derive(Debug, thiserror::Error)]
pub enum DenialCause {
    /// `identity::inspect` refused it before any work (size, structure,
    /// kid, algorithm, signature length).
    #[error(transparent)]
    Inspect(identity::InspectError),
    /// No binding names the issuer it claims.
    #[error("issuer {0:?} is not named by any CI binding")]
    UnboundIssuer(String),
    /// A binding names its issuer, but that is no issuer URL.
    #[error("issuer {issuer:?}: {source}")]
    BadIssuer {
        issuer: String,
        source: identity::IssuerUrlError,
    },
    /// The issuer's keys are not at hand.
    #[error(transparent)]
    Keys(KeysError),
    /// Verification with the issuer's keys failed.
    #[error(transparent)]
    Verify(identity::VerifyError),
    /// The CI binding index could not be read.
    #[error("the CI binding index is unavailable")]
    BindingsUnavailable,
    /// The verification task ended without an answer.
    #[error("the CI login task failed")]
    Task,
}

impl DenialCause {
    /// What the caller is told of this refusal.
    pub fn denial(&self) -> Denial {
        match self {
            DenialCause::Inspect(identity::InspectError::Token(v)) | DenialCause::Verify(v) => {
                Denial::of(v)
            }
            _ => Denial::Generic,
        }
    }
}

/// What a refused caller is told beyond "OIDC access denied": only facts
/// about its own token that it can read itself and that do not depend on
/// what this cluster trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Anything else (malformed, unknown issuer, unknown key, bad
    /// signature, keys unavailable, ...).
    Generic,
    /// Its `exp` has passed.
    Expired,
    /// Its `nbf` or `iat` is in the future.
    NotYetValid,
    /// Its `aud` is not this cluster's address.
    WrongAudience,
    /// It is longer than `identity::MAX_TOKEN_BYTES`.
    TooLarge,
}

impl Denial {
    fn suffix(&self) -> &'static str {
        match self {
            Denial::Generic => "",
            Denial::Expired => ": the token has expired",
            Denial::NotYetValid => ": the token is not valid yet",
            Denial::WrongAudience => {
                ": the token's audience is not this cluster's address (host:port)"
            }
            Denial::TooLarge => ": the token is larger than 16 KiB",
        }
    }

    fn of(e: &identity::VerifyError) -> Self {
        use identity::VerifyError as V;
        match e {
            V::Expired { .. } => Denial::Expired,
            V::NotYetValid { .. } | V::IssuedInFuture { .. } => Denial::NotYetValid,
            V::WrongAudience(_) => Denial::WrongAudience,
            V::TooLarge { .. } => Denial::TooLarge,
            _ => Denial::Generic,
        }
    }
}

/// A refusal for `cause`, logged with its detail.
fn denied(cause: DenialCause) -> LoginError {
    tracing::info!("CI login refused: {cause}");
    LoginError::Denied(cause)
}

/// What we know of one issuer's keys.
#[derive(Default)]
struct IssuerEntry {
    keys: Option<KeySet>,
    fetched: Option<Instant>,
    kid_refetch: Option<Instant>,
    /// The last fetch failure and when it happened.
    failed: Option<(Instant, Arc<FetchError>)>,
    fetches: u64,
}

/// What a login does with an issuer's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// Verify with the keys held.
    Cached,
    /// Fetch first; `for_kid` when only an unknown kid asks for it.
    Fetch { for_kid: bool },
    /// Nothing held and the last fetch failed moments ago: refuse.
    RecentlyFailed,
}

fn elapsed(since: Option<Instant>, now: Instant) -> Option<Duration> {
    since.map(|t| now.saturating_duration_since(t))
}

impl IssuerEntry {
    /// What a login presenting `token` does at `now`.
    fn plan(&self, token: Option<&UnverifiedToken>, now: Instant) -> Plan {
        let failed_recently = self
            .failed
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < FETCH_FAILURE_TTL);
        let Some(keys) = &self.keys else {
            return if failed_recently {
                Plan::RecentlyFailed
            } else {
                Plan::Fetch { for_kid: false }
            };
        };
        if failed_recently {
            return Plan::Cached;
        }
        if elapsed(self.fetched, now).is_none_or(|age| age >= KEYS_TTL) {
            return Plan::Fetch { for_kid: false };
        }
        let may_refetch =
            elapsed(self.kid_refetch, now).is_none_or(|age| age >= KID_REFETCH_COOLDOWN);
        if may_refetch && token.is_some_and(|t| t.lookup(keys) == KidLookup::Unknown) {
            return Plan::Fetch { for_kid: true };
        }
        Plan::Cached
    }

    /// Records the outcome of a fetch made at `now`.
    fn record(&mut self, for_kid: bool, result: Result<KeySet, FetchError>, now: Instant) {
        self.fetches += 1;
        if for_kid {
            self.kid_refetch = Some(now);
        }
        match result {
            Ok(keys) => {
                self.keys = Some(keys);
                self.fetched = Some(now);
                self.failed = None;
            }
            Err(e) => self.failed = Some((now, Arc::new(e))),
        }
    }
}

/// Why an issuer's keys are not at hand (logged; a CI caller is only told
/// "OIDC access denied").
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("the issuer cache is unavailable")]
    Unavailable,
    #[error("no keys for {issuer}: its last fetch failed less than 10 s ago ({reason})")]
    RecentlyFailed {
        issuer: String,
        #[source]
        reason: Arc<FetchError>,
    },
    #[error("no keys for {issuer}: {reason}")]
    Fetch {
        issuer: String,
        #[source]
        reason: Arc<FetchError>,
    },
}

impl KeysError {
    /// Whether the keys may well be had on a later try: this coordinator's
    /// cache was unavailable, or the issuer could not be reached or failed
    /// (as opposed to an issuer our outbound policy refuses, or one that
    /// serves documents that are not what they must be).
    pub fn is_transient(&self) -> bool {
        match self {
            KeysError::Unavailable => true,
            KeysError::RecentlyFailed { reason, .. } | KeysError::Fetch { reason, .. } => {
                reason.is_transient()
            }
        }
    }
}

impl FetchError {
    /// Whether the same fetch may succeed later: the connection or the
    /// body broke off, the name did not resolve, or the server failed or
    /// asked us to slow down (not: an address or URL our outbound policy
    /// refuses, a document that is not what it must be).
    pub fn is_transient(&self) -> bool {
        match self {
            // A name our outbound policy refused is refused inside the
            // request: that does not pass with time.
            FetchError::Send { source, .. } => crate::outbound::OutboundError::in_reqwest(source)
                .is_none_or(crate::outbound::OutboundError::is_transient),
            FetchError::Read { .. } => true,
            FetchError::Status { status, .. } => {
                status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            FetchError::Refused { source, .. } => source.is_transient(),
            FetchError::TooLarge { .. }
            | FetchError::Discovery(_)
            | FetchError::Endpoints(_)
            | FetchError::Jwks { .. } => false,
        }
    }
}

/// Why a document (discovery, JWKS, a token response) could not be had
/// from an issuer or provider.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The outbound policy refused the address (logged there).
    #[error("fetching {url}: refused (the coordinator log says why)")]
    Refused {
        url: String,
        #[source]
        source: crate::outbound::OutboundError,
    },
    /// The request failed (connection, TLS, timeout).
    #[error("fetching {url}: {source}")]
    Send {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not a success.
    #[error("fetching {url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    /// The body broke off.
    #[error("reading {url}: {source}")]
    Read {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The body is over [`MAX_DOCUMENT_BYTES`].
    #[error("{url} is larger than 1 MiB")]
    TooLarge { url: String },
    /// The discovery document is not one for its issuer.
    #[error(transparent)]
    Discovery(#[from] identity::DiscoveryError),
    /// The discovery document's endpoints are not JSON.
    #[error("{0}")]
    Endpoints(#[source] serde_json::Error),
    /// The JWKS does not make a key set.
    #[error("JWKS of {issuer}: {source}")]
    Jwks {
        issuer: String,
        #[source]
        source: identity::KeySetError,
    },
}

/// A login that passed the checks made before any work: its token is
/// plausible, its issuer is bound, and it holds one of the login slots.
pub struct LoginAttempt {
    token: String,
    unverified: UnverifiedToken,
    issuer: IssuerUrl,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _issuer_slot: tokio::sync::OwnedSemaphorePermit,
}

/// A discovery document as fetched, read once for every use: the checks
/// of [`DiscoveryDocument::parse_for_issuer`] (it names the issuer it was
/// fetched for; an https `jwks_uri`), and the login endpoints a route OIDC
/// provider needs, each kept only when it is an https URL (the token
/// request carries the client secret and the code).
#[derive(Debug, Clone)]
pub struct Discovered {
    pub document: DiscoveryDocument,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub end_session_endpoint: Option<String>,
}

impl Discovered {
    /// Reads `bytes`, fetched from `issuer`'s discovery URL.
    pub fn parse(bytes: &[u8], issuer: &IssuerUrl) -> Result<Discovered, FetchError> {
        #[derive(serde::Deserialize)]
        struct Endpoints {
            authorization_endpoint: Option<serde_json::Value>,
            token_endpoint: Option<serde_json::Value>,
            end_session_endpoint: Option<serde_json::Value>,
        }
        let document = DiscoveryDocument::parse_for_issuer(bytes, issuer)?;
        let endpoints: Endpoints = serde_json::from_slice(bytes).map_err(FetchError::Endpoints)?;
        let https = |v: Option<serde_json::Value>| {
            v.and_then(|v| v.as_str().map(str::to_string))
                .filter(|s| reqwest::Url::parse(s).is_ok_and(|u| u.scheme() == "https"))
        };
        Ok(Discovered {
            document,
            authorization_endpoint: https(endpoints.authorization_endpoint),
            token_endpoint: https(endpoints.token_endpoint),
            end_session_endpoint: https(endpoints.end_session_endpoint),
        })
    }
}

/// Fetches and caches issuer keys; verifies CI tokens.
pub struct OidcVerifier {
    /// The outbound HTTPS client (also used for route OIDC code exchange):
    /// it connects only to addresses the outbound policy allows.
    pub client: crate::outbound::Outbound,
    audiences: Vec<String>,
    issuers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<IssuerEntry>>>>,
    logins: Arc<tokio::sync::Semaphore>,
    /// Login slots per bound issuer ([`MAX_LOGINS_PER_ISSUER`]); only
    /// issuers a binding names get one.
    issuer_logins: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Counts issuer document fetches.
    observe: Arc<crate::observe::Observe>,
}

/// Reads a response body of at most 1 MiB (the cap on everything fetched
/// from an issuer or provider).
pub async fn read_capped(resp: &mut reqwest::Response, url: &str) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|source| FetchError::Read {
        url: url.to_string(),
        source,
    })? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
            });
        }
    }
    Ok(body)
}

impl OidcVerifier {
    /// `audiences`: the cluster addresses a token may be for; `extra_roots`:
    /// CAs trusted for issuers besides the platform roots; `outbound`: the
    /// addresses issuers and providers may be fetched from.
    pub fn new(
        audiences: Vec<String>,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
        outbound: identity::AddressPolicy,
    ) -> anyhow::Result<Self> {
        let tls = transport::tls::https_client_config(extra_roots)?;
        let client = crate::outbound::Outbound::new(tls, outbound)?;
        Ok(OidcVerifier {
            client,
            audiences,
            issuers: Mutex::new(HashMap::new()),
            logins: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_LOGINS)),
            issuer_logins: Mutex::new(HashMap::new()),
            observe: Arc::new(crate::observe::Observe::disabled()),
        })
    }

    /// Counts fetches in `observe`.
    pub fn observed(self, observe: Arc<crate::observe::Observe>) -> Self {
        OidcVerifier { observe, ..self }
    }

    /// GETs `url` (5 s, 1 MiB cap, no redirects) and returns the body.
    pub async fn get_json(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let mut resp = self
            .client
            .get(url)
            .map_err(|source| FetchError::Refused {
                url: url.to_string(),
                source,
            })?
            .send()
            .await
            .map_err(|source| FetchError::Send {
                url: url.to_string(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: resp.status(),
            });
        }
        read_capped(&mut resp, url).await
    }

    /// Fetches and reads the discovery document of `issuer` (for its
    /// JWKS, and for a route OIDC provider its login endpoints).
    pub async fn discover(&self, issuer: &IssuerUrl) -> Result<Discovered, FetchError> {
        let bytes = self.get_json(&issuer.discovery_url()).await?;
        Discovered::parse(&bytes, issuer)
    }

    async fn fetch_keys(&self, issuer: &IssuerUrl) -> Result<KeySet, FetchError> {
        let doc = self.discover(issuer).await;
        self.observe.issuer_fetch("discovery", doc.is_ok());
        let jwks = self.get_json(&doc?.document.jwks_uri).await;
        let keys = jwks.and_then(|j| {
            KeySet::from_jwks_json(&j).map_err(|source| FetchError::Jwks {
                issuer: issuer.as_str().to_string(),
                source,
            })
        });
        self.observe.issuer_fetch("jwks", keys.is_ok());
        keys
    }

    /// Keys for `issuer`, fetching when absent, stale, or when `token`
    /// names an unknown kid a new key of the issuer could have signed (see
    /// [`IssuerEntry::plan`]); without a token, never for a kid.
    async fn keys(
        &self,
        issuer: &IssuerUrl,
        token: Option<&UnverifiedToken>,
    ) -> Result<KeySet, KeysError> {
        let entry = {
            let mut map = self.issuers.lock().map_err(|_| KeysError::Unavailable)?;
            map.entry(issuer.as_str().to_string()).or_default().clone()
        };
        let mut e = entry.lock().await;
        match e.plan(token, Instant::now()) {
            Plan::Cached => {}
            Plan::RecentlyFailed => {
                if let Some((_, reason)) = &e.failed {
                    return Err(KeysError::RecentlyFailed {
                        issuer: issuer.as_str().to_string(),
                        reason: reason.clone(),
                    });
                }
            }
            Plan::Fetch { for_kid } => {
                let result = self.fetch_keys(issuer).await;
                if let Err(err) = &result {
                    tracing::warn!(
                        issuer = issuer.as_str(),
                        "fetching the keys of an OIDC issuer failed: {err}{}",
                        if e.keys.is_some() {
                            "; keeping the last good set"
                        } else {
                            ""
                        }
                    );
                }
                e.record(for_kid, result, Instant::now());
            }
        }
        match (&e.keys, &e.failed) {
            (Some(keys), _) => Ok(keys.clone()),
            (None, Some((_, reason))) => Err(KeysError::Fetch {
                issuer: issuer.as_str().to_string(),
                reason: reason.clone(),
            }),
            (None, None) => Err(KeysError::Unavailable),
        }
    }

    /// Keys of a route OIDC provider for verifying `id_token` (which the
    /// coordinator fetched itself from the provider's token endpoint),
    /// cached and remembered like CI issuers'.
    pub async fn provider_keys(
        &self,
        issuer: &IssuerUrl,
        id_token: &str,
    ) -> Result<KeySet, KeysError> {
        let token = inspect(id_token).ok();
        self.keys(issuer, token.as_ref()).await
    }

    /// The checks a login passes before any work, run where the call
    /// arrives: the token is plausible (`identity::inspect`: size first,
    /// then structure, kid, algorithm, signature length), names an issuer
    /// some binding trusts, and a login slot is free.
    pub fn begin(&self, ci: &CiBindings, token: &str) -> Result<LoginAttempt, LoginError> {
        let token = token.trim();
        let unverified = inspect(token).map_err(|e| {
            tracing::debug!("CI login refused: {e}");
            LoginError::Denied(DenialCause::Inspect(e))
        })?;
        if !ci.names_issuer(&unverified.issuer) {
            return Err(denied(DenialCause::UnboundIssuer(unverified.issuer)));
        }
        let issuer = IssuerUrl::parse(&unverified.issuer).map_err(|source| {
            denied(DenialCause::BadIssuer {
                issuer: unverified.issuer.clone(),
                source,
            })
        })?;
        let issuer_slots = self
            .issuer_logins
            .lock()
            .map_err(|_| LoginError::Busy)?
            .entry(issuer.as_str().to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_LOGINS_PER_ISSUER)))
            .clone();
        let issuer_slot = issuer_slots
            .try_acquire_owned()
            .map_err(|_| LoginError::Busy)?;
        let slot = self
            .logins
            .clone()
            .try_acquire_owned()
            .map_err(|_| LoginError::Busy)?;
        Ok(LoginAttempt {
            token: token.to_string(),
            unverified,
            issuer,
            _slot: slot,
            _issuer_slot: issuer_slot,
        })
    }

    /// Verifies the token of `attempt` for `app` at `now` (unix seconds);
    /// returns the binding it matched and the verified token.
    pub async fn finish(
        &self,
        ci: &CiBindings,
        app: &str,
        attempt: LoginAttempt,
        now: i64,
    ) -> Result<CiLogin, LoginError> {
        let verified = self.verify(&attempt, now).await?;
        let binding = ci
            .matching(app, &verified.claims, now)
            .map_err(|e| match e {
                crate::ci::MatchError::NoMatch(m) => LoginError::NoMatch(m),
                crate::ci::MatchError::Drift(d) => LoginError::Drift(d),
                crate::ci::MatchError::Unavailable => {
                    LoginError::Denied(DenialCause::BindingsUnavailable)
                }
            })?;
        Ok(CiLogin {
            binding,
            token: verified,
        })
    }

    /// The token of `attempt` verified at `now` with its issuer's keys
    /// (signature, issuer, audience, times); no binding is consulted.
    pub async fn verify(
        &self,
        attempt: &LoginAttempt,
        now: i64,
    ) -> Result<identity::VerifiedToken, LoginError> {
        let keys = self
            .keys(&attempt.issuer, Some(&attempt.unverified))
            .await
            .map_err(|e| denied(DenialCause::Keys(e)))?;
        let iss = attempt.issuer.as_str();
        Verifier::new(keys, [iss], self.audiences.clone())
            .verify(&attempt.token, now)
            .map_err(|e| {
                tracing::info!(issuer = iss, "CI login refused: {e}");
                LoginError::Denied(DenialCause::Verify(e))
            })
    }
}

/// A CI token verified and matched.
#[derive(Debug, Clone)]
pub struct CiLogin {
    /// The binding it matched.
    pub binding: Binding,
    /// The verified token (its `jti`, `exp`, `sub`, `iss`).
    pub token: identity::VerifiedToken,
}

/// A CI login for `app` with `token`: the cheap checks and a login slot
/// where the call arrives ([`OidcVerifier::begin`]), the verification on
/// the multi-threaded runtime `rt` ([`OidcVerifier::finish`]), a refusal
/// counted and audited in `observe` (budgeted by `source`, the peer
/// address). Returns the binding matched and the verified token, and what
/// the audit line of its acceptance names: that line is the caller's to
/// write once the token is spent (a replayed token is refused there, and
/// must not first be recorded as accepted).
pub async fn login(
    oidc: &Arc<OidcVerifier>,
    ci: &Arc<CiBindings>,
    observe: &Arc<crate::observe::Observe>,
    rt: &tokio::runtime::Handle,
    app: &str,
    token: &str,
    source: Option<std::net::IpAddr>,
) -> Result<(CiLogin, crate::audit::CiTokenFields), LoginError> {
    let seen = crate::audit::CiTokenFields::peek(token);
    let refused = |e: LoginError| {
        observe.ci_login(app, seen.clone(), Err((e.refusal(), &e)), source);
        e
    };
    let attempt = oidc.begin(ci, token).map_err(refused)?;
    let (verifier, bindings, login_app) = (oidc.clone(), ci.clone(), app.to_string());
    let finished = rt
        .spawn(async move {
            let now = transport::clock::now_unix();
            verifier.finish(&bindings, &login_app, attempt, now).await
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!("a CI login task failed: {e}");
            Err(LoginError::Denied(DenialCause::Task))
        });
    let login = finished.map_err(refused)?;
    Ok((login, seen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// A token `inspect` finds plausible (kid, RS256, a 2048-bit signature's
    /// length), naming `issuer`; nobody signed it.
    fn plausible_token(issuer: &str) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let header = b64(br#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#);
        let claims = b64(serde_json::json!({"iss": issuer, "sub": "x"})
            .to_string()
            .as_bytes());
        format!("{header}.{claims}.{}", b64(&[7u8; 256]))
    }

    #[test]
    fn one_issuer_holds_at_most_half_the_login_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let ci = CiBindings::load(store, identity::AddressPolicy::default()).unwrap();
        let github =
            identity::bindings::Binding::github("x", "web", "acme/web", None, None, None, "")
                .unwrap();
        ci.add(github, 0).unwrap();
        let slow = "https://gitlab.example.com";
        let gitlab = identity::bindings::Binding::generic(
            "x",
            "web",
            slow,
            "project_path:acme/web:*",
            vec![],
            "",
        )
        .unwrap();
        ci.add(gitlab, 0).unwrap();
        let oidc = OidcVerifier::new(
            vec!["127.0.0.1:1".into()],
            &[],
            identity::AddressPolicy::default(),
        )
        .unwrap();
        // Logins naming an issuer whose fetch hangs take its share...
        let held: Vec<LoginAttempt> = (0..MAX_LOGINS_PER_ISSUER)
            .map(|_| oidc.begin(&ci, &plausible_token(slow)).ok().unwrap())
            .collect();
        assert!(matches!(
            oidc.begin(&ci, &plausible_token(slow)),
            Err(LoginError::Busy)
        ));
        // ... and no more: another issuer's logins still begin.
        let other = oidc.begin(
            &ci,
            &plausible_token("https://token.actions.githubusercontent.com"),
        );
        assert!(other.is_ok());
        drop(held);
        assert!(oidc.begin(&ci, &plausible_token(slow)).is_ok());
    }

    #[test]
    fn an_issuer_that_failed_may_come_back_one_that_is_refused_or_broken_does_not() {
        let status = |code: u16| {
            Arc::new(FetchError::Status {
                url: "https://ci.test/jwks".into(),
                status: reqwest::StatusCode::from_u16(code).unwrap(),
            })
        };
        let fetch = |reason: Arc<FetchError>| KeysError::Fetch {
            issuer: "https://ci.test".into(),
            reason,
        };
        assert!(KeysError::Unavailable.is_transient());
        assert!(fetch(status(503)).is_transient());
        assert!(fetch(status(429)).is_transient());
        assert!(KeysError::RecentlyFailed {
            issuer: "https://ci.test".into(),
            reason: status(502),
        }
        .is_transient());
        assert!(!fetch(status(404)).is_transient());
        assert!(!fetch(Arc::new(FetchError::TooLarge {
            url: "https://ci.test/jwks".into()
        }))
        .is_transient());
    }

    fn unverified(kid: &str, alg: &str) -> UnverifiedToken {
        let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.{}",
            b64(format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#)),
            b64(r#"{"iss":"https://issuer.example"}"#.to_string()),
            b64("s".repeat(if alg == "RS256" { 256 } else { 64 }))
        );
        inspect(&token).expect("plausible token")
    }

    fn keys() -> (KeySet, String) {
        let key = identity::PublicKey::ed25519_from_raw(&[7u8; 32]).expect("key");
        let kid = key.kid().to_string();
        (KeySet::from_keys([key]).expect("set"), kid)
    }

    fn entry_with_keys(at: Instant) -> (IssuerEntry, String) {
        let (set, kid) = keys();
        let mut e = IssuerEntry::default();
        e.record(false, Ok(set), at);
        (e, kid)
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_first_login_fetches_and_a_failure_is_remembered_for_its_ttl() {
        let t0 = Instant::now();
        let tok = unverified("k", "EdDSA");
        let mut e = IssuerEntry::default();
        assert_eq!(e.plan(Some(&tok), t0), Plan::Fetch { for_kid: false });
        e.record(false, Err(FetchError::TooLarge { url: "x".into() }), t0);
        // Every login in the next 10 s is refused without a fetch...
        assert_eq!(e.plan(Some(&tok), t0), Plan::RecentlyFailed);
        assert_eq!(e.plan(Some(&tok), t0 + S(9)), Plan::RecentlyFailed);
        // ... and the issuer is asked again after that.
        assert_eq!(
            e.plan(Some(&tok), t0 + FETCH_FAILURE_TTL),
            Plan::Fetch { for_kid: false }
        );
        assert_eq!(e.fetches, 1);
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_good_keys_and_retries_after_the_ttl() {
        let t0 = Instant::now();
        let (mut e, kid) = entry_with_keys(t0);
        let tok = unverified(&kid, "EdDSA");
        assert_eq!(e.plan(Some(&tok), t0 + S(60)), Plan::Cached);
        let stale = t0 + KEYS_TTL;
        assert_eq!(e.plan(Some(&tok), stale), Plan::Fetch { for_kid: false });
        let unavailable = FetchError::Status {
            url: "x".into(),
            status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
        };
        e.record(false, Err(unavailable), stale);
        assert!(e.keys.is_some(), "the last good set is kept");
        assert_eq!(e.plan(Some(&tok), stale + S(5)), Plan::Cached);
        assert_eq!(
            e.plan(Some(&tok), stale + FETCH_FAILURE_TTL),
            Plan::Fetch { for_kid: false }
        );
    }

    #[test]
    fn an_unknown_kid_refetches_once_per_cooldown() {
        let t0 = Instant::now();
        let (mut e, _) = entry_with_keys(t0);
        let rotated = unverified("rotated", "EdDSA");
        assert_eq!(
            e.plan(Some(&rotated), t0 + S(1)),
            Plan::Fetch { for_kid: true }
        );
        let (set, _) = keys();
        e.record(true, Ok(set), t0 + S(1));
        assert_eq!(e.plan(Some(&rotated), t0 + S(2)), Plan::Cached);
        assert_eq!(e.plan(Some(&rotated), t0 + S(60)), Plan::Cached);
        assert_eq!(
            e.plan(Some(&rotated), t0 + S(1) + KID_REFETCH_COOLDOWN),
            Plan::Fetch { for_kid: true }
        );
    }

    #[test]
    fn a_token_the_issuer_could_not_have_signed_never_spends_the_refetch() {
        let t0 = Instant::now();
        let (e, _) = entry_with_keys(t0);
        // RS256 (a plausible 256-byte signature) against an EdDSA issuer.
        let foreign = unverified("other", "RS256");
        assert_eq!(e.plan(Some(&foreign), t0 + S(1)), Plan::Cached);
        // Malformed ones do not even get a plan: inspect refuses them.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for junk in [
            format!("{}.{}.{}", b64("not json"), b64("{}"), b64("sig")),
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"EdDSA"}"#),
                b64(r#"{"iss":"https://issuer.example"}"#),
                b64(&"s".repeat(64))
            ),
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"EdDSA","kid":"x"}"#),
                b64(r#"{"iss":"https://issuer.example"}"#),
                b64(&"s".repeat(63))
            ),
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"HS256","kid":"x"}"#),
                b64(r#"{"iss":"https://issuer.example"}"#),
                b64(&"s".repeat(32))
            ),
        ] {
            assert!(inspect(&junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn a_discovery_document_is_read_once_for_keys_and_login_endpoints() {
        let issuer = IssuerUrl::parse("https://login.example.com").expect("issuer");
        let doc = br#"{"issuer":"https://login.example.com",
            "jwks_uri":"https://login.example.com/jwks",
            "authorization_endpoint":"https://login.example.com/auth",
            "token_endpoint":"http://login.example.com/token",
            "end_session_endpoint":7}"#;
        let d = Discovered::parse(doc, &issuer).expect("document");
        assert_eq!(d.document.jwks_uri, "https://login.example.com/jwks");
        assert_eq!(
            d.authorization_endpoint.as_deref(),
            Some("https://login.example.com/auth")
        );
        // Not https, not a string: as if absent.
        assert_eq!(d.token_endpoint, None);
        assert_eq!(d.end_session_endpoint, None);
        let other = br#"{"issuer":"https://other.example.com","jwks_uri":"https://x/jwks"}"#;
        assert!(Discovered::parse(other, &issuer).is_err());
    }

    #[test]
    fn ci_refusals_map_to_fixed_reasons() {
        use identity::VerifyError as V;
        let denied = LoginError::Denied;
        for (e, reason) in [
            (
                LoginError::NoMatch(identity::NoMatch {
                    issuer: "a".into(),
                    subject: "b".into(),
                    repository: "c".into(),
                }),
                "no_binding",
            ),
            (
                LoginError::Drift(identity::IdDrift {
                    binding: "b".into(),
                    claim: "repository_id".into(),
                    pinned: "1".into(),
                    found: Some("2".into()),
                }),
                "id_drift",
            ),
            (
                denied(DenialCause::UnboundIssuer("https://x".into())),
                "untrusted_issuer",
            ),
            (
                denied(DenialCause::Inspect(
                    identity::inspect("not a JWT").unwrap_err(),
                )),
                "malformed_token",
            ),
            (
                denied(DenialCause::Keys(KeysError::Unavailable)),
                "issuer_unavailable",
            ),
            (
                denied(DenialCause::Verify(V::Expired { exp: 1, now: 2 })),
                "expired",
            ),
            (
                denied(DenialCause::Verify(V::WrongAudience(vec![]))),
                "wrong_audience",
            ),
            (
                denied(DenialCause::Verify(V::BadSignature)),
                "invalid_token",
            ),
        ] {
            assert_eq!(e.refusal().as_str(), reason, "{e:?}");
        }
    }

    #[test]
    fn refusals_say_only_fixed_words() {
        assert_eq!(
            LoginError::Denied(DenialCause::UnboundIssuer("https://secret".into())).to_string(),
            "OIDC access denied"
        );
        assert_eq!(
            LoginError::Denied(DenialCause::Verify(identity::VerifyError::Expired {
                exp: 1,
                now: 2
            }))
            .to_string(),
            "OIDC access denied: the token has expired"
        );
        let e = LoginError::Denied(DenialCause::Verify(identity::VerifyError::UnknownKid(
            "secret-kid".into(),
        )));
        assert_eq!(e.to_string(), "OIDC access denied");
    }
}
