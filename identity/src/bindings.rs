//! CI bindings: which OIDC tokens may act on which app.
//!
//! A pipeline deploys with a short-lived token from its CI provider instead of
//! a stored secret. A *binding* is the operator's statement "tokens from this
//! issuer, whose subject and claims look like this, may deploy this app"; it is
//! the only thing that turns a validly signed token into authority, so its
//! rules live here, pure and tested without sockets, and the coordinator only
//! feeds them verified claims.
//!
//! The rules:
//!
//! * the token's `iss` must equal the binding's issuer exactly (no trailing
//!   slash or case folding: see [`IssuerUrl`]);
//! * its `sub` must match the binding's subject [`Glob`];
//! * every [`Condition`] must hold (AND across conditions), and a condition
//!   holds when the claim is a string matching any of its patterns (the
//!   comma-separated list is an OR);
//! * only bindings of the app the caller names are considered, and when
//!   several match, the one with the smallest id wins, so the answer never
//!   depends on store order;
//! * a binding that pins no caller (a subject of wildcards only and no
//!   condition other than `event_name`) is refused when it is made, because
//!   it would let anyone holding a token from that issuer deploy.
//!
//! Bindings are stored with their patterns as strings ([`Binding`]) and
//! compiled once when loaded into a [`BindingSet`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::documents::{IssuerUrl, IssuerUrlError};
use crate::glob::{Glob, GlobError};

/// Issuer of GitHub Actions OIDC tokens.
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// Events a `--github` binding allows when none are given.
pub const GITHUB_DEFAULT_EVENTS: &str = "push,workflow_dispatch";
/// `provider` of bindings made with `--github`.
pub const PROVIDER_GITHUB: &str = "github";
/// `provider` of bindings made with `--issuer`/`--subject`.
pub const PROVIDER_GENERIC: &str = "generic";
/// Claim naming the event that started the run (`--allowed-events`).
pub const EVENT_NAME_CLAIM: &str = "event_name";
/// Claim naming the git ref of the run (`--allowed-refs`).
pub const REF_CLAIM: &str = "ref";
/// Claim naming the `OWNER/REPO` of the run.
pub const REPOSITORY_CLAIM: &str = "repository";
/// GitHub's immutable id of the repository (`--repository-id`).
pub const REPOSITORY_ID_CLAIM: &str = "repository_id";
/// GitHub's immutable id of the repository's owner (`--owner-id`).
pub const OWNER_ID_CLAIM: &str = "repository_owner_id";
/// GitLab's immutable id of the project (`--project-id`).
pub const PROJECT_ID_CLAIM: &str = "project_id";
/// GitLab's immutable id of the project's group or user (`--namespace-id`).
pub const NAMESPACE_ID_CLAIM: &str = "namespace_id";
/// The claims an [`IdPin`] may be on.
pub const ID_CLAIMS: [&str; 4] = [
    REPOSITORY_ID_CLAIM,
    OWNER_ID_CLAIM,
    PROJECT_ID_CLAIM,
    NAMESPACE_ID_CLAIM,
];
/// The ids a GitHub binding made without them learns from the first token
/// that matches it.
pub const GITHUB_LEARNED_IDS: [&str; 2] = [REPOSITORY_ID_CLAIM, OWNER_ID_CLAIM];
/// Longest id value accepted (GitHub and GitLab ids are 64-bit integers).
pub const MAX_ID_DIGITS: usize = 20;
/// Longest accepted claim name (the one claim-name rule,
/// [`crate::names::check_claim_name`]).
pub use crate::names::MAX_CLAIM_NAME_LEN;

/// Why a binding or condition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The binding id is empty or holds control characters.
    #[error("CI binding id {0:?} must be non-empty and printable")]
    BadId(String),
    /// The app name is empty or holds control characters.
    #[error("CI binding app {0:?} must be non-empty and printable")]
    BadApp(String),
    /// The provider is neither `github` nor `generic`.
    #[error("unknown CI binding provider {0:?} (expected \"github\" or \"generic\")")]
    BadProvider(String),
    /// The issuer is not a valid https issuer URL.
    #[error("CI binding issuer: {0}")]
    Issuer(#[from] IssuerUrlError),
    /// The subject pattern is not a valid glob.
    #[error("CI binding subject: {0}")]
    Subject(GlobError),
    /// `--github` was not given as `OWNER/REPO`.
    #[error(
        "invalid GitHub repository {0:?}: expected OWNER/REPO, each made of letters, digits, \
         '-', '_' and '.'"
    )]
    BadRepository(String),
    /// A condition names no claim, or a claim with unexpected characters.
    #[error(
        "invalid claim name {0:?}: expected 1 to 128 of letters, digits, '_', '-', '.' and ':'"
    )]
    BadClaimName(String),
    /// A condition has no pattern at all.
    #[error("condition on claim {0:?} has no pattern")]
    NoPatterns(String),
    /// A comma-separated list has an empty entry (`a,,b`, a trailing comma).
    #[error("condition on claim {0:?} has an empty entry in its comma-separated list")]
    EmptyAlternative(String),
    /// A condition pattern is not a valid glob.
    #[error("condition on claim {claim:?}: {source}")]
    ConditionPattern {
        /// The claim the condition is on.
        claim: String,
        /// Why the pattern was refused.
        source: GlobError,
    },
    /// An id pin is on a claim that holds no immutable id.
    #[error(
        "claim {0:?} holds no immutable id: ids can be pinned on repository_id, \
         repository_owner_id, project_id and namespace_id"
    )]
    NotAnIdClaim(String),
    /// An id pin's value is not a decimal number.
    #[error("{claim} {value:?} is not an id: expected 1 to 20 decimal digits")]
    BadIdValue {
        /// The claim pinned.
        claim: String,
        /// The refused value.
        value: String,
    },
    /// Two pins on the same claim.
    #[error("{0} is pinned twice")]
    IdPinnedTwice(String),
    /// The binding would accept every token of its issuer.
    #[error(
        "CI binding pins no caller: with a subject of only wildcards and no condition besides \
         event_name, any token from the issuer would be accepted; pin a subject (for example \
         repo:OWNER/REPO:*) or add a repository or ref condition"
    )]
    PinsNoCaller,
}

/// A claim that must match one of several glob patterns.
///
/// Read as JSON from the CLI (inside a [`Binding`]) and from the store:
/// an unknown member (a misspelt `pattern`) is refused rather than
/// dropped, which would silently widen the condition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The claim name, such as `event_name` or `ref`.
    pub claim: String,
    /// Glob patterns, any of which may match (OR).
    pub patterns: Vec<String>,
}

/// An immutable id the binding requires: the token's claim must equal
/// `value` exactly. Names (`OWNER/REPO`, a group path) can be given up and
/// taken by someone else; these numbers are never reused.
///
/// Given by the operator (`--repository-id`, ...) or learned by a GitHub
/// binding from the first token it accepted (`learned_unix` set).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdPin {
    /// One of [`ID_CLAIMS`].
    pub claim: String,
    /// The id, decimal digits.
    pub value: String,
    /// When it was learned from a token (unix seconds); `None` when the
    /// operator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_unix: Option<i64>,
}

impl IdPin {
    /// A checked pin on `claim`, given by the operator.
    pub fn given(claim: &str, value: &str) -> Result<IdPin, BindingError> {
        let pin = IdPin {
            claim: claim.to_string(),
            value: value.to_string(),
            learned_unix: None,
        };
        pin.check()?;
        Ok(pin)
    }

    fn check(&self) -> Result<(), BindingError> {
        if !ID_CLAIMS.contains(&self.claim.as_str()) {
            return Err(BindingError::NotAnIdClaim(self.claim.clone()));
        }
        if self.value.is_empty()
            || self.value.len() > MAX_ID_DIGITS
            || !self.value.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(BindingError::BadIdValue {
                claim: self.claim.clone(),
                value: self.value.clone(),
            });
        }
        Ok(())
    }
}

/// The id a token carries in `claim`: a string of digits, or a
/// non-negative integer (written as digits). Anything else is no id.
pub fn token_id(claims: &Map<String, Value>, claim: &str) -> Option<String> {
    match claims.get(claim)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

/// A token matched a binding by its names, but carries another immutable
/// id than the binding pinned: the repository (or owner, project, group)
/// of that name is not the one the binding was made for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "OIDC token matches CI binding {binding} by name, but its {claim} is {} where the binding \
     pinned {pinned}: the name now belongs to another {} (deleted and recreated, or renamed and \
     taken); if that is the one you mean, remove the binding and add it again",
    .found.as_deref().unwrap_or("missing"), what_the_id_names(.claim)
)]
pub struct IdDrift {
    /// The binding matched by name.
    pub binding: String,
    /// The id claim that differs.
    pub claim: String,
    /// The id the binding pinned.
    pub pinned: String,
    /// The token's id (`None` when it carries none).
    pub found: Option<String>,
}

fn what_the_id_names(claim: &str) -> &'static str {
    match claim {
        REPOSITORY_ID_CLAIM => "repository",
        OWNER_ID_CLAIM => "owner",
        PROJECT_ID_CLAIM => "project",
        _ => "group",
    }
}

/// A binding that accepted a token, and the ids it learns from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'a> {
    /// The accepting binding.
    pub binding: &'a Binding,
    /// Ids to pin on the binding from now on (a GitHub binding's first
    /// token); empty when it has them all.
    pub learn: Vec<IdPin>,
}

/// Why no binding accepted a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchRefusal {
    /// No binding of the app matches its names.
    #[error(transparent)]
    NoMatch(#[from] NoMatch),
    /// A binding matches its names but pinned other ids (the binding with
    /// the smallest id among those, when several do).
    #[error(transparent)]
    Drift(#[from] IdDrift),
}

/// A condition with its patterns compiled.
#[derive(Debug, Clone)]
pub(crate) struct CompiledCondition {
    pub(crate) claim: String,
    pub(crate) patterns: Vec<Glob>,
}

impl CompiledCondition {
    /// Whether the claim is a string matching any pattern; a missing or
    /// non-string claim fails.
    fn holds(&self, claims: &Map<String, Value>) -> bool {
        match claims.get(&self.claim) {
            Some(Value::String(value)) => self.patterns.iter().any(|p| p.matches(value)),
            _ => false,
        }
    }

    /// Whether the condition narrows who may call: it is not on
    /// `event_name`, and none of its alternatives accepts every value.
    fn pins_caller(&self) -> bool {
        self.claim != EVENT_NAME_CLAIM && self.patterns.iter().all(|p| !p.is_wildcard_only())
    }
}

impl Condition {
    /// A checked condition on `claim` with the given patterns.
    pub fn new(claim: &str, patterns: Vec<String>) -> Result<Condition, BindingError> {
        let condition = Condition {
            claim: claim.to_string(),
            patterns,
        };
        condition.compile()?;
        Ok(condition)
    }

    /// A condition from a comma-separated list such as
    /// `push,workflow_dispatch` or `refs/heads/main,refs/tags/v*`. Spaces
    /// and tabs around each entry are removed; an empty entry is refused. A
    /// pattern cannot contain a comma.
    pub fn parse(claim: &str, list: &str) -> Result<Condition, BindingError> {
        let patterns: Vec<String> = list
            .split(',')
            .map(|p| p.trim_matches([' ', '\t']).to_string())
            .collect();
        if patterns.iter().any(String::is_empty) {
            return Err(BindingError::EmptyAlternative(claim.to_string()));
        }
        Condition::new(claim, patterns)
    }

    /// Checks the claim name and compiles every pattern.
    fn compile(&self) -> Result<CompiledCondition, BindingError> {
        if crate::names::check_claim_name(&self.claim).is_err() {
            return Err(BindingError::BadClaimName(self.claim.clone()));
        }
        if self.patterns.is_empty() {
            return Err(BindingError::NoPatterns(self.claim.clone()));
        }
        let patterns = self
            .patterns
            .iter()
            .map(|p| {
                if p.is_empty() {
                    return Err(BindingError::EmptyAlternative(self.claim.clone()));
                }
                Glob::parse(p).map_err(|source| BindingError::ConditionPattern {
                    claim: self.claim.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<Glob>, BindingError>>()?;
        Ok(CompiledCondition {
            claim: self.claim.clone(),
            patterns,
        })
    }
}

impl fmt::Display for Condition {
    /// `claim=pattern1,pattern2`, as the CLI lists it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.claim, self.patterns.join(","))
    }
}

/// A CI binding as stored: patterns are kept as strings and compiled when
/// the binding is loaded into a [`BindingSet`].
///
/// Build one with [`Binding::github`] or [`Binding::generic`], which check
/// every rule; a binding read back from storage is checked again by
/// [`Binding::validate`] or when it enters a [`BindingSet`].
///
/// Its JSON is what `Admin.addCiBinding` takes and what the store keeps:
/// an unknown member (a misspelt `conditions`) is refused, never dropped.
/// Every field serialises, so what is written reads back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Unique id, used by `miren auth ci remove`.
    pub id: String,
    /// The app this binding grants access to.
    pub app: String,
    /// [`PROVIDER_GITHUB`] or [`PROVIDER_GENERIC`].
    pub provider: String,
    /// The issuer URL, compared exactly with the token's `iss`.
    pub issuer: String,
    /// Glob the token's `sub` must match.
    pub subject: String,
    /// Claim conditions, all of which must hold.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Free text shown by `miren auth ci list`.
    #[serde(default)]
    pub description: String,
    /// Immutable ids the token must carry (given, or learned by a GitHub
    /// binding from its first token).
    #[serde(default)]
    pub ids: Vec<IdPin>,
    /// The operator accepted patterns that admit more repositories or
    /// branches than they name (`--allow-broad`; see [`crate::breadth`]).
    #[serde(default)]
    pub allow_broad: bool,
    /// When the coordinator stored it (unix seconds; 0 for bindings stored
    /// before this was recorded).
    #[serde(default)]
    pub created_unix: i64,
}

/// A binding with its patterns compiled.
#[derive(Debug, Clone)]
pub(crate) struct CompiledBinding {
    pub(crate) binding: Binding,
    pub(crate) subject: Glob,
    pub(crate) conditions: Vec<CompiledCondition>,
}

/// What one binding makes of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// Its subject or a condition does not match.
    NoMatch,
    /// The names match, a pinned id does not.
    Drift(IdDrift),
    /// Accepted; the ids to learn.
    Accepts(Vec<IdPin>),
}

impl CompiledBinding {
    /// The subject and every condition match (the names).
    fn names_match(&self, subject: &str, claims: &Map<String, Value>) -> bool {
        self.subject.matches(subject) && self.conditions.iter().all(|c| c.holds(claims))
    }

    /// Names first, then the pinned ids; `now` dates what is learned.
    pub(crate) fn judge(&self, subject: &str, claims: &Map<String, Value>, now: i64) -> Judgement {
        if !self.names_match(subject, claims) {
            return Judgement::NoMatch;
        }
        for pin in &self.binding.ids {
            let found = token_id(claims, &pin.claim);
            if found.as_deref() != Some(pin.value.as_str()) {
                return Judgement::Drift(IdDrift {
                    binding: self.binding.id.clone(),
                    claim: pin.claim.clone(),
                    pinned: pin.value.clone(),
                    found,
                });
            }
        }
        Judgement::Accepts(self.binding.to_learn(claims, now))
    }
}

fn printable(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_control)
}

/// Checks `OWNER/REPO` against GitHub's naming rules.
fn valid_repository(repository: &str) -> bool {
    let Some((owner, repo)) = repository.split_once('/') else {
        return false;
    };
    let part_ok = |part: &str, max: usize| {
        !part.is_empty()
            && part.len() <= max
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    part_ok(owner, 39) && part_ok(repo, 100)
}

impl Binding {
    /// A binding for GitHub Actions runs of `repository` (`OWNER/REPO`).
    ///
    /// * issuer [`GITHUB_ISSUER`], provider [`PROVIDER_GITHUB`];
    /// * subject `repo:OWNER/REPO:*` unless `subject` overrides it;
    /// * an `event_name` condition from `events`, [`GITHUB_DEFAULT_EVENTS`]
    ///   when `None`;
    /// * a `ref` condition from `refs` when given;
    /// * always a `repository` condition equal to `OWNER/REPO`, so that an
    ///   overridden subject (or an organisation's customised subject
    ///   template) can never widen the binding to other repositories.
    ///
    /// `events` and `refs` are comma-separated glob lists.
    pub fn github(
        id: &str,
        app: &str,
        repository: &str,
        subject: Option<&str>,
        events: Option<&str>,
        refs: Option<&str>,
        description: &str,
    ) -> Result<Binding, BindingError> {
        if !valid_repository(repository) {
            return Err(BindingError::BadRepository(repository.to_string()));
        }
        let subject = match subject {
            Some(s) => s.to_string(),
            None => format!("repo:{repository}:*"),
        };
        let mut conditions = vec![Condition::parse(
            EVENT_NAME_CLAIM,
            events.unwrap_or(GITHUB_DEFAULT_EVENTS),
        )?];
        if let Some(refs) = refs {
            conditions.push(Condition::parse(REF_CLAIM, refs)?);
        }
        conditions.push(Condition::new(
            REPOSITORY_CLAIM,
            vec![repository.to_string()],
        )?);
        let binding = Binding {
            id: id.to_string(),
            app: app.to_string(),
            provider: PROVIDER_GITHUB.to_string(),
            issuer: GITHUB_ISSUER.to_string(),
            subject,
            conditions,
            description: description.to_string(),
            ids: Vec::new(),
            allow_broad: false,
            created_unix: 0,
        };
        binding.validate()?;
        Ok(binding)
    }

    /// A binding for any OIDC issuer: tokens from `issuer` whose `sub`
    /// matches `subject` and whose claims satisfy every condition.
    pub fn generic(
        id: &str,
        app: &str,
        issuer: &str,
        subject: &str,
        conditions: Vec<Condition>,
        description: &str,
    ) -> Result<Binding, BindingError> {
        let binding = Binding {
            id: id.to_string(),
            app: app.to_string(),
            provider: PROVIDER_GENERIC.to_string(),
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            conditions,
            description: description.to_string(),
            ids: Vec::new(),
            allow_broad: false,
            created_unix: 0,
        };
        binding.validate()?;
        Ok(binding)
    }

    /// Checks every rule: printable id and app, known provider, https
    /// issuer, valid patterns and claim names, and that the binding pins a
    /// caller. Loopback and private issuers are not judged here; see
    /// [`issuer_host_is_private_or_loopback`].
    pub fn validate(&self) -> Result<(), BindingError> {
        self.compile().map(drop)
    }

    /// The issuer as a checked URL.
    pub fn issuer_url(&self) -> Result<IssuerUrl, BindingError> {
        Ok(IssuerUrl::parse(&self.issuer)?)
    }

    /// The first condition on `claim`, if any.
    pub fn condition(&self, claim: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.claim == claim)
    }

    /// The pin on `claim`, if any.
    pub fn id_pin(&self, claim: &str) -> Option<&IdPin> {
        self.ids.iter().find(|p| p.claim == claim)
    }

    /// This binding with `pins` added (`--repository-id`, `--project-id`,
    /// ...), checked.
    pub fn with_ids(mut self, pins: Vec<IdPin>) -> Result<Binding, BindingError> {
        self.ids.extend(pins);
        self.validate()?;
        Ok(self)
    }

    /// This binding with another issuer (a GitHub binding for GitHub
    /// Enterprise Server, whose tokens have GitHub's claims and the
    /// server's own issuer), checked.
    pub fn with_issuer(mut self, issuer: &str) -> Result<Binding, BindingError> {
        self.issuer = issuer.to_string();
        self.validate()?;
        Ok(self)
    }

    /// The claims this binding learns ids from: a GitHub binding's
    /// repository and owner ids; none for other providers, whose claims
    /// this crate does not know.
    pub fn learns(&self) -> &'static [&'static str] {
        if self.provider == PROVIDER_GITHUB {
            &GITHUB_LEARNED_IDS
        } else {
            &[]
        }
    }

    /// The ids a token teaches this binding: each learned claim it has not
    /// pinned yet and the token carries.
    fn to_learn(&self, claims: &Map<String, Value>, now: i64) -> Vec<IdPin> {
        self.learns()
            .iter()
            .filter(|claim| self.id_pin(claim).is_none())
            .filter_map(|claim| {
                let value = token_id(claims, claim)?;
                let pin = IdPin {
                    claim: claim.to_string(),
                    value,
                    learned_unix: Some(now),
                };
                // A token's value that is no id is not learned.
                pin.check().is_ok().then_some(pin)
            })
            .collect()
    }

    /// This binding with `learned` pinned: each pin whose claim is not
    /// pinned yet is added; a pin on a claim already pinned to another
    /// value is refused as drift (two first logins raced with different
    /// ids).
    pub fn pinned(&self, learned: &[IdPin]) -> Result<Binding, IdDrift> {
        let mut out = self.clone();
        for pin in learned {
            match self.id_pin(&pin.claim) {
                Some(have) if have.value == pin.value => {}
                Some(have) => {
                    return Err(IdDrift {
                        binding: self.id.clone(),
                        claim: pin.claim.clone(),
                        pinned: have.value.clone(),
                        found: Some(pin.value.clone()),
                    })
                }
                None => out.ids.push(pin.clone()),
            }
        }
        Ok(out)
    }

    pub(crate) fn compile(&self) -> Result<CompiledBinding, BindingError> {
        if !printable(&self.id) {
            return Err(BindingError::BadId(self.id.clone()));
        }
        if !printable(&self.app) {
            return Err(BindingError::BadApp(self.app.clone()));
        }
        if self.provider != PROVIDER_GITHUB && self.provider != PROVIDER_GENERIC {
            return Err(BindingError::BadProvider(self.provider.clone()));
        }
        self.issuer_url()?;
        let subject = Glob::parse(&self.subject).map_err(BindingError::Subject)?;
        let conditions = self
            .conditions
            .iter()
            .map(Condition::compile)
            .collect::<Result<Vec<_>, _>>()?;
        let mut pinned = BTreeSet::new();
        for pin in &self.ids {
            pin.check()?;
            if !pinned.insert(pin.claim.as_str()) {
                return Err(BindingError::IdPinnedTwice(pin.claim.clone()));
            }
        }
        if subject.is_wildcard_only()
            && self.ids.is_empty()
            && !conditions.iter().any(CompiledCondition::pins_caller)
        {
            return Err(BindingError::PinsNoCaller);
        }
        Ok(CompiledBinding {
            binding: self.clone(),
            subject,
            conditions,
        })
    }
}

/// The address an issuer's host names without DNS: an IP literal (numeric
/// IPv4 spellings that resolvers accept, `2130706433`, `127.1`, `0x7f.1`,
/// included; an IPv6 zone id dropped), or `127.0.0.1` for `localhost` and
/// names under `.localhost` (RFC 6761 reserves them for loopback). `None`
/// for every other name: a DNS name cannot be judged without resolving it,
/// which this pure crate does not do, so the caller that fetches from the
/// issuer checks the addresses it actually connects to with the same rule
/// ([`crate::ip::AddressPolicy`]).
pub fn issuer_literal_address(issuer: &IssuerUrl) -> Option<IpAddr> {
    let rest = issuer.as_str().strip_prefix("https://").unwrap_or("");
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        let inner = bracketed.split(']').next().unwrap_or("");
        // Drop an IPv6 zone id (`fe80::1%25eth0`).
        inner.split('%').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Ok(v6) = host.parse::<Ipv6Addr>() {
        return Some(IpAddr::V6(v6));
    }
    parse_numeric_ipv4(host).map(IpAddr::V4)
}

/// Whether the issuer's host is `localhost` (or under `.localhost`) or an IP
/// literal that is not public ([`crate::ip::is_public`]: loopback, private,
/// link-local, shared (CGNAT), unspecified, multicast, documentation,
/// reserved; IPv4-mapped, compatible, NAT64 and 6to4 forms included).
/// `false` for every other name; see [`issuer_literal_address`].
pub fn issuer_host_is_private_or_loopback(issuer: &IssuerUrl) -> bool {
    issuer_literal_address(issuer).is_some_and(|ip| !crate::ip::is_public(ip))
}

/// Parses the IPv4 spellings of `inet_aton`: one to four dot-separated
/// numbers, each decimal, octal (leading `0`) or hexadecimal (`0x`), the last
/// filling the remaining bytes.
fn parse_numeric_ipv4(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        let value = if let Some(hex) = part.strip_prefix("0x") {
            if hex.is_empty() {
                0
            } else if hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                u64::from_str_radix(hex, 16).ok()?
            } else {
                return None;
            }
        } else if part.len() > 1 && part.starts_with('0') {
            if !part.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                return None;
            }
            u64::from_str_radix(part, 8).ok()?
        } else if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse::<u64>().ok()?
        } else {
            return None;
        };
        numbers.push(value);
    }
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|n| *n > 0xff) {
        return None;
    }
    let last_bits = 32 - 8 * leading.len() as u32;
    if *last >= 1u64 << last_bits {
        return None;
    }
    let mut value: u64 = 0;
    for n in leading {
        value = (value << 8) | n;
    }
    value = (value << last_bits) | last;
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

/// No binding of the app accepted the token. The message names the token's
/// issuer, subject and `repository` claim (empty when absent) so that an
/// operator can see which binding is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "OIDC token did not match any CI binding (issuer={issuer} subject={subject} \
     repository={repository})"
)]
pub struct NoMatch {
    /// The token's `iss` (empty when absent or not a string).
    pub issuer: String,
    /// The token's `sub` (empty when absent or not a string).
    pub subject: String,
    /// The token's `repository` claim (empty when absent or not a string).
    pub repository: String,
}

/// Why a [`BindingSet`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingSetError {
    /// Two bindings share an id.
    #[error("duplicate CI binding id {0:?}")]
    DuplicateId(String),
    /// A binding breaks a rule.
    #[error("CI binding {id:?} is invalid: {source}")]
    Invalid {
        /// The binding's id.
        id: String,
        /// The broken rule.
        source: BindingError,
    },
}

/// The bindings of one app for one issuer, indexed by the literal prefix of
/// their subject so that a token only meets the bindings it could match.
#[derive(Debug, Clone, Default)]
struct Group {
    by_id: BTreeMap<String, CompiledBinding>,
    /// Literal subject prefix -> ids of the bindings with it.
    by_prefix: HashMap<String, BTreeSet<String>>,
    /// Byte length of each prefix in `by_prefix` -> how many prefixes.
    prefix_lens: BTreeMap<usize, usize>,
}

impl Group {
    fn insert(&mut self, compiled: CompiledBinding) {
        let id = compiled.binding.id.clone();
        let prefix = compiled.subject.literal_prefix().to_string();
        let ids = self.by_prefix.entry(prefix.clone()).or_default();
        if ids.is_empty() {
            *self.prefix_lens.entry(prefix.len()).or_default() += 1;
        }
        ids.insert(id.clone());
        self.by_id.insert(id, compiled);
    }

    fn remove(&mut self, id: &str) -> Option<Binding> {
        let compiled = self.by_id.remove(id)?;
        let prefix = compiled.subject.literal_prefix();
        if let Some(ids) = self.by_prefix.get_mut(prefix) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_prefix.remove(prefix);
                if let Some(count) = self.prefix_lens.get_mut(&prefix.len()) {
                    *count -= 1;
                    if *count == 0 {
                        self.prefix_lens.remove(&prefix.len());
                    }
                }
            }
        }
        Some(compiled.binding)
    }

    /// The accepting binding with the smallest id and what it learns;
    /// when none accepts, the drift of the smallest-id binding whose names
    /// matched, if any.
    fn find(
        &self,
        subject: &str,
        claims: &Map<String, Value>,
        now: i64,
    ) -> Result<(&Binding, Vec<IdPin>), Option<IdDrift>> {
        let mut best: Option<(&Binding, Vec<IdPin>)> = None;
        let mut drift: Option<IdDrift> = None;
        for &len in self.prefix_lens.keys() {
            let Some(prefix) = subject.get(..len) else {
                // Longer than the subject, or not on a character boundary.
                continue;
            };
            let Some(ids) = self.by_prefix.get(prefix) else {
                continue;
            };
            // Ids are sorted: the first acceptor is this prefix's best.
            let candidates = ids
                .iter()
                .take_while(|id| {
                    best.as_ref()
                        .is_none_or(|(b, _)| id.as_str() < b.id.as_str())
                })
                .filter_map(|id| self.by_id.get(id));
            for c in candidates {
                match c.judge(subject, claims, now) {
                    Judgement::NoMatch => {}
                    Judgement::Drift(d) => {
                        if drift.as_ref().is_none_or(|old| d.binding < old.binding) {
                            drift = Some(d);
                        }
                    }
                    Judgement::Accepts(learn) => {
                        best = Some((&c.binding, learn));
                        break;
                    }
                }
            }
        }
        best.ok_or(drift)
    }
}

/// Every CI binding of the cluster, compiled once and indexed by app and
/// issuer for matching tokens.
#[derive(Debug, Clone, Default)]
pub struct BindingSet {
    /// app -> issuer -> bindings.
    apps: HashMap<String, HashMap<String, Group>>,
    /// id -> (app, issuer), to find a binding by id.
    locations: HashMap<String, (String, String)>,
    /// issuer -> number of bindings naming it.
    issuers: BTreeMap<String, usize>,
}

impl BindingSet {
    /// An empty set.
    pub fn new() -> BindingSet {
        BindingSet::default()
    }

    /// A set of `bindings`, each checked and compiled; duplicate ids are
    /// refused.
    pub fn from_bindings<I: IntoIterator<Item = Binding>>(
        bindings: I,
    ) -> Result<BindingSet, BindingSetError> {
        let mut set = BindingSet::new();
        for binding in bindings {
            if set.locations.contains_key(&binding.id) {
                return Err(BindingSetError::DuplicateId(binding.id));
            }
            set.insert(binding)
                .map_err(|(id, source)| BindingSetError::Invalid { id, source })?;
        }
        Ok(set)
    }

    /// Checks, compiles and adds `binding`, replacing (and returning) any
    /// binding with the same id. On error the set is unchanged and the
    /// binding's id is returned with the reason.
    pub fn insert(&mut self, binding: Binding) -> Result<Option<Binding>, (String, BindingError)> {
        let compiled = binding.compile().map_err(|e| (binding.id.clone(), e))?;
        let previous = self.remove(&binding.id);
        let (id, app, issuer) = (
            binding.id.clone(),
            binding.app.clone(),
            binding.issuer.clone(),
        );
        self.apps
            .entry(app.clone())
            .or_default()
            .entry(issuer.clone())
            .or_default()
            .insert(compiled);
        *self.issuers.entry(issuer.clone()).or_default() += 1;
        self.locations.insert(id, (app, issuer));
        Ok(previous)
    }

    /// Removes and returns the binding with `id`.
    pub fn remove(&mut self, id: &str) -> Option<Binding> {
        let (app, issuer) = self.locations.remove(id)?;
        let groups = self.apps.get_mut(&app)?;
        let group = groups.get_mut(&issuer)?;
        let removed = group.remove(id);
        if group.by_id.is_empty() {
            groups.remove(&issuer);
            if groups.is_empty() {
                self.apps.remove(&app);
            }
        }
        if let Some(count) = self.issuers.get_mut(&issuer) {
            *count -= 1;
            if *count == 0 {
                self.issuers.remove(&issuer);
            }
        }
        removed
    }

    /// The binding with `id`.
    pub fn get(&self, id: &str) -> Option<&Binding> {
        let (app, issuer) = self.locations.get(id)?;
        let group = self.apps.get(app)?.get(issuer)?;
        group.by_id.get(id).map(|c| &c.binding)
    }

    /// The bindings of `app`, sorted by id.
    pub fn for_app(&self, app: &str) -> Vec<&Binding> {
        let mut out: Vec<&Binding> = self
            .apps
            .get(app)
            .into_iter()
            .flat_map(|groups| groups.values())
            .flat_map(|g| g.by_id.values().map(|c| &c.binding))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// How many bindings the set holds.
    pub fn len(&self) -> usize {
        self.locations.len()
    }

    /// Whether the set holds no binding.
    pub fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }

    /// Every issuer some binding names: the only issuers whose discovery
    /// documents and keys the coordinator may fetch.
    pub fn issuers(&self) -> BTreeSet<String> {
        self.issuers.keys().cloned().collect()
    }

    /// Whether some binding names `issuer` (compared exactly).
    pub fn names_issuer(&self, issuer: &str) -> bool {
        self.issuers.contains_key(issuer)
    }

    /// The binding of `app` that accepts a token with these verified
    /// `claims`: its issuer equals `iss` exactly, its subject glob matches
    /// `sub`, all its conditions hold, and the token carries every id it
    /// pinned. When several accept, the one with the smallest id
    /// (byte-wise string order) is returned, so the result never depends
    /// on insertion or store order. Bindings of other apps are never
    /// considered. A GitHub binding without pinned ids returns those of
    /// the token in [`Match::learn`] (dated `now`) for the caller to
    /// record. When no binding accepts but one matched the names with
    /// another id, the refusal is that [`IdDrift`].
    pub fn matching(
        &self,
        app: &str,
        claims: &Map<String, Value>,
        now: i64,
    ) -> Result<Match<'_>, MatchRefusal> {
        let text = |name: &str| match claims.get(name) {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        };
        let (issuer, subject) = (text("iss"), text("sub"));
        let found = match claims.get("sub") {
            Some(Value::String(_)) => self
                .apps
                .get(app)
                .and_then(|groups| groups.get(issuer))
                .map(|group| group.find(subject, claims, now)),
            _ => None,
        };
        match found {
            Some(Ok((binding, learn))) => Ok(Match { binding, learn }),
            Some(Err(Some(drift))) => Err(MatchRefusal::Drift(drift)),
            Some(Err(None)) | None => Err(MatchRefusal::NoMatch(NoMatch {
                issuer: issuer.to_string(),
                subject: subject.to_string(),
                repository: text(REPOSITORY_CLAIM).to_string(),
            })),
        }
    }

    /// The compiled bindings of `app`, sorted by id (for
    /// [`crate::explain`]).
    pub(crate) fn compiled_for_app(&self, app: &str) -> Vec<&CompiledBinding> {
        let mut out: Vec<&CompiledBinding> = self
            .apps
            .get(app)
            .into_iter()
            .flat_map(|groups| groups.values())
            .flat_map(|g| g.by_id.values())
            .collect();
        out.sort_by(|a, b| a.binding.id.cmp(&b.binding.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn github_claims(repository: &str, event: &str, git_ref: &str) -> Map<String, Value> {
        claims(json!({
            "iss": GITHUB_ISSUER,
            "sub": format!("repo:{repository}:ref:{git_ref}"),
            "repository": repository,
            "repository_owner": repository.split('/').next().unwrap_or(""),
            "event_name": event,
            "ref": git_ref,
            "aud": "miren.example:8443",
        }))
    }

    fn web_binding(id: &str) -> Binding {
        Binding::github(id, "web", "acme/web-app", None, None, None, "").expect("binding")
    }

    fn set(bindings: Vec<Binding>) -> BindingSet {
        BindingSet::from_bindings(bindings).expect("set")
    }

    #[test]
    fn binding_json_round_trips_and_refuses_unknown_members() {
        let b = Binding::github("b1", "web", "acme/web-app", None, Some("push"), None, "d")
            .expect("binding");
        let text = serde_json::to_string(&b).expect("serialise");
        assert_eq!(serde_json::from_str::<Binding>(&text).expect("read"), b);
        // A misspelt member would otherwise be dropped: conditions lost,
        // the binding wider than asked.
        let mut v: Value = serde_json::from_str(&text).expect("json");
        v["condition"] = v["conditions"].take();
        v.as_object_mut().expect("object").remove("conditions");
        assert!(serde_json::from_value::<Binding>(v).is_err());
        let mut v: Value = serde_json::from_str(&text).expect("json");
        v["conditions"][0]["pattern"] = serde_json::json!(["*"]);
        assert!(serde_json::from_value::<Binding>(v).is_err());
        // Members with defaults may still be left out.
        let mut v: Value = serde_json::from_str(&text).expect("json");
        v.as_object_mut().expect("object").remove("description");
        assert!(serde_json::from_value::<Binding>(v).is_ok());
    }

    #[test]
    fn github_defaults() {
        let b = Binding::github("b1", "web", "acme/web-app", None, None, None, "deploys")
            .expect("binding");
        assert_eq!(b.provider, "github");
        assert_eq!(b.issuer, "https://token.actions.githubusercontent.com");
        assert_eq!(b.subject, "repo:acme/web-app:*");
        assert_eq!(b.description, "deploys");
        let events = b.condition("event_name").expect("events");
        assert_eq!(events.patterns, vec!["push", "workflow_dispatch"]);
        assert!(b.condition("ref").is_none());
        assert_eq!(
            b.condition("repository").map(|c| c.patterns.clone()),
            Some(vec!["acme/web-app".to_string()])
        );
        assert_eq!(events.to_string(), "event_name=push,workflow_dispatch");
    }

    #[test]
    fn github_options_override_defaults() {
        let b = Binding::github(
            "b1",
            "web",
            "acme/web-app",
            Some("repo:acme/web-app:environment:prod"),
            Some("push, release"),
            Some("refs/heads/main,refs/tags/v*"),
            "",
        )
        .expect("binding");
        assert_eq!(b.subject, "repo:acme/web-app:environment:prod");
        assert_eq!(
            b.condition("event_name").map(|c| c.patterns.clone()),
            Some(vec!["push".to_string(), "release".to_string()])
        );
        assert_eq!(
            b.condition("ref").map(|c| c.to_string()),
            Some("ref=refs/heads/main,refs/tags/v*".to_string())
        );
    }

    #[test]
    fn github_repository_is_validated() {
        for bad in [
            "acme",
            "/web-app",
            "acme/",
            "acme/web-app/extra",
            "acme /web",
            "acme/web app",
            "acme/*",
            "acme/web?",
            "ac*me/web",
            "acme/[web]",
            "",
            "/",
            "acme/..",
            "acme\\web",
            "ácme/web",
        ] {
            assert_eq!(
                Binding::github("b1", "web", bad, None, None, None, ""),
                Err(BindingError::BadRepository(bad.to_string())),
                "{bad:?}"
            );
        }
        for good in ["acme/web-app", "Acme-1/web_app.v2", "a/b", "acme/.github"] {
            assert!(
                Binding::github("b1", "web", good, None, None, None, "").is_ok(),
                "{good}"
            );
        }
        let msg = Binding::github("b1", "web", "acme", None, None, None, "")
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("OWNER/REPO"), "{msg}");
    }

    #[test]
    fn binding_that_pins_no_caller_is_refused() {
        let events = Condition::parse("event_name", "push").expect("condition");
        for subject in ["*", "**", "*?*"] {
            let err = Binding::generic(
                "b1",
                "web",
                "https://ci.example",
                subject,
                vec![events.clone()],
                "",
            )
            .expect_err("refused");
            assert_eq!(err, BindingError::PinsNoCaller, "{subject}");
            let msg = err.to_string();
            assert!(msg.contains("pin a subject"), "{msg}");
            assert!(msg.contains("repository or ref condition"), "{msg}");
        }
        // A condition whose alternatives include a bare `*` pins nothing.
        let any_ref = Condition::parse("ref", "refs/heads/main,*").expect("condition");
        assert_eq!(
            Binding::generic("b1", "web", "https://ci.example", "*", vec![any_ref], ""),
            Err(BindingError::PinsNoCaller)
        );
        // A subject or a non-event condition pins the caller.
        assert!(
            Binding::generic("b1", "web", "https://ci.example", "project:x", vec![], "").is_ok()
        );
        let repo = Condition::parse("repository", "acme/web").expect("condition");
        assert!(Binding::generic("b1", "web", "https://ci.example", "*", vec![repo], "").is_ok());
        // `--github` always pins the repository, even with `--subject '*'`.
        assert!(Binding::github("b1", "web", "acme/web", Some("*"), None, None, "").is_ok());
    }

    #[test]
    fn issuer_must_be_https() {
        assert!(matches!(
            Binding::generic("b1", "web", "http://ci.example", "x:*", vec![], ""),
            Err(BindingError::Issuer(IssuerUrlError::NotHttps(_)))
        ));
        assert!(matches!(
            Binding::generic("b1", "web", "", "x:*", vec![], ""),
            Err(BindingError::Issuer(IssuerUrlError::Empty))
        ));
    }

    #[test]
    fn bad_patterns_and_claims_are_refused() {
        assert!(matches!(
            Binding::generic("b1", "web", "https://ci.example", "", vec![], ""),
            Err(BindingError::Subject(GlobError::Empty))
        ));
        assert!(matches!(
            Binding::github("b1", "web", "acme/web", None, Some("push,,pr"), None, ""),
            Err(BindingError::EmptyAlternative(_))
        ));
        assert!(matches!(
            Binding::github(
                "b1",
                "web",
                "acme/web",
                None,
                None,
                Some("refs/heads/main,"),
                ""
            ),
            Err(BindingError::EmptyAlternative(_))
        ));
        assert!(matches!(
            Condition::parse("ref", "refs/\u{1b}[31m"),
            Err(BindingError::ConditionPattern { .. })
        ));
        assert!(matches!(
            Condition::parse("", "x"),
            Err(BindingError::BadClaimName(_))
        ));
        assert!(matches!(
            Condition::parse("a b", "x"),
            Err(BindingError::BadClaimName(_))
        ));
        assert!(matches!(
            Condition::new("ref", vec![]),
            Err(BindingError::NoPatterns(_))
        ));
        assert!(matches!(
            Binding::github("", "web", "acme/web", None, None, None, ""),
            Err(BindingError::BadId(_))
        ));
        assert!(matches!(
            Binding::github("b1", "", "acme/web", None, None, None, ""),
            Err(BindingError::BadApp(_))
        ));
        let mut b = web_binding("b1");
        b.provider = "gitlab".to_string();
        assert_eq!(
            b.validate(),
            Err(BindingError::BadProvider("gitlab".to_string()))
        );
    }

    #[test]
    fn matches_by_subject_events_and_refs() {
        let b = Binding::github(
            "b1",
            "web",
            "acme/web-app",
            None,
            None,
            Some("refs/heads/main"),
            "",
        )
        .expect("binding");
        let s = set(vec![b]);
        let ok = github_claims("acme/web-app", "push", "refs/heads/main");
        assert_eq!(
            s.matching("web", &ok, 0).map(|m| m.binding.id.as_str()),
            Ok("b1")
        );
        let manual = github_claims("acme/web-app", "workflow_dispatch", "refs/heads/main");
        assert!(s.matching("web", &manual, 0).is_ok());
        let dev = github_claims("acme/web-app", "push", "refs/heads/dev");
        assert!(s.matching("web", &dev, 0).is_err());
        let pr = github_claims("acme/web-app", "pull_request", "refs/heads/main");
        assert!(s.matching("web", &pr, 0).is_err());
    }

    #[test]
    fn subject_glob_is_applied() {
        let b = Binding::github(
            "b1",
            "web",
            "acme/web-app",
            Some("repo:acme/web-app:environment:prod"),
            None,
            None,
            "",
        )
        .expect("binding");
        let s = set(vec![b]);
        let mut c = github_claims("acme/web-app", "push", "refs/heads/main");
        assert!(s.matching("web", &c, 0).is_err());
        c.insert(
            "sub".to_string(),
            json!("repo:acme/web-app:environment:prod"),
        );
        assert!(s.matching("web", &c, 0).is_ok());
    }

    #[test]
    fn another_repository_is_refused_with_the_exact_message() {
        let s = set(vec![web_binding("b1")]);
        let other = github_claims("evil/web-app", "push", "refs/heads/main");
        let err = s.matching("web", &other, 0).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "OIDC token did not match any CI binding \
             (issuer=https://token.actions.githubusercontent.com \
             subject=repo:evil/web-app:ref:refs/heads/main repository=evil/web-app)"
        );
        let bare = claims(json!({"iss": "https://ci.example", "sub": "x"}));
        assert_eq!(
            s.matching("web", &bare, 0)
                .expect_err("refused")
                .to_string(),
            "OIDC token did not match any CI binding \
             (issuer=https://ci.example subject=x repository=)"
        );
    }

    #[test]
    fn a_forged_repository_claim_does_not_widen_a_subject() {
        // Subject of another repository with our repository claim: refused.
        let s = set(vec![web_binding("b1")]);
        let mut c = github_claims("acme/web-app", "push", "refs/heads/main");
        c.insert("sub".to_string(), json!("repo:evil/x:ref:refs/heads/main"));
        assert!(s.matching("web", &c, 0).is_err());
    }

    #[test]
    fn another_apps_binding_never_matches() {
        let s = set(vec![web_binding("b1")]);
        let c = github_claims("acme/web-app", "push", "refs/heads/main");
        assert!(s.matching("web", &c, 0).is_ok());
        assert!(s.matching("api", &c, 0).is_err());
        assert!(s.matching("", &c, 0).is_err());
    }

    #[test]
    fn issuer_with_trailing_slash_does_not_match() {
        let s = set(vec![web_binding("b1")]);
        let mut c = github_claims("acme/web-app", "push", "refs/heads/main");
        c.insert("iss".to_string(), json!(format!("{GITHUB_ISSUER}/")));
        assert!(s.matching("web", &c, 0).is_err());
        c.insert("iss".to_string(), json!(GITHUB_ISSUER.to_uppercase()));
        assert!(s.matching("web", &c, 0).is_err());
    }

    #[test]
    fn missing_or_non_string_claims_fail() {
        let b = Binding::generic(
            "b1",
            "web",
            "https://gitlab.example",
            "project_path:acme/web:*",
            vec![Condition::parse("ref_protected", "true").expect("condition")],
            "",
        )
        .expect("binding");
        let s = set(vec![b]);
        let base = json!({
            "iss": "https://gitlab.example",
            "sub": "project_path:acme/web:ref_type:branch:ref:main",
        });
        let mut ok = claims(base.clone());
        ok.insert("ref_protected".to_string(), json!("true"));
        assert!(s.matching("web", &ok, 0).is_ok());
        let mut boolean = claims(base.clone());
        boolean.insert("ref_protected".to_string(), json!(true));
        assert!(s.matching("web", &boolean, 0).is_err());
        assert!(s.matching("web", &claims(base), 0).is_err());
        let no_sub = claims(json!({"iss": "https://gitlab.example", "ref_protected": "true"}));
        assert!(s.matching("web", &no_sub, 0).is_err());
    }

    #[test]
    fn comma_means_or_and_conditions_and() {
        let b = Binding::github(
            "b1",
            "web",
            "acme/web-app",
            None,
            Some("push,release"),
            Some("refs/heads/main,refs/tags/v*"),
            "",
        )
        .expect("binding");
        let s = set(vec![b]);
        for (event, git_ref, ok) in [
            ("push", "refs/heads/main", true),
            ("release", "refs/tags/v1.2.3", true),
            ("push", "refs/tags/v2", true),
            ("workflow_dispatch", "refs/heads/main", false),
            ("release", "refs/heads/dev", false),
            ("pull_request", "refs/tags/v1", false),
        ] {
            let c = github_claims("acme/web-app", event, git_ref);
            assert_eq!(s.matching("web", &c, 0).is_ok(), ok, "{event} {git_ref}");
        }
    }

    #[test]
    fn smallest_id_wins_whatever_the_order() {
        let narrow = Binding::github(
            "b-2",
            "web",
            "acme/web-app",
            None,
            None,
            Some("refs/heads/main"),
            "",
        )
        .expect("binding");
        let wide_prefix = Binding::generic(
            "b-9",
            "web",
            GITHUB_ISSUER,
            "repo:*",
            vec![Condition::parse("repository", "acme/*").expect("condition")],
            "",
        )
        .expect("binding");
        let c = github_claims("acme/web-app", "push", "refs/heads/main");
        for order in [
            vec![web_binding("b-5"), narrow.clone(), wide_prefix.clone()],
            vec![wide_prefix.clone(), web_binding("b-5"), narrow.clone()],
        ] {
            let s = set(order);
            assert_eq!(
                s.matching("web", &c, 0).map(|m| m.binding.id.as_str()),
                Ok("b-2")
            );
        }
        let s = set(vec![web_binding("b-5"), wide_prefix.clone()]);
        assert_eq!(
            s.matching("web", &c, 0).map(|m| m.binding.id.as_str()),
            Ok("b-5")
        );
        let s = set(vec![web_binding("b-95"), wide_prefix]);
        assert_eq!(
            s.matching("web", &c, 0).map(|m| m.binding.id.as_str()),
            Ok("b-9")
        );
    }

    #[test]
    fn set_refuses_duplicates_and_invalid_bindings() {
        assert_eq!(
            BindingSet::from_bindings(vec![web_binding("b1"), web_binding("b1")]).map(|_| ()),
            Err(BindingSetError::DuplicateId("b1".to_string()))
        );
        let mut bad = web_binding("b2");
        bad.subject = "*".to_string();
        bad.conditions.retain(|c| c.claim == EVENT_NAME_CLAIM);
        assert_eq!(
            BindingSet::from_bindings(vec![web_binding("b1"), bad]).map(|_| ()),
            Err(BindingSetError::Invalid {
                id: "b2".to_string(),
                source: BindingError::PinsNoCaller
            })
        );
    }

    #[test]
    fn insert_remove_and_issuers_stay_in_step() {
        let mut s = BindingSet::new();
        assert!(s.is_empty());
        assert_eq!(s.insert(web_binding("b1")), Ok(None));
        let gitlab = Binding::generic(
            "b2",
            "web",
            "https://gitlab.example",
            "project_path:acme/web:*",
            vec![],
            "",
        )
        .expect("binding");
        assert_eq!(s.insert(gitlab), Ok(None));
        assert_eq!(
            s.issuers().into_iter().collect::<Vec<_>>(),
            vec!["https://gitlab.example", GITHUB_ISSUER]
        );
        assert!(s.names_issuer("https://gitlab.example"));
        assert!(!s.names_issuer("https://gitlab.example/"));
        assert_eq!(
            s.for_app("web")
                .iter()
                .map(|b| b.id.as_str())
                .collect::<Vec<_>>(),
            vec!["b1", "b2"]
        );
        // Replacing b1 with a binding for another app moves it.
        let moved =
            Binding::github("b1", "api", "acme/api", None, None, None, "").expect("binding");
        assert_eq!(
            s.insert(moved).map(|p| p.map(|b| b.app)),
            Ok(Some("web".to_string()))
        );
        assert_eq!(s.get("b1").map(|b| b.app.as_str()), Some("api"));
        let c = github_claims("acme/web-app", "push", "refs/heads/main");
        assert!(s.matching("web", &c, 0).is_err());
        assert_eq!(s.remove("b2").map(|b| b.id), Some("b2".to_string()));
        assert_eq!(s.remove("b2"), None);
        assert_eq!(
            s.issuers().into_iter().collect::<Vec<_>>(),
            vec![GITHUB_ISSUER]
        );
        assert!(s.for_app("web").is_empty());
        assert_eq!(s.len(), 1);
        // A refused insert leaves the set unchanged.
        let mut bad = web_binding("b1");
        bad.issuer = "http://x".to_string();
        assert!(s.insert(bad).is_err());
        assert_eq!(s.get("b1").map(|b| b.app.as_str()), Some("api"));
    }

    #[test]
    fn ten_thousand_bindings_across_a_thousand_apps() {
        let mut bindings = Vec::new();
        for app in 0..1000 {
            for repo in 0..10 {
                let id = format!("b{app:04}-{repo}");
                let repository = format!("org{app}/repo{repo}");
                bindings.push(
                    Binding::github(&id, &format!("app{app}"), &repository, None, None, None, "")
                        .expect("binding"),
                );
            }
        }
        let s = set(bindings);
        assert_eq!(s.len(), 10_000);
        assert_eq!(s.issuers().len(), 1);
        for app in (0..1000).step_by(37) {
            for repo in [0, 9] {
                let c = github_claims(&format!("org{app}/repo{repo}"), "push", "refs/heads/main");
                let want = format!("b{app:04}-{repo}");
                assert_eq!(
                    s.matching(&format!("app{app}"), &c, 0)
                        .map(|m| m.binding.id.as_str()),
                    Ok(want.as_str())
                );
                // The same token never opens a neighbouring app.
                let other = format!("app{}", (app + 1) % 1000);
                assert!(s.matching(&other, &c, 0).is_err());
            }
            let c = github_claims(&format!("org{app}/repo10"), "push", "refs/heads/main");
            assert!(s.matching(&format!("app{app}"), &c, 0).is_err());
        }
    }

    #[test]
    fn store_form_round_trips() {
        let b = Binding::github(
            "b1",
            "web",
            "acme/web-app",
            None,
            None,
            Some("refs/heads/main"),
            "d",
        )
        .expect("binding");
        let v = serde_json::to_value(&b).expect("json");
        assert_eq!(v["subject"], "repo:acme/web-app:*");
        assert_eq!(v["conditions"][0]["claim"], "event_name");
        assert_eq!(
            v["conditions"][0]["patterns"],
            json!(["push", "workflow_dispatch"])
        );
        let back: Binding = serde_json::from_value(v).expect("back");
        assert_eq!(back, b);
        let minimal: Binding = serde_json::from_value(json!({
            "id": "x", "app": "web", "provider": "generic",
            "issuer": "https://ci.example", "subject": "a:*"
        }))
        .expect("minimal");
        assert!(minimal.conditions.is_empty());
        assert!(minimal.validate().is_ok());
    }

    fn with_ids(
        mut c: Map<String, Value>,
        repository_id: Value,
        owner_id: Value,
    ) -> Map<String, Value> {
        c.insert(REPOSITORY_ID_CLAIM.to_string(), repository_id);
        c.insert(OWNER_ID_CLAIM.to_string(), owner_id);
        c
    }

    #[test]
    fn a_github_binding_learns_its_ids_and_then_refuses_a_recreated_repository() {
        let s = set(vec![web_binding("b1")]);
        let first = with_ids(
            github_claims("acme/web-app", "push", "refs/heads/main"),
            json!("100"),
            json!("7"),
        );
        let m = s.matching("web", &first, 1_000).expect("match");
        let learned = vec![
            IdPin {
                claim: REPOSITORY_ID_CLAIM.to_string(),
                value: "100".to_string(),
                learned_unix: Some(1_000),
            },
            IdPin {
                claim: OWNER_ID_CLAIM.to_string(),
                value: "7".to_string(),
                learned_unix: Some(1_000),
            },
        ];
        assert_eq!(m.learn, learned);
        let pinned = m.binding.pinned(&m.learn).expect("pinned");
        let s = set(vec![pinned.clone()]);
        // The same repository again: accepted, nothing more to learn.
        let again = s.matching("web", &first, 2_000).expect("match");
        assert!(again.learn.is_empty());
        // Same names, another repository id (deleted and recreated).
        let recreated = with_ids(
            github_claims("acme/web-app", "push", "refs/heads/main"),
            json!("555"),
            json!("7"),
        );
        let err = s.matching("web", &recreated, 3_000).expect_err("drift");
        assert_eq!(
            err,
            MatchRefusal::Drift(IdDrift {
                binding: "b1".to_string(),
                claim: REPOSITORY_ID_CLAIM.to_string(),
                pinned: "100".to_string(),
                found: Some("555".to_string()),
            })
        );
        let msg = err.to_string();
        assert!(
            msg.contains("its repository_id is 555 where the binding pinned 100"),
            "{msg}"
        );
        assert!(msg.contains("another repository"), "{msg}");
        // A token without the id is refused too.
        let bare = github_claims("acme/web-app", "push", "refs/heads/main");
        assert!(matches!(
            s.matching("web", &bare, 0),
            Err(MatchRefusal::Drift(IdDrift { found: None, .. }))
        ));
        // Other names are still a plain mismatch.
        let other = with_ids(
            github_claims("evil/x", "push", "refs/heads/main"),
            json!("1"),
            json!("2"),
        );
        assert!(matches!(
            s.matching("web", &other, 0),
            Err(MatchRefusal::NoMatch(_))
        ));
        // Pinning what is pinned is a no-op; another value is drift.
        assert_eq!(pinned.pinned(&learned), Ok(pinned.clone()));
        let mut racing = learned.clone();
        racing[0].value = "555".to_string();
        assert!(pinned.pinned(&racing).is_err());
    }

    #[test]
    fn given_ids_refuse_from_the_first_token_and_numbers_count() {
        let b = web_binding("b1")
            .with_ids(vec![IdPin::given(REPOSITORY_ID_CLAIM, "100").expect("pin")])
            .expect("binding");
        let s = set(vec![b]);
        let numeric = with_ids(
            github_claims("acme/web-app", "push", "refs/heads/main"),
            json!(100),
            json!(7),
        );
        let m = s.matching("web", &numeric, 5).expect("match");
        assert_eq!(m.learn.len(), 1, "only the owner id is learned");
        assert_eq!(m.learn[0].claim, OWNER_ID_CLAIM);
        let wrong = with_ids(
            github_claims("acme/web-app", "push", "refs/heads/main"),
            json!("101"),
            json!("7"),
        );
        assert!(matches!(
            s.matching("web", &wrong, 0),
            Err(MatchRefusal::Drift(_))
        ));
        // A generic binding learns nothing.
        let gitlab = Binding::generic(
            "g1",
            "web",
            "https://gitlab.example",
            "project_path:acme/web:*",
            vec![],
            "",
        )
        .expect("binding");
        let s = set(vec![gitlab.clone()]);
        let t = claims(
            json!({"iss": "https://gitlab.example", "sub": "project_path:acme/web:ref:main", "project_id": "9"}),
        );
        assert!(s.matching("web", &t, 0).expect("match").learn.is_empty());
        let gitlab = gitlab
            .with_ids(vec![IdPin::given(PROJECT_ID_CLAIM, "8").expect("pin")])
            .expect("binding");
        assert!(set(vec![gitlab]).matching("web", &t, 0).is_err());
    }

    #[test]
    fn id_pins_are_checked() {
        assert!(matches!(
            IdPin::given("repository", "1"),
            Err(BindingError::NotAnIdClaim(_))
        ));
        for bad in ["", "12a", "-1", "123456789012345678901", " 1"] {
            assert!(
                matches!(
                    IdPin::given(REPOSITORY_ID_CLAIM, bad),
                    Err(BindingError::BadIdValue { .. })
                ),
                "{bad:?}"
            );
        }
        let twice = web_binding("b1").with_ids(vec![
            IdPin::given(REPOSITORY_ID_CLAIM, "1").expect("pin"),
            IdPin::given(REPOSITORY_ID_CLAIM, "2").expect("pin"),
        ]);
        assert_eq!(
            twice,
            Err(BindingError::IdPinnedTwice(REPOSITORY_ID_CLAIM.to_string()))
        );
        // A record from before ids were pinned loads with none.
        let old: Binding = serde_json::from_value(json!({
            "id": "x", "app": "web", "provider": "github", "issuer": GITHUB_ISSUER,
            "subject": "repo:acme/web:*",
            "conditions": [{"claim": "repository", "patterns": ["acme/web"]}],
            "description": ""
        }))
        .expect("old record");
        assert!(old.ids.is_empty() && !old.allow_broad && old.created_unix == 0);
        assert!(old.validate().is_ok());
    }

    fn private(url: &str) -> bool {
        issuer_host_is_private_or_loopback(&IssuerUrl::parse(url).expect("issuer"))
    }

    #[test]
    fn literal_addresses_of_issuers() {
        let lit = |url: &str| issuer_literal_address(&IssuerUrl::parse(url).expect("issuer"));
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        assert_eq!(lit("https://localhost:8443"), ip("127.0.0.1"));
        assert_eq!(lit("https://ci.localhost"), ip("127.0.0.1"));
        assert_eq!(lit("https://0x7f.1/x"), ip("127.0.0.1"));
        assert_eq!(lit("https://10.0.0.1:9000"), ip("10.0.0.1"));
        assert_eq!(lit("https://[fe80::1%25eth0]"), ip("fe80::1"));
        assert_eq!(lit("https://[2606:4700::1]:8443"), ip("2606:4700::1"));
        assert_eq!(lit("https://8.8.8.8"), ip("8.8.8.8"));
        assert_eq!(lit("https://token.actions.githubusercontent.com"), None);
        assert_eq!(lit("https://127.0.0.1.nip.io"), None);
    }

    #[test]
    fn private_and_loopback_issuers_are_recognised() {
        for url in [
            "https://localhost",
            "https://localhost:8443/issuer",
            "https://localhost.",
            "https://ci.localhost",
            "https://127.0.0.1:9000",
            "https://127.1",
            "https://2130706433",
            "https://0x7f.1",
            "https://0177.0.0.1",
            "https://0.0.0.0",
            "https://10.1.2.3",
            "https://172.16.0.1",
            "https://172.31.255.255",
            "https://192.168.1.1",
            "https://169.254.169.254/latest",
            "https://100.64.0.1",
            "https://255.255.255.255",
            "https://[::1]:8443",
            "https://[::]",
            "https://[fd00::1]",
            "https://[fe80::1%25eth0]",
            "https://[::ffff:127.0.0.1]",
            "https://[::ffff:10.0.0.1]",
            "https://[64:ff9b::a00:1]",
            "https://[2001:db8::1]",
            "https://224.0.0.1",
        ] {
            assert!(private(url), "{url}");
        }
        for url in [
            "https://token.actions.githubusercontent.com",
            "https://gitlab.example:8443",
            "https://8.8.8.8",
            "https://172.32.0.1",
            "https://100.128.0.1",
            "https://[2606:4700:4700::1111]",
            "https://[::ffff:8.8.8.8]",
            "https://127.0.0.1.nip.io",
            "https://notlocalhost",
            "https://1.2.3.4.5",
            "https://4294967296",
        ] {
            assert!(!private(url), "{url}");
        }
    }
}
