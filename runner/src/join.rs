//! Joining a cluster with a join token.
//!
//! The token pins the coordinator's CA, so the TLS handshake fails on a
//! fingerprint mismatch before the secret is ever sent. The private key is
//! generated here and never leaves the runner: the coordinator only sees a
//! certificate signing request.

use identity::join_token::{JoinRefusal, JoinToken};
use schema::miren_capnp::cluster;
use transport::close::CloseCode;
use transport::pki;
use transport::rpc::connect_connection;

use crate::call::CallError;
use crate::state::{DataDir, RunnerConfig, StateError};

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The text is not a join code.
    #[error(transparent)]
    Code(#[from] JoinRefusal),
    /// The coordinator the code names could not be reached or is not the
    /// one it pins.
    #[error("joining {addr}: {source}")]
    Dial {
        /// `host:port` of the code.
        addr: String,
        /// Why.
        #[source]
        source: transport::DialError,
    },
    /// The coordinator refused (a used, expired or revoked code, ...), or
    /// the connection went.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The coordinator returned a CA the code does not pin.
    #[error("the coordinator returned a CA that does not match the join code's fingerprint")]
    CaMismatch,
    /// A key, a request or the returned certificates could not be made or
    /// read.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The new identity could not be saved.
    #[error(transparent)]
    Save(#[from] StateError),
}

/// Redeems `token_text` and saves the resulting identity in `data`.
/// Must run inside a `LocalSet`.
pub async fn join(
    data: &DataDir,
    token_text: &str,
    name: &str,
    labels: &[(String, String)],
) -> Result<RunnerConfig, JoinError> {
    let token = JoinToken::parse(token_text)?;
    let (key_pem, csr_der) = pki::key_and_csr()?;
    let (endpoint, conn) = transport::dial(&token.address, None)
        .await
        .map_err(|source| JoinError::Dial {
            addr: token.address.host_port(),
            source,
        })?;
    let cluster: cluster::Client = connect_connection(&conn).await.map_err(CallError::from)?;
    let mut req = cluster.join_request();
    {
        let mut r = req.get().init_request();
        r.set_token_id(&token.id);
        r.set_secret(&token.secret);
        r.set_csr_der(&csr_der);
        r.set_name(name);
        r.set_version(crate::VERSION);
        let mut list = r.init_labels(labels.len() as u32);
        for (i, (k, v)) in labels.iter().enumerate() {
            let mut l = list.reborrow().get(i as u32);
            l.set_key(k);
            l.set_value(v);
        }
    }
    let reply = req.send().promise.await.map_err(CallError::from)?;
    let (runner_id, cert_pem, ca_pem) = (|| -> capnp::Result<_> {
        let result = reply.get()?.get_result()?;
        Ok((
            result.get_runner_id()?.to_string()?,
            result.get_cert_pem()?.to_string()?,
            result.get_ca_pem()?.to_string()?,
        ))
    })()
    .map_err(CallError::from)?;
    // The CA we were given must be the one the token pinned.
    let ca_der = pki::cert_der_from_pem(&ca_pem)?;
    if token
        .address
        .fingerprint
        .is_none_or(|fp| !fp.matches_der(&ca_der))
    {
        return Err(JoinError::CaMismatch);
    }
    let config = RunnerConfig {
        runner_id,
        cluster: token.address.to_string(),
        name: name.to_string(),
    };
    data.save_joined(&config, &cert_pem, &key_pem, &ca_pem)?;
    conn.close(CloseCode::Done.into(), b"joined");
    let _ = tokio::time::timeout(std::time::Duration::from_millis(50), endpoint.wait_idle()).await;
    Ok(config)
}
