//! Issue 18's benchmark: a deploy's store latency on etcd next to redb.
//!
//! `cargo bench -p integration-tests --bench store_latency` (needs Debian's
//! `etcd`, as the etcd tests do):
//!
//! 1. for each backend — the embedded redb store in a temporary data dir,
//!    and a three-member etcd on loopback (`integration_tests::etcd`) —
//!    opens the coordinator's `Apps` on it (on etcd with artifacts shared
//!    through the store, as `miren server --etcd` does);
//! 2. times the store side of a deploy, N times (`STORE_BENCH_DEPLOYS`,
//!    20): `Apps::upload` (which first collects unused artifacts), writing
//!    and finishing a small artifact (`STORE_BENCH_ARTIFACT_KIB`, 64; on
//!    etcd this writes its chunks and manifest), and `Apps::deploy`
//!    (checking the artifact, then recording the version by
//!    compare-and-set). No runner: the rollout is the reconcile loop's,
//!    not the deploy call's;
//! 3. times a raw `Store::commit` of one 100-byte put, M times
//!    (`STORE_BENCH_COMMITS`, 200);
//! 4. prints p50 and p99 of each next to each other, with etcd/redb.
//!
//! Timings are printed, never asserted. Under `cargo test --benches` (no
//! `--bench` argument) a quick pass with a few iterations shows the bench
//! still works.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::apps::{Apps, Service};
use coordinator::etcd_store::{EtcdOptions, EtcdStore};
use coordinator::shutdown::Tasks;
use coordinator::store::{Op, RedbStore, Store, Txn};
use integration_tests::etcd::EtcdCluster;

/// Nearest-rank percentile of `samples` (sorted here), in milliseconds.
fn pct_ms(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    if samples.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Measurements of one backend.
struct Measured {
    deploys: Vec<Duration>,
    commits: Vec<Duration>,
}

fn services() -> Vec<Service> {
    vec![Service {
        name: "web".into(),
        command: "python3 server.py".into(),
        port: 8080,
        instances: 1,
        env: vec![],
        limits: Default::default(),
    }]
}

/// A small artifact that differs per `n`, and its digest.
fn artifact(n: usize, kib: usize) -> (Vec<u8>, String) {
    let mut data: Vec<u8> = (0..kib * 1024).map(|i| (i * 31 % 251) as u8).collect();
    data[..8].copy_from_slice(&(n as u64).to_be_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
    let hex = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    (data, hex)
}

fn measure(
    store: Arc<dyn Store>,
    data_dir: &Path,
    shared: bool,
    deploys: usize,
    commits: usize,
    kib: usize,
) -> anyhow::Result<Measured> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let tasks = Tasks::new(rt.handle().clone());
    let apps = Apps::new(store.clone(), data_dir, tasks.clone())?;
    if shared {
        apps.share_artifacts(store.clone());
    }
    let mut m = Measured {
        deploys: Vec::with_capacity(deploys),
        commits: Vec::with_capacity(commits),
    };
    for n in 0..deploys {
        let (data, sha) = artifact(n, kib);
        let now = transport::clock::now_unix();
        let t = Instant::now();
        let mut upload = apps.upload("bench")?;
        upload.write(&data, Instant::now())?;
        upload.finish(&sha)?;
        apps.deploy("bench", &sha, services(), now)?;
        m.deploys.push(t.elapsed());
    }
    let value = vec![b'x'; 100];
    for n in 0..commits {
        let t = Instant::now();
        store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::Put(format!("bench/{}", n % 64), value.clone())],
        })?;
        m.commits.push(t.elapsed());
    }
    tasks.stop();
    Ok(m)
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (deploys, commits) = if full {
        (
            env_usize("STORE_BENCH_DEPLOYS", 20),
            env_usize("STORE_BENCH_COMMITS", 200),
        )
    } else {
        (3, 10)
    };
    let kib = env_usize("STORE_BENCH_ARTIFACT_KIB", 64);
    let dir = tempfile::tempdir()?;

    let redb_dir = dir.path().join("redb");
    std::fs::create_dir_all(&redb_dir)?;
    let redb: Arc<dyn Store> = Arc::new(RedbStore::open(&redb_dir.join("store.redb"))?);
    let mut on_redb = measure(redb, &redb_dir, false, deploys, commits, kib)?;

    let etcd = EtcdCluster::start(dir.path(), 3);
    let etcd_dir = dir.path().join("etcd-coord");
    std::fs::create_dir_all(&etcd_dir)?;
    let mut opts = EtcdOptions::new(etcd.endpoints().split(',').map(String::from).collect());
    opts.timeout = Duration::from_secs(5);
    let etcd_store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&opts)?);
    let mut on_etcd = measure(etcd_store, &etcd_dir, true, deploys, commits, kib)?;

    println!(
        "store latency: {deploys} deploys of a {kib} KiB artifact, {commits} raw commits (ms)"
    );
    println!(
        "{:<26} {:>10} {:>18} {:>10}",
        "", "redb", "etcd (3 members)", "etcd/redb"
    );
    let rows = [
        ("deploy p50", 50.0, true),
        ("deploy p99", 99.0, true),
        ("commit p50", 50.0, false),
        ("commit p99", 99.0, false),
    ];
    for (name, p, deploy) in rows {
        let (r, e) = if deploy {
            (
                pct_ms(&mut on_redb.deploys, p),
                pct_ms(&mut on_etcd.deploys, p),
            )
        } else {
            (
                pct_ms(&mut on_redb.commits, p),
                pct_ms(&mut on_etcd.commits, p),
            )
        };
        println!("{name:<26} {r:>10.2} {e:>18.2} {:>10.1}", e / r);
    }
    Ok(())
}
