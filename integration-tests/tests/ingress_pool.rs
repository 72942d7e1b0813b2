//! The ingress keeps its connections to sandboxes alive and reuses them
//! (`coordinator/src/upstream.rs`): many clients on kept-alive connections
//! each get their own answers, upgrades still pass, and a sandbox that
//! restarts leaves no request on a dead connection; a connection the app
//! closes under a request, or that a client's own connection headers would
//! have the app close, costs no client a 502, and a body the app leaves
//! unread never answers another client. The probe app's
//! `/conn` tells which of its connections a request came on, how many
//! requests that connection carried, and the request's own id back.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use integration_tests::{http_get_host, miren, read_response, temp, wait_for, ProbeCluster};
use serde_json::Value;

const BOUND: Duration = Duration::from_secs(30);
const HOST: &str = "pool.test";

/// A client's kept-alive connection to the ingress.
struct KeptAlive(TcpStream);

impl KeptAlive {
    fn open(addr: &str) -> KeptAlive {
        let s = TcpStream::connect(addr).expect("connect to the ingress");
        s.set_read_timeout(Some(BOUND)).unwrap();
        KeptAlive(s)
    }

    /// `GET path` with `X-Request-Id: id` on this connection.
    fn get(&mut self, path: &str, id: &str) -> (u16, String) {
        write!(
            self.0,
            "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {id}\r\n\r\n"
        )
        .expect("write a request");
        let (status, head, body) = read_response(&mut self.0).expect("a response");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "the ingress closed a kept-alive client connection: {head}"
        );
        (status, body)
    }
}

fn start(dir: &std::path::Path) -> (ProbeCluster, String) {
    let c = ProbeCluster::start(dir, &["--http-listen", "127.0.0.1:0"], "probe");
    let set = miren(&c.config, &["route", "set", HOST, "-a", "probe"], &[]);
    assert!(set.ok, "{set:?}");
    let ingress = c.server.printed_address("HTTP ingress: http://");
    assert!(
        wait_for(BOUND, || answers(&ingress)),
        "the probe app never answered through the ingress"
    );
    (c, ingress)
}

/// Whether a fresh connection gets its own id back from `/conn`.
fn answers(ingress: &str) -> bool {
    let Ok(s) = TcpStream::connect(ingress) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut c = KeptAlive(s);
    if write!(
        c.0,
        "GET /conn HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: ping\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    match read_response(&mut c.0) {
        Ok((200, _, body)) => {
            serde_json::from_str::<Value>(&body).is_ok_and(|v| v["request_id"] == "ping")
        }
        _ => false,
    }
}

/// The most requests one connection to the app had carried, over `/conn`
/// answers.
fn most_served(answers: &[Value]) -> u64 {
    answers
        .iter()
        .filter_map(|v| v["served"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Each of `clients` threads sends `requests` requests on one kept-alive
/// connection, all at once; returns every `/conn` answer.
fn many_clients(ingress: &str, clients: usize, requests: usize) -> Vec<Value> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                sc.spawn(move || {
                    let mut conn = KeptAlive::open(ingress);
                    let mut answers = Vec::new();
                    for r in 0..requests {
                        let id = format!("client{c}-request{r}");
                        let (status, body) = conn.get("/conn", &id);
                        assert_eq!(status, 200, "{id}: {body}");
                        let v: Value = serde_json::from_str(&body).expect("JSON from /conn");
                        assert_eq!(v["request_id"], id.as_str(), "{id} got another's answer");
                        answers.push(v);
                    }
                    answers
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    })
}

#[test]
fn kept_alive_clients_each_get_their_own_answers_over_reused_connections() {
    let dir = temp();
    let (_c, ingress) = start(dir.path());
    let answers = many_clients(&ingress, 8, 40);
    assert_eq!(answers.len(), 8 * 40);
    // The sandbox saw connections carry several requests: the ingress
    // reused them (requests of different clients, one after another).
    let most = most_served(&answers);
    assert!(
        most > 1,
        "every request came on a new connection: {answers:?}"
    );
    let conns: std::collections::BTreeSet<u64> =
        answers.iter().filter_map(|v| v["conn"].as_u64()).collect();
    assert!(
        conns.len() < answers.len(),
        "one connection per request: {} connections",
        conns.len()
    );

    // An upgrade still passes, between and after pooled requests, and the
    // pooled connections go on answering.
    let mut tunnel = TcpStream::connect(&ingress).unwrap();
    tunnel.set_read_timeout(Some(BOUND)).unwrap();
    write!(
        tunnel,
        "GET /echo-upgrade HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    .unwrap();
    let (status, head, _) = read_response(&mut tunnel).unwrap();
    assert_eq!(status, 101, "{head}");
    let again = many_clients(&ingress, 4, 10);
    assert_eq!(again.len(), 40);
    tunnel.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    std::io::Read::read_exact(&mut tunnel, &mut echo).expect("echo through the tunnel");
    assert_eq!(&echo, b"still here");
}

#[test]
fn a_restarted_sandbox_leaves_no_request_on_a_dead_connection() {
    let dir = temp();
    let (c, ingress) = start(dir.path());
    // Fill the pool with kept-alive connections to the sandbox.
    let before = many_clients(&ingress, 6, 10);
    let old_pid = before[0]["pid"].as_u64().expect("the probe's pid");
    // The app exits; the runner starts it again under the same sandbox id.
    let mut crash = KeptAlive::open(&ingress);
    write!(crash.0, "GET /crash HTTP/1.1\r\nHost: {HOST}\r\n\r\n").unwrap();
    let _ = read_response(&mut crash.0);
    assert!(
        wait_for(Duration::from_secs(60), || answers(&ingress)),
        "the sandbox never answered again after its restart: {}",
        c.runner.output()
    );
    // Every request now is answered by the new process, on live
    // connections only: no 502 from a connection the old process held.
    let after = many_clients(&ingress, 6, 10);
    assert_eq!(after.len(), 60);
    for v in &after {
        assert_ne!(
            v["pid"].as_u64(),
            Some(old_pid),
            "the old process answered: {v}"
        );
    }
}

/// One request on a new client connection, in the client's own words
/// (`version` and `extra` headers); the answer's status and body.
fn once(ingress: &str, path: &str, id: &str, version: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(ingress).expect("connect to the ingress");
    s.set_read_timeout(Some(BOUND)).unwrap();
    write!(
        s,
        "GET {path} {version}\r\nHost: {HOST}\r\nX-Request-Id: {id}\r\n{extra}\r\n"
    )
    .expect("write a request");
    let (status, _, body) = read_response(&mut s).expect("a response");
    (status, body)
}

#[test]
fn a_connection_the_app_closes_under_a_request_is_not_the_clients_502() {
    let dir = temp();
    let (_c, ingress) = start(dir.path());
    for round in 0..5 {
        // The app answers, the ingress keeps the connection, the app closes
        // it half a second later without reading: the next request, sent
        // on it meanwhile, is sent again on a new connection.
        let (status, body) = once(
            &ingress,
            "/answer-then-close?after=0.5",
            "x",
            "HTTP/1.1",
            "",
        );
        assert_eq!((status, body.as_str()), (200, "closing soon"));
        let id = format!("after-close-{round}");
        let (status, body) = once(&ingress, "/conn", &id, "HTTP/1.1", "");
        assert_eq!(status, 200, "round {round}: {body}");
        let v: Value = serde_json::from_str(&body).expect("JSON from /conn");
        assert_eq!(v["request_id"], id.as_str(), "round {round}: {v}");
    }
}

#[test]
fn what_a_client_says_of_its_own_connection_does_not_close_the_apps() {
    let dir = temp();
    let (_c, ingress) = start(dir.path());
    // HTTP/1.0 without keep-alive, and HTTP/1.1 with `Connection: close`:
    // each client's connection ends with its answer, the connection to
    // the app goes on carrying the next client's request.
    let asks = [
        ("HTTP/1.0", ""),
        ("HTTP/1.1", "Connection: close\r\n"),
        ("HTTP/1.1", "Connection: close, X-Request-Id\r\n"),
    ];
    let mut answers = Vec::new();
    for round in 0..12 {
        let (version, extra) = asks[round % asks.len()];
        let id = format!("{version}-{round}");
        let (status, body) = once(&ingress, "/conn", &id, version, extra);
        assert_eq!(status, 200, "{id}: {body}");
        let v: Value = serde_json::from_str(&body).expect("JSON from /conn");
        answers.push(v);
    }
    // A header the client named in Connection is its connection's, not
    // the request's: the app does not see it.
    assert_eq!(answers[2]["request_id"], Value::Null, "{}", answers[2]);
    assert_eq!(answers[0]["request_id"], "HTTP/1.0-0");
    let most = most_served(&answers);
    assert!(
        most >= 10,
        "the app's connection was closed by what clients said of theirs: {answers:?}"
    );
}

#[test]
fn a_body_the_app_leaves_unread_never_answers_another_client() {
    let dir = temp();
    let (_c, ingress) = start(dir.path());
    // The probe never reads a GET's body: one that holds a request would
    // be taken for the next request on that connection, and the answer to
    // it (slow to come) would go to whoever sends on the connection next.
    let smuggled =
        format!("GET /slow-conn HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: smuggled\r\n\r\n");
    for round in 0..3 {
        let mut attacker = TcpStream::connect(&ingress).expect("connect");
        attacker.set_read_timeout(Some(BOUND)).unwrap();
        write!(
            attacker,
            "GET /conn HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: attacker\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .unwrap();
        let (status, _, body) = read_response(&mut attacker).expect("the attacker's answer");
        assert_eq!(status, 200, "{body}");
        let id = format!("victim-{round}");
        let (status, body) = once(&ingress, "/conn", &id, "HTTP/1.1", "");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON from /conn");
        assert_eq!(
            v["request_id"],
            id.as_str(),
            "another's answer reached {id}: {v}"
        );
    }
}

/// `raw` (a whole request) on a new connection to the ingress; the status
/// and body of its answer.
fn exchange(ingress: &str, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(ingress).expect("connect to the ingress");
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(raw.as_bytes()).expect("write a request");
    let (status, _, body) = read_response(&mut s).expect("a response");
    (status, body)
}

/// A request in absolute form names its host in its target, and then the
/// Host header does not count (RFC 9112 §3.2.2): the ingress routes by the
/// target's host and the app gets the request in origin form with that
/// host as its Host. Before, the ingress routed by the Host header and
/// passed the absolute target on, which servers that follow the RFC (Go's
/// among them) read as the host asked for: a client could name an open
/// host in Host and a protected one in the target, and have the app serve
/// the protected host without the route OIDC gate. For the same reason two
/// Host headers, or one that is not visible ASCII, are refused, and a
/// trailing dot does not make a host fall to another route. An HTTP/1.1
/// request without a Host and CONNECT are refused.
#[test]
fn a_request_in_absolute_form_is_routed_and_passed_on_by_its_targets_host() {
    let dir = temp();
    let (_cluster, ingress) = start(dir.path());
    // Routed by the target's host, whatever Host says.
    let (status, body) = exchange(
        &ingress,
        &format!("GET http://{HOST}/target?x=1 HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(seen["target"], "/target?x=1", "the app got {seen}");
    assert_eq!(seen["host"], HOST, "the app got {seen}");
    // The target names a host nothing is routed for: not the Host's app.
    let (status, body) = exchange(
        &ingress,
        &format!("GET http://elsewhere.test/target HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("elsewhere.test"), "{body}");
    // A port in the target stays in the Host the app sees.
    let (status, body) = exchange(
        &ingress,
        &format!(
            "GET http://{HOST}:8080/target HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(seen["host"], format!("{HOST}:8080"), "the app got {seen}");
    assert_eq!(seen["target"], "/target", "the app got {seen}");
    // Two Host headers, or one that is not visible ASCII: no guessing
    // which one the app will read.
    let (status, body) = exchange(
        &ingress,
        &format!("GET /target HTTP/1.1\r\nHost: elsewhere.test\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = exchange(
        &ingress,
        "GET /target HTTP/1.1\r\nHost: pool.test\u{e9}\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 400, "{body}");
    // HTTP/1.1 without a Host names no host: refused, not sent to the
    // default route.
    let (status, body) = exchange(
        &ingress,
        "GET /target HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Host header"), "{body}");
    // A fully qualified name (trailing dot) is its host's, not another
    // route's.
    let (status, body) = exchange(
        &ingress,
        &format!("GET /target HTTP/1.1\r\nHost: {HOST}.\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    // No tunnels.
    let (status, body) = exchange(
        &ingress,
        &format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n"),
    );
    assert_eq!(status, 405, "{body}");
}

/// Clients that each send a request whose body they never finish, to an
/// app that answers before reading it and then waits for the rest: each
/// request's stream to the runner closes when its answer is over, with its
/// place in the stream counts. Before, the place was given back while the
/// stream stayed open, carrying the trickling body, so about a hundred
/// such clients held every stream the runner allows (QUIC's 100) without
/// being counted, and every app on that runner got 503.
#[test]
fn bodies_trickling_after_the_answer_hold_no_stream_to_the_runner() {
    /// More than the runner's 100 concurrent streams; fewer than the 128
    /// connections one address may hold.
    const TRICKLERS: usize = 110;
    let dir = temp();
    let (_cluster, ingress) = start(dir.path());
    let mut held = Vec::new();
    for i in 0..TRICKLERS {
        let mut s = TcpStream::connect(&ingress).expect("connect to the ingress");
        s.set_read_timeout(Some(BOUND)).unwrap();
        write!(
            s,
            "POST /answer-then-drain HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000000\r\n\r\nfirst bytes"
        )
        .expect("write a request");
        let (status, _, body) = read_response(&mut s).expect("an answer before the body");
        assert_eq!(status, 200, "trickler {i}: {body}");
        held.push(s);
    }
    // The rest of each body never comes; the connections stay open.
    let (status, body) = http_get_host(&ingress, HOST, "/conn").expect("an answer");
    assert_eq!(status, 200, "an app's request while bodies trickle: {body}");
    drop(held);
}
