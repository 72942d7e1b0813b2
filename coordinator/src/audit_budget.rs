//! The audit trail's budget for peers that have proven nothing.
//!
//! A refused CI login, token request, join or route OIDC callback is
//! something any stranger can repeat in a loop. Written one line each, such
//! a loop would fill the writer's bounded channel, so that an admin's
//! change or a mint arriving meanwhile is dropped, and push the older
//! history out through rotation, its own earlier actions with it. So the
//! lines of an anonymous refusal are budgeted per source (the peer address
//! the listener accepted, counted by [`source_key`]) and per
//! [`UnprovenEvent`]: [`BURST`] at once, then one per [`INTERVAL`]. A line
//! over budget is left out and counted; the next line admitted for that
//! source and event first reports how many were left out
//! ([`LeftOut`], written as an `audit.suppressed` line). A source that
//! never sends again keeps its last count in the counter only; counts of
//! more than [`MAX_SOURCES`] sources at once are pooled as
//! [`Origin::Others`], reported with the next line of that event.
//!
//! Lines about actors that proved something (an admin, a runner, a CI
//! pipeline whose binding matched, a deploy key that authenticated, a code
//! redeemed, a browser signed in) and lines of accepted decisions are never
//! budgeted.
//!
//! Pure: `now` is passed in; the IO is `crate::observe`'s.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::audit::{Actor, Outcome};
use crate::frontdoor::{source_key, RateLimiter};

/// Lines one source may have written at once, per event ...
pub const BURST: u32 = 20;
/// ... and then one every this long.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Sources whose budgets (and counts of lines left out) are remembered.
pub const MAX_SOURCES: usize = 4096;

/// The decisions about a peer that has proven nothing whose refusals are
/// budgeted (their fixed label words are the audit actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnprovenEvent {
    /// `ci.login` refused (a junk or unmatched OIDC token).
    CiLogin,
    /// `oauth.token` refused (a wrong client credential, a bad request).
    OAuthToken,
    /// `runner.join` refused (a bad join code).
    RunnerJoin,
    /// `coordinator.join` refused (a bad coordinator code).
    CoordinatorJoin,
    /// `routeoidc.login` refused (a bad or too frequent login callback).
    RouteOidcLogin,
}

impl UnprovenEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            UnprovenEvent::CiLogin => "ci.login",
            UnprovenEvent::OAuthToken => "oauth.token",
            UnprovenEvent::RunnerJoin => "runner.join",
            UnprovenEvent::CoordinatorJoin => "coordinator.join",
            UnprovenEvent::RouteOidcLogin => "routeoidc.login",
        }
    }
}

/// Where lines were left out from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// One source (an IPv4 address or an IPv6 /64).
    Source(IpAddr),
    /// Requests whose peer address was not known (one shared budget).
    Unknown,
    /// Sources not remembered one by one: more than [`MAX_SOURCES`] had
    /// lines left out at once.
    Others,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Source(ip) => write!(f, "{ip}"),
            Origin::Unknown => f.write_str("unknown"),
            Origin::Others => f.write_str("other sources"),
        }
    }
}

/// Lines of `event` from `origin` that were left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftOut {
    pub origin: Origin,
    pub event: UnprovenEvent,
    pub count: u64,
}

/// What to do with a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Write it, after a line for each report of lines left out before.
    Write(Vec<LeftOut>),
    /// Leave it out (it is counted, and reported with a later line).
    LeaveOut,
}

/// Whether a line is about a peer that has proven nothing: an anonymous
/// actor refused. Anything accepted proved something (a code, a matched
/// token, a sign-in at the provider).
pub fn budgeted(actor: &Actor, outcome: Outcome) -> bool {
    matches!(actor, Actor::Anonymous) && outcome != Outcome::Ok
}

type Key = (Option<IpAddr>, UnprovenEvent);

/// Budgets and counts of lines left out, per source and event.
#[derive(Debug)]
pub struct AuditBudget {
    limiter: RateLimiter<Key>,
    left_out: HashMap<Key, u64>,
    /// Lines left out of sources past [`MAX_SOURCES`], per event.
    others: HashMap<UnprovenEvent, u64>,
    max_sources: usize,
}

impl Default for AuditBudget {
    fn default() -> Self {
        AuditBudget::new(BURST, INTERVAL, MAX_SOURCES)
    }
}

impl AuditBudget {
    pub fn new(burst: u32, interval: Duration, max_sources: usize) -> Self {
        AuditBudget {
            limiter: RateLimiter::new(burst, interval, max_sources),
            left_out: HashMap::new(),
            others: HashMap::new(),
            max_sources: max_sources.max(1),
        }
    }

    /// Decides on a line of `event` by `actor` with `outcome`, from
    /// `source` (`None`: the address is not known) at `now`.
    pub fn admit(
        &mut self,
        actor: &Actor,
        outcome: Outcome,
        source: Option<IpAddr>,
        event: UnprovenEvent,
        now: Instant,
    ) -> Verdict {
        if !budgeted(actor, outcome) {
            return Verdict::Write(Vec::new());
        }
        let key = (source.map(source_key), event);
        if self.limiter.take(key, now).is_err() {
            if self.left_out.contains_key(&key) || self.left_out.len() < self.max_sources {
                *self.left_out.entry(key).or_default() += 1;
            } else {
                *self.others.entry(event).or_default() += 1;
            }
            return Verdict::LeaveOut;
        }
        let mut reports = Vec::new();
        if let Some(count) = self.left_out.remove(&key) {
            let origin = key.0.map_or(Origin::Unknown, Origin::Source);
            reports.push(LeftOut {
                origin,
                event,
                count,
            });
        }
        if let Some(count) = self.others.remove(&event) {
            reports.push(LeftOut {
                origin: Origin::Others,
                event,
                count,
            });
        }
        Verdict::Write(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn refused(
        b: &mut AuditBudget,
        source: Option<IpAddr>,
        event: UnprovenEvent,
        now: Instant,
    ) -> Verdict {
        b.admit(&Actor::Anonymous, Outcome::Refused, source, event, now)
    }

    #[test]
    fn a_source_gets_its_burst_then_one_per_interval() {
        let mut b = AuditBudget::new(3, Duration::from_secs(1), 16);
        let t = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(
                refused(&mut b, a, UnprovenEvent::OAuthToken, t),
                Verdict::Write(vec![])
            );
        }
        assert_eq!(
            refused(&mut b, a, UnprovenEvent::OAuthToken, t),
            Verdict::LeaveOut
        );
        // Another source, and another event of the same source, have their own.
        assert_eq!(
            refused(&mut b, ip("192.0.2.2"), UnprovenEvent::OAuthToken, t),
            Verdict::Write(vec![])
        );
        assert_eq!(
            refused(&mut b, a, UnprovenEvent::RunnerJoin, t),
            Verdict::Write(vec![])
        );
        // An IPv6 /64 is one source.
        let v6 = ip("2001:db8::1");
        for _ in 0..3 {
            refused(&mut b, v6, UnprovenEvent::CiLogin, t);
        }
        assert_eq!(
            refused(&mut b, ip("2001:db8::ffff"), UnprovenEvent::CiLogin, t),
            Verdict::LeaveOut
        );
        // One interval later, one more.
        let later = t + Duration::from_secs(1);
        assert!(matches!(
            refused(&mut b, a, UnprovenEvent::OAuthToken, later),
            Verdict::Write(_)
        ));
        assert_eq!(
            refused(&mut b, a, UnprovenEvent::OAuthToken, later),
            Verdict::LeaveOut
        );
    }

    #[test]
    fn what_was_left_out_is_reported_once_with_the_next_line_then_reset() {
        let mut b = AuditBudget::new(2, Duration::from_secs(1), 16);
        let t = Instant::now();
        let a = ip("198.51.100.7");
        let e = UnprovenEvent::CiLogin;
        refused(&mut b, a, e, t);
        refused(&mut b, a, e, t);
        for _ in 0..5 {
            assert_eq!(refused(&mut b, a, e, t), Verdict::LeaveOut);
        }
        let next = t + Duration::from_secs(1);
        assert_eq!(
            refused(&mut b, a, e, next),
            Verdict::Write(vec![LeftOut {
                origin: Origin::Source("198.51.100.7".parse().unwrap()),
                event: e,
                count: 5,
            }])
        );
        // Reported once: the next admitted line reports nothing.
        let after = next + Duration::from_secs(1);
        assert_eq!(refused(&mut b, a, e, after), Verdict::Write(vec![]));
        // Without an address: one shared budget, reported as unknown.
        refused(&mut b, None, e, t);
        refused(&mut b, None, e, t);
        assert_eq!(refused(&mut b, None, e, t), Verdict::LeaveOut);
        assert_eq!(
            refused(&mut b, None, e, next),
            Verdict::Write(vec![LeftOut {
                origin: Origin::Unknown,
                event: e,
                count: 1,
            }])
        );
    }

    #[test]
    fn proven_actors_and_accepted_decisions_are_never_budgeted() {
        let mut b = AuditBudget::new(1, Duration::from_secs(3600), 16);
        let t = Instant::now();
        let a = ip("203.0.113.9");
        let e = UnprovenEvent::OAuthToken;
        assert_eq!(refused(&mut b, a, e, t), Verdict::Write(vec![]));
        assert_eq!(refused(&mut b, a, e, t), Verdict::LeaveOut);
        let proven = [
            Actor::Admin("admin".into()),
            Actor::Runner("r1".into()),
            Actor::Ci("b1".into()),
            Actor::DeployKey("k1".into()),
            Actor::Coordinator,
        ];
        for actor in &proven {
            for outcome in [Outcome::Ok, Outcome::Refused, Outcome::Error] {
                for _ in 0..10 {
                    assert_eq!(
                        b.admit(actor, outcome, a, e, t),
                        Verdict::Write(vec![]),
                        "{actor:?}"
                    );
                }
            }
        }
        // An anonymous peer accepted proved something (a code, a sign-in).
        for _ in 0..10 {
            assert_eq!(
                b.admit(&Actor::Anonymous, Outcome::Ok, a, e, t),
                Verdict::Write(vec![])
            );
        }
        // ... and none of that spent or reported the stranger's budget.
        assert_eq!(refused(&mut b, a, e, t), Verdict::LeaveOut);
    }

    #[test]
    fn counts_past_the_remembered_sources_are_reported_as_others() {
        let mut b = AuditBudget::new(1, Duration::from_secs(3600), 2);
        let t = Instant::now();
        let e = UnprovenEvent::RunnerJoin;
        let sources: Vec<_> = (1..=4).map(|i| ip(&format!("192.0.2.{i}"))).collect();
        let mut reported = 0;
        let mut report = |v: Verdict| {
            if let Verdict::Write(reports) = v {
                reported += reports.iter().map(|r| r.count).sum::<u64>();
            }
        };
        for s in &sources {
            for _ in 0..3 {
                report(refused(&mut b, *s, e, t));
            }
        }
        assert!(b.left_out.len() <= 2);
        // The bookkeeping lost nothing: every line left out (two of each
        // source) is reported or still held.
        let held: u64 = b.left_out.values().sum::<u64>() + b.others.values().sum::<u64>();
        assert_eq!(held + reported, 8);
        let later = t + Duration::from_secs(3600);
        let Verdict::Write(reports) = refused(&mut b, ip("192.0.2.200"), e, later) else {
            panic!("a fresh source is admitted");
        };
        assert!(reports
            .iter()
            .any(|r| r.origin == Origin::Others && r.count > 0));
    }
}
