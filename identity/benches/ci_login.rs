//! The pure cost of a CI login: verifying a GitHub-shaped OIDC token and
//! matching it against 10,000 CI bindings, next to the raw RSA-2048
//! signature check underneath (issue 6).
//!
//! `cargo bench -p identity --bench ci_login` builds a [`BindingSet`] of
//! 10,000 bindings (1,000 apps x 10, one generic issuer, subjects
//! `repo:org<i>/svc<j>:*` with `event_name` and `ref` conditions), an
//! RSA-2048 key, and one token per app minted with [`Minter::mint_claims`]
//! (the claims a GitHub Actions token carries). Then, on every core, each
//! phase runs for a fixed time split into slices interleaved with the other
//! phases (so outside load on a shared machine skews no ratio):
//!
//! * (a) raw aws-lc-rs RSA-2048 PKCS#1 SHA-256 verify of the same signing
//!   input, with the public key parsed once, as the `Verifier` holds it (the
//!   machine's limit); the same with the key re-parsed per call is shown too;
//! * (b) `Verifier::verify` + `BindingSet::matching(app, &claims, now)`, what the
//!   coordinator does per login once the issuer's keys are cached;
//! * (c) `BindingSet::matching` alone, in ns per match;
//!
//! and prints ops/s plus the ratio (b)/(a) against the target 0.70. Two
//! informational matching layouts follow: 10,000 bindings of one app whose
//! subjects have distinct literal prefixes (the prefix index narrows them to
//! one), and 10,000 bindings of one app whose subjects share the literal
//! prefix `repo:` (the index cannot narrow: every binding is tried). Timings
//! are reported, never asserted.
//!
//! Environment: `CI_LOGIN_BENCH_SECS` (measured time of each main phase,
//! default 3), `CI_LOGIN_BENCH_THREADS` (default: all cores). Under
//! `cargo test --benches` (no `--bench` argument) a quick pass shows the
//! bench still runs.

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    KeyPair as _, RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use identity::{Binding, BindingSet, Condition, KeySet, Minter, SigningKeyPair, Verifier};
use serde_json::{json, Map, Value};

const ISSUER: &str = "https://ci.example.com";
/// The cluster address a pipeline names as audience.
const AUDIENCE: &str = "miren.example.com:8443";
const APPS: usize = 1_000;
const BINDINGS_PER_APP: usize = 10;
const EVENTS: &str = "push,workflow_dispatch";
const REFS: &str = "refs/heads/main,refs/tags/v*";
const SLICES: u32 = 6;
const TARGET: f64 = 0.70;

/// One measured operation, called with (thread index, sequence number).
type Op<'a> = &'a (dyn Fn(usize, u64) + Sync);

struct Phase<'a> {
    name: String,
    op: Op<'a>,
    /// Operations between two clock reads.
    batch: u64,
    ops: Vec<u64>,
    elapsed: Vec<Duration>,
}

impl<'a> Phase<'a> {
    fn new(name: impl Into<String>, threads: usize, batch: u64, op: Op<'a>) -> Phase<'a> {
        Phase {
            name: name.into(),
            op,
            batch,
            ops: vec![0; threads],
            elapsed: vec![Duration::ZERO; threads],
        }
    }

    /// Runs the operation on every thread for about `duration`, all
    /// starting behind a barrier; adds the counts unless `record` is false.
    fn run(&mut self, duration: Duration, record: bool) {
        let threads = self.ops.len();
        let barrier = Barrier::new(threads);
        let (op, batch, done) = (self.op, self.batch, &self.ops);
        let results: Vec<(u64, Duration)> = thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let barrier = &barrier;
                    let first = done[t];
                    scope.spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        let deadline = start + duration;
                        let mut n = 0u64;
                        loop {
                            for _ in 0..batch {
                                op(t, first + n);
                                n += 1;
                            }
                            if Instant::now() >= deadline {
                                break;
                            }
                        }
                        (n, start.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread panicked"))
                .collect()
        });
        if record {
            for (t, (n, elapsed)) in results.into_iter().enumerate() {
                self.ops[t] += n;
                self.elapsed[t] += elapsed;
            }
        }
    }

    fn total(&self) -> u64 {
        self.ops.iter().sum()
    }

    /// Sum over threads of each thread's operations over its own time.
    fn rate(&self) -> f64 {
        self.ops
            .iter()
            .zip(&self.elapsed)
            .map(|(n, t)| *n as f64 / t.as_secs_f64().max(f64::MIN_POSITIVE))
            .sum()
    }

    /// Wall time of one operation on one thread, in nanoseconds.
    fn ns_per_op(&self) -> f64 {
        self.ops.len() as f64 * 1e9 / self.rate().max(f64::MIN_POSITIVE)
    }
}

/// Warms every phase up, then runs them in interleaved slices.
fn measure(phases: &mut [Phase<'_>], duration: Duration, warmup: Duration) {
    for p in phases.iter_mut() {
        p.run(warmup, false);
    }
    let slice = duration / SLICES;
    for _ in 0..SLICES {
        for p in phases.iter_mut() {
            p.run(slice, true);
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn verdict(ratio: f64) -> &'static str {
    if ratio >= TARGET {
        "PASS"
    } else {
        "MISS"
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not a JSON object: {other}"),
    }
}

/// The 10,000 bindings: app `app<i>` trusts `repo:org<i>/svc<j>:*` on push
/// or workflow_dispatch, from main or a `v*` tag.
fn spread_bindings() -> Vec<Binding> {
    let mut out = Vec::with_capacity(APPS * BINDINGS_PER_APP);
    for a in 0..APPS {
        for j in 0..BINDINGS_PER_APP {
            let conditions = vec![
                Condition::parse("event_name", EVENTS).expect("events"),
                Condition::parse("ref", REFS).expect("refs"),
            ];
            out.push(
                Binding::generic(
                    &format!("b{a:04}{j:02}"),
                    &format!("app{a:04}"),
                    ISSUER,
                    &format!("repo:org{a}/svc{j}:*"),
                    conditions,
                    "",
                )
                .expect("valid binding"),
            );
        }
    }
    out
}

/// 10,000 bindings of one app, all trusting `subject(i)`.
fn one_app_bindings(n: usize, subject: impl Fn(usize) -> String) -> Vec<Binding> {
    (0..n)
        .map(|i| {
            Binding::generic(
                &format!("x{i:05}"),
                "web",
                ISSUER,
                &subject(i),
                vec![Condition::parse("event_name", EVENTS).expect("events")],
                "",
            )
            .expect("valid binding")
        })
        .collect()
}

/// GitHub-shaped claims of a push to main of `repo`.
fn github_claims(repo: &str, now: i64, jti: &str) -> Value {
    let git_ref = "refs/heads/main";
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": format!("repo:{repo}:ref:{git_ref}"),
        "repository": repo,
        "repository_owner": repo.split('/').next().unwrap_or_default(),
        "event_name": "push",
        "ref": git_ref,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": jti,
    })
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let threads = env_number("CI_LOGIN_BENCH_THREADS")
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
    let secs = env_number("CI_LOGIN_BENCH_SECS").unwrap_or(3);
    let (duration, warmup) = if benching {
        (Duration::from_secs(secs), Duration::from_millis(300))
    } else {
        (Duration::from_millis(60), Duration::from_millis(10))
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let setup = Instant::now();

    // Keys, verifier and the bindings, as the coordinator holds them.
    let key = SigningKeyPair::generate().expect("RSA-2048 key");
    let minter = Minter::new(&key).expect("minter");
    let keys = KeySet::from_keys([key.public_key().clone()]).expect("key set");
    let verifier = Verifier::new(keys, [ISSUER], [AUDIENCE]);
    let built = Instant::now();
    let set = BindingSet::from_bindings(spread_bindings()).expect("binding set");
    let build_ms = built.elapsed().as_secs_f64() * 1e3;
    assert_eq!(set.len(), APPS * BINDINGS_PER_APP);

    // One token per app, for a repository its last binding names (the
    // bindings of an app are tried in id order).
    let quick_apps = if benching { APPS } else { 50 };
    let mut logins: Vec<(String, String)> = Vec::with_capacity(quick_apps);
    for a in 0..quick_apps {
        let j = BINDINGS_PER_APP - 1 - (a % 3);
        let repo = format!("org{a}/svc{j}");
        let jti = format!("{a:08x}-0000-4000-8000-000000000000");
        let token = minter
            .mint_claims(&github_claims(&repo, now, &jti))
            .expect("mint");
        let verified = verifier.verify(&token, now).expect("verify our token");
        let binding = set
            .matching(&format!("app{a:04}"), &verified.claims, now)
            .expect("a binding matches");
        assert_eq!(binding.binding.id, format!("b{a:04}{j:02}"));
        logins.push((format!("app{a:04}"), token));
    }
    // A token from another repository matches nothing.
    let stranger = verifier
        .verify(
            &minter
                .mint_claims(&github_claims("evil/svc0", now, "x"))
                .expect("mint"),
            now,
        )
        .expect("verify");
    assert!(set.matching("app0000", &stranger.claims, now).is_err());

    // Verified claims, for matching alone.
    let claims: Vec<(String, Map<String, Value>)> = logins
        .iter()
        .map(|(app, token)| {
            let v = verifier.verify(token, now).expect("verify");
            (app.clone(), v.claims)
        })
        .collect();

    // Raw aws-lc-rs material: an RSA-2048 signature over a token's signing
    // input, with the same key.
    let token = &logins[0].1;
    let dot = token.rfind('.').expect("JWT");
    let message = token.as_bytes()[..dot].to_vec();
    let raw_key = RsaKeyPair::from_pkcs8(key.pkcs8_der()).expect("aws-lc-rs key");
    let mut signature = vec![0u8; raw_key.public_modulus_len()];
    raw_key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            &message,
            &mut signature,
        )
        .expect("raw sign");
    let public_der = raw_key.public_key().as_ref().to_vec();
    let unparsed = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_der.as_slice());
    let parsed = unparsed.parse().expect("parse public key");
    parsed.verify_sig(&message, &signature).expect("raw verify");

    // The informational layouts: one app, 10,000 bindings.
    let n_one = APPS * BINDINGS_PER_APP;
    let distinct = BindingSet::from_bindings(one_app_bindings(n_one, |i| {
        format!("repo:org{}/app{i}:*", i % 100)
    }))
    .expect("binding set");
    let shared =
        BindingSet::from_bindings(one_app_bindings(n_one, |i| format!("repo:*/app{i}:ref:*")))
            .expect("binding set");
    let last = n_one - 1;
    let distinct_claims = object(github_claims(
        &format!("org{}/app{last}", last % 100),
        now,
        "d",
    ));
    let shared_claims = object(github_claims(&format!("acme/app{last}"), now, "s"));
    assert_eq!(
        distinct
            .matching("web", &distinct_claims, now)
            .expect("match")
            .binding
            .id,
        format!("x{last:05}")
    );
    assert_eq!(
        shared
            .matching("web", &shared_claims, now)
            .expect("match")
            .binding
            .id,
        format!("x{last:05}")
    );
    let setup_s = setup.elapsed().as_secs_f64();

    println!(
        "CI login bench (pure): RSA-2048 RS256, {threads} thread(s), {} bindings ({APPS} apps x \
         {BINDINGS_PER_APP}, issuer {ISSUER}, event_name + ref conditions), {} tokens, token {} \
         bytes",
        set.len(),
        logins.len(),
        token.len()
    );
    println!(
        "{:.1} s per main phase in {SLICES} interleaved slices (+{} ms warm-up); binding set \
         built in {build_ms:.1} ms; setup {setup_s:.1} s",
        duration.as_secs_f64(),
        warmup.as_millis()
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        println!("load average before the run: {}", load.join(" "));
    }

    let (message, signature) = (message.as_slice(), signature.as_slice());
    let (verifier, set, logins, claims) = (&verifier, &set, &logins, &claims);
    let raw_parsed = move |_: usize, _: u64| {
        black_box(parsed.verify_sig(black_box(message), signature)).expect("raw verify");
    };
    let raw_unparsed = move |_: usize, _: u64| {
        black_box(unparsed.verify(black_box(message), signature)).expect("raw verify");
    };
    let verify_only = move |t: usize, seq: u64| {
        let (_, token) = &logins[(seq as usize + t * 97) % logins.len()];
        black_box(verifier.verify(token, now).expect("verify"));
    };
    let login = move |t: usize, seq: u64| {
        let (app, token) = &logins[(seq as usize + t * 97) % logins.len()];
        let verified = verifier.verify(token, now).expect("verify");
        let binding = set.matching(app, &verified.claims, now).expect("match");
        black_box(binding);
    };
    let match_only = move |t: usize, seq: u64| {
        let (app, c) = &claims[(seq as usize + t * 97) % claims.len()];
        black_box(set.matching(black_box(app), c, now).expect("match"));
    };
    let mut main = [
        Phase::new(
            "(a) raw verify, parsed key (aws-lc-rs)",
            threads,
            1,
            &raw_parsed,
        ),
        Phase::new(
            "    raw verify, key parsed per call",
            threads,
            1,
            &raw_unparsed,
        ),
        Phase::new("    Verifier::verify alone", threads, 1, &verify_only),
        Phase::new(
            "(b) Verifier::verify + BindingSet::matching",
            threads,
            1,
            &login,
        ),
        Phase::new(
            "(c) matching alone, 10k bindings / 1k apps",
            threads,
            256,
            &match_only,
        ),
    ];
    measure(&mut main, duration, warmup);

    let distinct = &distinct;
    let distinct_claims = &distinct_claims;
    let shared = &shared;
    let shared_claims = &shared_claims;
    let one_distinct = move |_: usize, _: u64| {
        black_box(
            distinct
                .matching("web", black_box(distinct_claims), now)
                .ok(),
        );
    };
    let one_shared = move |_: usize, _: u64| {
        black_box(shared.matching("web", black_box(shared_claims), now).ok());
    };
    let mut extra = [
        Phase::new(
            "    matching, 10k of one app, distinct prefixes",
            threads,
            256,
            &one_distinct,
        ),
        Phase::new(
            "    matching, 10k of one app, shared prefix",
            threads,
            1,
            &one_shared,
        ),
    ];
    measure(&mut extra, duration / 3, warmup / 3);

    println!();
    println!(
        "{:<48} {:>11} {:>12} {:>14}",
        "phase", "ops", "ops/s", "ns/op/thread"
    );
    for p in main.iter().chain(extra.iter()) {
        println!(
            "{:<48} {:>11} {:>12.0} {:>14.0}",
            p.name,
            p.total(),
            p.rate(),
            p.ns_per_op()
        );
    }

    let [raw, raw_unparsed, verify, login, matching] = &main;
    let ratio = login.rate() / raw.rate();
    println!();
    println!(
        "(b) / (a)  verify+match / raw verify    = {ratio:.3}  (target >= {TARGET:.2}) {}",
        verdict(ratio)
    );
    println!(
        "(b) / raw verify with key parsed per call = {:.3}  (informational)",
        login.rate() / raw_unparsed.rate()
    );
    println!(
        "verify alone / (a)                      = {:.3}  (informational)",
        verify.rate() / raw.rate()
    );
    println!(
        "matching: {:.0} ns per match with {} bindings ({:.2}% of a login's time on one thread)",
        matching.ns_per_op(),
        set.len(),
        100.0 * matching.ns_per_op() / login.ns_per_op()
    );
    if !benching {
        println!("(quick pass: run `cargo bench -p identity --bench ci_login` for real numbers)");
    }
}
