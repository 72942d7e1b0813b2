//! Why a miren QUIC connection was closed, in the one form both sides use:
//! the coordinator closes with these codes, and a runner reads them back
//! from the connection itself. The error a pending stream or RPC call sees
//! may say only "connection lost"; the connection's close reason does not.

/// The runner was removed from the cluster: reconnecting is pointless.
pub const RUNNER_REMOVED: u32 = 2;
/// The reason sent with [`RUNNER_REMOVED`].
pub const RUNNER_REMOVED_REASON: &str = "runner removed from the cluster";

/// Closes `conn` because its runner was removed from the cluster.
pub fn close_runner_removed(conn: &quinn::Connection) {
    conn.close(RUNNER_REMOVED.into(), RUNNER_REMOVED_REASON.as_bytes());
}

/// Whether the peer closed `conn` because this runner was removed.
pub fn is_runner_removed(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(RUNNER_REMOVED)
    )
}
