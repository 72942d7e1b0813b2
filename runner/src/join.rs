//! Joining a cluster with a join token.
//!
//! The token pins the coordinator's CA, so the TLS handshake fails on a
//! fingerprint mismatch before the secret is ever sent. The private key is
//! generated here and never leaves the runner: the coordinator only sees a
//! certificate signing request.

use anyhow::Context;
use identity::join_token::JoinToken;
use schema::miren_capnp::cluster;
use transport::pki;
use transport::rpc::{connect_connection, remote_message};

use crate::state::{DataDir, RunnerConfig};

/// Redeems `token_text` and saves the resulting identity in `data`.
/// Must run inside a `LocalSet`.
pub async fn join(
    data: &DataDir,
    token_text: &str,
    name: &str,
    labels: &[(String, String)],
) -> anyhow::Result<RunnerConfig> {
    let token = JoinToken::parse(token_text)?;
    let (key_pem, csr_der) = pki::key_and_csr()?;
    let (endpoint, conn) = transport::dial(&token.address, None)
        .await
        .with_context(|| format!("joining {}", token.address.host_port()))?;
    let cluster: cluster::Client = connect_connection(&conn)
        .await
        .map_err(|e| anyhow::anyhow!(remote_message(&e)))?;
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
    let reply = req
        .send()
        .promise
        .await
        .map_err(|e| anyhow::anyhow!(remote_message(&e)))?;
    let result = reply.get()?.get_result()?;
    let runner_id = result.get_runner_id()?.to_string()?;
    let cert_pem = result.get_cert_pem()?.to_string()?;
    let ca_pem = result.get_ca_pem()?.to_string()?;
    // The CA we were given must be the one the token pinned.
    let ca_der = pki::cert_der_from_pem(&ca_pem)?;
    if token
        .address
        .fingerprint
        .is_none_or(|fp| !fp.matches_der(&ca_der))
    {
        anyhow::bail!(
            "the coordinator returned a CA that does not match the join code's fingerprint"
        );
    }
    let config = RunnerConfig {
        runner_id,
        cluster: token.address.to_string(),
        name: name.to_string(),
    };
    data.save_joined(&config, &cert_pem, &key_pem, &ca_pem)?;
    conn.close(transport::close::CloseCode::Done.into(), b"joined");
    let _ = tokio::time::timeout(std::time::Duration::from_millis(50), endpoint.wait_idle()).await;
    Ok(config)
}
