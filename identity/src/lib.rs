//! Pure identity rules of miren, free of IO and clocks.
//!
//! Like quinn-proto under quinn, this crate holds the policy and the IO crates
//! (`transport`, `coordinator`, `runner`, `cli`) translate between the wire and
//! these functions. Every time-dependent rule takes `now` as an argument.

pub mod address;

pub use address::{AddressError, ClusterAddress, Fingerprint};
