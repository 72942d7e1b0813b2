//! The front door under an anonymous flood, on a real `miren server`.
//!
//! A test client with no certificate, on its own loopback addresses
//! (127.0.0.2 and 127.0.0.3: all of 127/8 is this machine's loopback), does
//! what an attacker would: opens far more connections than one address may
//! hold, tries to open more streams than the RPC stream, sends a
//! multi-megabyte `ping` and an oversized `join`, repeats `join`, and
//! pipelines calls on raw streams without ever reading the replies. Each is
//! refused or stalled, the coordinator's memory (VmRSS from /proc) stays
//! within a generous bound of its idle size, and a pinned CLI from
//! 127.0.0.1 keeps answering during and after. Nothing here asserts how
//! long anything takes; waits are only upper limits on waiting.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use capnp::traits::HasTypeId;
use capnp_rpc::rpc_capnp;
use futures::FutureExt;
use identity::ClusterAddress;
use integration_tests::{miren, temp, Server};
use schema::miren_capnp::cluster;

/// Connection attempts from one address (which may hold 64).
const FLOOD_CONNECTIONS: usize = 200;
/// Connections that pipeline calls and never read a reply.
const SILENT_READERS: usize = 8;
/// What each of them tries to write: far more than it is allowed to.
const SILENT_BYTES: usize = 32 * 1024 * 1024;
/// How much the coordinator may grow while it holds all of the above.
/// Each connection is bounded to well under 1 MiB; this leaves room for
/// allocator slack on a busy machine and is far below what an unbounded
/// server would hold (the silent readers alone would queue 256 MiB).
const RSS_GROWTH_LIMIT_KIB: u64 = 160 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn cluster_status(server: &Server) -> integration_tests::Run {
    miren(&server.config, &["cluster", "status", "-o", "json"], &[])
}

/// A QUIC client endpoint on `local` that pins the cluster CA and presents
/// no certificate. Its send window is small so a blocked peer blocks its
/// writes soon.
fn client_endpoint(local: Ipv4Addr, address: &ClusterAddress) -> quinn::Endpoint {
    let tls = transport::tls::client_config(
        &transport::tls::ServerTrust::Pinned(address.fingerprint.expect("pinned address")),
        None,
        &[transport::ALPN],
    )
    .expect("client TLS");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls.config).expect("QUIC TLS");
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.send_window(256 * 1024);
    cfg.transport_config(Arc::new(t));
    let mut endpoint =
        quinn::Endpoint::client(SocketAddr::from((local, 0))).expect("client endpoint");
    endpoint.set_default_client_config(cfg);
    endpoint
}

async fn connect(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    host: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let connecting = endpoint.connect(server, host).expect("connect");
    match tokio::time::timeout(Duration::from_secs(30), connecting).await {
        Ok(r) => r,
        Err(_) => Err(quinn::ConnectionError::TimedOut),
    }
}

/// Waits (at most 30 s) for `conn` to be closed by the server.
async fn closed_by_server(conn: &quinn::Connection) -> bool {
    tokio::time::timeout(Duration::from_secs(30), conn.closed())
        .await
        .is_ok()
}

/// The bytes of one RPC message.
fn frame(build: impl FnOnce(rpc_capnp::message::Builder<'_>)) -> Vec<u8> {
    let mut msg = capnp::message::Builder::new_default();
    build(msg.init_root());
    capnp::serialize::write_message_to_words(&msg)
}

/// `Bootstrap` as question 0, and `ping` calls on its answer.
fn bootstrap_frame() -> Vec<u8> {
    frame(|m| m.init_bootstrap().set_question_id(0))
}

fn ping_frame(question: u32, payload: &[u8]) -> Vec<u8> {
    frame(|m| {
        let mut call = m.init_call();
        call.set_question_id(question);
        call.set_interface_id(<cluster::Client as HasTypeId>::TYPE_ID);
        call.set_method_id(2);
        call.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(0);
        call.init_params()
            .init_content()
            .init_as::<cluster::ping_params::Builder<'_>>()
            .set_payload(payload);
    })
}

/// A stream pair kept open (and unread) while the test measures.
type Held = Option<(quinn::SendStream, quinn::RecvStream)>;

/// Writes pipelined pings on a fresh stream of `conn` and never reads a
/// reply. Returns how many bytes the stream took before it stopped taking
/// more (or `SILENT_BYTES` if it never did), and the streams, unread.
async fn silent_reader(conn: quinn::Connection) -> (usize, Held) {
    let Ok((mut send, recv)) = conn.open_bi().await else {
        return (0, None);
    };
    let mut written = 0;
    if send.write_all(&bootstrap_frame()).await.is_err() {
        return (0, None);
    }
    let payload = [0x5a; 1000];
    let mut question = 1;
    while written < SILENT_BYTES {
        let mut batch = Vec::new();
        for _ in 0..64 {
            batch.extend_from_slice(&ping_frame(question, &payload));
            question += 1;
        }
        match tokio::time::timeout(Duration::from_secs(3), send.write_all(&batch)).await {
            Ok(Ok(())) => written += batch.len(),
            // Blocked (the server stopped reading) or cut off.
            _ => break,
        }
    }
    (written, Some((send, recv)))
}

#[test]
fn an_anonymous_flood_is_bounded_and_a_pinned_cli_keeps_answering() {
    let dir = temp();
    let config = dir.path().join("clientconfig.yaml");
    let server = Server::start(&dir.path().join("data"), &config, "127.0.0.1:0", &[]);
    let address: ClusterAddress = server.address.parse().expect("cluster address");
    let server_addr: SocketAddr = server.host_port().parse().expect("socket address");
    let pid = server.pid();
    let before = cluster_status(&server);
    assert!(before.ok, "{before:?}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // Warm up with a few legitimate anonymous sessions, then take the
        // idle size.
        for _ in 0..4 {
            let (endpoint, conn) = transport::dial(&address, None).await.expect("dial");
            let c: cluster::Client = transport::rpc::connect_connection(&conn)
                .await
                .expect("rpc");
            c.info_request().send().promise.await.expect("info");
            conn.close(transport::close::CloseCode::Done.into(), b"");
            endpoint.wait_idle().await;
        }
        let idle = rss_kib(pid);

        // 1. Many connections from one address: at most 64 are held.
        let flood = client_endpoint(Ipv4Addr::new(127, 0, 0, 2), &address);
        let attempts = (0..FLOOD_CONNECTIONS).map(|_| connect(&flood, server_addr, &address.host));
        let results = futures::future::join_all(attempts).await;
        let held: Vec<quinn::Connection> = results.into_iter().filter_map(Result::ok).collect();
        assert!(!held.is_empty(), "no connection got in");
        assert!(
            held.len() <= 64,
            "{} connections held from one address",
            held.len()
        );
        // On each: one bi-stream (the RPC stream), nothing more, and no
        // uni-stream at all. The client knows the server's stream limits
        // from the handshake, so a second open waits for credit that never
        // comes.
        let mut streams = Vec::new();
        for conn in &held {
            let first = conn.open_bi().now_or_never();
            assert!(matches!(first, Some(Ok(_))), "the RPC stream must open");
            assert!(
                conn.open_bi().now_or_never().is_none(),
                "a second bi-stream opened"
            );
            assert!(
                conn.open_uni().now_or_never().is_none(),
                "a uni-stream opened"
            );
            streams.push(first);
        }

        // 2. Message-level attacks from another address.
        let attacker = client_endpoint(Ipv4Addr::new(127, 0, 0, 3), &address);
        let rpc_on = |conn: &quinn::Connection| {
            let conn = conn.clone();
            async move {
                transport::rpc::connect_connection::<cluster::Client>(&conn)
                    .await
                    .expect("rpc")
            }
        };
        // A multi-megabyte ping: refused from its size, connection cut.
        let conn = connect(&attacker, server_addr, &address.host)
            .await
            .expect("connect");
        let c = rpc_on(&conn).await;
        let mut req = c.ping_request();
        req.get().set_payload(&vec![0u8; 4 * 1024 * 1024]);
        let e = req
            .send()
            .promise
            .await
            .err()
            .expect("a 4 MiB ping must be refused");
        eprintln!("4 MiB ping: {e}");
        assert!(closed_by_server(&conn).await, "connection not cut");

        // An oversized join (a 1 MiB "CSR"): the same.
        let conn = connect(&attacker, server_addr, &address.host)
            .await
            .expect("connect");
        let c = rpc_on(&conn).await;
        let mut req = c.join_request();
        {
            let mut r = req.get().init_request();
            r.set_token_id("x");
            r.set_csr_der(&vec![0u8; 1024 * 1024]);
        }
        let e = req
            .send()
            .promise
            .await
            .err()
            .expect("an oversized join must be refused");
        eprintln!("1 MiB join: {e}");
        assert!(closed_by_server(&conn).await, "connection not cut");

        // A ping over 1 KiB is refused, the connection lives on; joins
        // are rate-limited per address.
        let conn = connect(&attacker, server_addr, &address.host)
            .await
            .expect("connect");
        let c = rpc_on(&conn).await;
        let mut req = c.ping_request();
        req.get().set_payload(&[1u8; 2048]);
        let e = req.send().promise.await.err().expect("2 KiB ping refused");
        assert!(e.to_string().contains("1024"), "{e}");
        let mut req = c.ping_request();
        req.get().set_payload(&[1u8; 1024]);
        let reply = req.send().promise.await.expect("1 KiB ping answered");
        assert_eq!(reply.get().unwrap().get_payload().unwrap().len(), 1024);
        let mut limited = None;
        for attempt in 1..=25 {
            let mut req = c.join_request();
            req.get().init_request().set_token_id("no-such-code");
            let e = req.send().promise.await.err().expect("bogus join refused");
            if e.kind == capnp::ErrorKind::Overloaded {
                limited = Some(attempt);
                eprintln!("join {attempt}: {e}");
                break;
            }
        }
        assert_eq!(limited, Some(21), "the 21st join attempt must be limited");

        // 3. Calls pipelined on raw streams, replies never read: the
        // server stops reading, so the writers stall.
        let mut silent = Vec::new();
        let mut silent_conns = Vec::new();
        for _ in 0..SILENT_READERS {
            let conn = connect(&attacker, server_addr, &address.host)
                .await
                .expect("connect");
            silent.push(tokio::task::spawn_local(silent_reader(conn.clone())));
            silent_conns.push(conn);
        }
        let mut silent_streams = Vec::new();
        for s in silent {
            let (written, streams) = s.await.expect("writer task");
            silent_streams.push(streams);
            eprintln!("a silent reader got {} KiB in", written / 1024);
            assert!(
                written < SILENT_BYTES,
                "a peer that never reads replies wrote {written} bytes"
            );
        }

        // While all of this is held: memory is bounded, the CLI answers.
        let peak = rss_kib(pid);
        let during = tokio::task::spawn_blocking({
            let config = server.config.clone();
            move || miren(&config, &["cluster", "status", "-o", "json"], &[])
        })
        .await
        .expect("cli task");
        assert!(during.ok, "cluster status during the flood: {during:?}");
        eprintln!(
            "coordinator RSS: idle {} KiB, under the flood {} KiB (+{} KiB), {} connections held",
            idle,
            peak,
            peak.saturating_sub(idle),
            held.len() + SILENT_READERS
        );
        assert!(
            peak.saturating_sub(idle) < RSS_GROWTH_LIMIT_KIB,
            "RSS grew from {idle} KiB to {peak} KiB"
        );
        drop(streams);
        drop(silent_streams);
        drop(silent_conns);
        for conn in &held {
            conn.close(transport::close::CloseCode::Done.into(), b"");
        }
        flood.wait_idle().await;
        attacker.close(transport::close::CloseCode::Done.into(), b"");
        attacker.wait_idle().await;
    });
    let after = cluster_status(&server);
    assert!(after.ok, "cluster status after the flood: {after:?}");
}

/// `coordinator::oauth::FAILURES_PER_SOURCE_BURST`: refusals one address
/// may collect (token requests and `ciLogin`s together) before it is
/// slowed down to one every 2 s.
const FAILURES_BURST: usize = 30;

/// Sends a `ciLogin` for app `web` with a token that is no JWT; returns
/// the refusal.
async fn junk_ci_login(c: &cluster::Client) -> capnp::Error {
    let mut req = c.ci_login_request();
    req.get().set_token("not-a-jwt");
    req.get().set_app("web");
    match req.send().promise.await {
        Ok(_) => panic!("a junk CI token logged in"),
        Err(e) => e,
    }
}

/// Anyone may call `ciLogin`, and each call with a token to verify costs
/// the coordinator work: an address whose logins keep failing is answered
/// `overloaded` ("too many failed CI logins") before its token is read,
/// while another address still has its logins decided.
#[test]
fn failed_ci_logins_slow_down_their_own_address_only() {
    let dir = temp();
    let config = dir.path().join("clientconfig.yaml");
    let server = Server::start(&dir.path().join("data"), &config, "127.0.0.1:0", &[]);
    let address: ClusterAddress = server.address.parse().expect("cluster address");
    let server_addr: SocketAddr = server.host_port().parse().expect("socket address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let session = |ip: Ipv4Addr| {
            let endpoint = client_endpoint(ip, &address);
            let host = address.host.clone();
            async move {
                let conn = connect(&endpoint, server_addr, &host)
                    .await
                    .expect("connect");
                let c = transport::rpc::connect_connection::<cluster::Client>(&conn)
                    .await
                    .expect("rpc");
                (endpoint, conn, c)
            }
        };
        let (attacker, _conn, c) = session(Ipv4Addr::new(127, 0, 0, 4)).await;
        let mut slowed = None;
        for attempt in 1..=FAILURES_BURST + 10 {
            let e = junk_ci_login(&c).await;
            if e.kind == capnp::ErrorKind::Overloaded {
                assert!(e.to_string().contains("too many failed CI logins"), "{e}");
                slowed = Some(attempt);
                break;
            }
            assert!(
                !e.to_string().contains("too many failed"),
                "refusal {attempt}: {e}"
            );
        }
        // The budget refills one every 2 s, so a slow machine may get a
        // refusal or two more in before the first slow-down.
        let slowed = slowed.expect("failed logins were never slowed down");
        assert!(
            slowed > FAILURES_BURST && slowed <= FAILURES_BURST + 5,
            "first slowed at attempt {slowed}"
        );
        // Another address has its login decided as before.
        let (other, _other_conn, c2) = session(Ipv4Addr::new(127, 0, 0, 5)).await;
        let e = junk_ci_login(&c2).await;
        assert_ne!(e.kind, capnp::ErrorKind::Overloaded, "{e}");
        assert!(!e.to_string().contains("too many failed"), "{e}");
        attacker.close(transport::close::CloseCode::Done.into(), b"");
        other.close(transport::close::CloseCode::Done.into(), b"");
    });
}
