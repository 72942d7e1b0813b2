//! The miren coordinator: it holds the cluster CA, the signing keys and the
//! store, and serves RPC (QUIC) and HTTPS (discovery, JWKS, ingress).
//!
//! [`server`] starts it ([`Coordinator::start`]) and runs it
//! ([`Coordinator::serve`]) until its one shutdown ([`shutdown`]);
//! [`state`] is what it is made of, by concern; [`service`] holds the Cap'n
//! Proto capabilities handed to peers, thin over the modules that own each
//! concern. ARCHITECTURE.md has the layering of the modules (no module
//! imports one above it) and a code map.

pub mod accept;
pub mod apps;
pub mod artifact_chunks;
pub mod artifacts;
pub mod audit;
pub mod audit_budget;
pub mod blocking;
pub mod ci;
pub mod ci_simulate;
pub mod cluster_secrets;
pub mod converge;
pub mod coordinator_codes;
pub mod coordinator_join;
pub mod coordinators;
pub mod datadir;
pub mod deploy_keys;
pub mod etcd_store;
pub mod frontdoor;
pub mod health;
pub mod hop_by_hop;
pub mod https;
pub mod ingress;
pub mod issuer;
pub mod keyring;
pub mod labs;
pub mod leader;
pub mod metered;
pub mod metrics;
pub mod minting;
pub mod net_thread;
pub mod oauth;
pub mod observe;
pub mod observed;
pub mod oidc;
pub mod outbound;
pub mod reconcile;
pub mod route_oidc;
pub mod routes;
pub mod runner_records;
pub mod runner_streams;
pub mod runners;
pub mod sandbox_index;
pub mod scrape;
pub mod sealed;
pub mod server;
pub mod service;
pub mod shared_cluster;
pub mod shutdown;
pub mod signing_pool;
pub mod spent_tokens;
pub mod sso;
pub mod state;
pub mod store;
pub mod upstream;
pub mod watched;
pub mod wire_types;

pub use server::{Coordinator, CoordinatorOptions};
