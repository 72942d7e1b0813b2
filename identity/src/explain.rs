//! Why a token does or does not match an app's CI bindings, claim by claim.
//!
//! `miren auth ci test` shows an operator, for each binding of the app,
//! every condition with what the binding expects, what the token says and
//! whether they agree, so a mismatch is read off rather than guessed. The
//! verdict of each binding is the matcher's own ([`BindingSet::matching`]
//! judges with the same compiled binding), so the explanation cannot
//! disagree with a login.

use serde_json::{Map, Value};

use crate::bindings::{token_id, BindingSet, IdDrift, Judgement};
use crate::Binding;

/// How one condition fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The token's value matches.
    Matched,
    /// The token has the claim with another value (or not a string).
    Mismatched,
    /// The token lacks the claim.
    Missing,
    /// No id pinned yet: the first login that matches pins the token's.
    WillPin,
}

/// One condition of a binding against a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The claim (`iss`, `sub`, a condition's claim, an id claim).
    pub claim: String,
    /// What the binding accepts: the issuer, the subject pattern, a
    /// condition's patterns (any of them), the pinned id.
    pub expected: Vec<String>,
    /// What the token says (JSON text when it is not a string); `None`
    /// when absent.
    pub token_value: Option<String>,
    /// Whether they agree.
    pub outcome: CheckOutcome,
}

/// What one binding makes of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It accepts the token.
    Accepts,
    /// Its names do not match.
    NoMatch,
    /// Its names match, a pinned id does not.
    Drift(IdDrift),
}

/// One binding, its checks and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The binding.
    pub binding: Binding,
    /// Issuer, subject, each condition, each pinned or learnable id.
    pub checks: Vec<Check>,
    /// What a login would make of it.
    pub verdict: Verdict,
}

/// The claim's value as shown: a string as is, anything else as JSON.
fn shown(claims: &Map<String, Value>, claim: &str) -> Option<String> {
    claims.get(claim).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

fn check(claim: &str, expected: Vec<String>, value: Option<String>, ok: bool) -> Check {
    let outcome = match (&value, ok) {
        (_, true) => CheckOutcome::Matched,
        (None, false) => CheckOutcome::Missing,
        (Some(_), false) => CheckOutcome::Mismatched,
    };
    Check {
        claim: claim.to_string(),
        expected,
        token_value: value,
        outcome,
    }
}

impl BindingSet {
    /// Every binding of `app` (by id) against a token's `claims`.
    pub fn explain(&self, app: &str, claims: &Map<String, Value>) -> Vec<Explanation> {
        let text = |name: &str| match claims.get(name) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        };
        self.compiled_for_app(app)
            .into_iter()
            .map(|compiled| {
                let binding = &compiled.binding;
                let mut checks = Vec::new();
                let iss_ok = text("iss") == Some(binding.issuer.as_str());
                checks.push(check(
                    "iss",
                    vec![binding.issuer.clone()],
                    shown(claims, "iss"),
                    iss_ok,
                ));
                let sub = text("sub");
                checks.push(check(
                    "sub",
                    vec![binding.subject.clone()],
                    shown(claims, "sub"),
                    sub.is_some_and(|s| compiled.subject.matches(s)),
                ));
                for condition in &compiled.conditions {
                    let ok = text(&condition.claim)
                        .is_some_and(|v| condition.patterns.iter().any(|p| p.matches(v)));
                    checks.push(check(
                        &condition.claim,
                        condition
                            .patterns
                            .iter()
                            .map(|p| p.as_str().to_string())
                            .collect(),
                        shown(claims, &condition.claim),
                        ok,
                    ));
                }
                for pin in &binding.ids {
                    let found = token_id(claims, &pin.claim);
                    let ok = found.as_deref() == Some(pin.value.as_str());
                    checks.push(check(
                        &pin.claim,
                        vec![pin.value.clone()],
                        shown(claims, &pin.claim),
                        ok,
                    ));
                }
                for claim in binding.learns() {
                    if binding.id_pin(claim).is_none() {
                        checks.push(Check {
                            claim: claim.to_string(),
                            expected: Vec::new(),
                            token_value: shown(claims, claim),
                            outcome: CheckOutcome::WillPin,
                        });
                    }
                }
                let verdict = match (iss_ok, sub) {
                    (true, Some(sub)) => match compiled.judge(sub, claims, 0) {
                        Judgement::NoMatch => Verdict::NoMatch,
                        Judgement::Drift(d) => Verdict::Drift(d),
                        Judgement::Accepts(_) => Verdict::Accepts,
                    },
                    _ => Verdict::NoMatch,
                };
                Explanation {
                    binding: binding.clone(),
                    checks,
                    verdict,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::{IdPin, GITHUB_ISSUER};
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn token(repository: &str, git_ref: &str, repository_id: &str) -> Map<String, Value> {
        claims(json!({
            "iss": GITHUB_ISSUER,
            "sub": format!("repo:{repository}:ref:{git_ref}"),
            "repository": repository,
            "repository_id": repository_id,
            "repository_owner_id": "7",
            "event_name": "push",
            "ref": git_ref,
        }))
    }

    #[test]
    fn a_mismatch_is_explained_claim_by_claim() {
        let main = Binding::github(
            "b1",
            "web",
            "acme/web",
            None,
            None,
            Some("refs/heads/main"),
            "",
        )
        .expect("binding");
        let pinned = Binding::github("b2", "web", "acme/web", None, None, None, "")
            .expect("binding")
            .with_ids(vec![IdPin::given("repository_id", "42").expect("pin")])
            .expect("binding");
        let set = BindingSet::from_bindings([main, pinned]).expect("set");
        let t = token("acme/web", "refs/heads/dev", "43");
        let explained = set.explain("web", &t);
        assert_eq!(explained.len(), 2);

        let b1 = &explained[0];
        assert_eq!(b1.binding.id, "b1");
        assert_eq!(b1.verdict, Verdict::NoMatch);
        let by_claim = |e: &Explanation, claim: &str| {
            e.checks
                .iter()
                .find(|c| c.claim == claim)
                .cloned()
                .unwrap_or_else(|| panic!("no check on {claim}"))
        };
        assert_eq!(by_claim(b1, "iss").outcome, CheckOutcome::Matched);
        assert_eq!(by_claim(b1, "sub").outcome, CheckOutcome::Matched);
        assert_eq!(by_claim(b1, "event_name").outcome, CheckOutcome::Matched);
        let git_ref = by_claim(b1, "ref");
        assert_eq!(git_ref.outcome, CheckOutcome::Mismatched);
        assert_eq!(git_ref.expected, vec!["refs/heads/main"]);
        assert_eq!(git_ref.token_value.as_deref(), Some("refs/heads/dev"));
        assert_eq!(by_claim(b1, "repository_id").outcome, CheckOutcome::WillPin);
        assert_eq!(
            by_claim(b1, "repository_id").token_value.as_deref(),
            Some("43")
        );

        let b2 = &explained[1];
        let id = by_claim(b2, "repository_id");
        assert_eq!(id.outcome, CheckOutcome::Mismatched);
        assert_eq!(id.expected, vec!["42"]);
        assert!(matches!(&b2.verdict, Verdict::Drift(d) if d.pinned == "42"));
        // The verdicts are the matcher's.
        assert!(set.matching("web", &t, 0).is_err());
        let good = token("acme/web", "refs/heads/main", "43");
        let explained = set.explain("web", &good);
        assert_eq!(explained[0].verdict, Verdict::Accepts);
        assert_eq!(
            set.matching("web", &good, 0).map(|m| m.binding.id.clone()),
            Ok("b1".to_string())
        );
    }

    #[test]
    fn missing_claims_and_other_issuers() {
        let b = Binding::github("b1", "web", "acme/web", None, None, None, "").expect("binding");
        let set = BindingSet::from_bindings([b]).expect("set");
        let t = claims(json!({"iss": "https://other.example", "sub": 5}));
        let e = &set.explain("web", &t)[0];
        assert_eq!(e.verdict, Verdict::NoMatch);
        assert_eq!(e.checks[0].outcome, CheckOutcome::Mismatched);
        assert_eq!(e.checks[1].token_value.as_deref(), Some("5"));
        assert_eq!(e.checks[1].outcome, CheckOutcome::Mismatched);
        let repo = e
            .checks
            .iter()
            .find(|c| c.claim == "repository")
            .expect("repo");
        assert_eq!(repo.outcome, CheckOutcome::Missing);
        assert!(set.explain("api", &t).is_empty());
    }
}
