//! The coordinator's HTTP listeners against clients that hold on to what
//! they get, on the real binary: a slow-loris client (a header trickled a
//! byte at a time), an idle keep-alive connection and a stalled request body
//! are cut by the timeouts while other requests are served; a client that
//! does not even finish its TLS handshake, or its request head over TLS, is
//! cut on the HTTPS listener too; an upgraded connection outlives every one
//! of those timeouts; requests held to one app get 503 for that app while
//! another app on the same runner answers; one address cannot hold more
//! connections than its cap; and the forwarding headers an app sees are the
//! ingress's own, whatever the client sent.
//!
//! Timeouts are shortened with hidden server flags; the tests wait with
//! generous bounds and check outcomes, never exact timings.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{miren, read_response, temp, wait_for, ProbeCluster};
use serde_json::Value;

/// How long any cut may take here at most: far above the shortened
/// timeouts, so a slow machine does not fail the test, and far below
/// "never".
const BOUND: Duration = Duration::from_secs(30);

/// One request on a new connection (`Connection: close`); returns (status,
/// head, body).
fn try_request(
    addr: &str,
    host: &str,
    path: &str,
    extra: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(BOUND))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )?;
    read_response(&mut s)
}

/// Like [`try_request`], panicking when no response comes.
fn request(addr: &str, host: &str, path: &str, extra: &str) -> (u16, String, String) {
    try_request(addr, host, path, extra).unwrap_or_else(|e| panic!("GET {host}{path}: {e}"))
}

/// The status of `GET path` at `host`, 0 when no response came.
fn status_of(addr: &str, host: &str, path: &str) -> u16 {
    try_request(addr, host, path, "").map_or(0, |(status, _, _)| status)
}

/// Whether the peer has closed `s`, waiting at most `within`: true once a
/// read ends (EOF or reset), false when it stays open that long. Bytes read
/// before the end are ignored.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
}

/// Opens an `/echo-upgrade` tunnel (the probe's stand-in for WebSocket) to
/// `host`, checks it echoes, and returns it.
fn upgrade(addr: &str, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    write!(
        s,
        "GET /echo-upgrade HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    .unwrap();
    let (status, head, _) = read_response(&mut s).unwrap();
    assert_eq!(status, 101, "{head}");
    assert_echoes(&mut s, b"hello");
    s
}

fn assert_echoes(s: &mut TcpStream, bytes: &[u8]) {
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(bytes).unwrap();
    let mut echo = vec![0u8; bytes.len()];
    s.read_exact(&mut echo).expect("echo through the tunnel");
    assert_eq!(echo, bytes);
}

fn route(config: &Path, host: &str, app: &str) {
    let set = miren(config, &["route", "set", host, "-a", app], &[]);
    assert!(set.ok, "{set:?}");
}

/// A client that sends a TLS handshake to `addr` pinned to the cluster CA,
/// then `bytes`, and returns the TLS stream.
fn tls_client(
    addr: &str,
    cluster: &str,
    bytes: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let cluster: identity::ClusterAddress = cluster.parse().expect("cluster address");
    let fp = cluster.fingerprint.expect("pinned address");
    let tls = transport::tls::client_config(
        &transport::tls::ServerTrust::Pinned(fp),
        None,
        &[b"http/1.1"],
    )
    .expect("client config");
    let name = rustls::pki_types::ServerName::try_from(cluster.host.clone()).expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(tls.config), name).expect("client");
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(BOUND)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(bytes).expect("TLS handshake and first bytes");
    s.flush().unwrap();
    s
}

#[test]
fn slow_clients_are_cut_while_others_are_served_and_upgrades_stay() {
    let dir = temp();
    let c = ProbeCluster::start(
        dir.path(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--http-handshake-timeout",
            "2s",
            "--http-header-timeout",
            "2s",
            "--http-idle-timeout",
            "3s",
        ],
        "probe",
    );
    route(&c.config, "probe.test", "probe");
    let ingress = c.server.printed_address("HTTP ingress: http://");
    let https = c.server.printed_address("HTTPS (discovery, JWKS): ");
    assert!(
        wait_for(BOUND, || status_of(&ingress, "probe.test", "/headers")
            == 200),
        "the probe app never answered"
    );

    // An upgraded connection, opened first: it must outlive everything below.
    let mut tunnel = upgrade(&ingress, "probe.test");
    let tunnel_quiet_since = Instant::now();

    // Slow loris: a request head trickled one byte at a time, never
    // finished. Bytes keep moving, so only the header timeout can end it.
    let cut = Arc::new(AtomicBool::new(false));
    let slow = {
        let (ingress, cut) = (ingress.clone(), cut.clone());
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&ingress).unwrap();
            s.write_all(b"GET /headers HTTP/1.1\r\nHost: probe.test\r\nX-Slow: ")
                .unwrap();
            let started = Instant::now();
            while started.elapsed() < BOUND {
                if s.write_all(b"a").is_err() || closed_within(&mut s, Duration::from_millis(300)) {
                    cut.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
    };
    // Meanwhile, other clients are served.
    let mut served = 0;
    while !slow.is_finished() {
        let (status, _, body) = request(&ingress, "probe.test", "/headers", "");
        assert_eq!(status, 200, "{body}");
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    slow.join().unwrap();
    assert!(
        cut.load(Ordering::SeqCst),
        "the slow-loris client was never cut"
    );
    assert!(
        served >= 1,
        "no request was served while the slow client held on"
    );

    // An idle keep-alive connection is closed after its response.
    let mut keep = TcpStream::connect(&ingress).unwrap();
    keep.set_read_timeout(Some(BOUND)).unwrap();
    write!(keep, "GET /headers HTTP/1.1\r\nHost: probe.test\r\n\r\n").unwrap();
    let (status, _, _) = read_response(&mut keep).unwrap();
    assert_eq!(status, 200);
    assert!(
        closed_within(&mut keep, BOUND),
        "an idle keep-alive connection stayed open"
    );

    // A connection that opens no request at all is closed too.
    let mut silent = TcpStream::connect(&ingress).unwrap();
    assert!(
        closed_within(&mut silent, BOUND),
        "a connection that sent nothing stayed open"
    );

    // A request whose body stalls halfway is cut by the idle timeout.
    let mut stalled = TcpStream::connect(&ingress).unwrap();
    write!(
        stalled,
        "POST /echo-body HTTP/1.1\r\nHost: probe.test\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    .unwrap();
    assert!(
        closed_within(&mut stalled, BOUND),
        "a request with a stalled body stayed open"
    );
    // The same request sent whole is served.
    let mut whole = TcpStream::connect(&ingress).unwrap();
    whole.set_read_timeout(Some(BOUND)).unwrap();
    write!(
        whole,
        "POST /echo-body HTTP/1.1\r\nHost: probe.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789"
    )
    .unwrap();
    let (status, _, body) = read_response(&mut whole).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["received"],
        10
    );

    // The HTTPS listener (discovery, JWKS): a client that never starts its
    // TLS handshake is cut, and so is one that sends half a request head.
    let mut no_tls = TcpStream::connect(&https).unwrap();
    assert!(
        closed_within(&mut no_tls, BOUND),
        "HTTPS: a connection without a TLS handshake stayed open"
    );
    let mut half = tls_client(
        &https,
        &c.server.address,
        b"GET /.well-known/openid-configuration HTTP/1.1\r\nHost: x\r\n",
    );
    let mut buf = [0u8; 1024];
    let cut_over_tls = loop {
        match half.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            // The read timeout (BOUND) passed with the connection open.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false
            }
            Err(_) => break true,
        }
    };
    assert!(
        cut_over_tls,
        "HTTPS: a half-sent request head was never cut"
    );
    // A token request whose body trickles in, a byte at a time inside the
    // idle timeout, is answered and closed once the body deadline passes
    // (it would never end: 1,000 bytes at a byte a second).
    let mut trickle = tls_client(
        &https,
        &c.server.address,
        b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ng",
    );
    trickle
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut answer = Vec::new();
    for _ in 0..60 {
        match trickle.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        if !answer.is_empty() {
            continue;
        }
        if trickle
            .write_all(b"a")
            .and_then(|()| trickle.flush())
            .is_err()
        {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("did not arrive within 10 s"),
        "a trickling token request was never answered: {answer:?}"
    );

    // A whole request there is answered.
    let mut full = tls_client(
        &https,
        &c.server.address,
        b"GET /.well-known/openid-configuration HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let mut answer = Vec::new();
    let _ = full.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The tunnel has now been quiet for longer than the header and idle
    // timeouts together, and still carries bytes both ways.
    let quiet = Duration::from_secs(2 + 3 + 1);
    if let Some(left) = quiet.checked_sub(tunnel_quiet_since.elapsed()) {
        std::thread::sleep(left);
    }
    assert_echoes(&mut tunnel, b"still here after the timeouts");
}

#[test]
fn one_apps_held_requests_leave_other_apps_answering_and_forwarding_headers_are_ours() {
    let dir = temp();
    let c = ProbeCluster::start(
        dir.path(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--ingress-streams-per-app",
            "4",
            "--http-max-connections-per-ip",
            "12",
        ],
        "busy",
    );
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app");
    let deploy = miren(
        &c.config,
        &["deploy", "--dir", probe.to_str().unwrap(), "-a", "calm"],
        &[],
    );
    assert!(deploy.ok, "{deploy:?}");
    route(&c.config, "busy.test", "busy");
    route(&c.config, "calm.test", "calm");
    let ingress = c.server.printed_address("HTTP ingress: http://");
    for host in ["busy.test", "calm.test"] {
        assert!(
            wait_for(BOUND, || status_of(&ingress, host, "/headers") == 200),
            "{host} never answered"
        );
    }

    // Forwarding headers: whatever the client sent under those names, in
    // any spelling, is gone; the ingress's own are there.
    let spoofed = "Forwarded: for=203.0.113.9;proto=https\r\n\
        X-Forwarded-For: 203.0.113.9\r\n\
        X_Forwarded_For: 203.0.113.10\r\n\
        x_forwarded-for: 203.0.113.11\r\n\
        x-forwarded-host: evil.example\r\n\
        X_FORWARDED_HOST: evil.example\r\n\
        X-Forwarded-Proto: https\r\n\
        X_Forwarded_Proto: https\r\n\
        X-Forwarded-Port: 443\r\n\
        X-Forwarded-Prefix: /admin\r\n\
        X-Real-IP: 203.0.113.9\r\n\
        X_Real_IP: 203.0.113.9\r\n\
        True-Client-IP: 203.0.113.9\r\n\
        X-Probe: kept\r\n";
    let (status, _, body) = request(&ingress, "calm.test", "/headers", spoofed);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    let seen = seen.as_object().unwrap();
    let normalised = |k: &str| k.to_ascii_lowercase().replace('_', "-");
    for (name, value) in seen {
        let n = normalised(name);
        match n.as_str() {
            "x-forwarded-for" => assert_eq!(value, "127.0.0.1", "{name}: {body}"),
            "x-forwarded-proto" => assert_eq!(value, "http", "{name}: {body}"),
            "x-forwarded-host" => assert_eq!(value, "calm.test", "{name}: {body}"),
            _ => assert!(
                !identity::headers::is_forwarding_header(&n),
                "{name} reached the app: {body}"
            ),
        }
    }
    for ours in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert_eq!(
            seen.keys().filter(|k| normalised(k) == ours).count(),
            1,
            "{ours} once: {body}"
        );
    }
    assert!(
        seen.iter()
            .any(|(k, v)| normalised(k) == "x-probe" && v == "kept"),
        "{body}"
    );

    // Four tunnels hold all of busy's streams on the runner...
    let mut held: Vec<TcpStream> = (0..4).map(|_| upgrade(&ingress, "busy.test")).collect();
    // ...so busy answers 503 at once, and calm, on the same runner, answers.
    let (status, head, body) = request(&ingress, "busy.test", "/headers", "");
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    for _ in 0..3 {
        let (status, _, body) = request(&ingress, "calm.test", "/headers", "");
        assert_eq!(status, 200, "{body}");
    }
    // The held tunnels still work; once they close, busy answers again.
    for t in &mut held {
        assert_echoes(t, b"held");
    }
    drop(held);
    assert!(
        wait_for(BOUND, || status_of(&ingress, "busy.test", "/headers")
            == 200),
        "busy never answered again after its tunnels closed"
    );

    // One address holds at most 12 connections: 12 are served and kept
    // open, the 13th gets no answer, and once the 12 are gone requests are
    // served again. (A tunnel closed above may hold its slot a moment
    // longer: a refused connection is retried.)
    let mut hogs: Vec<TcpStream> = Vec::new();
    let started = Instant::now();
    while hogs.len() < 12 {
        assert!(
            started.elapsed() < BOUND,
            "only {} connections were served",
            hogs.len()
        );
        let mut s = TcpStream::connect(&ingress).unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        let _ = write!(s, "GET /headers HTTP/1.1\r\nHost: calm.test\r\n\r\n");
        match read_response(&mut s) {
            Ok((200, _, _)) => hogs.push(s),
            Ok((status, head, body)) => panic!("{status}: {head}{body}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let over = try_request(&ingress, "calm.test", "/headers", "");
    assert!(
        over.is_err(),
        "a connection over the per-address cap was served: {over:?}"
    );
    drop(hogs);
    assert!(
        wait_for(BOUND, || status_of(&ingress, "calm.test", "/headers")
            == 200),
        "nothing was served after the held connections closed"
    );
}
