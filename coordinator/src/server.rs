//! Starting and running a coordinator: data dir, listeners, RPC workers,
//! background key rotation, server certificate renewal, and the one
//! shutdown ([`crate::shutdown`]): [`Coordinator::shutdown_token`] is the
//! signal, [`Coordinator::serve`] holds the order.
//!
//! The server certificate is held in one [`ServerCertSlot`] that the QUIC
//! endpoint and the HTTPS listeners (unless `--https-cert` replaces it
//! there) consult on every handshake, so the renewal task swaps it under
//! running connections: they keep the certificate they were opened with,
//! new handshakes get the new one.
//!
//! capnp-rpc is not `Send`, so each connection's RPC session runs pinned to
//! one of a small pool of single-threaded workers (one per core); the accept
//! loop and everything `Send` runs on the multi-threaded runtime.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use identity::address::split_host_optional_port;
use identity::renewal::{self, Renewal};
use identity::{ClusterAddress, IssuerUrl};
use transport::pki::{self, CertifiedPem, ClusterCa};
use transport::rpc::{serve_connection, Limits, LocalPool, RpcLimits};
use transport::tls::ServerCertSlot;
use transport::PeerIdentity;

use crate::datadir::{self, now_unix, ServerCertChange, ServerCertPolicy};
use crate::issuer::{Issuer, SharedRing};
use crate::keyring::KeyRing;
use crate::labs::Labs;
use crate::runners::Registry;
use crate::service::ClusterService;
use crate::shutdown::{Tasks, SHUTDOWN_BOUND};
use crate::state::{ClusterIdentity, State};
use crate::store::{RedbStore, Store};

/// How a coordinator is started.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// What this binary is, as `cluster status` reports it.
    pub build: transport::build_info::BuildInfo,
    pub data_dir: PathBuf,
    /// UDP (QUIC) listen address.
    pub listen: SocketAddr,
    /// Names clients use, `HOST[:PORT]`; the first one is the cluster
    /// address. Without a port, the listen port is meant.
    pub names: Vec<String>,
    /// Cluster name on first start; defaults to the first name's host.
    pub cluster_name: Option<String>,
    /// Issuer URL; defaults to `https://<first name>`.
    pub issuer_url: Option<String>,
    /// JWKS cache lifetime announced to verifiers.
    pub jwks_max_age: Duration,
    /// Age at which the active signing key is replaced.
    pub signing_key_rotation: Duration,
    /// TCP address of the HTTPS listener; default: the QUIC listen IP and
    /// the port actually bound.
    pub https_listen: Option<SocketAddr>,
    /// Operator-provided HTTPS certificate chain and key (PEM files);
    /// default: the server certificate of the cluster CA. The operator
    /// renews these; the coordinator reads them once, at start.
    pub https_cert: Option<PathBuf>,
    pub https_key: Option<PathBuf>,
    /// Lifetime of the server certificates the coordinator issues itself
    /// (renewed with a third left; checked every thirtieth, 1 s..1 h).
    pub server_cert_lifetime: Duration,
    /// Lifetime of runner certificates (renewed at half-life).
    pub runner_cert_validity: Duration,
    /// TCP address of the HTTP ingress, if any.
    pub http_listen: Option<SocketAddr>,
    /// TCP address of the ingress over HTTPS (the HTTPS listener's
    /// certificate), if any.
    pub ingress_https_listen: Option<SocketAddr>,
    /// Let CI issuers and route OIDC providers be on loopback addresses
    /// (literal, `localhost`, or a name resolving there).
    pub oidc_allow_loopback_issuers: bool,
    /// Non-public ranges CI issuers and route OIDC providers may be on.
    pub outbound_allow: Vec<identity::IpCidr>,
    /// Extra CA certificates (PEM) trusted for OIDC issuers.
    pub oidc_ca_file: Option<PathBuf>,
    /// Labs features to turn on (`--labs`, see [`Labs::parse`]).
    pub labs: Labs,
    /// Connection caps and the join rate per address.
    pub front_door: crate::frontdoor::FrontDoorOptions,
    /// Timeouts and connection caps of each TCP listener (HTTPS and both
    /// ingresses).
    pub http_limits: crate::accept::ListenerLimits,
    /// Requests one app may have in flight on one runner through the
    /// ingress (see [`crate::runner_streams`]).
    pub ingress_streams_per_app: usize,
    /// TCP address of the plain-HTTP metrics listener (`/metrics`,
    /// `/healthz`, `/readyz`), if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Count metrics and write the audit trail (off only to measure what
    /// they cost).
    pub observe: bool,
    /// The reconcile loop's knobs (`--runner-grace`, `--rollout-timeout`).
    pub reconcile: crate::reconcile::Settings,
    /// Where the cluster's records live.
    pub store: StoreBackend,
}

/// The store the coordinator runs on.
#[derive(Debug, Clone, Default)]
pub enum StoreBackend {
    /// `store.redb` in the data dir: one machine.
    #[default]
    Embedded,
    /// etcd v3 (`--etcd`): the state several coordinators share.
    Etcd(crate::etcd_store::EtcdOptions),
}

impl StoreBackend {
    /// Connects to etcd for a coordinator whose data dir is `dir`. A data
    /// dir not initialised yet would make a new cluster: refused when the
    /// prefix holds one already (that is a coordinator meant to join it).
    fn connect_etcd(
        opts: &crate::etcd_store::EtcdOptions,
        dir: &Path,
    ) -> anyhow::Result<Arc<dyn Store>> {
        let store = crate::etcd_store::EtcdStore::connect(opts)
            .with_context(|| format!("connecting to etcd at {}", opts.endpoints.join(",")))?;
        if !datadir::is_initialised(dir)? {
            if let Some(owner) = store.get(crate::etcd_store::OWNER_KEY)? {
                anyhow::bail!(
                    "the etcd prefix {:?} holds the cluster whose CA is {}, and data dir {} is new: to add this coordinator to that cluster, start it with --join CODE (`miren cluster coordinator-code` on a running coordinator); a new cluster needs its own --etcd-prefix",
                    opts.prefix,
                    String::from_utf8_lossy(&owner),
                    dir.display()
                );
            }
        }
        tracing::info!(
            endpoints = %opts.endpoints.join(","),
            prefix = %opts.prefix,
            "store: etcd"
        );
        Ok(Arc::new(store))
    }
}

/// What a coordinator on a shared store keeps of its sealed records.
struct SharedParts {
    secrets: Arc<crate::cluster_secrets::ClusterSecrets>,
    /// The revision of the key ring's record read at start.
    ring_revision: crate::store::Revision,
    cookie_key: [u8; 32],
}

/// Open files the coordinator needs besides its HTTP connections (store,
/// artifacts, QUIC, logs), when it sizes its open files limit.
const OTHER_OPEN_FILES: usize = 1024;

/// A coordinator that has opened its data dir and bound its listener.
pub struct Coordinator {
    state: Arc<State>,
    /// What readiness looks at.
    probes: Arc<crate::health::Probes>,
    endpoint: quinn::Endpoint,
    /// Runs the endpoint's drivers and the ingress ([`crate::net_thread`]).
    net: crate::net_thread::NetThread,
    address: ClusterAddress,
    admin: CertifiedPem,
    ca_pem: String,
    rotation: Duration,
    https: tokio::net::TcpListener,
    https_tls: rustls::ServerConfig,
    http: Option<tokio::net::TcpListener>,
    ingress_https: Option<tokio::net::TcpListener>,
    http_limits: crate::accept::ListenerLimits,
    ingress_streams_per_app: usize,
    metrics: Option<tokio::net::TcpListener>,
    registry: Arc<prometheus_client::registry::Registry>,
    server_cert: ServerCert,
    /// Stands for leader once serving (taken by `serve`), with the lease
    /// it already leads on.
    elector: Option<(crate::leader::Elector, Option<crate::store::LeaseId>)>,
    /// Keeps this coordinator listed once serving (taken by `serve`).
    presence: Option<(crate::coordinators::Presence, Option<crate::store::LeaseId>)>,
    /// The revision the coordinator index was loaded at.
    coordinators_from: crate::store::Revision,
    /// The revision the shared key ring was read at (`--etcd`).
    ring_from: Option<crate::store::Revision>,
    /// The revision the sandbox index was loaded at.
    sandboxes_from: crate::store::Revision,
    leadership: crate::leader::Leadership,
}

/// The server certificate being served, and how to renew it.
struct ServerCert {
    dir: PathBuf,
    policy: ServerCertPolicy,
    slot: Arc<ServerCertSlot>,
    current: CertifiedPem,
}

/// `[leaf, CA]` and the leaf's key, as the TLS configurations want them.
fn server_chain(
    pem: &CertifiedPem,
    ca: &ClusterCa,
) -> anyhow::Result<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
)> {
    Ok((
        vec![
            pki::cert_der_from_pem(&pem.cert_pem)?,
            ca.cert_der().clone(),
        ],
        pki::key_der_from_pem(&pem.key_pem)?,
    ))
}

/// Says what opening the data dir did to the server certificate.
fn log_server_cert_change(change: ServerCertChange, pem: &CertifiedPem) {
    let expires = pki::not_after_unix(&pem.cert_pem).unwrap_or_default();
    match change {
        ServerCertChange::Kept => {
            tracing::debug!(expires_unix = expires, "server certificate kept")
        }
        ServerCertChange::Issued => {
            tracing::info!(expires_unix = expires, "server certificate issued")
        }
        ServerCertChange::Repaired => tracing::warn!(
            expires_unix = expires,
            "server.key did not match server.crt (a renewal was interrupted): issued a new server certificate with the same CA"
        ),
        ServerCertChange::Renewed {
            old_not_after,
            expired,
        } => tracing::info!(
            old_expires_unix = old_not_after,
            expired,
            expires_unix = expires,
            "server certificate renewed with the same CA"
        ),
        ServerCertChange::KeptCaEnds { ca_not_after } => tracing::warn!(
            expires_unix = expires,
            ca_expires_unix = ca_not_after,
            "the server certificate is due for renewal but the cluster CA ends first: a new certificate would not last longer (the CA must be replaced)"
        ),
    }
}

/// The data dir file keying QUIC stateless resets.
pub const QUIC_RESET_KEY: &str = "quic-reset.key";

/// Binds QUIC on `listen` and HTTPS on `https_listen`, by default on the
/// same IP and port over TCP. With an ephemeral port (`:0`) the port QUIC
/// gets may already be taken over TCP (by any process's outgoing
/// connection, say); then both are bound again on another port.
fn bind_quic_and_https(
    listen: SocketAddr,
    https_listen: Option<SocketAddr>,
    tls: rustls::ServerConfig,
    reset_secret: [u8; 32],
    drivers: &tokio::runtime::Handle,
) -> anyhow::Result<(quinn::Endpoint, tokio::net::TcpListener)> {
    let attempts = if listen.port() == 0 && https_listen.is_none() {
        16
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let endpoint =
            transport::server_endpoint(listen, tls.clone(), &reset_secret, drivers.clone())?;
        let quic_port = endpoint.local_addr()?.port();
        let https_addr = https_listen.unwrap_or_else(|| SocketAddr::new(listen.ip(), quic_port));
        match std::net::TcpListener::bind(https_addr) {
            Ok(l) => {
                l.set_nonblocking(true)?;
                return Ok((endpoint, tokio::net::TcpListener::from_std(l)?));
            }
            Err(e) => {
                endpoint.close(transport::close::CloseCode::Done.into(), b"");
                last = Some((https_addr, e));
            }
        }
    }
    let (addr, e) = last.ok_or_else(|| anyhow::anyhow!("no attempt to bind HTTPS"))?;
    Err(anyhow::anyhow!(
        "could not listen on TCP {addr} for HTTPS: {e} (use --https-listen to pick another address)"
    ))
}

impl Coordinator {
    /// Opens (or creates) the data dir and binds the listener. Must be
    /// called inside a tokio runtime.
    pub fn start(opts: CoordinatorOptions) -> anyhow::Result<Self> {
        let mut names = Vec::new();
        for n in &opts.names {
            names.push(split_host_optional_port(n).with_context(|| format!("--name {n:?}"))?);
        }
        if names.is_empty() {
            names.push((opts.listen.ip().to_string(), None));
        }
        let mut sans: Vec<String> = names.iter().map(|(h, _)| h.clone()).collect();
        for extra in ["localhost", "127.0.0.1", "::1"] {
            if !sans.iter().any(|s| s == extra) {
                sans.push(extra.to_string());
            }
        }
        sans.retain(|s| {
            s.parse::<IpAddr>()
                .map(|ip| !ip.is_unspecified())
                .unwrap_or(true)
        });
        let first_host = names[0].0.clone();
        let cluster_name = opts
            .cluster_name
            .clone()
            .unwrap_or_else(|| first_host.clone());

        let policy = ServerCertPolicy {
            names: sans,
            lifetime: time::Duration::try_from(opts.server_cert_lifetime)
                .context("--server-cert-lifetime")?,
        };
        let now = now_unix();
        // Without --etcd everything is in the data dir; with it the shared
        // secrets come from the store (`shared_cluster`).
        let (material, keys, store, shared) = match &opts.store {
            StoreBackend::Embedded => {
                let material = datadir::open_or_init(&opts.data_dir, &cluster_name, &policy, now)?;
                let keys = KeyRing::load(&material.dir.join("keys"), now)?;
                let store: Arc<dyn Store> =
                    Arc::new(RedbStore::open(&material.dir.join("store.redb"))?);
                (material, keys, store, None)
            }
            StoreBackend::Etcd(etcd) => {
                let dir = &opts.data_dir;
                let store = StoreBackend::connect_etcd(etcd, dir)?;
                datadir::init_if_new(dir, &cluster_name)?;
                let ca_der = pki::cert_der_from_pem(&datadir::read_ca_cert(dir)?)?;
                let fingerprint = identity::Fingerprint::of_der(&ca_der).to_string();
                // Claimed for this cluster's CA (or checked to be its).
                crate::etcd_store::claim(&*store, &fingerprint)?;
                let crate::shared_cluster::Shared {
                    secrets,
                    meta,
                    ca,
                    ring,
                    ring_revision,
                    cookie_key,
                } = crate::shared_cluster::open(dir, store.clone(), now)?;
                let material = datadir::load_with_ca(dir, meta, ca, &policy, now)?;
                let parts = SharedParts {
                    secrets,
                    ring_revision,
                    cookie_key,
                };
                (material, ring, store, Some(parts))
            }
        };
        log_server_cert_change(material.server_change, &material.server);
        let observe =
            crate::observe::start(&material.dir, opts.observe, opts.signing_key_rotation)?;
        let store: Arc<dyn Store> = crate::observe::metered_store(store, &observe);

        let ca_der = material.ca.cert_der().clone();
        let (chain, key) = server_chain(&material.server, &material.ca)?;
        let slot = ServerCertSlot::new(chain, key)?;
        let tls =
            transport::tls::server_config_with_slot(&ca_der, slot.clone(), &[transport::ALPN])?;
        // Stateless resets keyed the same across restarts: peers of the
        // previous process learn at once that their connection is gone.
        let reset_secret = transport::files::secret_32(
            &material.dir.join(QUIC_RESET_KEY),
            "delete it (peers then notice a coordinator restart only at their idle timeout)",
        )?;
        // QUIC and the ingress run on the network thread.
        let net = crate::net_thread::NetThread::start().context("starting the network thread")?;
        let (endpoint, https) = bind_quic_and_https(
            opts.listen,
            opts.https_listen,
            tls,
            reset_secret,
            net.handle(),
        )?;
        let bound = endpoint.local_addr()?;
        let port = names[0].1.unwrap_or(bound.port());
        let address = ClusterAddress {
            host: if first_host
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            {
                "127.0.0.1".to_string()
            } else {
                first_host
            },
            port,
            fingerprint: Some(material.ca.fingerprint()),
            alternates: Vec::new(),
        };
        let own_issuer = match &opts.issuer_url {
            Some(u) => u.clone(),
            None if port == 443 => format!("https://{}", address.host.to_ascii_lowercase()),
            None => format!("https://{}", address.host_port().to_ascii_lowercase()),
        };
        let parse_issuer = |text: &str| {
            IssuerUrl::parse(text).with_context(|| {
                format!("issuer URL {text:?} (set it with --issuer-url https://HOST[:PORT][/PATH])")
            })
        };
        // One issuer for the cluster: on a shared store, the cluster's (this
        // coordinator's own only when it is the first, or --issuer-url).
        let (issuer, issuers) = match &shared {
            None => {
                let issuer = parse_issuer(&own_issuer)?;
                let issuers = crate::issuer::record(&material.dir, issuer.as_str(), now)?;
                (issuer, issuers)
            }
            Some(SharedParts { secrets, .. }) => {
                let wanted = match &opts.issuer_url {
                    Some(u) => Some(parse_issuer(u)?.as_str().to_string()),
                    None => None,
                };
                let own = parse_issuer(&own_issuer)?;
                let issuers = crate::shared_cluster::record_issuer(
                    secrets,
                    wanted.as_deref(),
                    own.as_str(),
                    now,
                )?;
                (parse_issuer(&issuers.current)?, issuers)
            }
        };

        let bind_ingress = |addr: Option<SocketAddr>, what: &str, flag: &str| {
            addr.map(|addr| -> anyhow::Result<tokio::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr).map_err(|e| {
                    anyhow::anyhow!(
                        "could not listen on TCP {addr} for the {what} ingress: {e} (use {flag} to pick another address)"
                    )
                })?;
                l.set_nonblocking(true)?;
                Ok(tokio::net::TcpListener::from_std(l)?)
            })
            .transpose()
        };
        let http = bind_ingress(opts.http_listen, "HTTP", "--http-listen")?;
        let metrics = bind_ingress(opts.metrics_listen, "metrics", "--metrics-listen")?;
        let ingress_https =
            bind_ingress(opts.ingress_https_listen, "HTTPS", "--ingress-https-listen")?;
        let https_tls = match (&opts.https_cert, &opts.https_key) {
            (Some(cert), Some(key)) => operator_https_tls(cert, key)?,
            (None, None) => transport::tls::https_server_config_with_slot(slot.clone())?,
            _ => anyhow::bail!("--https-cert and --https-key go together"),
        };
        // A CI token must be for this cluster: `host:port`, and `host` alone
        // when on the default port.
        let mut audiences = vec![address.host_port()];
        if address.port == identity::address::DEFAULT_PORT {
            audiences.push(address.host.clone());
        }
        let oidc_roots = match &opts.oidc_ca_file {
            Some(path) => pki::certs_from_pem_file(path).context("--oidc-ca-file")?,
            None => vec![],
        };
        // What CI issuers and route OIDC providers may resolve to.
        let outbound = identity::AddressPolicy::new(
            opts.oidc_allow_loopback_issuers,
            opts.outbound_allow.clone(),
        );
        let rt = tokio::runtime::Handle::current();
        let tasks = Tasks::new(rt.clone());
        let issuer = Arc::new(Issuer {
            url: issuer,
            history: issuers,
            keys: RwLock::new(keys),
            jwks_max_age_secs: opts.jwks_max_age.as_secs() as i64,
            shared: shared
                .as_ref()
                .map(|p| SharedRing::new(p.secrets.clone(), p.ring_revision)),
        });
        let apps = Arc::new(
            crate::apps::Apps::new(store.clone(), &material.dir, tasks.clone())?
                .observed(observe.clone()),
        );
        if matches!(opts.store, StoreBackend::Etcd(_)) {
            apps.share_artifacts(store.clone());
        }
        // Sandbox placements in memory: the ingress and minting read them.
        let (sandboxes, sandboxes_from) = crate::sandbox_index::SandboxIndex::load(&*store)?;
        let sandboxes = Arc::new(sandboxes);
        let minting = Arc::new(crate::minting::Minting::new(
            issuer.clone(),
            apps.clone(),
            sandboxes.clone(),
            material.meta.id.clone(),
            observe.clone(),
            crate::signing_pool::SigningPool::per_core()?,
        ));
        let registry = Arc::new(Registry::new(store.clone(), opts.runner_cert_validity));
        let ci = Arc::new(
            crate::ci::CiBindings::load(store.clone(), outbound.clone())?.observed(observe.clone()),
        );
        let routes = Arc::new(crate::routes::Routes::open(store.clone())?);
        // One coordinator leads the singleton work; alone (or restarted on
        // its data dir) it leads from here on.
        let coordinator_id = crate::leader::coordinator_id(&material.dir)?;
        let (elector, leadership, lease) = crate::leader::Elector::new(
            store.clone(),
            coordinator_id.clone(),
            cluster_name.clone(),
            crate::leader::LEASE_TTL,
        );
        // Listed among the cluster's coordinators while it runs.
        let presence = crate::coordinators::Presence::start(
            store.clone(),
            crate::coordinators::CoordinatorRecord {
                id: coordinator_id.clone(),
                name: address.host.clone(),
                address: address.host_port(),
                version: opts.build.to_string(),
                started_unix: now_unix(),
            },
        );
        let reconciler = Arc::new(crate::reconcile::Reconciler::new(
            store.clone(),
            apps.clone(),
            registry.clone(),
            routes.clone(),
            ci.clone(),
            tasks.clone(),
            issuer.url.as_str().to_string(),
            opts.reconcile,
            leadership.clone(),
        ));
        // ... or the issuer URL, the audience OAuth clients name.
        let mut ci_audiences = audiences.clone();
        ci_audiences.push(issuer.url.as_str().to_string());
        let oidc = Arc::new(
            crate::oidc::OidcVerifier::new(ci_audiences, &oidc_roots, outbound)?
                .observed(observe.clone()),
        );
        let deploy_keys = Arc::new(crate::deploy_keys::DeployKeys::new(store.clone()));
        let spent = Arc::new(crate::spent_tokens::SpentTokens::load(
            store.clone(),
            transport::clock::now_unix(),
        )?);
        tasks.spawn(
            "spent CI token pruning",
            crate::spent_tokens::prune_forever(spent.clone(), tasks.clone()),
        );
        let oauth = Arc::new(crate::oauth::TokenEndpoint::new(
            issuer.clone(),
            oidc.clone(),
            ci.clone(),
            deploy_keys.clone(),
            spent,
            observe.clone(),
            rt.clone(),
            audiences,
        ));
        let (coordinator_index, coordinators_from) =
            crate::coordinators::CoordinatorIndex::load(&*store)?;
        let state = Arc::new(State {
            coordinators: Arc::new(coordinator_index),
            cluster: ClusterIdentity {
                meta: material.meta.clone(),
                address: address.clone(),
                ca: material.ca,
                build: opts.build.clone(),
                started: Instant::now(),
                coordinator_id,
                shared: shared.as_ref().map(|p| p.secrets.clone()),
            },
            issuer,
            minting,
            sandboxes,
            registry,
            apps,
            ci,
            reconciler,
            oidc,
            deploy_keys,
            oauth,
            routes,
            sso: Arc::new(
                match &shared {
                    None => crate::sso::Sso::load_or_create(&material.dir, store.clone())?,
                    Some(p) => crate::sso::Sso::with_key(
                        crate::sso::cookie::CookieKey::from_bytes(&p.cookie_key).map_err(|_| {
                            anyhow::anyhow!("the cluster's cookie key is not an AES-256 key")
                        })?,
                        store.clone(),
                    )?,
                }
                .observed(observe.clone()),
            ),
            labs: opts.labs.clone(),
            door: Arc::new(crate::frontdoor::FrontDoor::new(opts.front_door)),
            store,
            observe,
            tasks,
            rt,
        });
        let probes = Arc::new(crate::health::Probes {
            store: state.store.clone(),
            issuer: state.issuer.clone(),
            observe: state.observe.clone(),
        });
        let collector = crate::scrape::StateCollector {
            registry: Arc::downgrade(&state.registry),
            apps: Arc::downgrade(&state.apps),
            issuer: Arc::downgrade(&state.issuer),
            observe: Arc::downgrade(&state.observe),
        };
        let registry = crate::scrape::registry(
            &state.observe,
            collector,
            &material.server.cert_pem,
            opts.https_cert.as_deref(),
        )?;
        let ca_pem = state.cluster.ca.cert_pem().to_string();
        let server_cert = ServerCert {
            dir: material.dir.clone(),
            policy,
            slot,
            current: material.server,
        };
        // Every connection a TCP listener holds is a file descriptor.
        let listeners = 1 + usize::from(http.is_some()) + usize::from(ingress_https.is_some());
        let wanted = (listeners * opts.http_limits.max_connections + OTHER_OPEN_FILES) as u64;
        match crate::accept::raise_open_files_limit(wanted) {
            Ok(limit) if limit < wanted => tracing::warn!(
                "the open files limit is {limit}, below the {wanted} the HTTP listeners' connection caps need; raise it (LimitNOFILE=, ulimit -n) or lower --http-max-connections"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("could not read or raise the open files limit: {e}"),
        }
        Ok(Coordinator {
            state,
            probes,
            ca_pem,
            endpoint,
            net,
            address,
            admin: material.admin,
            rotation: opts.signing_key_rotation,
            https,
            https_tls,
            http,
            ingress_https,
            server_cert,
            http_limits: opts.http_limits,
            ingress_streams_per_app: opts.ingress_streams_per_app,
            metrics,
            registry,
            elector: Some((elector, lease)),
            presence: Some(presence),
            coordinators_from,
            ring_from: shared.as_ref().map(|p| p.ring_revision),
            sandboxes_from,
            leadership,
        })
    }

    /// The TCP address of the metrics listener, if it listens.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This coordinator's readiness checks.
    pub fn readiness(&self) -> transport::ops::Readiness {
        crate::health::readiness(&self.probes)
    }

    /// The shutdown signal: cancelling it stops the coordinator (and
    /// whatever the caller ties to it, such as `--dev`'s runner).
    pub fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.state.tasks.token()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` of these registries and
    /// checks on the metrics listener (`--dev` adds its runner's); without
    /// `--metrics-listen`, nothing.
    pub fn serve_metrics_with(
        &mut self,
        mut registries: Vec<Arc<prometheus_client::registry::Registry>>,
        mut checks: Vec<transport::ops::Readiness>,
    ) {
        let Some(listener) = self.metrics.take() else {
            return;
        };
        registries.insert(0, self.registry.clone());
        checks.insert(0, self.readiness());
        let stopping = self.state.tasks.token().cancelled_owned();
        self.state.tasks.spawn(
            "metrics listener",
            transport::ops::serve(
                listener,
                transport::ops::router(registries, checks),
                stopping,
            ),
        );
    }

    /// `host:port;sha1:<fingerprint>` of this cluster.
    pub fn address(&self) -> &ClusterAddress {
        &self.address
    }

    /// The admin client certificate and key written into client configs.
    pub fn admin_identity(&self) -> &CertifiedPem {
        &self.admin
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Cluster name.
    pub fn cluster_name(&self) -> &str {
        &self.state.cluster.meta.name
    }

    /// Issuer URL of workload tokens.
    pub fn issuer_url(&self) -> &str {
        self.state.issuer.url.as_str()
    }

    /// The TCP address of the HTTP ingress, if it listens.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The TCP address of the HTTPS ingress, if it listens.
    pub fn ingress_https_addr(&self) -> Option<SocketAddr> {
        self.ingress_https
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The TCP address the HTTPS listener is bound to.
    pub fn https_addr(&self) -> std::io::Result<SocketAddr> {
        self.https.local_addr()
    }

    /// Creates a one-time join code (used by `--dev` for its own runner).
    pub fn create_join_token(&self, ttl_secs: u64, name: &str) -> anyhow::Result<String> {
        let (token, _) = self.state.registry.create_token(
            &self.state.address_with_peers(),
            ttl_secs,
            false,
            name,
            vec![],
            now_unix(),
        )?;
        Ok(token)
    }

    /// The UDP address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until [`Coordinator::shutdown_token`] is cancelled, then
    /// shuts down as [`crate::shutdown`] says: listeners, rollouts, QUIC
    /// connections, every task, [`SHUTDOWN_BOUND`] in all.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let pool = LocalPool::new(workers);
        let tasks = self.state.tasks.clone();
        let state = &self.state;
        if let Some((elector, lease)) = self.elector.take() {
            tasks.spawn("leader election", elector.run(lease, tasks.clone()));
        }
        if let Some((presence, lease)) = self.presence.take() {
            tasks.spawn("coordinator presence", presence.run(lease, tasks.clone()));
        }
        tasks.spawn(
            "key rotation",
            crate::issuer::rotate_keys_forever(
                state.issuer.clone(),
                self.rotation,
                self.leadership.clone(),
                tasks.clone(),
            ),
        );
        tasks.spawn(
            "key audit",
            crate::issuer::watch_keys_forever(
                state.issuer.clone(),
                state.observe.clone(),
                tasks.clone(),
            ),
        );
        // Runner records in memory (a removal anywhere cuts the runner off
        // here), and deploys through any coordinator wake the loop.
        state.registry.follow(&tasks)?;
        state.reconciler.wake_on_desired_state(&tasks)?;
        // The reconcile loop ends its shutdown with the rollouts: it records
        // what was interrupted while runner connections are still open.
        tasks.spawn(crate::shutdown::ROLLOUT, state.reconciler.clone().run());
        // Unless `--dev` already started it with its runner's metrics.
        self.serve_metrics_with(vec![], vec![]);
        let state = &self.state;
        tasks.spawn(
            "certificate renewal",
            renew_server_cert_forever(state.clone(), self.server_cert, tasks.clone()),
        );
        let ingress_tls = self.https_tls.clone();
        let router = crate::https::router(state.issuer.clone(), state.oauth.clone());
        tasks.spawn(
            "HTTPS listener",
            crate::https::serve(
                self.https,
                self.https_tls,
                crate::health::with_health(router, &self.probes),
                self.http_limits,
                tasks.clone(),
            ),
        );
        let ingresses = [(self.http, None), (self.ingress_https, Some(ingress_tls))];
        // One count of streams to runners for both ingress listeners.
        let ingress_limits =
            crate::ingress::IngressLimits::new(self.http_limits, self.ingress_streams_per_app);
        let index = state.sandboxes.clone();
        index.follow(state.store.clone(), self.sandboxes_from, &tasks);
        state.routes.follow(&tasks);
        state.ci.follow(&tasks);
        state.sso.follow(&tasks);
        crate::watched::follow(
            state.coordinators.clone(),
            state.store.clone(),
            self.coordinators_from,
            &tasks,
        );
        // On a shared store every coordinator publishes the ring the store
        // holds, whoever rotated it.
        if let Some(from) = self.ring_from {
            crate::watched::follow(
                Arc::new(crate::issuer::RingFollower(state.issuer.clone())),
                state.store.clone(),
                from,
                &tasks,
            );
        }
        let ingress = Arc::new(crate::ingress::Ingress {
            routes: state.routes.clone(),
            apps: state.apps.clone(),
            index,
            registry: state.registry.clone(),
            sso: state.sso.clone(),
            oidc: state.oidc.clone(),
            labs: state.labs.clone(),
            observe: state.observe.clone(),
            tasks: tasks.clone(),
            gate_runtime: tokio::runtime::Handle::current(),
        });
        // The ingress runs on the network thread, with the QUIC drivers of
        // the runner connections it sends requests over.
        for (listener, tls) in ingresses {
            let Some(listener) = listener else { continue };
            let listener = listener.into_std()?;
            let serving =
                crate::ingress::serve(listener, tls, ingress.clone(), ingress_limits.clone());
            self.net
                .handle()
                .spawn(tasks.track("ingress listener", serving));
        }
        state.observe.set_listening(true);
        loop {
            tokio::select! {
                _ = tasks.stopping() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Some(ticket) = admit(&state.door, incoming) else { continue };
                    let peer = serve_peer(state.clone(), pool.clone(), ticket);
                    tasks.spawn("peer connection", peer);
                }
            }
        }
        // The endpoint may also have closed by itself: stop everything else.
        state.observe.set_listening(false);
        let started = tokio::time::Instant::now();
        let endpoint = self.endpoint.clone();
        let left = tasks
            .shut_down(move || {
                endpoint.close(
                    transport::close::CloseCode::Done.into(),
                    b"coordinator shutting down",
                )
            })
            .await;
        if left.is_empty() {
            tracing::info!("shutdown: every task ended");
        }
        let deadline = started + SHUTDOWN_BOUND;
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ =
            tokio::time::timeout(rest.min(Duration::from_secs(2)), self.endpoint.wait_idle()).await;
        Ok(())
    }
}

/// Decides on a connection attempt before any TLS work: refused or asked
/// to validate its address (QUIC Retry) over the front door's caps,
/// otherwise accepted and counted by the returned ticket.
fn admit(
    door: &Arc<crate::frontdoor::FrontDoor>,
    incoming: quinn::Incoming,
) -> Option<(quinn::Incoming, crate::frontdoor::Ticket)> {
    use crate::frontdoor::Admit;
    let remote = incoming.remote_address();
    match door.admit(remote.ip(), incoming.remote_address_validated()) {
        (Admit::Accept, Some(ticket)) => Some((incoming, ticket)),
        (Admit::Retry, _) => {
            if incoming.retry().is_err() {
                tracing::debug!(%remote, "connection attempt dropped: retry not possible");
            }
            None
        }
        (Admit::Refuse(why), _) => {
            tracing::debug!(%remote, "connection refused: {why}");
            incoming.refuse();
            None
        }
        (Admit::Accept, None) => {
            incoming.refuse();
            None
        }
    }
}

/// One peer from handshake to close: its role from its certificate, its
/// RPC session on a pinned worker, bounded as an unproven peer until it
/// proves a role, and closed if it has not within
/// [`crate::frontdoor::UNPROVEN_LIFETIME`].
async fn serve_peer(
    state: Arc<State>,
    pool: LocalPool,
    (incoming, mut ticket): (quinn::Incoming, crate::frontdoor::Ticket),
) {
    use crate::frontdoor::{Proof, HANDSHAKE_TIMEOUT, UNPROVEN_LIFETIME};
    use transport::close::{close, CloseCode};
    // The address the front door admitted and counts. What the peer says
    // later from another address (QUIC lets a client move) changes nothing
    // that is decided per address.
    let remote = incoming.remote_address();
    // Every packet restarts QUIC's idle timer: a peer that never finishes
    // its handshake but keeps sending would hold its place for ever.
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!("handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake not finished within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let peer = PeerIdentity::of_connection(&conn);
    tracing::debug!(remote = %conn.remote_address(), ?peer, "connection");
    if let PeerIdentity::Runner { id } = &peer {
        // A removed runner's certificate is still signed by the CA; no
        // record behind it means it is cut off.
        match state.registry.record(id) {
            Ok(Some(_)) => {}
            Ok(None) => {
                transport::close::close_runner_removed(&conn);
                return;
            }
            // Not known here and the store cannot say: not a removal (the
            // runner would stop for good); it tries again.
            Err(e) => {
                tracing::info!("runner {id}: {e}");
                close(
                    &conn,
                    CloseCode::Done,
                    b"runner record unavailable; try again",
                );
                return;
            }
        }
    }
    let has_role = matches!(
        peer,
        PeerIdentity::Admin { .. } | PeerIdentity::Runner { .. }
    );
    // Without a certificate, it takes an unproven slot now, if one is free.
    if let Err(why) = ticket.handshaken(has_role) {
        tracing::debug!(remote = %conn.remote_address(), "connection closed: {why}");
        close(&conn, CloseCode::Limit, why.to_string().as_bytes());
        return;
    }
    let tasks = state.tasks.clone();
    // The session runs on a pinned worker; this task (tracked) waits for
    // it, so a shutdown waits for the session too. The endpoint's close at
    // shutdown ends it.
    let session = pool.spawn_pinned(move || async move {
        let limits = Limits::new(RpcLimits::UNPROVEN);
        let proof = Proof::new(limits.clone(), conn.clone(), Some(ticket));
        if has_role {
            proof.prove_certificate();
        }
        let client = ClusterService::client(state, peer, conn.clone(), remote, proof.clone());
        let deadline = async {
            tokio::time::sleep(UNPROVEN_LIFETIME).await;
            if proof.is_proven() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            ended = serve_connection(conn.clone(), client.client, &limits) => {
                if let Err(e) = ended {
                    tracing::debug!("rpc session ended: {e}");
                }
            }
            _ = deadline => {
                tracing::debug!(remote = %conn.remote_address(), "closing a connection that proved no role");
                close(
                    &conn,
                    CloseCode::Limit,
                    format!(
                        "no role proven within {}s",
                        UNPROVEN_LIFETIME.as_secs()
                    )
                    .as_bytes(),
                );
            }
        }
        // The RPC stream was the connection's only use. Give the peer a
        // moment to read our last words (an abort naming the limit it hit)
        // and hang up itself, then close.
        let _ = tokio::time::timeout(crate::frontdoor::LINGER, conn.closed()).await;
        close(&conn, CloseCode::Done, b"");
    });
    if let Err(e) = tasks.track("rpc session", session).await {
        tracing::debug!("rpc session task ended: {e}");
    }
}

fn operator_https_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = pki::certs_from_pem_file(cert).context("--https-cert")?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--https-key {}: {e}", key.display()))?;
    Ok(transport::tls::https_server_config(chain, key)?)
}

/// Checks the server certificate every thirtieth of its lifetime (1 s..1 h)
/// and, when [`renewal::server_certificate`] says so, issues a new one with
/// the same CA, writes it (key first) and puts it in the slot: new
/// handshakes present it, open connections are left alone. A failure is
/// logged and tried again at the next check. Ends when the coordinator
/// shuts down.
async fn renew_server_cert_forever(state: Arc<State>, cert: ServerCert, tasks: Tasks) {
    let ServerCert {
        dir,
        policy,
        slot,
        mut current,
    } = cert;
    let every = Duration::from_secs(renewal::check_every_secs(policy.lifetime.whole_seconds()));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said_ca_ends = false;
    let ca = &state.cluster.ca;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tasks.stopping() => return,
        }
        let now = now_unix();
        let expired = match datadir::server_renewal(&current.cert_pem, ca, &policy, now) {
            Ok(Renewal::Keep { .. }) => continue,
            Ok(Renewal::LimitedByCa { ca_not_after }) => {
                if !said_ca_ends {
                    said_ca_ends = true;
                    tracing::warn!(
                        ca_expires_unix = ca_not_after,
                        "the server certificate is due for renewal but the cluster CA ends first: a new certificate would not last longer (the CA must be replaced)"
                    );
                }
                continue;
            }
            Ok(Renewal::Renew { expired, .. }) => expired,
            Err(e) => {
                tracing::error!(
                    "server certificate renewal: cannot read the current certificate: {e}"
                );
                continue;
            }
        };
        let issued = {
            let state = state.clone();
            let dir = dir.clone();
            let policy = policy.clone();
            tokio::task::spawn_blocking(move || {
                datadir::renew_server_certificate(&dir, &state.cluster.ca, &policy)
            })
            .await
        };
        let pem = match issued {
            Ok(Ok(pem)) => pem,
            Ok(Err(e)) => {
                tracing::error!(
                    "server certificate renewal failed (tried again at the next check): {e}"
                );
                continue;
            }
            Err(e) => {
                tracing::error!("server certificate renewal task failed: {e}");
                continue;
            }
        };
        let installed =
            server_chain(&pem, ca).and_then(|(chain, key)| Ok(slot.replace(chain, key)?));
        match installed {
            Ok(()) => {
                let expires = pki::not_after_unix(&pem.cert_pem).unwrap_or_default();
                tracing::info!(
                    expired,
                    expires_unix = expires,
                    "server certificate renewed with the same CA; new handshakes present it"
                );
                state.observe.set_server_certificate(expires);
                current = pem;
            }
            Err(e) => tracing::error!("the renewed server certificate could not be served: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> rustls::ServerConfig {
        let ca = pki::ClusterCa::generate("t").expect("CA");
        let ca = pki::ClusterCa::load(&ca.cert_pem, &ca.key_pem).expect("load");
        let leaf = ca.issue_server(&["127.0.0.1".into()]).expect("leaf");
        transport::tls::server_config(
            ca.cert_der(),
            vec![pki::cert_der_from_pem(&leaf.cert_pem).expect("cert")],
            pki::key_der_from_pem(&leaf.key_pem).expect("key"),
            &[transport::ALPN],
        )
        .expect("tls")
    }

    #[tokio::test]
    async fn https_shares_the_quic_port_by_default() {
        let (endpoint, https) = bind_quic_and_https(
            "127.0.0.1:0".parse().unwrap(),
            None,
            tls(),
            [7; 32],
            &tokio::runtime::Handle::current(),
        )
        .expect("bind");
        assert_eq!(
            endpoint.local_addr().unwrap().port(),
            https.local_addr().unwrap().port()
        );
    }

    #[tokio::test]
    async fn a_taken_fixed_https_port_is_an_error_that_names_the_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let e = bind_quic_and_https(
            listen,
            None,
            tls(),
            [7; 32],
            &tokio::runtime::Handle::current(),
        )
        .expect_err("TCP port taken")
        .to_string();
        assert!(e.contains("--https-listen"), "{e}");
    }
}
