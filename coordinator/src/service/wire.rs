//! Between Cap'n Proto messages and the coordinator's types: reading
//! requests, writing replies, and the words an error takes on the wire.
//! Nothing here decides anything.

use identity::join_token::JoinTokenRecord;
use schema::miren_capnp::{join_token_info, label, runner_info};

use crate::apps::{AppError, ResourceLimits};
use crate::artifacts::ArtifactError;
use crate::minting::MintError;
use crate::runners::{RegistryError, RunnerView, SandboxSpec};
use crate::state::State;

pub(super) fn failed(msg: impl Into<String>) -> capnp::Error {
    capnp::Error::failed(msg.into())
}

/// What a failure that only has words says on the wire.
pub(super) fn err(e: impl std::fmt::Display) -> capnp::Error {
    failed(e.to_string())
}

pub(super) fn registry_err(e: RegistryError) -> capnp::Error {
    err(e)
}

pub(super) fn app_err(e: AppError) -> capnp::Error {
    err(e)
}

pub(super) fn mint_err(e: MintError) -> capnp::Error {
    err(e)
}

pub(super) fn routes_err(e: crate::routes::RoutesError) -> capnp::Error {
    err(e)
}

pub(super) fn route_oidc_err(e: crate::route_oidc::RouteOidcError) -> capnp::Error {
    err(e)
}

pub(super) fn ci_err(e: crate::ci::CiError) -> capnp::Error {
    err(e)
}

pub(super) fn runners_err(e: crate::state::RunnersError) -> capnp::Error {
    err(e)
}

pub(super) fn delete_err(e: crate::reconcile::DeleteError) -> capnp::Error {
    err(e)
}

pub(super) fn issuer_err(e: crate::issuer::IssuerError) -> capnp::Error {
    err(e)
}

pub(super) fn summary_err(e: crate::state::SummaryError) -> capnp::Error {
    err(e)
}

pub(super) fn admin_cert_err(e: super::admin::AdminCertTooShort) -> capnp::Error {
    err(e)
}

/// A CI login's refusal on the wire: "busy" as `overloaded`, so a client
/// can tell it to retry without reading the text.
pub(super) fn login_err(e: crate::oidc::LoginError) -> capnp::Error {
    match e {
        crate::oidc::LoginError::Busy => capnp::Error::overloaded(e.to_string()),
        other => err(other),
    }
}

/// An upload's refusal for the uploader; disk trouble is the operator's
/// (logged with its path), not the pipeline's.
pub(super) fn upload_err(e: ArtifactError) -> capnp::Error {
    match e {
        ArtifactError::Io { .. } => {
            tracing::error!("storing an upload: {e}");
            failed("the coordinator could not store the upload (see its log)")
        }
        other => err(other),
    }
}

/// Waits for work handed to the multi-threaded runtime; a task that did
/// not finish is an error on the wire.
pub(super) async fn joined<T>(task: tokio::task::JoinHandle<T>) -> Result<T, capnp::Error> {
    task.await.map_err(err)
}

/// A capability object as a client, counted by `interface` (and with an
/// `actor`, its audited calls recorded).
pub(super) fn client<C, S>(
    server: S,
    interface: &'static str,
    state: &State,
    actor: Option<crate::audit::Actor>,
    app: Option<String>,
) -> C
where
    C: capnp::capability::FromServer<S>,
{
    let client: C = capnp_rpc::new_client(server);
    crate::metered::metered(client, interface, &state.observe, actor, app)
}

pub(super) fn write_info(state: &State, mut info: schema::miren_capnp::cluster_info::Builder<'_>) {
    let cluster = &state.cluster;
    info.set_name(&cluster.meta.name);
    info.set_version(cluster.build.to_string());
    info.set_issuer_url(state.issuer.url.as_str());
    info.set_cluster_id(&cluster.meta.id);
    let endpoints = state.address_with_peers().endpoints();
    let mut list = info.init_coordinators(endpoints.len() as u32);
    for (i, e) in endpoints.iter().enumerate() {
        list.set(i as u32, e.to_string());
    }
}

/// Audiences and lifetime of a token request (`ttl` 0 = the default).
pub(super) fn token_request(
    list: capnp::text_list::Reader<'_>,
    ttl_secs: u32,
) -> Result<(Vec<String>, Option<u64>), capnp::Error> {
    let mut audiences = Vec::new();
    for a in list {
        audiences.push(a?.to_str()?.to_string());
    }
    Ok((audiences, (ttl_secs != 0).then_some(u64::from(ttl_secs))))
}

pub(super) fn read_labels(
    list: capnp::struct_list::Reader<'_, label::Owned>,
) -> Result<Vec<(String, String)>, capnp::Error> {
    let mut out = Vec::new();
    for l in list {
        out.push((l.get_key()?.to_string()?, l.get_value()?.to_string()?));
    }
    Ok(out)
}

pub(super) fn write_labels(
    labels: &[(String, String)],
    mut list: capnp::struct_list::Builder<'_, label::Owned>,
) {
    for (i, (k, v)) in labels.iter().enumerate() {
        let mut l = list.reborrow().get(i as u32);
        l.set_key(k);
        l.set_value(v);
    }
}

pub(super) fn write_token_info(r: &JoinTokenRecord, now: i64, mut b: join_token_info::Builder<'_>) {
    b.set_id(&r.id);
    b.set_name(&r.name);
    b.set_reusable(r.reusable);
    b.set_uses(r.uses);
    b.set_created_unix(r.created_unix);
    b.set_expires_unix(r.expires_unix);
    b.set_state(crate::wire_types::join_token_state_to_wire(r.state(now)));
    write_labels(&r.labels, b.init_labels(r.labels.len() as u32));
}

pub(super) fn write_runner_info(v: &RunnerView, mut b: runner_info::Builder<'_>) {
    b.set_id(&v.record.id);
    b.set_name(&v.record.name);
    b.set_status(v.status());
    b.set_sandboxes(v.status.sandboxes);
    b.set_last_seen_unix(v.last_seen_unix);
    b.set_version(&v.status.version);
    b.set_cordoned(v.record.cordoned);
    b.set_isolation(v.status.isolation);
    b.set_limits(&v.status.limits);
    b.set_cert_expires_unix(v.record.cert_expires_unix);
    write_labels(
        &v.record.labels,
        b.init_labels(v.record.labels.len() as u32),
    );
}

/// A service's limits as sent by the CLI (absent: the runner's defaults).
pub(super) fn read_limits(
    s: schema::miren_capnp::service_spec::Reader<'_>,
) -> Result<ResourceLimits, capnp::Error> {
    if !s.has_limits() {
        return Ok(ResourceLimits::default());
    }
    Ok(crate::wire_types::read_limits(s.get_limits()?))
}

/// A sandbox to start, as the runner's agent reads it.
pub(super) fn write_spec(
    spec: &SandboxSpec,
    mut s: schema::miren_capnp::sandbox_spec::Builder<'_>,
) {
    s.set_id(&spec.id);
    s.set_app(&spec.app);
    s.set_version(&spec.version);
    s.set_service(&spec.service);
    s.set_command(&spec.command);
    s.set_port(spec.port);
    s.set_artifact_sha256(&spec.artifact);
    s.set_issuer_url(&spec.issuer_url);
    crate::wire_types::write_limits(&spec.limits, s.reborrow().init_limits());
    write_labels(&spec.env, s.init_env(spec.env.len() as u32));
}
