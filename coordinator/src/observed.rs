//! What runners have reported, and on which session: the "actual" half of
//! the control plane, kept in memory and never mistaken for the truth once
//! its source is gone.
//!
//! A report counts only while the runner session that sent it is live: when
//! a runner disconnects, everything it said becomes "unknown since then";
//! after a coordinator restart nothing is known until runners report again.
//! So `app status` never shows `healthy` from a report older than the
//! current session, and the ingress routes only to sandboxes whose health
//! was reported on a connection that is still up.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use crate::converge::Health;

/// The state a runner reports a sandbox in (`SandboxReport.state` on the
/// wire; the runner's own twin is `runner::sandbox::SandboxState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Started, not yet answering its health check.
    #[default]
    Starting,
    /// Its service accepts connections.
    Healthy,
    /// Its process exited; the runner starts it again after a delay.
    Crashed,
    /// The runner gave up on it (or refused to start it).
    Failed,
    /// Stopped; its runner no longer has it.
    Stopped,
}

impl SandboxState {
    /// Its word, as `app status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Healthy => "healthy",
            SandboxState::Crashed => "crashed",
            SandboxState::Failed => "failed",
            SandboxState::Stopped => "stopped",
        }
    }
}

impl From<schema::miren_capnp::SandboxState> for SandboxState {
    fn from(s: schema::miren_capnp::SandboxState) -> SandboxState {
        use schema::miren_capnp::SandboxState as Wire;
        match s {
            Wire::Starting => SandboxState::Starting,
            Wire::Healthy => SandboxState::Healthy,
            Wire::Crashed => SandboxState::Crashed,
            Wire::Failed => SandboxState::Failed,
            Wire::Stopped => SandboxState::Stopped,
        }
    }
}

impl From<SandboxState> for schema::miren_capnp::SandboxState {
    fn from(s: SandboxState) -> schema::miren_capnp::SandboxState {
        use schema::miren_capnp::SandboxState as Wire;
        match s {
            SandboxState::Starting => Wire::Starting,
            SandboxState::Healthy => Wire::Healthy,
            SandboxState::Crashed => Wire::Crashed,
            SandboxState::Failed => Wire::Failed,
            SandboxState::Stopped => Wire::Stopped,
        }
    }
}

/// What a runner said about one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SandboxReport {
    pub state: SandboxState,
    pub restarts: u32,
    pub address: String,
    pub last_log: String,
    /// Why the sandbox's last run ended, as its runner saw it.
    pub last_exit: String,
}

impl SandboxReport {
    /// The health the control plane acts on.
    pub fn health(&self) -> Health {
        match self.state {
            SandboxState::Healthy => Health::Healthy,
            // A start the runner refused (over its limits, an artifact it
            // would not unpack): its words are the reason.
            SandboxState::Failed if self.restarts == 0 && !self.last_log.is_empty() => {
                Health::Failed(self.last_log.clone())
            }
            SandboxState::Failed => Health::Failed(if self.last_log.is_empty() {
                format!("gave up after {} restarts", self.restarts)
            } else {
                format!(
                    "gave up after {} restarts; last log lines:\n{}",
                    self.restarts, self.last_log
                )
            }),
            SandboxState::Starting | SandboxState::Crashed => Health::Starting,
            SandboxState::Stopped => Health::Unknown,
        }
    }
}

/// A report with where and when it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub runner: String,
    pub session: u64,
    pub at_unix: i64,
    pub report: SandboxReport,
}

/// What `app status` shows for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Reported on the runner's live session.
    Reported(Reported),
    /// Nothing reported on a live session since this time (the runner's
    /// disconnection, or the coordinator's start).
    UnknownSince(i64),
}

/// A runner's full inventory, from its last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub session: u64,
    pub at_unix: i64,
    pub sandboxes: BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    reports: HashMap<String, Reported>,
    inventories: HashMap<String, Inventory>,
    /// Live session per runner.
    sessions: HashMap<String, u64>,
    /// When each runner's last session ended.
    lost_at: HashMap<String, i64>,
}

/// Reports and inventories by live session.
pub struct Observed {
    started_unix: i64,
    inner: Mutex<Inner>,
}

impl Observed {
    /// Nothing is known yet; `started_unix` is what unknown sandboxes are
    /// unknown since.
    pub fn new(started_unix: i64) -> Self {
        Observed {
            started_unix,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A runner's session began: what it reported before is stale until it
    /// reports again.
    pub fn session_started(&self, runner: &str, session: u64) {
        let mut g = self.inner();
        g.sessions.insert(runner.to_string(), session);
        g.reports
            .retain(|_, r| r.runner != runner || r.session == session);
        g.inventories.remove(runner);
    }

    /// A runner's session ended (only that session: a newer one may already
    /// have replaced it).
    pub fn session_ended(&self, runner: &str, session: u64, now: i64) {
        let mut g = self.inner();
        if g.sessions.get(runner) == Some(&session) {
            g.sessions.remove(runner);
            g.lost_at.insert(runner.to_string(), now);
            g.reports.retain(|_, r| r.runner != runner);
            g.inventories.remove(runner);
        }
    }

    /// Records a report; ignored unless `session` is the runner's live one.
    pub fn report(
        &self,
        runner: &str,
        session: u64,
        sandbox: &str,
        report: SandboxReport,
        now: i64,
    ) {
        let mut g = self.inner();
        if g.sessions.get(runner) != Some(&session) {
            return;
        }
        if report.state == SandboxState::Stopped {
            g.reports.remove(sandbox);
            return;
        }
        g.reports.insert(
            sandbox.to_string(),
            Reported {
                runner: runner.to_string(),
                session,
                at_unix: now,
                report,
            },
        );
    }

    /// Records that `runner` refused to start `sandbox` (on its live
    /// session): the sandbox is failed with the runner's words.
    pub fn start_refused(&self, runner: &str, sandbox: &str, message: &str, now: i64) {
        let session = self.inner().sessions.get(runner).copied();
        if let Some(session) = session {
            let report = SandboxReport {
                state: SandboxState::Failed,
                last_log: format!("the runner refused to start it: {message}"),
                ..Default::default()
            };
            self.report(runner, session, sandbox, report, now);
        }
    }

    /// Records a runner's full inventory; reports of sandboxes it no
    /// longer has are dropped. Returns whether the set differs from the one
    /// last recorded on this session (only then is there anything new to
    /// reconcile).
    pub fn inventory(
        &self,
        runner: &str,
        session: u64,
        sandboxes: BTreeSet<String>,
        now: i64,
    ) -> bool {
        let mut g = self.inner();
        if g.sessions.get(runner) != Some(&session) {
            return false;
        }
        let changed = g
            .inventories
            .get(runner)
            .is_none_or(|i| i.sandboxes != sandboxes);
        g.reports
            .retain(|id, r| r.runner != runner || sandboxes.contains(id));
        g.inventories.insert(
            runner.to_string(),
            Inventory {
                session,
                at_unix: now,
                sandboxes,
            },
        );
        changed
    }

    /// The runner's inventory on its live session, if one was received.
    pub fn inventory_of(&self, runner: &str) -> Option<Inventory> {
        self.inner().inventories.get(runner).cloned()
    }

    /// What is known of `sandbox`, assigned to `runner`.
    pub fn seen(&self, runner: &str, sandbox: &str) -> Seen {
        let g = self.inner();
        match g.reports.get(sandbox) {
            Some(r) if r.runner == runner => Seen::Reported(r.clone()),
            _ => Seen::UnknownSince(
                g.lost_at
                    .get(runner)
                    .copied()
                    .unwrap_or(self.started_unix)
                    .max(self.started_unix),
            ),
        }
    }

    /// The health the reconcile loop acts on.
    pub fn health(&self, runner: &str, sandbox: &str) -> Health {
        match self.seen(runner, sandbox) {
            Seen::Reported(r) => r.report.health(),
            Seen::UnknownSince(_) => Health::Unknown,
        }
    }

    /// Whether `sandbox` on `runner` is reported healthy on the runner's
    /// live session (the ingress asks per request: nothing is copied).
    pub fn is_healthy(&self, runner: &str, sandbox: &str) -> bool {
        self.inner()
            .reports
            .get(sandbox)
            .is_some_and(|r| r.runner == runner && r.report.state == SandboxState::Healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> SandboxReport {
        SandboxReport {
            state: SandboxState::Healthy,
            address: "unix:/x".into(),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_is_known_after_a_start_until_reported() {
        let o = Observed::new(100);
        assert_eq!(o.seen("r1", "s1"), Seen::UnknownSince(100));
        // A report from a session that is not live is ignored.
        o.report("r1", 7, "s1", healthy(), 101);
        assert_eq!(o.health("r1", "s1"), Health::Unknown);
        o.session_started("r1", 7);
        o.report("r1", 7, "s1", healthy(), 102);
        assert_eq!(o.health("r1", "s1"), Health::Healthy);
        assert!(o.is_healthy("r1", "s1"));
        // Another runner claiming it does not make it healthy there.
        assert_eq!(o.health("r2", "s1"), Health::Unknown);
    }

    #[test]
    fn a_lost_session_makes_its_reports_unknown_since_then() {
        let o = Observed::new(100);
        o.session_started("r1", 1);
        o.report("r1", 1, "s1", healthy(), 101);
        // A newer session already replaced it: ending the old one changes
        // nothing.
        o.session_started("r1", 2);
        assert_eq!(
            o.health("r1", "s1"),
            Health::Unknown,
            "stale until re-reported"
        );
        o.report("r1", 2, "s1", healthy(), 103);
        o.session_ended("r1", 1, 104);
        assert_eq!(o.health("r1", "s1"), Health::Healthy);
        o.session_ended("r1", 2, 105);
        assert_eq!(o.seen("r1", "s1"), Seen::UnknownSince(105));
        assert!(!o.is_healthy("r1", "s1"));
    }

    #[test]
    fn inventories_drop_reports_of_sandboxes_gone_and_stopped_reports_clear() {
        let o = Observed::new(0);
        o.session_started("r1", 1);
        o.report("r1", 1, "a", healthy(), 1);
        o.report("r1", 1, "b", healthy(), 1);
        o.inventory("r1", 1, BTreeSet::from(["a".to_string()]), 2);
        assert_eq!(o.health("r1", "b"), Health::Unknown);
        assert_eq!(o.inventory_of("r1").unwrap().sandboxes.len(), 1);
        o.report(
            "r1",
            1,
            "a",
            SandboxReport {
                state: SandboxState::Stopped,
                ..Default::default()
            },
            3,
        );
        assert_eq!(o.health("r1", "a"), Health::Unknown);
        o.inventory("r1", 9, BTreeSet::new(), 4);
        assert_eq!(
            o.inventory_of("r1").unwrap().at_unix,
            2,
            "wrong session ignored"
        );
    }

    #[test]
    fn a_failed_report_carries_its_reason() {
        let r = SandboxReport {
            state: SandboxState::Failed,
            restarts: 3,
            last_log: "boom".into(),
            ..Default::default()
        };
        match r.health() {
            Health::Failed(why) => assert!(why.contains("3 restarts") && why.contains("boom")),
            other => panic!("{other:?}"),
        }
    }
}
