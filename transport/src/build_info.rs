//! What a miren binary is: its version, git commit and build date.
//!
//! The `miren` binary's build script knows them; it hands them to the
//! coordinator and the runner it starts, which report them (`cluster
//! status`, `runner list`), so a server's answer names the exact build.

use std::fmt;

/// Version, commit and build date of one binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// The crate version, `0.1.0`.
    pub version: String,
    /// The git commit it was built from (`unknown` outside a checkout).
    pub commit: String,
    /// The build date, `YYYY-MM-DD` (`unknown` when the build knew none).
    pub date: String,
}

impl Default for BuildInfo {
    /// The crate version, commit and date unknown (library use, tests).
    fn default() -> Self {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            commit: "unknown".into(),
            date: "unknown".into(),
        }
    }
}

impl fmt::Display for BuildInfo {
    /// `0.1.0 (commit 8183a3c1f2e0, built 2026-11-29)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (commit {}, built {})",
            self.version, self.commit, self.date
        )
    }
}
