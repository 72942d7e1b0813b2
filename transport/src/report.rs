//! How an error is shown to a person: its message, then each cause in its
//! chain that the message does not state already.
//!
//! Errors here keep their cause typed (`#[source]`) so that a caller can
//! match on it, and most also name the cause in their own message, because
//! several places print only an error's message (logs, RPC replies). Printed
//! with anyhow's `{:#}`, such an error says its cause twice; the edges that
//! print a whole chain (the CLI's last word, the runner's replies to the
//! coordinator) print [`Chain`] instead.

use std::error::Error;
use std::fmt;

/// Displays an error and the causes its message does not already state,
/// joined by `": "` like anyhow's `{:#}`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = e.to_string();
            if !text.is_empty() && !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            cause = e.source();
        }
        f.write_str(&shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct States {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting the sandbox")]
    struct Silent(#[source] States);

    #[test]
    fn each_cause_is_said_once() {
        let inner = States {
            path: "/x",
            source: std::io::Error::other("denied"),
        };
        assert_eq!(Chain(&inner).to_string(), "reading /x: denied");
        let outer = Silent(inner);
        assert_eq!(
            Chain(&outer).to_string(),
            "starting the sandbox: reading /x: denied"
        );
    }

    #[test]
    fn anyhow_contexts_are_causes_too() {
        let e = anyhow::Error::new(States {
            path: "/x",
            source: std::io::Error::other("denied"),
        })
        .context("joining");
        assert_eq!(format!("{e:#}"), "joining: reading /x: denied: denied");
        assert_eq!(Chain(e.as_ref()).to_string(), "joining: reading /x: denied");
    }
}
