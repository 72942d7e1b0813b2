//! Artifacts through any coordinator (issue 18, item 5), on real processes:
//! two coordinators on one etcd; an upload lands on the first, which is
//! then SIGKILLed; a runner attached to the second starts the app, whose
//! artifact the second rebuilds from the chunks in etcd. A chunk altered in
//! etcd is refused (the digest does not match), never served.

use std::path::Path;
use std::time::Duration;

use coordinator::etcd_store::{EtcdOptions, EtcdStore};
use coordinator::store::{Op, Store, Txn};
use integration_tests::etcd::EtcdCluster;
use integration_tests::{miren_within, probe_app, temp, wait_for, Cluster, RunnerProc};

/// What the second coordinator logged (`Server` keeps its error output
/// beside its client config).
fn b_log_in(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(format!("b.stderr-{}", std::process::id())))
        .unwrap_or_default()
}

/// The digests of the manifests in etcd.
fn manifests(store: &EtcdStore) -> Vec<String> {
    store
        .scan("artifact/")
        .expect("scan manifests")
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix("artifact/").map(str::to_string))
        .collect()
}

/// Deploys `src` through the first coordinator (left running: there is no
/// runner it could wait for), waits until its artifact is complete in etcd
/// and its version recorded, then SIGKILLs the first coordinator. Returns
/// the artifact's digest.
fn upload_through_a_then_kill_it(
    c: &mut Cluster,
    store: &EtcdStore,
    app: &str,
    src: &Path,
    any: &dyn Fn(&[&str]) -> integration_tests::Run,
    b_log: &dyn Fn() -> String,
) -> String {
    let before = manifests(store);
    let mut deploy = c.spawn_deploy(app, src);
    let mut sha = None;
    let recorded = wait_for(Duration::from_secs(60), || {
        sha = manifests(store).into_iter().find(|s| !before.contains(s));
        sha.as_ref().is_some_and(|sha| {
            // Not too often: each CLI call is a connection the coordinator
            // counts against this address for a while.
            std::thread::sleep(Duration::from_secs(1));
            let status = any(&["app", "status", "-a", app, "-o", "json"]);
            status.ok && status.stdout.contains(&sha[..12])
        })
    });
    assert!(
        recorded,
        "the upload never reached etcd with its version: {}\nmanifests: {:?}\nstatus: {:?}\nB: {}",
        deploy.stderr(),
        manifests(store),
        any(&["app", "status", "-a", app, "-o", "json"]),
        integration_tests::tail(&b_log(), 20)
    );
    deploy.kill();
    c.kill_coordinator();
    sha.expect("a new manifest")
}

#[test]
fn a_runner_gets_an_artifact_uploaded_to_a_dead_coordinator_through_another_and_never_a_tampered_one(
) {
    let dir = temp();
    let etcd = EtcdCluster::start(dir.path(), 1);
    let endpoints = etcd.endpoints();
    let mut c = Cluster::start(0, &["--etcd", &endpoints]);
    let b_ingress = format!("127.0.0.1:{}", integration_tests::free_port());
    let b = integration_tests::etcd::second_coordinator(
        &c,
        dir.path(),
        &["--etcd", &endpoints, "--http-listen", &b_ingress],
    );
    let b_files = b.data_dir.join("artifacts");
    // Both coordinators under the cluster's pin: the CLI goes to the
    // second when the first is dead.
    let both = wait_for(Duration::from_secs(20), || {
        let e = c.miren(&["cluster", "export-address"]);
        e.ok && e.stdout.contains(b.host_port())
    });
    assert!(both, "the first coordinator never listed the second");
    let exported = c
        .miren(&["cluster", "export-address"])
        .stdout
        .trim()
        .to_string();
    let cfg = c.cfg.clone();
    let through_any = move |args: &[&str]| {
        miren_within(
            &cfg,
            args,
            &[("MIREN_CLUSTER", &exported)],
            Duration::from_secs(60),
        )
    };
    let mut opts = EtcdOptions::new(endpoints.split(',').map(String::from).collect());
    opts.timeout = Duration::from_secs(3);
    let store = EtcdStore::connect(&opts).expect("connect to etcd");

    // A first version, uploaded to the first coordinator, which dies; one
    // chunk of it is then altered in etcd.
    let app = "shared-art";
    let first = upload_through_a_then_kill_it(
        &mut c,
        &store,
        app,
        &probe_app(dir.path(), app, 1, "one", 0),
        &through_any,
        &|| b_log_in(dir.path()),
    );
    let chunk = format!("artifactchunk/{first}/00000000");
    let mut bytes = store.get(&chunk).unwrap().expect("the first chunk");
    bytes[10] ^= 0x01;
    store
        .commit(Txn {
            conditions: vec![],
            ops: vec![Op::Put(chunk, bytes)],
        })
        .unwrap();

    // A runner attached to the second coordinator only.
    let code = through_any(&["runner", "token", "create"]);
    assert!(code.ok, "{code:?}");
    let runner = RunnerProc::start(
        &dir.path().join("r0"),
        Some(code.stdout.trim()),
        &["--isolation", "none"],
    );
    // The altered artifact is refused: the rollout fails saying so, and
    // the second coordinator keeps no file of it.
    let refused = wait_for(Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_secs(2));
        let s = through_any(&["app", "status", "-a", app, "-o", "json"]);
        s.ok && s.stdout.contains("damaged")
    });
    assert!(
        refused,
        "{:?}\nrunner: {}",
        through_any(&["app", "status", "-a", app, "-o", "json"]),
        integration_tests::tail(&runner.output(), 30)
    );
    assert!(
        !b_files.join(&first).exists(),
        "a damaged artifact was kept"
    );

    // A second version, uploaded to the first coordinator (started again,
    // and killed again once the upload is in): the runner starts it through
    // the second, which rebuilds the file from etcd.
    c.start_coordinator();
    let second = upload_through_a_then_kill_it(
        &mut c,
        &store,
        app,
        &probe_app(dir.path(), app, 1, "two", 0),
        &through_any,
        &|| b_log_in(dir.path()),
    );
    let host = "shared-art.test";
    let route = through_any(&["route", "set", host, "-a", app]);
    assert!(route.ok, "{route:?}");
    let served = wait_for(Duration::from_secs(120), || {
        matches!(
            integration_tests::http_get_host(&b_ingress, host, "/headers"),
            Ok((200, _))
        )
    });
    assert!(
        served,
        "the app never served through the second coordinator: {:?}\nrunner: {}",
        through_any(&["app", "status", "-a", app, "-o", "json"]),
        integration_tests::tail(&runner.output(), 30)
    );
    let rebuilt = std::fs::read(b_files.join(&second)).expect("the rebuilt file on B");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &rebuilt);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, second, "the rebuilt file is the artifact");
    let leftovers = std::fs::read_dir(&b_files)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
        .count();
    assert_eq!(
        leftovers,
        0,
        "temporary files left in {}",
        b_files.display()
    );
    drop(b);
}
