//! Uploads and artifacts are bounded, on real processes: the coordinator
//! keeps the active version and three before it (and their artifacts), the
//! runner keeps only what its sandboxes use and the two most recent others,
//! `app delete` leaves none of the app's artifacts behind, and an app gets
//! two uploads at a time; an abandoned one frees its slot and its file.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use integration_tests::{miren, temp, wait_for, RunnerProc, Server};
use schema::miren_capnp::{app, artifact_upload, cluster};
use serde_json::Value;
use transport::tls::ClientIdentity;

use integration_tests::{app_status as status, repo_root as repo};

/// The names of the files in `dir` that look like `<sha256><suffix>`.
fn digests(dir: &Path, suffix: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let sha = name.strip_suffix(suffix)?;
                    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
                        .then(|| sha.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Files in `dir` whose names start with `prefix`.
fn temp_files(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// The example app with one instance and a build number, so every build
/// packs to another artifact.
fn app_dir(build: u32) -> tempfile::TempDir {
    let dir = temp();
    std::fs::create_dir(dir.path().join(".miren")).unwrap();
    std::fs::copy(
        repo().join("deploy/example-app/server.py"),
        dir.path().join("server.py"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".miren/app.toml"),
        "name = \"hello\"\n[services.web]\ncommand = \"python3 server.py\"\ninstances = 1\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("build.txt"), build.to_string()).unwrap();
    dir
}

fn deploy(cfg: &Path, dir: &Path, app: &str) {
    let run = miren(
        cfg,
        &["deploy", "--dir", dir.to_str().unwrap(), "-a", app],
        &[],
    );
    assert!(run.ok, "{run:?}");
}

/// The artifacts the versions in `app status` name.
fn version_artifacts(status: &Value) -> BTreeSet<String> {
    status["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["artifact"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn old_versions_and_their_artifacts_are_collected_and_app_delete_leaves_none() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("coord");
    let _server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let code = miren(&cfg, &["runner", "token", "create"], &[]);
    assert!(code.ok, "{code:?}");
    let runner = RunnerProc::start(
        &dir.path().join("r1"),
        Some(code.stdout.trim()),
        &["--isolation", "none"],
    );
    assert!(
        wait_for(Duration::from_secs(30), || {
            integration_tests::runners(&cfg)
                .iter()
                .any(|r| r["status"] == "ready")
        }),
        "runner never became ready: {}",
        runner.output()
    );
    let stored = data.join("artifacts");
    let cached = dir.path().join("r1/artifacts");

    let mut deployed = Vec::new();
    for build in 1..=5 {
        let app = app_dir(build);
        deploy(&cfg, app.path(), "hello");
        let st = status(&cfg, "hello");
        assert_eq!(st["active_version"], format!("v{build}"), "{st}");
        let active = st["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == st["active_version"])
            .unwrap()["artifact"]
            .as_str()
            .unwrap()
            .to_string();
        deployed.push(active);
    }
    assert_eq!(
        deployed.iter().collect::<BTreeSet<_>>().len(),
        5,
        "every build is its own artifact"
    );

    // After the last rollout has drained: v5 and the three before it, and
    // only their artifacts.
    let kept: BTreeSet<String> = deployed[1..].iter().cloned().collect();
    assert!(
        wait_for(Duration::from_secs(20), || digests(&stored, "") == kept),
        "coordinator holds {:?}, expected {kept:?}",
        digests(&stored, "")
    );
    let st = status(&cfg, "hello");
    let ids: Vec<&str> = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(ids, ["v2", "v3", "v4", "v5"], "{st}");
    assert_eq!(version_artifacts(&st), kept);
    // The runner: the artifact its sandbox runs and the two most recent.
    let expected: BTreeSet<String> = deployed[2..].iter().cloned().collect();
    assert!(
        wait_for(Duration::from_secs(20), || digests(&cached, ".tar.gz")
            == expected),
        "runner caches {:?}, expected {expected:?}",
        digests(&cached, ".tar.gz")
    );

    // Another app runs v5's artifact: deleting hello leaves that one only.
    deploy(&cfg, app_dir(5).path(), "other");
    let del = miren(&cfg, &["app", "delete", "-a", "hello"], &[]);
    assert!(del.ok, "{del:?}");
    let shared: BTreeSet<String> = [deployed[4].clone()].into();
    assert_eq!(digests(&stored, ""), shared);
    let del = miren(&cfg, &["app", "delete", "-a", "other"], &[]);
    assert!(del.ok, "{del:?}");
    assert!(
        digests(&stored, "").is_empty(),
        "{:?}",
        digests(&stored, "")
    );
    assert_eq!(temp_files(&stored, ".upload-"), 0);
    // Nothing runs on the runner now: it keeps two artifacts at most.
    assert!(
        wait_for(Duration::from_secs(10), || digests(&cached, ".tar.gz")
            .len()
            <= 2),
        "runner caches {:?}",
        digests(&cached, ".tar.gz")
    );
}

/// The admin identity the server wrote into the client config.
fn admin_identity(cfg: &Path, host_port: &str) -> anyhow::Result<ClientIdentity> {
    let text = std::fs::read_to_string(cfg).context("reading the client config")?;
    let v: Value = serde_yaml_ng::from_str(&text).context("client config YAML")?;
    let entry = v["clusters"]
        .as_object()
        .and_then(|m| m.values().find(|e| e["hostname"] == host_port))
        .with_context(|| format!("no cluster {host_port} in the client config"))?;
    let cert = entry["client_cert"].as_str().context("no client_cert")?;
    let key = entry["client_key"].as_str().context("no client_key")?;
    Ok(ClientIdentity {
        chain: vec![transport::pki::cert_der_from_pem(cert)?],
        key: transport::pki::key_der_from_pem(key)?,
    })
}

fn remote(e: capnp::Error) -> anyhow::Error {
    anyhow::anyhow!(transport::rpc::remote_message(&e))
}

/// The `App` capability for `name` through the admin capability.
async fn app_cap(cluster: &cluster::Client, name: &str) -> anyhow::Result<app::Client> {
    let admin = cluster
        .admin_request()
        .send()
        .promise
        .await
        .map_err(remote)?
        .get()?
        .get_admin()?;
    let mut req = admin.app_request();
    req.get().set_name(name);
    Ok(req.send().promise.await.map_err(remote)?.get()?.get_app()?)
}

async fn begin(app: &app::Client) -> Result<artifact_upload::Client, String> {
    let reply = app
        .upload_artifact_request()
        .send()
        .promise
        .await
        .map_err(|e| transport::rpc::remote_message(&e))?;
    reply
        .get()
        .and_then(|r| r.get_upload())
        .map_err(|e| e.to_string())
}

async fn write(upload: &artifact_upload::Client, data: &[u8]) -> anyhow::Result<()> {
    let mut req = upload.write_request();
    req.get().set_data(data);
    req.send().promise.await.map_err(remote)?;
    Ok(())
}

#[test]
fn a_third_concurrent_upload_is_refused_and_an_abandoned_one_frees_its_slot() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let data = dir.path().join("coord");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let stored = data.join("artifacts");
    let address: identity::ClusterAddress = server.address.parse().unwrap();
    let admin = || admin_identity(&cfg, server.host_port()).unwrap();
    // quinn's endpoint drivers run on the runtime's workers; the RPC
    // systems on this thread's LocalSet.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // Two uploads of `hello` in progress on one connection.
        let (endpoint, conn) = transport::dial(&address, Some(admin())).await.unwrap();
        let cluster: cluster::Client = transport::rpc::connect_connection(&conn).await.unwrap();
        let hello = app_cap(&cluster, "hello").await.unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            let upload = begin(&hello).await.unwrap();
            write(&upload, b"part of an artifact").await.unwrap();
            held.push(upload);
        }
        assert_eq!(temp_files(&stored, ".upload-"), 2);
        let third = begin(&hello).await.err().unwrap();
        assert!(
            third.contains("already has 2 uploads in progress")
                && third.contains("wait for the running deploy"),
            "{third}"
        );
        // The CLI says the same, and changes nothing.
        let app = app_dir(1);
        let run = miren(
            &cfg,
            &[
                "deploy",
                "--dir",
                app.path().to_str().unwrap(),
                "-a",
                "hello",
            ],
            &[],
        );
        assert!(!run.ok, "{run:?}");
        assert!(
            run.stderr.contains("wait for the running deploy"),
            "{}",
            run.stderr
        );
        assert_eq!(temp_files(&stored, ".upload-"), 2);
        // Another app is not held up.
        let other = app_cap(&cluster, "other").await.unwrap();
        drop(begin(&other).await.unwrap());

        // The client goes away mid-upload: its slots and files are freed.
        conn.close(transport::close::CloseCode::Done.into(), b"gone");
        drop((held, hello, other, cluster));
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while temp_files(&stored, ".upload-") > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            temp_files(&stored, ".upload-"),
            0,
            "abandoned uploads left their temporary files"
        );

        // Their slots are free again.
        let (_endpoint, conn) = transport::dial(&address, Some(admin())).await.unwrap();
        let cluster: cluster::Client = transport::rpc::connect_connection(&conn).await.unwrap();
        let hello = app_cap(&cluster, "hello").await.unwrap();
        let uploads = [begin(&hello).await.unwrap(), begin(&hello).await.unwrap()];
        let artifact = b"a small artifact".to_vec();
        write(&uploads[0], &artifact).await.unwrap();
        let sha = hex_sha256(&artifact);
        let mut fin = uploads[0].finish_request();
        fin.get().set_sha256(&sha);
        let reply = fin.send().promise.await.map_err(remote).unwrap();
        assert_eq!(reply.get().unwrap().get_size(), artifact.len() as u64);
        assert_eq!(digests(&stored, ""), [sha].into());
        conn.close(transport::close::CloseCode::Done.into(), b"done");
    });
}

fn hex_sha256(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
