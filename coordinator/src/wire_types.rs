//! The Cap'n Proto form of the typed views both ends of the admin and app
//! capabilities share: app status and logs, routes and their OIDC
//! protection, OIDC providers, signing keys, workload claims, and the
//! states that cross the wire as schema enums.
//!
//! Why here: the coordinator's services write these replies and the CLI
//! reads them back into the same Rust types to print tables or `-o json`,
//! so each shape is written and read by one pair of functions, and each
//! state enum is mapped to its schema twin once. A field added on one side
//! and not the other fails the round-trip tests below, not an operator.

use capnp::struct_list;
use identity::join_token::JoinTokenState;
use identity::route_oidc::ClaimHeader;
use identity::WorkloadClaims;
use schema::miren_capnp as wire;

use crate::apps::{
    AppStatus, ResourceLimits, SandboxLogs, SandboxStatus, SeenStatus, ServiceStatus, VersionStatus,
};
use crate::converge::VersionState;
use crate::keyring::{KeyState, KeyStatus};
use crate::route_oidc::{EnableRequest, RouteProtection, ShownOidc};
use crate::routes::{Route, RouteOidc, SecretNotShown, ShownProvider};

impl From<VersionState> for wire::VersionState {
    fn from(s: VersionState) -> Self {
        match s {
            VersionState::Deploying => wire::VersionState::Deploying,
            VersionState::Active => wire::VersionState::Active,
            VersionState::Failed => wire::VersionState::Failed,
            VersionState::Superseded => wire::VersionState::Superseded,
        }
    }
}

impl From<wire::VersionState> for VersionState {
    fn from(s: wire::VersionState) -> Self {
        match s {
            wire::VersionState::Deploying => VersionState::Deploying,
            wire::VersionState::Active => VersionState::Active,
            wire::VersionState::Failed => VersionState::Failed,
            wire::VersionState::Superseded => VersionState::Superseded,
        }
    }
}

impl From<KeyState> for wire::KeyState {
    fn from(s: KeyState) -> Self {
        match s {
            KeyState::Pending => wire::KeyState::Pending,
            KeyState::Active => wire::KeyState::Active,
            KeyState::Retired => wire::KeyState::Retired,
            KeyState::Expired => wire::KeyState::Expired,
            KeyState::Legacy => wire::KeyState::Legacy,
        }
    }
}

impl From<wire::KeyState> for KeyState {
    fn from(s: wire::KeyState) -> Self {
        match s {
            wire::KeyState::Pending => KeyState::Pending,
            wire::KeyState::Active => KeyState::Active,
            wire::KeyState::Retired => KeyState::Retired,
            wire::KeyState::Expired => KeyState::Expired,
            wire::KeyState::Legacy => KeyState::Legacy,
        }
    }
}

/// A join code's state on the wire.
pub fn join_token_state_to_wire(s: JoinTokenState) -> wire::JoinTokenState {
    match s {
        JoinTokenState::Valid => wire::JoinTokenState::Valid,
        JoinTokenState::Used => wire::JoinTokenState::Used,
        JoinTokenState::Revoked => wire::JoinTokenState::Revoked,
        JoinTokenState::Expired => wire::JoinTokenState::Expired,
    }
}

/// A join code's state as read from the wire.
pub fn join_token_state_from_wire(s: wire::JoinTokenState) -> JoinTokenState {
    match s {
        wire::JoinTokenState::Valid => JoinTokenState::Valid,
        wire::JoinTokenState::Used => JoinTokenState::Used,
        wire::JoinTokenState::Revoked => JoinTokenState::Revoked,
        wire::JoinTokenState::Expired => JoinTokenState::Expired,
    }
}

/// The word `runner list` shows for a runner's state: `ready` or `down`.
pub fn runner_state_word(s: wire::RunnerState) -> &'static str {
    match s {
        wire::RunnerState::Ready => "ready",
        wire::RunnerState::Down => "down",
    }
}

fn text_list(
    items: impl ExactSizeIterator<Item = impl AsRef<str>>,
    mut list: capnp::text_list::Builder<'_>,
) {
    for (i, t) in items.enumerate() {
        list.set(i as u32, t.as_ref());
    }
}

fn read_texts(list: capnp::text_list::Reader<'_>) -> Result<Vec<String>, capnp::Error> {
    list.iter().map(|t| Ok(t?.to_string()?)).collect()
}

/// Unset text: `None` (an empty text was given empty).
fn read_opt_text(
    has: bool,
    t: capnp::Result<capnp::text::Reader<'_>>,
) -> capnp::Result<Option<String>> {
    if has {
        Ok(Some(t?.to_string()?))
    } else {
        Ok(None)
    }
}

/// A service's or sandbox's limits on the wire (0 = the runner's default).
pub fn write_limits(l: &ResourceLimits, mut b: wire::resource_limits::Builder<'_>) {
    b.set_memory_bytes(l.memory_bytes);
    b.set_cpu_millis(l.cpu_millis);
    b.set_pids(l.pids);
}

/// Limits as read from the wire.
pub fn read_limits(r: wire::resource_limits::Reader<'_>) -> ResourceLimits {
    ResourceLimits {
        memory_bytes: r.get_memory_bytes(),
        cpu_millis: r.get_cpu_millis(),
        pids: r.get_pids(),
    }
}

/// `App.status` (and each of `Admin.listApps`).
pub fn write_app_status(s: &AppStatus, mut b: wire::app_status::Builder<'_>) {
    b.set_name(&s.name);
    b.set_active_version(s.active_version.as_deref().unwrap_or(""));
    let mut versions = b.reborrow().init_versions(s.versions.len() as u32);
    for (i, v) in s.versions.iter().enumerate() {
        let mut vb = versions.reborrow().get(i as u32);
        vb.set_id(&v.id);
        vb.set_state(v.state.into());
        vb.set_message(&v.message);
        vb.set_artifact(&v.artifact);
        vb.set_created_unix(v.created_unix);
        let mut services = vb.init_services(v.services.len() as u32);
        for (j, svc) in v.services.iter().enumerate() {
            let mut sb = services.reborrow().get(j as u32);
            sb.set_name(&svc.name);
            sb.set_instances(svc.instances);
            sb.set_port(svc.port);
            write_limits(&svc.limits, sb.init_limits());
        }
    }
    let mut sandboxes = b.init_sandboxes(s.sandboxes.len() as u32);
    for (i, sb) in s.sandboxes.iter().enumerate() {
        let mut w = sandboxes.reborrow().get(i as u32);
        w.set_id(&sb.id);
        w.set_version(&sb.version);
        w.set_service(&sb.service);
        w.set_runner(&sb.runner);
        w.set_retiring(sb.retiring);
        let seen = &sb.seen;
        match (seen.state, seen.unknown_since_unix) {
            (Some(state), _) => {
                let mut r = w.init_seen().init_reported();
                r.set_state(state.into());
                r.set_at_unix(seen.reported_unix);
                r.set_restarts(seen.restarts);
                r.set_address(&seen.address);
                r.set_last_exit(&seen.last_exit);
            }
            (None, since) => w.init_seen().set_unknown_since_unix(since.unwrap_or(0)),
        }
    }
}

/// [`write_app_status`]'s reply, as the CLI reads it.
pub fn read_app_status(r: wire::app_status::Reader<'_>) -> Result<AppStatus, capnp::Error> {
    let mut versions = Vec::new();
    for v in r.get_versions()? {
        let mut services = Vec::new();
        for s in v.get_services()? {
            services.push(ServiceStatus {
                name: s.get_name()?.to_string()?,
                instances: s.get_instances(),
                port: s.get_port(),
                limits: read_limits(s.get_limits()?),
            });
        }
        versions.push(VersionStatus {
            id: v.get_id()?.to_string()?,
            state: v.get_state()?.into(),
            message: v.get_message()?.to_string()?,
            artifact: v.get_artifact()?.to_string()?,
            created_unix: v.get_created_unix(),
            services,
        });
    }
    let mut sandboxes = Vec::new();
    for s in r.get_sandboxes()? {
        let seen = match s.get_seen().which()? {
            wire::sandbox_status::seen::Reported(rep) => {
                let rep = rep?;
                SeenStatus {
                    state: Some(rep.get_state()?.into()),
                    reported_unix: rep.get_at_unix(),
                    unknown_since_unix: None,
                    restarts: rep.get_restarts(),
                    address: rep.get_address()?.to_string()?,
                    last_exit: rep.get_last_exit()?.to_string()?,
                }
            }
            wire::sandbox_status::seen::UnknownSinceUnix(since) => SeenStatus::unknown_since(since),
        };
        sandboxes.push(SandboxStatus {
            id: s.get_id()?.to_string()?,
            version: s.get_version()?.to_string()?,
            service: s.get_service()?.to_string()?,
            runner: s.get_runner()?.to_string()?,
            retiring: s.get_retiring(),
            seen,
        });
    }
    let active = r.get_active_version()?.to_string()?;
    Ok(AppStatus {
        name: r.get_name()?.to_string()?,
        active_version: Some(active).filter(|a| !a.is_empty()),
        versions,
        sandboxes,
    })
}

/// `App.logs`: each sandbox's lines, or why its runner gave none (empty = it did).
pub fn write_logs(
    logs: &[SandboxLogs],
    mut list: struct_list::Builder<'_, wire::sandbox_logs::Owned>,
) {
    for (i, l) in logs.iter().enumerate() {
        let mut b = list.reborrow().get(i as u32);
        b.set_sandbox(&l.sandbox);
        b.set_version(&l.version);
        b.set_error(l.error.as_deref().unwrap_or(""));
        text_list(l.lines.iter(), b.init_lines(l.lines.len() as u32));
    }
}

/// [`write_logs`]'s reply, as the CLI reads it.
pub fn read_logs(
    list: struct_list::Reader<'_, wire::sandbox_logs::Owned>,
) -> Result<Vec<SandboxLogs>, capnp::Error> {
    let mut out = Vec::new();
    for l in list {
        let error = l.get_error()?.to_string()?;
        out.push(SandboxLogs {
            sandbox: l.get_sandbox()?.to_string()?,
            version: l.get_version()?.to_string()?,
            lines: read_texts(l.get_lines()?)?,
            error: Some(error).filter(|e| !e.is_empty()),
        });
    }
    Ok(out)
}

fn claim_headers(list: capnp::text_list::Reader<'_>) -> Result<Vec<ClaimHeader>, capnp::Error> {
    let mut out = Vec::new();
    for c in list {
        let text = c?.to_str()?;
        out.push(
            text.parse()
                .map_err(|e| capnp::Error::failed(format!("claim header {text:?}: {e}")))?,
        );
    }
    Ok(out)
}

fn write_claim_headers(headers: &[ClaimHeader], list: capnp::text_list::Builder<'_>) {
    text_list(headers.iter().map(ToString::to_string), list);
}

/// `Admin.listRoutes`.
pub fn write_routes(routes: &[Route], mut list: struct_list::Builder<'_, wire::route::Owned>) {
    for (i, r) in routes.iter().enumerate() {
        let mut b = list.reborrow().get(i as u32);
        b.set_host(&r.host);
        b.set_app(&r.app);
        if let Some(oidc) = &r.oidc {
            let mut o = b.init_oidc();
            o.set_provider(&oidc.provider);
            let n = oidc.claim_headers.len() as u32;
            write_claim_headers(&oidc.claim_headers, o.init_claim_headers(n));
        }
    }
}

/// [`write_routes`]'s reply; a claim header is checked again as it is read.
pub fn read_routes(
    list: struct_list::Reader<'_, wire::route::Owned>,
) -> Result<Vec<Route>, capnp::Error> {
    let mut out = Vec::new();
    for r in list {
        let oidc = if r.has_oidc() {
            let o = r.get_oidc()?;
            Some(RouteOidc {
                provider: o.get_provider()?.to_string()?,
                claim_headers: claim_headers(o.get_claim_headers()?)?,
            })
        } else {
            None
        };
        out.push(Route {
            host: r.get_host()?.to_string()?,
            app: r.get_app()?.to_string()?,
            oidc,
        });
    }
    Ok(out)
}

/// One provider, without its secret (there is no field for it).
pub fn write_provider(p: &ShownProvider, mut b: wire::oidc_provider::Builder<'_>) {
    b.set_name(&p.name);
    b.set_issuer(&p.issuer);
    b.set_client_id(&p.client_id);
    b.set_scope(&p.scope);
}

/// [`write_provider`]'s provider.
pub fn read_provider(r: wire::oidc_provider::Reader<'_>) -> Result<ShownProvider, capnp::Error> {
    Ok(ShownProvider {
        name: r.get_name()?.to_string()?,
        issuer: r.get_issuer()?.to_string()?,
        client_id: r.get_client_id()?.to_string()?,
        client_secret: SecretNotShown,
        scope: r.get_scope()?.to_string()?,
    })
}

/// `Admin.listOidcProviders`.
pub fn write_providers(
    providers: &[ShownProvider],
    mut list: struct_list::Builder<'_, wire::oidc_provider::Owned>,
) {
    for (i, p) in providers.iter().enumerate() {
        write_provider(p, list.reborrow().get(i as u32));
    }
}

/// [`write_providers`]'s reply.
pub fn read_providers(
    list: struct_list::Reader<'_, wire::oidc_provider::Owned>,
) -> Result<Vec<ShownProvider>, capnp::Error> {
    list.iter().map(read_provider).collect()
}

/// `Admin.routeOidcShow`.
pub fn write_route_protection(p: &RouteProtection, mut b: wire::route_oidc_shown::Builder<'_>) {
    b.set_host(&p.host);
    b.set_app(&p.app);
    if let Some(oidc) = &p.oidc {
        let mut o = b.init_oidc();
        if let Some(provider) = &oidc.provider {
            write_provider(provider, o.reborrow().init_provider());
        }
        let n = oidc.claim_headers.len() as u32;
        write_claim_headers(&oidc.claim_headers, o.init_claim_headers(n));
    }
}

/// [`write_route_protection`]'s reply.
pub fn read_route_protection(
    r: wire::route_oidc_shown::Reader<'_>,
) -> Result<RouteProtection, capnp::Error> {
    let oidc = if r.has_oidc() {
        let o = r.get_oidc()?;
        let provider = if o.has_provider() {
            Some(read_provider(o.get_provider()?)?)
        } else {
            None
        };
        Some(ShownOidc {
            provider,
            claim_headers: claim_headers(o.get_claim_headers()?)?,
        })
    } else {
        None
    };
    Ok(RouteProtection {
        host: r.get_host()?.to_string()?,
        app: r.get_app()?.to_string()?,
        oidc,
    })
}

/// `Admin.routeOidcEnable`'s request: a `None` stays unset.
pub fn write_enable_request(req: &EnableRequest, mut b: wire::route_oidc_config::Builder<'_>) {
    if let Some(p) = &req.provider {
        b.set_provider(p);
    }
    if let Some(u) = &req.provider_url {
        b.set_provider_url(u);
    }
    if let Some(id) = &req.client_id {
        b.set_client_id(id);
    }
    if let Some(s) = &req.client_secret {
        b.set_client_secret(s);
    }
    if let Some(s) = &req.scope {
        b.set_scope(s);
    }
    b.set_replace_provider(req.replace_provider);
    let n = req.claim_headers.len() as u32;
    text_list(req.claim_headers.iter(), b.init_claim_headers(n));
}

/// [`write_enable_request`]'s request, an unset text read as `None`.
pub fn read_enable_request(
    r: wire::route_oidc_config::Reader<'_>,
) -> Result<EnableRequest, capnp::Error> {
    Ok(EnableRequest {
        provider: read_opt_text(r.has_provider(), r.get_provider())?,
        provider_url: read_opt_text(r.has_provider_url(), r.get_provider_url())?,
        client_id: read_opt_text(r.has_client_id(), r.get_client_id())?,
        client_secret: read_opt_text(r.has_client_secret(), r.get_client_secret())?,
        scope: read_opt_text(r.has_scope(), r.get_scope())?,
        claim_headers: read_texts(r.get_claim_headers()?)?,
        replace_provider: r.get_replace_provider(),
    })
}

/// `Admin.verifyWorkloadToken`'s verified claims.
pub fn write_claims(c: &WorkloadClaims, mut b: wire::workload_claims::Builder<'_>) {
    b.set_iss(&c.iss);
    b.set_sub(&c.sub);
    b.set_iat(c.iat);
    b.set_nbf(c.nbf);
    b.set_exp(c.exp);
    b.set_jti(&c.jti);
    b.set_app(&c.app);
    b.set_sandbox_id(&c.sandbox_id);
    b.set_cluster_id(&c.cluster_id);
    b.set_organization_id(&c.organization_id);
    text_list(c.aud.iter(), b.init_aud(c.aud.len() as u32));
}

/// [`write_claims`]'s claims.
pub fn read_claims(r: wire::workload_claims::Reader<'_>) -> Result<WorkloadClaims, capnp::Error> {
    Ok(WorkloadClaims {
        iss: r.get_iss()?.to_string()?,
        sub: r.get_sub()?.to_string()?,
        aud: read_texts(r.get_aud()?)?,
        iat: r.get_iat(),
        nbf: r.get_nbf(),
        exp: r.get_exp(),
        jti: r.get_jti()?.to_string()?,
        app: r.get_app()?.to_string()?,
        sandbox_id: r.get_sandbox_id()?.to_string()?,
        cluster_id: r.get_cluster_id()?.to_string()?,
        organization_id: r.get_organization_id()?.to_string()?,
    })
}

/// `Admin.listSigningKeys` and `rotateSigningKey` (`retiresUnix` 0 = none).
pub fn write_keys(
    statuses: &[KeyStatus],
    mut list: struct_list::Builder<'_, wire::signing_key::Owned>,
) {
    for (i, s) in statuses.iter().enumerate() {
        let mut k = list.reborrow().get(i as u32);
        k.set_kid(&s.kid);
        k.set_alg(&s.alg);
        k.set_state(s.state.into());
        k.set_created_unix(s.created_unix);
        k.set_activates_unix(s.activates_unix);
        k.set_retires_unix(s.retires_unix.unwrap_or(0));
    }
}

/// [`write_keys`]'s reply.
pub fn read_keys(
    list: struct_list::Reader<'_, wire::signing_key::Owned>,
) -> Result<Vec<KeyStatus>, capnp::Error> {
    let mut out = Vec::new();
    for k in list {
        out.push(KeyStatus {
            kid: k.get_kid()?.to_string()?,
            alg: k.get_alg()?.to_string()?,
            state: k.get_state()?.into(),
            created_unix: k.get_created_unix(),
            activates_unix: k.get_activates_unix(),
            retires_unix: Some(k.get_retires_unix()).filter(|t| *t != 0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observed::SandboxState;
    use capnp::message::{Builder, HeapAllocator, ReaderOptions, TypedReader};
    use serde_json::json;

    /// Writes with `write` into a fresh message, then reads its root back
    /// with `read` (as the other end of a connection does).
    fn round_trip<O, T>(
        write: impl FnOnce(<O as capnp::traits::Owned>::Builder<'_>),
        read: impl FnOnce(<O as capnp::traits::Owned>::Reader<'_>) -> capnp::Result<T>,
    ) -> T
    where
        O: capnp::traits::Owned,
    {
        let mut message = Builder::new(HeapAllocator::new());
        write(message.init_root::<O::Builder<'_>>());
        let bytes = capnp::serialize::write_message_to_words(&message);
        let reader =
            capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], ReaderOptions::new())
                .expect("a message");
        let typed = TypedReader::<_, O>::new(reader);
        read(typed.get().expect("root")).expect("reads back")
    }

    fn status() -> AppStatus {
        AppStatus {
            name: "web".into(),
            active_version: Some("v2".into()),
            versions: vec![
                VersionStatus {
                    id: "v2".into(),
                    state: VersionState::Active,
                    message: String::new(),
                    artifact: "ab".repeat(32),
                    created_unix: 1_700_000_000,
                    services: vec![ServiceStatus {
                        name: "web".into(),
                        instances: 2,
                        port: 8080,
                        limits: ResourceLimits {
                            memory_bytes: 64 << 20,
                            cpu_millis: 500,
                            pids: 64,
                        },
                    }],
                },
                VersionStatus {
                    id: "v3".into(),
                    state: VersionState::Failed,
                    message: "gave up after 3 restarts".into(),
                    artifact: "cd".repeat(32),
                    created_unix: 1_700_000_100,
                    services: vec![],
                },
            ],
            sandboxes: vec![
                SandboxStatus {
                    id: "web-a".into(),
                    version: "v2".into(),
                    service: "web".into(),
                    runner: "r1".into(),
                    retiring: false,
                    seen: SeenStatus {
                        state: Some(SandboxState::Healthy),
                        reported_unix: 1_700_000_050,
                        unknown_since_unix: None,
                        restarts: 1,
                        address: "127.0.0.1:4000".into(),
                        last_exit: "exit status: 1".into(),
                    },
                },
                SandboxStatus {
                    id: "web-b".into(),
                    version: "v2".into(),
                    service: "web".into(),
                    runner: "r2".into(),
                    retiring: true,
                    seen: SeenStatus::unknown_since(1_700_000_060),
                },
            ],
        }
    }

    #[test]
    fn app_status_reads_back_as_written_and_prints_as_it_always_did() {
        let sent = status();
        let read = round_trip::<wire::app_status::Owned, _>(
            |b| write_app_status(&sent, b),
            read_app_status,
        );
        assert_eq!(read, sent);
        let none = AppStatus {
            active_version: None,
            ..status()
        };
        let read = round_trip::<wire::app_status::Owned, _>(
            |b| write_app_status(&none, b),
            read_app_status,
        );
        assert_eq!(read.active_version, None);
        // The `-o json` shape of before the schema carried it.
        let v = serde_json::to_value(&sent).expect("json");
        assert_eq!(v["active_version"], "v2");
        assert_eq!(v["versions"][1]["state"], "failed");
        assert_eq!(
            v["versions"][0]["services"][0],
            json!({"name": "web", "instances": 2, "port": 8080,
                   "limits": {"memory_bytes": 64 << 20, "cpu_millis": 500, "pids": 64}})
        );
        assert_eq!(
            v["sandboxes"][0],
            json!({"id": "web-a", "version": "v2", "service": "web", "runner": "r1",
                   "retiring": false, "state": "healthy", "reported_unix": 1_700_000_050,
                   "restarts": 1, "address": "127.0.0.1:4000", "last_exit": "exit status: 1"})
        );
        assert_eq!(
            v["sandboxes"][1],
            json!({"id": "web-b", "version": "v2", "service": "web", "runner": "r2",
                   "retiring": true, "state": "unknown", "reported_unix": 0,
                   "unknown_since_unix": 1_700_000_060, "restarts": 0, "address": "",
                   "last_exit": ""})
        );
        assert_eq!(
            serde_json::to_value(&none).expect("json")["active_version"],
            json!(null)
        );
    }

    #[test]
    fn logs_keep_their_lines_and_errors() {
        let sent = vec![
            SandboxLogs {
                sandbox: "web-a".into(),
                version: "v1".into(),
                lines: vec!["one".into(), "\x1b[2Jtwo".into()],
                error: None,
            },
            SandboxLogs {
                sandbox: "web-b".into(),
                version: "v1".into(),
                lines: vec![],
                error: Some("runner not connected".into()),
            },
        ];
        let mut message = Builder::new(HeapAllocator::new());
        let list = message.init_root::<wire::app::logs_results::Builder<'_>>();
        write_logs(&sent, list.init_sandboxes(sent.len() as u32));
        let root = message
            .get_root_as_reader::<wire::app::logs_results::Reader<'_>>()
            .expect("root");
        assert_eq!(
            read_logs(root.get_sandboxes().expect("list")).expect("read"),
            sent
        );
    }

    #[test]
    fn routes_protections_and_providers_read_back_without_secrets() {
        let header: ClaimHeader = "email:X-User-Email".parse().expect("a claim header");
        let routes = vec![
            Route {
                host: String::new(),
                app: "web".into(),
                oidc: None,
            },
            Route {
                host: "a.example.com".into(),
                app: "web".into(),
                oidc: Some(RouteOidc {
                    provider: "corp".into(),
                    claim_headers: vec![header.clone()],
                }),
            },
        ];
        let mut message = Builder::new(HeapAllocator::new());
        let root = message.init_root::<wire::admin::list_routes_results::Builder<'_>>();
        write_routes(&routes, root.init_routes(2));
        let r = message
            .get_root_as_reader::<wire::admin::list_routes_results::Reader<'_>>()
            .expect("root");
        let read = read_routes(r.get_routes().expect("list")).expect("read");
        assert_eq!(read, routes);
        assert_eq!(
            serde_json::to_value(&read).expect("json"),
            json!([{"host": "", "app": "web"},
                   {"host": "a.example.com", "app": "web",
                    "oidc": {"provider": "corp", "claim_headers": ["email:X-User-Email"]}}])
        );

        let provider = crate::routes::Provider {
            name: "corp".into(),
            issuer: "https://login.example.com".into(),
            client_id: "id".into(),
            client_secret: "hunter2".into(),
            scope: "openid".into(),
        };
        let shown = RouteProtection {
            host: "a.example.com".into(),
            app: "web".into(),
            oidc: Some(ShownOidc {
                provider: Some(provider.shown()),
                claim_headers: vec![header],
            }),
        };
        let read = round_trip::<wire::route_oidc_shown::Owned, _>(
            |b| write_route_protection(&shown, b),
            read_route_protection,
        );
        assert_eq!(read, shown);
        let v = serde_json::to_value(&read).expect("json");
        assert_eq!(
            v["oidc"]["provider"],
            json!({"name": "corp", "issuer": "https://login.example.com", "client_id": "id",
                   "client_secret": "(set, not shown)", "scope": "openid"})
        );
        let open = RouteProtection {
            oidc: None,
            ..shown
        };
        let read = round_trip::<wire::route_oidc_shown::Owned, _>(
            |b| write_route_protection(&open, b),
            read_route_protection,
        );
        assert_eq!(
            serde_json::to_value(&read).expect("json")["oidc"],
            json!(null)
        );
        // The secret is not in the message at all.
        let mut message = Builder::new(HeapAllocator::new());
        write_provider(&provider.shown(), message.init_root());
        let bytes = capnp::serialize::write_message_to_words(&message);
        assert!(!bytes.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn an_enable_request_tells_unset_from_empty() {
        let sent = EnableRequest {
            provider: None,
            provider_url: Some("https://login.example.com".into()),
            client_id: Some(String::new()),
            client_secret: Some("s".into()),
            scope: None,
            claim_headers: vec!["email:X-Email".into()],
            replace_provider: false,
        };
        let read = round_trip::<wire::route_oidc_config::Owned, _>(
            |b| write_enable_request(&sent, b),
            read_enable_request,
        );
        assert_eq!(read, sent);
    }

    #[test]
    fn claims_and_keys_read_back_as_written() {
        let claims = WorkloadClaims {
            iss: "https://c.example.com".into(),
            sub: "app:web:sandbox:web-a".into(),
            aud: vec!["miren".into(), "sts.amazonaws.com".into()],
            iat: 10,
            nbf: 10,
            exp: 3610,
            jti: "j".into(),
            app: "web".into(),
            sandbox_id: "web-a".into(),
            cluster_id: "c1".into(),
            organization_id: String::new(),
        };
        let read = round_trip::<wire::workload_claims::Owned, _>(
            |b| write_claims(&claims, b),
            read_claims,
        );
        assert_eq!(read, claims);
        assert!(serde_json::to_value(&read)
            .expect("json")
            .get("organization_id")
            .is_none());

        let keys = vec![
            KeyStatus {
                kid: "k1".into(),
                alg: "RS256".into(),
                state: KeyState::Active,
                created_unix: 1,
                activates_unix: 2,
                retires_unix: None,
            },
            KeyStatus {
                kid: "k0".into(),
                alg: "RS256".into(),
                state: KeyState::Retired,
                created_unix: 0,
                activates_unix: 0,
                retires_unix: Some(5),
            },
        ];
        let mut message = Builder::new(HeapAllocator::new());
        let root = message.init_root::<wire::admin::list_signing_keys_results::Builder<'_>>();
        write_keys(&keys, root.init_keys(2));
        let r = message
            .get_root_as_reader::<wire::admin::list_signing_keys_results::Reader<'_>>()
            .expect("root");
        let read = read_keys(r.get_keys().expect("list")).expect("read");
        assert_eq!(
            serde_json::to_value(&read).expect("json"),
            json!([{"kid": "k1", "alg": "RS256", "state": "active", "created_unix": 1,
                    "activates_unix": 2, "retires_unix": null},
                   {"kid": "k0", "alg": "RS256", "state": "retired", "created_unix": 0,
                    "activates_unix": 0, "retires_unix": 5}])
        );
    }

    #[test]
    fn every_state_maps_to_its_schema_twin_and_back() {
        use VersionState as V;
        for v in [V::Deploying, V::Active, V::Failed, V::Superseded] {
            assert_eq!(VersionState::from(wire::VersionState::from(v)), v);
        }
        use KeyState as K;
        for k in [K::Pending, K::Active, K::Retired, K::Expired, K::Legacy] {
            assert_eq!(KeyState::from(wire::KeyState::from(k)), k);
        }
        use JoinTokenState as J;
        for j in [J::Valid, J::Used, J::Revoked, J::Expired] {
            assert_eq!(join_token_state_from_wire(join_token_state_to_wire(j)), j);
        }
        use SandboxState as S;
        for s in [S::Starting, S::Healthy, S::Crashed, S::Failed, S::Stopped] {
            assert_eq!(SandboxState::from(wire::SandboxState::from(s)), s);
        }
        assert_eq!(runner_state_word(wire::RunnerState::Ready), "ready");
        assert_eq!(runner_state_word(wire::RunnerState::Down), "down");
    }
}
