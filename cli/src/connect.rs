//! Opening an RPC session with the target cluster from the CLI.
//!
//! Client commands run on a single-threaded runtime with a `LocalSet`
//! (capnp-rpc is not `Send`).

use std::future::Future;

use anyhow::Context;
use schema::miren_capnp::{admin, app, cluster};
use transport::pki;
use transport::tls::ClientIdentity;

use crate::config::Target;
use crate::machine::{Credential, TradeError};

/// Runs `fut` on a fresh single-threaded runtime inside a `LocalSet`.
pub fn run_local<T>(fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, fut)
}

/// Turns an RPC error into the message the server meant for people.
pub fn remote(e: capnp::Error) -> anyhow::Error {
    anyhow::anyhow!(transport::rpc::remote_message(&e))
}

/// How many times a CI login refused as busy is tried (0.5 s, 1 s, 2 s, 4 s
/// apart).
const LOGIN_TRIES: u32 = 5;

/// An open session with a cluster.
pub struct Session {
    pub cluster: cluster::Client,
    pub target: Target,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Session {
    /// Dials the target and bootstraps the RPC session.
    pub async fn open(target: Target) -> anyhow::Result<Session> {
        let identity = match &target.identity {
            Some((cert, key)) => Some(ClientIdentity {
                chain: vec![pki::cert_der_from_pem(cert)
                    .context("client certificate in the client config")?],
                key: pki::key_der_from_pem(key).context("client key in the client config")?,
            }),
            None => None,
        };
        let (endpoint, conn) = transport::dial(&target.address, identity).await?;
        let cluster: cluster::Client = transport::rpc::connect_connection(&conn)
            .await
            .map_err(remote)?;
        Ok(Session {
            cluster,
            target,
            endpoint,
            conn,
        })
    }

    /// `notAfter` (Unix seconds) of the server certificate this connection's
    /// handshake presented, as every client verifies it.
    pub fn server_cert_not_after(&self) -> Option<i64> {
        let any = self.conn.peer_identity()?;
        let chain = any
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        let leaf = chain.first()?;
        pki::validity_of_der(leaf.as_ref()).ok().map(|(_, end)| end)
    }

    /// The role the coordinator sees for this session's identity.
    pub async fn role(&self) -> anyhow::Result<schema::miren_capnp::Role> {
        let reply = self
            .cluster
            .whoami_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        reply
            .get()?
            .get_role()
            .map_err(|e| anyhow::anyhow!("unknown role {e:?}"))
    }

    /// The admin capability; fails unless this session holds the admin identity.
    pub async fn admin(&self) -> anyhow::Result<admin::Client> {
        if self.target.api_key.is_some() {
            return Err(crate::machine::not_admin());
        }
        if self.target.identity.is_none() && crate::ci::in_ci() {
            anyhow::bail!(
                "OIDC access denied: a CI token can only deploy an app and read its status and logs; this needs the cluster's admin identity"
            );
        }
        let reply = self
            .cluster
            .admin_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        reply.get()?.get_admin().map_err(remote)
    }

    /// The capability confined to one app: through the admin identity when
    /// this session has it; otherwise with an access token from the
    /// cluster's token endpoint, bought with the deploy key of
    /// `MIREN_API_KEY` or the CI pipeline's OIDC token (see [`crate::ci`]),
    /// and kept for the job's later commands (see [`crate::machine`]).
    pub async fn app(&self, name: &str) -> anyhow::Result<app::Client> {
        if self.target.api_key.is_none() && self.target.identity.is_some() {
            let admin = self.admin().await?;
            let mut req = admin.app_request();
            req.get().set_name(name);
            let reply = req.send().promise.await.map_err(remote)?;
            return Ok(reply.get()?.get_app()?);
        }
        let ci_token;
        let cred = match &self.target.api_key {
            Some(key) => Credential::Key(key),
            None => {
                ci_token = crate::ci::oidc_token(&self.target.address.host_port()).await?;
                Credential::CiToken(&ci_token)
            }
        };
        let address = &self.target.address;
        if let Some(token) = crate::machine::cached(address, name, &cred) {
            match self.login(&token, name).await {
                Ok(app) => return Ok(app),
                Err(e) => {
                    tracing::debug!("the cached access token was refused: {e:#}");
                    crate::machine::forget(address, name, &cred);
                }
            }
        }
        let issuer = self.issuer_url().await?;
        let url = crate::machine::token_url(address, &issuer);
        match crate::machine::trade(address, &url, name, &cred).await {
            Ok((token, _)) => self.login(&token, name).await,
            Err(TradeError::Unreachable { url, reason }) => match cred {
                // A cluster whose HTTPS listener is elsewhere still takes
                // the CI token over RPC (without a token kept for later).
                Credential::CiToken(token) => {
                    tracing::debug!("token endpoint {url} unreachable ({reason}); using ciLogin");
                    self.ci_login(token, name).await
                }
                Credential::Key(_) => Err(anyhow::anyhow!(
                    "could not reach the cluster's token endpoint {url}: {reason}"
                )),
            },
            Err(refused) => Err(refused.into()),
        }
    }

    /// The issuer URL the cluster reports.
    async fn issuer_url(&self) -> anyhow::Result<String> {
        let reply = self
            .cluster
            .info_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        Ok(reply.get()?.get_info()?.get_issuer_url()?.to_string()?)
    }

    /// `Cluster.login` with an access token.
    async fn login(&self, access_token: &str, app: &str) -> anyhow::Result<app::Client> {
        let mut req = self.cluster.login_request();
        req.get().set_access_token(access_token);
        req.get().set_app(app);
        let reply = req.send().promise.await.map_err(remote)?;
        Ok(reply.get()?.get_app()?)
    }

    /// `Cluster.ciLogin`, retried while the coordinator says it is busy.
    async fn ci_login(&self, token: &str, name: &str) -> anyhow::Result<app::Client> {
        // A coordinator with too many logins at once says so as
        // `overloaded`: wait and try again, a few times.
        let mut wait = std::time::Duration::from_millis(500);
        let mut tries = 1;
        loop {
            let mut req = self.cluster.ci_login_request();
            req.get().set_token(token);
            req.get().set_app(name);
            match req.send().promise.await {
                Ok(reply) => return Ok(reply.get()?.get_app()?),
                Err(e) if e.kind == capnp::ErrorKind::Overloaded && tries < LOGIN_TRIES => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    tries += 1;
                }
                Err(e) => return Err(remote(e)),
            }
        }
    }

    /// Closes the connection and lets it drain.
    pub async fn close(self) {
        self.conn
            .close(transport::close::CloseCode::Done.into(), b"done");
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            self.endpoint.wait_idle(),
        )
        .await;
    }
}
