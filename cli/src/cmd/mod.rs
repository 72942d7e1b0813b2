//! One module per command group.

pub mod app;
pub mod audit;
pub mod auth;
pub mod auth_key;
pub mod cluster;
pub mod identity;
pub mod route;
pub mod runner;
pub mod server;
