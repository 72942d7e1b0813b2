//! The etcd backend of the store (issue 18, item 1), against a real etcd
//! cluster on loopback (Debian's `etcd`, three members unless a test needs
//! fewer):
//!
//! - the store's contract, run on the embedded store and on etcd alike
//!   (compare-and-set, revisions, paged ranges, ordered watches, leases), so
//!   that a caller cannot tell them apart;
//! - what only a shared store has: two coordinators' stores racing on one
//!   record (one wins, the other sees the conflict), a store of another
//!   cluster refused, a member lost, the whole of etcd lost and back;
//! - `miren server --etcd` on real processes: an app deployed, the
//!   coordinator SIGKILLed and started again with its records read from
//!   etcd, writes refused with a clear error while etcd is down and working
//!   again once it is back.

use std::sync::Arc;
use std::time::Duration;

use coordinator::etcd_store::{claim, EtcdOptions, EtcdStore};
use coordinator::store::{
    Condition, EventKind, Op, Outcome, RedbStore, Store, StoreError, Txn, WatchStream,
};
use futures::StreamExt;
use integration_tests::etcd::EtcdCluster;
use integration_tests::{probe_app, temp, wait_for, Cluster};

fn put(k: &str, v: &str) -> Op {
    Op::Put(k.into(), v.as_bytes().to_vec())
}

fn write(ops: Vec<Op>) -> Txn {
    Txn {
        ops,
        ..Default::default()
    }
}

fn etcd_store(etcd: &EtcdCluster, prefix: &str) -> EtcdStore {
    let mut opts = EtcdOptions::new(etcd.endpoints().split(',').map(String::from).collect());
    opts.prefix = prefix.to_string();
    opts.timeout = Duration::from_secs(3);
    EtcdStore::connect(&opts).expect("connect to etcd")
}

/// Both backends, the same calls, the same answers.
fn backends(dir: &tempfile::TempDir, etcd: &EtcdCluster) -> Vec<(&'static str, Arc<dyn Store>)> {
    vec![
        (
            "redb",
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("redb")),
        ),
        ("etcd", Arc::new(etcd_store(etcd, "/contract/"))),
    ]
}

async fn next_batch(w: &mut WatchStream) -> coordinator::store::WatchBatch {
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(b))) => b,
        other => panic!("expected a watch batch, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_backends_keep_the_same_contract() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    for (name, store) in backends(&dir, &etcd) {
        let store = &*store;
        // Compare-and-set on revisions, all or nothing.
        let r0 = store.revision().unwrap();
        let c1 = store.txn(write(vec![put("k", "1")])).unwrap();
        assert_eq!(c1.outcome, Outcome::Applied, "{name}");
        assert!(c1.revision > r0, "{name}: a write moves the revision");
        let c2 = store
            .txn(write(vec![put("k", "2"), put("other", "x")]))
            .unwrap();
        assert_eq!(c2.revision, c1.revision + 1, "{name}: one revision per txn");
        let kv = store.get_kv("k").unwrap().unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (c1.revision, c2.revision, 2),
            "{name}"
        );
        let stale = Txn {
            conditions: vec![Condition::ModRevision("k".into(), c1.revision)],
            ops: vec![put("k", "stale"), put("side", "effect")],
        };
        assert_eq!(store.commit(stale).unwrap(), Outcome::ConditionFailed);
        assert_eq!(store.get("k").unwrap().unwrap(), b"2", "{name}");
        assert!(
            store.get("side").unwrap().is_none(),
            "{name}: nothing of a failed txn"
        );
        let create = Txn {
            conditions: vec![Condition::ModRevision("new".into(), 0)],
            ops: vec![put("new", "n")],
        };
        assert_eq!(store.commit(create.clone()).unwrap(), Outcome::Applied);
        assert_eq!(store.commit(create).unwrap(), Outcome::ConditionFailed);
        let absent = Txn {
            conditions: vec![Condition::Absent("k".into())],
            ops: vec![put("k", "no")],
        };
        assert_eq!(store.commit(absent).unwrap(), Outcome::ConditionFailed);
        let swap = Txn {
            conditions: vec![Condition::Equals("k".into(), b"2".to_vec())],
            ops: vec![Op::Delete("k".into())],
        };
        assert_eq!(store.commit(swap).unwrap(), Outcome::Applied, "{name}");
        assert!(store.get_kv("k").unwrap().is_none(), "{name}");
        // One key written twice in one txn ends as the last op says.
        store
            .commit(write(vec![put("twice", "a"), put("twice", "b")]))
            .unwrap();
        assert_eq!(store.get("twice").unwrap().unwrap(), b"b", "{name}");

        // Paged ranges, only under the prefix, in key order.
        let ops = (0..25).map(|i| put(&format!("p/{i:02}"), "v")).collect();
        store.commit(write(ops)).unwrap();
        store
            .commit(write(vec![put("q/0", "v"), put("o/0", "v")]))
            .unwrap();
        let first = store.range("p/", None, 10).unwrap();
        assert_eq!(first.kvs.len(), 10, "{name}");
        assert!(first.more, "{name}");
        assert_eq!(first.kvs[0].key, "p/00", "{name}");
        let second = store.range("p/", Some("p/09"), 10).unwrap();
        assert_eq!(second.kvs[0].key, "p/10", "{name}");
        let last = store.range("p/", Some("p/19"), 10).unwrap();
        assert_eq!((last.kvs.len(), last.more), (5, false), "{name}");
        assert_eq!(store.scan("p/").unwrap().len(), 25, "{name}");
        assert_eq!(store.count("q/").unwrap(), 1, "{name}");
        assert_eq!(
            store.range("p/", Some("a"), 0).unwrap().kvs.len(),
            1,
            "{name}"
        );

        // Watches: history from a revision, then live changes, in order,
        // only under the prefix, deletes included.
        let w0 = store.txn(write(vec![put("w/a", "1")])).unwrap().revision;
        let mut watch = store.watch("w/", w0).unwrap();
        let mut live = store.watch("w/", 0).unwrap();
        let w1 = store
            .txn(write(vec![put("x/other", "no"), put("w/b", "2")]))
            .unwrap()
            .revision;
        let w2 = store
            .txn(write(vec![Op::Delete("w/a".into())]))
            .unwrap()
            .revision;
        let b = next_batch(&mut watch).await;
        assert_eq!(
            (b.revision, b.events[0].kv.key.as_str()),
            (w0, "w/a"),
            "{name}"
        );
        let b = next_batch(&mut watch).await;
        assert_eq!(b.revision, w1, "{name}");
        assert_eq!(b.events.len(), 1, "{name}: only the watched prefix");
        assert_eq!(b.events[0].kv.value, b"2", "{name}");
        let b = next_batch(&mut watch).await;
        assert_eq!(b.revision, w2, "{name}");
        assert_eq!(b.events[0].kind, EventKind::Delete, "{name}");
        assert_eq!(b.events[0].kv.mod_revision, w2, "{name}");
        assert!(b.events[0].kv.value.is_empty(), "{name}");
        let b = next_batch(&mut live).await;
        assert_eq!(
            b.revision, w1,
            "{name}: a watch from 0 starts after the call"
        );

        // Leases: keys vanish with theirs; a put on a gone lease writes
        // nothing and says which lease.
        let lease = store.grant_lease(Duration::from_secs(30)).unwrap();
        store
            .commit(write(vec![
                Op::PutLeased("live/r1".into(), b"a".to_vec(), lease),
                put("keep", "k"),
            ]))
            .unwrap();
        assert_eq!(
            store.get_kv("live/r1").unwrap().unwrap().lease,
            Some(lease),
            "{name}"
        );
        store.keep_alive(lease).unwrap();
        let mut gone = store.watch("live/", 0).unwrap();
        store.revoke_lease(lease).unwrap();
        store.revoke_lease(lease).unwrap();
        assert!(store.get("live/r1").unwrap().is_none(), "{name}");
        assert_eq!(store.get("keep").unwrap().unwrap(), b"k", "{name}");
        let b = next_batch(&mut gone).await;
        assert_eq!(b.events[0].kind, EventKind::Delete, "{name}");
        let err = store
            .commit(write(vec![
                put("live/x", "x"),
                Op::PutLeased("live/y".into(), vec![], lease),
            ]))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::LeaseNotFound(l) if l == lease),
            "{name}: {err}"
        );
        assert!(store.get("live/x").unwrap().is_none(), "{name}");
        assert!(
            matches!(store.keep_alive(lease), Err(StoreError::LeaseNotFound(_))),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_compacted_history_is_told_to_relist() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 1);
    let store = etcd_store(&etcd, "/compact/");
    let first = store.txn(write(vec![put("c/k", "0")])).unwrap().revision;
    let mut head = first;
    for i in 1..20 {
        head = store
            .txn(write(vec![put("c/k", &i.to_string())]))
            .unwrap()
            .revision;
    }
    let compact = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(0),
            "compact",
            &head.to_string(),
        ])
        .output()
        .expect("etcdctl (Debian package etcd-client; scripts/test.sh installs it)");
    assert!(compact.status.success(), "{compact:?}");
    match store.watch("c/", first) {
        Err(StoreError::Compacted {
            requested,
            first_kept,
        }) => {
            assert_eq!(requested, first);
            assert!(first_kept > first);
        }
        Ok(_) => panic!("a watch from compacted history must be refused"),
        Err(e) => panic!("expected Compacted, got {e}"),
    }
    // From the kept history on, it works.
    let mut w = store.watch("c/", head).unwrap();
    assert_eq!(next_batch(&mut w).await.revision, head);
}

#[test]
fn two_coordinators_racing_on_one_record_one_wins_and_nothing_is_lost() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let a = etcd_store(&etcd, "/race/");
    let b = etcd_store(&etcd, "/race/");
    a.commit(write(vec![put("app/x", "v0")])).unwrap();
    for round in 0..20 {
        // Both read the same revision, both try to write on it.
        let seen_a = a.get_kv("app/x").unwrap().unwrap().mod_revision;
        let seen_b = b.get_kv("app/x").unwrap().unwrap().mod_revision;
        assert_eq!(seen_a, seen_b);
        let (ta, tb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                a.commit(Txn {
                    conditions: vec![Condition::ModRevision("app/x".into(), seen_a)],
                    ops: vec![put("app/x", &format!("a{round}"))],
                })
            });
            let tb = s.spawn(|| {
                b.commit(Txn {
                    conditions: vec![Condition::ModRevision("app/x".into(), seen_b)],
                    ops: vec![put("app/x", &format!("b{round}"))],
                })
            });
            (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap())
        });
        let applied = [ta, tb].iter().filter(|o| **o == Outcome::Applied).count();
        assert_eq!(applied, 1, "round {round}: exactly one writer wins");
        let winner = if ta == Outcome::Applied { "a" } else { "b" };
        // Both coordinators read the winner's value.
        for s in [&a, &b] {
            assert_eq!(
                s.get("app/x").unwrap().unwrap(),
                format!("{winner}{round}").into_bytes()
            );
        }
    }
}

#[test]
fn a_store_of_another_cluster_is_refused() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 1);
    let store = etcd_store(&etcd, "/owned/");
    claim(&store, "aaaa").unwrap();
    claim(&store, "aaaa").unwrap();
    let err = claim(&store, "bbbb").unwrap_err();
    assert!(matches!(err, StoreError::OtherCluster { .. }), "{err}");
    assert!(err.to_string().contains("--etcd-prefix"), "{err}");
    // Another prefix is another store.
    claim(&etcd_store(&etcd, "/other/"), "bbbb").unwrap();
}

#[test]
fn losing_a_member_changes_nothing_and_losing_all_fails_clearly_until_they_are_back() {
    let dir = temp();
    let mut etcd = EtcdCluster::start(dir.path(), 3);
    let store = etcd_store(&etcd, "/faults/");
    store.commit(write(vec![put("a", "1")])).unwrap();
    etcd.kill(0);
    // Two of three: a quorum; the client moves to a live member.
    assert!(
        wait_for(Duration::from_secs(20), || store
            .commit(write(vec![put("a", "2")]))
            .is_ok()),
        "writes with two of three members"
    );
    assert_eq!(store.get("a").unwrap().unwrap(), b"2");
    etcd.kill(1);
    etcd.kill(2);
    let started = std::time::Instant::now();
    let err = store.commit(write(vec![put("a", "3")])).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Etcd { .. } | StoreError::EtcdTimeout { .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("--etcd"),
        "the error says what to check: {err}"
    );
    // Bounded: the call gave up instead of hanging (the bound is 3 s here;
    // this only checks that it returned at all within a minute).
    assert!(started.elapsed() < Duration::from_secs(60));
    for i in 0..3 {
        etcd.restart(i);
    }
    for i in 0..3 {
        etcd.wait_member(i);
    }
    assert!(
        wait_for(Duration::from_secs(30), || store
            .commit(write(vec![put("a", "4")]))
            .is_ok()),
        "writes work again once etcd is back"
    );
    assert_eq!(store.get("a").unwrap().unwrap(), b"4");
}

#[test]
fn miren_server_on_etcd_keeps_its_records_there_across_a_sigkill() {
    let dir = temp();
    let mut etcd = EtcdCluster::start(dir.path(), 3);
    let endpoints = etcd.endpoints();
    let mut c = Cluster::start(1, &["--etcd", &endpoints]);
    assert!(
        !c.coord_data.join("store.redb").exists(),
        "with --etcd there is no embedded store"
    );
    let app = format!("etcd-{}", std::process::id());
    let src = probe_app(c.path(), &app, 1, "a", 0);
    let deploy = c.deploy(&app, &src);
    assert!(deploy.ok, "{deploy:?}{}", c.describe(&app));
    let host = format!("{app}.test");
    assert!(c.miren(&["route", "set", &host, "-a", &app]).ok);
    let serves = |c: &Cluster| matches!(c.ingress_get(&host, "/headers"), Ok((200, _)));
    assert!(
        wait_for(Duration::from_secs(60), || serves(&c)),
        "the app never served{}",
        c.describe(&app)
    );

    // The records are in etcd: a coordinator killed and started again finds
    // the app, its route and its runner there.
    c.restart_coordinator_sigkill();
    assert!(
        wait_for(Duration::from_secs(60), || serves(&c)),
        "the app did not serve again after the restart{}",
        c.describe(&app)
    );
    let apps = c.miren(&["app", "list", "-o", "json"]);
    assert!(apps.ok && apps.stdout.contains(&app), "{apps:?}");

    // One member lost: writes still work.
    etcd.kill(1);
    assert!(
        wait_for(Duration::from_secs(30), || c
            .miren(&["route", "set", "second.test", "-a", &app])
            .ok),
        "a write with two of three etcd members"
    );

    // All lost: a write fails with a message that names etcd, and changes
    // nothing; the app is still served.
    etcd.kill(0);
    etcd.kill(2);
    let refused = c.miren(&["route", "set", "third.test", "-a", &app]);
    assert!(!refused.ok, "a write without etcd must fail: {refused:?}");
    assert!(
        refused.stderr.contains("etcd"),
        "the error names etcd: {refused:?}"
    );
    // Serving needs no write: the ingress routes from memory.
    assert!(serves(&c), "the ingress serves while etcd is down");
    for i in 0..3 {
        etcd.restart(i);
    }
    for i in 0..3 {
        etcd.wait_member(i);
    }
    assert!(
        wait_for(Duration::from_secs(30), || c
            .miren(&["route", "set", "third.test", "-a", &app])
            .ok),
        "writes work again once etcd is back{}",
        c.logs()
    );
    let routes = c.miren(&["route", "list", "-o", "json"]);
    assert!(
        routes.ok && routes.stdout.contains("second.test") && routes.stdout.contains("third.test"),
        "{routes:?}"
    );
}

#[test]
fn miren_server_reaches_an_etcd_that_wants_tls_and_a_client_certificate() {
    let dir = temp();
    let (etcd, tls) = EtcdCluster::start_tls(dir.path(), 1);
    let endpoints = etcd.endpoints();
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    // Without our client certificate etcd refuses us: the server says so
    // and does not start.
    let data = dir.path().join("refused");
    let cfg = dir.path().join("refused.yaml");
    let refused = integration_tests::Server::try_start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--etcd", &endpoints, "--etcd-ca", &ca],
    );
    let err = match refused {
        Ok(_) => panic!("a coordinator without the client certificate must not start"),
        Err(e) => e,
    };
    assert!(err.contains("etcd"), "the failure names etcd: {err}");

    let c = Cluster::start(
        0,
        &[
            "--etcd",
            &endpoints,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    );
    let token = c.miren(&["runner", "token", "create"]);
    assert!(token.ok, "a write through etcd over TLS: {token:?}");
    let listed = c.miren(&["runner", "token", "list", "-o", "json"]);
    assert!(listed.ok && listed.stdout.contains("\"id\""), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_leads_and_another_takes_over_when_it_dies() {
    use coordinator::leader::{Elector, LEADER_KEY};
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let ttl = Duration::from_secs(2);
    let stores: Vec<Arc<dyn Store>> = (0..2)
        .map(|_| Arc::new(etcd_store(&etcd, "/lead/")) as Arc<dyn Store>)
        .collect();
    let tasks: Vec<coordinator::shutdown::Tasks> = (0..2)
        .map(|_| coordinator::shutdown::Tasks::new(tokio::runtime::Handle::current()))
        .collect();
    let mut leaders = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        let (elector, leadership, lease) =
            Elector::new(store.clone(), format!("c{i}"), format!("c{i}"), ttl);
        tasks[i].spawn("leader election", elector.run(lease, tasks[i].clone()));
        leaders.push(leadership);
    }
    assert!(leaders[0].is_leader(), "the first to stand leads");
    assert!(!leaders[1].is_leader(), "only one leads");
    // The leader's process dies: nothing renews its lease. The other one
    // leads within the lease time (and a little for the election).
    tasks[0].stop();
    tokio::time::timeout(ttl * 5, leaders[1].leading())
        .await
        .expect("the second coordinator took over");
    let holder = stores[1].get(LEADER_KEY).unwrap().unwrap();
    assert!(String::from_utf8_lossy(&holder).contains("\"c1\""));
    tasks[1].stop();
}

#[test]
fn two_coordinators_on_one_etcd_list_each_other_and_the_survivor_leads() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 1);
    let endpoints = etcd.endpoints();
    let mut c = Cluster::start(0, &["--etcd", &endpoints]);
    let b = integration_tests::etcd::second_coordinator(&c, dir.path(), &["--etcd", &endpoints]);
    let b_addr = b.host_port().to_string();

    let status = |c: &Cluster, env: &[(&str, &str)]| -> serde_json::Value {
        let run = integration_tests::miren_within(
            &c.cfg,
            &["cluster", "status", "-o", "json"],
            env,
            Duration::from_secs(60),
        );
        assert!(run.ok, "{run:?}");
        serde_json::from_str(&run.stdout).expect("status -o json")
    };
    let both = wait_for(Duration::from_secs(20), || {
        status(&c, &[])["coordinators"]
            .as_array()
            .is_some_and(|l| l.len() == 2)
    });
    assert!(both, "both coordinators listed: {}", status(&c, &[]));
    let st = status(&c, &[]);
    let leaders: Vec<&serde_json::Value> = st["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["leader"] == true)
        .collect();
    assert_eq!(leaders.len(), 1, "one leader: {st}");
    assert_eq!(
        leaders[0]["address"],
        c.listen.as_str(),
        "the first one leads: {st}"
    );

    // export-address names both under the one pin.
    let exported = c.miren(&["cluster", "export-address"]);
    assert!(exported.ok, "{exported:?}");
    let exported = exported.stdout.trim().to_string();
    assert!(
        exported.starts_with(&c.listen) && exported.contains(&format!(",{b_addr};sha1:")),
        "{exported}"
    );

    // CI bindings changed through the first one: one added, one added and
    // removed (a revocation). The second coordinator must see both.
    let add = |repo: &str| -> String {
        let run = c.miren(&["auth", "ci", "add", "-a", "web", "--github", repo]);
        assert!(run.ok, "{run:?}");
        run.stdout
            .trim()
            .strip_prefix("Added CI authentication binding ")
            .and_then(|r| r.split_whitespace().next())
            .expect("binding id")
            .to_string()
    };
    let kept = add("acme/kept");
    let revoked = add("acme/revoked");
    assert!(c.miren(&["auth", "ci", "remove", &revoked]).ok);

    // The leader dies: the CLI reaches the survivor through the exported
    // address, which leads once the old lease has run out and lists itself
    // alone once the dead one's presence has.
    c.kill_coordinator();
    let env = [("MIREN_CLUSTER", exported.as_str())];
    let bindings = integration_tests::miren_within(
        &c.cfg,
        &["auth", "ci", "list", "-a", "web", "-o", "json"],
        &env,
        Duration::from_secs(60),
    );
    assert!(bindings.ok, "{bindings:?}");
    assert!(
        bindings.stdout.contains(&kept) && !bindings.stdout.contains(&revoked),
        "the survivor's bindings follow the store (kept {kept}, removed {revoked}): {}",
        bindings.stdout
    );
    let survivor_leads = wait_for(Duration::from_secs(40), || {
        let st = status(&c, &env);
        st["coordinators"].as_array().is_some_and(|l| {
            l.len() == 1 && l[0]["address"] == b_addr.as_str() && l[0]["leader"] == true
        })
    });
    assert!(survivor_leads, "{}", status(&c, &env));
    drop(b);
}

#[test]
fn a_runner_fails_over_to_the_surviving_coordinator_and_its_app_keeps_serving() {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 1);
    let endpoints = etcd.endpoints();
    let mut c = Cluster::start(0, &["--etcd", &endpoints]);
    // The second coordinator, with an ingress of its own.
    let b_ingress = format!("127.0.0.1:{}", integration_tests::free_port());
    let b = integration_tests::etcd::second_coordinator(
        &c,
        dir.path(),
        &["--etcd", &endpoints, "--http-listen", &b_ingress],
    );
    let b_addr = b.host_port().to_string();
    assert!(
        wait_for(Duration::from_secs(20), || {
            let e = c.miren(&["cluster", "export-address"]);
            e.ok && e.stdout.contains(&b_addr)
        }),
        "the first coordinator lists the second"
    );

    // A runner joins with a code that names both coordinators.
    let code = c.miren(&["runner", "token", "create"]);
    assert!(code.ok, "{code:?}");
    let runner_dir = dir.path().join("r0");
    let runner = integration_tests::RunnerProc::start(
        &runner_dir,
        Some(code.stdout.trim()),
        &["--isolation", "none"],
    );
    assert!(
        wait_for(Duration::from_secs(60), || runner.runner_id().is_some()),
        "{}",
        runner.output()
    );
    let app = format!("ha-{}", std::process::id());
    let src = probe_app(c.path(), &app, 1, "a", 0);
    assert!(
        wait_for(Duration::from_secs(60), || c.deploy(&app, &src).ok),
        "deploy{}",
        c.describe(&app)
    );
    let host = format!("{app}.test");
    assert!(c.miren(&["route", "set", &host, "-a", &app]).ok);
    assert!(
        wait_for(Duration::from_secs(60), || matches!(
            c.ingress_get(&host, "/headers"),
            Ok((200, _))
        )),
        "the app serves through the first coordinator{}",
        c.describe(&app)
    );

    // The coordinator the runner is attached to dies. The runner attaches
    // to the survivor, which serves the app through its own ingress and
    // mints for its sandbox.
    c.kill_coordinator();
    let through_b = || integration_tests::http_get_host(&b_ingress, &host, "/probe");
    let served = wait_for(Duration::from_secs(90), || {
        matches!(through_b(), Ok((200, body)) if {
            let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            report["two_audiences"]["status"] == 200 && report["default"]["status"] == 200
        })
    });
    assert!(
        served,
        "the survivor never served the app with its tokens: {:?}\nrunner: {}",
        through_b(),
        integration_tests::tail(&runner.output(), 30)
    );
    drop(b);
}
