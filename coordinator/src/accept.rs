//! One accept loop for the coordinator's TCP listeners, and the limits every
//! one of them keeps against clients that hold on to what they get.
//!
//! The HTTPS side (discovery, JWKS) and the ingress (plain or TLS) accept
//! connections the same way, so they share this: accept until shutdown,
//! back off briefly when accept fails (out of file descriptors), and hand
//! each connection to its server on its own task (one of the coordinator's
//! [`Tasks`], closed when it shuts down). Any client can connect
//! to these listeners, so each connection is bounded ([`ListenerLimits`]):
//!
//! * a cap on connections per listener and per source address (an IPv6
//!   client counts by its /64, which one host usually holds whole); over
//!   it a new connection is closed at once;
//! * the TLS handshake must finish within a timeout;
//! * the request head must arrive within the header timeout, counted from
//!   the connection's start or from the end of the previous response, so
//!   it is also how long an idle keep-alive connection is kept (hyper's
//!   header timer, see [`http1`]); a client trickling a header byte at a
//!   time is cut all the same;
//! * while a request is in progress, a connection on which no byte moved
//!   either way for the idle timeout is closed (a stalled request body, a
//!   client that never reads its response, an app that never answers).
//!
//! An upgraded connection (WebSocket) leaves hyper when the upgrade is
//! done; from then on neither timer runs on it, and it counts against the
//! connection cap until it closes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::shutdown::Tasks;

/// How long a client may take to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head (and how long an
/// idle keep-alive connection is kept).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection with a request in progress may move no byte.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections one listener holds at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections one source address (IPv4 address, IPv6 /64) holds at once
/// on one listener.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 128;

/// What each TCP listener allows a connection; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
        }
    }
}

/// The hyper HTTP/1.1 server builder every listener uses: with a timer, so
/// the header timeout runs (hyper silently has none without one).
pub fn http1(limits: &ListenerLimits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
}

/// A byte stream: a TCP connection, or TLS over one.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the listener holds its limit of {0} connections")]
    Listener(usize),
    #[error("this source address holds its limit of {0} connections")]
    Source(usize),
}

/// Counts the connections a listener holds, in total and per source.
#[derive(Debug)]
pub struct Slots {
    max_total: usize,
    max_per_source: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Slots {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            held: Mutex::new(Held::default()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Nothing panics while holding it; a poisoned count is still a count.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `ip`, given back when dropped.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let source = crate::frontdoor::source_key(ip);
        let mut held = self.held();
        if held.total >= self.max_total {
            return Err(Refused::Listener(self.max_total));
        }
        let mine = held.per_source.get(&source).copied().unwrap_or(0);
        if mine >= self.max_per_source {
            return Err(Refused::Source(self.max_per_source));
        }
        held.total += 1;
        held.per_source.insert(source, mine + 1);
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }

    /// Connections held now, in total.
    pub fn held_total(&self) -> usize {
        self.held().total
    }
}

/// One connection's place in its listener's [`Slots`].
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.per_source.remove(&self.source);
            }
        }
    }
}

/// When a byte last moved on a connection.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// Resolves once no byte has moved for `limit`.
async fn idle(activity: &Activity, limit: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet).await;
    }
}

/// A TCP connection that notes when bytes move and holds its listener slot
/// for as long as it lives (through an upgrade too).
struct Tracked {
    tcp: TcpStream,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Says at most once a minute that a listener is refusing connections,
/// with how many since the last time.
struct RefusalLog {
    what: &'static str,
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);

    fn note(&mut self, remote: SocketAddr, why: Refused) {
        self.since += 1;
        tracing::debug!(%remote, "{}: connection refused: {why}", self.what);
        if self.last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            tracing::warn!(
                "{}: refused {} connection(s) since the last report, latest from {remote}: {why}",
                self.what,
                self.since
            );
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// Accepts on `listener` until the coordinator shuts down (`tasks`); each
/// connection (after the TLS handshake when `tls` is given) goes to `serve`
/// on a new task of `tasks`, within `limits`, and is closed at shutdown.
/// `what` names the listener in logs and its connections among the tasks.
pub async fn accept_loop<S, F>(
    what: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ListenerLimits,
    tasks: Tasks,
    serve: S,
) where
    S: Fn(Box<dyn Connection>, SocketAddr) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Slots::new(limits.max_connections, limits.max_connections_per_source);
    let mut refusals = RefusalLog {
        what,
        last: None,
        since: 0,
    };
    loop {
        tokio::select! {
            _ = tasks.stopping() => break,
            accepted = listener.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("{what}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match slots.try_take(remote.ip()) {
                    Ok(slot) => slot,
                    Err(why) => {
                        // Closed at once: a client over the cap gets no
                        // task, no buffer and no TLS handshake.
                        drop(tcp);
                        refusals.note(remote, why);
                        continue;
                    }
                };
                // A response written in several parts (a streamed body)
                // goes out part by part, not held for the client's ACK.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%remote, "{what}: TCP_NODELAY not set: {e}");
                }
                let activity = Arc::new(Activity::new());
                let io = Tracked { tcp, activity: activity.clone(), _slot: slot };
                let tls = tls.clone();
                let serve = serve.clone();
                let stopping = tasks.clone();
                // On the runtime this loop runs on (the ingress's is the
                // network thread).
                let serving = tasks.track(what, async move {
                    let conn: Box<dyn Connection> = match tls {
                        None => Box::new(io),
                        Some(acceptor) => {
                            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
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
                    // `serve` returns when the connection closes, or when it
                    // is upgraded (the upgraded stream lives on elsewhere,
                    // unwatched).
                    tokio::select! {
                        _ = serve(conn, remote) => {}
                        _ = idle(&activity, limits.idle_timeout) => {
                            tracing::debug!(%remote, "{what}: connection closed after {:?} without traffic", limits.idle_timeout);
                        }
                        _ = stopping.stopping() => {
                            tracing::debug!(%remote, "{what}: connection closed: the coordinator is shutting down");
                        }
                    }
                });
                tokio::spawn(serving);
            }
        }
    }
}

pub use transport::rlimit::raise_open_files_limit;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn slots_cap_each_source_and_the_listener() {
        let slots = Slots::new(5, 2);
        let a1 = slots.try_take(v4(10, 0, 0, 1)).unwrap();
        let _a2 = slots.try_take(v4(10, 0, 0, 1)).unwrap();
        assert_eq!(
            slots.try_take(v4(10, 0, 0, 1)).unwrap_err(),
            Refused::Source(2)
        );
        let _b1 = slots.try_take(v4(10, 0, 0, 2)).unwrap();
        let _b2 = slots.try_take(v4(10, 0, 0, 2)).unwrap();
        let _c1 = slots.try_take(v4(10, 0, 0, 3)).unwrap();
        assert_eq!(
            slots.try_take(v4(10, 0, 0, 4)).unwrap_err(),
            Refused::Listener(5)
        );
        // A slot given back is free again, for its source and the listener.
        drop(a1);
        assert_eq!(slots.held_total(), 4);
        let _a3 = slots.try_take(v4(10, 0, 0, 1)).unwrap();
        assert_eq!(
            slots.try_take(v4(10, 0, 0, 4)).unwrap_err(),
            Refused::Listener(5)
        );
    }

    #[test]
    fn sources_with_no_connection_are_forgotten() {
        let slots = Slots::new(10, 10);
        for i in 0..5 {
            drop(slots.try_take(v4(10, 0, 0, i)).unwrap());
        }
        assert_eq!(slots.held_total(), 0);
        assert!(slots.held().per_source.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_only_after_a_quiet_period() {
        let activity = Activity::new();
        let limit = Duration::from_secs(60);
        // Traffic every 30 s keeps it from resolving.
        for _ in 0..4 {
            tokio::select! {
                _ = idle(&activity, limit) => panic!("resolved while bytes moved"),
                _ = tokio::time::sleep(Duration::from_secs(30)) => activity.touch(),
            }
        }
        let quiet_from = Instant::now();
        idle(&activity, limit).await;
        assert!(quiet_from.elapsed() >= limit);
    }
}
