//! The rules for names: of apps, route OIDC providers and app.toml services
//! ([`check_name`]), and of the token claims that CI bindings and claim
//! headers name ([`check_claim_name`]).
//!
//! Each rule was written out where it was first needed (the coordinator,
//! the route OIDC records, app.toml, bindings, claim headers), and copies
//! drift; a name the CLI accepts and the coordinator refuses is a bug
//! report. So each rule exists once, here, pure and tested, and every side
//! asks it.

use std::fmt;

/// Longest accepted claim name, in bytes (CI binding conditions and
/// `--claim-header` mappings).
pub const MAX_CLAIM_NAME_LEN: usize = 128;

/// What kind of thing a lowercase name names; each kind has its length
/// and whether it may start with `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// An app: 1 to 63 of `[a-z0-9-]`, not starting with `-` (it becomes
    /// part of host names and sandbox subjects).
    App,
    /// A route OIDC provider: 1 to 63 of `[a-z0-9-]`.
    Provider,
    /// A service of an app (`[services.NAME]` in app.toml): 1 to 30 of
    /// `[a-z0-9-]`.
    Service,
}

impl NameKind {
    /// The longest name of this kind, in bytes.
    pub fn max_len(self) -> usize {
        match self {
            NameKind::App | NameKind::Provider => 63,
            NameKind::Service => 30,
        }
    }

    /// Whether a name of this kind may start with `-`.
    pub fn may_start_with_hyphen(self) -> bool {
        !matches!(self, NameKind::App)
    }
}

impl fmt::Display for NameKind {
    /// `app name`, `provider name`, `service name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::App => "app name",
            NameKind::Provider => "provider name",
            NameKind::Service => "service name",
        })
    }
}

/// The rule of a [`NameKind`], as messages state it: `1-63 of [a-z0-9-],
/// not starting with '-'`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameRule(pub NameKind);

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1-{} of [a-z0-9-]", self.0.max_len())?;
        if !self.0.may_start_with_hyphen() {
            f.write_str(", not starting with '-'")?;
        }
        Ok(())
    }
}

/// Why a name was refused; each message states the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} is empty: it must be {}", NameRule(*.kind))]
    Empty {
        /// What was being named.
        kind: NameKind,
    },
    /// The name is longer than its kind allows.
    #[error("{kind} {name:?} is {len} bytes long: it must be {}", NameRule(*.kind))]
    TooLong {
        /// What was being named.
        kind: NameKind,
        /// The refused name.
        name: String,
        /// Its length, in bytes.
        len: usize,
    },
    /// The name holds a character outside `[a-z0-9-]`.
    #[error("{kind} {name:?} contains {ch:?} at position {position}: it must be {}", NameRule(*.kind))]
    BadChar {
        /// What was being named.
        kind: NameKind,
        /// The refused name.
        name: String,
        /// The first offending character.
        ch: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
    /// The name starts with `-`, which its kind does not allow.
    #[error("{kind} {name:?} starts with '-': it must be {}", NameRule(*.kind))]
    LeadingHyphen {
        /// What was being named.
        kind: NameKind,
        /// The refused name.
        name: String,
    },
}

/// Checks a lowercase name of `kind`: 1 to [`NameKind::max_len`] of
/// `[a-z0-9-]`, and not starting with `-` where the kind says so.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if let Some((position, ch)) = first_refused(name, allowed) {
        return Err(NameError::BadChar {
            kind,
            name: name.to_owned(),
            ch,
            position,
        });
    }
    if name.len() > kind.max_len() {
        return Err(NameError::TooLong {
            kind,
            name: name.to_owned(),
            len: name.len(),
        });
    }
    if name.starts_with('-') && !kind.may_start_with_hyphen() {
        return Err(NameError::LeadingHyphen {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The first character of `s` that `allowed` refuses, with its position
/// counted in characters from 0.
pub(crate) fn first_refused(s: &str, allowed: impl Fn(char) -> bool) -> Option<(usize, char)> {
    s.chars().enumerate().find(|&(_, c)| !allowed(c))
}

/// Checks an app name ([`NameKind::App`]).
pub fn check_app_name(name: &str) -> Result<(), NameError> {
    check_name(NameKind::App, name)
}

/// Why a claim name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimNameError {
    /// The claim name is empty.
    #[error("claim name is empty")]
    Empty,
    /// The claim name is longer than [`MAX_CLAIM_NAME_LEN`].
    #[error("claim name is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Length of the claim name, in bytes.
        len: usize,
        /// The limit, [`MAX_CLAIM_NAME_LEN`].
        max: usize,
    },
    /// The claim name holds a character outside `[A-Za-z0-9_.:-]`.
    #[error(
        "claim name {claim:?} contains {ch:?} at position {position}; \
         only letters, digits and `_ . : -` are allowed"
    )]
    BadChar {
        /// The refused claim name.
        claim: String,
        /// The first offending character.
        ch: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
}

/// Checks the name of a token claim: 1 to [`MAX_CLAIM_NAME_LEN`] bytes of
/// `[A-Za-z0-9_.:-]` (enough for `event_name`, `ref` and namespaced claims
/// such as `urn:example:groups`; nothing that could break a header or a
/// listing).
pub fn check_claim_name(claim: &str) -> Result<(), ClaimNameError> {
    if claim.is_empty() {
        return Err(ClaimNameError::Empty);
    }
    if claim.len() > MAX_CLAIM_NAME_LEN {
        return Err(ClaimNameError::TooLong {
            len: claim.len(),
            max: MAX_CLAIM_NAME_LEN,
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if let Some((position, ch)) = first_refused(claim, allowed) {
        return Err(ClaimNameError::BadChar {
            claim: claim.to_owned(),
            ch,
            position,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_dns_label_like() {
        for ok in ["web", "web-1", "1web", "a", &"a".repeat(63)] {
            assert_eq!(check_app_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_app_name(""),
            Err(NameError::Empty {
                kind: NameKind::App
            })
        );
        assert_eq!(
            check_app_name("-web"),
            Err(NameError::LeadingHyphen {
                kind: NameKind::App,
                name: "-web".into()
            })
        );
        assert_eq!(
            check_app_name(&"a".repeat(64)),
            Err(NameError::TooLong {
                kind: NameKind::App,
                name: "a".repeat(64),
                len: 64
            })
        );
        for (bad, ch, position) in [
            ("Web", 'W', 0),
            ("web_1", '_', 3),
            ("web.x", '.', 3),
            ("wéb", 'é', 1),
            ("a b", ' ', 1),
            ("web/x", '/', 3),
        ] {
            assert_eq!(
                check_app_name(bad),
                Err(NameError::BadChar {
                    kind: NameKind::App,
                    name: bad.into(),
                    ch,
                    position
                }),
                "{bad}"
            );
        }
    }

    #[test]
    fn messages_state_the_rule() {
        assert_eq!(
            check_app_name("-web").unwrap_err().to_string(),
            "app name \"-web\" starts with '-': it must be 1-63 of [a-z0-9-], not starting with '-'"
        );
        assert_eq!(
            check_name(NameKind::Service, "Web")
                .unwrap_err()
                .to_string(),
            "service name \"Web\" contains 'W' at position 0: it must be 1-30 of [a-z0-9-]"
        );
    }

    #[test]
    fn providers_and_services_have_their_own_length_and_may_start_with_a_hyphen() {
        assert_eq!(check_name(NameKind::Provider, "-login-example-com"), Ok(()));
        assert_eq!(check_name(NameKind::Provider, &"p".repeat(63)), Ok(()));
        assert!(check_name(NameKind::Provider, &"p".repeat(64)).is_err());
        assert_eq!(check_name(NameKind::Service, "-web"), Ok(()));
        assert_eq!(check_name(NameKind::Service, &"s".repeat(30)), Ok(()));
        assert!(matches!(
            check_name(NameKind::Service, &"s".repeat(31)),
            Err(NameError::TooLong { len: 31, .. })
        ));
        assert!(check_name(NameKind::Service, "").is_err());
    }

    #[test]
    fn claim_names() {
        for ok in [
            "event_name",
            "ref",
            "urn:example:groups",
            "a.b-c",
            &"c".repeat(MAX_CLAIM_NAME_LEN),
        ] {
            assert_eq!(check_claim_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_claim_name(""), Err(ClaimNameError::Empty));
        assert_eq!(
            check_claim_name(&"c".repeat(MAX_CLAIM_NAME_LEN + 1)),
            Err(ClaimNameError::TooLong {
                len: MAX_CLAIM_NAME_LEN + 1,
                max: MAX_CLAIM_NAME_LEN
            })
        );
        for (bad, ch, position) in [("a b", ' ', 1), ("a,b", ',', 1), ("é", 'é', 0)] {
            assert_eq!(
                check_claim_name(bad),
                Err(ClaimNameError::BadChar {
                    claim: bad.into(),
                    ch,
                    position
                })
            );
        }
    }
}
