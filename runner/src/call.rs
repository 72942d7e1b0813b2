//! Why a call to the coordinator gave nothing to use, as one typed error
//! for every path that calls it (minting a token, fetching an artifact):
//! the caller decides on the variant (serve a cached token, fail the
//! start), never on the text.
//!
//! What the coordinator says when it refuses travels as Cap'n Proto error
//! text; [`CallError::Rpc`] keeps it as the coordinator's words, with the
//! kind capnp gives it.

use transport::rpc::remote_message;

/// Why a call to the coordinator gave nothing to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// There is no session with the coordinator now.
    #[error("the coordinator is unreachable")]
    Unreachable,
    /// The coordinator did not answer in time.
    #[error("the coordinator did not answer")]
    NoAnswer,
    /// The runner is stopping; nothing is sent any more.
    #[error("runner is shutting down")]
    ShuttingDown,
    /// The call failed: the coordinator refused it, the connection went, or
    /// its reply could not be read.
    #[error("{message}")]
    Rpc {
        /// How capnp classifies the failure (`Failed`, `Disconnected`, ...).
        kind: capnp::ErrorKind,
        /// What the coordinator said, without capnp's prefixes.
        message: String,
    },
}

impl From<capnp::Error> for CallError {
    fn from(e: capnp::Error) -> Self {
        CallError::Rpc {
            kind: e.kind,
            message: remote_message(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_the_coordinators_words() {
        let e = CallError::from(capnp::Error::failed(
            "remote exception: sandbox s1 is not on this runner".into(),
        ));
        assert_eq!(e.to_string(), "sandbox s1 is not on this runner");
        assert!(matches!(
            e,
            CallError::Rpc {
                kind: capnp::ErrorKind::Failed,
                ..
            }
        ));
        let lost = CallError::from(capnp::Error::disconnected("connection lost".into()));
        assert!(matches!(
            lost,
            CallError::Rpc {
                kind: capnp::ErrorKind::Disconnected,
                ..
            }
        ));
    }
}
