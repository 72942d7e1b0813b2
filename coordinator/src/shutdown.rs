//! One shutdown for everything the coordinator runs, and what happens on
//! SIGTERM.
//!
//! Every listener, connection task, ingress serve task, rollout and
//! background task (key rotation, key audit, certificate renewal) is
//! spawned through [`Tasks`]: it carries one `CancellationToken` (the
//! signal) and one `TaskTracker` (who is still running). Each task watches
//! the token and ends on its own terms.
//!
//! On SIGTERM (or SIGINT): `miren server` (`cli::cmd::server`) cancels the
//! token it got from `Coordinator::shutdown_token`; `--dev`'s runner stops
//! on the same token. Then, in [`Tasks::shut_down`]'s order:
//! 1. the QUIC accept loop, the HTTPS, ingress and metrics listeners stop
//!    accepting; ingress connections, their streams to runners and
//!    upgraded tunnels close; rotation, key audit and certificate renewal
//!    end; readiness turns to "not accepting";
//! 2. the reconcile loop ([`ROLLOUT`], `crate::reconcile`) records every
//!    version still deploying as failed ("interrupted") and forgets its
//!    sandboxes in one store write per app, then asks the runners, still
//!    connected, to stop them (at most 2 s); no new deploy is accepted;
//! 3. every QUIC connection is closed (RPC sessions, runner sessions and
//!    their command tasks end; uploads in progress drop their temporary
//!    files);
//! 4. every task is waited for, [`SHUTDOWN_BOUND`] from the start in all;
//!    what is still running then is logged by kind, and the process exits
//!    0 either way.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a shutdown waits for the coordinator's tasks before it gives
/// up on them (and names them in the log).
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);
/// The kind of a rollout's task: waited for before connections close.
pub const ROLLOUT: &str = "rollout";

/// The coordinator's tasks and the one signal that stops them. Cheap to
/// clone: every clone is the same set.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    token: CancellationToken,
    tracker: TaskTracker,
    /// Where [`Tasks::spawn`] runs tasks: the multi-threaded runtime, also
    /// when called from an RPC worker's thread.
    rt: tokio::runtime::Handle,
    /// Tasks running now, by kind.
    running: Mutex<BTreeMap<&'static str, usize>>,
}

/// Counts one task of a kind for as long as it lives.
struct Running {
    tasks: Arc<Inner>,
    kind: &'static str,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.tasks.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = running.get_mut(self.kind) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(self.kind);
            }
        }
    }
}

impl Tasks {
    /// A fresh set whose tasks run on `rt`.
    pub fn new(rt: tokio::runtime::Handle) -> Tasks {
        Tasks {
            inner: Arc::new(Inner {
                token: CancellationToken::new(),
                tracker: TaskTracker::new(),
                rt,
                running: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The shutdown signal (cancel it to stop the coordinator).
    pub fn token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn stopping(&self) {
        self.inner.token.cancelled().await
    }

    /// Starts shutting down (idempotent).
    pub fn stop(&self) {
        self.inner.token.cancel();
    }

    fn running(&self, kind: &'static str) -> Running {
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        *running.entry(kind).or_default() += 1;
        Running {
            tasks: self.inner.clone(),
            kind,
        }
    }

    /// Runs `fut` on the multi-threaded runtime as a task of `kind`,
    /// tracked until it ends. The future must watch [`Tasks::stopping`]
    /// itself (it decides what ending early means for it).
    pub fn spawn<F>(&self, kind: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let running = self.running(kind);
        self.inner.tracker.spawn_on(
            async move {
                let _running = running;
                fut.await
            },
            &self.inner.rt,
        )
    }

    /// `fut`, tracked as a task of `kind` while it runs wherever the
    /// caller runs it (an RPC worker's `LocalSet`).
    pub fn track<F: Future>(&self, kind: &'static str, fut: F) -> impl Future<Output = F::Output> {
        let running = self.running(kind);
        self.inner.tracker.track_future(async move {
            let _running = running;
            fut.await
        })
    }

    /// Tasks running now, by kind.
    pub fn left(&self) -> Vec<(&'static str, usize)> {
        let running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        running.iter().map(|(k, n)| (*k, *n)).collect()
    }

    /// Waits until no task of `kind` runs, or `deadline`.
    pub async fn wait_for_kind(&self, kind: &'static str, deadline: Instant) {
        while self.left().iter().any(|(k, _)| *k == kind) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts down in the order of the module docs: signal, rollouts,
    /// `close_connections`, every task; returns (and logs) what is still
    /// running after [`SHUTDOWN_BOUND`].
    pub async fn shut_down(&self, close_connections: impl FnOnce()) -> Vec<(&'static str, usize)> {
        self.stop();
        let deadline = Instant::now() + SHUTDOWN_BOUND;
        self.wait_for_kind(ROLLOUT, deadline).await;
        close_connections();
        self.drain(deadline).await
    }

    /// Closes the set and waits for every task until `deadline`; returns
    /// (and logs) what is still running then.
    pub async fn drain(&self, deadline: Instant) -> Vec<(&'static str, usize)> {
        self.inner.tracker.close();
        let _ = tokio::time::timeout_at(deadline, self.inner.tracker.wait()).await;
        let left = self.left();
        if !left.is_empty() {
            let named: Vec<String> = left.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            tracing::warn!(
                "shutdown: still running after the {}s bound, left behind: {}",
                SHUTDOWN_BOUND.as_secs(),
                named.join(", ")
            );
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_that_watch_the_token_and_names_the_rest() {
        let tasks = Tasks::new(tokio::runtime::Handle::current());
        let t = tasks.clone();
        tasks.spawn("polite", async move { t.stopping().await });
        tasks.spawn("stubborn", std::future::pending::<()>());
        let tracked = tasks.track("local", async {});
        assert_eq!(tasks.left(), [("local", 1), ("polite", 1), ("stubborn", 1)]);
        tracked.await;
        tasks.stop();
        assert!(tasks.is_stopping());
        let left = tasks
            .drain(Instant::now() + Duration::from_millis(300))
            .await;
        assert_eq!(left, [("stubborn", 1)]);
    }
}
