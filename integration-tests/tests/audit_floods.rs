//! Audit floods: a peer that has proven nothing, refused again and again
//! from one address, gets a budget of audit lines (burst, then one per
//! second); what is left out is counted and said in an `audit.suppressed`
//! line before the address's next line, and an admin's change made from
//! the same address meanwhile is in the trail.
//!
//! The refusals are junk client credentials at the OAuth token endpoint
//! (one curl, one kept-alive connection). The endpoint's own per-address
//! slow-down answers some of them `slow_down` before any decision, as
//! before: those were never audited, so the relation asserted is over the
//! `invalid_client` answers, the decisions that reached the trail.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{miren, temp, wait_for, Server};
use serde_json::Value;

/// Refused requests sent in the flood.
const REQUESTS: usize = 300;
/// `coordinator::audit_budget::BURST`.
const BURST: usize = 20;
const JUNK_CREDENTIALS: &str = "0123456789ab:wrong";
const FORM: &str = "grant_type=client_credentials&scope=app%3Aweb";

/// Answers of the token endpoint so far, by their RFC error code.
#[derive(Debug, Default)]
struct Answers {
    invalid_client: usize,
    slow_down: usize,
}

impl Answers {
    /// POSTs junk client credentials `count` times over one connection
    /// (curl reuses it for every URL) and counts the answers.
    fn send(&mut self, token_url: &str, ca: &Path, count: usize) {
        let out = Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(ca)
            .args(["-u", JUNK_CREDENTIALS, "--data-binary", FORM])
            .args(std::iter::repeat_n(token_url, count))
            .output()
            .expect("curl must be installed");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut seen = 0;
        for answer in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
            let answer = answer.unwrap_or_else(|e| panic!("{e}: {text}"));
            match answer["error"].as_str() {
                Some("invalid_client") => self.invalid_client += 1,
                Some("slow_down") => self.slow_down += 1,
                _ => panic!("unexpected answer: {answer}"),
            }
            seen += 1;
        }
        assert_eq!(seen, count, "one answer per request: {text}");
    }
}

/// Every line of the trail (one file: the flood is far below rotation).
fn trail(data_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(data_dir.join("audit/audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn an_anonymous_flood_is_budgeted_and_the_trail_says_what_it_left_out() {
    let dir = temp();
    let cfg = dir.path().join("admin.yaml");
    let server = Server::start(&dir.path().join("coord"), &cfg, "127.0.0.1:0", &[]);
    let token_url = format!("{}/oauth2/token", server.issuer_url().trim_end_matches('/'));
    let ca = server.ca_file();

    let started = Instant::now();
    let mut answers = Answers::default();
    answers.send(&token_url, &ca, REQUESTS);
    assert!(
        answers.invalid_client > BURST,
        "the flood must reach past the budget: {answers:?}"
    );

    // An admin's change from the same address, in the middle of it.
    let code = miren(&cfg, &["runner", "token", "create"], &[]);
    assert!(code.ok, "{code:?}");

    // What was left out is said before the address's next line: keep
    // refusing (slowly) until every refusal is either a line or counted
    // in an `audit.suppressed` line.
    let refused = |l: &Value| {
        l["action"] == "oauth.token" && l["result"] == "refused" && l["actor"] == "anonymous"
    };
    let suppressed = |l: &Value| l["action"] == "audit.suppressed" && l["event"] == "oauth.token";
    let (mut admitted, mut left_out, mut reports, mut lines) = (0, 0, 0, Vec::new());
    let settled = wait_for(Duration::from_secs(60), || {
        lines = trail(&server.data_dir);
        admitted = lines.iter().filter(|l| refused(l)).count();
        let said: Vec<&Value> = lines.iter().filter(|l| suppressed(l)).collect();
        reports = said.len();
        left_out = said
            .iter()
            .map(|l| l["count"].as_u64().unwrap_or(0))
            .sum::<u64>() as usize;
        if reports > 0 && admitted + left_out == answers.invalid_client {
            return true;
        }
        answers.send(&token_url, &ca, 1);
        false
    });
    let elapsed = started.elapsed().as_secs() as usize;
    eprintln!(
        "{answers:?}: {admitted} lines written, {left_out} left out, said in {reports} lines, {elapsed}s"
    );
    assert!(
        settled,
        "refusals {answers:?}, lines {admitted}, said left out {left_out} in {reports} lines: {lines:#?}"
    );

    // The budget: a burst, then about one a second.
    assert!(
        admitted <= BURST + elapsed + 1,
        "{admitted} lines in {elapsed}s: {answers:?}"
    );
    assert!(left_out > 0, "{answers:?}");
    for l in lines.iter().filter(|l| suppressed(l)) {
        assert_eq!(l["source"], "127.0.0.1", "{l}");
        assert_eq!(l["actor"], "anonymous", "{l}");
        assert!(l["count"].as_u64().is_some_and(|c| c > 0), "{l}");
    }
    // Each report comes right before the line that was admitted next.
    for (i, l) in lines.iter().enumerate() {
        if suppressed(l) {
            let next = lines[i + 1..].iter().find(|n| refused(n) || suppressed(n));
            assert!(next.is_some_and(refused), "{l} not followed by its line");
        }
    }
    // The admin's change is there, never budgeted.
    assert!(
        lines.iter().any(|l| l["action"] == "rpc"
            && l["actor"].as_str().is_some_and(|a| a.starts_with("admin:"))
            && l["result"] == "ok"),
        "no admin change in the trail: {lines:#?}"
    );
}
