//! `miren deploy` and `miren app`: put an app on the cluster and operate it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use coordinator::apps::{AppStatus, SandboxStatus};
use coordinator::converge::VersionState;
use coordinator::wire_types::{read_app_status, read_logs};

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};
use crate::{appconfig, pack};

/// Upload chunk size.
const CHUNK: usize = 512 * 1024;

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// App name (default: MIREN_APP, then `name` in .miren/app.toml).
    #[arg(short = 'a', long = "app", env = "MIREN_APP")]
    app: Option<String>,
    /// Directory of the app.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Upload this prebuilt .tar.gz instead of packing --dir (its
    /// .miren/app.toml is still read from --dir).
    #[arg(long)]
    artifact: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[arg(short = 'a', long = "app", env = "MIREN_APP")]
    app: String,
    /// Lines per sandbox.
    #[arg(short = 'n', long, default_value_t = 100)]
    lines: u32,
    /// Keep printing new lines.
    #[arg(short = 'f', long)]
    follow: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum AppCmd {
    /// List apps.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Versions and sandboxes of an app.
    Status {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Stop every sandbox of an app and forget it (admin).
    Delete {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
    },
}

pub fn deploy(args: DeployArgs, cluster: Option<&str>) -> anyhow::Result<()> {
    let config = appconfig::load(&args.dir)?;
    let app = args.app.clone().or(config.name.clone()).ok_or_else(|| {
        anyhow!("which app? pass -a APP, set MIREN_APP, or put name = \"...\" in .miren/app.toml")
    })?;
    let packed = match &args.artifact {
        Some(path) => {
            use sha2::Digest;
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            pack::Packed {
                sha256_hex: hex::encode(sha2::Sha256::digest(&bytes)),
                files: 0,
                bytes,
            }
        }
        None => pack::pack_dir(&args.dir)?,
    };
    eprintln!(
        "Packed {} files ({} KiB, sha256 {})",
        packed.files,
        packed.bytes.len() / 1024,
        output::short(&packed.sha256_hex, 12)
    );
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let app_cap = session.app(&app).await?;
        // Upload in chunks.
        let upload = app_cap
            .upload_artifact_request()
            .send()
            .promise
            .await
            .map_err(remote)?
            .get()?
            .get_upload()?;
        let bar = indicatif::ProgressBar::new(packed.bytes.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("Uploading {bar:30} {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        for chunk in packed.bytes.chunks(CHUNK) {
            let mut req = upload.write_request();
            req.get().set_data(chunk);
            req.send().promise.await.map_err(remote)?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let mut fin = upload.finish_request();
        fin.get().set_sha256(&packed.sha256_hex);
        fin.send().promise.await.map_err(remote)?;
        eprintln!(
            "Uploaded artifact {}",
            output::short(&packed.sha256_hex, 12)
        );

        let mut req = app_cap.deploy_request();
        {
            let mut p = req.get();
            p.set_artifact_sha256(&packed.sha256_hex);
            let mut list = p.init_services(config.services.len() as u32);
            for (i, s) in config.services.iter().enumerate() {
                let mut b = list.reborrow().get(i as u32);
                b.set_name(&s.name);
                b.set_command(&s.command);
                b.set_port(s.port);
                b.set_instances(s.instances);
                {
                    // 0 = the runner's default.
                    let mut l = b.reborrow().init_limits();
                    l.set_memory_bytes(s.limits.memory_bytes.unwrap_or(0));
                    l.set_cpu_millis(s.limits.cpu_millis.unwrap_or(0));
                    l.set_pids(s.limits.pids.unwrap_or(0));
                }
                let mut env = b.init_env(s.env.len() as u32);
                for (j, (k, v)) in s.env.iter().enumerate() {
                    let mut l = env.reborrow().get(j as u32);
                    l.set_key(k);
                    l.set_value(v);
                }
            }
        }
        let reply = req.send().promise.await.map_err(remote)?;
        let version = reply.get()?.get_version()?.to_string()?;
        eprintln!("Rolling out {app} {}", output::terminal_safe(&version));

        // Follow the rollout.
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
        loop {
            let status = app_status(&app_cap).await?;
            for s in status.sandboxes.iter().filter(|s| s.version == version) {
                let state = state_word(s).to_string();
                if seen.get(&s.id) != Some(&state) {
                    eprintln!(
                        "  sandbox {} on runner {}: {}",
                        output::terminal_safe(&s.id),
                        output::terminal_safe(output::short(&s.runner, 8)),
                        output::terminal_safe(&state)
                    );
                    seen.insert(s.id.clone(), state);
                }
            }
            let v = status.versions.iter().find(|v| v.id == version);
            match v.map(|v| v.state) {
                Some(VersionState::Active) => {
                    session.close().await;
                    println!("Deployed {app} {}", output::terminal_safe(&version));
                    return Ok(());
                }
                Some(VersionState::Failed) => {
                    // Its sandboxes are being stopped: say so once they are
                    // (bounded), so what follows sees only the old version.
                    let gone = tokio::time::Instant::now() + Duration::from_secs(20);
                    while tokio::time::Instant::now() < gone {
                        let st = app_status(&app_cap).await?;
                        let left = st.sandboxes.iter().any(|s| s.version == version);
                        if !left {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    session.close().await;
                    bail!(
                        "{app} {version} failed; the previous version keeps serving.\n{}",
                        v.map(|v| v.message.as_str()).unwrap_or_default()
                    );
                }
                Some(VersionState::Superseded) => {
                    session.close().await;
                    bail!(
                        "{app} {version} was superseded by a later deploy before it became active; see `miren app status -a {app}`"
                    );
                }
                Some(VersionState::Deploying) | None => {}
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{app} {version} is still rolling out; follow it with `miren app status -a {app}`");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// A sandbox's state word: what its runner reported, or `unknown`.
fn state_word(s: &SandboxStatus) -> &'static str {
    s.seen.state.map_or("unknown", |st| st.as_str())
}

/// A sandbox's state as `app status` shows it: what its runner reported,
/// or `unknown since <time>` when nothing was reported on a live session.
fn sandbox_state(s: &SandboxStatus) -> String {
    let shown = match (s.seen.state, s.seen.unknown_since_unix) {
        (None, Some(since)) => format!("unknown since {}", output::time(Some(since))),
        _ => state_word(s).to_string(),
    };
    if s.retiring {
        format!("{shown} (retiring)")
    } else {
        shown
    }
}

async fn app_status(app: &schema::miren_capnp::app::Client) -> anyhow::Result<AppStatus> {
    let reply = app.status_request().send().promise.await.map_err(remote)?;
    read_app_status(reply.get()?.get_status()?).context("status from the coordinator")
}

pub fn run(cmd: AppCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let result = match cmd {
            AppCmd::List { output } => {
                let admin = session.admin().await?;
                let reply = admin
                    .list_apps_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let apps = (reply.get()?.get_apps()?.iter())
                    .map(read_app_status)
                    .collect::<Result<Vec<_>, _>>()?;
                match output {
                    Format::Json => output::json(&apps),
                    Format::Table => {
                        let rows: Vec<Vec<String>> = apps
                            .iter()
                            .map(|a| {
                                vec![
                                    a.name.clone(),
                                    a.active_version.clone().unwrap_or_else(|| "-".into()),
                                    a.sandboxes.len().to_string(),
                                ]
                            })
                            .collect();
                        output::table(&["NAME", "VERSION", "SANDBOXES"], &rows);
                        Ok(())
                    }
                }
            }
            AppCmd::Status { app, output } => {
                let status = app_status(&session.app(&app).await?).await?;
                match output {
                    Format::Json => output::json(&status),
                    Format::Table => {
                        println!(
                            "App {} (active version {})",
                            app,
                            output::terminal_safe(status.active_version.as_deref().unwrap_or("-"))
                        );
                        let versions: Vec<Vec<String>> = status
                            .versions
                            .iter()
                            .map(|v| {
                                vec![
                                    v.id.clone(),
                                    v.state.as_str().to_string(),
                                    output::time(Some(v.created_unix)),
                                    v.message.lines().next().unwrap_or_default().to_string(),
                                ]
                            })
                            .collect();
                        output::table(&["VERSION", "STATE", "CREATED", "MESSAGE"], &versions);
                        println!();
                        let sandboxes: Vec<Vec<String>> = status
                            .sandboxes
                            .iter()
                            .map(|s| {
                                vec![
                                    s.id.clone(),
                                    s.version.clone(),
                                    s.runner.clone(),
                                    sandbox_state(s),
                                    s.seen.restarts.to_string(),
                                    s.seen.address.clone(),
                                    s.seen.last_exit.clone(),
                                ]
                            })
                            .collect();
                        output::table(
                            &[
                                "SANDBOX",
                                "VERSION",
                                "RUNNER",
                                "STATE",
                                "RESTARTS",
                                "ADDRESS",
                                "LAST EXIT",
                            ],
                            &sandboxes,
                        );
                        Ok(())
                    }
                }
            }
            AppCmd::Delete { app } => {
                let admin = session.admin().await?;
                let mut req = admin.delete_app_request();
                req.get().set_app(&app);
                req.send().promise.await.map_err(remote)?;
                println!("Deleted app {app}");
                Ok(())
            }
        };
        session.close().await;
        result
    })
}

/// `miren logs -a APP [-n N] [-f]`.
pub fn logs(args: LogsArgs, cluster: Option<&str>) -> anyhow::Result<()> {
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let app = session.app(&args.app).await?;
        let mut printed: BTreeMap<String, usize> = BTreeMap::new();
        loop {
            let mut req = app.logs_request();
            req.get().set_lines(if args.follow && !printed.is_empty() {
                10_000
            } else {
                args.lines
            });
            let reply = req.send().promise.await.map_err(remote)?;
            let logs = read_logs(reply.get()?.get_sandboxes()?)?;
            for sb in logs {
                let id = sb.sandbox;
                let lines = sb.lines;
                let seen = printed.get(&id).copied();
                let start = match seen {
                    None => 0,
                    Some(n) if n <= lines.len() => n,
                    Some(_) => 0,
                };
                let shown_id = output::terminal_safe(&id).into_owned();
                for l in lines.iter().skip(start) {
                    println!("{shown_id}: {}", output::terminal_safe(l));
                }
                if let Some(e) = &sb.error {
                    eprintln!("{shown_id}: {}", output::terminal_safe(e));
                }
                printed.insert(id, lines.len());
            }
            if !args.follow {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        session.close().await;
        Ok(())
    })
}
