//! CI bindings and their explanations between Cap'n Proto and
//! `identity`'s types, for both ends: the coordinator's `Admin` service and
//! the CLI (`miren auth ci`), so the two cannot read a field differently.
//! Nothing here decides anything: a binding read here is checked by
//! `identity` where it is used.

use identity::bindings::{Binding, Condition, IdPin};
use identity::{Check, CheckOutcome, Explanation, Verdict};
use schema::miren_capnp::{
    ci_binding, ci_binding_explanation, ci_binding_test, ci_check, CiCheckOutcome, CiVerdict,
};

fn text(r: capnp::text::Reader<'_>) -> Result<String, capnp::Error> {
    Ok(r.to_str()?.to_string())
}

fn texts(r: capnp::text_list::Reader<'_>) -> Result<Vec<String>, capnp::Error> {
    r.iter().map(|t| text(t?)).collect()
}

fn set_texts(mut b: capnp::text_list::Builder<'_>, items: &[String]) {
    for (i, item) in items.iter().enumerate() {
        b.set(i as u32, item.as_str());
    }
}

/// Writes `binding` into `b`.
pub fn write_binding(mut b: ci_binding::Builder<'_>, binding: &Binding) {
    b.set_id(binding.id.as_str());
    b.set_app(binding.app.as_str());
    b.set_provider(binding.provider.as_str());
    b.set_issuer(binding.issuer.as_str());
    b.set_subject(binding.subject.as_str());
    b.set_description(binding.description.as_str());
    b.set_allow_broad(binding.allow_broad);
    b.set_created_unix(binding.created_unix);
    let mut conditions = b
        .reborrow()
        .init_conditions(binding.conditions.len() as u32);
    for (i, c) in binding.conditions.iter().enumerate() {
        let mut out = conditions.reborrow().get(i as u32);
        out.set_claim(c.claim.as_str());
        set_texts(out.init_patterns(c.patterns.len() as u32), &c.patterns);
    }
    let mut ids = b.init_ids(binding.ids.len() as u32);
    for (i, pin) in binding.ids.iter().enumerate() {
        let mut out = ids.reborrow().get(i as u32);
        out.set_claim(pin.claim.as_str());
        out.set_value(pin.value.as_str());
        out.set_learned(pin.learned_unix.is_some());
        out.set_learned_unix(pin.learned_unix.unwrap_or(0));
    }
}

/// Reads a binding as sent (unchecked: the receiver validates it).
pub fn read_binding(r: ci_binding::Reader<'_>) -> Result<Binding, capnp::Error> {
    let conditions = r
        .get_conditions()?
        .iter()
        .map(|c| {
            Ok(Condition {
                claim: text(c.get_claim()?)?,
                patterns: texts(c.get_patterns()?)?,
            })
        })
        .collect::<Result<Vec<_>, capnp::Error>>()?;
    let ids = r
        .get_ids()?
        .iter()
        .map(|p| {
            Ok(IdPin {
                claim: text(p.get_claim()?)?,
                value: text(p.get_value()?)?,
                learned_unix: p.get_learned().then_some(p.get_learned_unix()),
            })
        })
        .collect::<Result<Vec<_>, capnp::Error>>()?;
    Ok(Binding {
        id: text(r.get_id()?)?,
        app: text(r.get_app()?)?,
        provider: text(r.get_provider()?)?,
        issuer: text(r.get_issuer()?)?,
        subject: text(r.get_subject()?)?,
        conditions,
        description: text(r.get_description()?)?,
        ids,
        allow_broad: r.get_allow_broad(),
        created_unix: r.get_created_unix(),
    })
}

fn outcome_to_wire(o: CheckOutcome) -> CiCheckOutcome {
    match o {
        CheckOutcome::Matched => CiCheckOutcome::Matched,
        CheckOutcome::Mismatched => CiCheckOutcome::Mismatched,
        CheckOutcome::Missing => CiCheckOutcome::Missing,
        CheckOutcome::WillPin => CiCheckOutcome::WillPin,
    }
}

fn outcome_from_wire(o: CiCheckOutcome) -> CheckOutcome {
    match o {
        CiCheckOutcome::Matched => CheckOutcome::Matched,
        CiCheckOutcome::Mismatched => CheckOutcome::Mismatched,
        CiCheckOutcome::Missing => CheckOutcome::Missing,
        CiCheckOutcome::WillPin => CheckOutcome::WillPin,
    }
}

fn write_check(mut b: ci_check::Builder<'_>, check: &Check) {
    b.set_claim(check.claim.as_str());
    b.set_has_value(check.token_value.is_some());
    b.set_token_value(check.token_value.as_deref().unwrap_or(""));
    b.set_outcome(outcome_to_wire(check.outcome));
    set_texts(
        b.init_expected(check.expected.len() as u32),
        &check.expected,
    );
}

fn read_check(r: ci_check::Reader<'_>) -> Result<Check, capnp::Error> {
    Ok(Check {
        claim: text(r.get_claim()?)?,
        expected: texts(r.get_expected()?)?,
        token_value: if r.get_has_value() {
            Some(text(r.get_token_value()?)?)
        } else {
            None
        },
        outcome: outcome_from_wire(r.get_outcome()?),
    })
}

/// A binding's verdict as it travels: a drift carries its words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireVerdict {
    Accepts,
    NoMatch,
    Drift(String),
}

/// One binding's explanation as read from the wire.
#[derive(Debug, Clone)]
pub struct ExplainedBinding {
    pub binding: Binding,
    pub checks: Vec<Check>,
    pub verdict: WireVerdict,
}

/// `Admin.testCiBinding`'s answer as read from the wire.
#[derive(Debug, Clone)]
pub struct BindingTest {
    /// Why a login would refuse the token before matching; `None` when
    /// it verifies.
    pub token_problem: Option<String>,
    pub bindings: Vec<ExplainedBinding>,
}

fn write_explanation(mut b: ci_binding_explanation::Builder<'_>, e: &Explanation) {
    write_binding(b.reborrow().init_binding(), &e.binding);
    let (verdict, drift) = match &e.verdict {
        Verdict::Accepts => (CiVerdict::Accepts, String::new()),
        Verdict::NoMatch => (CiVerdict::NoMatch, String::new()),
        Verdict::Drift(d) => (CiVerdict::Drift, d.to_string()),
    };
    b.set_verdict(verdict);
    b.set_drift(drift.as_str());
    let mut checks = b.init_checks(e.checks.len() as u32);
    for (i, c) in e.checks.iter().enumerate() {
        write_check(checks.reborrow().get(i as u32), c);
    }
}

/// Writes a token test: the verification's refusal (`None`: it verified)
/// and every binding's explanation.
pub fn write_test(
    mut b: ci_binding_test::Builder<'_>,
    token_problem: Option<&str>,
    explanations: &[Explanation],
) {
    b.set_token_valid(token_problem.is_none());
    b.set_token_problem(token_problem.unwrap_or(""));
    let mut list = b.init_bindings(explanations.len() as u32);
    for (i, e) in explanations.iter().enumerate() {
        write_explanation(list.reborrow().get(i as u32), e);
    }
}

/// Reads a token test.
pub fn read_test(r: ci_binding_test::Reader<'_>) -> Result<BindingTest, capnp::Error> {
    let bindings = r
        .get_bindings()?
        .iter()
        .map(|e| {
            let verdict = match e.get_verdict()? {
                CiVerdict::Accepts => WireVerdict::Accepts,
                CiVerdict::NoMatch => WireVerdict::NoMatch,
                CiVerdict::Drift => WireVerdict::Drift(text(e.get_drift()?)?),
            };
            Ok(ExplainedBinding {
                binding: read_binding(e.get_binding()?)?,
                checks: e
                    .get_checks()?
                    .iter()
                    .map(read_check)
                    .collect::<Result<Vec<_>, capnp::Error>>()?,
                verdict,
            })
        })
        .collect::<Result<Vec<_>, capnp::Error>>()?;
    Ok(BindingTest {
        token_problem: if r.get_token_valid() {
            None
        } else {
            Some(text(r.get_token_problem()?)?)
        },
        bindings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_and_a_test_cross_the_wire_unchanged() {
        let binding = Binding::github(
            "b1",
            "web",
            "acme/web",
            None,
            None,
            Some("refs/heads/main"),
            "d",
        )
        .unwrap()
        .with_ids(vec![IdPin::given("repository_id", "42").unwrap()])
        .unwrap();
        let mut learned = binding.clone();
        learned.ids.push(IdPin {
            claim: "repository_owner_id".into(),
            value: "7".into(),
            learned_unix: Some(99),
        });
        learned.allow_broad = true;
        learned.created_unix = 5;
        let mut message = capnp::message::Builder::new_default();
        write_binding(message.init_root(), &learned);
        let back = read_binding(message.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(back, learned);

        let set = identity::BindingSet::from_bindings([binding]).unwrap();
        let claims = match serde_json::json!({
            "iss": identity::bindings::GITHUB_ISSUER, "sub": "repo:acme/web:ref:refs/heads/main",
            "repository": "acme/web", "event_name": "push", "ref": "refs/heads/main",
            "repository_id": "43",
        }) {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        let explained = set.explain("web", &claims);
        let mut message = capnp::message::Builder::new_default();
        write_test(message.init_root(), Some("expired"), &explained);
        let test = read_test(message.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(test.token_problem.as_deref(), Some("expired"));
        assert_eq!(test.bindings.len(), 1);
        assert_eq!(test.bindings[0].checks, explained[0].checks);
        assert!(
            matches!(&test.bindings[0].verdict, WireVerdict::Drift(w) if w.contains("pinned 42")),
            "{:?}",
            test.bindings[0].verdict
        );
    }
}
