//! `miren cluster`: the clusters this CLI knows, and their status.

use anyhow::{anyhow, bail, Context};
use identity::ClusterAddress;
use schema::miren_capnp::Role;
use serde_json::json;

use crate::config::{config_path, resolve, ClientConfig, ClusterEntry};
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCmd {
    /// Print the address of a cluster as host:port;sha1:<fingerprint>.
    ExportAddress,
    /// List configured clusters.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Add a cluster by address (host:port;sha1:<fingerprint>).
    Add { name: String, address: String },
    /// Make a configured cluster the active one.
    Switch { name: String },
    /// Ask the cluster how it is (uptime and counts need the admin identity).
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

pub fn run(cmd: ClusterCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::ExportAddress => {
            let target = resolve(cluster)?;
            if target.address.fingerprint.is_none() {
                bail!(
                    "the address of this cluster has no fingerprint; ask its operator for `miren cluster export-address`"
                );
            }
            println!("{}", target.address);
            Ok(())
        }
        ClusterCmd::List { output } => list(output),
        ClusterCmd::Add { name, address } => add(&name, &address),
        ClusterCmd::Switch { name } => switch(&name),
        ClusterCmd::Status { output } => run_local(status(cluster, output)),
    }
}

fn list(format: Format) -> anyhow::Result<()> {
    let path = config_path()?;
    let cfg = ClientConfig::load(&path)?;
    let rows: Vec<(String, String, bool, bool)> = cfg
        .clusters
        .iter()
        .map(|(name, e)| {
            let addr = e
                .address()
                .map(|a| a.to_string())
                .unwrap_or_else(|err| format!("invalid: {err}"));
            (
                name.clone(),
                addr,
                cfg.active_cluster.as_deref() == Some(name),
                e.identity().is_some(),
            )
        })
        .collect();
    match format {
        Format::Json => output::json(&json!(rows
            .iter()
            .map(|(n, a, act, id)| json!({"name": n, "address": a, "active": act, "identity": if *id {"admin"} else {"none"}}))
            .collect::<Vec<_>>())),
        Format::Table => {
            if rows.is_empty() {
                println!("No clusters configured in {} (`miren cluster add NAME ADDRESS`)", path.display());
                return Ok(());
            }
            let table: Vec<Vec<String>> = rows
                .into_iter()
                .map(|(n, a, act, id)| {
                    vec![
                        if act { "*".into() } else { String::new() },
                        n,
                        a,
                        if id { "admin".into() } else { "none".into() },
                    ]
                })
                .collect();
            output::table(&["ACTIVE", "NAME", "ADDRESS", "IDENTITY"], &table);
            Ok(())
        }
    }
}

fn add(name: &str, address: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '/') {
        bail!("cluster name {name:?} must be non-empty, without spaces or '/'");
    }
    let addr: ClusterAddress = address
        .parse()
        .with_context(|| format!("address {address:?}"))?;
    let Some(fp) = addr.fingerprint else {
        bail!("address {address:?} has no fingerprint: use host:port;sha1:<fingerprint> from `miren cluster export-address`");
    };
    let path = config_path()?;
    let mut cfg = ClientConfig::load(&path)?;
    let identity = cfg
        .clusters
        .get(name)
        .filter(|e| e.address().is_ok_and(|a| a.same_cluster(&addr)));
    let entry = ClusterEntry {
        hostname: addr.host_port(),
        fingerprint: Some(format!("sha1:{fp}")),
        client_cert: identity.and_then(|e| e.client_cert.clone()),
        client_key: identity.and_then(|e| e.client_key.clone()),
    };
    cfg.clusters.insert(name.to_string(), entry);
    if cfg.active_cluster.is_none() {
        cfg.active_cluster = Some(name.to_string());
    }
    cfg.save(&path)?;
    println!("Added cluster {name} ({addr}) to {}", path.display());
    Ok(())
}

fn switch(name: &str) -> anyhow::Result<()> {
    let path = config_path()?;
    let mut cfg = ClientConfig::load(&path)?;
    if !cfg.clusters.contains_key(name) {
        let known: Vec<&str> = cfg.clusters.keys().map(|s| s.as_str()).collect();
        return Err(anyhow!(
            "no cluster named {name:?} in {} (configured: {})",
            path.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    }
    cfg.active_cluster = Some(name.to_string());
    cfg.save(&path)?;
    println!("Switched to cluster {name}");
    Ok(())
}

async fn status(cluster: Option<&str>, format: Format) -> anyhow::Result<()> {
    let target = resolve(cluster)?;
    let session = Session::open(target).await?;
    let info_reply = session
        .cluster
        .info_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let info = info_reply.get()?.get_info()?;
    let who_reply = session
        .cluster
        .whoami_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let role = who_reply
        .get()?
        .get_role()
        .map_err(|e| anyhow!("unknown role {e:?}"))?;
    let mut doc = json!({
        "name": info.get_name()?.to_str()?,
        "cluster_id": info.get_cluster_id()?.to_str()?,
        "version": info.get_version()?.to_str()?,
        "issuer_url": info.get_issuer_url()?.to_str()?,
        "address": session.target.address.to_string(),
        "config_name": session.target.name.clone(),
        "identity": match role { Role::Admin => "admin", Role::Runner => "runner", Role::Anonymous => "anonymous" },
    });
    if role == Role::Admin {
        let admin = session.admin().await?;
        let reply = admin
            .status_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let s = reply.get()?.get_status()?;
        doc["uptime_secs"] = json!(s.get_uptime_secs());
        doc["runners"] = json!(s.get_runners());
        doc["apps"] = json!(s.get_apps());
        doc["sandboxes"] = json!(s.get_sandboxes());
        doc["join_tokens"] = json!(s.get_join_tokens());
        doc["ci_bindings"] = json!(s.get_ci_bindings());
        doc["signing_keys"] = json!(s.get_signing_keys());
    }
    session.close().await;
    match format {
        Format::Json => output::json(&doc),
        Format::Table => {
            let field = |k: &str| {
                doc.get(k).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            };
            for (label, key) in [
                ("Cluster", "name"),
                ("Cluster ID", "cluster_id"),
                ("Address", "address"),
                ("Version", "version"),
                ("Issuer", "issuer_url"),
                ("Identity", "identity"),
                ("Uptime (s)", "uptime_secs"),
                ("Runners", "runners"),
                ("Apps", "apps"),
                ("Sandboxes", "sandboxes"),
                ("Join tokens", "join_tokens"),
                ("CI bindings", "ci_bindings"),
                ("Signing keys", "signing_keys"),
            ] {
                if let Some(v) = field(key) {
                    println!("{label:<13} {}", output::terminal_safe(&v));
                }
            }
            Ok(())
        }
    }
}
