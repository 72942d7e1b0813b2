//! QUIC endpoints: the coordinator's listener and the client dialer.
//!
//! Dialing turns every way a connection can fail into a [`DialError`] that
//! tells a person what to check, with the fingerprint mismatch reported in
//! the exact words users search for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use identity::{ClusterAddress, Fingerprint};

use crate::tls::{self, ClientIdentity, ServerTrust, TlsConfigError};

/// How long a client waits for the handshake before calling a peer unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TLS alert `unknown_ca` (RFC 8446 §6.2).
const UNKNOWN_CA_ALERT: u8 = 48;

/// Why a connection to a cluster could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("TLS certificate fingerprint mismatch: got {got}, expected {expected}")]
    FingerprintMismatch {
        got: Fingerprint,
        expected: Fingerprint,
    },
    #[error("could not resolve {addr}: {reason} (check the host name in the cluster address)")]
    Resolve { addr: String, reason: String },
    #[error("could not reach the coordinator at {addr} (UDP) within {secs}s: check that `miren server` is running there and that UDP port {port} is reachable")]
    Unreachable { addr: String, port: u16, secs: u64 },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    /// No fingerprint to pin, and no public root vouches for the server.
    #[error("the coordinator at {addr} presented a certificate that no public root vouches for, and nothing pins its cluster CA: add `fingerprint: sha1:<hex>` to that cluster's entry in the client config (the value after `;` that `miren cluster export-address` prints on a trusted machine), or use MIREN_CLUSTER='{addr};sha1:<hex>' (miren never trusts a certificate on first use)")]
    Untrusted { addr: String },
    #[error("the connection to {addr} closed: {reason}")]
    Closed { addr: String, reason: String },
    #[error(transparent)]
    Config(#[from] TlsConfigError),
    #[error("could not open a local UDP socket: {0}")]
    LocalSocket(std::io::Error),
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// Binds a QUIC listener with the given rustls server configuration.
pub fn server_endpoint(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let quic = QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport_config());
    let endpoint = quinn::Endpoint::server(cfg, listen)
        .map_err(|e| anyhow::anyhow!("could not listen on UDP {listen}: {e}"))?;
    Ok(endpoint)
}

/// Dials `addr`, pinning its fingerprint when it has one, presenting
/// `identity` when given. Returns the client endpoint with the connection so
/// the caller can wait for it to drain on exit.
pub async fn dial(
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
        .map_err(|e| DialError::Resolve {
            addr: host_port.clone(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| DialError::Resolve {
            addr: host_port.clone(),
            reason: "no addresses".into(),
        })?;
    let local: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(local).map_err(DialError::LocalSocket)?;
    let quic = QuicClientConfig::try_from(tls.config).map_err(|e| DialError::Handshake {
        addr: host_port.clone(),
        reason: e.to_string(),
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config());
    let connecting = endpoint
        .connect_with(cfg, remote, &addr.host)
        .map_err(|e| DialError::Handshake {
            addr: host_port.clone(),
            reason: e.to_string(),
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
                quinn::ConnectionError::TransportError(t) => DialError::Handshake {
                    addr: host_port,
                    reason: t.to_string(),
                },
                other => DialError::Closed {
                    addr: host_port,
                    reason: other.to_string(),
                },
            })
        }
        Ok(Ok(conn)) => Ok((endpoint, conn)),
    }
}
