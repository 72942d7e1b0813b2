//! Throughput of minting and verifying workload tokens against the raw
//! aws-lc-rs RSA-2048 operations underneath them.
//!
//! `cargo bench -p identity --bench tokens` runs every phase on all cores for
//! a fixed duration (split into slices interleaved with the other phases, so
//! outside load on a shared machine skews no ratio), counts the operations
//! done, and prints ops/s plus two ratios: `mint / raw sign` (target >= 0.85)
//! and `verify / raw verify` (target >= 0.70). Timings are reported, never
//! asserted.
//!
//! Environment: `TOKENS_BENCH_SECS` overrides the measured duration of each
//! phase (default 3), `TOKENS_BENCH_THREADS` the thread count (default: all
//! cores).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    KeyPair as _, RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use identity::{KeySet, Minter, SigningKeyPair, Subject, Verifier, WorkloadClaims};

const ISSUER: &str = "https://coordinator.miren.example";
const CLUSTER_ID: &str = "c-6f1d2a9e-bench";
const AUDIENCE: &str = "sts.amazonaws.com";
const TTL_SECS: u64 = 300;
const WARMUP: Duration = Duration::from_millis(300);
const SLICES: u32 = 6;
const MINT_TARGET: f64 = 0.85;
const VERIFY_TARGET: f64 = 0.70;

/// The operation a worker thread repeats; gets a per-thread sequence number.
type Op<'a> = Box<dyn FnMut(u64) + 'a>;

/// Builds one thread's operation (outside the timed region) from its index.
type MakeOp<'a> = Box<dyn Fn(usize) -> Op<'a> + Sync + 'a>;

/// One measured phase and what it has counted so far, per thread.
struct Phase<'a> {
    name: &'static str,
    make_op: MakeOp<'a>,
    ops: Vec<u64>,
    elapsed: Vec<Duration>,
}

impl<'a> Phase<'a> {
    fn new(name: &'static str, threads: usize, make_op: MakeOp<'a>) -> Self {
        Phase {
            name,
            make_op,
            ops: vec![0; threads],
            elapsed: vec![Duration::ZERO; threads],
        }
    }

    /// Total operations counted.
    fn total_ops(&self) -> u64 {
        self.ops.iter().sum()
    }

    /// Sum over threads of each thread's own ops / own elapsed time, so the
    /// last operation that overshoots a slice is paid for, not given away.
    fn ops_per_sec(&self) -> f64 {
        self.ops
            .iter()
            .zip(&self.elapsed)
            .map(|(n, t)| *n as f64 / t.as_secs_f64().max(f64::MIN_POSITIVE))
            .sum()
    }

    /// Runs the operation on every thread for `duration`, starting together
    /// behind a barrier; counts the result unless `record` is false (warm-up).
    fn run_slice(&mut self, duration: Duration, record: bool) {
        let threads = self.ops.len();
        let barrier = Barrier::new(threads);
        let make_op = &self.make_op;
        let offsets = &self.ops;
        let results: Vec<(u64, Duration)> = thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|index| {
                    let barrier = &barrier;
                    let first_seq = offsets[index];
                    scope.spawn(move || {
                        let mut op = make_op(index);
                        barrier.wait();
                        let start = Instant::now();
                        let deadline = start + duration;
                        let mut ops = 0u64;
                        loop {
                            op(first_seq + ops);
                            ops += 1;
                            if Instant::now() >= deadline {
                                break;
                            }
                        }
                        (ops, start.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("benchmark thread panicked"))
                .collect()
        });
        if record {
            for (index, (ops, elapsed)) in results.into_iter().enumerate() {
                self.ops[index] += ops;
                self.elapsed[index] += elapsed;
            }
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// A UUID-shaped jti unique per thread and sequence number, as cheap to
/// build as the real one is to draw.
fn jti(thread: usize, seq: u64) -> String {
    format!("{thread:08x}-0000-4000-8000-{seq:012x}")
}

fn claims(subject: &Subject, audiences: &[String], now: i64, jti: String) -> WorkloadClaims {
    WorkloadClaims::new(
        ISSUER,
        CLUSTER_ID,
        subject,
        audiences,
        Some(TTL_SECS),
        now,
        jti,
    )
    .expect("valid claims")
}

fn verdict(ratio: f64, target: f64) -> &'static str {
    if ratio >= target {
        "PASS"
    } else {
        "MISS"
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then a single quick pass is enough to show the bench still runs.
    let benching = std::env::args().any(|a| a == "--bench");
    let threads = env_number("TOKENS_BENCH_THREADS")
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
    let secs = env_number("TOKENS_BENCH_SECS").unwrap_or(3);
    let duration = if benching {
        Duration::from_secs(secs)
    } else {
        Duration::from_millis(50)
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));

    let key = SigningKeyPair::generate().expect("generate RSA-2048 key");
    let subject = Subject::new("org-1", "web", "sb-0123456789abcdef").expect("valid subject");
    let audiences = vec![AUDIENCE.to_string()];

    // Raw aws-lc-rs material: the same key, a ~300-byte message, its signature.
    let raw_key = Arc::new(RsaKeyPair::from_pkcs8(key.pkcs8_der()).expect("aws-lc-rs RSA key"));
    let public_der: Vec<u8> = raw_key.public_key().as_ref().to_vec();
    let message: Vec<u8> = (0..300u32).map(|i| b'A' + (i % 26) as u8).collect();
    let mut raw_signature = vec![0u8; raw_key.public_modulus_len()];
    raw_key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            &message,
            &mut raw_signature,
        )
        .expect("raw sign");
    let raw_public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_der.clone());
    raw_public
        .verify(&message, &raw_signature)
        .expect("raw verify");
    let parsed_public = raw_public.parse().expect("parse public key");

    // Our side: one shared minter and verifier, as the coordinator holds them.
    let minter = Minter::new(&key).expect("minter");
    let keyset = KeySet::from_keys([key.public_key().clone()]).expect("key set");
    let verifier = Verifier::new(keyset, [ISSUER], [AUDIENCE]);
    let token = minter
        .mint(&claims(&subject, &audiences, now, jti(0, 0)))
        .expect("mint");
    let verified = verifier.verify(&token, now).expect("verify own token");
    assert_eq!(
        verified.subject,
        "org:org-1:app:web:sandbox:sb-0123456789abcdef"
    );

    let slice = duration / SLICES;
    println!(
        "identity token throughput: RSA-2048 RS256, {threads} thread(s), {:.1} s per phase \
         in {SLICES} interleaved slices of {} ms (+{} ms warm-up each), token {} bytes",
        duration.as_secs_f64(),
        slice.as_millis(),
        WARMUP.as_millis(),
        token.len()
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "load average before the run: {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    let raw_key = &raw_key;
    let (message, raw_signature) = (message.as_slice(), raw_signature.as_slice());
    let (public_der, parsed_public) = (public_der.as_slice(), &parsed_public);
    let (minter, verifier, token) = (&minter, &verifier, token.as_str());
    let (subject, audiences) = (&subject, audiences.as_slice());
    let mut phases = [
        Phase::new(
            "1. raw sign    (aws-lc RsaKeyPair::sign)",
            threads,
            Box::new(move |_| {
                let rng = SystemRandom::new();
                let key = Arc::clone(raw_key);
                let mut signature = vec![0u8; key.public_modulus_len()];
                Box::new(move |_| {
                    key.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                        .expect("raw sign");
                    black_box(&signature);
                })
            }),
        ),
        Phase::new(
            "2. mint        (claims + Minter::mint)",
            threads,
            Box::new(move |index| {
                Box::new(move |seq| {
                    let claims = claims(subject, audiences, now, jti(index, seq));
                    black_box(minter.mint(&claims).expect("mint"));
                })
            }),
        ),
        Phase::new(
            "3. raw verify  (UnparsedPublicKey::verify)",
            threads,
            Box::new(move |_| {
                let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_der);
                Box::new(move |_| {
                    black_box(public.verify(message, raw_signature)).expect("raw verify");
                })
            }),
        ),
        Phase::new(
            "3b. raw verify (ParsedPublicKey::verify_sig)",
            threads,
            Box::new(move |_| {
                Box::new(move |_| {
                    black_box(parsed_public.verify_sig(message, raw_signature))
                        .expect("raw verify");
                })
            }),
        ),
        Phase::new(
            "4. verify      (Verifier::verify)",
            threads,
            Box::new(move |_| {
                Box::new(move |_| {
                    black_box(verifier.verify(token, now).expect("verify"));
                })
            }),
        ),
    ];

    // Interleaving the phases spreads any outside load (other processes on a
    // shared machine) over all of them instead of skewing one ratio.
    for phase in phases.iter_mut() {
        phase.run_slice(WARMUP, false);
    }
    for _ in 0..SLICES {
        for phase in phases.iter_mut() {
            phase.run_slice(slice, true);
        }
    }

    println!();
    println!(
        "{:<46} {:>10} {:>12} {:>14}",
        "phase", "ops", "ops/s", "us/op/thread"
    );
    for phase in &phases {
        let rate = phase.ops_per_sec();
        println!(
            "{:<46} {:>10} {:>12.0} {:>14.2}",
            phase.name,
            phase.total_ops(),
            rate,
            threads as f64 * 1e6 / rate
        );
    }

    let [raw_sign, mint, raw_verify, raw_verify_parsed, verify] = &phases;
    let mint_ratio = mint.ops_per_sec() / raw_sign.ops_per_sec();
    let verify_ratio = verify.ops_per_sec() / raw_verify.ops_per_sec();
    let verify_parsed_ratio = verify.ops_per_sec() / raw_verify_parsed.ops_per_sec();
    println!();
    println!(
        "mint / raw sign                    = {mint_ratio:.3}  (target >= {MINT_TARGET:.2}) {}",
        verdict(mint_ratio, MINT_TARGET)
    );
    println!(
        "verify / raw verify                = {verify_ratio:.3}  (target >= {VERIFY_TARGET:.2}) {}",
        verdict(verify_ratio, VERIFY_TARGET)
    );
    println!("verify / raw verify (3b, parsed)   = {verify_parsed_ratio:.3}  (informational)");
    if !benching {
        println!("(quick pass: run `cargo bench -p identity --bench tokens` for real numbers)");
    }
}
