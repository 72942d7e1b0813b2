//! Reconnect delays: exponential, capped, with jitter so that many runners
//! cut off at once do not come back in lock-step.

use std::time::Duration;

/// First retry delay.
pub const BASE: Duration = Duration::from_millis(500);
/// Longest delay between attempts.
pub const CAP: Duration = Duration::from_secs(30);

/// Delay before retry number `attempt` (0-based); `jitter` in `[0, 1)` picks
/// a point in the upper half of the exponential window.
pub fn delay(attempt: u32, jitter: f64) -> Duration {
    let window = BASE
        .checked_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(CAP)
        .min(CAP);
    let jitter = jitter.clamp(0.0, 1.0);
    window / 2 + window.mul_f64(jitter / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps() {
        assert_eq!(delay(0, 0.0), Duration::from_millis(250));
        assert_eq!(delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(delay(2, 0.0), Duration::from_millis(1000));
        assert_eq!(delay(10, 0.0), CAP / 2);
        assert_eq!(delay(100, 0.999_999), CAP.mul_f64(0.5 + 0.999_999 / 2.0));
        assert!(delay(100, 1.0) <= CAP);
    }

    #[test]
    fn jitter_spreads_within_the_window() {
        let lo = delay(3, 0.0);
        let hi = delay(3, 0.99);
        assert!(hi > lo);
        assert!(hi <= BASE * 8);
    }
}
