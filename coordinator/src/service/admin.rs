//! `Admin`: what an operator holding the admin certificate may do — apps,
//! routes and route OIDC, CI bindings, join codes and runners, signing
//! keys and workload tokens, the audit trail, renewing its own
//! certificate.

use std::sync::Arc;

use capnp::capability::Rc;
use identity::Subject;
use schema::miren_capnp::{admin, app};
use transport::clock::now_unix;

use super::ci_wire::{read_binding, write_binding, write_test};
use super::wire::{
    admin_cert_err, app_err, ci_err, client, delete_err, err, failed, issuer_err, joined, mint_err,
    read_labels, registry_err, route_oidc_err, routes_err, runners_err, summary_err, token_request,
    write_info, write_runner_info, write_token_info,
};
use super::AppService;
use crate::audit::{Actor, Event};
use crate::state::State;
use crate::wire_types::{
    read_enable_request, write_app_status, write_claims, write_deploy_key, write_keys,
    write_providers, write_route_protection, write_routes, DeployKeyView,
};

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

/// A `renewAdmin` asking for less than [`MIN_ADMIN_CERT_SECS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an admin certificate must last at least 1h (asked for {asked_secs}s)")]
pub struct AdminCertTooShort {
    pub asked_secs: u64,
}

/// The lifetime `renewAdmin` issues for a request of `validity_secs`
/// (0 = the default).
pub fn admin_cert_validity(validity_secs: u64) -> Result<time::Duration, AdminCertTooShort> {
    use crate::datadir::ADMIN_CERT_LIFETIME;
    if validity_secs == 0 {
        return Ok(ADMIN_CERT_LIFETIME);
    }
    if validity_secs < MIN_ADMIN_CERT_SECS {
        return Err(AdminCertTooShort {
            asked_secs: validity_secs,
        });
    }
    let max = ADMIN_CERT_LIFETIME.whole_seconds() as u64;
    Ok(time::Duration::seconds(validity_secs.min(max) as i64))
}

impl AdminService {
    pub fn new(state: Arc<State>, name: String, actor: Actor) -> AdminService {
        AdminService { state, name, actor }
    }

    /// An audit line for a change this admin made.
    fn audit(&self, event: Event) {
        self.state.observe.changed(&self.actor, event);
    }
}

fn deploy_key_err(e: crate::deploy_keys::DeployKeyError) -> capnp::Error {
    failed(e.to_string())
}

impl admin::Server for AdminService {
    async fn create_deploy_key(
        self: Rc<Self>,
        params: admin::CreateDeployKeyParams,
        mut results: admin::CreateDeployKeyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let app = p.get_app()?.to_str()?;
        let ttl = Some(p.get_ttl_secs()).filter(|t| *t > 0);
        let now = now_unix();
        let made = (self.state.deploy_keys)
            .create(
                &self.state.address_with_peers(),
                app,
                p.get_description()?.to_str()?,
                ttl,
                now,
            )
            .map_err(deploy_key_err)?;
        self.audit(Event::DeployKeyCreated {
            key: made.record.id.as_str().into(),
            app: app.into(),
            expires_at: made.record.expires_at,
        });
        let mut r = results.get();
        r.set_key(made.key.encode());
        r.set_client_secret(&made.key.secret);
        write_deploy_key(&DeployKeyView::of(&made.record, now), r.init_info());
        Ok(())
    }

    async fn list_deploy_keys(
        self: Rc<Self>,
        params: admin::ListDeployKeysParams,
        mut results: admin::ListDeployKeysResults,
    ) -> Result<(), capnp::Error> {
        let app = params.get()?.get_app()?.to_str()?;
        let now = now_unix();
        let list = (self.state.deploy_keys).list(app).map_err(err)?;
        let mut out = results.get().init_keys(list.len() as u32);
        for (i, r) in list.iter().enumerate() {
            write_deploy_key(&DeployKeyView::of(r, now), out.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn rotate_deploy_key(
        self: Rc<Self>,
        params: admin::RotateDeployKeyParams,
        mut results: admin::RotateDeployKeyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = p.get_id()?.to_str()?;
        let now = now_unix();
        let made = (self.state.deploy_keys)
            .rotate(
                &self.state.address_with_peers(),
                id,
                Some(p.get_overlap_secs()),
                now,
            )
            .map_err(deploy_key_err)?;
        self.audit(Event::DeployKeyRotated {
            key: id.into(),
            app: made.record.app.as_str().into(),
            overlap_until: made.record.retired.first().map_or(now, |s| s.valid_until),
        });
        let mut r = results.get();
        r.set_key(made.key.encode());
        r.set_client_secret(&made.key.secret);
        write_deploy_key(&DeployKeyView::of(&made.record, now), r.init_info());
        Ok(())
    }

    async fn revoke_deploy_key(
        self: Rc<Self>,
        params: admin::RevokeDeployKeyParams,
        mut results: admin::RevokeDeployKeyResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id()?.to_str()?;
        let now = now_unix();
        let record = (self.state.deploy_keys)
            .revoke(id, now)
            .map_err(deploy_key_err)?;
        self.audit(Event::DeployKeyRevoked {
            key: id.into(),
            app: record.app.as_str().into(),
        });
        write_deploy_key(&DeployKeyView::of(&record, now), results.get().init_info());
        Ok(())
    }

    async fn renew_admin(
        self: Rc<Self>,
        params: admin::RenewAdminParams,
        mut results: admin::RenewAdminResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let validity = admin_cert_validity(p.get_validity_secs()).map_err(admin_cert_err)?;
        let csr = p.get_csr_der()?.to_vec();
        let common_name = format!("admin-{}", self.name);
        let state = self.state.clone();
        let cn = common_name.clone();
        // Signing is quick, but it is CPU work: off the RPC worker.
        let cert_pem = self
            .state
            .rt
            .spawn_blocking(move || state.cluster.ca.issue_client_for_csr(&cn, validity, &csr))
            .await
            .map_err(|e| failed(format!("issuing the admin certificate: {e}")))?
            .map_err(err)?;
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
        let service = AppService::new(self.state.clone(), name.clone());
        let actor = Some(self.actor.clone());
        let client: app::Client = client(service, "App", &self.state, actor, Some(name));
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
            out.push(self.state.apps.status(&a.name).map_err(app_err)?);
        }
        let mut list = results.get().init_apps(out.len() as u32);
        for (i, a) in out.iter().enumerate() {
            write_app_status(a, list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn set_route(
        self: Rc<Self>,
        params: admin::SetRouteParams,
        _: admin::SetRouteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (host, app) = (p.get_host()?.to_str()?, p.get_app()?.to_str()?);
        (self.state.routes)
            .set(&self.state.apps, host, app)
            .inspect(|()| {
                self.audit(Event::RouteSet {
                    host: host.into(),
                    app: app.into(),
                })
            })
            .map_err(routes_err)
    }

    async fn list_routes(
        self: Rc<Self>,
        _: admin::ListRoutesParams,
        mut results: admin::ListRoutesResults,
    ) -> Result<(), capnp::Error> {
        let routes = self.state.routes.list().map_err(routes_err)?;
        write_routes(&routes, results.get().init_routes(routes.len() as u32));
        Ok(())
    }

    async fn remove_route(
        self: Rc<Self>,
        params: admin::RemoveRouteParams,
        _: admin::RemoveRouteResults,
    ) -> Result<(), capnp::Error> {
        let host = params.get()?.get_host()?.to_str()?;
        (self.state.routes)
            .remove(host)
            .inspect(|()| self.audit(Event::RouteRemoved { host: host.into() }))
            .map_err(routes_err)
    }

    async fn add_ci_binding(
        self: Rc<Self>,
        params: admin::AddCiBindingParams,
        mut results: admin::AddCiBindingResults,
    ) -> Result<(), capnp::Error> {
        let binding = read_binding(params.get()?.get_binding()?)?;
        let summary = crate::observe::BindingSummary::of(&binding);
        let id = self.state.ci.add(binding, now_unix()).map_err(ci_err)?;
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
        let mut out = results.get().init_bindings(list.len() as u32);
        for (i, b) in list.iter().enumerate() {
            write_binding(out.reborrow().get(i as u32), b);
        }
        Ok(())
    }

    async fn test_ci_binding(
        self: Rc<Self>,
        params: admin::TestCiBindingParams,
        mut results: admin::TestCiBindingResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let app = params.get_app()?.to_str()?;
        let token = params.get_token()?.to_str()?;
        let st = &self.state;
        let simulation =
            crate::ci_simulate::simulate(&st.oidc, &st.ci, &st.rt, app, token, now_unix())
                .await
                .map_err(ci_err)?;
        write_test(
            results.get().init_result(),
            simulation.refused.as_deref(),
            &simulation.bindings,
        );
        Ok(())
    }

    async fn remove_ci_binding(
        self: Rc<Self>,
        params: admin::RemoveCiBindingParams,
        _: admin::RemoveCiBindingResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id()?.to_str()?;
        self.state.ci.remove(id).map_err(ci_err)?;
        self.audit(Event::BindingRemoved { binding: id.into() });
        Ok(())
    }

    async fn route_oidc_enable(
        self: Rc<Self>,
        params: admin::RouteOidcEnableParams,
        _: admin::RouteOidcEnableResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let req = read_enable_request(p.get_config()?)?;
        let host = p.get_host()?.to_str()?;
        let provider = req.provider.as_deref().map(Into::into);
        let st = &self.state;
        crate::route_oidc::enable(&st.routes, &st.labs, host, req)
            .inspect(|()| {
                self.audit(Event::RouteOidcEnabled {
                    host: host.into(),
                    provider,
                })
            })
            .map_err(route_oidc_err)
    }

    async fn route_oidc_show(
        self: Rc<Self>,
        params: admin::RouteOidcShowParams,
        mut results: admin::RouteOidcShowResults,
    ) -> Result<(), capnp::Error> {
        let host = params.get()?.get_host()?.to_str()?;
        let st = &self.state;
        let shown = crate::route_oidc::show(&st.routes, &st.labs, host).map_err(route_oidc_err)?;
        write_route_protection(&shown, results.get().init_route());
        Ok(())
    }

    async fn route_oidc_disable(
        self: Rc<Self>,
        params: admin::RouteOidcDisableParams,
        _: admin::RouteOidcDisableResults,
    ) -> Result<(), capnp::Error> {
        let host = params.get()?.get_host()?.to_str()?;
        crate::route_oidc::disable(&self.state.routes, host)
            .inspect(|()| self.audit(Event::RouteOidcDisabled { host: host.into() }))
            .map_err(route_oidc_err)
    }

    async fn list_oidc_providers(
        self: Rc<Self>,
        _: admin::ListOidcProvidersParams,
        mut results: admin::ListOidcProvidersResults,
    ) -> Result<(), capnp::Error> {
        let st = &self.state;
        let providers =
            crate::route_oidc::providers(&st.routes, &st.labs).map_err(route_oidc_err)?;
        write_providers(
            &providers,
            results.get().init_providers(providers.len() as u32),
        );
        Ok(())
    }

    async fn remove_oidc_provider(
        self: Rc<Self>,
        params: admin::RemoveOidcProviderParams,
        _: admin::RemoveOidcProviderResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_str()?;
        let st = &self.state;
        crate::route_oidc::remove_provider(&st.routes, &st.labs, name)
            .inspect(|()| {
                self.audit(Event::OidcProviderRemoved {
                    provider: name.into(),
                })
            })
            .map_err(route_oidc_err)
    }

    async fn delete_app(
        self: Rc<Self>,
        params: admin::DeleteAppParams,
        _: admin::DeleteAppResults,
    ) -> Result<(), capnp::Error> {
        let app = params.get()?.get_app()?.to_string()?;
        let state = self.state.clone();
        // Stopping talks to runners through Send channels: run it off this thread's borrow.
        let deleted = self
            .state
            .rt
            .spawn(async move { state.reconciler.delete_app(&app).await });
        joined(deleted).await?.map_err(delete_err)
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
                &self.state.address_with_peers(),
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

    async fn create_coordinator_code(
        self: Rc<Self>,
        params: admin::CreateCoordinatorCodeParams,
        mut results: admin::CreateCoordinatorCodeResults,
    ) -> Result<(), capnp::Error> {
        use crate::coordinator_codes::{self, CodeError};
        let ttl = match params.get()?.get_ttl_secs() {
            0 => identity::join_token::DEFAULT_TTL_SECS,
            n => n,
        };
        if self.state.cluster.shared.is_none() {
            return Err(err(CodeError::NotShared));
        }
        let now = now_unix();
        let (code, record) = coordinator_codes::create(
            &*self.state.store,
            &self.state.address_with_peers(),
            ttl,
            now,
        )
        .map_err(err)?;
        tracing::info!(code = %record.id, expires_unix = record.expires_unix, "coordinator code created");
        let mut r = results.get();
        r.set_code(&code);
        r.set_expires_unix(record.expires_unix);
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
        let runners = self.state.runners(now_unix()).map_err(runners_err)?;
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

    async fn drain_runner(
        self: Rc<Self>,
        params: admin::DrainRunnerParams,
        mut results: admin::DrainRunnerResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let record = self
            .state
            .registry
            .drain(p.get_id()?.to_str()?)
            .map_err(registry_err)?;
        self.state.observe.runner_cordoned(&self.actor, &record);
        self.state.apps.waker().notify_one();
        results.get().set_id(&record.id);
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
        .map_err(err)?;
        let (audiences, ttl) = token_request(p.get_audiences()?, p.get_ttl_secs())?;
        let token = (self.state.minting)
            .sign(self.actor.clone(), subject, audiences, ttl)
            .await
            .map_err(mint_err)?;
        results.get().set_token(&token);
        Ok(())
    }

    async fn rotate_signing_key(
        self: Rc<Self>,
        _: admin::RotateSigningKeyParams,
        mut results: admin::RotateSigningKeyResults,
    ) -> Result<(), capnp::Error> {
        let statuses = self.state.issuer.rotate(now_unix()).map_err(issuer_err)?;
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
        let verified = (self.state.issuer)
            .verifier(audience, now)
            .map_err(issuer_err)?
            .verify(token.trim(), now)
            .map_err(|e| failed(format!("token refused: {e}")))?;
        // An access token is not a workload token, whatever its audience.
        identity::access_token::refuse_access_token(&verified)
            .map_err(|e| failed(format!("token refused: {e}")))?;
        // Every other token this issuer signs carries workload claims.
        let claims: identity::WorkloadClaims =
            serde_json::from_value(serde_json::Value::Object(verified.claims))
                .map_err(|e| failed(format!("token refused: not a workload token: {e}")))?;
        write_claims(&claims, results.get().init_claims());
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        _: admin::StatusParams,
        mut results: admin::StatusResults,
    ) -> Result<(), capnp::Error> {
        let st = &self.state;
        let summary = st.summary(now_unix()).map_err(summary_err)?;
        let mut s = results.get().init_status();
        write_info(st, s.reborrow().init_info());
        s.set_uptime_secs(st.cluster.started.elapsed().as_secs());
        s.set_runners(summary.runners);
        s.set_apps(summary.apps);
        s.set_sandboxes(summary.sandboxes);
        s.set_join_tokens(summary.join_tokens);
        s.set_ci_bindings(summary.ci_bindings);
        s.set_signing_keys(summary.signing_keys);
        let listed = st.coordinators.list(&st.cluster.coordinator_id);
        let mut list = s.init_coordinators(listed.len() as u32);
        for (i, l) in listed.iter().enumerate() {
            let mut c = list.reborrow().get(i as u32);
            c.set_id(&l.record.id);
            c.set_name(&l.record.name);
            c.set_address(&l.record.address);
            c.set_version(&l.record.version);
            c.set_started_unix(l.record.started_unix);
            c.set_leader(l.leader);
        }
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
        let read = (self.state.rt).spawn_blocking(move || crate::audit::read(&dir, &query));
        let page = joined(read)
            .await?
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
        let statuses = self.state.issuer.statuses(now_unix()).map_err(issuer_err)?;
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
            .to_string()
            .contains("at least 1h"));
        assert_eq!(admin_cert_validity(3600), Ok(time::Duration::hours(1)));
    }
}
