//! The control plane's decisions, as pure functions: given what should run
//! (an app's versions and its sandbox assignments, from the store) and what
//! was observed (runners, reported health), say what to do next.
//!
//! This is the level-triggered half of the reconcile loop, like a
//! Kubernetes controller's sync: it keeps no memory between calls, so the
//! loop can be restarted at any instant (a coordinator killed mid-rollout
//! resumes from the records) and calling it twice on the same inputs gives
//! the same steps. The loop that applies the steps (store writes, runner
//! commands) lives beside the records; nothing here touches a socket, the
//! store or a clock (`now` is passed in).

use std::collections::{BTreeMap, HashMap};

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Accepted; its sandboxes are being placed and started.
    Deploying,
    /// Serving the app's traffic.
    Active,
    /// Did not become healthy (the reason is kept beside it).
    Failed,
    /// Replaced by a later accepted version.
    Superseded,
}

impl VersionState {
    /// The word shown to operators and stored in records.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Deploying => "deploying",
            VersionState::Active => "active",
            VersionState::Failed => "failed",
            VersionState::Superseded => "superseded",
        }
    }

    /// Whether the version still wants sandboxes.
    fn wants_sandboxes(self) -> bool {
        matches!(self, VersionState::Deploying | VersionState::Active)
    }
}

/// A version as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionView {
    pub id: String,
    /// The store revision at which the deploy was accepted: later wins.
    pub accepted_revision: u64,
    pub accepted_unix: i64,
    pub state: VersionState,
    /// Wanted instances per service name.
    pub services: BTreeMap<String, u32>,
}

/// A sandbox assignment (a store record) as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentView {
    pub id: String,
    pub version: String,
    pub service: String,
    pub runner: String,
    /// Set once the sandbox is to stop: it stops on its runner at this time
    /// (after a drain) and its record goes once the runner no longer has it.
    pub retire_at: Option<i64>,
    /// The assignment this one replaces (moved off a draining or lost
    /// runner); the old one retires once this one is healthy.
    pub replaces: Option<String>,
}

/// A runner as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerView {
    pub id: String,
    /// Connected, not cordoned, not draining, not removed: may get new
    /// sandboxes.
    pub placeable: bool,
    /// Removed, or down longer than the grace period: its sandboxes are
    /// to be placed elsewhere and cannot be waited for.
    pub lost: bool,
    /// Being drained: its sandboxes move elsewhere, each old one retiring
    /// once its replacement is healthy.
    pub draining: bool,
}

/// The health a runner last reported for a sandbox, on its live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Nothing reported since the runner or the coordinator (re)started.
    Unknown,
    Starting,
    Healthy,
    /// The sandbox gave up (crash loop, refused by its runner); the reason
    /// is what the operator sees.
    Failed(String),
}

/// One thing to do. The loop applies each as one compare-and-set write or
/// one runner command, so a step applied twice does no harm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create an assignment of `version`'s `service` on `runner` (replacing
    /// `replaces`, when moving one).
    Assign {
        version: String,
        service: String,
        runner: String,
        replaces: Option<String>,
    },
    /// Mark an assignment to stop at `at`.
    Retire { sandbox: String, at: i64 },
    /// The version's sandboxes are all healthy: it takes the traffic and
    /// the one it replaces is superseded.
    Activate { version: String },
    /// The version did not make it; the reason is kept for `app status`.
    Fail { version: String, reason: String },
    /// A later deploy was accepted before this one finished.
    Supersede { version: String },
}

/// The rules' knobs, from flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a deploy may take to become healthy.
    pub rollout_timeout_secs: i64,
    /// How long retired sandboxes keep serving requests in flight.
    pub drain_secs: i64,
}

/// The steps that bring one app closer to what it should run.
///
/// `load` counts the live assignments per runner across every app (for
/// spreading); the steps returned already account for their own
/// placements.
pub fn plan_app(
    versions: &[VersionView],
    assignments: &[AssignmentView],
    runners: &[RunnerView],
    health: &dyn Fn(&str) -> Health,
    load: &HashMap<String, usize>,
    timing: Timing,
    now: i64,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let runner = |id: &str| runners.iter().find(|r| r.id == id);
    let lost = |a: &AssignmentView| runner(&a.runner).is_none_or(|r| r.lost);

    // The target is the latest accepted version that still wants to run.
    let target = versions
        .iter()
        .filter(|v| v.state.wants_sandboxes())
        .max_by_key(|v| v.accepted_revision);
    let active = versions.iter().find(|v| v.state == VersionState::Active);

    // Older deploys still in flight lose to the target, whichever would
    // have finished first.
    for v in versions {
        if v.state == VersionState::Deploying
            && Some(v.id.as_str()) != target.map(|t| t.id.as_str())
        {
            steps.push(Step::Supersede {
                version: v.id.clone(),
            });
        }
    }

    // Versions whose sandboxes are kept: the target, and the active one
    // while the target is not yet active.
    let mut kept: Vec<&VersionView> = target.into_iter().collect();
    if let (Some(a), Some(t)) = (active, target) {
        if a.id != t.id {
            kept.push(a);
        }
    }

    let mut load = load.clone();

    let live = |a: &&AssignmentView| a.retire_at.is_none();
    for v in &kept {
        for (service, &wanted) in &v.services {
            let mine: Vec<&AssignmentView> = assignments
                .iter()
                .filter(live)
                .filter(|a| a.version == v.id && &a.service == service)
                .collect();
            // Replacements in flight, by the assignment they replace.
            let replaced: HashMap<&str, &AssignmentView> = mine
                .iter()
                .filter_map(|a| a.replaces.as_deref().map(|r| (r, *a)))
                .collect();
            let mut counted = 0u32;
            for a in &mine {
                if a.replaces.is_some() {
                    // Counted through the one it replaces (or alone, once
                    // that one is gone).
                    let old_live = a
                        .replaces
                        .as_deref()
                        .is_some_and(|old| mine.iter().any(|m| m.id == old));
                    if !old_live {
                        counted += 1;
                    }
                    continue;
                }
                let on = runner(&a.runner);
                let must_move = lost(a) || on.is_some_and(|r| r.draining);
                if !must_move {
                    counted += 1;
                    continue;
                }
                match replaced.get(a.id.as_str()) {
                    Some(new) => {
                        counted += 1;
                        // A lost runner's sandbox cannot serve: retire it
                        // now. A draining one serves until its
                        // replacement is healthy.
                        if lost(a) || health(&new.id) == Health::Healthy {
                            steps.push(Step::Retire {
                                sandbox: a.id.clone(),
                                at: now,
                            });
                        }
                    }
                    None => {
                        if let Some(r) = place_one(runners, &mut load) {
                            steps.push(Step::Assign {
                                version: v.id.clone(),
                                service: service.clone(),
                                runner: r,
                                replaces: Some(a.id.clone()),
                            });
                        }
                        counted += 1;
                    }
                }
            }
            if counted < wanted {
                for _ in counted..wanted {
                    let Some(r) = place_one(runners, &mut load) else {
                        break;
                    };
                    steps.push(Step::Assign {
                        version: v.id.clone(),
                        service: service.clone(),
                        runner: r,
                        replaces: None,
                    });
                }
            } else if counted > wanted {
                // More than wanted (a replacement whose old one came back):
                // retire the newest extras, never one being replaced.
                let extras = mine
                    .iter()
                    .rev()
                    .filter(|a| !replaced.contains_key(a.id.as_str()))
                    .take((counted - wanted) as usize);
                for a in extras {
                    steps.push(Step::Retire {
                        sandbox: a.id.clone(),
                        at: now,
                    });
                }
            }
        }
        // Services the version no longer has.
        for a in assignments.iter().filter(live) {
            if a.version == v.id && !v.services.contains_key(&a.service) {
                steps.push(Step::Retire {
                    sandbox: a.id.clone(),
                    at: now,
                });
            }
        }
    }

    // Sandboxes of versions that are not kept retire: at once for a
    // version that failed (it never took traffic), after a drain for the
    // others (requests in flight to a version just replaced finish).
    for a in assignments.iter().filter(live) {
        if kept.iter().any(|v| v.id == a.version) {
            continue;
        }
        let failed = versions
            .iter()
            .any(|v| v.id == a.version && v.state == VersionState::Failed);
        steps.push(Step::Retire {
            sandbox: a.id.clone(),
            at: if failed { now } else { now + timing.drain_secs },
        });
    }

    // A deploying target: fail it, or activate it once every wanted
    // instance is healthy.
    if let Some(t) = target.filter(|t| t.state == VersionState::Deploying) {
        let mine: Vec<&AssignmentView> = assignments
            .iter()
            .filter(live)
            .filter(|a| a.version == t.id)
            .collect();
        let failed = mine.iter().find_map(|a| match health(&a.id) {
            Health::Failed(why) => Some((a.id.clone(), why)),
            _ => None,
        });
        let wanted: u32 = t.services.values().sum();
        let healthy = t.services.iter().all(|(service, &n)| {
            mine.iter()
                .filter(|a| &a.service == service && !lost(a))
                .filter(|a| health(&a.id) == Health::Healthy)
                .count() as u32
                >= n
        });
        if let Some((id, why)) = failed {
            steps.push(Step::Fail {
                version: t.id.clone(),
                reason: format!("sandbox {id} failed to become healthy: {why}"),
            });
        } else if healthy && wanted > 0 {
            steps.push(Step::Activate {
                version: t.id.clone(),
            });
        } else if now - t.accepted_unix >= timing.rollout_timeout_secs {
            let placeable = runners.iter().any(|r| r.placeable);
            let reason = if !placeable {
                "no ready runner to schedule on (see `miren runner list`)".to_string()
            } else {
                let waiting: Vec<String> = mine
                    .iter()
                    .filter(|a| health(&a.id) != Health::Healthy)
                    .map(|a| format!("{}: {}", a.id, health_word(&health(&a.id))))
                    .collect();
                format!(
                    "new version did not become healthy within {}s: {}",
                    timing.rollout_timeout_secs,
                    waiting.join(", ")
                )
            };
            steps.push(Step::Fail {
                version: t.id.clone(),
                reason,
            });
        }
    }
    steps
}

/// The word `app status` shows for a health.
pub fn health_word(h: &Health) -> &'static str {
    match h {
        Health::Unknown => "unknown",
        Health::Starting => "starting",
        Health::Healthy => "healthy",
        Health::Failed(_) => "failed",
    }
}

/// The placeable runner with the fewest assignments (ties: by id, so the
/// choice is stable); counts the new one.
pub fn place_one(runners: &[RunnerView], load: &mut HashMap<String, usize>) -> Option<String> {
    let best = runners
        .iter()
        .filter(|r| r.placeable)
        .min_by_key(|r| (load.get(&r.id).copied().unwrap_or(0), r.id.clone()))?;
    *load.entry(best.id.clone()).or_default() += 1;
    Some(best.id.clone())
}

/// What a connected runner should be told, from its assignments and the
/// set of sandboxes it reported running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerStep {
    /// Assigned here and not running: start it (a no-op if it already is).
    Start(String),
    /// Running here and not assigned, or retired and due: stop it.
    Stop(String),
    /// Retired and no longer on the runner: delete the record.
    Forget(String),
}

/// The commands that make one runner run what it is assigned.
pub fn plan_runner(
    assigned: &[AssignmentView],
    reported: &std::collections::BTreeSet<String>,
    now: i64,
) -> Vec<RunnerStep> {
    let mut steps = Vec::new();
    for a in assigned {
        let running = reported.contains(&a.id);
        match a.retire_at {
            None if !running => steps.push(RunnerStep::Start(a.id.clone())),
            None => {}
            Some(at) if running && now >= at => steps.push(RunnerStep::Stop(a.id.clone())),
            Some(_) if !running => steps.push(RunnerStep::Forget(a.id.clone())),
            Some(_) => {}
        }
    }
    for id in reported {
        if !assigned.iter().any(|a| &a.id == id) {
            steps.push(RunnerStep::Stop(id.clone()));
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        rollout_timeout_secs: 90,
        drain_secs: 2,
    };

    fn version(id: &str, rev: u64, state: VersionState, instances: u32) -> VersionView {
        VersionView {
            id: id.into(),
            accepted_revision: rev,
            accepted_unix: 1000,
            state,
            services: BTreeMap::from([("web".to_string(), instances)]),
        }
    }

    fn assigned(id: &str, version: &str, runner: &str) -> AssignmentView {
        AssignmentView {
            id: id.into(),
            version: version.into(),
            service: "web".into(),
            runner: runner.into(),
            retire_at: None,
            replaces: None,
        }
    }

    fn runner(id: &str) -> RunnerView {
        RunnerView {
            id: id.into(),
            placeable: true,
            lost: false,
            draining: false,
        }
    }

    fn all(h: Health) -> impl Fn(&str) -> Health {
        move |_| h.clone()
    }

    fn assigns(steps: &[Step]) -> Vec<(&str, Option<&str>)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Assign {
                    runner, replaces, ..
                } => Some((runner.as_str(), replaces.as_deref())),
                _ => None,
            })
            .collect()
    }

    fn retired(steps: &[Step]) -> Vec<(&str, i64)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Retire { sandbox, at } => Some((sandbox.as_str(), *at)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_deploy_is_spread_over_ready_runners() {
        let v = [version("v1", 5, VersionState::Deploying, 3)];
        let runners = [
            runner("r1"),
            runner("r2"),
            RunnerView {
                placeable: false,
                ..runner("r3")
            },
        ];
        let load = HashMap::from([("r1".to_string(), 4)]);
        let steps = plan_app(&v, &[], &runners, &all(Health::Unknown), &load, T, 1000);
        // r2 has 0 and stays below r1's 4; r3 may not take sandboxes.
        assert_eq!(assigns(&steps), vec![("r2", None); 3]);
        assert!(!steps.iter().any(|s| matches!(s, Step::Activate { .. })));
    }

    #[test]
    fn placement_balances_and_breaks_ties_by_id() {
        let runners = [runner("b"), runner("a"), runner("c")];
        let mut load = HashMap::from([("a".to_string(), 1)]);
        let picks: Vec<String> = (0..4)
            .map(|_| place_one(&runners, &mut load).unwrap())
            .collect();
        assert_eq!(picks, ["b", "c", "a", "b"]);
        assert_eq!(
            place_one(
                &[RunnerView {
                    placeable: false,
                    ..runner("x")
                }],
                &mut load
            ),
            None
        );
    }

    #[test]
    fn the_target_activates_when_all_its_instances_are_healthy() {
        let v = [
            version("v1", 5, VersionState::Active, 2),
            version("v2", 9, VersionState::Deploying, 2),
        ];
        let a = [
            assigned("old1", "v1", "r1"),
            assigned("old2", "v1", "r2"),
            assigned("new1", "v2", "r1"),
            assigned("new2", "v2", "r2"),
        ];
        let runners = [runner("r1"), runner("r2")];
        let starting = |id: &str| {
            if id == "new2" {
                Health::Starting
            } else {
                Health::Healthy
            }
        };
        let steps = plan_app(&v, &a, &runners, &starting, &HashMap::new(), T, 1010);
        assert!(steps.is_empty(), "the old version keeps serving: {steps:?}");
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            1010,
        );
        assert_eq!(
            steps,
            vec![Step::Activate {
                version: "v2".into()
            }]
        );
        // Once active, the old version's sandboxes retire after the drain.
        let v = [
            version("v1", 5, VersionState::Superseded, 2),
            version("v2", 9, VersionState::Active, 2),
        ];
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            1020,
        );
        assert_eq!(retired(&steps), vec![("old1", 1022), ("old2", 1022)]);
    }

    #[test]
    fn a_failed_sandbox_fails_the_deploy_and_a_slow_one_times_out() {
        let v = [version("v2", 9, VersionState::Deploying, 1)];
        let a = [assigned("new1", "v2", "r1")];
        let runners = [runner("r1")];
        let failed = all(Health::Failed("crash loop".into()));
        let steps = plan_app(&v, &a, &runners, &failed, &HashMap::new(), T, 1010);
        assert!(
            matches!(&steps[..], [Step::Fail { reason, .. }] if reason.contains("new1") && reason.contains("crash loop"))
        );
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Starting),
            &HashMap::new(),
            T,
            1089,
        );
        assert!(steps.is_empty());
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Starting),
            &HashMap::new(),
            T,
            1090,
        );
        assert!(
            matches!(&steps[..], [Step::Fail { reason, .. }] if reason.contains("within 90s") && reason.contains("new1: starting"))
        );
        // With no runner at all the reason says so.
        let steps = plan_app(
            &v,
            &[],
            &[],
            &all(Health::Unknown),
            &HashMap::new(),
            T,
            1090,
        );
        assert!(
            matches!(&steps[..], [Step::Fail { reason, .. }] if reason.contains("no ready runner"))
        );
        // A failed version's sandboxes retire at once (they never served).
        let v = [version("v2", 9, VersionState::Failed, 1)];
        let steps = plan_app(&v, &a, &runners, &failed, &HashMap::new(), T, 1100);
        assert_eq!(retired(&steps), vec![("new1", 1100)]);
    }

    #[test]
    fn the_later_accepted_deploy_wins_whichever_finishes_first() {
        let v = [
            version("v2", 9, VersionState::Deploying, 1),
            version("v3", 12, VersionState::Deploying, 1),
        ];
        let a = [assigned("s2", "v2", "r1"), assigned("s3", "v3", "r1")];
        // v2's sandbox is healthy first: v2 still does not become active.
        let h = |id: &str| {
            if id == "s2" {
                Health::Healthy
            } else {
                Health::Starting
            }
        };
        let steps = plan_app(&v, &a, &[runner("r1")], &h, &HashMap::new(), T, 1001);
        assert!(steps.contains(&Step::Supersede {
            version: "v2".into()
        }));
        assert!(!steps.iter().any(|s| matches!(s, Step::Activate { .. })));
        assert_eq!(retired(&steps), vec![("s2", 1003)]);
    }

    #[test]
    fn sandboxes_on_a_lost_runner_are_placed_elsewhere_at_once() {
        let v = [version("v1", 5, VersionState::Active, 2)];
        let a = [assigned("s1", "v1", "r1"), assigned("s2", "v1", "gone")];
        let runners = [
            runner("r1"),
            runner("r2"),
            RunnerView {
                placeable: false,
                lost: true,
                ..runner("gone")
            },
        ];
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Healthy),
            &HashMap::from([("r1".into(), 1)]),
            T,
            2000,
        );
        assert_eq!(assigns(&steps), vec![("r2", Some("s2"))]);
        // Next pass: the replacement exists; the lost one retires now even
        // before the replacement is healthy (it cannot serve anyway).
        let mut a2 = a.to_vec();
        a2.push(AssignmentView {
            replaces: Some("s2".into()),
            ..assigned("s3", "v1", "r2")
        });
        let h = |id: &str| {
            if id == "s3" {
                Health::Starting
            } else {
                Health::Healthy
            }
        };
        let steps = plan_app(&v, &a2, &runners, &h, &HashMap::new(), T, 2001);
        assert_eq!(
            steps,
            vec![Step::Retire {
                sandbox: "s2".into(),
                at: 2001
            }]
        );
        // A runner removed from the records entirely counts as lost.
        let steps = plan_app(
            &v,
            &a,
            &runners[..2],
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            2000,
        );
        assert_eq!(assigns(&steps).len(), 1);
    }

    #[test]
    fn draining_keeps_capacity_until_replacements_are_healthy() {
        let v = [version("v1", 5, VersionState::Active, 1)];
        let draining = RunnerView {
            placeable: false,
            draining: true,
            ..runner("r1")
        };
        let runners = [draining, runner("r2")];
        let a = [assigned("s1", "v1", "r1")];
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            10,
        );
        assert_eq!(assigns(&steps), vec![("r2", Some("s1"))]);
        let a = [
            a[0].clone(),
            AssignmentView {
                replaces: Some("s1".into()),
                ..assigned("s2", "v1", "r2")
            },
        ];
        let h = |id: &str| {
            if id == "s2" {
                Health::Starting
            } else {
                Health::Healthy
            }
        };
        assert!(plan_app(&v, &a, &runners, &h, &HashMap::new(), T, 11).is_empty());
        let steps = plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            12,
        );
        assert_eq!(
            steps,
            vec![Step::Retire {
                sandbox: "s1".into(),
                at: 12
            }]
        );
        // Once s1 is retired, s2 counts alone: nothing more to do.
        let a = [
            AssignmentView {
                retire_at: Some(12),
                ..a[0].clone()
            },
            a[1].clone(),
        ];
        assert!(plan_app(
            &v,
            &a,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            13
        )
        .is_empty());
    }

    #[test]
    fn missing_instances_are_added_and_extras_retired() {
        let v = [version("v1", 5, VersionState::Active, 2)];
        let runners = [runner("r1")];
        let one = [assigned("s1", "v1", "r1")];
        let steps = plan_app(
            &v,
            &one,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            0,
        );
        assert_eq!(assigns(&steps), vec![("r1", None)]);
        let three = [
            assigned("s1", "v1", "r1"),
            assigned("s2", "v1", "r1"),
            assigned("s3", "v1", "r1"),
        ];
        let steps = plan_app(
            &v,
            &three,
            &runners,
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            0,
        );
        assert_eq!(retired(&steps), vec![("s3", 0)]);
        // The same inputs give the same steps (the loop may run twice).
        assert_eq!(
            steps,
            plan_app(
                &v,
                &three,
                &runners,
                &all(Health::Healthy),
                &HashMap::new(),
                T,
                0
            )
        );
    }

    #[test]
    fn an_app_with_no_versions_left_retires_everything() {
        let a = [assigned("s1", "v1", "r1")];
        let steps = plan_app(
            &[],
            &a,
            &[runner("r1")],
            &all(Health::Healthy),
            &HashMap::new(),
            T,
            50,
        );
        assert_eq!(retired(&steps), vec![("s1", 52)]);
    }

    #[test]
    fn a_runner_is_told_to_start_what_it_lacks_and_stop_what_it_should_not_run() {
        let mut a = vec![assigned("want", "v1", "r1"), assigned("has", "v1", "r1")];
        a.push(AssignmentView {
            retire_at: Some(100),
            ..assigned("old", "v0", "r1")
        });
        a.push(AssignmentView {
            retire_at: Some(100),
            ..assigned("gone", "v0", "r1")
        });
        let reported = ["has", "old", "stray"]
            .map(String::from)
            .into_iter()
            .collect();
        let steps = plan_runner(&a, &reported, 99);
        assert_eq!(
            steps,
            vec![
                RunnerStep::Start("want".into()),
                RunnerStep::Forget("gone".into()),
                RunnerStep::Stop("stray".into()),
            ]
        );
        let steps = plan_runner(&a, &reported, 100);
        assert!(steps.contains(&RunnerStep::Stop("old".into())));
    }
}
