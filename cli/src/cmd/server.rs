//! `miren server`: runs a coordinator and writes the admin client config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use coordinator::{Coordinator, CoordinatorOptions};

use crate::config::{config_path, ClientConfig, ClusterEntry};

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Embedded default for trying miren out: 127.0.0.1, a temporary data dir
    /// unless --data-dir is given, and the client config set to this cluster.
    #[arg(long)]
    dev: bool,
    /// Where the CA, signing keys and store live (default /var/lib/miren).
    #[arg(long, env = "MIREN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP (QUIC) address to listen on (default 0.0.0.0:8443; 127.0.0.1:8443 with --dev).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Name clients use to reach this coordinator, HOST[:PORT]; repeatable.
    /// The first is the cluster address; all go into the server certificate.
    #[arg(long = "name", value_name = "HOST[:PORT]")]
    names: Vec<String>,
    /// Cluster name on first start (default: the first --name's host; "dev" with --dev).
    #[arg(long)]
    cluster_name: Option<String>,
    /// Issuer URL of workload tokens (default https://<first --name>).
    #[arg(long)]
    issuer_url: Option<String>,
    /// How long verifiers may cache the JWKS; new keys are published this long before they sign.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    jwks_max_age: Duration,
    /// Age at which the signing key is replaced automatically.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    signing_key_rotation: Duration,
    /// TCP address for HTTPS (discovery, JWKS); default: the --listen IP and port.
    #[arg(long)]
    https_listen: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS instead of the cluster CA's server certificate.
    #[arg(long, requires = "https_key")]
    https_cert: Option<PathBuf>,
    /// PEM private key of --https-cert.
    #[arg(long, requires = "https_cert")]
    https_key: Option<PathBuf>,
    /// TCP address of the HTTP ingress (default: off; 127.0.0.1:0 with --dev).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// TCP address of the ingress over HTTPS, with the HTTPS certificate (default: off).
    #[arg(long)]
    ingress_https_listen: Option<SocketAddr>,
    /// Let CI issuers and route OIDC providers be on loopback addresses
    /// (127.0.0.0/8, ::1, `localhost`, names resolving there), e.g. for tests.
    #[arg(long)]
    oidc_allow_loopback_issuers: bool,
    /// A non-public range (CIDR, or one address) CI issuers and route OIDC
    /// providers may resolve to, e.g. an internal identity provider; repeatable.
    #[arg(long = "outbound-allow", value_name = "CIDR")]
    outbound_allow: Vec<identity::IpCidr>,
    /// Labs features to turn on, comma-separated (routeoidc).
    #[arg(long, env = "MIREN_LABS", value_delimiter = ',')]
    labs: Vec<String>,
    /// Extra CA certificates (PEM) trusted when fetching OIDC issuers' keys.
    #[arg(long)]
    oidc_ca_file: Option<PathBuf>,
    /// Sandbox isolation of the --dev runner: auto, bwrap or none.
    #[arg(long, default_value = "auto", value_parser = crate::args::isolation())]
    isolation: runner::sandbox::IsolationMode,
    /// Lifetime of runner certificates; runners renew at half-life.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    runner_cert_validity: Duration,
    /// (tests) Lifetime of the server certificates the coordinator issues;
    /// renewed with a third left, checked every thirtieth (1s..1h).
    #[arg(long, hide = true, default_value = "365d", value_parser = humantime::parse_duration)]
    server_cert_lifetime: Duration,
    /// Connections each TCP listener (HTTPS, each ingress) holds at once.
    #[arg(long, default_value_t = coordinator::accept::MAX_CONNECTIONS, value_parser = crate::args::positive_count)]
    http_max_connections: usize,
    /// Connections one client address (an IPv6 /64) holds at once on each TCP listener.
    #[arg(long, default_value_t = coordinator::accept::MAX_CONNECTIONS_PER_SOURCE, value_parser = crate::args::positive_count)]
    http_max_connections_per_ip: usize,
    /// Time a client has to finish its TLS handshake (tests shorten it).
    #[arg(long, hide = true, default_value = "10s", value_parser = crate::args::positive_duration)]
    http_handshake_timeout: Duration,
    /// Time a client has to send a request head, also the keep-alive idle time (tests shorten it).
    #[arg(long, hide = true, default_value = "10s", value_parser = crate::args::positive_duration)]
    http_header_timeout: Duration,
    /// Time a connection with a request in progress may move no byte (tests shorten it).
    #[arg(long, hide = true, default_value = "60s", value_parser = crate::args::positive_duration)]
    http_idle_timeout: Duration,
    /// Requests one app may have in flight on one runner through the ingress (tests lower it).
    #[arg(long, hide = true, default_value_t = coordinator::runner_streams::STREAMS_PER_APP, value_parser = crate::args::positive_count)]
    ingress_streams_per_app: usize,
    /// How long a runner may be down (or unheard from) before its
    /// sandboxes are placed on other runners.
    #[arg(long, default_value = "1m", value_parser = crate::args::positive_duration)]
    runner_grace: Duration,
    /// How long a new version has to become healthy before it is failed.
    #[arg(long, hide = true, default_value = "90s", value_parser = crate::args::positive_duration)]
    rollout_timeout: Duration,
    /// TCP address of the plain-HTTP metrics listener: /metrics
    /// (Prometheus), /healthz, /readyz (default: off; 127.0.0.1:0 with --dev).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Count no metrics and write no audit trail (to measure their cost).
    #[arg(long, hide = true)]
    no_observe: bool,
    /// QUIC connections one address (an IPv6 /64) may hold before their
    /// peers prove a role; runners and operators do not count once their
    /// certificate is checked.
    #[arg(long, default_value_t = coordinator::frontdoor::MAX_CONNECTIONS_PER_SOURCE as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_address: u32,
    /// Join attempts one address may make at once (runners joining together
    /// behind one NAT).
    #[arg(long, default_value_t = coordinator::frontdoor::JOIN_BURST,
          value_parser = clap::value_parser!(u32).range(1..))]
    join_burst: u32,
    /// Then one join attempt per address every this long.
    #[arg(long, default_value = "3s", value_parser = crate::args::positive_duration)]
    join_interval: Duration,
    /// Keep the cluster's records in etcd v3 at these member URLs
    /// (`http://HOST:2379`, or `https://` with --etcd-ca) instead of the
    /// data dir's embedded store.
    #[arg(
        long,
        env = "MIREN_ETCD",
        value_name = "URL[,URL…]",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long, value_name = "FILE", requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, when it asks for one.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Every key of this cluster lives under this etcd prefix.
    #[arg(long, value_name = "PREFIX", default_value = coordinator::etcd_store::DEFAULT_PREFIX, requires = "etcd")]
    etcd_prefix: String,
    /// Join an existing cluster on etcd as one more coordinator, with a
    /// code from `miren cluster coordinator-code`, into an empty data dir.
    /// Ignored (with a note) once the data dir has joined. Prefer
    /// MIREN_JOIN_CODE (from a 0600 file) to the flag: a command line is
    /// readable by every user of the machine.
    #[arg(
        long,
        value_name = "CODE",
        env = "MIREN_JOIN_CODE",
        hide_env_values = true,
        requires = "etcd",
        conflicts_with = "dev"
    )]
    join: Option<String>,
}

/// The store `--etcd` and its TLS flags choose.
fn store_backend(args: &ServerArgs) -> anyhow::Result<coordinator::server::StoreBackend> {
    use coordinator::etcd_store::{EtcdOptions, EtcdTls};
    if args.etcd.is_empty() {
        return Ok(coordinator::server::StoreBackend::Embedded);
    }
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
    };
    let tls = match &args.etcd_ca {
        None => None,
        Some(ca) => Some(EtcdTls {
            ca_pem: read(ca, "--etcd-ca")?,
            client: match (&args.etcd_cert, &args.etcd_key) {
                (Some(c), Some(k)) => Some((read(c, "--etcd-cert")?, read(k, "--etcd-key")?)),
                _ => None,
            },
        }),
    };
    let mut opts = EtcdOptions::new(args.etcd.clone());
    opts.prefix = args.etcd_prefix.clone();
    opts.tls = tls;
    Ok(coordinator::server::StoreBackend::Etcd(opts))
}

/// `--join CODE`: joins the cluster into the data dir, or says that the
/// dir has joined already.
async fn join_cluster(
    data_dir: &std::path::Path,
    code: &str,
    etcd: &coordinator::etcd_store::EtcdOptions,
) -> anyhow::Result<()> {
    use coordinator::coordinator_join::{join, Joined};
    let joined = tokio::task::LocalSet::new()
        .run_until(join(data_dir, code, etcd))
        .await
        .context("joining the cluster")?;
    match joined {
        Joined::AlreadyJoined => eprintln!(
            "note: data dir {} has joined its cluster already; --join is ignored",
            data_dir.display()
        ),
        Joined::Joined { cluster_name } => eprintln!(
            "joined cluster {cluster_name:?} as one more coordinator (data dir {})",
            data_dir.display()
        ),
    }
    Ok(())
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Its threads may block in place on store calls.
        .on_thread_start(coordinator::blocking::mark_runtime_thread)
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args, started))
}

async fn serve(args: ServerArgs, started: Instant) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let (data_dir, _temp) = match (&args.data_dir, args.dev) {
        (Some(d), _) => (d.clone(), None),
        (None, true) => {
            let t = tempfile::Builder::new()
                .prefix("miren-dev-")
                .tempdir()
                .context("creating a temporary data dir")?;
            (t.path().to_path_buf(), Some(t))
        }
        (None, false) => (PathBuf::from("/var/lib/miren"), None),
    };
    let listen = args.listen.unwrap_or_else(|| {
        if args.dev {
            SocketAddr::from(([127, 0, 0, 1], 8443))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 8443))
        }
    });
    let cluster_name = args
        .cluster_name
        .clone()
        .or_else(|| args.dev.then(|| "dev".to_string()));
    let store = store_backend(&args)?;
    if let (Some(code), coordinator::server::StoreBackend::Etcd(etcd)) = (&args.join, &store) {
        join_cluster(&data_dir, code, etcd).await?;
    }
    let mut coordinator = Coordinator::start(CoordinatorOptions {
        build: crate::build_info(),
        data_dir: data_dir.clone(),
        listen,
        names: args.names.clone(),
        cluster_name,
        issuer_url: args.issuer_url.clone(),
        jwks_max_age: args.jwks_max_age,
        signing_key_rotation: args.signing_key_rotation,
        https_listen: args.https_listen,
        https_cert: args.https_cert.clone(),
        https_key: args.https_key.clone(),
        runner_cert_validity: args.runner_cert_validity,
        server_cert_lifetime: args.server_cert_lifetime,
        oidc_allow_loopback_issuers: args.oidc_allow_loopback_issuers,
        outbound_allow: args.outbound_allow.clone(),
        oidc_ca_file: args.oidc_ca_file.clone(),
        labs: coordinator::labs::Labs::parse(args.labs.iter().map(String::as_str))?,
        ingress_https_listen: args.ingress_https_listen,
        front_door: coordinator::frontdoor::FrontDoorOptions {
            caps: coordinator::frontdoor::ConnectionCaps {
                per_source: args.max_connections_per_address as usize,
                ..Default::default()
            },
            join_burst: args.join_burst,
            join_interval: args.join_interval,
        },
        http_listen: args
            .http_listen
            .or_else(|| args.dev.then(|| SocketAddr::from(([127, 0, 0, 1], 0)))),
        http_limits: coordinator::accept::ListenerLimits {
            handshake_timeout: args.http_handshake_timeout,
            header_timeout: args.http_header_timeout,
            idle_timeout: args.http_idle_timeout,
            max_connections: args.http_max_connections,
            max_connections_per_source: args.http_max_connections_per_ip,
        },
        ingress_streams_per_app: args.ingress_streams_per_app,
        metrics_listen: args
            .metrics_listen
            .or_else(|| args.dev.then(|| SocketAddr::from(([127, 0, 0, 1], 0)))),
        observe: !args.no_observe,
        reconcile: coordinator::reconcile::Settings {
            timing: coordinator::converge::Timing {
                rollout_timeout_secs: args.rollout_timeout.as_secs().max(1) as i64,
                drain_secs: coordinator::apps::DRAIN.as_secs() as i64,
            },
            runner_grace: args.runner_grace,
        },
        store,
    })?;
    let address = coordinator.address().clone();
    let name = coordinator.cluster_name().to_string();

    let path = config_path()?;
    let mut cfg = ClientConfig::load(&path)?;
    let fingerprint = address.fingerprint.map(|f| format!("sha1:{f}"));
    let admin = coordinator.admin_identity();
    // An admin identity renewed with `miren cluster admin-renew` for this
    // same cluster stays (the data dir's one would quietly replace it).
    let (client_cert, client_key) = match cfg.clusters.get(&name) {
        Some(e) if keeps_renewed_identity(e, &fingerprint, admin, coordinator.ca_pem()) => {
            (e.client_cert.clone(), e.client_key.clone())
        }
        _ => (Some(admin.cert_pem.clone()), Some(admin.key_pem.clone())),
    };
    cfg.clusters.insert(
        name.clone(),
        ClusterEntry {
            hostname: address.host_port(),
            fingerprint,
            client_cert,
            client_key,
        },
    );
    if args.dev || cfg.active_cluster.is_none() {
        cfg.active_cluster = Some(name.clone());
    }
    cfg.save(&path)?;

    println!(
        "miren coordinator ready in {} ms",
        started.elapsed().as_millis()
    );
    println!("Cluster name: {name}");
    println!("Cluster address: {address}");
    println!("Issuer URL: {}", coordinator.issuer_url());
    println!("HTTPS (discovery, JWKS): {}", coordinator.https_addr()?);
    match coordinator.http_addr() {
        Some(a) => {
            println!("HTTP ingress: http://{a} (route hosts with `miren route set HOST -a APP`)")
        }
        None => println!("HTTP ingress: off (--http-listen ADDR to serve apps)"),
    }
    if let Some(a) = coordinator.ingress_https_addr() {
        println!("HTTPS ingress: https://{a}");
    }
    match coordinator.metrics_addr() {
        Some(a) => println!("Metrics: http://{a}/metrics (also /healthz, /readyz)"),
        None => println!("Metrics: off (--metrics-listen ADDR)"),
    }
    println!("Data dir: {}", data_dir.display());
    println!(
        "Client config: {} (cluster {name:?} with the admin identity{})",
        path.display(),
        if cfg.active_cluster.as_deref() == Some(name.as_str()) {
            ", active"
        } else {
            ""
        }
    );
    println!();
    println!("Next, in another terminal:");
    println!("  miren cluster status");
    println!(
        "  export MIREN_CLUSTER='{address}'   # pins this cluster for CI jobs and other machines"
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // One shutdown: SIGTERM/SIGINT cancels the coordinator's token, which
    // also stops --dev's runner.
    let stop = coordinator.shutdown_token();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    // --dev: one runner in this process, joined through the same code path
    // as any other runner (a join code, a CSR, mTLS afterwards).
    let runner_metrics = runner::metrics::Metrics::new(!args.no_observe);
    if args.dev {
        // One metrics listener for both: the runner's series and readiness
        // next to the coordinator's.
        coordinator.serve_metrics_with(
            vec![runner_metrics.registry()],
            vec![runner_metrics.readiness()],
        );
    }
    let dev_runner = if args.dev {
        let runner_dir = data_dir.join("runner");
        let join = if runner_dir.join("runner.json").exists() {
            None
        } else {
            Some(coordinator.create_join_token(300, "dev")?)
        };
        let opts = runner::RunnerOptions {
            build: crate::build_info(),
            data_dir: runner_dir,
            join,
            name: "dev".into(),
            labels: vec![],
            isolation: args.isolation,
            token_file_ttl: 3600,
            sandbox_limits: runner::limits::Limits::default(),
            token_misses: Default::default(),
            metrics: runner_metrics,
        };
        let stopped = stop.cancelled_owned();
        Some(std::thread::spawn(move || {
            if let Err(e) =
                crate::connect::run_local(async { Ok(runner::run(opts, stopped).await?) })
            {
                eprintln!(
                    "error: dev runner: {}",
                    crate::output::terminal_safe_lines(
                        &transport::report::Chain(e.as_ref()).to_string()
                    )
                );
            }
        }))
    } else {
        None
    };

    coordinator.serve().await?;
    if let Some(handle) = dev_runner {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    eprintln!("miren coordinator stopped");
    Ok(())
}

/// Whether `entry` holds an admin identity of this cluster, other than the
/// data dir's, that the coordinator accepts now (signed by its CA, valid,
/// `admin-` name): one the operator renewed, which a restart must not
/// replace with the data dir's one. Anything else (another cluster under
/// this name, no identity, an expired or foreign one) is replaced.
fn keeps_renewed_identity(
    entry: &ClusterEntry,
    fingerprint: &Option<String>,
    data_dir_admin: &transport::pki::CertifiedPem,
    ca_pem: &str,
) -> bool {
    let same_cluster = match (entry.address(), fingerprint) {
        (Ok(a), Some(fp)) => a
            .fingerprint
            .is_some_and(|have| fp.eq_ignore_ascii_case(&format!("sha1:{have}"))),
        _ => false,
    };
    let Some((cert, _key)) = entry.identity() else {
        return false;
    };
    if !same_cluster || cert == data_dir_admin.cert_pem {
        return false;
    }
    let (Ok(ca), Ok(leaf)) = (
        transport::pki::cert_der_from_pem(ca_pem),
        transport::pki::cert_der_from_pem(&cert),
    ) else {
        return false;
    };
    transport::tls::verify_client_certificate(&ca, &leaf).is_ok()
        && matches!(
            transport::PeerIdentity::from_chain(Some(&[leaf])),
            transport::PeerIdentity::Admin { .. }
        )
}

/// SIGINT or SIGTERM. The handlers are installed when this is called (inside
/// a runtime), so a signal that arrives before the future is polled is not
/// lost and does not kill the process.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::pki::ClusterCa;

    fn cluster() -> (ClusterCa, String, String) {
        let pem = ClusterCa::generate("t").expect("CA");
        let ca = ClusterCa::load(&pem.cert_pem, &pem.key_pem).expect("load");
        let fp = format!("sha1:{}", ca.fingerprint());
        (ca, pem.cert_pem, fp)
    }

    fn entry(fp: &str, id: &transport::pki::CertifiedPem) -> ClusterEntry {
        ClusterEntry {
            hostname: "127.0.0.1:8443".into(),
            fingerprint: Some(fp.into()),
            client_cert: Some(id.cert_pem.clone()),
            client_key: Some(id.key_pem.clone()),
        }
    }

    #[test]
    fn a_renewed_admin_identity_survives_a_restart_and_nothing_else_does() {
        let (ca, ca_pem, fp) = cluster();
        let data_dir_admin = ca
            .issue_client("admin-operator", time::Duration::days(10))
            .expect("admin");
        let renewed = ca
            .issue_client("admin-operator", time::Duration::days(1))
            .expect("renewed");
        let fp = Some(fp);
        assert!(keeps_renewed_identity(
            &entry(fp.as_deref().unwrap_or_default(), &renewed),
            &fp,
            &data_dir_admin,
            &ca_pem
        ));
        // The data dir's own, a runner's, another cluster's: replaced.
        let runner = ca
            .issue_client("runner-x", time::Duration::days(1))
            .expect("runner");
        let (other, _, other_fp) = cluster();
        let foreign = other
            .issue_client("admin-operator", time::Duration::days(1))
            .expect("foreign");
        let e = |id: &transport::pki::CertifiedPem| entry(fp.as_deref().unwrap_or_default(), id);
        assert!(!keeps_renewed_identity(
            &e(&data_dir_admin),
            &fp,
            &data_dir_admin,
            &ca_pem
        ));
        assert!(!keeps_renewed_identity(
            &e(&runner),
            &fp,
            &data_dir_admin,
            &ca_pem
        ));
        assert!(!keeps_renewed_identity(
            &e(&foreign),
            &fp,
            &data_dir_admin,
            &ca_pem
        ));
        assert!(!keeps_renewed_identity(
            &entry(&other_fp, &renewed),
            &fp,
            &data_dir_admin,
            &ca_pem
        ));
        let mut bare = e(&renewed);
        bare.client_key = None;
        assert!(!keeps_renewed_identity(
            &bare,
            &fp,
            &data_dir_admin,
            &ca_pem
        ));
    }
}
