//! The Cap'n Proto schema shared by the CLI, runners and the coordinator.
//!
//! `miren_capnp` is generated from `capnp/miren.capnp` and committed; run
//! `CAPNP_REGEN=1 cargo build -p schema` after editing the schema.

#[allow(clippy::all, clippy::pedantic, unused, missing_docs)]
#[rustfmt::skip]
pub mod miren_capnp;
