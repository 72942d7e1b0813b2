//! What route OIDC adds to every request of a logged-in user, against the
//! machine's own limit for the one expensive step in it.
//!
//! `cargo bench -p coordinator --bench sso_session` repeats, on one thread,
//! what the ingress does for a request with a session cookie: strip spoofed
//! claim headers from a realistic header set (`HeaderFilter::strips`), open
//! and parse the sealed cookie (`Sso::session`: base64, AES-256-GCM open with
//! the host as associated data, JSON, expiry and logout checks) and render
//! the claim headers (`claim_headers`). Its limit is a raw aws-lc-rs
//! AES-256-GCM open of a buffer the size of the same cookie. Phases are
//! interleaved in slices so outside load skews neither side. Prints
//! requests/s, raw opens/s and their ratio; nothing is asserted.
//!
//! `SSO_BENCH_SECS` sets the measured time per phase (default 3).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use coordinator::sso::{CookieScope, Sso, SESSION_COOKIE, SESSION_ID_CLAIM};
use coordinator::store::RedbStore;
use identity::route_oidc::{claim_headers, ClaimHeader, HeaderFilter, SessionClaims};

const SLICES: u32 = 6;
const HOST: &str = "app.example.com";

fn main() {
    let secs: f64 = std::env::var("SSO_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let slice = Duration::from_secs_f64(secs / SLICES as f64);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RedbStore::open(&dir.path().join("store.redb")).expect("store"));
    let sso = Sso::load_or_create(dir.path(), store).expect("sso");
    let now = 1_700_000_000;

    // A session as a login keeps it: the mapped claims and the session id
    // (the ingress keeps no others).
    let serde_json::Value::Object(mut claims) = serde_json::json!({
        "email": "jane.doe@example.com", "name": "Jane Doe",
        "groups": ["engineering", "on-call", "admins"],
    }) else {
        unreachable!("object literal")
    };
    claims.insert(SESSION_ID_CLAIM.into(), "x".repeat(43).into());
    let session = SessionClaims::start(
        "248289761001".into(),
        claims,
        now + 3600,
        Some("r".repeat(64)),
        now,
        8 * 3600,
    );
    let scope = CookieScope {
        secure: true,
        host: HOST,
        issuer: "https://login.example.com",
        client_id: "miren-route",
    };
    let sealed = sso.seal_session(&scope, &session).expect("seal");
    let cookies = format!(
        "_ga=GA1.2.3; theme=dark; {}={sealed}",
        scope.cookie_name(SESSION_COOKIE)
    );
    let mappings: Vec<ClaimHeader> = [
        "email:X-User-Email",
        "groups:X-User-Groups",
        "name:X-User-Name",
    ]
    .iter()
    .map(|m| m.parse().expect("mapping"))
    .collect();
    let filter = HeaderFilter::new(&mappings);
    let request_headers = [
        "host",
        "user-agent",
        "accept",
        "accept-language",
        "accept-encoding",
        "cookie",
        "referer",
        "sec-fetch-dest",
        "sec-fetch-mode",
        "x_user_email",
        "upgrade-insecure-requests",
    ];

    let per_request = || {
        let stripped = request_headers.iter().filter(|h| filter.strips(h)).count();
        let s = sso.session(&scope, &cookies, now).expect("session opens");
        let headers = claim_headers(&mappings, &s.claims);
        black_box((stripped, headers));
    };

    // The raw limit: AES-256-GCM open of a buffer the size of this cookie.
    let raw_len = URL_SAFE_NO_PAD.decode(&sealed).expect("base64").len() - NONCE_LEN;
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9u8; 32]).expect("key"));
    let mut template = vec![0u8; raw_len - 16];
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([1; NONCE_LEN]),
        Aad::from(HOST.as_bytes()),
        &mut template,
    )
    .expect("seal");
    let raw_open = || {
        let mut buf = template.clone();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key([1; NONCE_LEN]),
                Aad::from(HOST.as_bytes()),
                &mut buf,
            )
            .expect("open");
        black_box(plain.len());
    };

    for _ in 0..1000 {
        per_request();
        raw_open();
    }
    // Runs `op` in batches of 100 for one slice; adds to (count, time).
    let run_slice = |op: &dyn Fn(), total: &mut (u64, Duration)| {
        let start = Instant::now();
        while start.elapsed() < slice {
            for _ in 0..100 {
                op();
            }
            total.0 += 100;
        }
        total.1 += start.elapsed();
    };
    let (mut gate, mut raw) = ((0u64, Duration::ZERO), (0u64, Duration::ZERO));
    for _ in 0..SLICES {
        run_slice(&per_request, &mut gate);
        run_slice(&raw_open, &mut raw);
    }
    let gate_rate = gate.0 as f64 / gate.1.as_secs_f64();
    let raw_rate = raw.0 as f64 / raw.1.as_secs_f64();
    println!(
        "cookie: {} bytes sealed, {raw_len} bytes of ciphertext",
        sealed.len()
    );
    println!(
        "route OIDC per request (strip + open session + claim headers): {gate_rate:.0}/s ({:.2} us each)",
        1e6 / gate_rate
    );
    println!(
        "raw AES-256-GCM open of the same size: {raw_rate:.0}/s ({:.2} us each)",
        1e6 / raw_rate
    );
    println!("ratio per-request / raw open: {:.3}", gate_rate / raw_rate);
}
