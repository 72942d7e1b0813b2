//! Kept-alive HTTP/1.1 connections from the ingress to sandboxes, each over
//! one QUIC bi-stream of the sandbox's runner connection.
//!
//! Opening a stream, writing its preamble, the runner connecting to the
//! sandbox and the HTTP handshake cost more than the request they carry.
//! So a connection whose response is complete goes back to an idle list
//! kept per sandbox, and the next request for that sandbox takes it. What
//! keeps this safe:
//!
//! - A connection serves one request at a time: it goes back to the pool
//!   when the last frame of its response body has been read ([`Returning`],
//!   before that frame is written to the client, so the client's next
//!   request finds it there), and is used again only once hyper says it
//!   is ready for the next request. No two requests share one in flight,
//!   and a response always goes to the request that asked for it; a
//!   response not read to its end (the client left) closes its connection.
//! - The ingress pools only requests of unprotected routes without an
//!   upgrade ([`Reuse`]): a protected route's connection is used by one
//!   request and closed, so nothing a sandbox keeps per connection (the
//!   claim headers of a signed-in user) can meet another client's request;
//!   an upgrade turns its connection into a tunnel that never comes back.
//! - A connection is tied to the runner connection it runs over: one from
//!   a runner connection that has since been replaced, or that the sandbox
//!   side closed (a restart closes its sockets), is dropped rather than
//!   used. Idle connections also go after [`IDLE_TIMEOUT`].
//! - A sandbox may close a kept-alive connection whenever it likes (its
//!   own idle timeout, a restart), and a request sent on it in that moment
//!   gets no answer. Such a request is sent again once, on a new
//!   connection, when it can be ([`Replay`]: an idempotent method without
//!   a body, as nginx does for its kept-alive upstreams); what the client
//!   says of its own connection never reaches this one
//!   ([`crate::hop_by_hop`]), and requests go up as HTTP/1.1 whatever the
//!   client spoke, so a client cannot have the app close it.
//! - Every connection, idle or busy, holds its [`StreamPermit`]: the
//!   per-runner and per-app counts of [`crate::runner_streams`] count the
//!   streams really open; dropping an [`Upstream`] ends the task running
//!   its connection ([`Upstream::stop`]), so its stream closes with its
//!   permit. When a count is full, an idle connection of that
//!   runner (of that app, if the app's count is the full one) is closed to
//!   make room before anyone is refused.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request, Uri, Version};

use crate::runner_streams::{Busy, StreamBudget, StreamPermit};

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per sandbox.
pub const IDLE_PER_SANDBOX: usize = 64;

/// Whether a request may use and leave behind a pooled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// An unprotected route's plain request: pooled.
    Pooled,
    /// A protected route's request, or an upgrade: a connection of its
    /// own, closed after it.
    Alone,
}

/// A request's body on its way to a sandbox: the client's, or none for a
/// [`Replay`].
pub type UpBody = Either<Incoming, Empty<Bytes>>;

/// One HTTP/1.1 connection to a sandbox over a runner stream.
pub struct Upstream {
    pub sender: SendRequest<UpBody>,
    /// Which runner connection (`quinn::Connection::stable_id`) it runs
    /// over.
    pub runner_conn: usize,
    pub sandbox: String,
    pub reuse: Reuse,
    /// Its place in the stream counts, given back when it is dropped.
    pub permit: StreamPermit,
    /// Dropped with it: the task running the connection ends then, and the
    /// stream closes. The stream never outlives its permit: hyper would
    /// otherwise go on sending a request body the app no longer waits for
    /// (an answer sent before the body was read) on a stream nobody counts.
    pub stop: tokio::sync::oneshot::Sender<()>,
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// Idle connections by sandbox id.
pub struct UpstreamPool {
    budget: Arc<StreamBudget>,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
}

impl UpstreamPool {
    pub fn new(budget: Arc<StreamBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            idle: Mutex::new(HashMap::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        // Nothing panics while holding it; the lists stay consistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection to `sandbox` over runner connection
    /// `runner_conn` (its last response over; await `sender.ready()`
    /// before sending, as hyper may still be finishing it); connections
    /// found closed, stale or from another runner connection are dropped on
    /// the way.
    pub fn checkout(&self, sandbox: &str, runner_conn: usize, now: Instant) -> Option<Upstream> {
        let mut dropped = Vec::new();
        let mut idle = self.idle();
        let list = idle.get_mut(sandbox)?;
        let mut found = None;
        // Most recently used first: the likeliest to be alive.
        while let Some(entry) = list.pop() {
            if usable(&entry, runner_conn, now) {
                found = Some(entry.upstream);
                break;
            }
            dropped.push(entry);
        }
        if list.is_empty() {
            idle.remove(sandbox);
        }
        drop(idle);
        // Permits are given back outside the pool's lock.
        drop(dropped);
        found
    }

    /// Puts back a connection whose response is over ([`Returning`]).
    pub fn put(&self, upstream: Upstream, now: Instant) {
        if upstream.reuse != Reuse::Pooled || upstream.sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        let list = idle.entry(upstream.sandbox.clone()).or_default();
        let surplus = if list.len() >= IDLE_PER_SANDBOX {
            Some(list.remove(0))
        } else {
            None
        };
        list.push(Idle {
            upstream,
            since: now,
        });
        drop(idle);
        drop(surplus);
    }

    /// A permit for a new stream of `app` on `runner`; when a count is
    /// full, closes one idle connection that holds a place in it and
    /// tries again.
    pub fn take_permit(self: &Arc<Self>, runner: &str, app: &str) -> Result<StreamPermit, Busy> {
        match self.budget.try_take(runner, app) {
            Ok(p) => Ok(p),
            Err(busy) => {
                let same_app = matches!(busy, Busy::App { .. });
                if self.evict_one(runner, same_app.then_some(app)) {
                    self.budget.try_take(runner, app)
                } else {
                    Err(busy)
                }
            }
        }
    }

    /// Closes the longest-idle connection on `runner` (of `app`, if
    /// given); whether there was one.
    fn evict_one(&self, runner: &str, app: Option<&str>) -> bool {
        let mut idle = self.idle();
        let oldest = idle
            .iter()
            .flat_map(|(sandbox, list)| list.iter().enumerate().map(move |(i, e)| (sandbox, i, e)))
            .filter(|(_, _, e)| {
                e.upstream.permit.runner() == runner
                    && app.is_none_or(|a| e.upstream.permit.app() == a)
            })
            .min_by_key(|(_, _, e)| e.since)
            .map(|(sandbox, i, _)| (sandbox.clone(), i));
        let Some((sandbox, i)) = oldest else {
            return false;
        };
        let mut evicted = None;
        if let Some(list) = idle.get_mut(&sandbox) {
            evicted = Some(list.remove(i));
            if list.is_empty() {
                idle.remove(&sandbox);
            }
        }
        drop(idle);
        evicted.is_some()
    }

    /// Drops idle connections that are closed or older than
    /// [`IDLE_TIMEOUT`].
    pub fn sweep(&self, now: Instant) {
        let mut dropped = Vec::new();
        let mut idle = self.idle();
        idle.retain(|_, list| {
            let (keep, gone): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                .into_iter()
                .partition(|e| !e.upstream.sender.is_closed() && !expired(e, now));
            *list = keep;
            dropped.extend(gone);
            !list.is_empty()
        });
        drop(idle);
        drop(dropped);
    }

    /// Idle connections held (all sandboxes).
    pub fn idle_count(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }
}

/// What it takes to send a request again on a new connection after a
/// reused one closed under it without answering: kept only for idempotent
/// methods (RFC 9110 §9.2.2) with an empty body, for which a second
/// delivery means the same as one.
pub struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    /// The copy of `req` to send again, if it may be.
    pub fn of(req: &Request<UpBody>) -> Option<Replay> {
        (req.method().is_idempotent() && req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    /// The request again, as an HTTP/1.1 one.
    pub fn into_request(self) -> Request<UpBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}

/// A response body from a sandbox that hands its connection back to the
/// pool once its last frame has been read (an `Alone` connection, or one
/// whose body was not read to the end, is closed instead).
pub struct Returning {
    body: Incoming,
    upstream: Option<Upstream>,
    pool: Arc<UpstreamPool>,
}

impl Returning {
    pub fn new(body: Incoming, upstream: Upstream, pool: Arc<UpstreamPool>) -> Self {
        Self {
            body,
            upstream: Some(upstream),
            pool,
        }
    }

    fn give_back(&mut self) {
        if let Some(u) = self.upstream.take() {
            self.pool.put(u, Instant::now());
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // A broken response: its connection is not used again.
            Poll::Ready(Some(Err(_))) => this.upstream = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // A body hyper never polled because it was empty is over too.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

fn expired(e: &Idle, now: Instant) -> bool {
    now.saturating_duration_since(e.since) > IDLE_TIMEOUT
}

fn usable(e: &Idle, runner_conn: usize, now: Instant) -> bool {
    e.upstream.runner_conn == runner_conn && !e.upstream.sender.is_closed() && !expired(e, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// A connection over an in-memory pipe whose far end is `far` (drop it
    /// to close the connection).
    async fn connection(
        pool: &Arc<UpstreamPool>,
        sandbox: &str,
        runner_conn: usize,
        reuse: Reuse,
    ) -> (Upstream, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(4096);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stopped => {}
            }
        });
        sender.ready().await.unwrap();
        let permit = pool.take_permit("r", "app").unwrap();
        (
            Upstream {
                sender,
                runner_conn,
                sandbox: sandbox.into(),
                reuse,
                permit,
                stop,
            },
            far,
        )
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_only_while_alive_and_on_its_runner_connection() {
        let budget = StreamBudget::new(10, 10);
        let pool = UpstreamPool::new(budget.clone());
        let now = Instant::now();
        let (a, _far_a) = connection(&pool, "s1", 1, Reuse::Pooled).await;
        pool.put(a, now);
        assert_eq!(pool.idle_count(), 1);
        // Another sandbox, or the same one over a replaced runner
        // connection, does not get it; the stale one is closed.
        assert!(pool.checkout("s2", 1, now).is_none());
        assert!(pool.checkout("s1", 2, now).is_none());
        assert_eq!((pool.idle_count(), budget.held_on("r", "app").1), (0, 0));

        let (b, far_b) = connection(&pool, "s1", 1, Reuse::Pooled).await;
        pool.put(b, now);
        assert!(pool
            .checkout("s1", 1, now)
            .is_some_and(|u| u.sandbox == "s1"));

        // The sandbox side closes (a restart): the idle one is not handed out.
        let (c, far_c) = connection(&pool, "s1", 1, Reuse::Pooled).await;
        pool.put(c, now);
        drop(far_c);
        drop(far_b);
        let closed = async {
            while !pool.idle()["s1"][0].upstream.sender.is_closed() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap();
        assert!(pool.checkout("s1", 1, now).is_none());
        assert_eq!(budget.held_on("r", "app"), (0, 0));
    }

    #[tokio::test]
    async fn alone_connections_are_never_kept_and_old_ones_expire() {
        let budget = StreamBudget::new(10, 10);
        let pool = UpstreamPool::new(budget.clone());
        let now = Instant::now();
        let (a, _far_a) = connection(&pool, "s1", 1, Reuse::Alone).await;
        pool.put(a, now);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(budget.held_on("r", "app").1, 0);
        let (b, _far_b) = connection(&pool, "s1", 1, Reuse::Pooled).await;
        pool.put(b, now);
        pool.sweep(now + IDLE_TIMEOUT / 2);
        assert_eq!(pool.idle_count(), 1);
        pool.sweep(now + IDLE_TIMEOUT + Duration::from_secs(1));
        assert_eq!((pool.idle_count(), budget.held_on("r", "app").1), (0, 0));
    }

    #[tokio::test]
    async fn a_full_count_closes_an_idle_connection_before_refusing() {
        let budget = StreamBudget::new(10, 2);
        let pool = UpstreamPool::new(budget.clone());
        let now = Instant::now();
        let (a, _fa) = connection(&pool, "old-sandbox", 1, Reuse::Pooled).await;
        let (b, _fb) = connection(&pool, "old-sandbox", 1, Reuse::Pooled).await;
        pool.put(a, now);
        pool.put(b, now);
        assert_eq!(budget.held_on("r", "app").1, 2);
        // The app's count is full of idle connections to a sandbox it no
        // longer routes to: a new stream still gets its place.
        let p = pool
            .take_permit("r", "app")
            .expect("an idle one was closed");
        assert_eq!(pool.idle_count(), 1);
        // Full with busy streams only: refused.
        let q = pool.take_permit("r", "app").expect("the other idle one");
        assert!(matches!(
            pool.take_permit("r", "app"),
            Err(Busy::App { .. })
        ));
        drop((p, q));
    }
}
