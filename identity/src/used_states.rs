//! Replay protection for route OIDC logins: each login's `state` is
//! accepted once, and the memory of accepted ones is bounded.
//!
//! Pure: the caller passes `now` (Unix seconds) and each login's expiry.
//! The coordinator's login flow keeps one [`UsedStates`] behind a lock: it
//! asks [`UsedStates::is_used`] (a read) before the provider is asked, and
//! [`UsedStates::accept`]s a state only once the provider completed its
//! login, so a callback anyone can forge never fills the bound.

use std::collections::HashMap;

/// `state`s of finished logins, for replay protection, bounded.
#[derive(Debug)]
pub struct UsedStates {
    /// state -> the login's expiry (Unix seconds).
    states: HashMap<String, i64>,
    /// Size at which expired states are next pruned.
    prune_at: usize,
    max: usize,
}

/// Why a login's `state` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRefusal {
    /// This `state` was already used by a finished login (a replay).
    AlreadyUsed,
    /// `max` logins are in progress and none has expired.
    Full,
}

impl UsedStates {
    /// Remembers at most `max` unexpired states.
    pub fn new(max: usize) -> UsedStates {
        UsedStates {
            states: HashMap::new(),
            prune_at: 4096.min(max),
            max,
        }
    }

    /// Whether `state` was accepted for a login still valid at `now`: a
    /// read only, changing nothing. A state whose login expired by `now` is
    /// not counted (`accept` forgets those when it prunes; callers refuse
    /// expired logins before asking).
    pub fn is_used(&self, state: &str, now: i64) -> bool {
        self.states.get(state).is_some_and(|exp| *exp > now)
    }

    /// Accepts `state` (of a login valid until `exp`) once. Expired states
    /// are pruned now and then, and always before refusing for want of room.
    pub fn accept(&mut self, state: &str, exp: i64, now: i64) -> Result<(), StateRefusal> {
        if self.states.len() >= self.prune_at.min(self.max) {
            self.states.retain(|_, e| *e > now);
            self.prune_at = (self.states.len() * 2).max(4096);
        }
        if self.states.contains_key(state) {
            return Err(StateRefusal::AlreadyUsed);
        }
        if self.states.len() >= self.max {
            return Err(StateRefusal::Full);
        }
        self.states.insert(state.to_string(), exp);
        Ok(())
    }

    /// Takes back the acceptance of `state` (its use could not be recorded
    /// anywhere else, so it did not happen: the caller may try again).
    pub fn forget(&mut self, state: &str) {
        self.states.remove(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_accepted_once() {
        let mut used = UsedStates::new(10);
        assert_eq!(used.accept("s1", 100, 0), Ok(()));
        assert_eq!(used.accept("s1", 100, 1), Err(StateRefusal::AlreadyUsed));
    }

    #[test]
    fn a_forgotten_acceptance_can_be_made_again() {
        let mut used = UsedStates::new(10);
        assert_eq!(used.accept("s1", 100, 0), Ok(()));
        used.forget("s1");
        assert!(!used.is_used("s1", 1));
        assert_eq!(used.accept("s1", 100, 1), Ok(()));
        assert_eq!(used.accept("s1", 100, 2), Err(StateRefusal::AlreadyUsed));
    }

    #[test]
    fn is_used_reads_without_taking_a_state() {
        let mut used = UsedStates::new(2);
        // Asking, however often, takes no room and no state.
        for now in 0..10 {
            assert!(!used.is_used("s1", now));
        }
        assert_eq!(used.accept("s1", 100, 10), Ok(()));
        assert_eq!(used.accept("s2", 100, 10), Ok(()));
        // Accepted: used until its login expires, then no longer counted.
        assert!(used.is_used("s1", 11));
        assert!(used.is_used("s1", 99));
        assert!(!used.is_used("s1", 100));
        assert!(!used.is_used("s3", 11));
        // Asking about a third state while full changes nothing: s3 is
        // refused for want of room, not as used, and s1 stays used.
        assert!(!used.is_used("s3", 12));
        assert_eq!(used.accept("s3", 100, 12), Err(StateRefusal::Full));
        assert!(used.is_used("s1", 12));
        assert_eq!(used.accept("s1", 100, 12), Err(StateRefusal::AlreadyUsed));
    }

    #[test]
    fn used_states_are_bounded_and_room_comes_back_when_logins_expire() {
        let max = 10_000;
        let mut used = UsedStates::new(max);
        // Fill it with live logins (expiring at 600), growing past every
        // pruning point on the way.
        for i in 0..max {
            assert_eq!(used.accept(&format!("s{i}"), 600, 0), Ok(()), "{i}");
        }
        assert_eq!(used.accept("late", 600, 1), Err(StateRefusal::Full));
        // Once they have expired, a new login gets in: expired states are
        // pruned before refusing, whatever the next pruning point was.
        assert_eq!(used.accept("after", 1200, 601), Ok(()));
        // A replay of a state still in its login window is refused.
        assert_eq!(
            used.accept("after", 1200, 602),
            Err(StateRefusal::AlreadyUsed)
        );
    }
}
