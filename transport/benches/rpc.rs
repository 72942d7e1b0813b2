//! Round-trip latency and pipelined throughput of a trivial Cap'n Proto call
//! (`Cluster.ping`) over our QUIC transport versus plain TCP loopback, with the
//! same RPC code on both.
//!
//! Run with `cargo bench -p transport --bench rpc`. One server thread (a
//! current-thread runtime with a `LocalSet`, as capnp-rpc is not `Send`)
//! serves both transports; the client runs on the main thread the same way.
//! Rounds alternate TCP and QUIC so drift on a busy machine hits both alike;
//! the table shows the median over rounds. Timings are reported, never
//! asserted.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use capnp::capability::Rc;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::LocalSet;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use identity::ClusterAddress;
use schema::miren_capnp::cluster;
use transport::pki::{self, ClusterCa};

/// Bytes echoed by every ping.
const PAYLOAD: [u8; 16] = *b"miren-bench-ping";
/// Untimed calls made on each connection before measuring.
const WARMUP_SEQ: usize = 500;
const WARMUP_PIPELINED: usize = 3_000;
/// Sequential round trips per round.
const LATENCY_CALLS: usize = 3_000;
/// Pipelined calls per round, and how many are kept in flight.
const THROUGHPUT_CALLS: usize = 30_000;
const IN_FLIGHT: usize = 64;
/// Alternating TCP/QUIC rounds.
const ROUNDS: usize = 5;
/// A phase stops issuing new calls after this long (the bench stays bounded
/// on a slow machine), and is abandoned after `PHASE_TIMEOUT`.
const PHASE_BUDGET: Duration = Duration::from_secs(4);
const PHASE_TIMEOUT: Duration = Duration::from_secs(20);

/// Targets from the design: QUIC may cost at most 1.5x TCP's median latency
/// and must keep at least 0.7x its throughput.
const LATENCY_RATIO_TARGET: f64 = 1.5;
const THROUGHPUT_RATIO_TARGET: f64 = 0.7;

/// The whole server: `ping` echoes its payload.
struct Echo;

impl cluster::Server for Echo {
    async fn ping(
        self: Rc<Self>,
        params: cluster::PingParams,
        mut results: cluster::PingResults,
    ) -> Result<(), capnp::Error> {
        let payload = params.get()?.get_payload()?;
        results.get().set_payload(payload);
        Ok(())
    }
}

/// Both transports serve with the limits of a peer that proved a role
/// (64 pipelined calls are over an unproven peer's 32), so the bench
/// measures the path runners and operators take.
fn proven_limits() -> transport::rpc::Limits {
    transport::rpc::Limits::new(transport::rpc::RpcLimits::PROVEN)
}

fn echo_bootstrap() -> capnp::capability::Client {
    let client: cluster::Client = capnp_rpc::new_client(Echo);
    client.client
}

// ---------------------------------------------------------------- server side

/// The TCP baseline is the best plain TCP can do, so the ratios compare QUIC
/// with the machine's own limit: capnp-futures writes a message as several
/// `write_all` calls (segment table, then segments) and flushes after each
/// message, so without `TCP_NODELAY` Nagle and delayed ACKs stall every call
/// for tens of milliseconds, and without a buffer every message costs two
/// syscalls and two segments. Hence `TCP_NODELAY` plus a `BufWriter`, which
/// turns each message into one `write` on flush.
fn tcp_writer(
    w: tokio::net::tcp::OwnedWriteHalf,
) -> futures::io::BufWriter<tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf>> {
    futures::io::BufWriter::new(w.compat_write())
}

/// The server thread, listening on TCP and QUIC loopback ports.
struct Servers {
    tcp_port: u16,
    quic_port: u16,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<anyhow::Result<()>>,
}

/// TLS for the QUIC server: a fresh cluster CA and a server certificate for
/// 127.0.0.1/localhost. Returns the config and the CA's pin.
fn quic_tls() -> anyhow::Result<(rustls::ServerConfig, identity::Fingerprint)> {
    let ca_pem = ClusterCa::generate("bench").context("generating the CA")?;
    let ca = ClusterCa::load(&ca_pem.cert_pem, &ca_pem.key_pem).context("loading the CA")?;
    let leaf = ca
        .issue_server(&["127.0.0.1".to_string(), "localhost".to_string()])
        .context("issuing the server certificate")?;
    let chain = vec![
        pki::cert_der_from_pem(&leaf.cert_pem)?,
        ca.cert_der().clone(),
    ];
    let key = pki::key_der_from_pem(&leaf.key_pem)?;
    let cfg = transport::tls::server_config(ca.cert_der(), chain, key, &[transport::ALPN])
        .context("building the server TLS config")?;
    Ok((cfg, ca.fingerprint()))
}

fn start_servers(tls: rustls::ServerConfig) -> anyhow::Result<Servers> {
    let (ready_tx, ready_rx) = mpsc::channel::<(u16, u16)>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = LocalSet::new();
            local.block_on(&rt, async move {
                let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                let tcp = TcpListener::bind(loopback).await.context("binding TCP")?;
                let quic = transport::server_endpoint(
                    loopback,
                    tls,
                    &[1; 32],
                    tokio::runtime::Handle::current(),
                )?;
                ready_tx
                    .send((tcp.local_addr()?.port(), quic.local_addr()?.port()))
                    .map_err(|_| anyhow!("the bench went away"))?;

                // One connection per transport; each is served until the
                // client hangs up or the bench says stop.
                let tcp_task = tokio::task::spawn_local(async move {
                    let (stream, _) = tcp.accept().await?;
                    stream.set_nodelay(true)?;
                    let (r, w) = stream.into_split();
                    let limits = proven_limits();
                    let system =
                        transport::rpc::serve(r.compat(), tcp_writer(w), echo_bootstrap(), &limits);
                    // A hang-up ends the system with an error; that is the
                    // normal end of the session here.
                    let _ = system.await;
                    anyhow::Ok(())
                });
                let quic_ep = quic.clone();
                let quic_task = tokio::task::spawn_local(async move {
                    let incoming = quic_ep
                        .accept()
                        .await
                        .ok_or_else(|| anyhow!("QUIC endpoint closed"))?;
                    let conn = incoming.await.context("QUIC handshake")?;
                    transport::endpoint::open_windows(&conn);
                    let limits = proven_limits();
                    let _ = transport::rpc::serve_connection(conn, echo_bootstrap(), &limits).await;
                    anyhow::Ok(())
                });
                let _ = stop_rx.await;
                tcp_task.abort();
                quic_task.abort();
                quic.close(transport::close::CloseCode::Done.into(), b"bench done");
                let _ = tokio::time::timeout(Duration::from_secs(2), quic.wait_idle()).await;
                anyhow::Ok(())
            })
        })
        .context("spawning the server thread")?;
    match ready_rx.recv() {
        Ok((tcp_port, quic_port)) => Ok(Servers {
            tcp_port,
            quic_port,
            stop: stop_tx,
            thread,
        }),
        Err(_) => Err(match thread.join() {
            Ok(Err(e)) => e.context("server thread failed to start"),
            Ok(Ok(())) => anyhow!("server thread exited before listening"),
            Err(_) => anyhow!("server thread panicked"),
        }),
    }
}

// ---------------------------------------------------------------- client side

async fn ping(client: &cluster::Client) -> Result<(), capnp::Error> {
    let mut req = client.ping_request();
    req.get().set_payload(&PAYLOAD);
    let resp = req.send().promise.await?;
    let echoed = resp.get()?.get_payload()?;
    if echoed != PAYLOAD {
        return Err(capnp::Error::failed(
            "ping echoed a different payload".into(),
        ));
    }
    Ok(())
}

/// Sequential round trips; returns each call's latency.
async fn sequential(client: &cluster::Client, calls: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(calls);
    let deadline = Instant::now() + PHASE_BUDGET;
    for _ in 0..calls {
        let t = Instant::now();
        ping(client).await?;
        samples.push(t.elapsed());
        if Instant::now() > deadline {
            break;
        }
    }
    Ok(samples)
}

/// `calls` pings keeping `IN_FLIGHT` outstanding; returns (completed, elapsed).
async fn pipelined(client: &cluster::Client, calls: usize) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let deadline = start + PHASE_BUDGET;
    let mut in_flight = FuturesUnordered::new();
    let mut issued = 0;
    while issued < calls.min(IN_FLIGHT) {
        in_flight.push(ping(client));
        issued += 1;
    }
    let mut done = 0;
    while let Some(r) = in_flight.next().await {
        r?;
        done += 1;
        if issued < calls && Instant::now() < deadline {
            in_flight.push(ping(client));
            issued += 1;
        }
    }
    Ok((done, start.elapsed()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Quic,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "TCP",
            Kind::Quic => "QUIC",
        }
    }
}

/// One round's numbers for one transport.
#[derive(Clone, Copy)]
struct Round {
    p50_us: f64,
    p99_us: f64,
    latency_calls: usize,
    rps: f64,
    throughput_calls: usize,
}

fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

async fn measure(client: &cluster::Client) -> anyhow::Result<Round> {
    let mut lat = tokio::time::timeout(PHASE_TIMEOUT, sequential(client, LATENCY_CALLS))
        .await
        .map_err(|_| anyhow!("latency phase timed out"))??;
    lat.sort_unstable();
    let (done, elapsed) = tokio::time::timeout(PHASE_TIMEOUT, pipelined(client, THROUGHPUT_CALLS))
        .await
        .map_err(|_| anyhow!("throughput phase timed out"))??;
    Ok(Round {
        p50_us: percentile_us(&lat, 0.50),
        p99_us: percentile_us(&lat, 0.99),
        latency_calls: lat.len(),
        rps: done as f64 / elapsed.as_secs_f64(),
        throughput_calls: done,
    })
}

async fn warm_up(client: &cluster::Client) -> anyhow::Result<()> {
    let work = async {
        sequential(client, WARMUP_SEQ).await?;
        pipelined(client, WARMUP_PIPELINED).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(PHASE_TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("warm-up timed out"))?
}

/// The client's connections, both already carrying a bootstrap capability.
struct Clients {
    tcp: cluster::Client,
    tcp_system: tokio::task::JoinHandle<()>,
    quic: cluster::Client,
    quic_endpoint: quinn::Endpoint,
    quic_conn: quinn::Connection,
}

async fn connect_tcp(port: u16) -> anyhow::Result<(cluster::Client, tokio::task::JoinHandle<()>)> {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .context("connecting over TCP")?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let (system, client) =
        transport::rpc::connect::<_, _, cluster::Client>(r.compat(), tcp_writer(w));
    let task = tokio::task::spawn_local(async move {
        let _ = system.await;
    });
    Ok((client, task))
}

async fn connect_all(servers: &Servers, pin: identity::Fingerprint) -> anyhow::Result<Clients> {
    let (tcp, tcp_system) = connect_tcp(servers.tcp_port).await?;
    let addr = ClusterAddress {
        host: "127.0.0.1".into(),
        port: servers.quic_port,
        fingerprint: Some(pin),
        alternates: Vec::new(),
    };
    let (quic_endpoint, quic_conn) = transport::dial(&addr, None)
        .await
        .context("dialing over QUIC")?;
    let quic = transport::rpc::connect_connection::<cluster::Client>(&quic_conn)
        .await
        .context("opening the RPC stream")?;
    Ok(Clients {
        tcp,
        tcp_system,
        quic,
        quic_endpoint,
        quic_conn,
    })
}

async fn run_client(
    servers: &Servers,
    pin: identity::Fingerprint,
) -> anyhow::Result<Vec<(Kind, Round)>> {
    let clients = connect_all(servers, pin).await?;
    warm_up(&clients.tcp).await.context("TCP warm-up")?;
    warm_up(&clients.quic).await.context("QUIC warm-up")?;
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        // Alternate which transport goes first.
        let order = if round % 2 == 0 {
            [Kind::Tcp, Kind::Quic]
        } else {
            [Kind::Quic, Kind::Tcp]
        };
        for kind in order {
            let client = match kind {
                Kind::Tcp => &clients.tcp,
                Kind::Quic => &clients.quic,
            };
            let r = measure(client)
                .await
                .with_context(|| format!("{} round {}", kind.name(), round + 1))?;
            println!(
                "  round {} {:<4}  p50 {:>7.1} us  p99 {:>7.1} us  ({} calls)  {:>9.0} req/s  ({} calls)",
                round + 1,
                kind.name(),
                r.p50_us,
                r.p99_us,
                r.latency_calls,
                r.rps,
                r.throughput_calls
            );
            rounds.push((kind, r));
        }
    }
    let Clients {
        tcp,
        tcp_system,
        quic,
        quic_endpoint,
        quic_conn,
    } = clients;
    drop(tcp);
    drop(quic);
    tcp_system.abort();
    quic_conn.close(transport::close::CloseCode::Done.into(), b"bench done");
    let _ = tokio::time::timeout(Duration::from_secs(2), quic_endpoint.wait_idle()).await;
    Ok(rounds)
}

// ---------------------------------------------------------------- report

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Summary {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
}

fn summarize(rounds: &[(Kind, Round)], kind: Kind) -> Summary {
    let of = |f: fn(&Round) -> f64| {
        median(
            rounds
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    Summary {
        p50_us: of(|r| r.p50_us),
        p99_us: of(|r| r.p99_us),
        rps: of(|r| r.rps),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("rpc bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let (tls, pin) = quic_tls()?;
    let servers = start_servers(tls)?;

    println!(
        "miren transport RPC bench: Cluster.ping, {}-byte payload, loopback, {} rounds",
        PAYLOAD.len(),
        ROUNDS
    );
    println!(
        "  per round: {LATENCY_CALLS} sequential calls, {THROUGHPUT_CALLS} calls with {IN_FLIGHT} in flight (TCP: TCP_NODELAY, buffered writer)"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let local = LocalSet::new();
    let result = local.block_on(&rt, run_client(&servers, pin));

    let Servers { stop, thread, .. } = servers;
    let _ = stop.send(());
    match thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("server thread: {e:#}"),
        Err(_) => eprintln!("server thread panicked"),
    }
    let rounds = result?;

    let tcp = summarize(&rounds, Kind::Tcp);
    let quic = summarize(&rounds, Kind::Quic);
    println!();
    println!("median of {ROUNDS} rounds:");
    println!(
        "  {:<10} {:>10} {:>10} {:>22}",
        "transport", "p50 (us)", "p99 (us)", "throughput (req/s)"
    );
    for (name, s) in [("TCP", &tcp), ("QUIC", &quic)] {
        println!(
            "  {:<10} {:>10.1} {:>10.1} {:>22.0}",
            name, s.p50_us, s.p99_us, s.rps
        );
    }
    let lat_ratio = quic.p50_us / tcp.p50_us;
    let tput_ratio = quic.rps / tcp.rps;
    println!();
    println!(
        "  QUIC/TCP latency (p50)  {:>6.2}   target <= {:.1}   {}",
        lat_ratio,
        LATENCY_RATIO_TARGET,
        verdict(lat_ratio <= LATENCY_RATIO_TARGET)
    );
    println!(
        "  QUIC/TCP throughput     {:>6.2}   target >= {:.1}   {}",
        tput_ratio,
        THROUGHPUT_RATIO_TARGET,
        verdict(tput_ratio >= THROUGHPUT_RATIO_TARGET)
    );
    Ok(())
}
