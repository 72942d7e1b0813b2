//! `App`: one app's capability, what a deploy pipeline needs and nothing
//! else (upload, deploy, status, logs). Handed out to admins (`Admin.app`)
//! and to CI tokens that match one of the app's bindings
//! (`Cluster.ciLogin`), so deploy has one code path.

use std::sync::Arc;

use capnp::capability::Rc;
use schema::miren_capnp::{app, artifact_upload};
use transport::clock::now_unix;

use super::wire::{app_err, client, joined, read_labels, read_limits, upload_err};
use super::UploadService;
use crate::apps::{AppError, Service};
use crate::state::State;

/// One app's capability.
pub struct AppService {
    state: Arc<State>,
    app: String,
}

impl AppService {
    pub fn new(state: Arc<State>, app: String) -> AppService {
        AppService { state, app }
    }
}

impl app::Server for AppService {
    async fn upload_artifact(
        self: Rc<Self>,
        _: app::UploadArtifactParams,
        mut results: app::UploadArtifactResults,
    ) -> Result<(), capnp::Error> {
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
        let status = self.state.apps.status(&self.app).map_err(app_err)?;
        crate::wire_types::write_app_status(&status, results.get().init_status());
        Ok(())
    }

    async fn logs(
        self: Rc<Self>,
        params: app::LogsParams,
        mut results: app::LogsResults,
    ) -> Result<(), capnp::Error> {
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
