//! The miren coordinator: it holds the cluster CA, the signing keys and the
//! store, and serves RPC (QUIC) and, later, HTTPS.
//!
//! [`datadir`] owns the files on disk, [`store`] the durable records,
//! [`service`] the Cap'n Proto capabilities handed to peers, [`frontdoor`]
//! what a peer may cost before it proves a role, and [`server`] wires them
//! to the network with graceful shutdown. [`observe`] is what operators see
//! of it: [`metrics`], the [`audit`] trail and [`health`].

pub mod accept;
pub mod apps;
pub mod artifacts;
pub mod audit;
pub mod ci;
pub mod converge;
pub mod datadir;
pub mod frontdoor;
pub mod health;
pub mod https;
pub mod ingress;
pub mod issuer;
pub mod keyring;
pub mod metrics;
pub mod observe;
pub mod observed;
pub mod oidc;
pub mod outbound;
pub mod route_oidc;
pub mod runner_streams;
pub mod runners;
pub mod server;
pub mod service;
pub mod sso;
pub mod store;

pub use server::{Coordinator, CoordinatorOptions};
