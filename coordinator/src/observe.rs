//! One call per decision: [`Observe`] updates the metrics and writes the
//! audit line together, so the code that decides (service, ingress, route
//! OIDC, rollouts) carries one line per decision point and the bulk lives
//! here, in [`crate::metrics`] and in [`crate::audit`].
//!
//! Reasons become label values through fixed words only (see
//! [`CiRefusal`], [`join_refusal_reason`]); the audit line keeps
//! the full message (through [`crate::audit::Text`]).
//!
//! Lines about peers that have proven nothing (refused CI logins, token
//! requests, joins, route OIDC callbacks) are budgeted per source
//! ([`crate::audit_budget`]): over budget a line is left out and counted
//! (`miren_audit_suppressed_lines_total`), and an `audit.suppressed` line
//! says how many before the source's next line; the counters of the
//! decisions themselves count every request.
//!
//! With `miren server --no-observe` (hidden; for benchmarks that compare
//! the cost) nothing is counted or written.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use identity::bindings::Binding;

use crate::audit::{Actor, AuditLog, CiTokenFields, Event, Outcome, Text};
use crate::audit_budget::{AuditBudget, UnprovenEvent, Verdict};
use crate::metrics::{self, Metrics};
use crate::runners::{RegistryError, RunnerRecord};

/// Metrics and audit trail of one coordinator.
pub struct Observe {
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    enabled: bool,
    /// Set while the listeners accept (readiness).
    listening: AtomicBool,
    rotation_secs: i64,
    /// `not_after` of the cluster CA's server certificate (0: unknown).
    server_cert_not_after: AtomicI64,
    /// `not_after` of the operator's `--https-cert` (0: none).
    https_cert_not_after: AtomicI64,
    /// Signing key states last seen by [`Observe::watch_keys`].
    keys_seen: Mutex<Option<Vec<(String, crate::keyring::KeyState)>>>,
    /// What lines about unproven peers may still be written, per source.
    budget: Mutex<AuditBudget>,
}

/// Why a workload token was not minted (label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintRefusal {
    /// The runner asked for a sandbox it does not host (or none exists).
    NotHosted,
    /// Audiences, ttl or subject were not acceptable.
    BadRequest,
    /// No signing key is active (or the key ring is unavailable).
    NoActiveKey,
    /// Signing failed, or the store could not be read.
    Internal,
}

impl MintRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            MintRefusal::NotHosted => "not_hosted",
            MintRefusal::BadRequest => "bad_request",
            MintRefusal::NoActiveKey => "no_active_key",
            MintRefusal::Internal => "internal",
        }
    }
}

/// Why a CI login was refused (label values); `oidc::LoginError::refusal`
/// picks it by the error's variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiRefusal {
    /// A verified token that no binding of the app matches.
    NoBinding,
    /// A binding matches the token's names but pinned other ids.
    IdDrift,
    /// No binding names the token's issuer.
    UntrustedIssuer,
    /// The token is not a well-formed JWT (size, structure, claims).
    MalformedToken,
    /// The issuer's keys could not be had.
    IssuerUnavailable,
    /// The token has expired.
    Expired,
    /// The token is for another audience.
    WrongAudience,
    /// Anything else.
    InvalidToken,
    /// A token already traded once (its `jti` is spent).
    Replayed,
    /// Verified and matched, but its use could not be recorded now.
    Unrecorded,
}

impl CiRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            CiRefusal::NoBinding => "no_binding",
            CiRefusal::IdDrift => "id_drift",
            CiRefusal::UntrustedIssuer => "untrusted_issuer",
            CiRefusal::MalformedToken => "malformed_token",
            CiRefusal::IssuerUnavailable => "issuer_unavailable",
            CiRefusal::Expired => "expired",
            CiRefusal::WrongAudience => "wrong_audience",
            CiRefusal::InvalidToken => "invalid_token",
            CiRefusal::Replayed => "replayed",
            CiRefusal::Unrecorded => "unrecorded",
        }
    }
}

/// The label of a refused join.
pub fn join_refusal_reason(e: &RegistryError) -> &'static str {
    use identity::join_token::JoinRefusal;
    match e {
        RegistryError::Join(
            JoinRefusal::Missing | JoinRefusal::BadFormat | JoinRefusal::WrongKind { .. },
        ) => "malformed",
        RegistryError::Join(JoinRefusal::Unknown) => "unknown",
        RegistryError::Join(JoinRefusal::UsedOrRevoked) => "used_or_revoked",
        RegistryError::Join(JoinRefusal::Expired) => "expired",
        RegistryError::Pki(_)
        | RegistryError::BadName(_)
        | RegistryError::TooManyLabels
        | RegistryError::BadLabel { .. } => "bad_request",
        _ => "internal",
    }
}

/// What the audit trail keeps of a binding.
pub struct BindingSummary {
    pub app: String,
    pub issuer: String,
    pub subject: String,
}

impl BindingSummary {
    pub fn of(b: &Binding) -> Self {
        BindingSummary {
            app: b.app.clone(),
            issuer: b.issuer.clone(),
            subject: b.subject.clone(),
        }
    }
}

impl Observe {
    /// Metrics on, the audit trail under `audit_dir`.
    pub fn new(audit_dir: &std::path::Path, rotation: Duration) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let audit = AuditLog::open(audit_dir, metrics.audit.clone())?;
        Ok(Self::with(metrics, audit, true, rotation))
    }

    /// Nothing counted, nothing written.
    pub fn disabled() -> Self {
        Self::with(
            Arc::new(Metrics::default()),
            AuditLog::disabled(),
            false,
            Duration::ZERO,
        )
    }

    fn with(metrics: Arc<Metrics>, audit: AuditLog, enabled: bool, rotation: Duration) -> Self {
        Observe {
            metrics,
            audit,
            enabled,
            listening: AtomicBool::new(false),
            rotation_secs: rotation.as_secs() as i64,
            server_cert_not_after: AtomicI64::new(0),
            https_cert_not_after: AtomicI64::new(0),
            keys_seen: Mutex::new(None),
            budget: Mutex::new(AuditBudget::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn rotation_secs(&self) -> i64 {
        self.rotation_secs
    }

    pub fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::Relaxed);
    }

    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Records when the server certificate (and the operator's HTTPS
    /// certificate, if any) expire; call again after a renewal.
    pub fn set_certificates(&self, server_not_after: i64, https_not_after: Option<i64>) {
        self.server_cert_not_after
            .store(server_not_after, Ordering::Relaxed);
        self.https_cert_not_after
            .store(https_not_after.unwrap_or(0), Ordering::Relaxed);
    }

    /// Records a renewed server certificate's expiry.
    pub fn set_server_certificate(&self, not_after: i64) {
        self.server_cert_not_after
            .store(not_after, Ordering::Relaxed);
    }

    /// `(certificate, not_after)` of what is known.
    pub fn certificate_expiries(&self) -> Vec<(&'static str, i64)> {
        [
            ("server", self.server_cert_not_after.load(Ordering::Relaxed)),
            ("https", self.https_cert_not_after.load(Ordering::Relaxed)),
        ]
        .into_iter()
        .filter(|(_, t)| *t != 0)
        .collect()
    }

    fn record(&self, actor: Actor, event: Event, outcome: Outcome) {
        if self.enabled {
            self.audit.record(actor, event, outcome);
        }
    }

    /// A line about a decision that a peer who may have proven nothing can
    /// repeat at will, from `source` (the peer address the listener
    /// accepted; `None` when unknown): written within the source's budget
    /// for `kind`, after a line saying how many were left out before;
    /// left out and counted over it.
    fn record_unproven(
        &self,
        source: Option<IpAddr>,
        kind: UnprovenEvent,
        (actor, event, outcome): (Actor, Event, Outcome),
    ) {
        if !self.enabled {
            return;
        }
        let verdict = match self.budget.lock() {
            Ok(mut b) => b.admit(&actor, outcome, source, kind, Instant::now()),
            // A poisoned budget must not lose the trail: write.
            Err(_) => Verdict::Write(Vec::new()),
        };
        match verdict {
            Verdict::LeaveOut => {
                self.metrics
                    .audit_suppressed
                    .get_or_create(&metrics::EventLabel {
                        event: kind.as_str(),
                    })
                    .inc();
            }
            Verdict::Write(reports) => {
                for r in reports {
                    self.audit.record(
                        Actor::Anonymous,
                        Event::AuditSuppressed {
                            source: Text::new(&r.origin.to_string()),
                            event: r.event.as_str(),
                            count: r.count,
                        },
                        Outcome::Refused,
                    );
                }
                self.audit.record(actor, event, outcome);
            }
        }
    }

    /// An audit line for a change that has no counter (route and binding
    /// changes, runner removal).
    pub fn changed(&self, actor: &Actor, event: Event) {
        self.record(actor.clone(), event, Outcome::Ok);
    }

    /// A workload token was minted.
    pub fn token_minted(&self, actor: &Actor, claims: &identity::WorkloadClaims, started: Instant) {
        if !self.enabled {
            return;
        }
        let m = &self.metrics;
        m.mint_seconds.observe(started.elapsed().as_secs_f64());
        let (via, runner) = match actor {
            Actor::Runner(id) => ("runner", Some(Text::new(id))),
            _ => ("admin", None),
        };
        m.tokens_minted
            .get_or_create(&metrics::ViaLabel { via })
            .inc();
        self.record(
            actor.clone(),
            Event::TokenMinted {
                app: Text::new(&claims.app),
                sub: Text::new(&claims.sub),
                aud: claims.aud.iter().map(|a| Text::new(a)).collect(),
                jti: Text::new(&claims.jti),
                exp: claims.exp,
                runner,
            },
            Outcome::Ok,
        );
    }

    /// A workload token was refused; returns `err` (for `map_err`).
    pub fn token_refused<E: std::fmt::Display>(
        &self,
        actor: &Actor,
        sandbox: Option<&str>,
        why: MintRefusal,
        err: E,
    ) -> E {
        if self.enabled {
            self.metrics
                .tokens_refused
                .get_or_create(&metrics::ReasonLabel {
                    reason: why.as_str(),
                })
                .inc();
            let runner = match actor {
                Actor::Runner(id) => Some(Text::new(id)),
                _ => None,
            };
            self.record(
                actor.clone(),
                Event::TokenRefused {
                    sandbox: sandbox.map(Text::new),
                    runner,
                    reason: Text::new(&format!("{}: {err}", why.as_str())),
                },
                Outcome::Refused,
            );
        }
        err
    }

    /// A CI login from `source` was decided: accepted with a binding, or
    /// refused for a reason with the message the caller got.
    pub fn ci_login(
        &self,
        app: &str,
        seen: CiTokenFields,
        outcome: Result<&Binding, (CiRefusal, &dyn std::fmt::Display)>,
        source: Option<IpAddr>,
    ) {
        if !self.enabled {
            return;
        }
        let (result, reason, binding, actor) = match outcome {
            Ok(b) => (
                "accepted",
                "ok",
                Some(b.id.clone()),
                Actor::Ci(b.id.clone()),
            ),
            Err((why, _)) => ("refused", why.as_str(), None, Actor::Anonymous),
        };
        self.metrics
            .ci_logins
            .get_or_create(&metrics::ResultReason { result, reason })
            .inc();
        let line = (
            actor,
            Event::CiLogin {
                app: Text::new(app),
                issuer: Text::new(&seen.issuer),
                subject: Text::new(&seen.subject),
                repository: seen.repository.as_deref().map(Text::new),
                binding: binding.as_deref().map(Text::new),
                jti: seen.jti.as_deref().map(Text::new),
                reason: outcome
                    .err()
                    .map(|(_, e)| Text::new(&format!("{reason}: {e}"))),
            },
            if outcome.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Refused
            },
        );
        self.record_unproven(source, UnprovenEvent::CiLogin, line);
    }

    /// The token endpoint issued a token to `actor`.
    pub fn oauth_token(&self, actor: Actor, event: Event) {
        self.record(actor, event, Outcome::Ok);
    }

    /// The token endpoint refused a request from `source` (`event` holds
    /// the refusal's RFC code and description).
    pub fn oauth_token_refused(&self, event: Event, source: Option<IpAddr>) {
        let line = (Actor::Anonymous, event, Outcome::Refused);
        self.record_unproven(source, UnprovenEvent::OAuthToken, line);
    }

    /// A fetch of a CI issuer's document (`discovery` or `jwks`).
    pub fn issuer_fetch(&self, document: &'static str, ok: bool) {
        if self.enabled {
            self.metrics
                .issuer_fetches
                .get_or_create(&metrics::DocumentResult {
                    document,
                    result: if ok { "ok" } else { "error" },
                })
                .inc();
        }
    }

    /// A join was decided; passes the result through.
    pub fn join<T>(
        &self,
        join_code: &str,
        remote: SocketAddr,
        result: Result<(RunnerRecord, T), RegistryError>,
    ) -> Result<(RunnerRecord, T), RegistryError> {
        if !self.enabled {
            return result;
        }
        let (labels, event, actor, outcome) = match &result {
            Ok((r, _)) => (
                metrics::ResultReason {
                    result: "redeemed",
                    reason: "ok",
                },
                Event::Join {
                    runner: Some(Text::new(&r.id)),
                    name: Some(Text::new(&r.name)),
                    join_code: Some(Text::new(join_code)),
                    remote: Text::new(&remote.to_string()),
                    reason: None,
                },
                Actor::Runner(r.id.clone()),
                Outcome::Ok,
            ),
            Err(e) => (
                metrics::ResultReason {
                    result: "refused",
                    reason: join_refusal_reason(e),
                },
                Event::Join {
                    runner: None,
                    name: None,
                    join_code: (!join_code.is_empty()).then(|| Text::new(join_code)),
                    remote: Text::new(&remote.to_string()),
                    reason: Some(Text::new(&e.to_string())),
                },
                Actor::Anonymous,
                Outcome::Refused,
            ),
        };
        self.metrics.joins.get_or_create(&labels).inc();
        let line = (actor, event, outcome);
        self.record_unproven(Some(remote.ip()), UnprovenEvent::RunnerJoin, line);
        result
    }

    /// A coordinator code spent or refused (`Cluster.joinCoordinator`).
    pub fn coordinator_join<E: std::fmt::Display>(
        &self,
        join_code: &str,
        remote: SocketAddr,
        result: &Result<(), E>,
    ) {
        let (reason, outcome) = match result {
            Ok(()) => (None, Outcome::Ok),
            Err(e) => (Some(Text::new(&e.to_string())), Outcome::Refused),
        };
        let line = (
            Actor::Anonymous,
            Event::CoordinatorJoin {
                join_code: Text::new(join_code),
                remote: Text::new(&remote.to_string()),
                reason,
            },
            outcome,
        );
        self.record_unproven(Some(remote.ip()), UnprovenEvent::CoordinatorJoin, line);
    }

    pub fn runner_removed(&self, actor: &Actor, r: &RunnerRecord) {
        self.changed(
            actor,
            Event::RunnerRemoved {
                runner: Text::new(&r.id),
                name: Text::new(&r.name),
            },
        );
    }

    pub fn runner_cordoned(&self, actor: &Actor, r: &RunnerRecord) {
        self.changed(
            actor,
            Event::RunnerCordoned {
                runner: Text::new(&r.id),
                name: Text::new(&r.name),
                cordoned: r.cordoned,
            },
        );
    }

    pub fn binding_added(&self, actor: &Actor, id: &str, b: &BindingSummary) {
        self.changed(
            actor,
            Event::BindingAdded {
                binding: Text::new(id),
                app: Text::new(&b.app),
                issuer: Text::new(&b.issuer),
                subject: Text::new(&b.subject),
            },
        );
    }

    /// A rollout ended (counted by whether it succeeded; the reason is
    /// the caller's to record).
    pub fn rollout<T, E>(&self, outcome: &Result<T, E>) {
        if self.enabled {
            let result = if outcome.is_ok() {
                "succeeded"
            } else {
                "failed"
            };
            self.metrics
                .rollouts
                .get_or_create(&metrics::ResultLabel { result })
                .inc();
        }
    }

    /// One ingress request answered.
    pub fn ingress(&self, app: String, status: u16, elapsed: Duration) {
        let m = &self.metrics;
        m.ingress_seconds
            .get_or_create(&metrics::AppLabel { app: app.clone() })
            .observe(elapsed.as_secs_f64());
        m.ingress_requests
            .get_or_create(&metrics::IngressLabels {
                app,
                status: metrics::status_class(status),
            })
            .inc();
    }

    /// A request for our discovery document or JWKS answered.
    pub fn issuer_served(&self, document: &'static str, status: u16) {
        if self.enabled {
            self.metrics
                .issuer_served
                .get_or_create(&metrics::DocumentResult {
                    document,
                    result: metrics::status_class(status),
                })
                .inc();
        }
    }

    fn route_oidc_count(&self, event: &'static str, ok: bool) {
        self.metrics
            .route_oidc
            .get_or_create(&metrics::EventResult {
                event,
                result: if ok { "ok" } else { "refused" },
            })
            .inc();
    }

    /// A browser signed in at a protected route.
    pub fn route_oidc_login(&self, host: &str, provider: &str, subject: &str) {
        if self.enabled {
            self.route_oidc_count("login", true);
            self.record(
                Actor::Anonymous,
                Event::RouteOidcLogin {
                    host: Text::new(host),
                    provider: Text::new(provider),
                    subject: Some(Text::new(subject)),
                    reason: None,
                },
                Outcome::Ok,
            );
        }
    }

    /// A login callback from `source` was refused (status and the
    /// answer's text).
    pub fn route_oidc_login_refused(
        &self,
        host: &str,
        provider: &str,
        (status, why): (u16, &str),
        source: IpAddr,
    ) {
        if self.enabled {
            self.route_oidc_count("login", false);
            let line = (
                Actor::Anonymous,
                Event::RouteOidcLogin {
                    host: Text::new(host),
                    provider: Text::new(provider),
                    subject: None,
                    reason: Some(Text::new(&format!("{status}: {}", why.trim()))),
                },
                Outcome::Refused,
            );
            self.record_unproven(Some(source), UnprovenEvent::RouteOidcLogin, line);
        }
    }

    pub fn route_oidc_logout(&self, host: &str, provider: &str) {
        if self.enabled {
            self.route_oidc_count("logout", true);
            self.record(
                Actor::Anonymous,
                Event::RouteOidcLogout {
                    host: Text::new(host),
                    provider: Text::new(provider),
                },
                Outcome::Ok,
            );
        }
    }

    /// A session refresh: counted; a refused one is also audited.
    pub fn route_oidc_refresh<T, E: std::fmt::Display>(
        &self,
        host: &str,
        provider: &str,
        r: &Result<T, E>,
    ) {
        if !self.enabled {
            return;
        }
        self.route_oidc_count("refresh", r.is_ok());
        if let Err(e) = r {
            self.record(
                Actor::Anonymous,
                Event::RouteOidcRefresh {
                    host: Text::new(host),
                    provider: Text::new(provider),
                    reason: Text::new(&e.to_string()),
                },
                Outcome::Refused,
            );
        }
    }

    /// One RPC call served (from [`crate::metered::metered`]).
    pub fn rpc(
        &self,
        interface: &'static str,
        method: &'static str,
        ok: bool,
        actor: Option<Actor>,
        app: Option<String>,
    ) {
        self.metrics
            .rpc_calls
            .get_or_create(&metrics::RpcLabels {
                interface,
                method,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        if let Some(actor) = actor {
            if metrics::audited(interface, method) {
                self.record(
                    actor,
                    Event::Rpc {
                        interface,
                        method,
                        app: app.as_deref().map(Text::new),
                    },
                    if ok { Outcome::Ok } else { Outcome::Error },
                );
            }
        }
    }

    /// Audits signing key changes: a kid not seen before (created), a key
    /// that became active, one that was retired. The first call only
    /// remembers what exists.
    pub fn watch_keys(&self, statuses: &[crate::keyring::KeyStatus]) {
        use crate::keyring::KeyState;
        let Ok(mut seen) = self.keys_seen.lock() else {
            return;
        };
        let now: Vec<(String, KeyState)> =
            statuses.iter().map(|s| (s.kid.clone(), s.state)).collect();
        if let Some(before) = seen.as_ref() {
            for s in statuses {
                let was = before.iter().find(|(k, _)| *k == s.kid).map(|(_, st)| *st);
                if was.is_none() {
                    self.changed(
                        &Actor::Coordinator,
                        Event::KeyCreated {
                            kid: Text::new(&s.kid),
                            activates: s.activates_unix,
                        },
                    );
                }
                if s.state != KeyState::Pending && was.is_none_or(|w| w == KeyState::Pending) {
                    self.changed(
                        &Actor::Coordinator,
                        Event::KeyActivated {
                            kid: Text::new(&s.kid),
                        },
                    );
                }
            }
            // Retirements after activations: a successor takes over first.
            for s in statuses {
                let was = before.iter().find(|(k, _)| *k == s.kid).map(|(_, st)| *st);
                if matches!(s.state, KeyState::Retired | KeyState::Expired)
                    && was.is_some_and(|w| matches!(w, KeyState::Active | KeyState::Pending))
                {
                    self.changed(
                        &Actor::Coordinator,
                        Event::KeyRetired {
                            kid: Text::new(&s.kid),
                            unpublished_at: s.retires_unix,
                        },
                    );
                }
            }
        }
        *seen = Some(now);
    }
}

/// The observation of a coordinator: the audit trail under
/// `<data dir>/audit` (`rotation`: the signing key rotation age, for its
/// countdown), or nothing when not `enabled`.
pub fn start(
    data_dir: &std::path::Path,
    enabled: bool,
    rotation: Duration,
) -> anyhow::Result<Arc<Observe>> {
    use anyhow::Context as _;
    if !enabled {
        return Ok(Arc::new(Observe::disabled()));
    }
    let dir = data_dir.join("audit");
    let o = Observe::new(&dir, rotation)
        .with_context(|| format!("opening the audit trail in {}", dir.display()))?;
    Ok(Arc::new(o))
}

/// The store, timed per operation unless observation is off.
pub fn metered_store(
    store: Arc<dyn crate::store::Store>,
    observe: &Arc<Observe>,
) -> Arc<dyn crate::store::Store> {
    if !observe.enabled() {
        return store;
    }
    Arc::new(metrics::MeteredStore {
        inner: store,
        metrics: observe.metrics.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trail's lines, once `want` of them are written.
    fn lines_of(dir: &std::path::Path, want: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let page = crate::audit::read(
                dir,
                &crate::audit::Query {
                    limit: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
            let lines: Vec<serde_json::Value> = page
                .lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= want || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_flood_of_refusals_is_left_out_counted_and_said_while_admins_are_written() {
        use crate::audit_budget::BURST;
        let dir = tempfile::tempdir().unwrap();
        let o = Observe::new(dir.path(), Duration::from_secs(60)).unwrap();
        let source: IpAddr = "192.0.2.10".parse().unwrap();
        let refusal = || Event::OAuthToken {
            grant: "client_credentials",
            app: None,
            client: None,
            jti: None,
            exp: None,
            reason: Some(Text::new("invalid_client")),
        };
        let flood = BURST as usize + 50;
        for _ in 0..flood {
            o.oauth_token_refused(refusal(), Some(source));
            o.changed(
                &Actor::Admin("admin".into()),
                Event::RouteRemoved {
                    host: Text::new("a.example"),
                },
            );
        }
        let suppressed = o
            .metrics
            .audit_suppressed
            .get_or_create(&metrics::EventLabel {
                event: "oauth.token",
            })
            .get();
        let admitted = flood - suppressed as usize;
        assert!(admitted >= BURST as usize && suppressed > 0, "{admitted}");
        let lines = lines_of(dir.path(), flood + admitted);
        let count = |action: &str| lines.iter().filter(|l| l["action"] == action).count();
        assert_eq!(count("route.removed"), flood, "admins are never budgeted");
        assert_eq!(count("oauth.token"), admitted);
        assert_eq!(count("audit.suppressed"), 0, "said only with the next line");
        // The source's next line, after a refill, says what was left out.
        std::thread::sleep(crate::audit_budget::INTERVAL);
        o.oauth_token_refused(refusal(), Some(source));
        let lines = lines_of(dir.path(), flood + admitted + 2);
        let said: Vec<_> = lines
            .iter()
            .filter(|l| l["action"] == "audit.suppressed")
            .collect();
        assert_eq!(said.len(), 1, "{lines:#?}");
        assert_eq!(said[0]["source"], "192.0.2.10");
        assert_eq!(said[0]["event"], "oauth.token");
        assert_eq!(said[0]["count"], suppressed);
        assert_eq!(lines.last().unwrap()["action"], "oauth.token");
    }

    #[test]
    fn key_changes_are_audited_once() {
        use crate::keyring::{KeyState, KeyStatus};
        let dir = tempfile::tempdir().unwrap();
        let o = Observe::new(dir.path(), Duration::from_secs(60)).unwrap();
        let k = |kid: &str, state| KeyStatus {
            kid: kid.into(),
            alg: "RS256".into(),
            state,
            created_unix: 0,
            activates_unix: 10,
            retires_unix: None,
        };
        o.watch_keys(&[k("a", KeyState::Active)]);
        o.watch_keys(&[k("a", KeyState::Active), k("b", KeyState::Pending)]);
        o.watch_keys(&[k("a", KeyState::Active), k("b", KeyState::Pending)]);
        o.watch_keys(&[k("a", KeyState::Retired), k("b", KeyState::Active)]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let actions = loop {
            let page = crate::audit::read(
                dir.path(),
                &crate::audit::Query {
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
            let actions: Vec<String> = page
                .lines
                .iter()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    format!(
                        "{} {}",
                        v["action"].as_str().unwrap(),
                        v["kid"].as_str().unwrap()
                    )
                })
                .collect();
            if actions.len() >= 3 || Instant::now() > deadline {
                break actions;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            actions,
            ["key.created b", "key.activated b", "key.retired a"]
        );
    }
}
