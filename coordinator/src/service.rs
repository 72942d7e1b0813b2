//! The Cap'n Proto capabilities the coordinator hands to peers.
//!
//! Authorization is by construction: the bootstrap `Cluster` capability knows
//! the TLS identity of its connection, and only hands out an `Admin`
//! capability to a peer holding the cluster's admin certificate. Capability
//! objects are thin: they reach shared state through `Arc<State>`.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use capnp::capability::Rc;
use schema::miren_capnp::{admin, cluster, Role};
use transport::PeerIdentity;

use crate::apps::{AppError, Apps, ResourceLimits, RunnerCommand, SandboxReport, Service};
use crate::audit::{Actor, Event};
use crate::datadir::{now_unix, ClusterMeta};
use crate::issuer::IssuerHistory;
use crate::keyring::{KeyRing, KeyStatus};
use crate::metrics::metered;
use crate::observe::MintRefusal;
use crate::runners::{LiveStatus, Registry, RegistryError, RunnerView};
use crate::store::Store;
use identity::join_token::JoinTokenRecord;
use identity::ClusterAddress;
use identity::{IssuerUrl, KeySet, Subject, Verifier, WorkloadClaims};
use schema::miren_capnp::{app, artifact_upload, runner_agent};
use schema::miren_capnp::{join_token_info, label, runner_info, runner_session};
use transport::pki::ClusterCa;

/// State shared by every connection.
pub struct State {
    pub meta: ClusterMeta,
    /// Issuer of the tokens minted now.
    pub issuer: IssuerUrl,
    /// Current issuer and replaced ones still accepted.
    pub issuers: IssuerHistory,
    pub started: Instant,
    pub store: Arc<dyn Store>,
    pub keys: RwLock<KeyRing>,
    /// How long verifiers may cache the JWKS; a new key is published at
    /// least this long before it signs.
    pub jwks_max_age_secs: i64,
    /// The cluster CA (issues runner certificates).
    pub ca: ClusterCa,
    /// `host:port;sha1:…` written into join tokens.
    pub address: ClusterAddress,
    /// Join tokens and runners.
    pub registry: Arc<Registry>,
    /// Apps, sandboxes, artifacts.
    pub apps: Arc<Apps>,
    /// CI bindings.
    pub ci: crate::ci::CiBindings,
    /// Fetches issuer keys and verifies CI tokens.
    pub oidc: crate::oidc::OidcVerifier,
    /// The multi-threaded runtime. RPC sessions run pinned to single-thread
    /// workers; CPU-heavy or `Send` work is handed here to use every core.
    pub rt: tokio::runtime::Handle,
    /// Labs features turned on (`--labs`).
    pub labs: Vec<String>,
    /// Route OIDC sessions (labs).
    pub sso: crate::sso::Sso,
    /// Connection counts and join attempts per source.
    pub door: Arc<crate::frontdoor::FrontDoor>,
    /// What this coordinator is (version, commit, build date).
    pub build: transport::build_info::BuildInfo,
    /// Metrics and the audit trail.
    pub observe: Arc<crate::observe::Observe>,
}

fn failed(msg: impl Into<String>) -> capnp::Error {
    capnp::Error::failed(msg.into())
}

fn write_info(state: &State, mut info: schema::miren_capnp::cluster_info::Builder<'_>) {
    info.set_name(&state.meta.name);
    info.set_version(state.build.to_string());
    info.set_issuer_url(state.issuer.as_str());
    info.set_cluster_id(&state.meta.id);
}

/// The bootstrap capability of one connection.
pub struct ClusterService {
    state: Arc<State>,
    peer: PeerIdentity,
    conn: quinn::Connection,
    /// Raises the connection's limits when its peer proves a role.
    proof: crate::frontdoor::Proof,
}

impl ClusterService {
    /// A capability client for the bootstrap of `conn`.
    pub fn client(
        state: Arc<State>,
        peer: PeerIdentity,
        conn: quinn::Connection,
        proof: crate::frontdoor::Proof,
    ) -> cluster::Client {
        let observe = state.observe.clone();
        let client = capnp_rpc::new_client(ClusterService {
            state,
            peer,
            conn,
            proof,
        });
        crate::metrics::metered(client, "Cluster", &observe, None, None)
    }
}

/// A CI login's refusal on the wire: "busy" as `overloaded`, so a client
/// can tell it to retry without reading the text.
fn login_err(e: crate::oidc::LoginError) -> capnp::Error {
    match e {
        crate::oidc::LoginError::Busy => capnp::Error::overloaded(e.to_string()),
        other => failed(other.to_string()),
    }
}

/// Audiences and lifetime of a token request (`ttl` 0 = the default).
fn token_request(
    list: capnp::text_list::Reader<'_>,
    ttl_secs: u32,
) -> Result<(Vec<String>, Option<u64>), capnp::Error> {
    let mut audiences = Vec::new();
    for a in list {
        audiences.push(a?.to_str()?.to_string());
    }
    Ok((audiences, (ttl_secs != 0).then_some(u64::from(ttl_secs))))
}

fn registry_err(e: RegistryError) -> capnp::Error {
    failed(e.to_string())
}

fn read_labels(
    list: capnp::struct_list::Reader<'_, label::Owned>,
) -> Result<Vec<(String, String)>, capnp::Error> {
    let mut out = Vec::new();
    for l in list {
        out.push((l.get_key()?.to_string()?, l.get_value()?.to_string()?));
    }
    Ok(out)
}

fn write_labels(
    labels: &[(String, String)],
    mut list: capnp::struct_list::Builder<'_, label::Owned>,
) {
    for (i, (k, v)) in labels.iter().enumerate() {
        let mut l = list.reborrow().get(i as u32);
        l.set_key(k);
        l.set_value(v);
    }
}

fn write_token_info(r: &JoinTokenRecord, now: i64, mut b: join_token_info::Builder<'_>) {
    b.set_id(&r.id);
    b.set_name(&r.name);
    b.set_reusable(r.reusable);
    b.set_uses(r.uses);
    b.set_created_unix(r.created_unix);
    b.set_expires_unix(r.expires_unix);
    b.set_state(r.state(now).as_str());
    write_labels(&r.labels, b.init_labels(r.labels.len() as u32));
}

fn write_runner_info(v: &RunnerView, mut b: runner_info::Builder<'_>) {
    b.set_id(&v.record.id);
    b.set_name(&v.record.name);
    b.set_status(v.status());
    b.set_sandboxes(v.status.sandboxes);
    b.set_last_seen_unix(v.last_seen_unix);
    b.set_version(&v.status.version);
    b.set_cordoned(v.record.cordoned);
    b.set_isolation(&v.status.isolation);
    b.set_limits(&v.status.limits);
    b.set_cert_expires_unix(v.record.cert_expires_unix);
    write_labels(
        &v.record.labels,
        b.init_labels(v.record.labels.len() as u32),
    );
}

impl cluster::Server for ClusterService {
    async fn info(
        self: Rc<Self>,
        _: cluster::InfoParams,
        mut results: cluster::InfoResults,
    ) -> Result<(), capnp::Error> {
        write_info(&self.state, results.get().init_info());
        Ok(())
    }

    async fn whoami(
        self: Rc<Self>,
        _: cluster::WhoamiParams,
        mut results: cluster::WhoamiResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        match &self.peer {
            PeerIdentity::Anonymous => r.set_role(Role::Anonymous),
            PeerIdentity::Admin { name } => {
                r.set_role(Role::Admin);
                r.set_subject(name);
            }
            PeerIdentity::Runner { id } => {
                r.set_role(Role::Runner);
                r.set_subject(id);
            }
            PeerIdentity::Unknown { common_name } => {
                r.set_role(Role::Anonymous);
                r.set_subject(common_name);
            }
        }
        Ok(())
    }

    async fn ping(
        self: Rc<Self>,
        params: cluster::PingParams,
        mut results: cluster::PingResults,
    ) -> Result<(), capnp::Error> {
        let payload = params.get()?.get_payload()?;
        if payload.len() > crate::frontdoor::MAX_PING_BYTES {
            return Err(failed(format!(
                "ping payload of {} bytes refused: at most {} bytes are echoed",
                payload.len(),
                crate::frontdoor::MAX_PING_BYTES
            )));
        }
        results.get().set_payload(payload);
        Ok(())
    }

    async fn admin(
        self: Rc<Self>,
        _: cluster::AdminParams,
        mut results: cluster::AdminResults,
    ) -> Result<(), capnp::Error> {
        match &self.peer {
            PeerIdentity::Admin { name } => {
                let actor = Actor::Admin(name.clone());
                let admin: admin::Client = capnp_rpc::new_client(AdminService {
                    state: self.state.clone(),
                    name: name.clone(),
                    actor: actor.clone(),
                });
                let admin = metered(admin, "Admin", &self.state.observe, Some(actor), None);
                results.get().set_admin(admin);
                Ok(())
            }
            _ => Err(failed(
                "permission denied: this needs the cluster's admin identity (run it where `miren server` wrote its client config, or copy that config here)",
            )),
        }
    }

    async fn ci_login(
        self: Rc<Self>,
        params: cluster::CiLoginParams,
        mut results: cluster::CiLoginResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let token = p.get_token()?;
        // Refused before it is copied or parsed.
        if token.len() > identity::MAX_TOKEN_BYTES {
            return Err(login_err(crate::oidc::LoginError::Denied(
                crate::oidc::Denial::TooLarge,
            )));
        }
        let app = p.get_app()?.to_string()?;
        crate::apps::check_app_name(&app).map_err(app_err)?;
        // The cheap checks and a login slot, here; the work, on the runtime.
        let token_text = token.to_str()?;
        let seen = crate::audit::CiTokenFields::peek(token_text);
        let attempt = match self.state.oidc.begin(&self.state.ci, token_text) {
            Ok(attempt) => attempt,
            Err(e) => {
                let _ = self.state.observe.ci_login(&app, seen, Err(e.to_string()));
                return Err(login_err(e));
            }
        };
        let state = self.state.clone();
        let login_app = app.clone();
        let binding = self
            .state
            .rt
            .clone()
            .spawn(async move {
                state
                    .oidc
                    .finish(&state.ci, &login_app, attempt, now_unix())
                    .await
            })
            .await
            .map_err(|e| failed(e.to_string()))?;
        let binding = match binding {
            Ok(b) => self
                .state
                .observe
                .ci_login(&app, seen, Ok(b))
                .map_err(failed)?,
            Err(e) => {
                let _ = self.state.observe.ci_login(&app, seen, Err(e.to_string()));
                return Err(login_err(e));
            }
        };
        self.proof.prove();
        tracing::info!(app = %app, binding = %binding.id, "CI login");
        let client: app::Client = capnp_rpc::new_client(AppService {
            state: self.state.clone(),
            app: app.clone(),
        });
        let actor = Some(Actor::Ci(binding.id.clone()));
        let client = metered(client, "App", &self.state.observe, actor, Some(app));
        results.get().set_app(client);
        Ok(())
    }

    async fn join(
        self: Rc<Self>,
        params: cluster::JoinParams,
        mut results: cluster::JoinResults,
    ) -> Result<(), capnp::Error> {
        let remote = self.conn.remote_address();
        if let Err(wait) = self.state.door.join_attempt(remote.ip()) {
            tracing::info!(%remote, "join attempt refused: over the per-address rate");
            return Err(capnp::Error::overloaded(format!(
                "too many join attempts from this address; retry in {}s",
                wait.as_secs()
            )));
        }
        let req = params.get()?.get_request()?;
        let labels = read_labels(req.get_labels()?)?;
        let token_id = req.get_token_id()?.to_str()?;
        let joined = self.state.registry.join(
            &self.state.ca,
            token_id,
            req.get_secret()?,
            req.get_csr_der()?,
            req.get_name()?.to_str()?,
            labels,
            now_unix(),
        );
        let remote = self.conn.remote_address();
        let (record, cert_pem) = (self.state.observe)
            .join(token_id, remote, joined)
            .map_err(registry_err)?;
        tracing::info!(runner = %record.id, name = %record.name, remote = %self.conn.remote_address(), "runner joined");
        let mut r = results.get().init_result();
        r.set_runner_id(&record.id);
        r.set_cert_pem(&cert_pem);
        r.set_ca_pem(self.state.ca.cert_pem());
        Ok(())
    }

    async fn runner(
        self: Rc<Self>,
        params: cluster::RunnerParams,
        mut results: cluster::RunnerResults,
    ) -> Result<(), capnp::Error> {
        let PeerIdentity::Runner { id } = &self.peer else {
            return Err(failed(
                "permission denied: only a joined runner may open a runner session",
            ));
        };
        let agent: runner_agent::Client = params.get()?.get_agent()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RunnerCommand>();
        let session = self
            .state
            .registry
            .connect(id, self.conn.clone(), tx, now_unix())
            .map_err(registry_err)?;
        // Commands from the (Send) scheduler reach the runner through the
        // agent capability, which lives on this thread.
        tokio::task::spawn_local(async move {
            while let Some(cmd) = rx.recv().await {
                let (req, done) = match cmd {
                    RunnerCommand::Start(spec, done) => {
                        let mut req = agent.start_sandbox_request();
                        {
                            let mut s = req.get().init_spec();
                            s.set_id(&spec.id);
                            s.set_app(&spec.app);
                            s.set_version(&spec.version);
                            s.set_service(&spec.service.name);
                            s.set_command(&spec.service.command);
                            s.set_port(spec.service.port);
                            s.set_artifact_sha256(&spec.artifact);
                            s.set_issuer_url(&spec.issuer_url);
                            {
                                let limits = spec.service.limits;
                                let mut l = s.reborrow().init_limits();
                                l.set_memory_bytes(limits.memory_bytes);
                                l.set_cpu_millis(limits.cpu_millis);
                                l.set_pids(limits.pids);
                            }
                            write_labels(
                                &spec.service.env,
                                s.init_env(spec.service.env.len() as u32),
                            );
                        }
                        (req.send().promise.await.map(|_| ()), done)
                    }
                    RunnerCommand::Stop(id, done) => {
                        let mut req = agent.stop_sandbox_request();
                        req.get().set_id(&id);
                        (req.send().promise.await.map(|_| ()), done)
                    }
                    RunnerCommand::Logs(id, lines, done) => {
                        let mut req = agent.logs_request();
                        req.get().set_id(&id);
                        req.get().set_lines(lines);
                        let result = async {
                            let reply = req.send().promise.await?;
                            let mut out = Vec::new();
                            for l in reply.get()?.get_lines()? {
                                out.push(l?.to_string()?);
                            }
                            Ok::<_, capnp::Error>(out)
                        }
                        .await;
                        let _ = done.send(result.map_err(|e| transport::rpc::remote_message(&e)));
                        continue;
                    }
                };
                let _ = done.send(req.map_err(|e| transport::rpc::remote_message(&e)));
            }
        });
        let client: runner_session::Client = capnp_rpc::new_client(RunnerSessionService {
            state: self.state.clone(),
            id: id.clone(),
            session,
        });
        let client = metered(client, "RunnerSession", &self.state.observe, None, None);
        results.get().set_session(client);
        Ok(())
    }
}

/// A connected runner's session; dropped when its connection ends.
pub struct RunnerSessionService {
    state: Arc<State>,
    id: String,
    session: u64,
}

impl Drop for RunnerSessionService {
    fn drop(&mut self) {
        self.state.registry.disconnect(&self.id, self.session);
    }
}

fn app_err(e: AppError) -> capnp::Error {
    failed(e.to_string())
}

impl runner_session::Server for RunnerSessionService {
    async fn fetch_artifact(
        self: Rc<Self>,
        params: runner_session::FetchArtifactParams,
        mut results: runner_session::FetchArtifactResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (data, size) = self
            .state
            .apps
            .read_artifact(
                &self.id,
                p.get_sha256()?.to_str()?,
                p.get_offset(),
                p.get_length(),
            )
            .map_err(app_err)?;
        let mut r = results.get();
        r.set_data(&data);
        r.set_size(size);
        Ok(())
    }

    async fn issue_workload_token(
        self: Rc<Self>,
        params: runner_session::IssueWorkloadTokenParams,
        mut results: runner_session::IssueWorkloadTokenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let actor = Actor::Runner(self.id.clone());
        let sandbox_id = p.get_sandbox_id()?.to_str()?;
        // Whatever app the runner might believe in, the record decides.
        let sandbox = self
            .state
            .apps
            .authorize_token(&self.id, sandbox_id)
            .map_err(|e| {
                let why = match e {
                    AppError::NotYourSandbox => MintRefusal::NotHosted,
                    _ => MintRefusal::Internal,
                };
                (self.state.observe).token_refused(&actor, Some(sandbox_id), why, app_err(e))
            })?;
        let (audiences, ttl) = token_request(p.get_audiences()?, p.get_ttl_secs())?;
        let subject =
            Subject::new("", &sandbox.app, &sandbox.id).map_err(|e| failed(e.to_string()))?;
        let token = (self.state)
            .mint_off_thread(actor, subject, audiences, ttl)
            .await?;
        results.get().set_token(&token);
        Ok(())
    }

    async fn report_sandbox(
        self: Rc<Self>,
        params: runner_session::ReportSandboxParams,
        _: runner_session::ReportSandboxResults,
    ) -> Result<(), capnp::Error> {
        let r = params.get()?.get_report()?;
        let report = SandboxReport {
            state: r.get_state()?.to_string()?,
            restarts: r.get_restarts(),
            address: r.get_address()?.to_string()?,
            last_log: r.get_last_log()?.to_string()?,
            last_exit: r.get_last_exit()?.to_string()?,
        };
        self.state
            .apps
            .report(&self.id, r.get_id()?.to_str()?, report)
            .map_err(app_err)
    }

    async fn heartbeat(
        self: Rc<Self>,
        params: runner_session::HeartbeatParams,
        mut results: runner_session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_status()?;
        let status = LiveStatus {
            version: s.get_version()?.to_string()?,
            sandboxes: s.get_sandboxes(),
            isolation: s.get_isolation()?.to_string()?,
            limits: s.get_limits()?.to_string()?,
        };
        let cordoned = self
            .state
            .registry
            .heartbeat(&self.id, self.session, status, now_unix())
            .map_err(registry_err)?;
        results.get().set_cordoned(cordoned);
        Ok(())
    }

    async fn renew(
        self: Rc<Self>,
        params: runner_session::RenewParams,
        mut results: runner_session::RenewResults,
    ) -> Result<(), capnp::Error> {
        let csr = params.get()?.get_csr_der()?;
        let cert = self
            .state
            .registry
            .renew(&self.state.ca, &self.id, csr)
            .map_err(registry_err)?;
        results.get().set_cert_pem(&cert);
        Ok(())
    }
}

/// What an operator holding the admin certificate may do.
pub struct AdminService {
    state: Arc<State>,
    /// The `<name>` of the caller's `admin-<name>` certificate.
    name: String,
    /// The admin certificate's holder, for the audit trail.
    actor: Actor,
}

/// The shortest admin certificate `renewAdmin` issues: shorter would lock
/// the holder out before they could renew again.
pub const MIN_ADMIN_CERT_SECS: u64 = 3600;

/// The lifetime `renewAdmin` issues for a request of `validity_secs`
/// (0 = the default).
pub fn admin_cert_validity(validity_secs: u64) -> Result<time::Duration, String> {
    use crate::datadir::ADMIN_CERT_LIFETIME;
    if validity_secs == 0 {
        return Ok(ADMIN_CERT_LIFETIME);
    }
    if validity_secs < MIN_ADMIN_CERT_SECS {
        return Err(format!(
            "an admin certificate must last at least 1h (asked for {validity_secs}s)"
        ));
    }
    let max = ADMIN_CERT_LIFETIME.whole_seconds() as u64;
    Ok(time::Duration::seconds(validity_secs.min(max) as i64))
}

fn write_keys(
    statuses: &[KeyStatus],
    mut list: capnp::struct_list::Builder<'_, schema::miren_capnp::signing_key::Owned>,
) {
    for (i, s) in statuses.iter().enumerate() {
        let mut k = list.reborrow().get(i as u32);
        k.set_kid(&s.kid);
        k.set_alg(&s.alg);
        k.set_state(s.state.as_str());
        k.set_created_unix(s.created_unix);
        k.set_activates_unix(s.activates_unix);
        k.set_retires_unix(s.retires_unix.unwrap_or(0));
    }
}

impl State {
    /// Mints a workload token for `subject` at `now`, asked by `actor`.
    pub fn mint_workload_token(
        &self,
        actor: &Actor,
        subject: &Subject,
        audiences: &[String],
        ttl: Option<u64>,
        now: i64,
    ) -> Result<String, capnp::Error> {
        let started = Instant::now();
        let refused = |why: MintRefusal, e: capnp::Error| {
            let sandbox = Some(subject.sandbox.as_str());
            self.observe.token_refused(actor, sandbox, why, e)
        };
        let claims = WorkloadClaims::new(
            self.issuer.as_str(),
            &self.meta.id,
            subject,
            audiences,
            ttl,
            now,
            uuid::Uuid::new_v4().to_string(),
        )
        .map_err(|e| refused(MintRefusal::BadRequest, failed(e.to_string())))?;
        let minter = self
            .keys
            .read()
            .map_err(|_| refused(MintRefusal::NoActiveKey, failed("key ring unavailable")))?
            .active(now)
            .map_err(|e| refused(MintRefusal::NoActiveKey, failed(e.to_string())))?;
        let token = minter
            .mint(&claims)
            .map_err(|e| refused(MintRefusal::Internal, failed(e.to_string())))?;
        self.observe.token_minted(actor, &claims, started);
        Ok(token)
    }

    /// Mints on the blocking pool: one connection's RPC session is pinned
    /// to one thread, but its RSA signatures should use every core.
    pub async fn mint_off_thread(
        self: &Arc<Self>,
        actor: Actor,
        subject: Subject,
        audiences: Vec<String>,
        ttl: Option<u64>,
    ) -> Result<String, capnp::Error> {
        let state = self.clone();
        self.rt
            .spawn_blocking(move || {
                state.mint_workload_token(&actor, &subject, &audiences, ttl, now_unix())
            })
            .await
            .map_err(|e| failed(e.to_string()))?
    }

    /// A verifier for this cluster's own tokens at `now`: published keys,
    /// accepted issuers, the given audience.
    pub fn own_token_verifier(&self, audience: &str, now: i64) -> Result<Verifier, capnp::Error> {
        let keys = self
            .keys
            .read()
            .map_err(|_| failed("key ring unavailable"))?
            .published(now);
        let keys = KeySet::from_keys(keys).map_err(|e| failed(e.to_string()))?;
        Ok(Verifier::new(
            keys,
            self.issuers.accepted(now),
            [audience.to_string()],
        ))
    }
}

/// One app's capability: what a deploy pipeline needs and nothing else.
/// Handed out to admins (`Admin.app`) and to CI tokens that match one of
/// the app's bindings (`Cluster.ciLogin`).
pub struct AppService {
    pub state: Arc<State>,
    pub app: String,
}

impl app::Server for AppService {
    async fn upload_artifact(
        self: Rc<Self>,
        _: app::UploadArtifactParams,
        mut results: app::UploadArtifactResults,
    ) -> Result<(), capnp::Error> {
        let upload = self.state.apps.upload(&self.app).map_err(|e| match e {
            AppError::Artifact(e) => upload_err(e),
            other => app_err(other),
        })?;
        let client: artifact_upload::Client = capnp_rpc::new_client(UploadService {
            upload: std::cell::RefCell::new(Some(upload)),
            rt: self.state.rt.clone(),
        });
        let client = metered(client, "ArtifactUpload", &self.state.observe, None, None);
        results.get().set_upload(client);
        Ok(())
    }

    async fn deploy(
        self: Rc<Self>,
        params: app::DeployParams,
        mut results: app::DeployResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let mut services = Vec::new();
        for s in p.get_services()? {
            services.push(Service {
                name: s.get_name()?.to_string()?,
                command: s.get_command()?.to_string()?,
                port: s.get_port(),
                instances: s.get_instances(),
                env: read_labels(s.get_env()?)?,
                limits: if s.has_limits() {
                    let l = s.get_limits()?;
                    ResourceLimits {
                        memory_bytes: l.get_memory_bytes(),
                        cpu_millis: l.get_cpu_millis(),
                        pids: l.get_pids(),
                    }
                } else {
                    ResourceLimits::default()
                },
            });
        }
        let version = self
            .state
            .apps
            .deploy(
                &self.state.registry,
                &self.app,
                p.get_artifact_sha256()?.to_str()?,
                services,
                self.state.issuer.as_str().to_string(),
                now_unix(),
            )
            .map_err(app_err)?;
        results.get().set_version(&version);
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        _: app::StatusParams,
        mut results: app::StatusResults,
    ) -> Result<(), capnp::Error> {
        let json = self.state.apps.status_json(&self.app).map_err(app_err)?;
        results.get().set_status_json(json.to_string());
        Ok(())
    }

    async fn logs(
        self: Rc<Self>,
        params: app::LogsParams,
        mut results: app::LogsResults,
    ) -> Result<(), capnp::Error> {
        let lines = params.get()?.get_lines().clamp(1, 10_000);
        let state = self.state.clone();
        let app = self.app.clone();
        let rt = self.state.rt.clone();
        let json = rt
            .spawn(async move { state.apps.logs(&state.registry, &app, lines).await })
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(app_err)?;
        results.get().set_logs_json(json.to_string());
        Ok(())
    }
}

/// An artifact upload in progress. When the connection drops, the RPC
/// system drops this capability, and with it the upload: its slot and its
/// temporary file go.
pub struct UploadService {
    /// `None` once `finish` took it.
    upload: std::cell::RefCell<Option<crate::artifacts::Upload>>,
    /// Where `finish` syncs the file (not this RPC worker's thread).
    rt: tokio::runtime::Handle,
}

fn upload_closed() -> capnp::Error {
    failed(crate::artifacts::ArtifactError::Closed.to_string())
}

/// An upload's refusal for the uploader; disk trouble is the operator's
/// (logged with its path), not the pipeline's.
fn upload_err(e: crate::artifacts::ArtifactError) -> capnp::Error {
    match e {
        crate::artifacts::ArtifactError::Io { .. } => {
            tracing::error!("storing an upload: {e}");
            failed("the coordinator could not store the upload (see its log)")
        }
        other => failed(other.to_string()),
    }
}

impl artifact_upload::Server for UploadService {
    async fn write(
        self: Rc<Self>,
        params: artifact_upload::WriteParams,
        _: artifact_upload::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut upload = self.upload.borrow_mut();
        let upload = upload.as_mut().ok_or_else(upload_closed)?;
        upload.write(data, Instant::now()).map_err(upload_err)
    }

    async fn finish(
        self: Rc<Self>,
        params: artifact_upload::FinishParams,
        mut results: artifact_upload::FinishResults,
    ) -> Result<(), capnp::Error> {
        let sha = params.get()?.get_sha256()?.to_str()?.to_string();
        let mut upload = self.upload.borrow_mut().take().ok_or_else(upload_closed)?;
        let size = self
            .rt
            .spawn_blocking(move || upload.finish(&sha))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(upload_err)?;
        results.get().set_size(size);
        Ok(())
    }
}

impl AdminService {
    /// An audit line for a change this admin made.
    fn audit(&self, event: Event) {
        self.state.observe.changed(&self.actor, event);
    }
}

impl admin::Server for AdminService {
    async fn renew_admin(
        self: Rc<Self>,
        params: admin::RenewAdminParams,
        mut results: admin::RenewAdminResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let validity = admin_cert_validity(p.get_validity_secs()).map_err(failed)?;
        let csr = p.get_csr_der()?.to_vec();
        let common_name = format!("admin-{}", self.name);
        let state = self.state.clone();
        let cn = common_name.clone();
        // Signing is quick, but it is CPU work: off the RPC worker.
        let cert_pem = self
            .state
            .rt
            .spawn_blocking(move || state.ca.issue_client_for_csr(&cn, validity, &csr))
            .await
            .map_err(|e| failed(format!("issuing the admin certificate: {e}")))?
            .map_err(|e| failed(e.to_string()))?;
        let expires = transport::pki::not_after_unix(&cert_pem).unwrap_or_default();
        tracing::info!(
            subject = %common_name,
            expires_unix = expires,
            "admin certificate issued to an admin (renewal)"
        );
        results.get().set_cert_pem(&cert_pem);
        Ok(())
    }

    async fn app(
        self: Rc<Self>,
        params: admin::AppParams,
        mut results: admin::AppResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_string()?;
        crate::apps::check_app_name(&name).map_err(app_err)?;
        let client: app::Client = capnp_rpc::new_client(AppService {
            state: self.state.clone(),
            app: name.clone(),
        });
        let actor = Some(self.actor.clone());
        let client = metered(client, "App", &self.state.observe, actor, Some(name));
        results.get().set_app(client);
        Ok(())
    }

    async fn list_apps(
        self: Rc<Self>,
        _: admin::ListAppsParams,
        mut results: admin::ListAppsResults,
    ) -> Result<(), capnp::Error> {
        let mut out = Vec::new();
        for a in self.state.apps.apps().map_err(app_err)? {
            out.push(self.state.apps.status_json(&a.name).map_err(app_err)?);
        }
        results
            .get()
            .set_apps_json(serde_json::Value::Array(out).to_string());
        Ok(())
    }

    async fn set_route(
        self: Rc<Self>,
        params: admin::SetRouteParams,
        _: admin::SetRouteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (host, app) = (p.get_host()?.to_str()?, p.get_app()?.to_str()?);
        crate::ingress::Routes::set(&self.state, host, app)
            .inspect(|()| {
                self.audit(Event::RouteSet {
                    host: host.into(),
                    app: app.into(),
                })
            })
            .map_err(failed)
    }

    async fn list_routes(
        self: Rc<Self>,
        _: admin::ListRoutesParams,
        mut results: admin::ListRoutesResults,
    ) -> Result<(), capnp::Error> {
        let routes = crate::ingress::Routes::list(&self.state).map_err(failed)?;
        let json = serde_json::to_string(&routes).map_err(|e| failed(e.to_string()))?;
        results.get().set_routes_json(json);
        Ok(())
    }

    async fn remove_route(
        self: Rc<Self>,
        params: admin::RemoveRouteParams,
        _: admin::RemoveRouteResults,
    ) -> Result<(), capnp::Error> {
        let host = params.get()?.get_host()?.to_str()?;
        crate::ingress::Routes::remove(&self.state, host)
            .inspect(|()| self.audit(Event::RouteRemoved { host: host.into() }))
            .map_err(failed)
    }

    async fn add_ci_binding(
        self: Rc<Self>,
        params: admin::AddCiBindingParams,
        mut results: admin::AddCiBindingResults,
    ) -> Result<(), capnp::Error> {
        let json = params.get()?.get_binding_json()?.to_str()?;
        let binding: identity::bindings::Binding =
            serde_json::from_str(json).map_err(|e| failed(format!("binding is not valid: {e}")))?;
        let summary = crate::observe::BindingSummary::of(&binding);
        let id = self
            .state
            .ci
            .add(binding)
            .map_err(|e| failed(e.to_string()))?;
        (self.state.observe).binding_added(&self.actor, &id, &summary);
        results.get().set_id(&id);
        Ok(())
    }

    async fn list_ci_bindings(
        self: Rc<Self>,
        params: admin::ListCiBindingsParams,
        mut results: admin::ListCiBindingsResults,
    ) -> Result<(), capnp::Error> {
        let app = params.get()?.get_app()?.to_str()?;
        let list = self.state.ci.for_app(app);
        let json = serde_json::to_string(&list).map_err(|e| failed(e.to_string()))?;
        results.get().set_bindings_json(json);
        Ok(())
    }

    async fn remove_ci_binding(
        self: Rc<Self>,
        params: admin::RemoveCiBindingParams,
        _: admin::RemoveCiBindingResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id()?.to_str()?;
        self.state
            .ci
            .remove(id)
            .map_err(|e| failed(e.to_string()))?;
        self.audit(Event::BindingRemoved { binding: id.into() });
        Ok(())
    }

    async fn route_oidc_enable(
        self: Rc<Self>,
        params: admin::RouteOidcEnableParams,
        _: admin::RouteOidcEnableResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let req: crate::route_oidc::EnableRequest =
            serde_json::from_str(p.get_config_json()?.to_str()?)
                .map_err(|e| failed(e.to_string()))?;
        let host = p.get_host()?.to_str()?;
        let provider = req.provider.as_deref().map(Into::into);
        crate::route_oidc::enable(&self.state, host, req)
            .inspect(|()| {
                self.audit(Event::RouteOidcEnabled {
                    host: host.into(),
                    provider,
                })
            })
            .map_err(failed)
    }

    async fn route_oidc_show(
        self: Rc<Self>,
        params: admin::RouteOidcShowParams,
        mut results: admin::RouteOidcShowResults,
    ) -> Result<(), capnp::Error> {
        let v = crate::route_oidc::show(&self.state, params.get()?.get_host()?.to_str()?)
            .map_err(failed)?;
        results.get().set_json(v.to_string());
        Ok(())
    }

    async fn route_oidc_disable(
        self: Rc<Self>,
        params: admin::RouteOidcDisableParams,
        _: admin::RouteOidcDisableResults,
    ) -> Result<(), capnp::Error> {
        let host = params.get()?.get_host()?.to_str()?;
        crate::route_oidc::disable(&self.state, host)
            .inspect(|()| self.audit(Event::RouteOidcDisabled { host: host.into() }))
            .map_err(failed)
    }

    async fn list_oidc_providers(
        self: Rc<Self>,
        _: admin::ListOidcProvidersParams,
        mut results: admin::ListOidcProvidersResults,
    ) -> Result<(), capnp::Error> {
        let v = crate::route_oidc::providers(&self.state).map_err(failed)?;
        results.get().set_json(v.to_string());
        Ok(())
    }

    async fn remove_oidc_provider(
        self: Rc<Self>,
        params: admin::RemoveOidcProviderParams,
        _: admin::RemoveOidcProviderResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_str()?;
        crate::route_oidc::remove_provider(&self.state, name)
            .inspect(|()| {
                self.audit(Event::OidcProviderRemoved {
                    provider: name.into(),
                })
            })
            .map_err(failed)
    }

    async fn delete_app(
        self: Rc<Self>,
        params: admin::DeleteAppParams,
        _: admin::DeleteAppResults,
    ) -> Result<(), capnp::Error> {
        let app = params.get()?.get_app()?.to_string()?;
        let state = self.state.clone();
        // Stopping talks to runners through Send channels: run it off this thread's borrow.
        let rt = self.state.rt.clone();
        rt.spawn(async move { state.apps.delete(&state.registry, &app).await })
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(app_err)
    }

    async fn create_join_token(
        self: Rc<Self>,
        params: admin::CreateJoinTokenParams,
        mut results: admin::CreateJoinTokenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let labels = read_labels(p.get_labels()?)?;
        let now = now_unix();
        let ttl = match p.get_ttl_secs() {
            0 => identity::join_token::DEFAULT_TTL_SECS,
            n => n,
        };
        let (token, record) = self
            .state
            .registry
            .create_token(
                &self.state.address,
                ttl,
                p.get_reusable(),
                p.get_name()?.to_str()?,
                labels,
                now,
            )
            .map_err(registry_err)?;
        let mut r = results.get();
        r.set_token(&token);
        write_token_info(&record, now, r.init_info());
        Ok(())
    }

    async fn list_join_tokens(
        self: Rc<Self>,
        _: admin::ListJoinTokensParams,
        mut results: admin::ListJoinTokensResults,
    ) -> Result<(), capnp::Error> {
        let tokens = self.state.registry.tokens().map_err(registry_err)?;
        let now = now_unix();
        let mut list = results.get().init_tokens(tokens.len() as u32);
        for (i, t) in tokens.iter().enumerate() {
            write_token_info(t, now, list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn revoke_join_token(
        self: Rc<Self>,
        params: admin::RevokeJoinTokenParams,
        _: admin::RevokeJoinTokenResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id()?.to_str()?;
        self.state.registry.revoke_token(id).map_err(registry_err)
    }

    async fn list_runners(
        self: Rc<Self>,
        _: admin::ListRunnersParams,
        mut results: admin::ListRunnersResults,
    ) -> Result<(), capnp::Error> {
        let mut runners = self.state.registry.list(now_unix()).map_err(registry_err)?;
        // Sandboxes assigned here, from our own records (not the last heartbeat).
        let assigned = self.state.apps.sandboxes().map_err(app_err)?;
        for r in runners.iter_mut() {
            r.status.sandboxes = assigned.iter().filter(|s| s.runner == r.record.id).count() as u32;
        }
        let mut list = results.get().init_runners(runners.len() as u32);
        for (i, r) in runners.iter().enumerate() {
            write_runner_info(r, list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn remove_runner(
        self: Rc<Self>,
        params: admin::RemoveRunnerParams,
        _: admin::RemoveRunnerResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id()?.to_str()?;
        let removed = self.state.registry.remove(id).map_err(registry_err)?;
        self.state.observe.runner_removed(&self.actor, &removed);
        tracing::info!(runner = %removed.id, "runner removed");
        Ok(())
    }

    async fn set_runner_cordon(
        self: Rc<Self>,
        params: admin::SetRunnerCordonParams,
        _: admin::SetRunnerCordonResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let record = self
            .state
            .registry
            .set_cordon(p.get_id()?.to_str()?, p.get_cordoned())
            .map_err(registry_err)?;
        self.state.observe.runner_cordoned(&self.actor, &record);
        Ok(())
    }

    async fn mint_workload_token(
        self: Rc<Self>,
        params: admin::MintWorkloadTokenParams,
        mut results: admin::MintWorkloadTokenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let subject = Subject::new(
            p.get_organization()?.to_str()?,
            p.get_app()?.to_str()?,
            p.get_sandbox_id()?.to_str()?,
        )
        .map_err(|e| failed(e.to_string()))?;
        let (audiences, ttl) = token_request(p.get_audiences()?, p.get_ttl_secs())?;
        let actor = self.actor.clone();
        let token = (self.state)
            .mint_off_thread(actor, subject, audiences, ttl)
            .await?;
        results.get().set_token(&token);
        Ok(())
    }

    async fn rotate_signing_key(
        self: Rc<Self>,
        _: admin::RotateSigningKeyParams,
        mut results: admin::RotateSigningKeyResults,
    ) -> Result<(), capnp::Error> {
        let now = now_unix();
        let statuses = {
            let mut ring = self
                .state
                .keys
                .write()
                .map_err(|_| failed("key ring unavailable"))?;
            if ring.has_pending(now) {
                return Err(failed(
                    "a new signing key is already waiting to activate (see `miren identity keys list`); rotate again after it is active",
                ));
            }
            ring.rotate(now, self.state.jwks_max_age_secs)
                .map_err(|e| failed(e.to_string()))?;
            ring.statuses(now)
        };
        write_keys(&statuses, results.get().init_keys(statuses.len() as u32));
        Ok(())
    }

    async fn verify_workload_token(
        self: Rc<Self>,
        params: admin::VerifyWorkloadTokenParams,
        mut results: admin::VerifyWorkloadTokenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let token = p.get_token()?.to_str()?;
        let audience = match p.get_audience()?.to_str()? {
            "" => identity::DEFAULT_AUDIENCE,
            a => a,
        };
        let now = now_unix();
        let verified = self
            .state
            .own_token_verifier(audience, now)?
            .verify(token.trim(), now)
            .map_err(|e| failed(format!("token refused: {e}")))?;
        let json = serde_json::to_string(&verified.claims).map_err(|e| failed(e.to_string()))?;
        results.get().set_claims_json(&json);
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        _: admin::StatusParams,
        mut results: admin::StatusResults,
    ) -> Result<(), capnp::Error> {
        let st = &self.state;
        let count = |prefix: &str| -> Result<u32, capnp::Error> {
            st.store
                .count(prefix)
                .map(|n| n as u32)
                .map_err(|e| failed(e.to_string()))
        };
        let keys = st
            .keys
            .read()
            .map_err(|_| failed("key ring unavailable"))?
            .statuses(now_unix())
            .len() as u32;
        let mut s = results.get().init_status();
        write_info(st, s.reborrow().init_info());
        s.set_uptime_secs(st.started.elapsed().as_secs());
        s.set_runners(count("runner/")?);
        s.set_apps(count("app/")?);
        s.set_sandboxes(count("sandbox/")?);
        s.set_join_tokens(count("jointoken/")?);
        s.set_ci_bindings(st.ci.len() as u32);
        s.set_signing_keys(keys);
        Ok(())
    }

    async fn read_audit(
        self: Rc<Self>,
        params: admin::ReadAuditParams,
        mut results: admin::ReadAuditResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let mut actions = Vec::new();
        for a in p.get_actions()? {
            actions.push(a?.to_string()?);
        }
        let app = p.get_app()?.to_string()?;
        let query = crate::audit::Query {
            since_ms: Some(p.get_since_unix_ms()).filter(|t| *t > 0),
            after_seq: p.get_after_seq(),
            app: Some(app).filter(|a| !a.is_empty()),
            actions,
            limit: p.get_limit() as usize,
        };
        let Some(dir) = self.state.observe.audit.dir().map(|d| d.to_path_buf()) else {
            return Err(failed(
                "this coordinator keeps no audit trail (it runs with --no-observe)",
            ));
        };
        let page = self
            .state
            .rt
            .spawn_blocking(move || crate::audit::read(&dir, &query))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("reading the audit trail: {e}")))?;
        let mut r = results.get();
        r.set_last_seq(page.last_seq);
        r.set_more(page.more);
        let mut list = r.init_lines(page.lines.len() as u32);
        for (i, l) in page.lines.iter().enumerate() {
            list.set(i as u32, l);
        }
        Ok(())
    }

    async fn list_signing_keys(
        self: Rc<Self>,
        _: admin::ListSigningKeysParams,
        mut results: admin::ListSigningKeysResults,
    ) -> Result<(), capnp::Error> {
        let statuses = self
            .state
            .keys
            .read()
            .map_err(|_| failed("key ring unavailable"))?
            .statuses(now_unix());
        write_keys(&statuses, results.get().init_keys(statuses.len() as u32));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_certificates_last_ten_years_unless_asked_for_less_but_at_least_an_hour() {
        assert_eq!(
            admin_cert_validity(0),
            Ok(crate::datadir::ADMIN_CERT_LIFETIME)
        );
        assert_eq!(
            admin_cert_validity(30 * 86_400),
            Ok(time::Duration::days(30))
        );
        assert_eq!(
            admin_cert_validity(u64::MAX),
            Ok(crate::datadir::ADMIN_CERT_LIFETIME)
        );
        assert!(admin_cert_validity(3599)
            .unwrap_err()
            .contains("at least 1h"));
        assert_eq!(admin_cert_validity(3600), Ok(time::Duration::hours(1)));
    }
}
