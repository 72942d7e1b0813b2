//! Workload identity claims: subject format, TTL policy and audiences.
//!
//! Every sandbox can ask the coordinator for a token that outside verifiers
//! (AWS STS trust policies, Vault roles) match on `sub`, so the subject
//! format `org:<org>:app:<app>:sandbox:<id>` is a public interface: it must be
//! unambiguous, which is why `:` is refused inside any value. The TTL and
//! audience defaults live here too, so the runner's endpoint and the
//! coordinator's issuer cannot disagree about them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lifetime of a workload token when the caller asks none, in seconds.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Shortest lifetime a caller can get, in seconds.
pub const MIN_TTL_SECS: u64 = 60;
/// Longest lifetime a caller can get, in seconds.
pub const MAX_TTL_SECS: u64 = 86_400;
/// Audience of a workload token when the caller asks none.
pub const DEFAULT_AUDIENCE: &str = "miren";

/// The token lifetime for a request: [`DEFAULT_TTL_SECS`] when none is
/// asked, otherwise the request clamped to `MIN_TTL_SECS..=MAX_TTL_SECS`.
pub fn clamp_ttl(requested: Option<u64>) -> u64 {
    requested
        .unwrap_or(DEFAULT_TTL_SECS)
        .clamp(MIN_TTL_SECS, MAX_TTL_SECS)
}

/// The audiences for a request: `["miren"]` when none is asked, otherwise
/// the requested ones in order with duplicates removed.
pub fn audiences_or_default<S: AsRef<str>>(requested: &[S]) -> Result<Vec<String>, ClaimsError> {
    if requested.is_empty() {
        return Ok(vec![DEFAULT_AUDIENCE.to_string()]);
    }
    let mut out: Vec<String> = Vec::with_capacity(requested.len());
    for aud in requested {
        let aud = aud.as_ref();
        if aud.is_empty() {
            return Err(ClaimsError::EmptyAudience);
        }
        if !out.iter().any(|a| a == aud) {
            out.push(aud.to_string());
        }
    }
    Ok(out)
}

/// A part of a [`Subject`], named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectField {
    /// The organization id.
    Org,
    /// The application name.
    App,
    /// The sandbox id.
    Sandbox,
}

impl SubjectField {
    /// The name used in the subject string (`org`, `app`, `sandbox`).
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectField::Org => "org",
            SubjectField::App => "app",
            SubjectField::Sandbox => "sandbox",
        }
    }
}

impl fmt::Display for SubjectField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a subject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// A value contains `:`, which would make the subject ambiguous.
    #[error("subject {0} must not contain ':'")]
    ColonInValue(SubjectField),
    /// A required value is empty (app and sandbox always; org when the
    /// `org:` part is written out).
    #[error("subject {0} must not be empty")]
    Empty(SubjectField),
    /// The string is not `[org:<org>:]app:<app>:sandbox:<id>`.
    #[error("subject {0:?} is not of the form [org:<org>:]app:<app>:sandbox:<id>")]
    Malformed(String),
}

/// The `sub` of a workload token: which sandbox of which app of which
/// organization holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    /// Organization id; empty when the cluster has none (then omitted).
    pub org: String,
    /// Application name.
    pub app: String,
    /// Sandbox id.
    pub sandbox: String,
}

impl Subject {
    /// A checked subject: no value may contain `:`, app and sandbox may not
    /// be empty.
    pub fn new(
        org: impl Into<String>,
        app: impl Into<String>,
        sandbox: impl Into<String>,
    ) -> Result<Self, SubjectError> {
        let subject = Subject {
            org: org.into(),
            app: app.into(),
            sandbox: sandbox.into(),
        };
        subject.validate()?;
        Ok(subject)
    }

    /// Checks the rules of [`Subject::new`] on a subject built by hand.
    pub fn validate(&self) -> Result<(), SubjectError> {
        for (field, value) in [
            (SubjectField::Org, &self.org),
            (SubjectField::App, &self.app),
            (SubjectField::Sandbox, &self.sandbox),
        ] {
            if value.contains(':') {
                return Err(SubjectError::ColonInValue(field));
            }
        }
        if self.app.is_empty() {
            return Err(SubjectError::Empty(SubjectField::App));
        }
        if self.sandbox.is_empty() {
            return Err(SubjectError::Empty(SubjectField::Sandbox));
        }
        Ok(())
    }
}

impl fmt::Display for Subject {
    /// `org:<org>:app:<app>:sandbox:<id>`, without `org:<org>:` when org is
    /// empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.org.is_empty() {
            write!(f, "org:{}:", self.org)?;
        }
        write!(f, "app:{}:sandbox:{}", self.app, self.sandbox)
    }
}

impl FromStr for Subject {
    type Err = SubjectError;

    /// Parses exactly what [`fmt::Display`] writes. `org::app:...` (an
    /// explicit empty org) is refused, so every subject has one spelling.
    fn from_str(s: &str) -> Result<Self, SubjectError> {
        let malformed = || SubjectError::Malformed(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (org, rest) = match parts.as_slice() {
            ["org", org, rest @ ..] if rest.len() == 4 => {
                if org.is_empty() {
                    return Err(SubjectError::Empty(SubjectField::Org));
                }
                (*org, rest)
            }
            rest if rest.len() == 4 => ("", rest),
            _ => return Err(malformed()),
        };
        match rest {
            ["app", app, "sandbox", sandbox] => Subject::new(org, *app, *sandbox),
            _ => Err(malformed()),
        }
    }
}

/// Why workload claims could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// The subject was refused.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// An empty string was asked as an audience.
    #[error("audience must not be empty")]
    EmptyAudience,
    /// The issuer is empty.
    #[error("issuer must not be empty")]
    EmptyIssuer,
    /// The jti is empty.
    #[error("jti must not be empty")]
    EmptyJti,
    /// `now + ttl` does not fit in an i64.
    #[error("token expiry overflows: now={now} ttl={ttl}")]
    TimeOverflow {
        /// The issuing time.
        now: i64,
        /// The lifetime.
        ttl: u64,
    },
}

/// The claims of a workload identity token, in the order they are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadClaims {
    /// Issuer URL.
    pub iss: String,
    /// `org:<org>:app:<app>:sandbox:<id>` (see [`Subject`]).
    pub sub: String,
    /// Audiences, always written as an array.
    pub aud: Vec<String>,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Not before (unix seconds), equal to `iat`.
    pub nbf: i64,
    /// Expiry (unix seconds), `iat + ttl`.
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
    /// Application name.
    pub app: String,
    /// Sandbox id.
    pub sandbox_id: String,
    /// Cluster id.
    pub cluster_id: String,
    /// Organization id; omitted when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub organization_id: String,
}

impl WorkloadClaims {
    /// Builds the claims of a token issued at `now`.
    ///
    /// `audiences` empty means `["miren"]`; `ttl` is clamped by
    /// [`clamp_ttl`]; `jti` is chosen by the caller (a UUID v4 in practice)
    /// so that this function stays deterministic.
    pub fn new(
        issuer: &str,
        cluster_id: &str,
        subject: &Subject,
        audiences: &[String],
        ttl: Option<u64>,
        now: i64,
        jti: String,
    ) -> Result<Self, ClaimsError> {
        subject.validate()?;
        if issuer.is_empty() {
            return Err(ClaimsError::EmptyIssuer);
        }
        if jti.is_empty() {
            return Err(ClaimsError::EmptyJti);
        }
        let aud = audiences_or_default(audiences)?;
        let ttl = clamp_ttl(ttl);
        let exp = i64::try_from(ttl)
            .ok()
            .and_then(|t| now.checked_add(t))
            .ok_or(ClaimsError::TimeOverflow { now, ttl })?;
        Ok(WorkloadClaims {
            iss: issuer.to_string(),
            sub: subject.to_string(),
            aud,
            iat: now,
            nbf: now,
            exp,
            jti,
            app: subject.app.clone(),
            sandbox_id: subject.sandbox.clone(),
            cluster_id: cluster_id.to_string(),
            organization_id: subject.org.clone(),
        })
    }

    /// The parsed subject.
    pub fn subject(&self) -> Result<Subject, SubjectError> {
        self.sub.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_zero_is_raised_to_minimum() {
        assert_eq!(clamp_ttl(Some(0)), 60);
    }

    #[test]
    fn ttl_ten_is_raised_to_minimum() {
        assert_eq!(clamp_ttl(Some(10)), 60);
    }

    #[test]
    fn ttl_default_is_one_hour() {
        assert_eq!(clamp_ttl(None), 3600);
    }

    #[test]
    fn ttl_is_capped_at_one_day() {
        assert_eq!(clamp_ttl(Some(100_000)), 86_400);
        assert_eq!(clamp_ttl(Some(u64::MAX)), 86_400);
    }

    #[test]
    fn ttl_in_range_is_kept() {
        assert_eq!(clamp_ttl(Some(300)), 300);
    }

    #[test]
    fn subject_with_org_round_trips() {
        let s = Subject::new("acme", "web", "sb-1").expect("subject");
        assert_eq!(s.to_string(), "org:acme:app:web:sandbox:sb-1");
        assert_eq!("org:acme:app:web:sandbox:sb-1".parse::<Subject>(), Ok(s));
    }

    #[test]
    fn subject_without_org_round_trips() {
        let s = Subject::new("", "web", "sb-1").expect("subject");
        assert_eq!(s.to_string(), "app:web:sandbox:sb-1");
        assert_eq!("app:web:sandbox:sb-1".parse::<Subject>(), Ok(s));
    }

    #[test]
    fn colon_is_refused_naming_the_field() {
        assert_eq!(
            Subject::new("a:b", "web", "sb"),
            Err(SubjectError::ColonInValue(SubjectField::Org))
        );
        assert_eq!(
            Subject::new("", "w:eb", "sb"),
            Err(SubjectError::ColonInValue(SubjectField::App))
        );
        let err = Subject::new("", "web", "s:b").expect_err("colon");
        assert_eq!(err, SubjectError::ColonInValue(SubjectField::Sandbox));
        assert_eq!(err.to_string(), "subject sandbox must not contain ':'");
    }

    #[test]
    fn empty_app_or_sandbox_is_refused() {
        assert_eq!(
            Subject::new("", "", "sb"),
            Err(SubjectError::Empty(SubjectField::App))
        );
        assert_eq!(
            Subject::new("o", "web", ""),
            Err(SubjectError::Empty(SubjectField::Sandbox))
        );
        assert_eq!(
            "app::sandbox:x".parse::<Subject>(),
            Err(SubjectError::Empty(SubjectField::App))
        );
    }

    #[test]
    fn malformed_subjects_are_refused() {
        for bad in [
            "",
            "app:web",
            "app:web:sandbox",
            "app:web:sandbox:a:b",
            "org:o:app:web:box:1",
            "org:o:app:web:sandbox:1:x",
            "sandbox:1:app:web",
            "org:o:x:app:web:sandbox:1",
        ] {
            assert!(
                matches!(bad.parse::<Subject>(), Err(SubjectError::Malformed(_))),
                "{bad:?} should be malformed"
            );
        }
        assert_eq!(
            "org::app:web:sandbox:1".parse::<Subject>(),
            Err(SubjectError::Empty(SubjectField::Org))
        );
    }

    fn subject() -> Subject {
        Subject::new("acme", "web", "sb-1").expect("subject")
    }

    #[test]
    fn claims_builder_sets_times_and_defaults() {
        let c = WorkloadClaims::new(
            "https://miren.example",
            "cl-1",
            &subject(),
            &[],
            None,
            1_700_000_000,
            "jti-1".to_string(),
        )
        .expect("claims");
        assert_eq!(c.aud, vec!["miren".to_string()]);
        assert_eq!(c.iat, 1_700_000_000);
        assert_eq!(c.nbf, c.iat);
        assert_eq!(c.exp, 1_700_000_000 + 3600);
        assert_eq!(c.sub, "org:acme:app:web:sandbox:sb-1");
        assert_eq!(c.organization_id, "acme");
        assert_eq!(c.subject(), Ok(subject()));
    }

    #[test]
    fn claims_json_shape() {
        let s = Subject::new("", "web", "sb-1").expect("subject");
        let c = WorkloadClaims::new(
            "https://miren.example",
            "cl-1",
            &s,
            &["a".to_string(), "b".to_string(), "a".to_string()],
            Some(10),
            100,
            "j".to_string(),
        )
        .expect("claims");
        let v = serde_json::to_value(&c).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "iss": "https://miren.example",
                "sub": "app:web:sandbox:sb-1",
                "aud": ["a", "b"],
                "iat": 100, "nbf": 100, "exp": 160,
                "jti": "j",
                "app": "web", "sandbox_id": "sb-1", "cluster_id": "cl-1"
            })
        );
    }

    #[test]
    fn single_audience_is_still_an_array() {
        let c = WorkloadClaims::new(
            "https://i",
            "c",
            &subject(),
            &["sts.amazonaws.com".to_string()],
            None,
            0,
            "j".to_string(),
        )
        .expect("claims");
        let v = serde_json::to_value(&c).expect("json");
        assert_eq!(v["aud"], serde_json::json!(["sts.amazonaws.com"]));
    }

    #[test]
    fn empty_audience_is_refused() {
        assert_eq!(
            WorkloadClaims::new(
                "https://i",
                "c",
                &subject(),
                &[String::new()],
                None,
                0,
                "j".to_string()
            ),
            Err(ClaimsError::EmptyAudience)
        );
    }

    #[test]
    fn expiry_overflow_is_refused() {
        assert!(matches!(
            WorkloadClaims::new(
                "https://i",
                "c",
                &subject(),
                &[],
                None,
                i64::MAX,
                "j".to_string()
            ),
            Err(ClaimsError::TimeOverflow { .. })
        ));
    }

    #[test]
    fn hand_built_subject_is_checked() {
        let bad = Subject {
            org: String::new(),
            app: "a:b".to_string(),
            sandbox: "s".to_string(),
        };
        assert_eq!(
            WorkloadClaims::new("https://i", "c", &bad, &[], None, 0, "j".to_string()),
            Err(ClaimsError::Subject(SubjectError::ColonInValue(
                SubjectField::App
            )))
        );
    }
}
