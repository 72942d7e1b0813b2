//! The per-sandbox workload token endpoint and the minting proxy behind it.
//!
//! Each sandbox gets its own listener (`MIREN_IDENTITY_TOKEN_URL`) and its
//! own random secret: which sandbox asks is decided by which endpoint was
//! called, never by a source address or a claim in the request. Tokens come
//! from the coordinator (`issueWorkloadToken`); the runner holds no key. A
//! token is cached per (sandbox, audiences, ttl) until half its life has
//! passed, and an unexpired cached token is still served while the
//! coordinator is unreachable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::{mpsc, oneshot};
use transport::clock::now_unix as now;

/// Longest audience accepted, and most audiences per request.
const MAX_AUDIENCE_LEN: usize = 256;
const MAX_AUDIENCES: usize = 10;

/// A request for a token, as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub sandbox: String,
    pub audiences: Vec<String>,
    pub ttl: u32,
}

/// A minted token with its times.
#[derive(Debug, Clone)]
pub struct Cached {
    pub token: String,
    pub iat: i64,
    pub exp: i64,
}

/// Sent to the runner's RPC thread to mint through the coordinator.
pub type MintRequest = (TokenKey, oneshot::Sender<Result<String, String>>);

/// The cache and the channel to the minting proxy.
#[derive(Clone)]
pub struct Broker {
    cache: Arc<Mutex<HashMap<TokenKey, Cached>>>,
    mint: mpsc::UnboundedSender<MintRequest>,
}

/// Reads `iat` and `exp` from a JWT we were handed by the coordinator.
fn times(token: &str) -> Option<(i64, i64)> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((v["iat"].as_i64()?, v["exp"].as_i64()?))
}

impl Broker {
    pub fn new(mint: mpsc::UnboundedSender<MintRequest>) -> Self {
        Broker {
            cache: Arc::new(Mutex::new(HashMap::new())),
            mint,
        }
    }

    /// A token for `key`: fresh from the cache (under half-life), else
    /// minted; when minting fails, an unexpired cached token.
    pub async fn get(&self, key: TokenKey) -> Result<String, String> {
        let t = now();
        let cached = self.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        if let Some(c) = &cached {
            if t < c.iat + (c.exp - c.iat) / 2 {
                return Ok(c.token.clone());
            }
        }
        let (tx, rx) = oneshot::channel();
        let minted = match self.mint.send((key.clone(), tx)) {
            Ok(()) => rx
                .await
                .unwrap_or_else(|_| Err("runner is shutting down".into())),
            Err(_) => Err("runner is shutting down".into()),
        };
        match minted {
            Ok(token) => {
                if let Some((iat, exp)) = times(&token) {
                    if let Ok(mut c) = self.cache.lock() {
                        c.insert(
                            key,
                            Cached {
                                token: token.clone(),
                                iat,
                                exp,
                            },
                        );
                    }
                }
                Ok(token)
            }
            Err(e) => match cached {
                Some(c) if t < c.exp => Ok(c.token),
                _ => Err(e),
            },
        }
    }

    /// Forgets a sandbox's tokens.
    pub fn forget(&self, sandbox: &str) {
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|k, _| k.sandbox != sandbox);
        }
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

/// Parses `audience=…&audience=…&ttl=…`.
pub fn parse_query(query: Option<&str>) -> Result<(Vec<String>, u32), String> {
    let mut audiences = Vec::new();
    let mut ttl = 0u32;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "audience" => {
                if v.is_empty() || v.len() > MAX_AUDIENCE_LEN || v.chars().any(|c| c.is_control()) {
                    return Err("audience must be 1-256 printable characters".into());
                }
                if !audiences.contains(&v.to_string()) {
                    audiences.push(v.to_string());
                }
            }
            "ttl" => {
                ttl = match v.parse::<u32>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        return Err(
                            "ttl must be a positive number of seconds (clamped to 60..86400)"
                                .into(),
                        )
                    }
                };
            }
            _ => return Err(format!("unknown parameter {k:?} (use audience and ttl)")),
        }
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(format!("at most {MAX_AUDIENCES} audiences"));
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
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let key = TokenKey {
        sandbox: ep.sandbox.clone(),
        audiences,
        ttl,
    };
    match ep.broker.get(key).await {
        Ok(t) => reply(StatusCode::OK, serde_json::json!({ "value": t })),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("could not get a token: {e}"),
        ),
    }
}

/// Serves one sandbox's token endpoint on `listener` until the returned
/// task is aborted. Path `/v1/token` (any other path is 404).
pub fn serve<L>(
    listener: L,
    sandbox: String,
    secret: String,
    broker: Broker,
) -> tokio::task::JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let ep = Endpoint {
        sandbox,
        secret,
        broker,
    };
    let app = Router::new()
        .route("/v1/token", axum::routing::any(token))
        .with_state(ep);
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
        assert!(parse_query(Some("ttl=abc")).is_err());
        assert!(parse_query(Some("ttl=0")).is_err());
        assert!(parse_query(Some("ttl=-5")).is_err());
        assert!(parse_query(Some("audience=")).is_err());
        assert!(parse_query(Some("aud=x")).is_err());
        let many = (0..11)
            .map(|i| format!("audience=a{i}"))
            .collect::<Vec<_>>()
            .join("&");
        assert!(parse_query(Some(&many)).is_err());
    }

    #[tokio::test]
    async fn cached_until_half_life_then_served_through_an_outage() {
        let (tx, mut rx) = mpsc::unbounded_channel::<MintRequest>();
        let broker = Broker::new(tx);
        let key = TokenKey {
            sandbox: "s".into(),
            audiences: vec![],
            ttl: 0,
        };
        // A token issued long ago but not yet expired: past half-life.
        let t = now();
        let payload = serde_json::json!({"iat": t - 3000, "exp": t + 600}).to_string();
        use base64::Engine as _;
        let fake = format!(
            "h.{}.s",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload)
        );
        let minter = tokio::spawn(async move {
            // First request succeeds, the second finds the coordinator down.
            if let Some((_, done)) = rx.recv().await {
                let _ = done.send(Ok(fake));
            }
            if let Some((_, done)) = rx.recv().await {
                let _ = done.send(Err("coordinator unreachable".into()));
            }
        });
        let first = broker.get(key.clone()).await.unwrap();
        // Past half-life: the broker asks again, fails, serves the cached one.
        let second = broker.get(key.clone()).await.unwrap();
        assert_eq!(first, second);
        minter.await.unwrap();
    }
}
