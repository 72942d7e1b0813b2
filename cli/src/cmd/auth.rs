//! `miren auth ci`: which CI pipelines may deploy which app, without secrets.

use anyhow::{anyhow, bail};
use identity::bindings::{Binding, Condition};
use serde_json::Value;

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum AuthCmd {
    /// CI (OIDC) authentication bindings.
    #[command(subcommand)]
    Ci(CiCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum CiCmd {
    /// Allow a CI pipeline to deploy an app.
    Add {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        /// GitHub repository OWNER/REPO (issuer and subject set for GitHub Actions).
        #[arg(long, conflicts_with = "issuer")]
        github: Option<String>,
        /// Issuer URL of another CI system (https).
        #[arg(long, requires = "subject")]
        issuer: Option<String>,
        /// Subject pattern (`*` any characters, `?` one).
        #[arg(long)]
        subject: Option<String>,
        /// Allowed events, comma-separated (GitHub default: push,workflow_dispatch).
        #[arg(long)]
        allowed_events: Option<String>,
        /// Allowed refs, comma-separated globs (e.g. 'refs/heads/main,refs/tags/v*').
        #[arg(long)]
        allowed_refs: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the bindings of an app.
    List {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a binding.
    Remove { id: String },
}

fn build(
    app: &str,
    github: Option<String>,
    issuer: Option<String>,
    subject: Option<String>,
    events: Option<String>,
    refs: Option<String>,
    description: &str,
) -> anyhow::Result<Binding> {
    match (github, issuer) {
        (Some(repo), None) => Ok(Binding::github(
            "new",
            app,
            &repo,
            subject.as_deref(),
            events.as_deref(),
            refs.as_deref(),
            description,
        )?),
        (None, Some(issuer)) => {
            let subject = subject.ok_or_else(|| anyhow!("--issuer needs --subject PATTERN"))?;
            let mut conditions = Vec::new();
            if let Some(e) = events {
                conditions.push(Condition::parse(identity::bindings::EVENT_NAME_CLAIM, &e)?);
            }
            if let Some(r) = refs {
                conditions.push(Condition::parse(identity::bindings::REF_CLAIM, &r)?);
            }
            Ok(Binding::generic(
                "new",
                app,
                &issuer,
                &subject,
                conditions,
                description,
            )?)
        }
        _ => bail!("say who may deploy: --github OWNER/REPO, or --issuer URL --subject PATTERN"),
    }
}

pub fn run(cmd: AuthCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    let AuthCmd::Ci(cmd) = cmd;
    // Validate locally first, so a bad binding never needs a round trip.
    let binding = match &cmd {
        CiCmd::Add {
            app,
            github,
            issuer,
            subject,
            allowed_events,
            allowed_refs,
            description,
        } => Some(build(
            app,
            github.clone(),
            issuer.clone(),
            subject.clone(),
            allowed_events.clone(),
            allowed_refs.clone(),
            description,
        )?),
        _ => None,
    };
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let admin = session.admin().await?;
        let result = match cmd {
            CiCmd::Add { app, .. } => {
                let binding = binding.ok_or_else(|| anyhow!("no binding"))?;
                let mut req = admin.add_ci_binding_request();
                req.get().set_binding_json(serde_json::to_string(&binding)?);
                let reply = req.send().promise.await.map_err(remote)?;
                let id = reply.get()?.get_id()?.to_string()?;
                println!(
                    "Added CI authentication binding {} for app {app}",
                    output::terminal_safe(&id)
                );
                Ok(())
            }
            CiCmd::List { app, output } => {
                let mut req = admin.list_ci_bindings_request();
                req.get().set_app(&app);
                let reply = req.send().promise.await.map_err(remote)?;
                let list: Value =
                    serde_json::from_str(reply.get()?.get_bindings_json()?.to_str()?)?;
                match output {
                    Format::Json => output::json(&list),
                    Format::Table => {
                        let rows: Vec<Vec<String>> = list
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|b| {
                                let conditions = b["conditions"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .map(|c| {
                                        format!(
                                            "{}={}",
                                            c["claim"].as_str().unwrap_or_default(),
                                            c["patterns"]
                                                .as_array()
                                                .into_iter()
                                                .flatten()
                                                .filter_map(|p| p.as_str())
                                                .collect::<Vec<_>>()
                                                .join(",")
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join(" ");
                                vec![
                                    b["id"].as_str().unwrap_or_default().to_string(),
                                    b["provider"].as_str().unwrap_or_default().to_string(),
                                    b["issuer"].as_str().unwrap_or_default().to_string(),
                                    b["subject"].as_str().unwrap_or_default().to_string(),
                                    conditions,
                                ]
                            })
                            .collect();
                        if rows.is_empty() {
                            println!("No CI authentication bindings found for app {app}");
                        } else {
                            output::table(
                                &["ID", "PROVIDER", "ISSUER", "SUBJECT", "CONDITIONS"],
                                &rows,
                            );
                        }
                        Ok(())
                    }
                }
            }
            CiCmd::Remove { id } => {
                let mut req = admin.remove_ci_binding_request();
                req.get().set_id(&id);
                req.send().promise.await.map_err(remote)?;
                println!("Removed CI authentication binding {id}");
                Ok(())
            }
        };
        session.close().await;
        result
    })
}
