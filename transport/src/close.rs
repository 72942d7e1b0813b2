//! Why a miren QUIC connection was closed, in the one form both sides use:
//! the coordinator closes with these codes, and a runner reads them back
//! from the connection itself. The error a pending stream or RPC call sees
//! may say only "connection lost"; the connection's close reason does not.
//!
//! The codes are a closed set ([`CloseCode`]); what travels is QUIC's
//! application error code (a varint), converted with `From`/`TryFrom` so
//! that no side writes or compares a bare number.

use std::fmt;

/// The application error codes miren closes QUIC connections with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CloseCode {
    /// A normal end: the work is done, or the endpoint is shutting down.
    Done = 0,
    /// A runner connected again with the same id; the older connection goes.
    Replaced = 1,
    /// The runner was removed from the cluster: reconnecting is pointless.
    RunnerRemoved = 2,
    /// The peer went past a limit of the coordinator's front door (too many
    /// unproven connections, no role proven in time).
    Limit = 3,
}

impl CloseCode {
    /// Every code, in numeric order.
    pub const ALL: [CloseCode; 4] = [
        CloseCode::Done,
        CloseCode::Replaced,
        CloseCode::RunnerRemoved,
        CloseCode::Limit,
    ];

    /// The code as QUIC carries it.
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }

    /// The code `conn` was closed with by its peer, if the peer closed it
    /// with one of ours.
    pub fn of_connection(conn: &quinn::Connection) -> Option<CloseCode> {
        Self::of_error(&conn.close_reason()?)
    }

    /// The code in a connection error, when it is the peer closing with
    /// one of ours.
    pub fn of_error(e: &quinn::ConnectionError) -> Option<CloseCode> {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => CloseCode::try_from(c.error_code).ok(),
            _ => None,
        }
    }
}

impl From<CloseCode> for quinn::VarInt {
    fn from(code: CloseCode) -> Self {
        code.varint()
    }
}

/// A close code that is not one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown close code {0}")]
pub struct UnknownCloseCode(pub u64);

impl TryFrom<quinn::VarInt> for CloseCode {
    type Error = UnknownCloseCode;

    fn try_from(v: quinn::VarInt) -> Result<Self, Self::Error> {
        let n = v.into_inner();
        CloseCode::ALL
            .into_iter()
            .find(|c| *c as u64 == n)
            .ok_or(UnknownCloseCode(n))
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseCode::Done => "done",
            CloseCode::Replaced => "replaced by a newer connection",
            CloseCode::RunnerRemoved => RUNNER_REMOVED_REASON,
            CloseCode::Limit => "over a limit",
        })
    }
}

/// Closes `conn` with `code` and a reason for people (sent to the peer).
pub fn close(conn: &quinn::Connection, code: CloseCode, reason: &[u8]) {
    conn.close(code.into(), reason);
}

/// The reason sent with [`CloseCode::RunnerRemoved`].
pub const RUNNER_REMOVED_REASON: &str = "runner removed from the cluster";

/// Closes `conn` because its runner was removed from the cluster.
pub fn close_runner_removed(conn: &quinn::Connection) {
    close(
        conn,
        CloseCode::RunnerRemoved,
        RUNNER_REMOVED_REASON.as_bytes(),
    );
}

/// Whether the peer closed `conn` because this runner was removed.
pub fn is_runner_removed(conn: &quinn::Connection) -> bool {
    CloseCode::of_connection(conn) == Some(CloseCode::RunnerRemoved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_the_varint() {
        for code in CloseCode::ALL {
            let v: quinn::VarInt = code.into();
            assert_eq!(CloseCode::try_from(v), Ok(code));
        }
        // The numbers are the wire contract: they never change.
        assert_eq!(quinn::VarInt::from(CloseCode::Done).into_inner(), 0);
        assert_eq!(quinn::VarInt::from(CloseCode::Replaced).into_inner(), 1);
        assert_eq!(
            quinn::VarInt::from(CloseCode::RunnerRemoved).into_inner(),
            2
        );
        assert_eq!(quinn::VarInt::from(CloseCode::Limit).into_inner(), 3);
        assert_eq!(
            CloseCode::try_from(quinn::VarInt::from_u32(7)),
            Err(UnknownCloseCode(7))
        );
    }

    #[test]
    fn only_an_application_close_carries_a_code() {
        let closed = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: CloseCode::RunnerRemoved.into(),
            reason: RUNNER_REMOVED_REASON.into(),
        });
        assert_eq!(CloseCode::of_error(&closed), Some(CloseCode::RunnerRemoved));
        let foreign = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(99),
            reason: Default::default(),
        });
        assert_eq!(CloseCode::of_error(&foreign), None);
        assert_eq!(CloseCode::of_error(&quinn::ConnectionError::TimedOut), None);
    }
}
