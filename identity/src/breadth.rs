//! Patterns that admit more than they name.
//!
//! A binding is the operator's list of who may deploy. A glob like
//! `repo:acme/*` or `refs/heads/main*` reads like a name but admits every
//! repository of `acme`, or `main-hotfix` that anyone with push access can
//! create; such a binding is refused unless the operator says it is meant
//! (`--allow-broad`), and the refusal shows an example of what else it
//! would admit. Stored bindings are not judged again, so an older binding
//! keeps working.
//!
//! The judgement is structural, on the pattern text:
//!
//! * a wildcard inside the `OWNER/REPO` part of a GitHub subject
//!   (`repo:…`, up to the next `:`) or the project path of a GitLab subject
//!   (`project_path:…`), or in a condition on `repository`,
//!   `repository_owner`, `project_path` or `namespace_path`, admits other
//!   repositories, unless the repository is pinned anyway: by a literal
//!   `repository`/`project_path` condition (every `--github` binding has
//!   one) or by a `repository_id`/`project_id` pin;
//! * in a branch pattern (`refs/heads/…`, in a `ref` condition or after
//!   `ref:` in a subject), a wildcard next to a letter or digit of a
//!   branch name (`main*`, `*main`, `v?`) admits branches whose names merely
//!   start or end alike; a wildcard standing for whole parts after a
//!   separator (`refs/heads/*`, `release/*`, `feature-*`) names a family
//!   of branches on purpose and is accepted. A `ref` pattern that starts
//!   with a wildcard and then names something (`*main`, `*/main`) admits
//!   that name in any ref namespace.
//!
//! Tags (`refs/tags/v*`) are not judged: tag patterns are the usual way to
//! deploy releases, and protecting tags is the repository's job.

use crate::bindings::{
    Binding, PROJECT_ID_CLAIM, REF_CLAIM, REPOSITORY_CLAIM, REPOSITORY_ID_CLAIM,
};
use crate::glob::Glob;

/// Claims naming a repository, project or their owner: a wildcard in them
/// admits other repositories.
const REPOSITORY_NAME_CLAIMS: [&str; 4] = [
    REPOSITORY_CLAIM,
    "repository_owner",
    "project_path",
    "namespace_path",
];
/// Subject prefixes followed by a repository path, up to the next `:`.
const PATH_SUBJECT_PREFIXES: [&str; 2] = ["repo:", "project_path:"];
/// The prefix of branch refs.
const BRANCHES: &str = "refs/heads/";

/// What a broad pattern admits beyond what it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breadth {
    /// Other repositories or owners.
    OtherRepositories,
    /// Other branches, or the same name in other ref namespaces.
    OtherBranches,
}

impl Breadth {
    fn words(self) -> &'static str {
        match self {
            Breadth::OtherRepositories => "other repositories",
            Breadth::OtherBranches => "other branches",
        }
    }
}

/// A pattern of a binding that admits more than it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{place} pattern {pattern:?} admits {} than it names, for example {example:?}; name them \
     exactly, or add --allow-broad if that is meant",
    .breadth.words()
)]
pub struct BroadPattern {
    /// `subject`, or `condition <claim>`.
    pub place: String,
    /// The pattern as given.
    pub pattern: String,
    /// What else it admits.
    pub breadth: Breadth,
    /// A value it would also admit.
    pub example: String,
}

/// The first pattern of `binding` that admits more than it names, unless
/// the binding allows that (`allow_broad`).
pub fn check_breadth(binding: &Binding) -> Result<(), BroadPattern> {
    if binding.allow_broad {
        return Ok(());
    }
    match broad_patterns(binding).into_iter().next() {
        Some(broad) => Err(broad),
        None => Ok(()),
    }
}

/// Every pattern of `binding` that admits more than it names, whatever
/// `allow_broad` says.
pub fn broad_patterns(binding: &Binding) -> Vec<BroadPattern> {
    let mut out = Vec::new();
    let repository_pinned = repository_pinned(binding);
    let subject = binding.subject.as_str();
    if !repository_pinned {
        if let Some(path) = subject_path(subject) {
            if has_wildcard(path) {
                out.push(broad("subject", subject, Breadth::OtherRepositories));
            }
        }
    }
    if let Some(branch) = subject_branch(subject) {
        if branch_is_broad(branch) {
            out.push(broad("subject", subject, Breadth::OtherBranches));
        }
    }
    for condition in &binding.conditions {
        let place = format!("condition {}", condition.claim);
        for pattern in &condition.patterns {
            let claim = condition.claim.as_str();
            if REPOSITORY_NAME_CLAIMS.contains(&claim)
                && !repository_pinned
                && has_wildcard(pattern)
            {
                out.push(broad(&place, pattern, Breadth::OtherRepositories));
            }
            if claim == REF_CLAIM && ref_is_broad(pattern) {
                out.push(broad(&place, pattern, Breadth::OtherBranches));
            }
        }
    }
    out
}

fn broad(place: &str, pattern: &str, breadth: Breadth) -> BroadPattern {
    BroadPattern {
        place: place.to_string(),
        pattern: pattern.to_string(),
        breadth,
        example: example(pattern),
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Whether a literal condition or an id pins the one repository.
fn repository_pinned(binding: &Binding) -> bool {
    let literal_condition = binding.conditions.iter().any(|c| {
        (c.claim == REPOSITORY_CLAIM || c.claim == "project_path")
            && c.patterns.iter().all(|p| !has_wildcard(p))
    });
    let id = binding
        .ids
        .iter()
        .any(|p| p.claim == REPOSITORY_ID_CLAIM || p.claim == PROJECT_ID_CLAIM);
    literal_condition || id
}

/// The repository path of a subject pattern: after `repo:` or
/// `project_path:`, up to the next `:` (the rest of the pattern when there
/// is none).
fn subject_path(subject: &str) -> Option<&str> {
    PATH_SUBJECT_PREFIXES.iter().find_map(|prefix| {
        let rest = subject.strip_prefix(prefix)?;
        Some(rest.split(':').next().unwrap_or(rest))
    })
}

/// The branch pattern in a subject: after `ref:refs/heads/`, up to the
/// next `:`, with its `refs/heads/` prefix.
fn subject_branch(subject: &str) -> Option<&str> {
    let start = subject.find(":ref:refs/heads/")? + ":ref:".len();
    let rest = &subject[start..];
    Some(rest.split(':').next().unwrap_or(rest))
}

/// The rule for a `ref` condition pattern.
fn ref_is_broad(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    let leading_wildcard = matches!(chars.next(), Some('*' | '?'));
    if leading_wildcard && !pattern.chars().all(|c| c == '*' || c == '?') {
        return true;
    }
    branch_is_broad(pattern)
}

/// A branch pattern (`refs/heads/NAME`) with a wildcard next to a letter
/// or digit of the name.
fn branch_is_broad(pattern: &str) -> bool {
    let Some(name) = pattern.strip_prefix(BRANCHES) else {
        return false;
    };
    let chars: Vec<char> = name.chars().collect();
    chars.iter().enumerate().any(|(i, c)| {
        let wildcard = *c == '*' || *c == '?';
        let before = i.checked_sub(1).and_then(|j| chars.get(j));
        let after = chars.get(i + 1);
        wildcard
            && (before.is_some_and(|c| c.is_alphanumeric())
                || after.is_some_and(|c| c.is_alphanumeric()))
    })
}

/// A text `pattern` admits: each `*` after a letter or digit becomes
/// `-other`, before one `other-`, elsewhere `other`; each `?` becomes `x`.
fn example(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::new();
    for (i, c) in chars.iter().enumerate() {
        let before = i.checked_sub(1).and_then(|j| chars.get(j));
        let after = chars.get(i + 1);
        match c {
            '*' if before.is_some_and(|c| c.is_alphanumeric()) => out.push_str("-other"),
            '*' if after.is_some_and(|c| c.is_alphanumeric()) => out.push_str("other-"),
            '*' => out.push_str("other"),
            '?' => out.push('x'),
            c => out.push(*c),
        }
    }
    debug_assert!(Glob::parse(pattern).is_ok_and(|g| g.matches(&out)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::{Condition, IdPin, GITHUB_ISSUER};

    fn generic(subject: &str, conditions: &[(&str, &str)]) -> Binding {
        let conditions = conditions
            .iter()
            .map(|(claim, list)| Condition::parse(claim, list).expect("condition"))
            .collect();
        Binding::generic("b1", "web", GITHUB_ISSUER, subject, conditions, "").expect("binding")
    }

    #[test]
    fn a_wildcard_in_the_repository_part_of_a_subject_is_broad() {
        for (subject, example) in [
            ("repo:acme/*", "repo:acme/other"),
            ("repo:acme/web*", "repo:acme/web-other"),
            (
                "repo:acme/web?:ref:refs/heads/main",
                "repo:acme/webx:ref:refs/heads/main",
            ),
            ("repo:*/web:*", "repo:other/web:other"),
            (
                "project_path:acme/*:ref_type:branch:ref:main",
                "project_path:acme/other:ref_type:branch:ref:main",
            ),
        ] {
            let err = check_breadth(&generic(subject, &[])).expect_err(subject);
            assert_eq!(err.breadth, Breadth::OtherRepositories, "{subject}");
            assert_eq!(err.example, example);
            assert_eq!(
                err.to_string(),
                format!(
                    "subject pattern {subject:?} admits other repositories than it names, for \
                     example {example:?}; name them exactly, or add --allow-broad if that is \
                     meant"
                )
            );
        }
        for subject in [
            "repo:acme/web:*",
            "repo:acme/web:ref:refs/heads/*",
            "project_path:acme/web:*",
        ] {
            assert_eq!(check_breadth(&generic(subject, &[])), Ok(()), "{subject}");
        }
    }

    #[test]
    fn a_pinned_repository_excuses_a_broad_subject() {
        // `--github` always adds a literal repository condition.
        let github = Binding::github("b1", "web", "acme/web", Some("repo:acme/*"), None, None, "")
            .expect("binding");
        assert_eq!(check_breadth(&github), Ok(()));
        let by_id = generic("repo:acme/*", &[])
            .with_ids(vec![IdPin::given("repository_id", "42").expect("pin")])
            .expect("binding");
        assert_eq!(check_breadth(&by_id), Ok(()));
        // An owner id alone leaves every repository of the owner.
        let by_owner = generic("repo:acme/*", &[])
            .with_ids(vec![IdPin::given("repository_owner_id", "7").expect("pin")])
            .expect("binding");
        assert!(check_breadth(&by_owner).is_err());
    }

    #[test]
    fn repository_conditions_with_wildcards_are_broad() {
        let b = generic("*", &[("repository", "acme/*")]);
        let err = check_breadth(&b).expect_err("broad");
        assert_eq!(err.place, "condition repository");
        assert_eq!(err.example, "acme/other");
        let b = generic("repo:acme/web:*", &[("repository_owner", "acme*")]);
        assert_eq!(check_breadth(&b).expect_err("broad").example, "acme-other");
    }

    #[test]
    fn a_wildcard_after_a_branch_name_is_broad() {
        for (refs, example) in [
            ("refs/heads/main*", "refs/heads/main-other"),
            ("refs/heads/*main", "refs/heads/other-main"),
            ("refs/heads/release/v?", "refs/heads/release/vx"),
            ("*main", "other-main"),
            ("*/main", "other/main"),
        ] {
            let b = Binding::github("b1", "web", "acme/web", None, None, Some(refs), "")
                .expect("binding");
            let err = check_breadth(&b).expect_err(refs);
            assert_eq!(err.breadth, Breadth::OtherBranches, "{refs}");
            assert_eq!(err.place, "condition ref");
            assert_eq!(err.example, example);
            assert!(err.to_string().contains("admits other branches"), "{err}");
        }
        for refs in [
            "refs/heads/main",
            "refs/heads/*",
            "refs/heads/release/*",
            "refs/heads/feature-*",
            "refs/tags/v*",
            "*",
            "refs/heads/main,refs/tags/v*",
        ] {
            let b = Binding::github("b1", "web", "acme/web", None, None, Some(refs), "")
                .expect("binding");
            assert_eq!(check_breadth(&b), Ok(()), "{refs}");
        }
        let b = generic("repo:acme/web:ref:refs/heads/main*", &[]);
        let err = check_breadth(&b).expect_err("broad");
        assert_eq!(err.place, "subject");
        assert_eq!(err.example, "repo:acme/web:ref:refs/heads/main-other");
    }

    #[test]
    fn allow_broad_accepts_and_every_pattern_is_listed() {
        let mut b = generic("repo:acme/*", &[("ref", "refs/heads/main*")]);
        assert_eq!(broad_patterns(&b).len(), 2);
        assert!(check_breadth(&b).is_err());
        b.allow_broad = true;
        assert_eq!(check_breadth(&b), Ok(()));
        assert_eq!(broad_patterns(&b).len(), 2);
    }
}
