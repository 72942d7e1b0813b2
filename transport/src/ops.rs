//! The operations endpoints the coordinator and runners share: `/metrics`
//! (Prometheus, through `prometheus-client`), `/healthz` and `/readyz`.
//!
//! They live here because both sides serve the same three paths the same
//! way, and this crate is the one both may depend on; what "ready" means is
//! theirs, handed in as [`Readiness`] closures. The metrics listener is
//! plain HTTP and off unless `--metrics-listen` is given: it serves counts,
//! never a secret, but bind it to an address only the monitoring network
//! reaches.
//!
//! `/healthz` answers 200 as long as the process serves HTTP at all (an
//! orchestrator restarts on failure); `/readyz` answers 200 only when every
//! check passes and 503 with the first failure otherwise (a load balancer
//! takes the instance out). Both answer a short JSON object.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// One readiness check's result: its name and why it fails, if it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What is checked (`store`, `signing key`, `coordinator`).
    pub name: &'static str,
    /// Why it fails; `None` when it passes.
    pub failure: Option<String>,
}

impl Check {
    /// A passing check.
    pub fn ok(name: &'static str) -> Self {
        Check {
            name,
            failure: None,
        }
    }

    /// A failing check, with a short reason.
    pub fn failed(name: &'static str, why: impl Into<String>) -> Self {
        Check {
            name,
            failure: Some(why.into()),
        }
    }

    /// From a result: `Err` fails with its text.
    pub fn from_result<E: std::fmt::Display>(name: &'static str, r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Check::ok(name),
            Err(e) => Check::failed(name, e.to_string()),
        }
    }
}

/// Computes checks on demand (called per `/readyz` request, on the
/// blocking pool: a check may read the store).
pub type Readiness = Arc<dyn Fn() -> Vec<Check> + Send + Sync>;

/// The readiness rule: ready when every check passes; otherwise 503 naming
/// the first failure (and listing every failing check).
pub fn verdict(checks: &[Check]) -> (u16, serde_json::Value) {
    let failing: Vec<&Check> = checks.iter().filter(|c| c.failure.is_some()).collect();
    match failing.first() {
        None => (
            200,
            serde_json::json!({
                "status": "ready",
                "checks": checks.iter().map(|c| c.name).collect::<Vec<_>>(),
            }),
        ),
        Some(first) => (
            503,
            serde_json::json!({
                "status": "unavailable",
                "reason": format!("{}: {}", first.name, first.failure.as_deref().unwrap_or("")),
                "failing": failing.iter().map(|c| c.name).collect::<Vec<_>>(),
            }),
        ),
    }
}

fn json(status: u16, body: serde_json::Value) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn ready(checks: Vec<Readiness>) -> Response {
    let results = tokio::task::spawn_blocking(move || {
        checks.iter().flat_map(|c| c()).collect::<Vec<Check>>()
    })
    .await
    .unwrap_or_else(|e| vec![Check::failed("readiness", e.to_string())]);
    let (status, body) = verdict(&results);
    json(status, body)
}

/// `/healthz` and `/readyz` only (the coordinator adds them to its HTTPS
/// listener).
pub fn health_router(checks: Vec<Readiness>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { json(200, serde_json::json!({ "status": "alive" })) }),
        )
        .route("/readyz", get(move || ready(checks.clone())))
}

/// The OpenMetrics text of several registries as one exposition (`--dev`
/// serves the coordinator's and its runner's together).
pub fn encode(registries: &[Arc<Registry>]) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    for r in registries {
        prometheus_client::encoding::text::encode_registry(&mut out, r)?;
    }
    prometheus_client::encoding::text::encode_eof(&mut out)?;
    Ok(out)
}

async fn metrics(registries: Arc<Vec<Arc<Registry>>>) -> Response {
    // Collectors may read the store: off the async workers.
    let encoded = tokio::task::spawn_blocking(move || encode(&registries)).await;
    match encoded {
        Ok(Ok(text)) => {
            let mut r = (StatusCode::OK, text).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        Ok(Err(_)) | Err(_) => json(
            500,
            serde_json::json!({ "error": "could not encode the metrics" }),
        ),
    }
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn router(registries: Vec<Arc<Registry>>, checks: Vec<Readiness>) -> Router {
    let registries = Arc::new(registries);
    health_router(checks).route("/metrics", get(move || metrics(registries.clone())))
}

/// The metrics listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("could not listen on TCP {addr} for metrics: {source} (use --metrics-listen to pick another address)")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener; the error names the flag.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("metrics listener stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let (s, body) = verdict(&[Check::ok("store"), Check::ok("signing key")]);
        assert_eq!(s, 200);
        assert_eq!(body["status"], "ready");
        let (s, body) = verdict(&[
            Check::ok("store"),
            Check::failed("signing key", "no active key"),
            Check::failed("listeners", "not serving"),
        ]);
        assert_eq!(s, 503);
        assert_eq!(body["reason"], "signing key: no active key");
        assert_eq!(
            body["failing"],
            serde_json::json!(["signing key", "listeners"])
        );
        // No check at all is ready (nothing to wait for).
        assert_eq!(verdict(&[]).0, 200);
    }

    #[test]
    fn several_registries_make_one_exposition() {
        use prometheus_client::metrics::counter::Counter;
        let mut a = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        a.register("miren_a", "a", c);
        let mut b = Registry::default();
        b.register("miren_b", "b", Counter::<u64>::default());
        let text = encode(&[Arc::new(a), Arc::new(b)]).unwrap();
        assert!(text.contains("miren_a_total 1"), "{text}");
        assert!(text.contains("miren_b_total 0"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
