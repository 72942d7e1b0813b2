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

use crate::datadir::{now_unix, ClusterMeta};
use crate::issuer::IssuerHistory;
use crate::keyring::{KeyRing, KeyStatus};
use crate::store::Store;
use identity::{IssuerUrl, KeySet, Subject, Verifier, WorkloadClaims};

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
}

/// The version every component reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn failed(msg: impl Into<String>) -> capnp::Error {
    capnp::Error::failed(msg.into())
}

fn write_info(state: &State, mut info: schema::miren_capnp::cluster_info::Builder<'_>) {
    info.set_name(&state.meta.name);
    info.set_version(VERSION);
    info.set_issuer_url(state.issuer.as_str());
    info.set_cluster_id(&state.meta.id);
}

/// The bootstrap capability of one connection.
pub struct ClusterService {
    state: Arc<State>,
    peer: PeerIdentity,
}

impl ClusterService {
    pub fn new(state: Arc<State>, peer: PeerIdentity) -> Self {
        ClusterService { state, peer }
    }

    /// A capability client for the connection's bootstrap.
    pub fn client(state: Arc<State>, peer: PeerIdentity) -> cluster::Client {
        capnp_rpc::new_client(ClusterService::new(state, peer))
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
        results.get().set_payload(payload);
        Ok(())
    }

    async fn admin(
        self: Rc<Self>,
        _: cluster::AdminParams,
        mut results: cluster::AdminResults,
    ) -> Result<(), capnp::Error> {
        match &self.peer {
            PeerIdentity::Admin { .. } => {
                let admin: admin::Client = capnp_rpc::new_client(AdminService {
                    state: self.state.clone(),
                });
                results.get().set_admin(admin);
                Ok(())
            }
            _ => Err(failed(
                "permission denied: this needs the cluster's admin identity (run it where `miren server` wrote its client config, or copy that config here)",
            )),
        }
    }
}

/// What an operator holding the admin certificate may do.
pub struct AdminService {
    state: Arc<State>,
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
    /// Mints a workload token for `subject` at `now`.
    pub fn mint_workload_token(
        &self,
        subject: &Subject,
        audiences: &[String],
        ttl: Option<u64>,
        now: i64,
    ) -> Result<String, capnp::Error> {
        let claims = WorkloadClaims::new(
            self.issuer.as_str(),
            &self.meta.id,
            subject,
            audiences,
            ttl,
            now,
            uuid::Uuid::new_v4().to_string(),
        )
        .map_err(|e| failed(e.to_string()))?;
        let minter = self
            .keys
            .read()
            .map_err(|_| failed("key ring unavailable"))?
            .active(now)
            .map_err(|e| failed(e.to_string()))?;
        minter.mint(&claims).map_err(|e| failed(e.to_string()))
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

impl admin::Server for AdminService {
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
        let mut audiences = Vec::new();
        for a in p.get_audiences()? {
            audiences.push(a?.to_str()?.to_string());
        }
        let ttl = match p.get_ttl_secs() {
            0 => None,
            n => Some(u64::from(n)),
        };
        let token = self
            .state
            .mint_workload_token(&subject, &audiences, ttl, now_unix())?;
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
        s.set_ci_bindings(count("binding/")?);
        s.set_signing_keys(keys);
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
