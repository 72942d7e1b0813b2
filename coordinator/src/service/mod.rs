//! The Cap'n Proto capabilities the coordinator hands to peers, one file
//! per capability: [`cluster`] (the bootstrap `Cluster` of every
//! connection), [`admin`] (`Admin`, for the admin certificate), [`app`]
//! (`App`, one app's deploy pipeline), [`upload`] (`ArtifactUpload`, one
//! upload in progress) and [`runner_session`] (`RunnerSession`, a joined
//! runner's link, and the task that sends it commands). `wire` reads
//! requests and writes replies; `ci_wire` carries CI bindings and their
//! explanations, for the CLI too.
//!
//! Authorization is by construction: the bootstrap `Cluster` capability
//! knows the TLS identity of its connection, and only hands out an `Admin`
//! capability to a peer holding the cluster's admin certificate, an `App`
//! to an admin or a CI login that matched one of that app's bindings, a
//! `RunnerSession` to a joined runner. Capability objects are thin: they
//! decode, call a typed function of the module that owns the concern
//! (apps, runners, minting, issuer, routes, route_oidc, ci, oidc…), and
//! encode; they reach shared state through `Arc<State>`.

pub mod admin;
pub mod app;
pub mod ci_wire;
pub mod cluster;
pub mod runner_session;
pub mod upload;
mod wire;

pub use admin::{admin_cert_validity, AdminService, MIN_ADMIN_CERT_SECS};
pub use app::AppService;
pub use cluster::ClusterService;
pub use runner_session::RunnerSessionService;
pub use upload::UploadService;
