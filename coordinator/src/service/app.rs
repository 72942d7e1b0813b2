//! `App`: one app's capability, what a deploy pipeline needs and nothing
//! else (upload, deploy, status, logs). Handed out to admins (`Admin.app`)
//! and to access tokens from the token endpoint (`Cluster.login`, and
//! `Cluster.ciLogin` through it), so deploy has one code path. A token's
//! scope may narrow it to some of those actions.

use std::sync::Arc;

use capnp::capability::Rc;
use schema::miren_capnp::{app, artifact_upload};
use transport::clock::now_unix;

use super::wire::{app_err, client, joined, read_labels, read_limits, upload_err};
use super::UploadService;
use crate::apps::{AppError, Service};
use crate::state::State;
use identity::oauth::{Action, Scope};

/// The credential a session logged in with, checked again before each
/// call: a capability must not outlive its token, its key or its binding.
pub struct LoggedIn {
    /// The access token's `exp` (Unix seconds).
    pub not_after: i64,
    /// Whose token it was.
    pub caller: identity::access_token::Caller,
}

/// One app's capability.
pub struct AppService {
    state: Arc<State>,
    app: String,
    /// What may be done (every action for an admin).
    scope: Scope,
    /// `None` for an admin (its certificate is checked by TLS).
    login: Option<LoggedIn>,
}

impl AppService {
    /// The whole of `app`.
    pub fn new(state: Arc<State>, app: String) -> AppService {
        let scope = Scope::whole_app(&app);
        AppService {
            state,
            app,
            scope,
            login: None,
        }
    }

    /// The app `scope` names, confined to its actions, for as long as
    /// `login` holds.
    pub fn confined(state: Arc<State>, scope: Scope, login: LoggedIn) -> AppService {
        AppService {
            state,
            app: scope.app.clone(),
            scope,
            login: Some(login),
        }
    }

    fn allow(&self, action: Action) -> Result<(), capnp::Error> {
        if !self.scope.allows(action) {
            return Err(super::wire::failed(format!(
                "permission denied: this token's scope ({}) does not include app:{}:{}",
                self.scope.to_scope_string(),
                self.app,
                action.as_str()
            )));
        }
        let Some(login) = &self.login else {
            return Ok(());
        };
        let now = now_unix();
        if now >= login.not_after {
            return Err(super::wire::failed(
                "permission denied: the access token this session logged in with has expired; log in again (run the command again)",
            ));
        }
        let still = match &login.caller {
            identity::access_token::Caller::DeployKey(id) => self
                .state
                .deploy_keys
                .is_usable(id, now)
                .map_err(|e| super::wire::failed(format!("checking the deploy key: {e}")))?,
            identity::access_token::Caller::Ci(binding) => self.state.ci.exists(binding),
        };
        if !still {
            return Err(super::wire::failed(
                "permission denied: the deploy key or CI binding this session logged in with was revoked, removed or has expired",
            ));
        }
        Ok(())
    }
}

impl app::Server for AppService {
    async fn upload_artifact(
        self: Rc<Self>,
        _: app::UploadArtifactParams,
        mut results: app::UploadArtifactResults,
    ) -> Result<(), capnp::Error> {
        self.allow(Action::Deploy)?;
        let upload = self.state.apps.upload(&self.app).map_err(|e| match e {
            AppError::Artifact(e) => upload_err(e),
            other => app_err(other),
        })?;
        let service = UploadService::new(upload, self.state.rt.clone());
        let client: artifact_upload::Client =
            client(service, "ArtifactUpload", &self.state, None, None);
        results.get().set_upload(client);
        Ok(())
    }

    async fn deploy(
        self: Rc<Self>,
        params: app::DeployParams,
        mut results: app::DeployResults,
    ) -> Result<(), capnp::Error> {
        self.allow(Action::Deploy)?;
        let p = params.get()?;
        let mut services = Vec::new();
        for s in p.get_services()? {
            services.push(Service {
                name: s.get_name()?.to_string()?,
                command: s.get_command()?.to_string()?,
                port: s.get_port(),
                instances: s.get_instances(),
                env: read_labels(s.get_env()?)?,
                limits: read_limits(s)?,
            });
        }
        let version = self
            .state
            .apps
            .deploy(
                &self.app,
                p.get_artifact_sha256()?.to_str()?,
                services,
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
        self.allow(Action::Status)?;
        let status = self.state.apps.status(&self.app).map_err(app_err)?;
        crate::wire_types::write_app_status(&status, results.get().init_status());
        Ok(())
    }

    async fn logs(
        self: Rc<Self>,
        params: app::LogsParams,
        mut results: app::LogsResults,
    ) -> Result<(), capnp::Error> {
        self.allow(Action::Logs)?;
        let lines = params.get()?.get_lines().clamp(1, 10_000);
        let state = self.state.clone();
        let app = self.app.clone();
        let logs = (self.state.rt)
            .spawn(async move { state.apps.logs(&state.registry, &app, lines).await });
        let logs = joined(logs).await?.map_err(app_err)?;
        crate::wire_types::write_logs(&logs, results.get().init_sandboxes(logs.len() as u32));
        Ok(())
    }
}
