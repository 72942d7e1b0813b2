//! QUIC endpoints, TLS configuration and Cap'n Proto RPC over a quinn stream.
//!
//! This crate knows how peers reach and authenticate each other, never what
//! they say: it does not know the coordinator or the runner. Pinning of the
//! cluster CA by fingerprint lives in [`tls`], certificate issuance in [`pki`],
//! dialing and listening in [`endpoint`] (with the QUIC limits of the
//! coordinator's endpoint), the RPC plumbing in [`rpc`] over the [`bounded`]
//! network that keeps a peer within its limits, and the operations
//! endpoints (metrics, health) both sides serve in [`ops`].

#![warn(missing_docs)]
// No `unwrap`/`expect` outside tests: input never panics this crate.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod bounded;
pub mod build_info;
pub mod clock;
pub mod close;
pub mod endpoint;
pub mod files;
pub mod ops;
pub mod peer;
pub mod pki;
pub mod report;
pub mod rlimit;
pub mod rpc;
pub mod tls;

/// ALPN protocol id spoken on every miren QUIC connection.
pub const ALPN: &[u8] = b"miren/1";

pub use endpoint::{dial, server_endpoint, DialError, ListenError};
pub use peer::PeerIdentity;
