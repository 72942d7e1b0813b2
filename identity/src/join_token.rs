//! Join tokens: their wire format and the rules for redeeming them.
//!
//! A token is `mren_` + base64url(JSON `{"v":1,"id","addr","fp","secret"}`):
//! it names the coordinator, pins its CA by fingerprint (so the join is not
//! trust-on-first-use) and carries a 256-bit secret. A code for another
//! coordinator to join the cluster ([`JoinKind::Coordinator`], from
//! `miren cluster coordinator-code`) has the same body behind `mrenc_`: a
//! runner code is never taken for a coordinator code, nor the reverse. The coordinator keeps
//! only SHA-256 of the secret. Redeeming is a pure decision on the stored
//! record, the presented secret and `now`; the store applies it atomically.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::address::{ClusterAddress, Fingerprint};

/// Prefix of every runner join token.
pub const PREFIX: &str = "mren_";
/// Prefix of every coordinator join code.
pub const COORDINATOR_PREFIX: &str = "mrenc_";

/// Who a join code admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// A runner (`miren runner --join`).
    Runner,
    /// Another coordinator of the cluster (`miren server --join`).
    Coordinator,
}

impl JoinKind {
    /// The prefix of its codes.
    pub fn prefix(self) -> &'static str {
        match self {
            JoinKind::Runner => PREFIX,
            JoinKind::Coordinator => COORDINATOR_PREFIX,
        }
    }

    /// Where its codes are used.
    pub fn used_with(self) -> &'static str {
        match self {
            JoinKind::Runner => "`miren runner --join`",
            JoinKind::Coordinator => "`miren server --etcd … --join`",
        }
    }
}
/// Default lifetime of a token.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Longest lifetime of a one-time token.
pub const MAX_ONE_TIME_TTL_SECS: u64 = 168 * 3600;
/// Longest lifetime of a reusable token.
pub const MAX_REUSABLE_TTL_SECS: u64 = 365 * 24 * 3600;
/// Longest accepted encoded token.
pub const MAX_TOKEN_LEN: usize = 2048;

/// Why a presented join token was refused. The messages are the ones users
/// see; they never say whether a token id exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No code was presented.
    #[error("join code is required")]
    Missing,
    /// The text is not a join code.
    #[error("invalid join code format")]
    BadFormat,
    /// A join code of the other kind: a runner's where a coordinator's is
    /// expected, or the reverse.
    #[error("this join code is for {}, not for {}", .found.used_with(), .expected.used_with())]
    WrongKind {
        /// The kind asked for here.
        expected: JoinKind,
        /// The kind the code is.
        found: JoinKind,
    },
    /// No code has this id, or its secret is wrong (the two are not told
    /// apart).
    #[error("invalid or expired join code")]
    Unknown,
    /// A one-time code was used already, or the code was revoked.
    #[error("join code has already been used or revoked")]
    UsedOrRevoked,
    /// The code's lifetime is over.
    #[error("join code has expired")]
    Expired,
}

/// Why a token could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenTtlError {
    /// A lifetime under one second.
    #[error("join code lifetime must be at least 1s")]
    TooShort,
    /// A one-time code asked to live longer than 168 h.
    #[error("a one-time join code lives at most 168h; use a shorter --ttl")]
    OneTimeTooLong,
    /// A reusable code asked to live longer than 8760 h.
    #[error("a reusable join code lives at most 8760h; use a shorter --ttl")]
    ReusableTooLong,
    /// A coordinator code asked to live longer than 24 h.
    #[error(
        "a coordinator code lives at most 24h (it opens the cluster's keys); use a shorter --ttl"
    )]
    CoordinatorTooLong,
}

/// The longest a coordinator code lives: whoever spends it receives the
/// cluster key, so it is kept shorter than a runner's one-time code.
pub const MAX_COORDINATOR_TTL_SECS: u64 = 24 * 3600;

/// Checks the lifetime of a new coordinator code.
pub fn check_coordinator_ttl(ttl_secs: u64) -> Result<u64, JoinTokenTtlError> {
    match ttl_secs {
        0 => Err(JoinTokenTtlError::TooShort),
        t if t > MAX_COORDINATOR_TTL_SECS => Err(JoinTokenTtlError::CoordinatorTooLong),
        t => Ok(t),
    }
}

/// Checks the lifetime of a new token.
pub fn check_ttl(ttl_secs: u64, reusable: bool) -> Result<u64, JoinTokenTtlError> {
    match (ttl_secs, reusable) {
        (0, _) => Err(JoinTokenTtlError::TooShort),
        (t, false) if t > MAX_ONE_TIME_TTL_SECS => Err(JoinTokenTtlError::OneTimeTooLong),
        (t, true) if t > MAX_REUSABLE_TTL_SECS => Err(JoinTokenTtlError::ReusableTooLong),
        (t, _) => Ok(t),
    }
}

/// A decoded join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Who it admits.
    pub kind: JoinKind,
    /// Public id of the token (what `runner token list/revoke` show).
    pub id: String,
    /// Coordinator address, always with the CA fingerprint.
    pub address: ClusterAddress,
    /// The 256-bit secret.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("address", &self.address.to_string())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    id: String,
    addr: String,
    fp: String,
    secret: String,
}

impl JoinToken {
    /// A token for `address` (which must carry a fingerprint) with a fresh
    /// id and the given secret.
    pub fn new(id: String, address: ClusterAddress, secret: [u8; 32]) -> Option<Self> {
        address.fingerprint?;
        Some(JoinToken {
            kind: JoinKind::Runner,
            id,
            address,
            secret,
        })
    }

    /// A coordinator code for `address` (which must carry a fingerprint).
    pub fn coordinator(id: String, address: ClusterAddress, secret: [u8; 32]) -> Option<Self> {
        Some(JoinToken {
            kind: JoinKind::Coordinator,
            ..Self::new(id, address, secret)?
        })
    }

    /// `mren_…` (or `mrenc_…` for a coordinator code).
    pub fn encode(&self) -> String {
        let fp = self
            .address
            .fingerprint
            .map(|f| f.to_string())
            .unwrap_or_default();
        let wire = Wire {
            v: 1,
            id: self.id.clone(),
            addr: self.address.hosts(),
            fp,
            secret: URL_SAFE_NO_PAD.encode(self.secret),
        };
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        format!("{}{}", self.kind.prefix(), URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses a runner token; surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<Self, JoinRefusal> {
        Self::parse_kind(text, JoinKind::Runner)
    }

    /// Parses a code of `expected` kind; one of the other kind is refused
    /// as such.
    pub fn parse_kind(text: &str, expected: JoinKind) -> Result<Self, JoinRefusal> {
        let text = text.trim();
        let found = if text.starts_with(COORDINATOR_PREFIX) {
            JoinKind::Coordinator
        } else {
            JoinKind::Runner
        };
        if found != expected && !text.is_empty() {
            return Err(JoinRefusal::WrongKind { expected, found });
        }
        let mut token = Self::parse_body(text, expected.prefix())?;
        token.kind = expected;
        Ok(token)
    }

    fn parse_body(text: &str, prefix: &str) -> Result<Self, JoinRefusal> {
        let text = text.trim();
        if text.is_empty() {
            return Err(JoinRefusal::Missing);
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(JoinRefusal::BadFormat);
        }
        let body = text.strip_prefix(prefix).ok_or(JoinRefusal::BadFormat)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinRefusal::BadFormat)?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|_| JoinRefusal::BadFormat)?;
        if wire.v != 1 || !valid_id(&wire.id) {
            return Err(JoinRefusal::BadFormat);
        }
        let fp: Fingerprint = wire.fp.parse().map_err(|_| JoinRefusal::BadFormat)?;
        let mut address: ClusterAddress = wire.addr.parse().map_err(|_| JoinRefusal::BadFormat)?;
        if address.fingerprint.is_some() {
            return Err(JoinRefusal::BadFormat);
        }
        address.fingerprint = Some(fp);
        let secret = URL_SAFE_NO_PAD
            .decode(&wire.secret)
            .map_err(|_| JoinRefusal::BadFormat)?;
        let secret: [u8; 32] = secret.try_into().map_err(|_| JoinRefusal::BadFormat)?;
        Ok(JoinToken {
            kind: JoinKind::Runner,
            id: wire.id,
            address,
            secret,
        })
    }
}

/// Token ids: 1-64 of `[A-Za-z0-9-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// SHA-256 of a secret, as stored (hex).
pub fn secret_hash(secret: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(secret))
}

/// What the store keeps of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The code's id (public: it names the code in listings and in the
    /// code itself).
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// When it was created, in Unix seconds.
    pub created_unix: i64,
    /// When it stops being accepted, in Unix seconds.
    pub expires_unix: i64,
    /// Whether several runners may join with it.
    pub reusable: bool,
    /// Successful enrollments.
    pub uses: u32,
    /// Whether an operator revoked it.
    pub revoked: bool,
    /// Name given to runners that join with it (when they give none).
    #[serde(default)]
    pub name: String,
    /// Labels given to runners that join with it.
    #[serde(default)]
    pub labels: Vec<(String, String)>,
}

/// State of a token at some moment, for listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinTokenState {
    /// It would be accepted now.
    Valid,
    /// A one-time code that enrolled its runner.
    Used,
    /// An operator revoked it.
    Revoked,
    /// Its lifetime is over.
    Expired,
}

impl JoinTokenState {
    /// The word listings show: `valid`, `used`, `revoked`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinTokenState::Valid => "valid",
            JoinTokenState::Used => "used",
            JoinTokenState::Revoked => "revoked",
            JoinTokenState::Expired => "expired",
        }
    }
}

/// How long a code's record is kept after it expired: listings and a late
/// redemption still say "expired" (not "unknown") for a week, then the
/// record is forgotten when the next code of its kind is made.
pub const KEEP_EXPIRED_SECS: i64 = 7 * 24 * 3600;

impl JoinTokenRecord {
    /// Whether the record may be forgotten at `now`: it expired more than
    /// [`KEEP_EXPIRED_SECS`] ago (whether used, revoked or never redeemed).
    pub fn forgettable(&self, now: i64) -> bool {
        now >= self.expires_unix.saturating_add(KEEP_EXPIRED_SECS)
    }

    /// The state at `now`.
    pub fn state(&self, now: i64) -> JoinTokenState {
        if self.revoked {
            JoinTokenState::Revoked
        } else if !self.reusable && self.uses > 0 {
            JoinTokenState::Used
        } else if now >= self.expires_unix {
            JoinTokenState::Expired
        } else {
            JoinTokenState::Valid
        }
    }

    /// Decides whether `secret` may enroll a runner at `now`; on success
    /// returns the record as it must be stored afterwards (uses + 1).
    pub fn redeem(&self, secret: &[u8; 32], now: i64) -> Result<JoinTokenRecord, JoinRefusal> {
        let presented = secret_hash(secret);
        if !crate::route_oidc::tokens_match(&self.secret_sha256, &presented) {
            return Err(JoinRefusal::Unknown);
        }
        match self.state(now) {
            JoinTokenState::Valid => {}
            JoinTokenState::Used | JoinTokenState::Revoked => {
                return Err(JoinRefusal::UsedOrRevoked)
            }
            JoinTokenState::Expired => return Err(JoinRefusal::Expired),
        }
        let mut next = self.clone();
        next.uses = next.uses.saturating_add(1);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> ClusterAddress {
        "coord.example:8443;sha1:0123456789abcdef0123456789abcdef01234567"
            .parse()
            .unwrap()
    }

    fn record(secret: &[u8; 32], reusable: bool) -> JoinTokenRecord {
        JoinTokenRecord {
            id: "t1".into(),
            secret_sha256: secret_hash(secret),
            created_unix: 1000,
            expires_unix: 4600,
            reusable,
            uses: 0,
            revoked: false,
            name: String::new(),
            labels: vec![],
        }
    }

    #[test]
    fn a_record_is_forgettable_a_week_after_it_expired_whatever_its_state() {
        let fresh = record(&[1u8; 32], false);
        let week_after = fresh.expires_unix + KEEP_EXPIRED_SECS;
        assert!(!fresh.forgettable(fresh.created_unix));
        assert!(!fresh.forgettable(fresh.expires_unix));
        assert!(!fresh.forgettable(week_after - 1));
        assert!(fresh.forgettable(week_after));
        let mut used = fresh.clone();
        used.uses = 1;
        let mut revoked = fresh.clone();
        revoked.revoked = true;
        for r in [&used, &revoked] {
            assert!(!r.forgettable(week_after - 1));
            assert!(r.forgettable(week_after));
        }
        let mut forever = fresh;
        forever.expires_unix = i64::MAX;
        assert!(!forever.forgettable(i64::MAX - 1));
    }

    #[test]
    fn round_trip_keeps_address_pin_and_secret() {
        let t = JoinToken::new("abc-1".into(), addr(), [7u8; 32]).unwrap();
        let s = t.encode();
        assert!(s.starts_with("mren_"));
        let back = JoinToken::parse(&format!("  {s}\n")).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.address.to_string(), addr().to_string());
    }

    #[test]
    fn a_code_of_one_kind_is_never_taken_for_the_other() {
        let runner = JoinToken::new("r1".into(), addr(), [7u8; 32]).unwrap();
        let coord = JoinToken::coordinator("c1".into(), addr(), [7u8; 32]).unwrap();
        let (r, c) = (runner.encode(), coord.encode());
        assert!(r.starts_with("mren_") && c.starts_with("mrenc_"), "{r} {c}");
        assert_eq!(
            JoinToken::parse_kind(&c, JoinKind::Coordinator).unwrap(),
            coord
        );
        assert_eq!(JoinToken::parse(&r).unwrap(), runner);
        let refused = JoinToken::parse(&c).unwrap_err();
        assert_eq!(
            refused,
            JoinRefusal::WrongKind {
                expected: JoinKind::Runner,
                found: JoinKind::Coordinator
            }
        );
        assert!(refused.to_string().contains("miren server"), "{refused}");
        assert_eq!(
            JoinToken::parse_kind(&r, JoinKind::Coordinator).unwrap_err(),
            JoinRefusal::WrongKind {
                expected: JoinKind::Coordinator,
                found: JoinKind::Runner
            }
        );
        // The body alone does not make the kind: a runner body behind the
        // coordinator prefix is a coordinator code and nothing else.
        let relabelled = format!("mrenc_{}", &r[5..]);
        assert_eq!(
            JoinToken::parse_kind(&relabelled, JoinKind::Coordinator)
                .unwrap()
                .kind,
            JoinKind::Coordinator
        );
    }

    #[test]
    fn an_address_without_pin_cannot_make_a_token() {
        let a: ClusterAddress = "h:1".parse().unwrap();
        assert!(JoinToken::new("x".into(), a, [0; 32]).is_none());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert_eq!(JoinToken::parse(""), Err(JoinRefusal::Missing));
        assert_eq!(JoinToken::parse("   "), Err(JoinRefusal::Missing));
        for bad in [
            "hello",
            "mren_",
            "mren_!!!",
            "mren_e30",
            "mren_eyJ2IjoyfQ",
            &format!("mren_{}", "A".repeat(3000)),
        ] {
            assert_eq!(JoinToken::parse(bad), Err(JoinRefusal::BadFormat), "{bad}");
        }
        // A valid structure with a short secret.
        let t = JoinToken::new("i".into(), addr(), [1; 32])
            .unwrap()
            .encode();
        let json = URL_SAFE_NO_PAD.decode(&t[5..]).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["secret"] = "AAAA".into();
        let forged = format!("mren_{}", URL_SAFE_NO_PAD.encode(v.to_string()));
        assert_eq!(JoinToken::parse(&forged), Err(JoinRefusal::BadFormat));
        // An unknown field, or a fingerprint that is not one.
        v["secret"] = URL_SAFE_NO_PAD.encode([1u8; 32]).into();
        v["fp"] = "nope".into();
        let forged = format!("mren_{}", URL_SAFE_NO_PAD.encode(v.to_string()));
        assert_eq!(JoinToken::parse(&forged), Err(JoinRefusal::BadFormat));
    }

    #[test]
    fn one_time_token_is_used_once() {
        let secret = [9u8; 32];
        let r = record(&secret, false);
        let after = r.redeem(&secret, 2000).unwrap();
        assert_eq!(after.uses, 1);
        assert_eq!(after.redeem(&secret, 2001), Err(JoinRefusal::UsedOrRevoked));
        assert_eq!(after.state(2001), JoinTokenState::Used);
    }

    #[test]
    fn reusable_token_counts_enrollments() {
        let secret = [9u8; 32];
        let r = record(&secret, true);
        let r = r.redeem(&secret, 2000).unwrap();
        let r = r.redeem(&secret, 2000).unwrap();
        assert_eq!(r.uses, 2);
        assert_eq!(r.state(2000), JoinTokenState::Valid);
    }

    #[test]
    fn expired_revoked_and_wrong_secret_are_refused() {
        let secret = [9u8; 32];
        let r = record(&secret, false);
        assert_eq!(r.redeem(&secret, 4600), Err(JoinRefusal::Expired));
        assert!(r.redeem(&secret, 4599).is_ok());
        let mut revoked = r.clone();
        revoked.revoked = true;
        assert_eq!(
            revoked.redeem(&secret, 2000),
            Err(JoinRefusal::UsedOrRevoked)
        );
        assert_eq!(r.redeem(&[8u8; 32], 2000), Err(JoinRefusal::Unknown));
    }

    #[test]
    fn ttl_limits() {
        assert_eq!(check_ttl(0, false), Err(JoinTokenTtlError::TooShort));
        assert_eq!(check_ttl(168 * 3600, false), Ok(168 * 3600));
        assert_eq!(
            check_ttl(168 * 3600 + 1, false),
            Err(JoinTokenTtlError::OneTimeTooLong)
        );
        assert_eq!(check_ttl(168 * 3600 + 1, true), Ok(168 * 3600 + 1));
        assert_eq!(
            check_ttl(MAX_REUSABLE_TTL_SECS + 1, true),
            Err(JoinTokenTtlError::ReusableTooLong)
        );
    }

    #[test]
    fn a_coordinator_code_lives_at_most_a_day() {
        assert_eq!(check_coordinator_ttl(3600), Ok(3600));
        assert_eq!(check_coordinator_ttl(MAX_COORDINATOR_TTL_SECS), Ok(86400));
        assert_eq!(
            check_coordinator_ttl(MAX_COORDINATOR_TTL_SECS + 1),
            Err(JoinTokenTtlError::CoordinatorTooLong)
        );
        assert_eq!(check_coordinator_ttl(0), Err(JoinTokenTtlError::TooShort));
    }
}
