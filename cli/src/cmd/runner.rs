//! `miren runner`: run a runner, and manage join tokens and runners.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RunnerArgs {
    #[command(subcommand)]
    cmd: Option<RunnerCmd>,
    #[command(flatten)]
    agent: AgentArgs,
}

/// Running a runner.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Where the runner keeps its identity (default /var/lib/miren-runner).
    #[arg(long, env = "MIREN_RUNNER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Join code from `miren runner token create` (first start only).
    #[arg(long, env = "MIREN_JOIN_TOKEN")]
    join: Option<String>,
    /// Runner name (default: the join code's name, or runner-<id>).
    #[arg(long, default_value = "")]
    name: String,
    /// Label key=value; repeatable.
    #[arg(long = "label", value_parser = crate::args::label)]
    labels: Vec<(String, String)>,
    /// Sandbox isolation: bwrap (namespaces), none (plain processes), or
    /// auto (bwrap when it works here, else none with a warning).
    #[arg(long, default_value = "auto", value_parser = crate::args::isolation())]
    isolation: runner::sandbox::IsolationMode,
    /// Lifetime of the token kept in each sandbox's MIREN_IDENTITY_TOKEN_PATH
    /// (rewritten at half-life; clamped to 60s..24h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_file_ttl: std::time::Duration,
    /// Memory a sandbox gets when its app.toml sets none (e.g. 512MiB;
    /// at most this host's memory, which is also the most an app may ask).
    #[arg(long, value_parser = crate::args::sandbox_memory)]
    sandbox_memory: Option<u64>,
    /// CPUs a sandbox gets when its app.toml sets none (e.g. 0.5; at most
    /// this host's CPUs).
    #[arg(long, value_parser = crate::args::sandbox_cpus)]
    sandbox_cpus: Option<u32>,
    /// Processes a sandbox may run when its app.toml sets none (e.g. 512).
    #[arg(long, value_parser = crate::args::sandbox_pids)]
    sandbox_pids: Option<u32>,
    /// New (uncached) workload tokens a sandbox may have minted at once;
    /// each costs the coordinator a signature. Cached tokens are never
    /// limited.
    #[arg(long, default_value_t = runner::token_limits::MissLimit::DEFAULT_BURST,
          value_parser = clap::value_parser!(u32).range(1..))]
    token_miss_burst: u32,
    /// New workload tokens per second a sandbox may have minted once its
    /// burst is spent; beyond that its endpoint answers 429 with Retry-After.
    #[arg(long, default_value_t = runner::token_limits::MissLimit::DEFAULT_PER_SEC,
          value_parser = clap::value_parser!(u32).range(1..))]
    token_miss_rate: u32,
    /// TCP address of the plain-HTTP metrics listener: /metrics
    /// (Prometheus), /healthz, /readyz (ready while connected to the
    /// coordinator). Default: off.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Count no metrics (to measure their cost).
    #[arg(long, hide = true)]
    no_observe: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum RunnerCmd {
    /// Join codes.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List runners.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a runner: its certificate stops working at once.
    Remove { id: String },
    /// Stop scheduling onto a runner.
    Cordon { id: String },
    /// Allow scheduling onto a runner again.
    Uncordon { id: String },
    /// Move every sandbox off a runner with no loss of capacity (each old
    /// one stops once its replacement on another runner is healthy), then
    /// leave it cordoned. Returns when it hosts no sandbox.
    Drain {
        id: String,
        /// Give up waiting after this long (the drain goes on).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join code.
    Create {
        /// Lifetime (one-time codes: at most 168h).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Allow several runners to join with it.
        #[arg(long)]
        reusable: bool,
        /// Name for runners joining with it.
        #[arg(long, default_value = "")]
        name: String,
        /// Label key=value for runners joining with it; repeatable.
        #[arg(long = "label", value_parser = crate::args::label)]
        labels: Vec<(String, String)>,
    },
    /// List join codes (never their secrets).
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke a join code.
    Revoke { id: String },
}

pub fn run(args: RunnerArgs, cluster: Option<&str>) -> anyhow::Result<()> {
    match args.cmd {
        None => run_agent(args.agent),
        Some(RunnerCmd::Token(t)) => run_local(token(t, cluster)),
        Some(RunnerCmd::List { output }) => run_local(list(cluster, output)),
        Some(RunnerCmd::Remove { id }) => run_local(async move {
            let session = Session::open(resolve(cluster)?).await?;
            let admin = session.admin().await?;
            let mut req = admin.remove_runner_request();
            req.get().set_id(&id);
            req.send().promise.await.map_err(remote)?;
            session.close().await;
            println!("Removed runner {id}");
            Ok(())
        }),
        Some(RunnerCmd::Cordon { id }) => run_local(cordon(cluster, id, true)),
        Some(RunnerCmd::Uncordon { id }) => run_local(cordon(cluster, id, false)),
        Some(RunnerCmd::Drain { id, timeout }) => run_local(drain(cluster, id, timeout)),
    }
}

fn run_agent(a: AgentArgs) -> anyhow::Result<()> {
    let data_dir = a
        .data_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/miren-runner"));
    let opts = runner::RunnerOptions {
        build: crate::build_info(),
        data_dir,
        join: a.join,
        name: a.name,
        labels: a.labels,
        isolation: a.isolation,
        token_file_ttl: a.token_file_ttl.as_secs().clamp(60, 86_400) as u32,
        sandbox_limits: runner::limits::Limits {
            memory_bytes: a.sandbox_memory,
            cpu_millis: a.sandbox_cpus,
            pids: a.sandbox_pids,
        },
        token_misses: runner::token_limits::MissLimit::new(a.token_miss_burst, a.token_miss_rate)?,
        metrics: runner::metrics::Metrics::new(!a.no_observe),
    };
    let metrics_listen = a.metrics_listen;
    run_local(async move {
        let shutdown = crate::cmd::server::shutdown_signal()?;
        if let Some(addr) = metrics_listen {
            let listener = transport::ops::bind(addr).await?;
            println!(
                "Metrics: http://{}/metrics (also /healthz, /readyz)",
                listener.local_addr()?
            );
            let router = transport::ops::router(
                vec![opts.metrics.registry()],
                vec![opts.metrics.readiness()],
            );
            tokio::spawn(transport::ops::serve(
                listener,
                router,
                std::future::pending(),
            ));
        }
        Ok(runner::run(opts, shutdown).await?)
    })
}

async fn cordon(cluster: Option<&str>, id: String, on: bool) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    let mut req = admin.set_runner_cordon_request();
    req.get().set_id(&id);
    req.get().set_cordoned(on);
    req.send().promise.await.map_err(remote)?;
    session.close().await;
    println!("Runner {id} {}", if on { "cordoned" } else { "uncordoned" });
    Ok(())
}

async fn drain(
    cluster: Option<&str>,
    query: String,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    let mut req = admin.drain_runner_request();
    req.get().set_id(&query);
    let reply = req.send().promise.await.map_err(remote)?;
    let id = reply.get()?.get_id()?.to_string()?;
    eprintln!("Draining runner {id}: it is cordoned; its sandboxes move to other runners");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = u32::MAX;
    loop {
        let reply = admin
            .list_runners_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let mut left = 0;
        for r in reply.get()?.get_runners()? {
            if r.get_id()?.to_str()? == id {
                left = r.get_sandboxes();
            }
        }
        if left == 0 {
            break;
        }
        if left != last {
            eprintln!("  {left} sandbox(es) still on {id}");
            last = left;
        }
        if tokio::time::Instant::now() >= deadline {
            session.close().await;
            anyhow::bail!(
                "runner {id} still hosts {left} sandbox(es) after {}; the drain goes on (follow it with `miren runner list`); are other runners ready to take them?",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    session.close().await;
    println!("Runner {id} drained and cordoned");
    Ok(())
}

fn labels_text(
    l: capnp::struct_list::Reader<'_, schema::miren_capnp::label::Owned>,
) -> anyhow::Result<Vec<String>> {
    l.iter()
        .map(|x| {
            Ok(format!(
                "{}={}",
                x.get_key()?.to_str()?,
                x.get_value()?.to_str()?
            ))
        })
        .collect()
}

/// A join code as `runner token list` shows it (`-o json` prints this).
#[derive(Debug, Serialize)]
struct TokenRow {
    id: String,
    name: String,
    reusable: bool,
    uses: u32,
    created_unix: i64,
    expires_unix: i64,
    state: &'static str,
    /// `key=value`.
    labels: Vec<String>,
}

fn token_row(t: schema::miren_capnp::join_token_info::Reader<'_>) -> anyhow::Result<TokenRow> {
    let state = coordinator::wire_types::join_token_state_from_wire(t.get_state()?);
    Ok(TokenRow {
        id: t.get_id()?.to_string()?,
        name: t.get_name()?.to_string()?,
        reusable: t.get_reusable(),
        uses: t.get_uses(),
        created_unix: t.get_created_unix(),
        expires_unix: t.get_expires_unix(),
        state: state.as_str(),
        labels: labels_text(t.get_labels()?)?,
    })
}

/// A runner as `runner list` shows it (`-o json` prints this).
#[derive(Debug, Serialize)]
struct RunnerRow {
    id: String,
    name: String,
    /// `ready` or `down`.
    status: &'static str,
    cordoned: bool,
    /// `key=value`.
    labels: Vec<String>,
    sandboxes: u32,
    last_seen_unix: i64,
    version: String,
    /// `bwrap` or `none`; empty when it has not reported.
    #[serde(serialize_with = "isolation_word")]
    isolation: Option<runner::sandbox::IsolationMode>,
    limits: String,
    cert_expires_unix: i64,
}

fn isolation_word<S: serde::Serializer>(
    mode: &Option<runner::sandbox::IsolationMode>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(mode.map_or("", |m| m.as_str()))
}

fn runner_row(r: schema::miren_capnp::runner_info::Reader<'_>) -> anyhow::Result<RunnerRow> {
    Ok(RunnerRow {
        id: r.get_id()?.to_string()?,
        name: r.get_name()?.to_string()?,
        status: coordinator::wire_types::runner_state_word(r.get_status()?),
        cordoned: r.get_cordoned(),
        labels: labels_text(r.get_labels()?)?,
        sandboxes: r.get_sandboxes(),
        last_seen_unix: r.get_last_seen_unix(),
        version: r.get_version()?.to_string()?,
        isolation: runner::sandbox::IsolationMode::from_wire(r.get_isolation()?),
        limits: r.get_limits()?.to_string()?,
        cert_expires_unix: r.get_cert_expires_unix(),
    })
}

async fn token(cmd: TokenCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    match cmd {
        TokenCmd::Create {
            ttl,
            reusable,
            name,
            labels,
        } => {
            let mut req = admin.create_join_token_request();
            {
                let mut p = req.get();
                p.set_ttl_secs(ttl.as_secs().max(1));
                p.set_reusable(reusable);
                p.set_name(&name);
                let mut list = p.init_labels(labels.len() as u32);
                for (i, (k, v)) in labels.iter().enumerate() {
                    let mut l = list.reborrow().get(i as u32);
                    l.set_key(k);
                    l.set_value(v);
                }
            }
            let reply = req.send().promise.await.map_err(remote)?;
            let token = reply.get()?.get_token()?.to_str()?.to_string();
            let info = token_row(reply.get()?.get_info()?)?;
            session.close().await;
            println!("{}", output::terminal_safe(&token));
            eprintln!(
                "Join code {} ({}, expires {}). On the runner host: miren runner --data-dir DIR --join <code>",
                output::terminal_safe(&info.id),
                if reusable { "reusable" } else { "one-time" },
                crate::output::time(Some(info.expires_unix))
            );
            Ok(())
        }
        TokenCmd::List { output } => {
            let reply = admin
                .list_join_tokens_request()
                .send()
                .promise
                .await
                .map_err(remote)?;
            let rows: Vec<TokenRow> = reply
                .get()?
                .get_tokens()?
                .iter()
                .map(token_row)
                .collect::<anyhow::Result<_>>()?;
            session.close().await;
            match output {
                Format::Json => output::json(&rows),
                Format::Table => {
                    let t: Vec<Vec<String>> = rows
                        .into_iter()
                        .map(|r| {
                            vec![
                                r.id,
                                r.name,
                                if r.reusable { "reusable" } else { "one-time" }.into(),
                                r.uses.to_string(),
                                r.state.to_string(),
                                crate::output::time(Some(r.expires_unix)),
                            ]
                        })
                        .collect();
                    output::table(&["ID", "NAME", "KIND", "USES", "STATE", "EXPIRES"], &t);
                    Ok(())
                }
            }
        }
        TokenCmd::Revoke { id } => {
            let mut req = admin.revoke_join_token_request();
            req.get().set_id(&id);
            req.send().promise.await.map_err(remote)?;
            session.close().await;
            println!("Revoked join code {id}");
            Ok(())
        }
    }
}

async fn list(cluster: Option<&str>, format: Format) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    let reply = admin
        .list_runners_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let rows = (reply.get()?.get_runners()?.iter())
        .map(runner_row)
        .collect::<anyhow::Result<Vec<_>>>()?;
    session.close().await;
    match format {
        Format::Json => output::json(&rows),
        Format::Table => {
            if rows.is_empty() {
                println!("No runners (add one: `miren runner token create`, then `miren runner --join <code>` on its host)");
                return Ok(());
            }
            let t: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut status = r.status.to_string();
                    if r.cordoned {
                        status.push_str(",cordoned");
                    }
                    if r.isolation == Some(runner::sandbox::IsolationMode::None) {
                        status.push_str(",no-isolation");
                    }
                    // A runner that reports how it limits, and cannot.
                    if r.limits.starts_with(runner::cgroup::NO_LIMITS) {
                        status.push_str(",no-limits");
                    }
                    vec![
                        r.id.clone(),
                        r.name.clone(),
                        status,
                        r.labels.join(","),
                        r.sandboxes.to_string(),
                        crate::output::time(Some(r.last_seen_unix)),
                        r.version.clone(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID",
                    "NAME",
                    "STATUS",
                    "LABELS",
                    "SANDBOXES",
                    "LAST SEEN",
                    "VERSION",
                ],
                &t,
            );
            Ok(())
        }
    }
}
