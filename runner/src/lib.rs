//! The miren runner: the cluster's hands.
//!
//! It joins a coordinator with a join token, hosts sandboxes and proxies
//! workload-token minting to the coordinator; it never holds the signing key
//! (this crate cannot link `coordinator`). The join, the supervisor and the
//! token endpoint arrive with the runner issues; for now the crate only fixes
//! its place in the dependency graph.
