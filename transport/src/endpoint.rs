//! QUIC endpoints: the coordinator's listener and the client dialer.
//!
//! Dialing turns every way a connection can fail into a [`DialError`] that
//! tells a person what to check, with the fingerprint mismatch reported in
//! the exact words users search for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};

use identity::{ClusterAddress, Fingerprint};

use crate::close::CloseCode;
use crate::tls::{self, ClientIdentity, ServerTrust, TlsConfigError};

/// How long a client waits for the handshake before calling a peer unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TLS alert `unknown_ca` (RFC 8446 §6.2).
const UNKNOWN_CA_ALERT: u8 = 48;

/// Why a connection to a cluster could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Every coordinator of the address failed; each with its reason.
    #[error("could not reach any coordinator of the cluster address: {}", .failures.iter().map(|(at, e)| format!("{at}: {e}")).collect::<Vec<_>>().join("; "))]
    NoneReachable {
        /// `host:port` and why, in the order they failed.
        failures: Vec<(String, DialError)>,
    },
    /// The server's chain does not hold the pinned CA.
    #[error("TLS certificate fingerprint mismatch: got {got}, expected {expected}")]
    FingerprintMismatch {
        /// SHA-1 of the top certificate the server presented.
        got: Fingerprint,
        /// The pin.
        expected: Fingerprint,
    },
    /// The host name could not be resolved.
    #[error("could not resolve {addr}: {source} (check the host name in the cluster address)")]
    Resolve {
        /// `host:port` as dialed.
        addr: String,
        /// What the resolver said.
        #[source]
        source: std::io::Error,
    },
    /// The host name resolved to no address.
    #[error("could not resolve {addr}: no addresses (check the host name in the cluster address)")]
    NoAddresses {
        /// `host:port` as dialed.
        addr: String,
    },
    /// No handshake within [`CONNECT_TIMEOUT`].
    #[error("could not reach the coordinator at {addr} (UDP) within {secs}s: check that `miren server` is running there and that UDP port {port} is reachable")]
    Unreachable {
        /// `host:port` as dialed.
        addr: String,
        /// The UDP port.
        port: u16,
        /// Seconds waited.
        secs: u64,
    },
    /// quinn cannot speak QUIC with this TLS configuration.
    #[error("TLS handshake with {addr} failed: {source}")]
    QuicConfig {
        /// `host:port` as dialed.
        addr: String,
        /// Why.
        #[source]
        source: NoInitialCipherSuite,
    },
    /// quinn refused to start the connection (a bad server name, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Connect {
        /// `host:port` as dialed.
        addr: String,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed: a TLS alert or another transport error.
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        /// `host:port` as dialed.
        addr: String,
        /// The transport error ([`quinn::ConnectionError::TransportError`]).
        #[source]
        source: quinn::ConnectionError,
    },
    /// No fingerprint to pin, and no public root vouches for the server.
    #[error("the coordinator at {addr} presented a certificate that no public root vouches for, and nothing pins its cluster CA: add `fingerprint: sha1:<hex>` to that cluster's entry in the client config (the value after `;` that `miren cluster export-address` prints on a trusted machine), or use MIREN_CLUSTER='{addr};sha1:<hex>' (miren never trusts a certificate on first use)")]
    Untrusted {
        /// `host:port` as dialed.
        addr: String,
    },
    /// The connection ended during the handshake: the peer closed it
    /// (see [`DialError::close_code`]), reset it, or it was closed here.
    #[error("the connection to {addr} closed: {source}")]
    Closed {
        /// `host:port` as dialed.
        addr: String,
        /// How it ended.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The client TLS configuration could not be built.
    #[error(transparent)]
    Config(#[from] TlsConfigError),
    /// No local UDP socket to dial from.
    #[error("could not open a local UDP socket: {0}")]
    LocalSocket(#[source] std::io::Error),
}

impl DialError {
    /// The code the coordinator closed the connection with, when it closed
    /// it during the handshake with one of ours (a removed runner is told
    /// so at once).
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            DialError::Closed { source, .. } => CloseCode::of_error(source),
            _ => None,
        }
    }
}

/// Why the coordinator's QUIC endpoint could not listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// quinn cannot speak QUIC with this TLS configuration.
    #[error(transparent)]
    QuicConfig(#[from] NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error("could not listen on UDP {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the coordinator's QUIC endpoint grants a peer, and why.
///
/// One QUIC connection per peer; its first bi-stream carries Cap'n Proto
/// RPC and no peer ever opens another stream towards the coordinator (the
/// ingress streams to a runner are opened by the coordinator, so they count
/// against the runner's limit, [`CLIENT_MAX_INCOMING_BIDI_STREAMS`]). Every
/// window below starts at the value for a peer that has not proven a role
/// and is raised by [`open_windows`] once it has.
pub mod limits {
    use std::time::Duration;

    /// Bi-streams a peer may have open towards the coordinator: the RPC
    /// stream, nothing else.
    pub const MAX_BIDI_STREAMS: u32 = 1;
    /// Uni-streams: none are used.
    pub const MAX_UNI_STREAMS: u32 = 0;
    /// Receive window of the RPC stream: two 512 KiB upload chunks, so an
    /// upload never waits on the window for its next chunk. Fixed at the
    /// handshake (QUIC has no per-connection change for stream windows);
    /// the connection window below is what bounds an unproven peer.
    pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
    /// Connection receive window before a role is proven: two of the
    /// 64 KiB messages such a peer may send.
    pub const UNPROVEN_RECEIVE_WINDOW: u32 = 128 * 1024;
    /// ... and after: room for every stream to fill its own window, so
    /// that on a runner's connection neither its RPC stream nor any of the
    /// ingress streams the coordinator opens ever waits on another stream
    /// whose reader is slow (a single window for all of them would let two
    /// stalled HTTP downloads stop the runner's heartbeats).
    pub const PROVEN_RECEIVE_WINDOW: u32 =
        (CLIENT_MAX_INCOMING_BIDI_STREAMS + 1) * STREAM_RECEIVE_WINDOW;
    /// Connection receive window of a peer logged in to one app: its RPC
    /// stream's own window, so an upload never waits on the connection.
    pub const APP_RECEIVE_WINDOW: u32 = STREAM_RECEIVE_WINDOW;
    /// Bytes we buffer towards a peer logged in to one app: log replies.
    pub const APP_SEND_WINDOW: u64 = 2 * 1024 * 1024;
    /// Bytes we buffer towards an unproven peer (written, not yet
    /// acknowledged): its replies are a few KiB.
    pub const UNPROVEN_SEND_WINDOW: u64 = 128 * 1024;
    /// ... and towards a proven one: artifact reads and log replies of
    /// several MiB, near quinn's default of 10 MB.
    pub const PROVEN_SEND_WINDOW: u64 = 8 * 1024 * 1024;
    /// A connection with no packet for this long is closed. The client
    /// side sends a keep-alive every [`CLIENT_KEEP_ALIVE`]; the server sends
    /// none, so the peer alone keeps a connection alive.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// How often a client (CLI, runner) pings an idle connection.
    pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(5);
    /// Packets each end may receive before it must acknowledge at once
    /// (quinn's default is 1): enough for a burst of proxied requests to be
    /// acknowledged by the answers.
    pub const ACK_ELICITING_THRESHOLD: u32 = 8;
    /// ... and how long it may hold an acknowledgement (quinn's default is
    /// the peer's 25 ms): short, so that a sender waiting on its window (an
    /// upload's first packets) is not held up.
    pub const MAX_ACK_DELAY: Duration = Duration::from_millis(2);
    /// Connection attempts quinn keeps while the accept loop decides on
    /// them (it decides at once, so this is only a backstop).
    pub const MAX_PENDING_INCOMING: usize = 1024;
    /// Bytes buffered for one such attempt.
    pub const INCOMING_BUFFER: u64 = 64 * 1024;
    /// ... and for all of them together.
    pub const INCOMING_BUFFER_TOTAL: u64 = 4 * 1024 * 1024;
    /// Bi-streams the coordinator may open towards a runner: one per
    /// proxied ingress request (quinn's default, made explicit).
    pub const CLIENT_MAX_INCOMING_BIDI_STREAMS: u32 = 100;
}

pub use limits::CLIENT_MAX_INCOMING_BIDI_STREAMS;

fn idle_timeout() -> Option<quinn::IdleTimeout> {
    quinn::IdleTimeout::try_from(limits::IDLE_TIMEOUT).ok()
}

/// The transport of the coordinator's endpoint (see [`limits`]).
pub fn server_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(limits::MAX_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(limits::MAX_UNI_STREAMS.into())
        .stream_receive_window(limits::STREAM_RECEIVE_WINDOW.into())
        .receive_window(limits::UNPROVEN_RECEIVE_WINDOW.into())
        .send_window(limits::UNPROVEN_SEND_WINDOW)
        .max_idle_timeout(idle_timeout())
        .keep_alive_interval(None)
        .datagram_receive_buffer_size(None)
        .ack_frequency_config(Some(ack_frequency()));
    t
}

/// What each end asks of the other's acknowledgements (the QUIC ACK
/// frequency extension, which quinn speaks on both ends): an ACK at the
/// latest after [`limits::ACK_ELICITING_THRESHOLD`] + 1 packets or
/// [`limits::MAX_ACK_DELAY`], so that on a connection carrying requests one
/// way and answers the other the acknowledgements ride on the answers
/// instead of going in packets of their own (quinn's default acknowledges
/// every second packet at once: a packet, a `sendmsg` and a wake-up of the
/// other process each time).
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut f = quinn::AckFrequencyConfig::default();
    f.ack_eliciting_threshold(limits::ACK_ELICITING_THRESHOLD.into())
        .max_ack_delay(Some(limits::MAX_ACK_DELAY));
    f
}

/// The transport of a client connection (CLI, runner): it trusts the
/// server it pinned, so only the idle rules and the streams the server may
/// open are set.
fn client_transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(limits::CLIENT_KEEP_ALIVE))
        .max_idle_timeout(idle_timeout())
        .max_concurrent_bidi_streams(limits::CLIENT_MAX_INCOMING_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .ack_frequency_config(Some(ack_frequency()));
    Arc::new(t)
}

/// Gives a connection whose peer has proven a certificate role the windows
/// of a proven peer (see [`limits`]).
pub fn open_windows(conn: &quinn::Connection) {
    conn.set_receive_window(limits::PROVEN_RECEIVE_WINDOW.into());
    conn.set_send_window(limits::PROVEN_SEND_WINDOW);
}

/// Gives a connection whose peer logged in to one app the windows a
/// deploy needs (see [`limits`]).
pub fn open_app_windows(conn: &quinn::Connection) {
    conn.set_receive_window(limits::APP_RECEIVE_WINDOW.into());
    conn.set_send_window(limits::APP_SEND_WINDOW);
}

/// The quinn server configuration of the coordinator's endpoint.
pub fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, ListenError> {
    let quic = QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(server_transport_config()))
        .max_incoming(limits::MAX_PENDING_INCOMING)
        .incoming_buffer_size(limits::INCOMING_BUFFER)
        .incoming_buffer_size_total(limits::INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// A quinn runtime that runs the endpoint's driver and every connection's
/// driver on the tokio runtime of its handle, whichever runtime starts
/// them, with the UDP socket and the timers on that runtime's reactor and
/// clock. The coordinator gives its network thread here, so that QUIC and
/// what it carries for the ingress stay on one thread.
#[derive(Debug)]
pub struct DriversOn(pub tokio::runtime::Handle);

impl quinn::Runtime for DriversOn {
    fn new_timer(&self, at: std::time::Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _on = self.0.enter();
        Box::pin(tokio::time::sleep_until(at.into()))
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _on = self.0.enter();
        quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)
    }

    fn now(&self) -> std::time::Instant {
        quinn::Runtime::now(&quinn::TokioRuntime)
    }
}

/// Binds a QUIC listener with the given rustls server configuration, its
/// drivers running on `drivers` ([`DriversOn`]).
///
/// `reset_secret` keys the stateless resets the endpoint sends for packets
/// of connections it does not know. Kept across restarts (the coordinator
/// stores it in its data dir), it lets a restarted coordinator tell its
/// peers at their next packet that their old connection is gone, so they
/// reconnect at once instead of after the idle timeout.
pub fn server_endpoint(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    reset_secret: &[u8; 32],
    drivers: tokio::runtime::Handle,
) -> Result<quinn::Endpoint, ListenError> {
    let cfg = server_config(tls)?;
    let reset_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, reset_secret);
    // The connection ids must be recognised as ours by the restarted
    // process too (quinn drops packets whose id its generator did not
    // make, without a reset): the generator's key comes from the secret.
    let tag = aws_lc_rs::hmac::sign(&reset_key, b"miren quic connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
    // quinn sends at most one reset per this interval across the endpoint
    // (20 ms by default): after a restart every peer's keep-alive arrives
    // within the same few milliseconds, and most went unanswered (measured:
    // 192-626 held back for 50 runners, some waiting for the 30 s idle
    // timeout). A reset is smaller than the packet that caused it and only
    // ids our generator made are answered, so a shorter interval amplifies
    // nothing.
    endpoint_cfg.min_reset_interval(std::time::Duration::from_micros(200));
    endpoint_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let bind = |source| ListenError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind)?;
    quinn::Endpoint::new(
        endpoint_cfg,
        Some(cfg),
        socket,
        Arc::new(DriversOn(drivers)),
    )
    .map_err(bind)
}

/// How long a dial waits for one coordinator before it also tries the
/// next one of the address (the earlier attempts go on).
pub const NEXT_COORDINATOR_AFTER: Duration = Duration::from_millis(300);

/// Dials `addr`, pinning its fingerprint when it has one, presenting
/// `identity` when given. Returns the client endpoint with the connection so
/// the caller can wait for it to drain on exit.
///
/// An address that lists several coordinators is dialed in order, the next
/// one started when the earlier ones have not answered within
/// [`NEXT_COORDINATOR_AFTER`] (or have failed); the first handshake that
/// completes wins. A coordinator that presents another CA than the pin
/// ends the dial with the mismatch at once: the pin is the cluster's, and
/// a host of the list that fails it is not quietly skipped.
pub async fn dial(
    addr: &ClusterAddress,
    identity: Option<ClientIdentity>,
) -> Result<(quinn::Endpoint, quinn::Connection), DialError> {
    if addr.alternates.is_empty() {
        return dial_one(addr, identity).await;
    }
    let endpoints = addr.endpoints();
    let mut attempts = futures::stream::FuturesUnordered::new();
    let mut failures: Vec<(String, DialError)> = Vec::new();
    let mut next = 0;
    loop {
        if next < endpoints.len() {
            let one = addr.at(&endpoints[next]);
            let id = identity.clone();
            attempts.push(async move {
                let r = dial_one(&one, id).await;
                (one.host_port(), r)
            });
            next += 1;
        }
        let more_to_start = next < endpoints.len();
        let settled = if more_to_start {
            match tokio::time::timeout(NEXT_COORDINATOR_AFTER, attempts.next()).await {
                Ok(settled) => settled,
                Err(_) => continue,
            }
        } else {
            attempts.next().await
        };
        match settled {
            Some((_, Ok(found))) => return Ok(found),
            Some((_, Err(e @ DialError::FingerprintMismatch { .. }))) => return Err(e),
            Some((at, Err(e))) => failures.push((at, e)),
            None if more_to_start => {}
            None => return Err(DialError::NoneReachable { failures }),
        }
    }
}

/// Dials the first endpoint of `addr` alone.
async fn dial_one(
    addr: &ClusterAddress,
    identity: Option<ClientIdentity>,
) -> Result<(quinn::Endpoint, quinn::Connection), DialError> {
    let trust = match addr.fingerprint {
        Some(fp) => ServerTrust::Pinned(fp),
        None => ServerTrust::Platform,
    };
    let tls = tls::client_config(&trust, identity, &[crate::ALPN])?;
    let host_port = addr.host_port();
    let remote = tokio::net::lookup_host(host_port.as_str())
        .await
        .map_err(|source| DialError::Resolve {
            addr: host_port.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| DialError::NoAddresses {
            addr: host_port.clone(),
        })?;
    let local: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(local).map_err(DialError::LocalSocket)?;
    let quic = QuicClientConfig::try_from(tls.config).map_err(|source| DialError::QuicConfig {
        addr: host_port.clone(),
        source,
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(client_transport_config());
    let connecting = endpoint
        .connect_with(cfg, remote, &addr.host)
        .map_err(|source| DialError::Connect {
            addr: host_port.clone(),
            source,
        })?;
    let mismatch = |tls_mismatch: &Option<Arc<std::sync::Mutex<Option<Fingerprint>>>>| {
        let got = tls_mismatch.as_ref()?.lock().ok()?.as_ref().copied()?;
        let expected = addr.fingerprint?;
        Some(DialError::FingerprintMismatch { got, expected })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(DialError::Unreachable {
            addr: host_port,
            port: addr.port,
            secs: CONNECT_TIMEOUT.as_secs(),
        }),
        Ok(Err(e)) => {
            if let Some(err) = mismatch(&tls.mismatch) {
                return Err(err);
            }
            Err(match e {
                quinn::ConnectionError::TimedOut => DialError::Unreachable {
                    addr: host_port,
                    port: addr.port,
                    secs: CONNECT_TIMEOUT.as_secs(),
                },
                // rustls answers a chain no root vouches for with the
                // unknown_ca alert (UnknownIssuer).
                quinn::ConnectionError::TransportError(t)
                    if addr.fingerprint.is_none()
                        && t.code == quinn::TransportErrorCode::crypto(UNKNOWN_CA_ALERT) =>
                {
                    DialError::Untrusted { addr: host_port }
                }
                source @ quinn::ConnectionError::TransportError(_) => DialError::Handshake {
                    addr: host_port,
                    source,
                },
                source => DialError::Closed {
                    addr: host_port,
                    source,
                },
            })
        }
        Ok(Ok(conn)) => Ok((endpoint, conn)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, ClusterCa};

    fn tls(ca: &ClusterCa) -> rustls::ServerConfig {
        let leaf = ca.issue_server(&["127.0.0.1".into()]).expect("leaf");
        crate::tls::server_config(
            ca.cert_der(),
            vec![
                pki::cert_der_from_pem(&leaf.cert_pem).expect("cert"),
                ca.cert_der().clone(),
            ],
            pki::key_der_from_pem(&leaf.key_pem).expect("key"),
            &[crate::ALPN],
        )
        .expect("tls")
    }

    fn test_ca() -> ClusterCa {
        let generated = ClusterCa::generate("t").expect("CA");
        ClusterCa::load(&generated.cert_pem, &generated.key_pem).expect("load")
    }

    /// A coordinator's endpoint for `ca` on a free loopback port, its
    /// drivers on `drivers` (bound from whatever runtime the caller is in).
    fn bind(ca: &ClusterCa, drivers: tokio::runtime::Handle) -> quinn::Endpoint {
        server_endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            tls(ca),
            &[1; 32],
            drivers,
        )
        .expect("bind")
    }

    /// The address of `endpoint`, pinned to `ca`.
    fn pinned(ca: &ClusterCa, endpoint: &quinn::Endpoint) -> ClusterAddress {
        ClusterAddress {
            host: "127.0.0.1".into(),
            port: endpoint.local_addr().expect("addr").port(),
            fingerprint: Some(ca.fingerprint()),
            alternates: Vec::new(),
        }
    }

    #[test]
    fn the_drivers_run_on_the_given_runtime_not_the_one_that_bound() {
        let ca = test_ca();
        let drivers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        // Bound from a runtime that is gone right after: with its drivers
        // there, the endpoint would answer nothing.
        let endpoint = {
            let binder = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _in = binder.enter();
            bind(&ca, drivers.handle().clone())
        };
        let addr = pinned(&ca, &endpoint);
        drivers.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if let Ok(conn) = incoming.await {
                    conn.closed().await;
                }
            }
        });
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dialed = client.block_on(dial(&addr, None));
        assert!(dialed.is_ok(), "{:?}", dialed.err());
    }

    #[test]
    fn each_end_asks_the_other_to_acknowledge_less_often() {
        let ca = test_ca();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let endpoint = {
            let _in = rt.enter();
            bind(&ca, rt.handle().clone())
        };
        let addr = pinned(&ca, &endpoint);
        // Frames of the extension one end sent and received.
        let ack_frequency_frames = |conn: &quinn::Connection| {
            let stats = conn.stats();
            (stats.frame_tx.ack_frequency, stats.frame_rx.ack_frequency)
        };
        let (server_seen, client_seen) = rt.block_on(async move {
            // The server echoes every 4-byte message of the first stream.
            let server = tokio::spawn(async move {
                let conn = endpoint
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("conn");
                let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
                let mut msg = [0u8; 4];
                while recv.read_exact(&mut msg).await.is_ok() {
                    send.write_all(&msg).await.expect("echo");
                }
                ack_frequency_frames(&conn)
            });
            let (_client_endpoint, conn) = dial(&addr, None).await.expect("dial");
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            for i in 0u32..20 {
                send.write_all(&i.to_be_bytes()).await.expect("send");
                let mut back = [0u8; 4];
                recv.read_exact(&mut back).await.expect("echo");
                assert_eq!(back, i.to_be_bytes());
            }
            send.finish().expect("finish");
            let server_seen = server.await.expect("server");
            (server_seen, ack_frequency_frames(&conn))
        });
        // Each asked the other once (the delay asked for does not follow
        // the round-trip time, so it is not asked again; on loopback the
        // one packet is not lost). Sent and received are both counted, so
        // a failure tells a request never made from one lost on the way.
        assert_eq!(
            server_seen,
            (1, 1),
            "ACK_FREQUENCY frames the server sent, got"
        );
        assert_eq!(
            client_seen,
            (1, 1),
            "ACK_FREQUENCY frames the client sent, got"
        );
    }
}
