//! A two-party Cap'n Proto network whose limits follow the peer.
//!
//! capnp-rpc's `twoparty::VatNetwork` reads every message as fast as the
//! peer sends it, with reader options fixed for the whole session, and queues
//! every reply without bound. That suits a trusted peer and nobody else:
//! an anonymous peer could send 64 MiB messages, pipeline calls until the
//! coordinator holds all their parameters at once, or send calls and never
//! read the replies while they pile up in our write queue. capnp-rpc has no
//! limit on calls in flight, so this module supplies it at the one place
//! that sees every message: the network under the RPC system.
//!
//! [`BoundedNetwork`] speaks the same two-party protocol on the wire (a peer
//! using `twoparty` talks to it unchanged) and differs on the receiving side:
//!
//! 1. **Message size.** Before each message the size limit (which is also
//!    the traversal limit) is read from the session's [`Limits`], so a peer
//!    that proves a role mid-session gets larger messages from its next
//!    message on. A message over the limit is refused from its segment
//!    table, before its body is read or allocated, and ends the session.
//! 2. **Calls in flight.** `Call` and `Bootstrap` messages received whose
//!    `Return` has not been sent yet are counted, with the bytes of their
//!    messages (a call's parameters live until it returns), and so are
//!    answers returned with capabilities whose `Finish` has not come (capnp-rpc
//!    keeps those in its answer table until it does). While a count is at its
//!    cap, the next message is not read: the peer's further messages wait in
//!    QUIC flow control, on the peer's side.
//! 3. **Unwritten replies.** Bytes queued for the peer but not yet taken by
//!    the stream are counted; over the cap, the next message is not read
//!    either, so a peer that sends calls and never reads the replies stops
//!    itself instead of filling our memory.
//!
//! Waiting, not refusing: a legitimate peer that pipelines more than the cap
//! is slowed, never failed, and nothing is ever read that we could not hold.
//! This is deadlock-free as long as a call's handler never waits for a
//! message from the same peer (the reply to a call it makes on that peer's
//! capabilities): the handlers in flight then finish on their own and reopen
//! the gate. The coordinator keeps that rule (calls on a runner's agent run in
//! their own task; see ARCHITECTURE.md).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};

use capnp::capability::Promise;
use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp::serialize::{OwnedSegments, SegmentLengthsBuilder};
use capnp_rpc::rpc_capnp::message as rpc_message;
use capnp_rpc::rpc_twoparty_capnp::Side;
use futures::channel::oneshot;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, FutureExt, TryFutureExt};

/// Nesting depth of any incoming message.
pub const NESTING_LIMIT: i32 = 64;

/// Most segments a message may have (capnp's own limit).
const MAX_SEGMENTS: usize = 512;

/// What one RPC session may hold at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcLimits {
    /// Largest incoming message, in bytes; also its traversal limit, so a
    /// small message cannot be read as a large one through shared pointers.
    pub max_message_bytes: usize,
    /// Calls received whose reply has not been sent, plus answers the
    /// peer has not finished.
    pub max_calls: usize,
    /// Bytes of the messages of those calls.
    pub max_call_bytes: usize,
    /// Bytes of replies queued and not yet written to the stream.
    pub max_unwritten_bytes: usize,
}

impl RpcLimits {
    /// A peer that has not proven a role. 64 KiB holds the largest thing
    /// such a peer sends (a `join` with a CSR and labels is about 2 KiB, a
    /// `ciLogin` at most 16 KiB of token); 32 calls and 256 KiB in flight
    /// let the CI login bench pipeline 32 logins on one connection.
    pub const UNPROVEN: RpcLimits = RpcLimits {
        max_message_bytes: 64 * 1024,
        max_calls: 32,
        max_call_bytes: 256 * 1024,
        max_unwritten_bytes: 64 * 1024,
    };

    /// A peer logged in to one app (an access token from a deploy key or a
    /// CI login): room for a deploy — 512 KiB upload chunks; a log reply
    /// over the unwritten cap is still written, it only holds the next
    /// message back until it is — and no more, since anyone with a credential for any
    /// app can open such connections.
    pub const APP: RpcLimits = RpcLimits {
        max_message_bytes: 1024 * 1024,
        max_calls: 32,
        max_call_bytes: 8 * 1024 * 1024,
        max_unwritten_bytes: 4 * 1024 * 1024,
    };

    /// An admin or a runner (a certificate of the cluster's): the message
    /// limit the cluster always had (upload chunks are 512 KiB, artifact
    /// reads larger), and caps that only a runaway peer would meet.
    pub const PROVEN: RpcLimits = RpcLimits {
        max_message_bytes: 64 * 1024 * 1024,
        max_calls: 256,
        max_call_bytes: 128 * 1024 * 1024,
        max_unwritten_bytes: 16 * 1024 * 1024,
    };

    fn reader_options(&self) -> ReaderOptions {
        let mut opts = ReaderOptions::new();
        opts.traversal_limit_in_words(Some(self.max_message_bytes / 8));
        opts.nesting_limit(NESTING_LIMIT);
        opts
    }
}

/// The counters of one session, shared by its reader, its writer and the
/// [`Limits`] handles.
struct Shared {
    limits: Cell<RpcLimits>,
    /// Question id of each call in flight, with its message's bytes.
    calls: RefCell<HashMap<u32, usize>>,
    call_bytes: Cell<usize>,
    /// Answers returned that wait for the peer's `Finish`.
    unfinished: RefCell<HashSet<u32>>,
    /// Calls in flight the peer already finished (cancelled).
    finished_early: RefCell<HashSet<u32>>,
    unwritten: Cell<usize>,
    /// Woken whenever a count drops or the limits change, if the reader
    /// waits (`waiting`): the session lives on one thread, so a change
    /// either precedes the reader's check or follows its `waiting = true`.
    changed: tokio::sync::Notify,
    waiting: Cell<bool>,
}

impl Shared {
    fn may_read(&self) -> bool {
        let l = self.limits.get();
        self.calls.borrow().len() + self.unfinished.borrow().len() < l.max_calls
            && self.call_bytes.get() < l.max_call_bytes
            && self.unwritten.get() < l.max_unwritten_bytes
    }

    fn call_received(&self, question: u32, bytes: usize) {
        if let Some(old) = self.calls.borrow_mut().insert(question, bytes) {
            // A reused question id ends the session in capnp-rpc; keep the
            // sum honest meanwhile.
            self.call_bytes
                .set(self.call_bytes.get().saturating_sub(old));
        }
        self.call_bytes.set(self.call_bytes.get() + bytes);
    }

    fn wake(&self) {
        if self.waiting.replace(false) {
            self.changed.notify_waiters();
        }
    }

    fn returned(&self, answer: u32, finish_needed: bool) {
        let Some(bytes) = self.calls.borrow_mut().remove(&answer) else {
            return;
        };
        self.call_bytes
            .set(self.call_bytes.get().saturating_sub(bytes));
        if finish_needed && !self.finished_early.borrow_mut().remove(&answer) {
            self.unfinished.borrow_mut().insert(answer);
        }
        self.wake();
    }

    fn finish_received(&self, question: u32) {
        if self.unfinished.borrow_mut().remove(&question) {
            self.wake();
        } else if self.calls.borrow().contains_key(&question) {
            self.finished_early.borrow_mut().insert(question);
        }
    }

    fn queued(&self, bytes: usize) {
        self.unwritten.set(self.unwritten.get() + bytes);
    }

    fn written(&self, bytes: usize) {
        self.unwritten
            .set(self.unwritten.get().saturating_sub(bytes));
        self.wake();
    }

    /// Resolves once the next message may be read.
    async fn gate(&self) {
        loop {
            // Created before the check, so a wake-up in between is not lost.
            let notified = self.changed.notified();
            if self.may_read() {
                return;
            }
            self.waiting.set(true);
            notified.await;
        }
    }
}

/// A handle on the limits of one session, kept by whoever decides what the
/// peer has proven. Not `Send`: it lives on the session's thread.
#[derive(Clone)]
pub struct Limits(Rc<Shared>);

impl Limits {
    /// Limits for a new session.
    pub fn new(limits: RpcLimits) -> Self {
        Limits(Rc::new(Shared {
            limits: Cell::new(limits),
            calls: RefCell::new(HashMap::new()),
            call_bytes: Cell::new(0),
            unfinished: RefCell::new(HashSet::new()),
            finished_early: RefCell::new(HashSet::new()),
            unwritten: Cell::new(0),
            changed: tokio::sync::Notify::new(),
            waiting: Cell::new(false),
        }))
    }

    /// Changes the limits; every message whose segment table has not been
    /// read yet obeys them.
    pub fn set(&self, limits: RpcLimits) {
        self.0.limits.set(limits);
        self.0.wake();
    }

    /// The limits now in force.
    pub fn get(&self) -> RpcLimits {
        self.0.limits.get()
    }

    /// Calls received and not yet returned, plus answers not finished.
    pub fn calls_in_flight(&self) -> usize {
        self.0.calls.borrow().len() + self.0.unfinished.borrow().len()
    }

    /// Bytes of replies queued and not yet written.
    pub fn unwritten_bytes(&self) -> usize {
        self.0.unwritten.get()
    }
}

/// Reads one message under `limits`; `None` at a clean end of stream.
///
/// The framing is capnp's stream format (segment count - 1, segment sizes,
/// padding, segments). The size is checked on the segment table, so a
/// message over the limit is refused before its body is read or allocated.
/// The limits are read once the segment table is in, so a peer that
/// proved a role while we waited for its next message gets the new ones.
async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    shared: &Shared,
) -> capnp::Result<Option<capnp::message::Reader<OwnedSegments>>> {
    let mut first = [0u8; 8];
    let n = reader.read(&mut first).await?;
    if n == 0 {
        return Ok(None);
    }
    if n < 8 {
        reader.read_exact(&mut first[n..]).await?;
    }
    let count = u32::from_le_bytes([first[0], first[1], first[2], first[3]]) as usize + 1;
    if count > MAX_SEGMENTS {
        return Err(capnp::Error::failed(format!(
            "message has {count} segments, more than {MAX_SEGMENTS}"
        )));
    }
    let mut lengths = SegmentLengthsBuilder::with_capacity(count);
    lengths
        .try_push_segment(u32::from_le_bytes([first[4], first[5], first[6], first[7]]) as usize)?;
    if count > 1 {
        // The other sizes, padded to a whole word.
        let mut rest = vec![0u8; (count & !1) * 4];
        reader.read_exact(&mut rest).await?;
        for size in rest.chunks_exact(4).take(count - 1) {
            lengths.try_push_segment(
                u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize
            )?;
        }
    }
    let limits = shared.limits.get();
    let bytes = lengths.total_words().saturating_mul(8);
    if bytes > limits.max_message_bytes {
        return Err(capnp::Error::failed(format!(
            "message of {bytes} bytes refused: this connection accepts at most {} bytes per message{}",
            limits.max_message_bytes,
            if limits.max_message_bytes < RpcLimits::PROVEN.max_message_bytes {
                " until the peer proves a role"
            } else {
                ""
            }
        )));
    }
    let mut segments = lengths.into_owned_segments();
    reader.read_exact(&mut segments[..]).await?;
    Ok(Some(capnp::message::Reader::new(
        segments,
        limits.reader_options(),
    )))
}

/// What an incoming message means for the counts.
enum Received {
    /// A `Call` or `Bootstrap`: a question that gets a `Return`.
    Question(u32),
    /// A `Finish` of a question.
    Finish(u32),
    Other,
}

fn received(message: &capnp::message::Reader<OwnedSegments>) -> Received {
    let Ok(root) = message.get_root::<rpc_message::Reader<'_>>() else {
        return Received::Other;
    };
    match root.which() {
        Ok(rpc_message::Call(Ok(call))) => Received::Question(call.get_question_id()),
        Ok(rpc_message::Bootstrap(Ok(b))) => Received::Question(b.get_question_id()),
        Ok(rpc_message::Finish(Ok(f))) => Received::Finish(f.get_question_id()),
        _ => Received::Other,
    }
}

/// The answer id of a `Return`, and whether the peer must `Finish` it.
fn answer_of(message: &Builder<HeapAllocator>) -> Option<(u32, bool)> {
    let root: rpc_message::Reader<'_> = message.get_root_as_reader().ok()?;
    match root.which().ok()? {
        rpc_message::Return(r) => {
            let r = r.ok()?;
            Some((r.get_answer_id(), !r.get_no_finish_needed()))
        }
        _ => None,
    }
}

struct IncomingMessage {
    message: capnp::message::Reader<OwnedSegments>,
}

impl capnp_rpc::IncomingMessage for IncomingMessage {
    fn get_body(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.message.get_root()
    }
}

type Sender = capnp_futures::Sender<Rc<Builder<HeapAllocator>>>;

struct OutgoingMessage {
    message: Builder<HeapAllocator>,
    sender: Sender,
    shared: Rc<Shared>,
}

impl capnp_rpc::OutgoingMessage for OutgoingMessage {
    fn get_body(&mut self) -> capnp::Result<capnp::any_pointer::Builder<'_>> {
        self.message.get_root()
    }

    fn get_body_as_reader(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.message.get_root_as_reader()
    }

    fn send(self: Box<Self>) -> (Promise<(), capnp::Error>, Rc<Builder<HeapAllocator>>) {
        let OutgoingMessage {
            message,
            mut sender,
            shared,
        } = *self;
        if let Some((answer, finish_needed)) = answer_of(&message) {
            shared.returned(answer, finish_needed);
        }
        shared.queued(capnp::serialize::compute_serialized_size_in_words(&message) * 8);
        let message = Rc::new(message);
        (
            Promise::from_future(sender.send(message.clone()).map_ok(|_| ())),
            message,
        )
    }

    fn take(self: Box<Self>) -> Builder<HeapAllocator> {
        self.message
    }

    fn size_in_words(&self) -> usize {
        self.message.size_in_words()
    }
}

/// The stream replies are written to, counting what it takes.
struct CountingWriter<W> {
    inner: W,
    shared: Rc<Shared>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.shared.written(*n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.shared.written(*n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

struct ConnectionInner<R> {
    /// Taken while a read is in progress.
    input: Rc<RefCell<Option<R>>>,
    sender: Sender,
    side: Side,
    shared: Rc<Shared>,
    on_disconnect: Option<oneshot::Sender<()>>,
}

impl<R> Drop for ConnectionInner<R> {
    fn drop(&mut self) {
        if let Some(f) = self.on_disconnect.take() {
            let _ = f.send(());
        }
    }
}

struct Connection<R> {
    inner: Rc<RefCell<ConnectionInner<R>>>,
}

impl<R: AsyncRead + Unpin + 'static> capnp_rpc::Connection<Side> for Connection<R> {
    fn get_peer_vat_id(&self) -> Side {
        self.inner.borrow().side
    }

    fn new_outgoing_message(
        &mut self,
        first_segment_word_size: u32,
    ) -> Box<dyn capnp_rpc::OutgoingMessage> {
        let inner = self.inner.borrow();
        Box::new(OutgoingMessage {
            message: Builder::new(
                HeapAllocator::new().first_segment_words(first_segment_word_size),
            ),
            sender: inner.sender.clone(),
            shared: inner.shared.clone(),
        })
    }

    fn receive_incoming_message(
        &mut self,
    ) -> Promise<Option<Box<dyn capnp_rpc::IncomingMessage>>, capnp::Error> {
        let inner = self.inner.borrow();
        let slot = inner.input.clone();
        let shared = inner.shared.clone();
        let Some(mut input) = slot.borrow_mut().take() else {
            return Promise::err(capnp::Error::failed(
                "a second read started on one RPC stream".into(),
            ));
        };
        Promise::from_future(async move {
            shared.gate().await;
            let message = read_message(&mut input, &shared).await?;
            *slot.borrow_mut() = Some(input);
            Ok(message.map(|message| {
                match received(&message) {
                    Received::Question(q) => shared.call_received(q, message.size_in_words() * 8),
                    Received::Finish(q) => shared.finish_received(q),
                    Received::Other => {}
                }
                Box::new(IncomingMessage { message }) as Box<dyn capnp_rpc::IncomingMessage>
            }))
        })
    }

    fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), capnp::Error> {
        Promise::from_future(self.inner.borrow_mut().sender.terminate(result))
    }
}

/// A two-party network for the serving side of one RPC stream, bounded by
/// a [`Limits`] handle.
pub struct BoundedNetwork<R: AsyncRead + Unpin + 'static> {
    connection: Option<Connection<R>>,
    weak: Weak<RefCell<ConnectionInner<R>>>,
    driver: futures::future::Shared<Promise<(), capnp::Error>>,
    side: Side,
}

impl<R: AsyncRead + Unpin + 'static> BoundedNetwork<R> {
    /// A network reading `reader` and writing `writer` under `limits`.
    pub fn new<W: AsyncWrite + Unpin + 'static>(
        reader: R,
        writer: W,
        side: Side,
        limits: &Limits,
    ) -> Self {
        let shared = limits.0.clone();
        let (fulfiller, disconnected) = oneshot::channel();
        let disconnected =
            disconnected.map_err(|_| capnp::Error::disconnected("disconnected".into()));
        let (sender, queue) = capnp_futures::write_queue(CountingWriter {
            inner: writer,
            shared: shared.clone(),
        });
        // Wait for the connection to be dropped even when the queue failed,
        // as twoparty does.
        let driver = Promise::from_future(queue.then(move |r| {
            disconnected
                .then(move |_| futures::future::ready(r))
                .map_ok(|_| ())
        }))
        .shared();
        let connection = Connection {
            inner: Rc::new(RefCell::new(ConnectionInner {
                input: Rc::new(RefCell::new(Some(reader))),
                sender,
                side,
                shared,
                on_disconnect: Some(fulfiller),
            })),
        };
        let weak = Rc::downgrade(&connection.inner);
        BoundedNetwork {
            connection: Some(connection),
            weak,
            driver,
            side,
        }
    }
}

impl<R: AsyncRead + Unpin + 'static> capnp_rpc::VatNetwork<Side> for BoundedNetwork<R> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn capnp_rpc::Connection<Side>>> {
        if host_id == self.side {
            return None;
        }
        let inner = self.weak.upgrade()?;
        Some(Box::new(Connection { inner }))
    }

    fn accept(&mut self) -> Promise<Box<dyn capnp_rpc::Connection<Side>>, capnp::Error> {
        match self.connection.take() {
            Some(c) => Promise::ok(Box::new(c) as Box<dyn capnp_rpc::Connection<Side>>),
            None => Promise::from_future(futures::future::pending()),
        }
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
        Promise::from_future(self.driver.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp::capability::Rc as CapRc;
    use schema::miren_capnp::cluster;
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

    /// `ping` echoes; while `hold` is set, it waits until it is cleared.
    #[derive(Default)]
    struct Echo {
        entered: Cell<usize>,
        hold: Cell<bool>,
        released: tokio::sync::Notify,
    }

    struct EchoCap(Rc<Echo>);

    impl cluster::Server for EchoCap {
        async fn ping(
            self: CapRc<Self>,
            params: cluster::PingParams,
            mut results: cluster::PingResults,
        ) -> Result<(), capnp::Error> {
            let echo = self.0.clone();
            echo.entered.set(echo.entered.get() + 1);
            while echo.hold.get() {
                echo.released.notified().await;
            }
            results.get().set_payload(params.get()?.get_payload()?);
            Ok(())
        }
    }

    /// A server under `limits` and a twoparty client, over an in-memory
    /// pipe of `buffer` bytes each way.
    fn pair(
        echo: &Rc<Echo>,
        limits: &Limits,
        buffer: usize,
    ) -> (
        cluster::Client,
        tokio::task::JoinHandle<Result<(), capnp::Error>>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(buffer);
        let (sr, sw) = tokio::io::split(server_io);
        let bootstrap: cluster::Client = capnp_rpc::new_client(EchoCap(echo.clone()));
        let server = tokio::task::spawn_local(crate::rpc::serve(
            sr.compat(),
            sw.compat_write(),
            bootstrap.client,
            limits,
        ));
        let (cr, cw) = tokio::io::split(client_io);
        let (system, client) =
            crate::rpc::connect::<_, _, cluster::Client>(cr.compat(), cw.compat_write());
        tokio::task::spawn_local(system);
        (client, server)
    }

    async fn ping(client: &cluster::Client, len: usize) -> Result<usize, capnp::Error> {
        let mut req = client.ping_request();
        req.get().set_payload(&vec![7u8; len]);
        let reply = req.send().promise.await?;
        Ok(reply.get()?.get_payload()?.len())
    }

    /// Lets every task run until nothing moves any more.
    async fn settle() {
        for _ in 0..2000 {
            tokio::task::yield_now().await;
        }
    }

    fn frame(build: impl FnOnce(rpc_message::Builder<'_>)) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        build(msg.init_root());
        capnp::serialize::write_message_to_words(&msg)
    }

    fn ping_frame(question: u32, payload: &[u8]) -> Vec<u8> {
        use capnp::traits::HasTypeId;
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_message_over_the_limit_ends_the_session_and_proof_raises_the_limit() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let echo = Rc::new(Echo::default());
                let limits = Limits::new(RpcLimits::UNPROVEN);
                let (client, _server) = pair(&echo, &limits, 1 << 20);
                assert_eq!(ping(&client, 1000).await.expect("small ping"), 1000);
                // Proven while the server already waits for the next message.
                limits.set(RpcLimits::PROVEN);
                assert_eq!(
                    ping(&client, 1 << 20).await.expect("1 MiB once proven"),
                    1 << 20
                );

                let limits = Limits::new(RpcLimits::UNPROVEN);
                let (client, server) = pair(&echo, &limits, 1 << 20);
                let e = ping(&client, 100 * 1024).await.expect_err("over 64 KiB");
                assert!(
                    e.to_string().contains("until the peer proves a role"),
                    "{e}"
                );
                let ended = server.await.expect("server task");
                assert!(ended.is_err(), "the session must end");
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_in_flight_stop_at_the_cap_and_all_finish() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let echo = Rc::new(Echo::default());
                echo.hold.set(true);
                let limits = Limits::new(RpcLimits::UNPROVEN);
                let (client, _server) = pair(&echo, &limits, 1 << 20);
                let calls: Vec<_> = (0..100)
                    .map(|_| {
                        let client = client.clone();
                        tokio::task::spawn_local(async move { ping(&client, 16).await })
                    })
                    .collect();
                settle().await;
                let cap = RpcLimits::UNPROVEN.max_calls;
                let entered = echo.entered.get();
                assert!(entered <= cap, "{entered} calls running, cap {cap}");
                assert!(entered + 2 >= cap, "only {entered} calls running");
                assert!(limits.calls_in_flight() <= cap);
                // Released, every call completes: waiting, not refusing.
                echo.hold.set(false);
                echo.released.notify_waiters();
                for c in calls {
                    assert_eq!(c.await.expect("task").expect("ping"), 16);
                }
                assert_eq!(echo.entered.get(), 100);
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_that_never_reads_replies_stops_itself() {
        use tokio::io::AsyncWriteExt;
        tokio::task::LocalSet::new()
            .run_until(async {
                let echo = Rc::new(Echo::default());
                let limits = Limits::new(RpcLimits::UNPROVEN);
                let (mut peer, server_io) = tokio::io::duplex(64 * 1024);
                let (sr, sw) = tokio::io::split(server_io);
                let bootstrap: cluster::Client = capnp_rpc::new_client(EchoCap(echo.clone()));
                let _server = tokio::task::spawn_local(crate::rpc::serve(
                    sr.compat(),
                    sw.compat_write(),
                    bootstrap.client,
                    &limits,
                ));
                peer.write_all(&frame(|m| m.init_bootstrap().set_question_id(0)))
                    .await
                    .expect("bootstrap");
                let payload = [1u8; 1000];
                let mut written = 0usize;
                let mut question = 1;
                // Up to 8 MiB of pipelined pings, never reading a reply.
                while written < 8 << 20 {
                    let f = ping_frame(question, &payload);
                    question += 1;
                    settle().await;
                    match peer.write_all(&f).now_or_never() {
                        Some(Ok(())) => written += f.len(),
                        Some(Err(e)) => panic!("write failed: {e}"),
                        None => break,
                    }
                }
                assert!(written < 1 << 20, "the server took {written} bytes");
                let cap = RpcLimits::UNPROVEN.max_unwritten_bytes;
                assert!(
                    limits.unwritten_bytes() < cap + 4096,
                    "{} bytes of replies queued",
                    limits.unwritten_bytes()
                );
            })
            .await;
    }
}
