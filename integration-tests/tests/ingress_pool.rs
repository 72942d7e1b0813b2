//! The ingress keeps its connections to sandboxes alive and reuses them
//! (`coordinator/src/upstream.rs`): many clients on kept-alive connections
//! each get their own answers, upgrades still pass, and a sandbox that
//! restarts leaves no request on a dead connection. The probe app's
//! `/conn` tells which of its connections a request came on, how many
//! requests that connection carried, and the request's own id back.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use integration_tests::{miren, read_response, temp, wait_for, ProbeCluster};
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
    let most = answers
        .iter()
        .filter_map(|v| v["served"].as_u64())
        .max()
        .unwrap_or(0);
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
