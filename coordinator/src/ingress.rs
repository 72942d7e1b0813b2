//! HTTP ingress: the proxy that carries a request, by its Host, to a
//! healthy sandbox of the routed app. The route records are
//! [`crate::routes`]' (which also chooses the route), the login flow in
//! front of a protected route is [`crate::sso`]'s.
//!
//! The coordinator is the only way in: a request is carried to the runner
//! that hosts the chosen sandbox over a bi-stream of that runner's QUIC
//! connection (header line `miren-proxy/1 <sandbox-id>`), where the runner
//! connects it to the sandbox. HTTP/1.1 is spoken over that stream
//! whatever the client spoke, without the client's hop-by-hop headers
//! ([`crate::hop_by_hop`]), so WebSocket upgrades pass through; the
//! connection is kept alive and reused for the sandbox's next requests
//! ([`crate::upstream`]), except on a protected route, for an upgrade or
//! for a request with a body. Unknown host: 404; no healthy
//! sandbox: 503. The same service is offered over plain HTTP
//! (`--http-listen`) and over HTTPS (`--ingress-https-listen`, with the
//! HTTPS listener's certificate); the scheme the client used is what the app
//! sees in `X-Forwarded-Proto` and what route OIDC's cookies and callback
//! URL follow.
//!
//! The forwarding headers an app sees are the ingress's own: whatever the
//! client sent as `Forwarded`, `X-Forwarded-*`, `X-Real-IP` and the like (in
//! any case, with `_` or `-`) is removed by the same filter that removes
//! route OIDC's claim headers (`identity::headers::HeaderFilter`), and
//! `X-Forwarded-For`, `-Proto` and `-Host` are set from what the coordinator
//! saw. Every listener keeps the timeouts and connection caps of
//! [`crate::accept`]; each connection to a sandbox holds one stream to a
//! runner, counted per runner and per app ([`crate::runner_streams`]), so
//! an app whose requests are held gets 503 without taking its runner's
//! other apps along.
//!
//! The listeners, their connections and the connections to sandboxes run
//! on the network thread with the QUIC drivers ([`crate::net_thread`]), so
//! a request crosses no thread; route OIDC's gate, which reads the store,
//! runs on the multi-threaded runtime ([`Ingress::gate_runtime`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use identity::headers::HeaderFilter;

use crate::accept::ListenerLimits;
use crate::apps::Apps;
use crate::hop_by_hop;
use crate::labs::{Feature, Labs};
use crate::observe::Observe;
use crate::oidc::OidcVerifier;
use crate::routes::{check_host, normalize_host, Route, RouteOidc, Routes};
use crate::runner_streams::{StreamBudget, STREAM_OPEN_TIMEOUT};
use crate::runners::Registry;
use crate::shutdown::Tasks;
use crate::sso::Sso;
use crate::upstream::{Replay, Returning, Reuse, UpBody, Upstream, UpstreamPool};

/// First line of a proxied stream.
pub const PROXY_PREAMBLE: &str = "miren-proxy/1";

type Body = BoxBody<Bytes, hyper::Error>;

/// What the proxy reads: routes, where the routed app's healthy sandboxes
/// are and how to reach their runners, and for protected routes the login
/// flow (labs).
pub struct Ingress {
    pub routes: Arc<Routes>,
    pub apps: Arc<Apps>,
    /// Assignments and active versions in memory (never the store per
    /// request).
    pub index: Arc<crate::sandbox_index::SandboxIndex>,
    pub registry: Arc<Registry>,
    pub sso: Arc<Sso>,
    pub oidc: Arc<OidcVerifier>,
    pub labs: Labs,
    pub observe: Arc<Observe>,
    /// Ingress connections and upgraded tunnels are among these, closed
    /// when the coordinator shuts down.
    pub tasks: Tasks,
    /// Where route OIDC's gate runs: it reads and writes the store, which
    /// may wait on etcd, and the ingress's own thread also drives every
    /// QUIC connection ([`crate::net_thread`]), so nothing may block there.
    pub gate_runtime: tokio::runtime::Handle,
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What the ingress listeners share: the limits of each connection, the
/// count of streams held to each runner and the idle connections to
/// sandboxes (one count and one pool for both listeners, as they draw on
/// the same runners).
#[derive(Clone)]
pub struct IngressLimits {
    pub listener: ListenerLimits,
    pub streams: Arc<StreamBudget>,
    pub upstreams: Arc<UpstreamPool>,
}

impl IngressLimits {
    /// `listener`'s limits and a stream count of `per_app` streams per app
    /// on each runner ([`StreamBudget::for_runners`]).
    pub fn new(listener: ListenerLimits, per_app: usize) -> Self {
        let streams = StreamBudget::for_runners(per_app);
        Self {
            listener,
            upstreams: UpstreamPool::new(streams.clone()),
            streams,
        }
    }
}

impl Default for IngressLimits {
    fn default() -> Self {
        Self::new(
            ListenerLimits::default(),
            crate::runner_streams::STREAMS_PER_APP,
        )
    }
}

/// How long a pooled connection may take to be ready for the next
/// request (its last response has ended; hyper is finishing it).
const READY_WAIT: Duration = Duration::from_secs(1);

/// How often idle connections to sandboxes are checked for age and
/// closure.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The forwarding headers' filter, built once.
static FORWARDING: std::sync::LazyLock<HeaderFilter> =
    std::sync::LazyLock::new(HeaderFilter::forwarding);

/// Removes every header of the client's request that `filter` strips
/// (after [`hop_by_hop::strip_request`], so `Connection` can no longer name
/// the headers the ingress sets).
fn strip_client_headers(headers: &mut hyper::HeaderMap, filter: &HeaderFilter) {
    let spoofed: Vec<hyper::header::HeaderName> = headers
        .keys()
        .filter(|n| filter.strips(n.as_str()))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// The client end of one ingress connection as the coordinator saw it:
/// what `X-Forwarded-For` says of it is worked out once per connection, not
/// per request.
#[derive(Clone)]
struct Peer {
    remote: SocketAddr,
    /// Whether it came over the HTTPS listener.
    secure: bool,
    forwarded_for: Option<HeaderValue>,
}

impl Peer {
    fn new(remote: SocketAddr, secure: bool) -> Self {
        Self {
            remote,
            secure,
            forwarded_for: HeaderValue::from_str(&remote.ip().to_canonical().to_string()).ok(),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets the forwarding headers the app may trust, after
/// [`strip_client_headers`] removed the client's: `X-Forwarded-For` (the
/// client's address as the coordinator saw it), `X-Forwarded-Proto` (the
/// scheme of the listener) and `X-Forwarded-Host` (`host`, the Host the
/// client asked for, when it named one).
fn set_forwarding_headers(headers: &mut hyper::HeaderMap, peer: &Peer, host: Option<HeaderValue>) {
    if let Some(v) = &peer.forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), v.clone());
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if peer.secure { "https" } else { "http" }),
    );
    if let Some(v) = host.filter(|v| !v.is_empty()) {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
}

async fn proxy(
    state: Arc<Ingress>,
    pool: Arc<UpstreamPool>,
    counter: Arc<AtomicUsize>,
    peer: Peer,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (remote, secure) = (peer.remote, peer.secure);
    // A reverse proxy has no business tunnelling: CONNECT names no path
    // of any app.
    if req.method() == hyper::Method::CONNECT {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the ingress does not tunnel CONNECT requests",
        ));
    }
    // One Host, readable (RFC 9112 §3.2): with two, or one the ingress
    // cannot read, the route could be chosen by one value while the app
    // reads another.
    let mut hosts = req.headers().get_all(HOST).iter();
    let (first_host, second_host) = (hosts.next(), hosts.next());
    if second_host.is_some() || first_host.is_some_and(|h| h.to_str().is_err()) {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "a request names its host in one Host header of visible ASCII",
        ));
    }
    // The host the client asked for, as text and as the value the app gets
    // in `Host` and `X-Forwarded-Host`. A request in absolute form names it
    // in its target, and then the Host header does not count (RFC 9112
    // §3.2.2): the route is chosen by the target's host and the request goes
    // up in origin form with that host as its `Host`, so the ingress and the
    // app never disagree on which host was asked for (naming an open host
    // in `Host` and a protected one in the target must not pass the route
    // OIDC gate of the one the app then serves).
    let host_value = match absolute_form_host(req.uri()) {
        Some(from_target) => {
            let origin_form = req.uri().path_and_query().map_or_else(
                || hyper::Uri::from_static("/"),
                |p| hyper::Uri::from(p.clone()),
            );
            *req.uri_mut() = origin_form;
            req.headers_mut().remove(HOST);
            from_target
        }
        None => req.headers().get(HOST).cloned(),
    };
    // HTTP/1.1 requires a Host (RFC 9112 §3.2): without one the request
    // names no host, and guessing (the default route) would answer for an
    // app the client never asked for. HTTP/1.0 may leave it out; HTTP/2
    // names its authority in the target, read above.
    if host_value.is_none() && req.version() == hyper::Version::HTTP_11 {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request names its host in a Host header",
        ));
    }
    let host_header = host_value
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default();
    let host = normalize_host(&host_header);
    let route = match state.routes.route_for(&host) {
        Ok(Some(route)) => route,
        Ok(None) => {
            return Ok(text(
                StatusCode::NOT_FOUND,
                &format!("no app is routed for host {host:?}"),
            ))
        }
        Err(e) => {
            tracing::error!(host, "route record unreadable: {e}");
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "this host's route cannot be read; the operator must set it again",
            ));
        }
    };
    // Before anything else reads the request: what the client sent under
    // the names the ingress sets (forwarding headers, and on a protected
    // route the claim headers) goes, whatever its spelling.
    let with_claims;
    let filter: &HeaderFilter = match &route.oidc {
        Some(oidc) => {
            with_claims = FORWARDING
                .clone()
                .with(&HeaderFilter::new(&oidc.claim_headers));
            &with_claims
        }
        None => &FORWARDING,
    };
    let version = req.version();
    let upgrade = hop_by_hop::strip_request(req.headers_mut(), version);
    strip_client_headers(req.headers_mut(), filter);
    // Up as HTTP/1.1 (below), which needs a Host: a request in absolute
    // form gets its target's, an HTTP/1.0 one may have come without.
    if !req.headers().contains_key(HOST) {
        if let Some(v) = host_value.clone().filter(|v| !v.is_empty()) {
            req.headers_mut().insert(HOST, v);
        }
    }
    let app = route.app.clone();
    crate::metered::note_ingress_app(&app);
    let labs = state.labs.has(Feature::RouteOidc);
    let mut response_headers = Vec::new();
    match (&route.oidc, labs) {
        (Some(oidc), true) => {
            let gate = {
                let (state, oidc) = (state.clone(), oidc.clone());
                let (host, host_header) = (host.clone(), host_header.clone());
                state.gate_runtime.clone().spawn(async move {
                    let gated = single_sign_on(
                        &state,
                        &oidc,
                        &host,
                        &host_header,
                        remote,
                        secure,
                        &mut req,
                    )
                    .await;
                    (req, gated)
                })
            };
            match gate.await {
                Ok((back, Ok(headers))) => {
                    req = back;
                    response_headers = headers;
                }
                Ok((_, Err(resp))) => return Ok(resp),
                Err(e) => {
                    tracing::error!(host, "route OIDC gate task failed: {e}");
                    return Ok(text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the sign-in check failed; try again",
                    ));
                }
            }
        }
        // Fail closed: without the labs flag the gate does not run, and the
        // app must not get requests it would take as signed in.
        (Some(_), false) => {
            return Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "this route is protected by route OIDC, which is off: start the server with --labs {flag} (or MIREN_LABS={flag}), or `miren route oidc disable` it",
                    flag = Feature::RouteOidc.name()
                ),
            ))
        }
        (None, _) => {}
    }
    set_forwarding_headers(req.headers_mut(), &peer, host_value);
    // A refreshed session cookie goes out with whatever answers: a lost
    // one would leave the browser with a spent refresh token.
    let with_cookies = |mut resp: Response<Body>| {
        for (name, value) in &response_headers {
            resp.headers_mut().append(name.clone(), value.clone());
        }
        resp
    };
    let healthy = state.index.healthy(&app, state.apps.reports());
    if healthy.is_empty() {
        return Ok(with_cookies(text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("app {app} has no healthy sandbox right now"),
        )));
    }
    let start = counter.fetch_add(1, Ordering::Relaxed);
    let reuse = reuse_for(&route, upgrade, req.body().is_end_stream());
    // Up to the sandbox as HTTP/1.1 whatever the client spoke: an HTTP/1.0
    // request would have the app close a connection the pool keeps.
    let mut req = req.map(UpBody::Left);
    *req.version_mut() = hyper::Version::HTTP_11;
    let pool = &pool;
    let mut busy = false;
    // A request is sent again at most once, whichever sandbox it goes to.
    let mut resent = false;
    // Try each healthy sandbox once, starting round-robin.
    'sandboxes: for i in 0..healthy.len() {
        let sb = &healthy[(start + i) % healthy.len()];
        let Some(conn) = state.registry.connection(&sb.runner) else {
            continue;
        };
        let runner_conn = conn.stable_id();
        let checkout = || match reuse {
            Reuse::Pooled => pool.checkout(&sb.id, runner_conn, Instant::now()),
            Reuse::Alone => None,
        };
        let mut pooled = checkout();
        loop {
            let from_pool = pooled.is_some();
            let mut upstream = match pooled.take() {
                // Its last response has just ended: hyper takes the next
                // request once it has finished with it.
                Some(u) if u.sender.is_ready() => u,
                Some(mut u) => match tokio::time::timeout(READY_WAIT, u.sender.ready()).await {
                    Ok(Ok(())) => u,
                    _ => {
                        pooled = checkout();
                        continue;
                    }
                },
                None => match open_upstream(&state, pool, &conn, sb, &app, reuse).await {
                    Ok(u) => u,
                    Err(OpenError::Busy) => {
                        busy = true;
                        continue 'sandboxes;
                    }
                    Err(OpenError::Failed) => continue 'sandboxes,
                },
            };
            let client_upgrade = match (reuse, &mut req) {
                (Reuse::Alone, req) => Some(hyper::upgrade::on(req)),
                (Reuse::Pooled, _) => None,
            };
            // A reused connection may have been closed by the sandbox just
            // as the request went out on it.
            let replay = if from_pool && !resent {
                Replay::of(&req)
            } else {
                None
            };
            let mut resp = match upstream.sender.try_send_request(req).await {
                Ok(r) => r,
                Err(mut e) => match (e.take_message(), replay) {
                    // Not sent: the connection closed meanwhile. Another
                    // idle one, else a new stream, else the next sandbox.
                    (Some(back), _) => {
                        req = back;
                        if from_pool {
                            pooled = checkout();
                        } else {
                            continue 'sandboxes;
                        }
                        continue;
                    }
                    // Sent on a reused connection that closed without an
                    // answer (not one that answered badly): once more, on
                    // a new one.
                    (None, Some(replay)) if closed_unanswered(e.error()) => {
                        resent = true;
                        tracing::debug!(
                            app,
                            sandbox = sb.id,
                            "ingress: resent on a new connection: {}",
                            e.error()
                        );
                        req = replay.into_request();
                        continue;
                    }
                    (None, _) => {
                        return Ok(with_cookies(text(
                            StatusCode::BAD_GATEWAY,
                            &format!("sandbox {} did not answer: {}", sb.id, e.error()),
                        )));
                    }
                },
            };
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            hop_by_hop::strip_response(resp.headers_mut(), switching);
            strip_our_cookies(resp.headers_mut());
            // The ingress speaks its own HTTP version to the client: an app
            // answering as HTTP/1.0 does not close the client's connection.
            *resp.version_mut() = hyper::Version::HTTP_11;
            match client_upgrade {
                Some(client_upgrade) if switching => {
                    let upstream_io = hyper::upgrade::on(&mut resp);
                    let stopping = state.tasks.clone();
                    // On this thread, with the runner connection's driver.
                    let tunnel = state.tasks.track("ingress tunnel", async move {
                        let tunnel = async {
                            if let (Ok(client), Ok(server)) =
                                (client_upgrade.await, upstream_io.await)
                            {
                                let mut client = TokioIo::new(client);
                                let mut server = TokioIo::new(server);
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        };
                        tokio::select! {
                            _ = tunnel => {}
                            _ = stopping.stopping() => {}
                        }
                        // The stream counts until the tunnel is closed.
                        drop(upstream);
                    });
                    tokio::spawn(tunnel);
                    return Ok(with_cookies(resp.map(|b| b.boxed())));
                }
                // Switched without being asked to: that connection is
                // not used again.
                _ if switching => {
                    drop(upstream);
                    return Ok(with_cookies(resp.map(|b| b.boxed())));
                }
                // The stream counts until its response is over; then it
                // goes back to the pool (or closes, when alone).
                _ => {
                    let pool = pool.clone();
                    return Ok(with_cookies(
                        resp.map(|body| Returning::new(body, upstream, pool).boxed()),
                    ));
                }
            }
        }
    }
    if busy {
        let mut resp = with_cookies(text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("app {app} has too many requests in flight; try again shortly"),
        ));
        resp.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    Ok(with_cookies(text(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("app {app}: no runner reachable"),
    )))
}

/// Removes the `Set-Cookie` lines of an app's answer that would set a
/// cookie under route OIDC's names: no app behind the ingress may plant a
/// session or login cookie in a browser (over plain HTTP, with a parent
/// `Domain`, it would reach its sibling hosts: login CSRF, a session of
/// the app's choosing). The names are [`crate::sso::is_our_cookie`]'s.
fn strip_our_cookies(headers: &mut hyper::HeaderMap) {
    let set_cookie = hyper::header::SET_COOKIE;
    if !headers.contains_key(&set_cookie) {
        return;
    }
    let ours = |v: &HeaderValue| {
        let name = v.as_bytes().split(|b| *b == b'=').next();
        crate::sso::is_our_cookie(name.unwrap_or_default())
    };
    if !headers.get_all(&set_cookie).iter().any(ours) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(&set_cookie)
        .iter()
        .filter(|v| !ours(v))
        .cloned()
        .collect();
    headers.remove(&set_cookie);
    for v in kept {
        headers.append(&set_cookie, v);
    }
}

/// The host (and port, when named) of a request in absolute form
/// (`GET http://host:port/path`), as a `Host` value (`Some(None)` if it
/// could not be one); `None` for a request in origin form. What the target
/// says of a user is not part of it.
fn absolute_form_host(uri: &hyper::Uri) -> Option<Option<HeaderValue>> {
    uri.scheme()?;
    let host = uri.host()?;
    let value = match uri.port_u16() {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
        None => HeaderValue::from_str(host),
    };
    Some(value.ok())
}

/// Whether a request's send failed because its connection closed or was
/// reset before any answer (the sandbox closed a kept-alive connection as
/// the request went out), as opposed to an answer hyper could not read.
fn closed_unanswered(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || e.is_closed()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Whether a request may take and leave a pooled connection: not on a
/// protected route (whatever a sandbox ties to a connection stays with one
/// signed-in request), not when it asks to switch protocols (its
/// connection becomes a tunnel), and not when it carries a body (`bodiless`
/// false): an app that leaves a body unread (a GET handler that never
/// reads one, a server that does not decode chunked bodies) would take the
/// rest as a next request, and its answer would reach the next client on
/// that connection.
fn reuse_for(route: &Route, upgrade: bool, bodiless: bool) -> Reuse {
    if route.oidc.is_none() && !upgrade && bodiless {
        Reuse::Pooled
    } else {
        Reuse::Alone
    }
}

/// Why no new connection to a sandbox was made.
enum OpenError {
    /// A stream count is full (the app's or the runner's).
    Busy,
    /// The stream or the HTTP handshake failed.
    Failed,
}

/// A new connection to sandbox `sb`: a stream counted for `app`, its
/// preamble, the HTTP/1.1 handshake, and the task that runs the connection.
async fn open_upstream(
    state: &Ingress,
    pool: &Arc<UpstreamPool>,
    conn: &quinn::Connection,
    sb: &crate::apps::SandboxRecord,
    app: &str,
    reuse: Reuse,
) -> Result<Upstream, OpenError> {
    let permit = pool.take_permit(&sb.runner, app).map_err(|why| {
        tracing::debug!(app, runner = sb.runner, "ingress: {why}");
        OpenError::Busy
    })?;
    let opened = tokio::time::timeout(STREAM_OPEN_TIMEOUT, async {
        let (mut send, recv) = conn.open_bi().await.ok()?;
        send.write_all(format!("{PROXY_PREAMBLE} {}\n", sb.id).as_bytes())
            .await
            .ok()?;
        Some((send, recv))
    })
    .await;
    let (send, recv) = match opened {
        Ok(Some(streams)) => streams,
        Ok(None) => return Err(OpenError::Failed),
        Err(_) => {
            tracing::warn!(
                app,
                runner = sb.runner,
                "ingress: no stream to the runner within {STREAM_OPEN_TIMEOUT:?}"
            );
            return Err(OpenError::Busy);
        }
    };
    let io = TokioIo::new(tokio::io::join(recv, send));
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|_| OpenError::Failed)?;
    let stopping = state.tasks.clone();
    let (stop, dropped) = tokio::sync::oneshot::channel::<()>();
    // On this thread, with the runner connection's driver. It ends when
    // the `Upstream` goes (its response over, the pool done with it): the
    // stream closes then, with its permit, even if hyper is still sending
    // a request body the app answered without reading. An upgrade ends it
    // earlier, handing the stream to the tunnel, which holds the
    // `Upstream` until it closes.
    tokio::spawn(state.tasks.track("ingress stream", async move {
        tokio::select! {
            _ = connection.with_upgrades() => {}
            _ = dropped => {}
            _ = stopping.stopping() => {}
        }
    }));
    Ok(Upstream {
        sender,
        runner_conn: conn.stable_id(),
        sandbox: sb.id.clone(),
        reuse,
        permit,
        stop,
    })
}

/// On a protected route, only WebSocket upgrades pass: an `h2c` upgrade
/// would carry requests the gate never saw. (The other ways around the
/// claim headers that HTTP/1.1 opens — headers named in `Connection`,
/// announced trailers — are closed for every route by
/// [`hop_by_hop::strip_request`].)
fn only_websocket_upgrades(headers: &hyper::HeaderMap) -> Result<(), &'static str> {
    let mut offers = headers.get_all(hyper::header::UPGRADE).iter();
    match (offers.next(), offers.next()) {
        (None, _) => Ok(()),
        (Some(upgrade), None)
            if upgrade
                .to_str()
                .is_ok_and(|u| u.trim().eq_ignore_ascii_case("websocket")) =>
        {
            Ok(())
        }
        // Another protocol, several in one line or in several lines.
        _ => Err("only WebSocket upgrades pass a route protected by route OIDC"),
    }
}

/// Applies route OIDC to a request: strips client-sent claim headers, and
/// either sets the session's claim headers (returns the headers to add to
/// the app's response: proxy it) or answers directly (login redirect,
/// callback, logout, 401).
async fn single_sign_on(
    state: &Ingress,
    oidc: &RouteOidc,
    host: &str,
    authority: &str,
    remote: SocketAddr,
    secure: bool,
    req: &mut Request<Incoming>,
) -> Result<Vec<(hyper::header::HeaderName, HeaderValue)>, Response<Body>> {
    use identity::route_oidc::claim_headers;
    // The client's claim headers are gone already (`proxy`).
    only_websocket_upgrades(req.headers()).map_err(|msg| text(StatusCode::BAD_REQUEST, msg))?;
    // The callback URL is built from the Host header: only a plain
    // `name[:port]` may go into it.
    let authority = authority.trim().to_ascii_lowercase();
    let authority = authority.as_str();
    let (name, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if check_host(name).is_err() || !port_ok {
        return Err(text(
            StatusCode::BAD_REQUEST,
            "route OIDC needs a Host header of the form name[:port]",
        ));
    }
    let provider = match state.routes.provider(&oidc.provider) {
        Ok(Some(p)) => p,
        _ => {
            return Err(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "route OIDC provider missing",
            ))
        }
    };
    // Cookie headers as bytes: a browser may send raw UTF-8 in other
    // cookies' values, and dropping such a line would lose ours with it.
    let cookie_bytes: Vec<u8> = req
        .headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let cookies = String::from_utf8_lossy(&cookie_bytes).into_owned();
    let accepts_html = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let request = crate::sso::GateRequest {
        host,
        authority,
        path_and_query: &path_and_query,
        cookies: &cookies,
        accepts_html,
        secure,
        source: remote.ip(),
        claim_headers: &oidc.claim_headers,
        now: transport::clock::now_unix(),
    };
    let gate = state.sso.gate(&state.oidc, &provider, &request).await;
    match gate {
        crate::sso::Gate::Proxy(claims, set_cookies) => {
            // The app sees its own cookies, byte for byte, never ours.
            let kept: Vec<&[u8]> = cookie_bytes
                .split(|&b| b == b';')
                .map(<[u8]>::trim_ascii)
                .filter(|c| {
                    let name = c.split(|&b| b == b'=').next().unwrap_or_default();
                    !c.is_empty() && !crate::sso::is_our_cookie(name)
                })
                .collect();
            req.headers_mut().remove(hyper::header::COOKIE);
            if !kept.is_empty() {
                if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..])) {
                    req.headers_mut().insert(hyper::header::COOKIE, v);
                }
            }
            for (name, value) in claim_headers(&oidc.claim_headers, &claims) {
                if let (Ok(n), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(value.as_bytes()),
                ) {
                    req.headers_mut().insert(n, v);
                }
            }
            Ok(set_cookies
                .into_iter()
                .filter_map(|(k, v)| {
                    Some((
                        hyper::header::HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(&v).ok()?,
                    ))
                })
                .collect())
        }
        crate::sso::Gate::Respond(status, headers, body) => {
            let mut r = text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                body.trim_end(),
            );
            for (k, v) in headers {
                if let (Ok(n), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    r.headers_mut().append(n, v);
                }
            }
            Err(r)
        }
    }
}

/// Serves the ingress on `listener` until the coordinator shuts down: over
/// TLS with `tls` (HTTP/1.1 only, so upgrades pass through), else plain
/// HTTP. Its connections run on the runtime this runs on (the network
/// thread, [`crate::net_thread`]), the listener is registered there.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    state: Arc<Ingress>,
    limits: IngressLimits,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the ingress listener could not be registered: {e}");
            return;
        }
    };
    let counter = Arc::new(AtomicUsize::new(0));
    let secure = tls.is_some();
    let acceptor = tls.map(|mut config| {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let what = if secure {
        "HTTPS ingress"
    } else {
        "HTTP ingress"
    };
    let http = Arc::new(crate::accept::http1(&limits.listener));
    let tasks = state.tasks.clone();
    // Each listener sweeps the pool they share (a sweep is cheap).
    let sweeping = limits.upstreams.clone();
    tokio::spawn(tasks.track("ingress pool sweep", {
        let tasks = tasks.clone();
        async move {
            loop {
                tokio::select! {
                    _ = tasks.stopping() => return,
                    _ = tokio::time::sleep(SWEEP_EVERY) => sweeping.sweep(Instant::now()),
                }
            }
        }
    }));
    let listener_limits = limits.listener;
    crate::accept::accept_loop(
        what,
        listener,
        acceptor,
        listener_limits,
        tasks,
        move |conn, remote| {
            let (state, pool, counter, http) = (
                state.clone(),
                limits.upstreams.clone(),
                counter.clone(),
                http.clone(),
            );
            let peer = Peer::new(remote, secure);
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = proxy(
                        state.clone(),
                        pool.clone(),
                        counter.clone(),
                        peer.clone(),
                        req,
                    );
                    crate::metered::observe_ingress(state.observe.clone(), answer)
                });
                if let Err(e) = http
                    .serve_connection(TokioIo::new(conn), service)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!(%remote, "{what} connection ended: {e}");
                }
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_unprotected_plain_requests_share_connections() {
        let open = Route {
            host: "a.test".into(),
            app: "a".into(),
            oidc: None,
        };
        let protected = Route {
            oidc: Some(RouteOidc {
                provider: "p".into(),
                claim_headers: vec!["email:X-User-Email".parse().unwrap()],
            }),
            ..open.clone()
        };
        // Whether a request asks to switch, as `proxy` learns it.
        let asks = |pairs: &[(&str, &str)]| {
            hop_by_hop::strip_request(&mut headers(pairs), hyper::Version::HTTP_11)
        };
        let plain = asks(&[("accept", "*/*")]);
        let upgrade = asks(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(!plain && upgrade);
        assert_eq!(reuse_for(&open, plain, true), Reuse::Pooled);
        assert_eq!(reuse_for(&open, upgrade, true), Reuse::Alone);
        assert_eq!(reuse_for(&protected, plain, true), Reuse::Alone);
        assert_eq!(reuse_for(&protected, upgrade, true), Reuse::Alone);
        // A body, read or not by the app, never shares a connection.
        assert_eq!(reuse_for(&open, plain, false), Reuse::Alone);
    }

    #[test]
    fn protected_routes_pass_only_websocket_upgrades() {
        for up in ["h2c", "websocket, h2c", "TLS/1.0"] {
            let mut h = headers(&[("upgrade", up), ("connection", "Upgrade")]);
            assert!(hop_by_hop::strip_request(&mut h, hyper::Version::HTTP_11));
            assert!(only_websocket_upgrades(&h).is_err(), "{up}");
        }
        let mut h = headers(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
        ]);
        assert!(hop_by_hop::strip_request(&mut h, hyper::Version::HTTP_11));
        assert!(only_websocket_upgrades(&h).is_ok());
        // A second Upgrade line is not looked past.
        let mut two = h.clone();
        two.append("upgrade", HeaderValue::from_static("h2c"));
        assert!(only_websocket_upgrades(&two).is_err());
        assert_eq!(h["upgrade"], "WebSocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn client_forwarding_headers_are_replaced_by_ours() {
        let spoofed = [
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("Forwarded", "for=5.6.7.8"),
            ("x-forwarded-for", "1.2.3.4"),
            ("X-Forwarded-For", "1.2.3.5"),
            ("X_Forwarded_For", "1.2.3.6"),
            ("x_forwarded-for", "1.2.3.7"),
            ("x-forwarded-host", "evil.example"),
            ("X_FORWARDED_HOST", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("X_Forwarded_Proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("X-Real-IP", "1.2.3.4"),
            ("X_Real_IP", "1.2.3.4"),
            ("x-real_ip", "1.2.3.4"),
            ("True-Client-IP", "1.2.3.4"),
            ("Client-IP", "1.2.3.4"),
        ];
        let mut pairs: Vec<(&str, &str)> = spoofed.to_vec();
        pairs.push(("accept", "*/*"));
        pairs.push(("x-forwarder", "kept"));
        let mut h = headers(&pairs);
        strip_client_headers(&mut h, &HeaderFilter::forwarding());
        for (name, _) in spoofed {
            assert!(!h.contains_key(name), "{name} kept");
        }
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accept", "x-forwarder"]);
        let remote: SocketAddr = "192.0.2.9:51000".parse().unwrap();
        set_forwarding_headers(
            &mut h,
            &Peer::new(remote, true),
            Some(HeaderValue::from_static("app.example.com:8443")),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example.com:8443");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn forwarding_headers_name_the_client_as_seen() {
        let mut h = headers(&[]);
        let mapped: SocketAddr = "[::ffff:198.51.100.4]:1234".parse().unwrap();
        set_forwarding_headers(&mut h, &Peer::new(mapped, false), None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.4");
        assert_eq!(h["x-forwarded-proto"], "http");
        // No Host, no X-Forwarded-Host (rather than an empty one).
        assert!(!h.contains_key("x-forwarded-host"));
        set_forwarding_headers(
            &mut h,
            &Peer::new(mapped, false),
            Some(HeaderValue::from_static("")),
        );
        assert!(!h.contains_key("x-forwarded-host"));
        let v6: SocketAddr = "[2001:db8::7]:1234".parse().unwrap();
        set_forwarding_headers(
            &mut h,
            &Peer::new(v6, false),
            Some(HeaderValue::from_static("a.test")),
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
    }

    #[test]
    fn an_app_cannot_set_route_oidc_cookies() {
        let mut h = headers(&[
            (
                "set-cookie",
                "miren_oidc_session=planted; Domain=example.com; Path=/",
            ),
            (
                "set-cookie",
                "__HOST-Miren_OIDC_login_abc=x; Path=/; Secure",
            ),
            ("set-cookie", "theme=dark; Path=/"),
            ("set-cookie", " miren_oidc_session =spaced"),
            ("content-type", "text/html"),
        ]);
        strip_our_cookies(&mut h);
        let left: Vec<&str> = h
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["theme=dark; Path=/"]);
        assert_eq!(h["content-type"], "text/html");
    }

    #[test]
    fn a_target_in_absolute_form_gives_its_host_and_port_without_user() {
        let host = |target: &str| absolute_form_host(&target.parse().unwrap());
        assert_eq!(host("/path?q=1"), None);
        assert_eq!(
            host("http://a.test/x"),
            Some(Some(HeaderValue::from_static("a.test")))
        );
        assert_eq!(
            host("https://user:pw@a.test:8443/x"),
            Some(Some(HeaderValue::from_static("a.test:8443")))
        );
        assert_eq!(
            host("http://[2001:db8::1]:81/"),
            Some(Some(HeaderValue::from_static("[2001:db8::1]:81")))
        );
    }

    #[test]
    fn connection_cannot_name_our_headers_away() {
        // As `proxy` does it: hop-by-hop first, then the client's copies,
        // then ours, which no Connection token names any more.
        let mut h = headers(&[
            ("connection", "keep-alive, X-Forwarded-For"),
            ("connection", "x-real-ip, x-user-email"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        hop_by_hop::strip_request(&mut h, hyper::Version::HTTP_11);
        strip_client_headers(&mut h, &HeaderFilter::forwarding());
        set_forwarding_headers(
            &mut h,
            &Peer::new("192.0.2.9:1".parse().unwrap(), false),
            Some(HeaderValue::from_static("a.test")),
        );
        assert!(!h.contains_key("connection"));
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    }

    #[test]
    fn a_protected_route_strips_claim_and_forwarding_headers_in_one_pass() {
        let mapping: identity::route_oidc::ClaimHeader = "email:X-User-Email".parse().unwrap();
        let filter = HeaderFilter::forwarding().with(&HeaderFilter::new(&[mapping]));
        let mut h = headers(&[
            ("x_user_email", "admin@corp"),
            ("X-User-Email", "admin@corp"),
            ("x_forwarded_for", "10.0.0.1"),
            ("cookie", "a=b"),
        ]);
        strip_client_headers(&mut h, &filter);
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["cookie"]);
    }
}
