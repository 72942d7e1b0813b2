//! `miren cluster`: the clusters this CLI knows, their status, renewing
//! the admin identity the CLI holds for one, and codes for another
//! coordinator to join (`coordinator-code`).
//!
//! `status` shows when the server certificate ends (read from this very
//! handshake, so it is what every client is shown) and, with the admin
//! identity, when that ends: the two dates after which something must have
//! been renewed. The coordinator renews its own; `admin-renew` is how an
//! operator renews theirs, with a fresh key, as runners do over their
//! session.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use identity::ClusterAddress;
use schema::miren_capnp::Role;
use serde::Serialize;

use crate::config::{config_path, resolve, ClientConfig, ClusterEntry, Target};
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
    /// Ask the cluster how it is: version, issuer, server certificate expiry
    /// (uptime, counts and the admin certificate's expiry need the admin identity).
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Issue a new admin identity (a fresh key) from the current one and
    /// write it into the client config; the old one works until it expires.
    AdminRenew {
        /// Lifetime of the new certificate (default 10 years; at least 1h;
        /// never past the cluster CA's end).
        #[arg(long, value_parser = humantime::parse_duration)]
        validity: Option<Duration>,
    },
    /// Create a one-time code for another coordinator to join this cluster
    /// (the cluster must run on etcd): on the new machine,
    /// `miren server --etcd … --join CODE --data-dir DIR --listen … --name …`.
    CoordinatorCode {
        /// Lifetime of the code (at most 168h).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

pub fn run(cmd: ClusterCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::ExportAddress => run_local(export_address(cluster)),
        ClusterCmd::List { output } => list(output),
        ClusterCmd::Add { name, address } => add(&name, &address),
        ClusterCmd::Switch { name } => switch(&name),
        ClusterCmd::Status { output } => run_local(status(cluster, output)),
        ClusterCmd::AdminRenew { validity } => run_local(admin_renew(cluster, validity)),
        ClusterCmd::CoordinatorCode { ttl } => run_local(coordinator_code(cluster, ttl)),
    }
}

/// `cluster coordinator-code`: prints the code on stdout, the rest on
/// stderr.
async fn coordinator_code(cluster: Option<&str>, ttl: Duration) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    let mut req = admin.create_coordinator_code_request();
    req.get().set_ttl_secs(ttl.as_secs().max(1));
    let reply = req.send().promise.await.map_err(remote)?;
    let code = reply.get()?.get_code()?.to_str()?.to_string();
    let expires = reply.get()?.get_expires_unix();
    session.close().await;
    println!("{}", output::terminal_safe(&code));
    eprintln!(
        "One-time coordinator code (expires {}). On the new coordinator's machine, with an empty data dir: miren server --etcd URL[,URL…] --join <code> --data-dir DIR --listen ADDR --name HOST[:PORT]",
        output::time(Some(expires))
    );
    Ok(())
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
        Format::Json => output::json(
            &rows
                .iter()
                .map(|(name, address, active, id)| ClusterRow {
                    name,
                    address,
                    active: *active,
                    identity: if *id { "admin" } else { "none" },
                })
                .collect::<Vec<_>>(),
        ),
        Format::Table => {
            if rows.is_empty() {
                println!(
                    "No clusters configured in {} (`miren cluster add NAME ADDRESS`)",
                    path.display()
                );
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
        hostname: addr.hosts(),
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

/// A configured cluster as `cluster list -o json` shows it.
#[derive(Debug, Serialize)]
struct ClusterRow<'a> {
    name: &'a str,
    address: &'a str,
    active: bool,
    /// `admin` or `none`.
    identity: &'static str,
}

/// What `cluster status` shows (`-o json` prints this).
#[derive(Debug, Serialize)]
struct StatusDoc {
    name: String,
    cluster_id: String,
    version: String,
    issuer_url: String,
    address: String,
    config_name: Option<String>,
    /// `admin`, `runner` or `anonymous`.
    identity: &'static str,
    server_cert_expires_unix: Option<i64>,
    /// `host:port` of every running coordinator, the answering one first.
    coordinator_addresses: Vec<String>,
    /// Only for an admin.
    #[serde(flatten)]
    admin: Option<AdminStatusDoc>,
}

/// A running coordinator as an admin's `cluster status` shows it.
#[derive(Debug, Serialize)]
struct CoordinatorRow {
    id: String,
    name: String,
    address: String,
    version: String,
    started_unix: i64,
    leader: bool,
    /// Whether it answered this client on its own address just now.
    reachable: bool,
    /// Its answer's round trip (dial, handshake and one call), when it answered.
    rtt_ms: Option<u64>,
    /// Why it did not answer.
    error: Option<String>,
}

/// How many coordinators `cluster status` probes at most.
const MAX_PROBES: usize = identity::address::MAX_ENDPOINTS;

/// How long `cluster status` waits for each coordinator's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the coordinator at `address` alone (same pin, no credential) for
/// the cluster's info: whether it answers, and how fast.
async fn probe(address: ClusterAddress) -> Result<u64, String> {
    let started = std::time::Instant::now();
    let target = Target {
        name: None,
        address,
        identity: None,
        api_key: None,
    };
    // The same question `export-address` asks; its answer is not needed.
    let answered = tokio::time::timeout(PROBE_TIMEOUT, running_coordinators(target)).await;
    match answered {
        Ok(Ok(_)) => Ok(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// The part of [`StatusDoc`] only an admin sees.
#[derive(Debug, Serialize)]
struct AdminStatusDoc {
    admin_cert_expires_unix: Option<i64>,
    uptime_secs: u64,
    runners: u32,
    apps: u32,
    sandboxes: u32,
    join_tokens: u32,
    ci_bindings: u32,
    signing_keys: u32,
    coordinators: Vec<CoordinatorRow>,
}

/// The cluster's address with every running coordinator it names (asked
/// of the cluster), under the pin of the configured address; the configured
/// address alone, with a warning, when the cluster cannot be asked.
async fn export_address(cluster: Option<&str>) -> anyhow::Result<()> {
    let target = resolve(cluster)?;
    if target.address.fingerprint.is_none() {
        bail!(
            "the address of this cluster has no fingerprint; ask its operator for `miren cluster export-address`"
        );
    }
    let mut address = target.address.clone();
    match running_coordinators(target).await {
        Ok(listed) => {
            for hp in listed {
                if !address.endpoints().contains(&hp) {
                    address.alternates.push(hp);
                }
            }
        }
        Err(e) => eprintln!(
            "warning: could not ask the cluster for its other coordinators ({e:#}); this is the configured address"
        ),
    }
    println!("{address}");
    Ok(())
}

/// The `host:port` of every coordinator the cluster says is running.
async fn running_coordinators(
    target: crate::config::Target,
) -> anyhow::Result<Vec<identity::HostPort>> {
    let session = Session::open(target).await?;
    let reply = session
        .cluster
        .info_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let mut out = Vec::new();
    for listed in reply.get()?.get_info()?.get_coordinators()? {
        // Each is a `host:port` of this same cluster (same pin).
        if let Ok(other) = listed?.to_string()?.parse::<ClusterAddress>() {
            out.push(other.primary());
        }
    }
    session.close().await;
    Ok(out)
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
    let role = session.role().await?;
    let mut coordinator_addresses = Vec::new();
    for a in info.get_coordinators()? {
        coordinator_addresses.push(a?.to_string()?);
    }
    let mut doc = StatusDoc {
        name: info.get_name()?.to_string()?,
        cluster_id: info.get_cluster_id()?.to_string()?,
        version: info.get_version()?.to_string()?,
        issuer_url: info.get_issuer_url()?.to_string()?,
        address: session.target.address.to_string(),
        config_name: session.target.name.clone(),
        identity: match role {
            Role::Admin => "admin",
            Role::Runner => "runner",
            Role::Anonymous => "anonymous",
        },
        server_cert_expires_unix: session.server_cert_not_after(),
        coordinator_addresses,
        admin: None,
    };
    if role == Role::Admin {
        let admin_cert_expires_unix = session
            .target
            .identity
            .as_ref()
            .and_then(|(cert, _)| transport::pki::not_after_unix(cert).ok());
        let admin = session.admin().await?;
        let reply = admin
            .status_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let s = reply.get()?.get_status()?;
        let mut coordinators = Vec::new();
        let mut probes = tokio::task::JoinSet::new();
        for (i, c) in s.get_coordinators()?.iter().enumerate() {
            let address = c.get_address()?.to_string()?;
            // Each is probed on its own address under the configured pin;
            // no more than a cluster address may name (the list is the
            // store's, and a probe is a socket and a dial).
            match address.parse::<ClusterAddress>() {
                _ if i >= MAX_PROBES => {
                    probes.spawn_local(
                        async move { (i, Err("not probed (too many listed)".into())) },
                    );
                }
                Ok(a) => {
                    let pinned = session.target.address.at(&a.primary());
                    probes.spawn_local(async move { (i, probe(pinned).await) });
                }
                Err(e) => {
                    probes.spawn_local(async move { (i, Err(format!("bad address: {e}"))) });
                }
            }
            coordinators.push(CoordinatorRow {
                id: c.get_id()?.to_string()?,
                name: c.get_name()?.to_string()?,
                address,
                version: c.get_version()?.to_string()?,
                started_unix: c.get_started_unix(),
                leader: c.get_leader(),
                reachable: false,
                rtt_ms: None,
                error: None,
            });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((i, answer)) = done else { continue };
            if let Some(row) = coordinators.get_mut(i) {
                match answer {
                    Ok(ms) => {
                        row.reachable = true;
                        row.rtt_ms = Some(ms);
                    }
                    Err(e) => row.error = Some(e),
                }
            }
        }
        doc.admin = Some(AdminStatusDoc {
            admin_cert_expires_unix,
            uptime_secs: s.get_uptime_secs(),
            runners: s.get_runners(),
            apps: s.get_apps(),
            sandboxes: s.get_sandboxes(),
            join_tokens: s.get_join_tokens(),
            ci_bindings: s.get_ci_bindings(),
            signing_keys: s.get_signing_keys(),
            coordinators,
        });
    }
    session.close().await;
    match format {
        Format::Json => output::json(&doc),
        Format::Table => {
            // The rows are the JSON document's fields, in the order below.
            let doc = serde_json::to_value(&doc)?;
            let now = transport::clock::now_unix();
            let field = |k: &str| {
                doc.get(k).filter(|v| !v.is_null()).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    _ if k.ends_with("_expires_unix") => expiry(v.as_i64(), now),
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
                ("Server cert", "server_cert_expires_unix"),
                ("Admin cert", "admin_cert_expires_unix"),
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
            // Coordinators: with their role for an admin, else where they are.
            let rows: Vec<Vec<String>> = match doc.get("coordinators").and_then(|c| c.as_array()) {
                Some(list) => list
                    .iter()
                    .map(|c| {
                        let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                        vec![
                            text("name"),
                            text("address"),
                            if c["leader"].as_bool() == Some(true) {
                                "leader".to_string()
                            } else {
                                "standby".to_string()
                            },
                            match (c["reachable"].as_bool(), c["rtt_ms"].as_u64()) {
                                (Some(true), Some(ms)) => format!("ok ({ms} ms)"),
                                _ => format!("unreachable: {}", text("error")),
                            },
                            text("version"),
                        ]
                    })
                    .collect(),
                None => doc["coordinator_addresses"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .map(|a| vec![a.as_str().unwrap_or_default().to_string()])
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            if !rows.is_empty() {
                println!();
                if rows[0].len() == 1 {
                    output::table(&["COORDINATOR"], &rows);
                } else {
                    output::table(
                        &["COORDINATOR", "ADDRESS", "ROLE", "HEALTH", "VERSION"],
                        &rows,
                    );
                }
            }
            Ok(())
        }
    }
}

/// `expires 2027-01-01T00:00:00Z (in 364d)`, or `expired … (3h ago)`.
fn expiry(t: Option<i64>, now: i64) -> String {
    let Some(t) = t else {
        return "-".into();
    };
    let at = output::time(Some(t));
    if t > now {
        format!("expires {at} (in {})", span(t - now))
    } else {
        format!("EXPIRED {at} ({} ago)", span(now - t))
    }
}

/// A rough span: whole days from two days on, else hours, minutes, seconds.
fn span(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 2 * 3600 => format!("{}h", s / 3600),
        s if s >= 120 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Asks the coordinator for a new admin certificate for a fresh key (the
/// key is made here and never sent), checks that it works, then writes it
/// into the client config entry it came from, atomically.
async fn admin_renew(cluster: Option<&str>, validity: Option<Duration>) -> anyhow::Result<()> {
    let target = resolve(cluster)?;
    let Some(name) = target.name.clone() else {
        bail!("admin-renew writes the new identity into the client config: name a configured cluster (`-C NAME`, `miren cluster list`)");
    };
    let Some((old_cert, _)) = target.identity.clone() else {
        bail!("cluster {name:?} has no admin identity in the client config to renew");
    };
    let validity_secs = match validity {
        None => 0,
        Some(d) => d.as_secs().max(1),
    };
    let session = Session::open(target.clone()).await?;
    let admin = session.admin().await?;
    let (key_pem, csr) = transport::pki::key_and_csr()?;
    let mut req = admin.renew_admin_request();
    req.get().set_csr_der(&csr);
    req.get().set_validity_secs(validity_secs);
    let reply = req.send().promise.await.map_err(remote)?;
    let cert_pem = reply.get()?.get_cert_pem()?.to_string()?;
    session.close().await;

    // The certificate must be for our key, and must work, before it
    // replaces the one that does.
    transport::tls::certified_key(
        vec![transport::pki::cert_der_from_pem(&cert_pem)?],
        transport::pki::key_der_from_pem(&key_pem)?,
    )
    .context("the coordinator answered with a certificate for another key")?;
    let renewed = Target {
        identity: Some((cert_pem.clone(), key_pem.clone())),
        ..target.clone()
    };
    let check = Session::open(renewed).await?;
    let role = check.role().await?;
    check.close().await;
    if role != Role::Admin {
        bail!("the renewed certificate is not accepted as the admin identity; the client config is unchanged");
    }

    let path = config_path()?;
    let mut cfg = ClientConfig::load(&path)?;
    let entry = cfg
        .clusters
        .get_mut(&name)
        .filter(|e| e.address().is_ok_and(|a| a.same_cluster(&target.address)))
        .ok_or_else(|| {
            anyhow!(
                "cluster {name:?} changed in {} meanwhile; the client config is unchanged",
                path.display()
            )
        })?;
    entry.client_cert = Some(cert_pem.clone());
    entry.client_key = Some(key_pem);
    cfg.save(&path)?;
    let new_end = transport::pki::not_after_unix(&cert_pem).ok();
    let old_end = transport::pki::not_after_unix(&old_cert).ok();
    println!(
        "Renewed the admin identity of cluster {} in {}: a new key, certificate {}",
        output::terminal_safe(&name),
        path.display(),
        expiry(new_end, transport::clock::now_unix())
    );
    println!(
        "The previous certificate keeps working until it expires ({}); remove copies of it you no longer trust.",
        output::time(old_end)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_reads_as_a_date_and_a_rough_span() {
        let now = 1_700_000_000;
        assert_eq!(span(364 * 86_400 + 5), "364d");
        assert_eq!(span(30 * 3600), "30h");
        assert_eq!(span(90), "90s");
        assert_eq!(span(600), "10m");
        let e = expiry(Some(now + 3 * 86_400), now);
        assert!(
            e.starts_with("expires 2023-11-") && e.ends_with("(in 3d)"),
            "{e}"
        );
        assert!(expiry(Some(now - 60), now).starts_with("EXPIRED "));
        assert_eq!(expiry(None, now), "-");
    }
}
