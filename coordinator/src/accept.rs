//! One accept loop for the coordinator's TCP listeners: the HTTPS side
//! (discovery, JWKS) and the ingress (plain or TLS) accept connections the
//! same way, so they share this: accept until shutdown, back off briefly
//! when accept fails (out of file descriptors), finish the TLS handshake
//! within 10 s when there is TLS, and hand each connection to its server on
//! its own task.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream: a TCP connection, or TLS over one.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Accepts on `listener` until `shutdown` resolves; each connection (after
/// the TLS handshake when `tls` is given) goes to `serve` on a new task.
/// `what` names the listener in logs.
pub async fn accept_loop<S, F>(
    what: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    serve: S,
) where
    S: Fn(Box<dyn Connection>, SocketAddr) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("{what}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let tls = tls.clone();
                let serve = serve.clone();
                tokio::spawn(async move {
                    let conn: Box<dyn Connection> = match tls {
                        None => Box::new(tcp),
                        Some(acceptor) => {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => Box::new(s),
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, "{what}: TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%remote, "{what}: TLS handshake timed out");
                                    return;
                                }
                            }
                        }
                    };
                    serve(conn, remote).await;
                });
            }
        }
    }
}
