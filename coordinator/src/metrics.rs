//! The coordinator's Prometheus metrics (through `prometheus-client`).
//!
//! Counters and histograms are updated where decisions are made (through
//! [`crate::observe::Observe`]); what is a state rather than an event
//! (runners and sandboxes by state, seconds until the next signing-key
//! rotation and until the server certificate expires) is read from the
//! coordinator's own records at scrape time (`crate::scrape`), so it
//! cannot drift. Some pieces wrap what they measure instead of being
//! called: [`MeteredStore`] (store operation latency) here, and in
//! `crate::metered` every RPC call by interface and method and every
//! ingress request.
//!
//! **Labels stay bounded.** No label value is ever a token, a subject, a
//! jti, a sandbox or runner id, or any string a peer chose: reasons,
//! results and states are fixed words (a runner-reported sandbox state
//! outside the known set counts as `other`), RPC methods come from our
//! schema, and the one open-ended label, the ingress `app`, is the app of
//! a route the operator created (`-` when no route matched), so it is
//! bounded by the routes that exist.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::audit::AuditCounters;
use crate::store::{
    Committed, KeyValue, LeaseId, Outcome, RangePage, Revision, Store, StoreError, Txn, WatchStream,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViaLabel {
    /// `runner` (a sandbox's request) or `admin` (`miren identity token`).
    pub via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultReason {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DocumentResult {
    /// `discovery` or `jwks`.
    pub document: &'static str,
    /// `ok` or `error` (fetches); the HTTP status class (served).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngressLabels {
    pub app: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventResult {
    pub event: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// An audit action (`audit_budget::UnprovenEvent::as_str`).
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub interface: &'static str,
    pub method: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// `server` (the cluster CA's, QUIC and HTTPS by default) or `https`
    /// (`--https-cert`).
    pub certificate: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 0.5 ms … ~8 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

fn request_buckets() -> Histogram {
    // 1 ms … ~60 s.
    Histogram::new(exponential_buckets(0.001, 2.5, 13))
}

fn store_buckets() -> Histogram {
    // 20 µs … ~3.5 s.
    Histogram::new(exponential_buckets(0.00002, 3.0, 12))
}

/// Every series the coordinator updates as things happen.
#[derive(Debug)]
pub struct Metrics {
    pub tokens_minted: Family<ViaLabel, Counter>,
    pub tokens_refused: Family<ReasonLabel, Counter>,
    pub mint_seconds: Histogram,
    pub ci_logins: Family<ResultReason, Counter>,
    pub issuer_fetches: Family<DocumentResult, Counter>,
    pub issuer_served: Family<DocumentResult, Counter>,
    pub joins: Family<ResultReason, Counter>,
    pub rollouts: Family<ResultLabel, Counter>,
    pub ingress_requests: Family<IngressLabels, Counter>,
    pub ingress_seconds: HistogramFamily<AppLabel>,
    pub route_oidc: Family<EventResult, Counter>,
    pub rpc_calls: Family<RpcLabels, Counter>,
    pub store_seconds: HistogramFamily<OpLabel>,
    pub audit: AuditCounters,
    /// Audit lines about unproven peers left out over their budget.
    pub audit_suppressed: Family<EventLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            tokens_minted: Family::default(),
            tokens_refused: Family::default(),
            mint_seconds: latency_buckets(),
            ci_logins: Family::default(),
            issuer_fetches: Family::default(),
            issuer_served: Family::default(),
            joins: Family::default(),
            rollouts: Family::default(),
            ingress_requests: Family::default(),
            ingress_seconds: Family::new_with_constructor(request_buckets),
            route_oidc: Family::default(),
            rpc_calls: Family::default(),
            store_seconds: Family::new_with_constructor(store_buckets),
            audit: AuditCounters::default(),
            audit_suppressed: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every series (handles are shared: updating `self` updates
    /// what `registry` encodes).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "miren_workload_tokens_minted",
            "Workload tokens minted, by who asked (runner: a sandbox; admin: miren identity token)",
            self.tokens_minted.clone(),
        );
        r.register(
            "miren_workload_tokens_refused",
            "Workload token requests refused, by reason",
            self.tokens_refused.clone(),
        );
        r.register(
            "miren_workload_token_mint_seconds",
            "Time to build and sign one workload token",
            self.mint_seconds.clone(),
        );
        r.register(
            "miren_ci_logins",
            "CI logins (ciLogin), by result and reason",
            self.ci_logins.clone(),
        );
        r.register(
            "miren_oidc_issuer_fetches",
            "Fetches of CI issuers' discovery documents and JWKS, by result",
            self.issuer_fetches.clone(),
        );
        r.register(
            "miren_issuer_document_requests",
            "Requests for this cluster's discovery document and JWKS, by HTTP status class",
            self.issuer_served.clone(),
        );
        r.register(
            "miren_joins",
            "Runner joins, by result and reason",
            self.joins.clone(),
        );
        r.register(
            "miren_rollouts",
            "Rollouts finished, by result",
            self.rollouts.clone(),
        );
        r.register(
            "miren_ingress_requests",
            "Ingress requests, by routed app (- when no route matched) and status class",
            self.ingress_requests.clone(),
        );
        r.register(
            "miren_ingress_request_seconds",
            "Ingress request latency until the response head, by routed app",
            self.ingress_seconds.clone(),
        );
        r.register(
            "miren_route_oidc_events",
            "Route OIDC logins, refreshes and logouts, by result",
            self.route_oidc.clone(),
        );
        r.register(
            "miren_rpc_calls",
            "RPC calls served, by interface, method and result",
            self.rpc_calls.clone(),
        );
        r.register(
            "miren_store_operation_seconds",
            "Store operation latency, by operation",
            self.store_seconds.clone(),
        );
        r.register(
            "miren_audit_lines_written",
            "Audit trail lines written",
            self.audit.written.clone(),
        );
        r.register(
            "miren_audit_dropped_lines",
            "Audit trail lines dropped (the writer fell behind or the file could not be written)",
            self.audit.dropped.clone(),
        );
        r.register(
            "miren_audit_suppressed_lines",
            "Audit lines about peers that proved nothing left out over their per-source budget, by event",
            self.audit_suppressed.clone(),
        );
    }
}

/// The status class of an HTTP status (`2xx` …).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A sandbox state as a label value: the runner reports free text, so only
/// the known states pass.
pub fn sandbox_state_label(reported: &str) -> &'static str {
    match reported {
        "" => "pending",
        "starting" => "starting",
        "healthy" => "healthy",
        "crashed" => "crashed",
        "failed" => "failed",
        "stopped" => "stopped",
        _ => "other",
    }
}

/// Every label [`sandbox_state_label`] gives.
pub const SANDBOX_STATES: [&str; 7] = [
    "pending", "starting", "healthy", "crashed", "failed", "stopped", "other",
];

/// Seconds until the active signing key is replaced: until the pending key
/// activates when there is one, else until the active key reaches the
/// rotation age (`None` without an active key).
pub fn seconds_until_rotation(
    statuses: &[crate::keyring::KeyStatus],
    active_since: Option<i64>,
    rotation_secs: i64,
    now: i64,
) -> Option<i64> {
    use crate::keyring::KeyState;
    if let Some(p) = statuses.iter().find(|s| s.state == KeyState::Pending) {
        return Some(p.activates_unix - now);
    }
    active_since.map(|since| since + rotation_secs - now)
}

/// The store, timing every operation.
pub struct MeteredStore {
    pub inner: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
}

impl MeteredStore {
    fn time<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let r = f();
        self.metrics
            .store_seconds
            .get_or_create(&OpLabel { op })
            .observe(started.elapsed().as_secs_f64());
        r
    }
}

impl Store for MeteredStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.time("get", || self.inner.get(key))
    }
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.time("scan", || self.inner.scan(prefix))
    }
    fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        self.time("commit", || self.inner.commit(txn))
    }
    fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        self.time("count", || self.inner.count(prefix))
    }
    fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.time("get", || self.inner.get_kv(key))
    }
    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        self.time("range", || self.inner.range(prefix, after, limit))
    }
    fn txn(&self, txn: Txn) -> Result<Committed, StoreError> {
        self.time("commit", || self.inner.txn(txn))
    }
    fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision()
    }
    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, from)
    }
    fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError> {
        self.time("lease", || self.inner.grant_lease(ttl))
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease)
    }
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.time("lease", || self.inner.revoke_lease(lease))
    }
}

/// The interfaces of `miren.capnp` and their methods by ordinal, read from
/// the schema itself (so a new method is named without touching this file).
pub mod methods {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    const SCHEMA: &str = include_str!("../../schema/capnp/miren.capnp");

    /// `interface Name {` blocks: name -> method names by ordinal.
    pub fn parse(schema: &str) -> HashMap<&str, Vec<&str>> {
        let mut out: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut current: Option<&str> = None;
        for line in schema.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("interface ") {
                current = rest.split_whitespace().next();
                if let Some(name) = current {
                    out.entry(name).or_default();
                }
                continue;
            }
            if line.starts_with('}') {
                current = None;
                continue;
            }
            let Some(iface) = current else { continue };
            // `  name @N (…` at the interface's own indentation.
            let Some((name, rest)) = t.split_once(" @") else {
                continue;
            };
            if !line.starts_with("  ") || line.starts_with("   ") || name.contains(' ') {
                continue;
            }
            let Some(n) = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let methods = out.entry(iface).or_default();
            if methods.len() <= n {
                methods.resize(n + 1, "?");
            }
            methods[n] = name;
        }
        out
    }

    fn table() -> &'static HashMap<&'static str, Vec<&'static str>> {
        static T: OnceLock<HashMap<&'static str, Vec<&'static str>>> = OnceLock::new();
        T.get_or_init(|| parse(SCHEMA))
    }

    /// The name of method `ordinal` of `interface` (`?` when unknown).
    pub fn name(interface: &str, ordinal: u16) -> &'static str {
        table()
            .get(interface)
            .and_then(|m| m.get(ordinal as usize).copied())
            .unwrap_or("?")
    }
}

/// Which calls go to the audit trail: those that change something or hand
/// out a credential. Reads (listings, status, logs, the trail itself) do
/// not, or `miren logs -f` and `miren audit -f` would fill it.
pub fn audited(interface: &str, method: &str) -> bool {
    match interface {
        "Admin" => {
            !(method.starts_with("list")
                || matches!(
                    method,
                    "status" | "app" | "routeOidcShow" | "readAudit" | "verifyWorkloadToken"
                ))
        }
        "App" => matches!(method, "deploy" | "uploadArtifact"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_schema_has_a_name() {
        let t = methods::parse(include_str!("../../schema/capnp/miren.capnp"));
        for iface in [
            "Cluster",
            "Admin",
            "App",
            "RunnerSession",
            "RunnerAgent",
            "ArtifactUpload",
        ] {
            let m = t.get(iface).unwrap_or_else(|| panic!("{iface} not parsed"));
            assert!(!m.is_empty(), "{iface}");
            assert!(!m.contains(&"?"), "{iface}: a gap in the ordinals: {m:?}");
        }
        assert_eq!(methods::name("Admin", 0), "status");
        assert_eq!(methods::name("Cluster", 99), "?");
        assert_eq!(t["Admin"][14], "setRoute");
    }

    #[test]
    fn only_changes_and_credentials_are_audited() {
        for m in [
            "setRoute",
            "removeRunner",
            "mintWorkloadToken",
            "rotateSigningKey",
            "addCiBinding",
        ] {
            assert!(audited("Admin", m), "{m}");
        }
        for m in ["status", "listRunners", "readAudit", "app", "routeOidcShow"] {
            assert!(!audited("Admin", m), "{m}");
        }
        assert!(audited("App", "deploy"));
        assert!(!audited("App", "logs"));
        assert!(!audited("RunnerSession", "heartbeat"));
    }

    #[test]
    fn label_values_are_bounded() {
        assert_eq!(sandbox_state_label("healthy"), "healthy");
        assert_eq!(sandbox_state_label("anything a runner says"), "other");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "5xx");
    }

    #[test]
    fn rotation_countdown() {
        use crate::keyring::{KeyState, KeyStatus};
        let k = |state, activates| KeyStatus {
            kid: "k".into(),
            alg: "RS256".into(),
            state,
            created_unix: 0,
            activates_unix: activates,
            retires_unix: None,
        };
        // Only an active key: it is replaced at since + rotation.
        assert_eq!(
            seconds_until_rotation(&[k(KeyState::Active, 100)], Some(100), 1000, 600),
            Some(500)
        );
        // A pending key: when it activates.
        assert_eq!(
            seconds_until_rotation(
                &[k(KeyState::Active, 100), k(KeyState::Pending, 700)],
                Some(100),
                1000,
                600
            ),
            Some(100)
        );
        assert_eq!(seconds_until_rotation(&[], None, 1000, 600), None);
    }
}
