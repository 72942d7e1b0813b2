//! When the coordinator renews the server certificate it holds itself.
//!
//! Every pinned client, runner and CI job verifies the server certificate
//! (chained to the pinned CA) on each handshake: the day it lapses the
//! whole cluster is unreachable, and restarting changes nothing unless
//! something issues a new one. This is the rule that decides, pure and with
//! `now` passed in, so the check at start and the periodic check while
//! running are the same function and tests need no clock.
//!
//! Rule: renew once at most a third of the lifetime the coordinator issues
//! is left (an expired certificate included), provided a new certificate
//! would end later than the current one. A certificate never outlives the
//! CA that signed it, so near the CA's own end a renewal gains nothing and
//! would only repeat; then the decision says the CA is the limit (replacing
//! the CA is not this rule's business).
//!
//! The lifetime is the one the coordinator issues now, not the current
//! certificate's own span: a certificate is backdated a few minutes for
//! clock skew (which would make a short span look a third gone at once),
//! and one made elsewhere (an older version, a test) is judged by what is
//! left of it.

/// What to do with the current server certificate at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Keep it; the rule asks for a renewal from `due_at` (Unix seconds) on.
    Keep {
        /// When a renewal becomes due, in Unix seconds.
        due_at: i64,
    },
    /// Issue a new certificate now, ending at `new_not_after`; `expired`
    /// says the current one has already lapsed.
    Renew {
        /// Whether the current certificate has already lapsed.
        expired: bool,
        /// The new certificate's end, in Unix seconds.
        new_not_after: i64,
    },
    /// It is due, but a new certificate would not end later than this one:
    /// the CA itself ends at `ca_not_after`.
    LimitedByCa {
        /// The CA's own end, in Unix seconds.
        ca_not_after: i64,
    },
}

/// Decides about a certificate ending at `not_after`, for a coordinator that
/// issues certificates of `lifetime_secs` signed by a CA ending at
/// `ca_not_after`.
pub fn server_certificate(
    not_after: i64,
    now: i64,
    lifetime_secs: i64,
    ca_not_after: i64,
) -> Renewal {
    let lifetime = lifetime_secs.max(1);
    let due_at = not_after.saturating_sub(lifetime / 3);
    if now < due_at {
        return Renewal::Keep { due_at };
    }
    let new_not_after = now.saturating_add(lifetime).min(ca_not_after);
    if new_not_after <= not_after {
        return Renewal::LimitedByCa { ca_not_after };
    }
    Renewal::Renew {
        expired: now >= not_after,
        new_not_after,
    }
}

/// How often a running coordinator asks [`server_certificate`]: a
/// thirtieth of the lifetime, between one second and one hour. An hour is
/// nothing against a year's certificate (renewed with four months left);
/// a test's 30-second certificate is checked every second.
pub fn check_every_secs(lifetime_secs: i64) -> u64 {
    (lifetime_secs / 30).clamp(1, 3600) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    const YEAR: i64 = 365 * DAY;
    const NOW: i64 = 1_700_000_000;
    const FAR: i64 = NOW + 10 * YEAR;

    #[test]
    fn a_fresh_certificate_is_kept_until_two_thirds_of_its_life() {
        let not_after = NOW + YEAR;
        let due_at = not_after - YEAR / 3;
        assert_eq!(
            server_certificate(not_after, NOW, YEAR, FAR),
            Renewal::Keep { due_at }
        );
        assert_eq!(
            server_certificate(not_after, due_at - 1, YEAR, FAR),
            Renewal::Keep { due_at }
        );
        assert_eq!(
            server_certificate(not_after, due_at, YEAR, FAR),
            Renewal::Renew {
                expired: false,
                new_not_after: due_at + YEAR
            }
        );
    }

    #[test]
    fn two_days_left_of_a_year_is_renewed() {
        assert_eq!(
            server_certificate(NOW + 2 * DAY, NOW, YEAR, FAR),
            Renewal::Renew {
                expired: false,
                new_not_after: NOW + YEAR
            }
        );
    }

    #[test]
    fn an_expired_certificate_is_renewed_and_said_so() {
        assert_eq!(
            server_certificate(NOW - DAY, NOW, YEAR, FAR),
            Renewal::Renew {
                expired: true,
                new_not_after: NOW + YEAR
            }
        );
    }

    #[test]
    fn a_short_lifetime_renews_at_its_own_thirds() {
        // The test hook: 30 s certificates, due with 10 s left.
        let not_after = NOW + 30;
        assert_eq!(
            server_certificate(not_after, NOW + 19, 30, FAR),
            Renewal::Keep { due_at: NOW + 20 }
        );
        assert!(matches!(
            server_certificate(not_after, NOW + 20, 30, FAR),
            Renewal::Renew { expired: false, .. }
        ));
        // A year's certificate is not cut short by a shorter lifetime.
        assert!(matches!(
            server_certificate(NOW + YEAR, NOW, 30, FAR),
            Renewal::Keep { .. }
        ));
    }

    #[test]
    fn a_renewal_never_outlives_the_ca_nor_repeats_at_its_end() {
        // The CA ends in 200 days: a renewal ends with it...
        let ca_end = NOW + 200 * DAY;
        assert_eq!(
            server_certificate(NOW + 10 * DAY, NOW, YEAR, ca_end),
            Renewal::Renew {
                expired: false,
                new_not_after: ca_end
            }
        );
        // ...and then there is nothing to gain until the CA is replaced.
        assert_eq!(
            server_certificate(ca_end, ca_end - 10 * DAY, YEAR, ca_end),
            Renewal::LimitedByCa {
                ca_not_after: ca_end
            }
        );
    }

    #[test]
    fn odd_inputs_do_not_overflow() {
        assert!(matches!(
            server_certificate(i64::MIN, i64::MAX, i64::MAX, i64::MAX),
            Renewal::LimitedByCa { .. } | Renewal::Renew { .. }
        ));
        assert!(matches!(
            server_certificate(NOW, NOW, 0, FAR),
            Renewal::Renew { .. }
        ));
    }

    #[test]
    fn checks_run_hourly_for_a_year_and_every_second_for_seconds() {
        assert_eq!(check_every_secs(YEAR), 3600);
        assert_eq!(check_every_secs(30), 1);
        assert_eq!(check_every_secs(90), 3);
        assert_eq!(check_every_secs(0), 1);
    }
}
