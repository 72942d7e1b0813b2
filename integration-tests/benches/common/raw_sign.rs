//! The machine's own RSA limit, which the token benches are measured
//! against: raw aws-lc-rs RSA-2048 PKCS#1 SHA-256 signing on every core.

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};

/// Raw RSA-2048 PKCS#1 SHA-256 signatures on `threads` threads for `limit`:
/// (signatures, wall time).
pub fn raw_sign(threads: usize, limit: Duration) -> anyhow::Result<(u64, Duration)> {
    let key = identity::SigningKeyPair::generate().map_err(|e| anyhow!("{e}"))?;
    let key = RsaKeyPair::from_pkcs8(key.pkcs8_der()).map_err(|e| anyhow!("{e}"))?;
    // About the size of a workload token's signing input.
    let message = vec![b'e'; 640];
    let barrier = Barrier::new(threads + 1);
    let (count, wall) = thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (key, message, barrier) = (&key, &message, &barrier);
                sc.spawn(move || {
                    let rng = SystemRandom::new();
                    let mut sig = vec![0u8; key.public_modulus_len()];
                    barrier.wait();
                    let deadline = Instant::now() + limit;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        if key.sign(&RSA_PKCS1_SHA256, &rng, message, &mut sig).is_ok() {
                            n += 1;
                        }
                        std::hint::black_box(&sig);
                    }
                    n
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let count: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        (count, t0.elapsed())
    });
    Ok((count, wall))
}
