//! The per-sandbox workload token endpoint and the minting proxy behind it.
//!
//! Each sandbox gets its own listener (`MIREN_IDENTITY_TOKEN_URL`) and its
//! own random secret: which sandbox asks is decided by which endpoint was
//! called, never by a source address or a claim in the request. Tokens come
//! from the coordinator (`issueWorkloadToken`); the runner holds no key. A
//! token is cached per (sandbox, audiences, ttl) until half its life has
//! passed, and an unexpired cached token is still served while the
//! coordinator is unreachable.
//!
//! A sandbox is hostile, and every cache miss costs a signature on the
//! coordinator, so what one sandbox can ask for is bounded
//! ([`crate::token_limits`]): at most [`MAX_AUDIENCES`] audiences per
//! request, at most [`MAX_CACHED_KEYS`] cached keys per sandbox (least
//! recently used evicted), and a token bucket on its misses (429 with
//! `Retry-After` when empty; cached tokens are always served). The token
//! file the runner keeps for each sandbox goes through [`Broker::get`],
//! which the bucket does not meter, so a sandbox cannot starve it.
//!
//! [`MAX_CACHED_KEYS`]: crate::token_limits::MAX_CACHED_KEYS

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::{mpsc, oneshot};
use transport::clock::now_unix as now;

use crate::call::CallError;
use crate::token_limits::{
    retry_after_secs, CacheKey, CachedToken, MissBucket, MissLimit, SandboxCache,
};

/// Longest audience accepted.
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Most distinct audiences per request: enough for a token that several
/// services accept, while one request stays small to mint and to cache.
pub const MAX_AUDIENCES: usize = 8;

/// A request for a token, as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub sandbox: String,
    pub audiences: Vec<String>,
    pub ttl: u32,
}

/// Sent to the runner's RPC thread to mint through the coordinator.
pub type MintRequest = (TokenKey, oneshot::Sender<Result<String, CallError>>);

/// Why no token was handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The sandbox's miss bucket is empty and nothing unexpired is cached
    /// for this key: the endpoint answers 429 with `Retry-After`.
    #[error(
        "too many new tokens: this sandbox may have {burst} tokens minted at once, then \
         {per_sec} per second; retry after {retry_after_secs} s. Tokens already minted (same \
         audiences and ttl) are served from the cache without limit: reuse audiences and ttl \
         rather than varying them"
    )]
    TooManyMisses {
        retry_after_secs: u64,
        burst: u32,
        per_sec: u32,
    },
    /// The sandbox's endpoint outlived it (it was stopped meanwhile).
    #[error("sandbox {0} is not running on this runner")]
    NotServed(String),
    /// The coordinator did not mint one and nothing unexpired is cached.
    #[error("could not get a token: {0}")]
    Mint(#[source] CallError),
}

/// Who asks the broker: a sandbox through its endpoint is metered, the
/// runner keeping a sandbox's token file is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Sandbox,
    Runner,
}

/// What the runner keeps for one running sandbox.
struct SandboxTokens {
    cache: SandboxCache,
    misses: MissBucket,
}

/// The per-sandbox caches and miss buckets, and the channel to the minting
/// proxy. A sandbox's entry exists from [`Broker::open`] (done by [`serve`])
/// to [`Broker::forget`]; a token minted after that is not cached, so the
/// map holds only sandboxes that run here.
#[derive(Clone)]
pub struct Broker {
    sandboxes: Arc<Mutex<HashMap<String, SandboxTokens>>>,
    limit: MissLimit,
    mint: mpsc::UnboundedSender<MintRequest>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Reads `iat` and `exp` from a JWT we were handed by the coordinator
/// (only to know when to renew it; nothing is trusted from it).
fn times(token: &str) -> Option<(i64, i64)> {
    let claims = identity::peek_claims(token).ok()?;
    let at = |name: &str| claims.get(name).and_then(serde_json::Value::as_i64);
    Some((at("iat")?, at("exp")?))
}

impl Broker {
    /// A broker minting through `mint`, each sandbox's misses limited by
    /// `limit`.
    pub fn new(mint: mpsc::UnboundedSender<MintRequest>, limit: MissLimit) -> Self {
        Broker {
            sandboxes: Arc::new(Mutex::new(HashMap::new())),
            limit,
            mint,
            metrics: crate::metrics::Metrics::new(false),
        }
    }

    /// Counts endpoint answers and mint round trips in `metrics`.
    pub fn with_metrics(self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Broker { metrics, ..self }
    }

    /// The map, even after a panic elsewhere: it holds no invariant that a
    /// panic could break halfway, and losing it would lose the limits.
    fn sandboxes(&self) -> MutexGuard<'_, HashMap<String, SandboxTokens>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts keeping tokens for `sandbox`: an empty cache and a full miss
    /// bucket ([`serve`] calls it). Calling it again changes nothing.
    pub fn open(&self, sandbox: &str) {
        let limit = self.limit;
        self.sandboxes()
            .entry(sandbox.to_string())
            .or_insert_with(|| SandboxTokens {
                cache: SandboxCache::new(),
                misses: MissBucket::full(limit, Instant::now()),
            });
    }

    /// Forgets a sandbox's tokens and miss bucket (it stopped).
    pub fn forget(&self, sandbox: &str) {
        self.sandboxes().remove(sandbox);
    }

    /// A token for the runner's own use on a sandbox's behalf (the token
    /// file): fresh from the cache (under half-life), else minted; when
    /// minting fails, an unexpired cached token. Not metered by the miss
    /// bucket: its rate is the runner's (one key, renewed at half-life),
    /// and a sandbox's own misses must not leave its token file stale. A
    /// request a sandbox made goes through its endpoint ([`serve`]), which
    /// is metered.
    pub async fn get(&self, key: TokenKey) -> Result<String, TokenError> {
        self.obtain(key, Caller::Runner).await
    }

    /// Like [`Broker::get`], and each miss takes one from the sandbox's
    /// bucket. Over the limit it answers as through an outage: an unexpired
    /// cached token if there is one, else [`TokenError::TooManyMisses`].
    async fn get_for_sandbox(&self, key: TokenKey) -> Result<String, TokenError> {
        self.obtain(key, Caller::Sandbox).await
    }

    async fn obtain(&self, key: TokenKey, caller: Caller) -> Result<String, TokenError> {
        let cache_key = CacheKey {
            audiences: key.audiences.clone(),
            ttl: key.ttl,
        };
        let cached = {
            let mut sandboxes = self.sandboxes();
            match sandboxes.get_mut(&key.sandbox) {
                Some(tokens) => {
                    let cached = tokens.cache.lookup(&cache_key);
                    let t = now();
                    if let Some(c) = cached.as_ref().filter(|c| c.is_fresh(t)) {
                        return Ok(c.token.clone());
                    }
                    if caller == Caller::Sandbox {
                        if let Err(wait) = tokens.misses.take(Instant::now()) {
                            return match cached {
                                Some(c) if c.is_unexpired(t) => Ok(c.token),
                                _ => Err(TokenError::TooManyMisses {
                                    retry_after_secs: retry_after_secs(wait),
                                    burst: self.limit.burst(),
                                    per_sec: self.limit.per_sec(),
                                }),
                            };
                        }
                    }
                    cached
                }
                // A sandbox's endpoint is opened before it serves, so this
                // is a request that raced the sandbox's stop.
                None if caller == Caller::Sandbox => {
                    return Err(TokenError::NotServed(key.sandbox))
                }
                None => None,
            }
        };
        match self.mint_through_coordinator(key.clone()).await {
            Ok(token) => {
                if let Some((iat, exp)) = times(&token) {
                    if let Some(tokens) = self.sandboxes().get_mut(&key.sandbox) {
                        let minted = CachedToken {
                            token: token.clone(),
                            iat,
                            exp,
                        };
                        tokens.cache.insert(cache_key, minted, now());
                    }
                }
                Ok(token)
            }
            Err(e) => match cached {
                Some(c) if c.is_unexpired(now()) => Ok(c.token),
                _ => Err(TokenError::Mint(e)),
            },
        }
    }

    async fn mint_through_coordinator(&self, key: TokenKey) -> Result<String, CallError> {
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        let minted = match self.mint.send((key, tx)) {
            Ok(()) => rx.await.unwrap_or(Err(CallError::ShuttingDown)),
            Err(_) => Err(CallError::ShuttingDown),
        };
        self.metrics.token_minted(started.elapsed());
        minted
    }

    /// How many keys are cached for `sandbox` (None: not open).
    #[cfg(test)]
    fn cached_keys(&self, sandbox: &str) -> Option<usize> {
        self.sandboxes().get(sandbox).map(|t| t.cache.len())
    }
}

#[derive(Clone)]
struct Endpoint {
    sandbox: String,
    secret: String,
    broker: Broker,
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, msg: &str) -> Response {
    reply(status, serde_json::json!({ "error": msg }))
}

/// Why a token request's query was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("audience must be 1-{MAX_AUDIENCE_LEN} printable characters")]
    BadAudience,
    #[error("at most {MAX_AUDIENCES} audiences per token")]
    TooManyAudiences,
    #[error("ttl must be a positive number of seconds (clamped to 60..86400)")]
    BadTtl,
    #[error("unknown parameter {0:?} (use audience and ttl)")]
    UnknownParameter(String),
}

/// Parses `audience=…&audience=…&ttl=…`: distinct audiences in the order
/// given (at most [`MAX_AUDIENCES`]), and the ttl (0 when absent).
pub fn parse_query(query: Option<&str>) -> Result<(Vec<String>, u32), QueryError> {
    let mut audiences: Vec<String> = Vec::new();
    let mut ttl = 0u32;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "audience" => {
                if v.is_empty() || v.len() > MAX_AUDIENCE_LEN || v.chars().any(|c| c.is_control()) {
                    return Err(QueryError::BadAudience);
                }
                if !audiences.iter().any(|a| *a == v) {
                    if audiences.len() == MAX_AUDIENCES {
                        return Err(QueryError::TooManyAudiences);
                    }
                    audiences.push(v.into_owned());
                }
            }
            "ttl" => {
                ttl = match v.parse::<u32>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(QueryError::BadTtl),
                };
            }
            _ => return Err(QueryError::UnknownParameter(k.into_owned())),
        }
    }
    Ok((audiences, ttl))
}

async fn token(
    State(ep): State<Endpoint>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer $MIREN_IDENTITY_TOKEN_SECRET",
        );
    };
    let presented = auth
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("");
    if !identity::route_oidc::tokens_match(&ep.secret, presented.trim()) {
        return error(StatusCode::FORBIDDEN, "wrong token secret for this sandbox");
    }
    let (audiences, ttl) = match parse_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let key = TokenKey {
        sandbox: ep.sandbox.clone(),
        audiences,
        ttl,
    };
    match ep.broker.get_for_sandbox(key).await {
        Ok(t) => reply(StatusCode::OK, serde_json::json!({ "value": t })),
        Err(
            e @ TokenError::TooManyMisses {
                retry_after_secs, ..
            },
        ) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            r
        }
        Err(e @ (TokenError::NotServed(_) | TokenError::Mint(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
    }
}

/// Serves one sandbox's token endpoint on `listener` until the returned
/// task is aborted, and opens the sandbox in `broker` (its cache and miss
/// bucket). Path `/v1/token` (any other path is 404).
pub fn serve<L>(
    listener: L,
    sandbox: String,
    secret: String,
    broker: Broker,
) -> tokio::task::JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
    L::Addr: std::fmt::Debug,
{
    broker.open(&sandbox);
    let metrics = broker.metrics.clone();
    let ep = Endpoint {
        sandbox,
        secret,
        broker,
    };
    let app = Router::new()
        .route("/v1/token", axum::routing::any(token))
        .with_state(ep)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let metrics = metrics.clone();
                async move {
                    let resp = next.run(req).await;
                    metrics.token_request(resp.status().as_u16());
                    resp
                }
            },
        ));
    // Bounded: each held connection is a descriptor of the runner.
    let listener = crate::bounded_listener::Bounded::new(
        listener,
        crate::bounded_listener::MAX_CONNECTIONS,
        crate::bounded_listener::MAX_CONNECTION_LIFE,
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// Binds a loopback listener for a sandbox's endpoint.
pub async fn bind() -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Half the lifetime of a token we were handed (0 when unreadable).
pub fn half_life_secs(token: &str) -> i64 {
    times(token).map(|(iat, exp)| (exp - iat) / 2).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_limits::MAX_CACHED_KEYS;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn query_parsing() {
        assert_eq!(parse_query(None), Ok((vec![], 0)));
        assert_eq!(
            parse_query(Some("audience=a&audience=b&ttl=300")),
            Ok((vec!["a".into(), "b".into()], 300))
        );
        assert_eq!(
            parse_query(Some("audience=a&audience=a")),
            Ok((vec!["a".into()], 0))
        );
        assert_eq!(parse_query(Some("ttl=abc")), Err(QueryError::BadTtl));
        assert_eq!(parse_query(Some("ttl=0")), Err(QueryError::BadTtl));
        assert_eq!(parse_query(Some("ttl=-5")), Err(QueryError::BadTtl));
        assert_eq!(parse_query(Some("audience=")), Err(QueryError::BadAudience));
        assert_eq!(
            parse_query(Some("audience=a%0Ab")),
            Err(QueryError::BadAudience)
        );
        let long = format!("audience={}", "x".repeat(MAX_AUDIENCE_LEN + 1));
        assert_eq!(parse_query(Some(&long)), Err(QueryError::BadAudience));
        assert_eq!(
            parse_query(Some("aud=x")),
            Err(QueryError::UnknownParameter("aud".into()))
        );
    }

    fn audiences_query(n: usize) -> String {
        (0..n)
            .map(|i| format!("audience=a{i}"))
            .collect::<Vec<_>>()
            .join("&")
    }

    #[test]
    fn at_most_eight_distinct_audiences() {
        assert_eq!(MAX_AUDIENCES, 8);
        let (eight, _) = parse_query(Some(&audiences_query(8))).expect("8 audiences");
        assert_eq!(eight.len(), 8);
        assert_eq!(
            parse_query(Some(&audiences_query(9))),
            Err(QueryError::TooManyAudiences)
        );
        // Repeats are not audiences of their own.
        let repeated = format!("{}&audience=a0&audience=a7", audiences_query(8));
        assert_eq!(parse_query(Some(&repeated)).map(|q| q.0.len()), Ok(8));
        assert_eq!(
            QueryError::TooManyAudiences.to_string(),
            "at most 8 audiences per token"
        );
    }

    /// A JWT-shaped string with `iat`/`exp` the broker can read.
    fn fake_token(name: &str, iat: i64, exp: i64) -> String {
        use base64::Engine as _;
        let payload = serde_json::json!({"iat": iat, "exp": exp, "name": name}).to_string();
        format!(
            "h.{}.s",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload)
        )
    }

    /// A coordinator that mints a 600 s token for every request and counts
    /// them.
    fn fake_coordinator() -> (mpsc::UnboundedSender<MintRequest>, Arc<AtomicUsize>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<MintRequest>();
        let minted = Arc::new(AtomicUsize::new(0));
        let count = minted.clone();
        tokio::spawn(async move {
            while let Some((key, done)) = rx.recv().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let t = now();
                let name = format!("{}:{}:{n}", key.sandbox, key.audiences.join(","));
                let _ = done.send(Ok(fake_token(&name, t, t + 600)));
            }
        });
        (tx, minted)
    }

    fn key(sandbox: &str, audience: &str) -> TokenKey {
        TokenKey {
            sandbox: sandbox.into(),
            audiences: vec![audience.into()],
            ttl: 0,
        }
    }

    #[tokio::test]
    async fn cached_until_half_life_then_served_through_an_outage() {
        let (tx, mut rx) = mpsc::unbounded_channel::<MintRequest>();
        let broker = Broker::new(tx, MissLimit::default());
        broker.open("s");
        let key = TokenKey {
            sandbox: "s".into(),
            audiences: vec![],
            ttl: 0,
        };
        // A token issued long ago but not yet expired: past half-life.
        let t = now();
        let fake = fake_token("old", t - 3000, t + 600);
        let minter = tokio::spawn(async move {
            // First request succeeds, the second finds the coordinator down.
            if let Some((_, done)) = rx.recv().await {
                let _ = done.send(Ok(fake));
            }
            if let Some((_, done)) = rx.recv().await {
                let _ = done.send(Err(CallError::Unreachable));
            }
        });
        let first = broker.get_for_sandbox(key.clone()).await.unwrap();
        // Past half-life: the broker asks again, fails, serves the cached one.
        let second = broker.get_for_sandbox(key.clone()).await.unwrap();
        assert_eq!(first, second);
        minter.await.unwrap();
    }

    /// Gives `sandbox` a full bucket whose clock stands an hour ahead: until
    /// then no `now` refills it (time going backwards adds nothing), so
    /// what it allows does not depend on how fast the test runs.
    fn freeze_bucket(broker: &Broker, sandbox: &str, limit: MissLimit) {
        let ahead = Instant::now() + std::time::Duration::from_secs(3600);
        let mut sandboxes = broker.sandboxes();
        let tokens = sandboxes.get_mut(sandbox).expect("sandbox open");
        tokens.misses = MissBucket::full(limit, ahead);
    }

    #[tokio::test]
    async fn over_the_miss_limit_a_sandbox_gets_429_but_cached_tokens_and_its_token_file() {
        let (tx, minted) = fake_coordinator();
        let limit = MissLimit::new(3, 1).expect("valid");
        let broker = Broker::new(tx, limit);
        broker.open("s");
        freeze_bucket(&broker, "s", limit);
        let kept = broker
            .get_for_sandbox(key("s", "kept"))
            .await
            .expect("first miss");
        for i in 0..2 {
            broker
                .get_for_sandbox(key("s", &format!("new{i}")))
                .await
                .expect("within the burst");
        }
        assert_eq!(
            broker.get_for_sandbox(key("s", "one too many")).await,
            Err(TokenError::TooManyMisses {
                retry_after_secs: 1,
                burst: 3,
                per_sec: 1
            })
        );
        assert_eq!(minted.load(Ordering::SeqCst), 3);
        // A cached key is served while limited, without minting.
        assert_eq!(broker.get_for_sandbox(key("s", "kept")).await, Ok(kept));
        assert_eq!(minted.load(Ordering::SeqCst), 3);
        // The runner's own path (the token file) is not starved.
        let file = broker.get(key("s", "token-file")).await;
        assert!(file.is_ok(), "{file:?}");
        assert_eq!(minted.load(Ordering::SeqCst), 4);
        // ... and takes nothing from the sandbox's bucket: still limited,
        // with the same wait.
        assert!(matches!(
            broker.get_for_sandbox(key("s", "still too many")).await,
            Err(TokenError::TooManyMisses {
                retry_after_secs: 1,
                ..
            })
        ));
        // Another sandbox has its own bucket.
        broker.open("other");
        assert!(broker.get_for_sandbox(key("other", "x")).await.is_ok());
    }

    #[tokio::test]
    async fn over_the_limit_an_unexpired_cached_token_is_served_like_in_an_outage() {
        let (tx, mut rx) = mpsc::unbounded_channel::<MintRequest>();
        let limit = MissLimit::new(1, 1).expect("valid");
        let broker = Broker::new(tx, limit);
        broker.open("s");
        freeze_bucket(&broker, "s", limit);
        let t = now();
        let stale = fake_token("stale", t - 3000, t + 600);
        let minter = tokio::spawn(async move {
            if let Some((_, done)) = rx.recv().await {
                let _ = done.send(Ok(stale));
            }
            // Whether anything more is asked of the coordinator.
            rx.recv().await.is_some()
        });
        let first = broker.get_for_sandbox(key("s", "a")).await.expect("minted");
        // Past half-life and the bucket is empty: the unexpired token, not 429.
        assert_eq!(broker.get_for_sandbox(key("s", "a")).await, Ok(first));
        // Without one cached, 429.
        assert!(matches!(
            broker.get_for_sandbox(key("s", "b")).await,
            Err(TokenError::TooManyMisses { .. })
        ));
        drop(broker);
        assert!(!minter.await.expect("minter"), "minted while limited");
    }

    #[tokio::test]
    async fn a_sandbox_caches_at_most_the_cap_of_keys() {
        let (tx, minted) = fake_coordinator();
        let limit = MissLimit::new(10 * MAX_CACHED_KEYS as u32, 1).expect("valid");
        let broker = Broker::new(tx, limit);
        broker.open("s");
        broker.open("quiet");
        broker
            .get_for_sandbox(key("quiet", "a"))
            .await
            .expect("minted");
        for i in 0..3 * MAX_CACHED_KEYS {
            broker
                .get_for_sandbox(key("s", &format!("a{i}")))
                .await
                .expect("within the burst");
            assert!(broker.cached_keys("s").unwrap_or(0) <= MAX_CACHED_KEYS);
        }
        assert_eq!(broker.cached_keys("s"), Some(MAX_CACHED_KEYS));
        // One sandbox's churn evicts none of another's tokens.
        assert_eq!(broker.cached_keys("quiet"), Some(1));
        let before = minted.load(Ordering::SeqCst);
        broker
            .get_for_sandbox(key("quiet", "a"))
            .await
            .expect("cached");
        // The newest keys are cached, the oldest were evicted.
        let last = format!("a{}", 3 * MAX_CACHED_KEYS - 1);
        broker
            .get_for_sandbox(key("s", &last))
            .await
            .expect("cached");
        assert_eq!(minted.load(Ordering::SeqCst), before);
        broker
            .get_for_sandbox(key("s", "a0"))
            .await
            .expect("minted");
        assert_eq!(minted.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn a_stopped_sandbox_leaves_nothing_behind() {
        let (tx, minted) = fake_coordinator();
        let broker = Broker::new(tx, MissLimit::default());
        broker.open("s");
        broker.get_for_sandbox(key("s", "a")).await.expect("minted");
        assert_eq!(broker.cached_keys("s"), Some(1));
        broker.forget("s");
        assert_eq!(broker.cached_keys("s"), None);
        // Its endpoint, if a request still reaches it, gets nothing.
        assert_eq!(
            broker.get_for_sandbox(key("s", "a")).await,
            Err(TokenError::NotServed("s".into()))
        );
        // The runner's path still mints (a token file written as the sandbox
        // stops), but caches nothing for a sandbox that is gone.
        assert!(broker.get(key("s", "a")).await.is_ok());
        assert_eq!(broker.cached_keys("s"), None);
        assert_eq!(minted.load(Ordering::SeqCst), 2);
    }

    /// One HTTP/1.1 exchange: (status, headers lowercased, body).
    async fn http_get(addr: SocketAddr, target: &str) -> (u16, Vec<(String, String)>, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers, body.to_string())
    }

    #[tokio::test]
    async fn endpoint_answers_400_for_nine_audiences_and_429_with_retry_after() {
        let (tx, _minted) = fake_coordinator();
        let limit = MissLimit::new(2, 1).expect("valid");
        let broker = Broker::new(tx, limit);
        let (listener, addr) = bind().await.expect("bind");
        let server = serve(listener, "s".into(), "sekrit".into(), broker.clone());
        freeze_bucket(&broker, "s", limit);

        let (status, _, body) = http_get(addr, &format!("/v1/token?{}", audiences_query(9))).await;
        assert_eq!(status, 400, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"], "at most 8 audiences per token");

        let (status, _, body) = http_get(addr, "/v1/token?audience=kept").await;
        assert_eq!(status, 200, "{body}");
        let kept: serde_json::Value = serde_json::from_str(&body).expect("json");
        let (status, _, body) = http_get(addr, "/v1/token?audience=second").await;
        assert_eq!(status, 200, "{body}");
        let (status, headers, body) = http_get(addr, "/v1/token?audience=third").await;
        assert_eq!(status, 429, "{body}");
        let retry_after = headers
            .iter()
            .find(|(k, _)| k == "retry-after")
            .map(|(_, v)| v.as_str());
        assert_eq!(retry_after, Some("1"));
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let msg = v["error"].as_str().expect("an error message");
        assert!(
            msg.contains("retry after") && msg.contains("reuse"),
            "{msg}"
        );
        // The cached key is still served while limited.
        let (status, _, body) = http_get(addr, "/v1/token?audience=kept").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).expect("json"),
            kept
        );
        server.abort();
    }
}
