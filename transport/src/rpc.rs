//! Cap'n Proto two-party RPC over a byte stream (a quinn bi-stream in
//! production, TCP in the benchmark).
//!
//! capnp-rpc is not `Send`: everything here must run inside a
//! `tokio::task::LocalSet` (see [`LocalPool`] for running many on threads).
//! The serving side runs on a [`BoundedNetwork`], whose [`Limits`] bound what
//! the peer can make us hold; the connecting side trusts the server it pinned
//! and uses capnp-rpc's `twoparty` network.

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::{AsyncRead, AsyncWrite};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

pub use crate::bounded::{BoundedNetwork, Limits, RpcLimits};

pub use tokio_util::task::LocalPoolHandle as LocalPool;

/// Limits on the replies a client reads from the server it dialed: 64 MiB
/// of words in total and a nesting depth of 64.
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut opts = capnp::message::ReaderOptions::new();
    opts.traversal_limit_in_words(Some(RpcLimits::PROVEN.max_message_bytes / 8));
    opts.nesting_limit(crate::bounded::NESTING_LIMIT);
    opts
}

/// An RPC system serving `bootstrap` to the peer over `reader`/`writer`,
/// bounded by `limits` (which the caller may change as the peer proves
/// who it is).
pub fn serve<R, W>(
    reader: R,
    writer: W,
    bootstrap: capnp::capability::Client,
    limits: &Limits,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let network = BoundedNetwork::new(
        futures::io::BufReader::new(reader),
        writer,
        Side::Server,
        limits,
    );
    RpcSystem::new(Box::new(network), Some(bootstrap))
}

/// An RPC system connected to a server, and the server's bootstrap
/// capability.
pub fn connect<R, W, C>(reader: R, writer: W) -> (RpcSystem<Side>, C)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
    C: capnp::capability::FromClientHook,
{
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        writer,
        Side::Client,
        reader_options(),
    );
    let mut system = RpcSystem::new(Box::new(network), None);
    let client: C = system.bootstrap(Side::Server);
    (system, client)
}

/// Serves `bootstrap` on the first bi-stream the peer opens on `conn`,
/// until the peer goes away, bounded by `limits`. Must run on a `LocalSet`.
pub async fn serve_connection(
    conn: quinn::Connection,
    bootstrap: capnp::capability::Client,
    limits: &Limits,
) -> Result<(), capnp::Error> {
    let (send, recv) = conn
        .accept_bi()
        .await
        .map_err(|e| capnp::Error::disconnected(e.to_string()))?;
    serve(recv.compat(), send.compat_write(), bootstrap, limits).await
}

/// Opens the RPC bi-stream on `conn` and returns the peer's bootstrap
/// capability; the RPC system is spawned on the current `LocalSet`.
pub async fn connect_connection<C>(conn: &quinn::Connection) -> Result<C, capnp::Error>
where
    C: capnp::capability::FromClientHook,
{
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| capnp::Error::disconnected(e.to_string()))?;
    let (system, client) = connect::<_, _, C>(recv.compat(), send.compat_write());
    tokio::task::spawn_local(async move {
        if let Err(e) = system.await {
            tracing::debug!("rpc session ended: {e}");
        }
    });
    Ok(client)
}

/// The message a remote peer meant for people, without capnp's prefixes.
pub fn remote_message(e: &capnp::Error) -> String {
    e.extra.trim_start_matches("remote exception: ").to_string()
}
