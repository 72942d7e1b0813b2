//! `Cluster`: the bootstrap capability of every connection. Anyone may ask
//! `info` and `ping`, redeem a join code (`join`), log in with an access
//! token from the token endpoint (`login`) or with a CI token (`ciLogin`,
//! an exchange at the token endpoint followed by that login); an admin certificate gets `admin`, a runner certificate
//! `runner`.

use std::sync::Arc;

use capnp::capability::Rc;
use schema::miren_capnp::{admin, app, cluster, runner_agent, runner_session, Role};
use transport::clock::now_unix;
use transport::PeerIdentity;

use super::wire::{
    app_err, client, failed, login_err, oauth_err, read_labels, registry_err, write_info,
};
use super::{AdminService, AppService, RunnerSessionService};
use crate::audit::Actor;
use crate::frontdoor::Proof;
use crate::state::State;
use identity::access_token::Caller;

/// The bootstrap capability of one connection.
pub struct ClusterService {
    state: Arc<State>,
    peer: PeerIdentity,
    conn: quinn::Connection,
    /// The peer's address when its connection was admitted: what every
    /// per-address budget (joins, failed CI logins) and audit line counts,
    /// never `conn.remote_address()`, which follows the peer when it
    /// moves, and an unproven peer could move to addresses not its own.
    remote: std::net::SocketAddr,
    /// Raises the connection's limits when its peer proves a role.
    proof: Proof,
}

impl ClusterService {
    /// A capability client for the bootstrap of `conn`.
    pub fn client(
        state: Arc<State>,
        peer: PeerIdentity,
        conn: quinn::Connection,
        remote: std::net::SocketAddr,
        proof: Proof,
    ) -> cluster::Client {
        let observe = state.observe.clone();
        let client = capnp_rpc::new_client(ClusterService {
            state,
            peer,
            conn,
            remote,
            proof,
        });
        crate::metered::metered(client, "Cluster", &observe, None, None)
    }
}

impl ClusterService {
    /// The capability an access token for `app` buys: the app, confined
    /// to the token's scope, acting as the key or CI identity it came from.
    fn log_in(&self, access_token: &str, app: &str) -> Result<app::Client, capnp::Error> {
        let token = (self.state.oauth)
            .login(access_token, app, now_unix())
            .map_err(|e| failed(e.to_string()))?;
        self.capability(token, false)
    }

    /// The app capability a verified access token buys.
    ///
    /// `spent`: the token came from a one-time CI token just spent
    /// (`ciLogin`), so the connection is counted against its credential
    /// but never refused for it.
    fn capability(
        &self,
        token: identity::access_token::AccessToken,
        spent: bool,
    ) -> Result<app::Client, capnp::Error> {
        let app = token.scope.app.clone();
        self.proof
            .prove_app(&token.claims.client_id, spent)
            .map_err(|e| capnp::Error::overloaded(e.to_string()))?;
        let actor = match token.claims.caller() {
            Caller::DeployKey(id) => Actor::DeployKey(id),
            Caller::Ci(binding) => Actor::Ci(binding),
        };
        tracing::info!(app = %app, client = %token.claims.client_id, "login");
        let login = super::app::LoggedIn {
            not_after: token.claims.exp,
            caller: token.claims.caller(),
        };
        let service = AppService::confined(self.state.clone(), token.scope, login);
        Ok(client(service, "App", &self.state, Some(actor), Some(app)))
    }
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
                let admin: admin::Client = client(
                    AdminService::new(self.state.clone(), name.clone(), actor.clone()),
                    "Admin",
                    &self.state,
                    Some(actor),
                    None,
                );
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
                crate::oidc::DenialCause::Verify(identity::VerifyError::TooLarge {
                    len: token.len(),
                    max: identity::MAX_TOKEN_BYTES,
                }),
            )));
        }
        let app = p.get_app()?.to_string()?;
        crate::apps::check_app_name(&app).map_err(app_err)?;
        // A token exchange, then the login every credential ends in.
        let remote = self.remote.ip();
        let access = (self.state.oauth)
            .ci_login(token.to_str()?, &app, remote)
            .await
            .map_err(oauth_err)?;
        let client = self.capability(access, true)?;
        results.get().set_app(client);
        Ok(())
    }

    async fn login(
        self: Rc<Self>,
        params: cluster::LoginParams,
        mut results: cluster::LoginResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let token = p.get_access_token()?;
        if token.len() > identity::MAX_TOKEN_BYTES {
            return Err(failed("access token refused: it is larger than 16 KiB"));
        }
        let app = p.get_app()?.to_string()?;
        crate::apps::check_app_name(&app).map_err(app_err)?;
        let client = self.log_in(token.to_str()?, &app)?;
        results.get().set_app(client);
        Ok(())
    }

    async fn join(
        self: Rc<Self>,
        params: cluster::JoinParams,
        mut results: cluster::JoinResults,
    ) -> Result<(), capnp::Error> {
        let remote = self.remote;
        if let Err(wait) = self.state.door.join_attempt(remote.ip()) {
            tracing::info!(%remote, "join attempt refused: over the per-address rate");
            return Err(capnp::Error::overloaded(format!(
                "too many join attempts from this address; retry in {}s",
                wait.as_secs()
            )));
        }
        let req = params.get()?.get_request()?;
        let labels = read_labels(req.get_labels()?)?;
        let token_id = req.get_token_id()?.to_str()?.to_string();
        let (secret, csr) = (req.get_secret()?.to_vec(), req.get_csr_der()?.to_vec());
        let name = req.get_name()?.to_str()?.to_string();
        // Off this RPC worker: an anonymous join waiting on an unreachable
        // store must not stall the worker's other sessions.
        let (state, id) = (self.state.clone(), token_id.clone());
        let joined = crate::blocking::off_thread(move || {
            let ca = &state.cluster.ca;
            (state.registry).join(ca, &id, &secret, &csr, &name, labels, now_unix())
        })
        .await
        .map_err(|e| undecided(remote, &e))?;
        let (record, cert_pem) = (self.state.observe)
            .join(&token_id, remote, joined)
            .map_err(|e| match e {
                // A request that does not parse, or names what no
                // certificate can hold, is the joiner's to fix: a refusal.
                crate::runners::RegistryError::Pki(
                    transport::pki::PkiError::BadCsr(_) | transport::pki::PkiError::BadName(_),
                ) => registry_err(e),
                crate::runners::RegistryError::Store(_)
                | crate::runners::RegistryError::Pki(_)
                | crate::runners::RegistryError::Unavailable => undecided(remote, &e),
                refusal => registry_err(refusal),
            })?;
        tracing::info!(runner = %record.id, name = %record.name, %remote, "runner joined");
        let mut r = results.get().init_result();
        r.set_runner_id(&record.id);
        r.set_cert_pem(&cert_pem);
        r.set_ca_pem(self.state.cluster.ca.cert_pem());
        Ok(())
    }

    async fn join_coordinator(
        self: Rc<Self>,
        params: cluster::JoinCoordinatorParams,
        mut results: cluster::JoinCoordinatorResults,
    ) -> Result<(), capnp::Error> {
        use crate::coordinator_codes::{self, CodeError};
        let remote = self.remote;
        if let Err(wait) = self.state.door.join_attempt(remote.ip()) {
            tracing::info!(%remote, "coordinator join refused: over the per-address rate");
            return Err(capnp::Error::overloaded(format!(
                "too many join attempts from this address; retry in {}s",
                wait.as_secs()
            )));
        }
        let Some(shared) = &self.state.cluster.shared else {
            return Err(failed(CodeError::NotShared.to_string()));
        };
        let p = params.get()?;
        let code_id = p.get_code_id()?.to_str()?.to_string();
        let secret = p.get_secret()?.to_vec();
        // Off this RPC worker, like a runner's join.
        let (store, id) = (self.state.store.clone(), code_id.clone());
        let redeemed = crate::blocking::off_thread(move || {
            coordinator_codes::redeem(&*store, &id, &secret, now_unix())
        })
        .await
        .map_err(|e| undecided(remote, &e))?;
        self.state
            .observe
            .coordinator_join(&code_id, remote, &redeemed);
        // The id is an anonymous peer's text: logged only once well formed.
        let shown = if identity::join_token::valid_id(&code_id) {
            code_id.as_str()
        } else {
            "(malformed)"
        };
        match redeemed {
            Err(CodeError::Store(e)) => return Err(undecided(remote, &e)),
            Err(e) => {
                tracing::info!(%remote, code = %shown, "coordinator join refused: {e}");
                return Err(failed(e.to_string()));
            }
            Ok(_) => {}
        }
        tracing::info!(%remote, code = %shown, "coordinator joined: the cluster key was handed over");
        let mut r = results.get();
        r.set_cluster_key(shared.key().bytes());
        r.set_cluster_id(&self.state.cluster.meta.id);
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
        let service =
            RunnerSessionService::connect(self.state.clone(), id, &self.conn, agent).await?;
        let session: runner_session::Client =
            client(service, "RunnerSession", &self.state, None, None);
        results.get().set_session(session);
        Ok(())
    }
}

/// What an anonymous joiner is told when its join could not be decided (the
/// store, the CA or a task failed): that much and no more — the store's
/// path, an etcd member's words or a lock's state are for the log.
fn undecided(remote: std::net::SocketAddr, e: &dyn std::fmt::Display) -> capnp::Error {
    tracing::warn!(%remote, "a join could not be decided: {e}");
    failed("the coordinator cannot decide on this join right now; retry shortly")
}
