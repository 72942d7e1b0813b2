//! When a sandbox whose process exited is started again, and when it is
//! crash-looping: the supervisor's one decision after an exit, pure and
//! tested here rather than inside the loop that waits on processes.
//!
//! The rule: every exit is a restart, after a delay that grows with the
//! number of exits ([`crate::backoff`], at most [`MAX_DELAY`]). A sandbox
//! that has exited [`FAIL_AFTER`] times without ever having been healthy is
//! crash-looping: it is reported `failed`, which is what makes the
//! coordinator stop its rollout (the old version keeps serving). It is
//! still started again after the delay until the coordinator stops it,
//! so a slow starter that was only late is not given up on by the runner.
//! Randomness (the backoff's jitter) is passed in.

use std::time::Duration;

use crate::sandbox::SandboxState;

/// Exits before the first healthy state after which a sandbox is
/// crash-looping.
pub const FAIL_AFTER: u32 = 3;

/// The longest wait before a restart.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// The backoff step stops growing at this many exits.
const MAX_STEP: u32 = 6;

/// What the supervisor has seen of one sandbox's runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// How many times its process exited (its restarts, as reported).
    pub exits: u32,
    /// Whether it was ever healthy.
    pub ever_healthy: bool,
}

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Report `crashed`; start it again after `after`.
    Restart {
        /// The wait before the next start.
        after: Duration,
    },
    /// Crash-looping: report `failed` (the coordinator stops the rollout);
    /// start it again after `after` until told to stop.
    CrashLooping {
        /// The wait before the next start.
        after: Duration,
    },
}

impl Verdict {
    /// The state to report.
    pub fn state(self) -> SandboxState {
        match self {
            Verdict::Restart { .. } => SandboxState::Crashed,
            Verdict::CrashLooping { .. } => SandboxState::Failed,
        }
    }

    /// The wait before the next start.
    pub fn restart_after(self) -> Duration {
        match self {
            Verdict::Restart { after } | Verdict::CrashLooping { after } => after,
        }
    }
}

impl History {
    /// The sandbox answered its health check.
    pub fn healthy(&mut self) {
        self.ever_healthy = true;
    }

    /// Its process exited: counts the exit and decides. `jitter` in
    /// `[0, 1)` spreads the delay (see [`crate::backoff::delay`]).
    pub fn exited(&mut self, jitter: f64) -> Verdict {
        self.exits = self.exits.saturating_add(1);
        let after = crate::backoff::delay(self.exits.min(MAX_STEP), jitter).min(MAX_DELAY);
        if !self.ever_healthy && self.exits >= FAIL_AFTER {
            Verdict::CrashLooping { after }
        } else {
            Verdict::Restart { after }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_never_healthy_is_crash_looping_at_the_third_exit() {
        let mut h = History::default();
        assert_eq!(h.exited(0.0).state(), SandboxState::Crashed);
        assert_eq!(h.exited(0.0).state(), SandboxState::Crashed);
        let third = h.exited(0.0);
        assert!(matches!(third, Verdict::CrashLooping { .. }));
        assert_eq!(third.state(), SandboxState::Failed);
        // It stays so, and is still restarted.
        assert!(matches!(h.exited(0.0), Verdict::CrashLooping { .. }));
        assert_eq!(h.exits, 4);
    }

    #[test]
    fn a_sandbox_that_was_healthy_once_only_crashes() {
        let mut h = History::default();
        h.exited(0.0);
        h.healthy();
        for _ in 0..10 {
            assert!(matches!(h.exited(0.5), Verdict::Restart { .. }));
        }
        assert_eq!(h.exits, 11);
    }

    #[test]
    fn the_wait_grows_with_the_exits_and_is_capped() {
        let mut h = History::default();
        let waits: Vec<Duration> = (0..8).map(|_| h.exited(0.0).restart_after()).collect();
        // The backoff's lower edge: 0.5 s, 1 s, 2 s, 4 s, then capped.
        assert_eq!(waits[0], Duration::from_millis(500));
        assert_eq!(waits[1], Duration::from_secs(1));
        assert_eq!(waits[2], Duration::from_secs(2));
        assert_eq!(waits[3], Duration::from_secs(4));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(waits[7], MAX_DELAY);
        // Jitter moves it within the window, never past the cap.
        let mut h = History {
            exits: 100,
            ever_healthy: true,
        };
        assert_eq!(h.exited(0.99).restart_after(), MAX_DELAY);
    }

    #[test]
    fn the_wait_is_the_backoff_of_the_exit_count() {
        for exits in 0..12u32 {
            for jitter in [0.0, 0.3, 0.99] {
                let mut h = History {
                    exits,
                    ever_healthy: false,
                };
                let expected =
                    crate::backoff::delay((exits + 1).min(6), jitter).min(Duration::from_secs(10));
                assert_eq!(h.exited(jitter).restart_after(), expected);
            }
        }
    }
}
