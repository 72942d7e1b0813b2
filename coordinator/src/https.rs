//! The coordinator's HTTPS side: the OIDC discovery document and the JWKS
//! that outside verifiers (AWS STS, Vault, any JWT library) fetch, and the
//! OAuth token endpoint (`crate::oauth`) the discovery document advertises.
//!
//! Served with axum on tokio-rustls, over TCP at the same host:port as the
//! QUIC listener unless `--https-listen` says otherwise. Paths are the
//! issuer's path plus `/.well-known/openid-configuration` and
//! `/.well-known/miren/jwks` (also at the root when the issuer has a path).
//! Like every TCP listener of the coordinator it keeps the limits of
//! [`crate::accept`]: anyone on the internet may connect here.

use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use identity::documents::{DISCOVERY_PATH, JWKS_PATH, WORKLOAD_CLAIMS_SUPPORTED};
use identity::{DiscoveryDocument, Jwks};
use tokio::net::TcpListener;

use crate::accept::ListenerLimits;
use crate::issuer::Issuer;
use crate::shutdown::Tasks;

/// The axum router of the issuer endpoints: the documents read only the
/// issuer (its URL and key ring); the token endpoint is `token_endpoint`.
pub fn router(issuer: Arc<Issuer>, token_endpoint: Arc<crate::oauth::TokenEndpoint>) -> Router {
    let prefix = issuer_path(issuer.url.as_str());
    let tokens = crate::oauth::router(token_endpoint, &prefix);
    let mut r = Router::new()
        .route(&format!("{prefix}{DISCOVERY_PATH}"), get(discovery))
        .route(&format!("{prefix}{JWKS_PATH}"), get(jwks));
    if !prefix.is_empty() {
        r = r
            .route(DISCOVERY_PATH, get(discovery))
            .route(JWKS_PATH, get(jwks));
    }
    r.fallback(not_found).with_state(issuer).merge(tokens)
}

/// The path part of an issuer URL, without a trailing slash ("" for none).
fn issuer_path(issuer: &str) -> String {
    let rest = issuer.strip_prefix("https://").unwrap_or(issuer);
    match rest.find('/') {
        Some(i) => rest[i..].trim_end_matches('/').to_string(),
        None => String::new(),
    }
}

fn json_response(issuer: &Issuer, body: Vec<u8>) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={}", issuer.jwks_max_age_secs)) {
        h.insert(header::CACHE_CONTROL, v);
    }
    resp
}

fn error_response(status: StatusCode, msg: &str) -> Response {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn discovery(AxumState(issuer): AxumState<Arc<Issuer>>) -> Response {
    let keys = match issuer.published(transport::clock::now_unix()) {
        Ok(keys) => keys,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let doc = DiscoveryDocument::new(&issuer.url, keys.iter(), WORKLOAD_CLAIMS_SUPPORTED)
        .with_token_endpoint(&issuer.url);
    match serde_json::to_vec(&doc) {
        Ok(body) => json_response(&issuer, body),
        Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "could not encode"),
    }
}

async fn jwks(AxumState(issuer): AxumState<Arc<Issuer>>) -> Response {
    let keys = match issuer.published(transport::clock::now_unix()) {
        Ok(keys) => keys,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    match serde_json::to_vec(&Jwks::from_keys(keys.iter()).to_json()) {
        Ok(body) => json_response(&issuer, body),
        Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "could not encode"),
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not found")
}

/// Serves `router` over TLS on `listener` until the coordinator shuts
/// down (`tasks`), within `limits`. HTTP/1.1 only: hyper has no header timeout for HTTP/2, and its
/// protocol sniffing (`auto`) runs before any timer does, while verifiers
/// fetching two small documents gain nothing from HTTP/2.
pub async fn serve(
    listener: TcpListener,
    mut tls: rustls::ServerConfig,
    router: Router,
    limits: ListenerLimits,
    tasks: Tasks,
) {
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let http = Arc::new(crate::accept::http1(&limits));
    crate::accept::accept_loop(
        "HTTPS",
        listener,
        Some(acceptor),
        limits,
        tasks,
        move |conn, remote| {
            // Handlers that limit per source read it as `ConnectInfo`.
            let service = TowerToHyperService::new(
                router
                    .clone()
                    .layer(axum::Extension(axum::extract::ConnectInfo(remote))),
            );
            let http = http.clone();
            async move {
                if let Err(e) = http.serve_connection(TokioIo::new(conn), service).await {
                    tracing::debug!(%remote, "HTTPS connection ended: {e}");
                }
            }
        },
    )
    .await;
}
