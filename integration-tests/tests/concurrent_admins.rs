//! Two admins changing the same record through two coordinators at once
//! (issue 18): one wins, the other is told its change lost to another
//! and changed nothing; nothing is lost silently. Real processes: two
//! coordinators on one etcd, the two CLI calls started together, many
//! rounds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::etcd::EtcdCluster;
use integration_tests::{miren, probe_app, temp, CliProc, Cluster, Run};
use serde_json::Value;

const ROUNDS: usize = 20;
/// What a change that lost to another says.
const CONFLICT: &str = "changed meanwhile";

/// Runs `a` through the first coordinator and `b` through the second,
/// started together; returns both outcomes.
fn race(a_cfg: &Path, a: &[&str], b_cfg: &Path, b: &[&str]) -> (Run, Run) {
    let mut pa = CliProc::spawn(a_cfg, a, &[]);
    let mut pb = CliProc::spawn(b_cfg, b, &[]);
    let ra = pa
        .wait(Duration::from_secs(60))
        .expect("first CLI call ended");
    let rb = pb
        .wait(Duration::from_secs(60))
        .expect("second CLI call ended");
    (ra, rb)
}

/// Checks one round: at least one call succeeded, and every failure is a
/// conflict saying so.
fn one_wins(round: usize, ra: &Run, rb: &Run) {
    assert!(ra.ok || rb.ok, "round {round}: both failed: {ra:?} {rb:?}");
    for r in [ra, rb] {
        assert!(
            r.ok || r.stderr.contains(CONFLICT),
            "round {round}: a failure that is not a conflict: {r:?}"
        );
    }
}

/// A client config for the second coordinator: the first's, with its
/// address.
fn config_for(c: &Cluster, address: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(&c.cfg).expect("client config");
    assert!(text.contains(&c.listen), "{text}");
    let path = dir.join("b-client.yaml");
    std::fs::write(&path, text.replace(&c.listen, address)).expect("write client config");
    path
}

#[test]
fn two_admins_changing_one_record_through_two_coordinators_one_wins_the_other_is_told() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 1);
    let endpoints = etcd.endpoints();
    let c = Cluster::start(1, &["--etcd", &endpoints]);
    for app in ["x", "y"] {
        let run = c.deploy(app, &probe_app(c.path(), app, 1, app, 0));
        assert!(run.ok, "{run:?}");
    }
    let b = integration_tests::etcd::second_coordinator(&c, dir.path(), &["--etcd", &endpoints]);
    let b_cfg = config_for(&c, b.host_port(), dir.path());
    let through_b = miren(&b_cfg, &["cluster", "status", "-o", "json"], &[]);
    assert!(through_b.ok, "{through_b:?}");
    let mut conflicts = 0;

    // `route set HOST -a x` through one and `-a y` through the other.
    for round in 0..ROUNDS {
        let host = format!("race{round}.test");
        let (ra, rb) = race(
            &c.cfg,
            &["route", "set", &host, "-a", "x"],
            &b_cfg,
            &["route", "set", &host, "-a", "y"],
        );
        one_wins(round, &ra, &rb);
        conflicts += usize::from(!ra.ok) + usize::from(!rb.ok);
        let list = miren(&c.cfg, &["route", "list", "-o", "json"], &[]);
        assert!(list.ok, "{list:?}");
        let routes: Value = serde_json::from_str(&list.stdout).unwrap();
        let app = routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["host"] == host.as_str())
            .map(|r| r["app"].as_str().unwrap().to_string())
            .expect("the route");
        match (ra.ok, rb.ok) {
            (true, false) => assert_eq!(app, "x", "round {round}: the winner's record"),
            (false, true) => assert_eq!(app, "y", "round {round}: the winner's record"),
            // One after the other: the later one read the earlier's.
            _ => assert!(app == "x" || app == "y", "{app}"),
        }
    }

    // `auth key rotate ID` of one key through both: in every round exactly
    // one printed key works (a rotation never voids the winner's secret
    // unannounced); a loser prints no key.
    let made = miren(
        &c.cfg,
        &["auth", "key", "create", "-a", "x", "-o", "json"],
        &[],
    );
    assert!(made.ok, "{made:?}");
    let made: Value = serde_json::from_str(&made.stdout).unwrap();
    let id = made["client_id"].as_str().expect("key id").to_string();
    let rotate = [
        "auth",
        "key",
        "rotate",
        &id,
        "--overlap",
        "0s",
        "-o",
        "json",
    ];
    let works = |key: &str| {
        let run = miren(
            &c.cfg,
            &["app", "status", "-a", "x", "-o", "json"],
            &[("MIREN_API_KEY", key)],
        );
        run.ok
    };
    for round in 0..ROUNDS {
        let (ra, rb) = race(&c.cfg, &rotate, &b_cfg, &rotate);
        one_wins(round, &ra, &rb);
        conflicts += usize::from(!ra.ok) + usize::from(!rb.ok);
        let keys: Vec<String> = [&ra, &rb]
            .iter()
            .filter(|r| r.ok)
            .map(|r| {
                let v: Value = serde_json::from_str(&r.stdout).expect("rotate -o json");
                v["key"].as_str().expect("printed key").to_string()
            })
            .collect();
        let working = keys.iter().filter(|k| works(k)).count();
        assert_eq!(
            working, 1,
            "round {round}: exactly one printed key works: {ra:?} {rb:?}"
        );
    }
    println!("{conflicts} conflicts in {} concurrent pairs", 2 * ROUNDS);
    drop(b);
}
