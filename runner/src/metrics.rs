//! The runner's Prometheus metrics and readiness.
//!
//! A runner counts what only it sees: the answers of its sandboxes' token
//! endpoints (by HTTP status), the time a token takes to come back from the
//! coordinator, its sandboxes by state, their restarts and OOM kills (from
//! the same reports it sends the coordinator), and whether it is connected
//! to its coordinator, which is also its readiness (`/readyz`: a runner
//! that cannot reach its coordinator cannot mint new tokens or take
//! sandboxes).
//!
//! Labels stay bounded: statuses are the few our endpoint answers, states
//! the supervisor's fixed words; never a sandbox id, an app or a token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use transport::ops::{Check, Readiness};

use crate::sandbox::{Report, SandboxState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// The states a sandbox can be in, as label values.
pub const STATES: [&str; 4] = ["starting", "healthy", "crashed", "failed"];

/// The label of a reported state: its word, none once stopped (it is no
/// longer counted).
fn state_label(state: SandboxState) -> Option<&'static str> {
    match state {
        SandboxState::Stopped => None,
        s => Some(s.as_str()),
    }
}

/// Every series of one runner.
#[derive(Debug)]
pub struct Metrics {
    enabled: bool,
    pub token_requests: Family<StatusLabel, Counter>,
    pub token_mint_seconds: Histogram,
    pub sandboxes: Family<StateLabel, Gauge>,
    pub restarts: Counter,
    pub oom_kills: Counter,
    pub connected: Gauge,
    connected_now: AtomicBool,
    /// Sandbox id -> its last state (to move the gauges; never a label).
    states: Mutex<HashMap<String, &'static str>>,
}

impl Metrics {
    /// Counting (`enabled`) or not (only readiness is kept).
    pub fn new(enabled: bool) -> Arc<Self> {
        let m = Metrics {
            enabled,
            token_requests: Family::default(),
            // 0.5 ms … ~8 s.
            token_mint_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            sandboxes: Family::default(),
            restarts: Counter::default(),
            oom_kills: Counter::default(),
            connected: Gauge::default(),
            connected_now: AtomicBool::new(false),
            states: Mutex::new(HashMap::new()),
        };
        for s in STATES {
            let _ = m.sandboxes.get_or_create(&StateLabel { state: s });
        }
        Arc::new(m)
    }

    /// The registry `/metrics` encodes (empty when not counting).
    pub fn registry(&self) -> Arc<Registry> {
        let mut r = Registry::default();
        if self.enabled {
            r.register(
                "miren_runner_token_requests",
                "Requests to the sandboxes' token endpoints, by HTTP status",
                self.token_requests.clone(),
            );
            r.register(
                "miren_runner_token_mint_seconds",
                "Time for a token the cache did not have to come back from the coordinator",
                self.token_mint_seconds.clone(),
            );
            r.register(
                "miren_runner_sandboxes",
                "Sandboxes on this runner, by state",
                self.sandboxes.clone(),
            );
            r.register(
                "miren_runner_sandbox_restarts",
                "Sandbox processes that exited and were started again (or given up on)",
                self.restarts.clone(),
            );
            r.register(
                "miren_runner_sandbox_oom_kills",
                "Sandbox processes killed for going over their memory limit",
                self.oom_kills.clone(),
            );
        }
        r.register(
            "miren_runner_coordinator_connected",
            "1 while this runner has a session with its coordinator",
            self.connected.clone(),
        );
        Arc::new(r)
    }

    /// A token endpoint answered.
    pub fn token_request(&self, status: u16) {
        if self.enabled {
            self.token_requests
                .get_or_create(&StatusLabel { status })
                .inc();
        }
    }

    /// A token came back (or did not) from the coordinator.
    pub fn token_minted(&self, elapsed: Duration) {
        if self.enabled {
            self.token_mint_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// A sandbox report on its way to the coordinator.
    pub fn report(&self, r: &Report) {
        if !self.enabled {
            return;
        }
        if matches!(r.state, SandboxState::Crashed | SandboxState::Failed) {
            if r.restarts > 0 && !r.last_exit.is_empty() {
                self.restarts.inc();
            }
            if crate::sandbox::is_out_of_memory_exit(&r.last_exit) {
                self.oom_kills.inc();
            }
        }
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let new = state_label(r.state);
        let old = match new {
            Some(s) => states.insert(r.id.clone(), s),
            None => states.remove(&r.id),
        };
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.sandboxes.get_or_create(&StateLabel { state: o }).dec();
        }
        if let Some(n) = new {
            self.sandboxes.get_or_create(&StateLabel { state: n }).inc();
        }
    }

    /// The session with the coordinator started or ended.
    pub fn set_connected(&self, on: bool) {
        self.connected_now.store(on, Ordering::Relaxed);
        self.connected.set(i64::from(on));
    }

    /// Ready while connected to the coordinator.
    pub fn readiness(self: &Arc<Self>) -> Readiness {
        let me = self.clone();
        Arc::new(move || {
            vec![if me.connected_now.load(Ordering::Relaxed) {
                Check::ok("coordinator")
            } else {
                Check::failed("coordinator", "not connected to the coordinator")
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, state: &str, restarts: u32, last_exit: &str) -> Report {
        Report {
            id: id.into(),
            state: SandboxState::parse(state).expect("a state word"),
            restarts,
            last_exit: last_exit.into(),
            ..Report::default()
        }
    }

    fn gauge(m: &Metrics, state: &'static str) -> i64 {
        m.sandboxes.get_or_create(&StateLabel { state }).get()
    }

    #[test]
    fn reports_move_sandboxes_between_states_and_count_restarts() {
        let m = Metrics::new(true);
        m.report(&report("a", "starting", 0, ""));
        m.report(&report("b", "starting", 0, ""));
        m.report(&report("a", "healthy", 0, ""));
        assert_eq!((gauge(&m, "starting"), gauge(&m, "healthy")), (1, 1));
        m.report(&report("a", "crashed", 1, "out of memory (limit 64MiB)"));
        m.report(&report("b", "crashed", 1, "exit status: 1"));
        assert_eq!(m.restarts.get(), 2);
        assert_eq!(m.oom_kills.get(), 1);
        assert_eq!((gauge(&m, "crashed"), gauge(&m, "healthy")), (2, 0));
        m.report(&report("a", "stopped", 1, ""));
        m.report(&report("b", "failed", 1, ""));
        assert_eq!((gauge(&m, "crashed"), gauge(&m, "failed")), (0, 1));
        let text = transport::ops::encode(&[m.registry()]).unwrap();
        assert!(
            text.contains("miren_runner_sandbox_oom_kills_total 1"),
            "{text}"
        );
        assert!(
            !text.contains("\"a\""),
            "a sandbox id became a label: {text}"
        );
    }

    #[test]
    fn ready_only_while_connected() {
        let m = Metrics::new(false);
        let ready = m.readiness();
        assert_eq!(transport::ops::verdict(&ready()).0, 503);
        m.set_connected(true);
        assert_eq!(transport::ops::verdict(&ready()).0, 200);
        // Not counting still reports the connection.
        let text = transport::ops::encode(&[m.registry()]).unwrap();
        assert!(
            text.contains("miren_runner_coordinator_connected 1"),
            "{text}"
        );
        assert!(!text.contains("token_requests"), "{text}");
    }
}
