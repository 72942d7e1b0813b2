//! How many proxied streams the ingress holds open to each runner, and to
//! each app on it.
//!
//! Each connection the ingress holds to a sandbox takes one QUIC bi-stream
//! of that sandbox's runner connection for as long as it is open: in
//! flight, idle in [`crate::upstream`]'s pool, or upgraded. A runner grants the
//! coordinator a fixed number of concurrent bi-streams ([`RUNNER_STREAMS`]):
//! once they are all open, `open_bi` waits, and every app on that runner
//! would wait with it. So the ingress counts the streams it holds itself:
//! one app may hold at most [`STREAMS_PER_APP`] on a runner, and the
//! ingress never holds more than the runner grants minus a little headroom
//! (credit comes back a round trip after a stream closes). A request over
//! either bound first closes an idle pooled connection that holds a place
//! in it ([`crate::upstream::UpstreamPool::take_permit`]), then tries the app's sandboxes on other runners and else gets
//! 503 at once: a client holding many connections to one app gets that
//! app's requests refused, not every app's on the runner. `open_bi` also
//! runs under [`STREAM_OPEN_TIMEOUT`], should a runner grant fewer streams
//! than counted here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Concurrent bi-streams a runner lets the coordinator open: quinn's
/// default `max_concurrent_bidi_streams`, which the runner's transport
/// configuration keeps (`transport::endpoint`). The runner opens the RPC
/// stream itself, so all of these are for proxied requests.
pub const RUNNER_STREAMS: usize = 100;
/// Streams left unused on each runner, for credit still on its way back.
pub const RUNNER_STREAM_HEADROOM: usize = 4;
/// Streams one app may hold open on one runner: a third of what a runner
/// grants, so it takes three apps to fill a runner.
pub const STREAMS_PER_APP: usize = 32;
/// How long the ingress waits to open a stream to a runner (and write its
/// first line) before trying elsewhere.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no stream was taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("app {app} holds its limit of {limit} requests in flight on this runner")]
    App { app: String, limit: usize },
    #[error("the runner holds its limit of {limit} requests in flight")]
    Runner { limit: usize },
}

/// The streams the ingress holds, per runner and per app.
#[derive(Debug)]
pub struct StreamBudget {
    per_runner: usize,
    per_app: usize,
    held: Mutex<HashMap<String, RunnerUse>>,
}

#[derive(Debug, Default)]
struct RunnerUse {
    total: usize,
    apps: HashMap<String, usize>,
}

impl StreamBudget {
    /// A budget of `per_runner` streams per runner and `per_app` per app on
    /// each runner.
    pub fn new(per_runner: usize, per_app: usize) -> Arc<Self> {
        Arc::new(Self {
            per_runner,
            per_app,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The budget for runners as they are: [`RUNNER_STREAMS`] less the
    /// headroom, and `per_app` for each app (at most that).
    pub fn for_runners(per_app: usize) -> Arc<Self> {
        let per_runner = RUNNER_STREAMS - RUNNER_STREAM_HEADROOM;
        Self::new(per_runner, per_app.clamp(1, per_runner))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunnerUse>> {
        // Nothing panics while holding it; a poisoned count is still a count.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream for `app` on `runner`, counted until the permit is dropped.
    pub fn try_take(self: &Arc<Self>, runner: &str, app: &str) -> Result<StreamPermit, Busy> {
        let mut held = self.held();
        let usage = held.entry(runner.to_string()).or_default();
        let mine = usage.apps.get(app).copied().unwrap_or(0);
        if mine >= self.per_app {
            return Err(Busy::App {
                app: app.to_string(),
                limit: self.per_app,
            });
        }
        if usage.total >= self.per_runner {
            return Err(Busy::Runner {
                limit: self.per_runner,
            });
        }
        usage.total += 1;
        usage.apps.insert(app.to_string(), mine + 1);
        Ok(StreamPermit {
            budget: self.clone(),
            runner: runner.to_string(),
            app: app.to_string(),
        })
    }

    /// Streams held now on `runner`: in total, and for `app`.
    pub fn held_on(&self, runner: &str, app: &str) -> (usize, usize) {
        let held = self.held();
        match held.get(runner) {
            Some(u) => (u.total, u.apps.get(app).copied().unwrap_or(0)),
            None => (0, 0),
        }
    }
}

/// One proxied stream's place in the [`StreamBudget`]; shared by the tasks
/// that use the stream, given back when the last one drops it.
#[derive(Debug)]
pub struct StreamPermit {
    budget: Arc<StreamBudget>,
    runner: String,
    app: String,
}

impl StreamPermit {
    /// The runner whose stream this is.
    pub fn runner(&self) -> &str {
        &self.runner
    }

    /// The app it counts for.
    pub fn app(&self) -> &str {
        &self.app
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut held = self.budget.held();
        let Some(usage) = held.get_mut(&self.runner) else {
            return;
        };
        usage.total = usage.total.saturating_sub(1);
        if let Some(n) = usage.apps.get_mut(&self.app) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                usage.apps.remove(&self.app);
            }
        }
        if usage.total == 0 {
            held.remove(&self.runner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_app_cannot_take_a_whole_runner() {
        let budget = StreamBudget::new(10, 4);
        let held: Vec<_> = (0..4)
            .map(|_| budget.try_take("r1", "a").unwrap())
            .collect();
        assert_eq!(
            budget.try_take("r1", "a").unwrap_err(),
            Busy::App {
                app: "a".into(),
                limit: 4
            }
        );
        // Another app on the same runner, and the same app elsewhere, go on.
        let _b = budget.try_take("r1", "b").unwrap();
        let _a_elsewhere = budget.try_take("r2", "a").unwrap();
        assert_eq!(budget.held_on("r1", "a"), (5, 4));
        drop(held);
        assert_eq!(budget.held_on("r1", "a"), (1, 0));
        let _again = budget.try_take("r1", "a").unwrap();
    }

    #[test]
    fn the_runner_total_binds_all_apps() {
        let budget = StreamBudget::new(6, 3);
        let _a: Vec<_> = (0..3).map(|_| budget.try_take("r", "a").unwrap()).collect();
        let _b: Vec<_> = (0..3).map(|_| budget.try_take("r", "b").unwrap()).collect();
        assert_eq!(
            budget.try_take("r", "c").unwrap_err(),
            Busy::Runner { limit: 6 }
        );
    }

    #[test]
    fn a_shared_permit_is_given_back_once_when_the_last_holder_drops_it() {
        let budget = StreamBudget::new(2, 1);
        let permit = Arc::new(budget.try_take("r", "a").unwrap());
        let other = permit.clone();
        drop(permit);
        assert_eq!(budget.held_on("r", "a"), (1, 1));
        drop(other);
        assert_eq!(budget.held_on("r", "a"), (0, 0));
        assert!(budget.held().is_empty());
    }

    #[test]
    fn defaults_leave_headroom_and_clamp_the_app_share() {
        let budget = StreamBudget::for_runners(STREAMS_PER_APP);
        assert_eq!(budget.per_runner, RUNNER_STREAMS - RUNNER_STREAM_HEADROOM);
        assert_eq!(budget.per_app, STREAMS_PER_APP);
        assert_eq!(StreamBudget::for_runners(0).per_app, 1);
        assert_eq!(
            StreamBudget::for_runners(1000).per_app,
            RUNNER_STREAMS - RUNNER_STREAM_HEADROOM
        );
    }
}
