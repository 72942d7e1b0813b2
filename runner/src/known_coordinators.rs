//! Which coordinators a runner holds sessions with: the pure rule.
//!
//! The runner starts from the coordinators its join code named (or the
//! list it saved, see [`crate::state::DataDir::save_coordinators`]) and
//! learns the cluster's current set from `Cluster.info` (each running
//! coordinator lists every running one). A coordinator listed for the first
//! time gets a session; one no longer listed is forgotten only once it has
//! been missing from the lists for [`GONE_AFTER`] and has no live session,
//! and never the last one (a runner with no coordinator to try could never
//! come back). At most [`MAX_KNOWN`] are kept: the list comes from the
//! network.

use identity::address::{HostPort, MAX_ENDPOINTS};

/// How long a coordinator may be missing from the lists before it is
/// forgotten (if it has no live session then).
pub const GONE_AFTER_SECS: i64 = 120;
/// Most coordinators a runner keeps sessions with.
pub const MAX_KNOWN: usize = MAX_ENDPOINTS;

/// One known coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    endpoint: HostPort,
    /// Since when the lists no longer name it.
    missing_since: Option<i64>,
}

/// The coordinators a runner knows, in the order it learned them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownCoordinators {
    known: Vec<Known>,
}

fn same(a: &HostPort, b: &HostPort) -> bool {
    a.port == b.port && a.host.eq_ignore_ascii_case(&b.host)
}

impl KnownCoordinators {
    /// Starts from `endpoints` (duplicates dropped, at most [`MAX_KNOWN`]).
    pub fn new(endpoints: Vec<HostPort>) -> KnownCoordinators {
        let mut k = KnownCoordinators { known: Vec::new() };
        for e in endpoints {
            k.add(e, None);
        }
        k
    }

    fn add(&mut self, endpoint: HostPort, missing_since: Option<i64>) -> bool {
        if self.known.len() >= MAX_KNOWN || self.known.iter().any(|k| same(&k.endpoint, &endpoint))
        {
            return false;
        }
        self.known.push(Known {
            endpoint,
            missing_since,
        });
        true
    }

    /// Every known coordinator, in the order learned.
    pub fn endpoints(&self) -> Vec<HostPort> {
        self.known.iter().map(|k| k.endpoint.clone()).collect()
    }

    /// Takes in the list a coordinator gave at `now`; returns the
    /// coordinators new to this runner.
    pub fn listed(&mut self, list: &[HostPort], now: i64) -> Vec<HostPort> {
        for k in &mut self.known {
            if list.iter().any(|e| same(e, &k.endpoint)) {
                k.missing_since = None;
            } else {
                k.missing_since.get_or_insert(now);
            }
        }
        let mut added = Vec::new();
        for e in list {
            if self.add(e.clone(), None) {
                added.push(e.clone());
            }
        }
        added
    }

    /// Forgets, at `now`, the coordinators missing from the lists for
    /// [`GONE_AFTER_SECS`] that have no live session (`live` says which
    /// do), keeping at least one; returns them.
    pub fn forget_gone(&mut self, now: i64, live: impl Fn(&HostPort) -> bool) -> Vec<HostPort> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.known.len() {
            let k = &self.known[i];
            let expired = k
                .missing_since
                .is_some_and(|since| now - since >= GONE_AFTER_SECS);
            if expired && !live(&k.endpoint) && self.known.len() > 1 {
                gone.push(self.known.remove(i).endpoint);
            } else {
                i += 1;
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        let (host, port) = identity::address::split_host_port(s).unwrap();
        HostPort { host, port }
    }

    #[test]
    fn new_coordinators_are_learned_and_gone_ones_forgotten_only_when_silent_for_long() {
        let mut k = KnownCoordinators::new(vec![hp("a:1"), hp("A:1"), hp("b:1")]);
        assert_eq!(k.endpoints(), [hp("a:1"), hp("b:1")]);
        // "c" is new; "b" is no longer listed.
        assert_eq!(k.listed(&[hp("a:1"), hp("c:1")], 100), [hp("c:1")]);
        assert_eq!(
            k.listed(&[hp("a:1"), hp("c:1")], 110),
            Vec::<HostPort>::new()
        );
        // Not missing for long enough yet.
        assert!(k
            .forget_gone(100 + GONE_AFTER_SECS - 1, |_| false)
            .is_empty());
        // Long enough, but it still has a live session.
        assert!(k.forget_gone(100 + GONE_AFTER_SECS, |_| true).is_empty());
        assert_eq!(k.forget_gone(100 + GONE_AFTER_SECS, |_| false), [hp("b:1")]);
        assert_eq!(k.endpoints(), [hp("a:1"), hp("c:1")]);
        // Listed again: no longer missing.
        k.listed(&[hp("c:1")], 200);
        k.listed(&[hp("a:1"), hp("c:1")], 201);
        assert!(k.forget_gone(10_000, |_| false).is_empty());
    }

    #[test]
    fn the_last_coordinator_is_never_forgotten_and_the_list_is_bounded() {
        let mut k = KnownCoordinators::new(vec![hp("a:1"), hp("b:1")]);
        k.listed(&[hp("z:1")], 0);
        let gone = k.forget_gone(GONE_AFTER_SECS, |_| false);
        assert_eq!(gone, [hp("a:1"), hp("b:1")]);
        k.listed(&[], 0);
        assert!(k.forget_gone(GONE_AFTER_SECS * 10, |_| false).is_empty());
        assert_eq!(k.endpoints(), [hp("z:1")]);
        let many: Vec<HostPort> = (0..100).map(|i| hp(&format!("h{i}:1"))).collect();
        k.listed(&many, 1);
        assert_eq!(k.endpoints().len(), MAX_KNOWN);
    }
}
