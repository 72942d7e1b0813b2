//! The runner's life: join once, then stay connected to the coordinator
//! with mTLS, heartbeat, renew the certificate at half-life, and reconnect
//! with jittered exponential backoff whenever the link drops.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use schema::miren_capnp::{cluster, runner_session};
use transport::pki;
use transport::rpc::{connect_connection, remote_message};

use crate::backoff;
use crate::join::join;
use crate::state::DataDir;

/// How often a runner heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// How a runner is started.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub data_dir: PathBuf,
    /// Join token, needed only until the runner has joined.
    pub join: Option<String>,
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// What the runner reports as its isolation mode.
    pub isolation: String,
}

enum SessionEnd {
    /// The coordinator no longer knows this runner: retrying is pointless.
    Removed(String),
    /// Anything else: reconnect.
    Lost(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for SessionEnd {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        let text = format!("{e:#}");
        if text.contains("removed from the cluster") || text.contains("has been removed") {
            SessionEnd::Removed(text)
        } else {
            SessionEnd::Lost(e)
        }
    }
}

fn rpc_err(e: capnp::Error) -> anyhow::Error {
    anyhow::anyhow!(remote_message(&e))
}

/// Runs the runner until `shutdown` resolves. Must run inside a `LocalSet`.
pub async fn run(opts: RunnerOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let data = DataDir::new(&opts.data_dir);
    if !data.has_joined() {
        let Some(token) = &opts.join else {
            bail!(
                "this runner has not joined a cluster yet: pass --join <join code> (an operator creates one with `miren runner token create`)"
            );
        };
        let cfg = join(&data, token, &opts.name, &opts.labels)
            .await
            .context("join failed")?;
        println!(
            "Runner joined cluster {} as runner-{} (data in {})",
            cfg.cluster,
            cfg.runner_id,
            opts.data_dir.display()
        );
    } else if opts.join.is_some() {
        let id = data.load()?;
        eprintln!(
            "note: this runner already joined {} as runner-{}; ignoring --join",
            id.config.cluster, id.config.runner_id
        );
    }
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    loop {
        let ended = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ended = session(&data, &opts, &mut attempt) => ended,
        };
        match ended {
            SessionEnd::Removed(msg) => bail!(
                "{msg}\nthis runner was removed from the cluster; to join again, move {} aside and run with a new --join code",
                opts.data_dir.display()
            ),
            SessionEnd::Lost(e) => tracing::warn!("connection to the coordinator lost: {e:#}"),
        }
        let wait = backoff::delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tracing::info!("reconnecting in {wait:?}");
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn session(data: &DataDir, opts: &RunnerOptions, attempt: &mut u32) -> SessionEnd {
    match session_inner(data, opts, attempt).await {
        Ok(never) => match never {},
        Err(end) => end,
    }
}

enum Never {}

async fn session_inner(
    data: &DataDir,
    opts: &RunnerOptions,
    attempt: &mut u32,
) -> Result<Never, SessionEnd> {
    let mut id = data.load()?;
    let (_endpoint, conn) = transport::dial(&id.address, Some(id.client_identity()?)).await?;
    let cluster: cluster::Client = connect_connection(&conn).await.map_err(rpc_err)?;
    let reply = cluster
        .runner_request()
        .send()
        .promise
        .await
        .map_err(rpc_err)?;
    let session: runner_session::Client = reply.get()?.get_session()?;
    println!(
        "Runner runner-{} connected to {}",
        id.config.runner_id,
        id.address.host_port()
    );
    *attempt = 0;
    loop {
        let mut req = session.heartbeat_request();
        {
            let mut s = req.get().init_status();
            s.set_version(crate::VERSION);
            s.set_sandboxes(0);
            s.set_isolation(&opts.isolation);
        }
        req.send().promise.await.map_err(rpc_err)?;

        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if renewal_due(&id.cert_pem, now)? {
            let (key_pem, csr) = pki::key_and_csr()?;
            let mut req = session.renew_request();
            req.get().set_csr_der(&csr);
            let reply = req.send().promise.await.map_err(rpc_err)?;
            let cert_pem = reply.get()?.get_cert_pem()?.to_string()?;
            data.save_identity(&cert_pem, &key_pem)?;
            tracing::info!("runner certificate renewed");
            id = data.load()?;
        }
        tokio::select! {
            closed = conn.closed() => return Err(anyhow::anyhow!("{closed}").into()),
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Whether more than half of the certificate's lifetime has passed.
fn renewal_due(cert_pem: &str, now: i64) -> anyhow::Result<bool> {
    let not_after = pki::not_after_unix(cert_pem)?;
    let not_before = pki::not_before_unix(cert_pem)?;
    Ok(now >= not_before + (not_after - not_before) / 2)
}
