//! The miren runner: the cluster's hands.
//!
//! It joins a coordinator with a join token ([`join`]), keeps its identity in
//! its data dir ([`state`]), and stays connected with mTLS, heartbeating and
//! renewing its certificate ([`agent`]). It never holds the signing key: this
//! crate cannot link `coordinator`. What operators see of it (metrics,
//! readiness) is in [`metrics`].

// No `unwrap`/`expect` outside tests: input never panics this crate.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod artifacts;
pub mod backoff;
pub mod bounded_listener;
pub mod call;
pub mod cgroup;
pub mod join;
pub mod known_coordinators;
pub mod layout;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod mint_calls;
pub mod restart_policy;
pub mod sandbox;
pub mod scratch;
pub mod sessions;
pub mod shim;
pub mod state;
pub mod token_limits;
pub mod tokens;
pub mod unpack;

pub use agent::{run, RunnerOptions};

/// The version every runner reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
