//! `miren auth ci`: which CI pipelines may deploy which app, without secrets.

use anyhow::{anyhow, bail};
use identity::bindings::{Binding, Condition};
use serde_json::Value;

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum AuthCmd {
    /// CI (OIDC) authentication bindings: `miren auth ci APP --github
    /// OWNER/REPO` lets that repository's pipelines deploy APP.
    Ci(Box<CiArgs>),
    /// Deploy keys for CI systems without OIDC (`MIREN_API_KEY`).
    #[command(subcommand)]
    Key(super::auth_key::KeyCmd),
}

/// `miren auth ci [APP] …` creates a binding; `add`, `list`, `remove` as
/// subcommands.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CiArgs {
    #[command(subcommand)]
    cmd: Option<CiCmd>,
    #[command(flatten)]
    add: AddArgs,
}

/// What a new binding is.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The app the pipeline may deploy (or -a APP, or MIREN_APP).
    #[arg(value_name = "APP")]
    app_arg: Option<String>,
    #[arg(short = 'a', long = "app", env = "MIREN_APP")]
    app: Option<String>,
    /// GitHub repository OWNER/REPO (issuer and subject set for GitHub Actions).
    #[arg(long, conflicts_with = "issuer")]
    github: Option<String>,
    /// Issuer URL of another CI system (https).
    #[arg(long, requires = "subject")]
    issuer: Option<String>,
    /// Subject pattern (`*` any characters, `?` one).
    #[arg(long)]
    subject: Option<String>,
    /// Allowed events: comma-separated and/or repeated (GitHub default:
    /// push,workflow_dispatch).
    #[arg(long, num_args = 1..)]
    allowed_events: Vec<String>,
    /// Allowed refs, globs: comma-separated and/or repeated (e.g.
    /// 'refs/heads/main,refs/tags/v*').
    #[arg(long, num_args = 1..)]
    allowed_refs: Vec<String>,
    #[arg(long, default_value = "")]
    description: String,
}

#[derive(clap::Subcommand, Debug)]
pub enum CiCmd {
    /// Allow a CI pipeline to deploy an app (the same as `miren auth ci APP …`).
    Add(AddArgs),
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

/// A multi-valued flag as one comma list: `--x a,b --x c` and `--x a b c`
/// mean `a,b,c`; none is `None`.
fn comma_list(values: &[String]) -> Option<String> {
    let parts: Vec<&str> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

impl AddArgs {
    /// The binding these arguments describe, checked locally so a bad one
    /// never needs a round trip.
    fn binding(&self) -> anyhow::Result<Binding> {
        let app = match (&self.app_arg, &self.app) {
            (Some(a), Some(b)) if a != b => {
                bail!("two apps named: {a} (argument) and {b} (-a or MIREN_APP); name one")
            }
            (Some(a), _) | (None, Some(a)) => a.clone(),
            (None, None) => bail!(
                "which app may the pipeline deploy? `miren auth ci APP --github OWNER/REPO` (or -a APP, or MIREN_APP)"
            ),
        };
        build(
            &app,
            self.github.clone(),
            self.issuer.clone(),
            self.subject.clone(),
            comma_list(&self.allowed_events),
            comma_list(&self.allowed_refs),
            &self.description,
        )
    }
}

/// What a created binding is, as people read it.
fn describe(b: &Binding) -> String {
    let conditions = b
        .conditions
        .iter()
        .map(|c| format!("{}={}", c.claim, c.patterns.join(",")))
        .collect::<Vec<_>>()
        .join(" ");
    let rows = [
        ("ID", b.id.as_str()),
        ("App", b.app.as_str()),
        ("Provider", b.provider.as_str()),
        ("Issuer", b.issuer.as_str()),
        ("Subject", b.subject.as_str()),
        ("Description", b.description.as_str()),
        ("Conditions", conditions.as_str()),
    ];
    rows.iter()
        .map(|(k, v)| format!("  {k:<12} {}", output::terminal_safe(v)))
        .collect::<Vec<_>>()
        .join("\n")
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
    let args = match cmd {
        AuthCmd::Ci(args) => *args,
        AuthCmd::Key(key) => return super::auth_key::run(key, cluster),
    };
    let cmd = match args.cmd {
        Some(cmd) => cmd,
        None => CiCmd::Add(args.add),
    };
    let binding = match &cmd {
        CiCmd::Add(add) => Some(add.binding()?),
        _ => None,
    };
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let admin = session.admin().await?;
        let result = match cmd {
            CiCmd::Add(_) => {
                let mut binding = binding.ok_or_else(|| anyhow!("no binding"))?;
                let mut req = admin.add_ci_binding_request();
                req.get().set_binding_json(serde_json::to_string(&binding)?);
                let reply = req.send().promise.await.map_err(remote)?;
                binding.id = reply.get()?.get_id()?.to_string()?;
                println!(
                    "Added CI authentication binding {} for app {}\n{}",
                    output::terminal_safe(&binding.id),
                    output::terminal_safe(&binding.app),
                    describe(&binding)
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
