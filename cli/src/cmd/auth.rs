//! `miren auth ci`: which CI pipelines may deploy which app, without secrets.

use std::io::Read as _;

use anyhow::{anyhow, bail};
use coordinator::service::ci_wire::{read_binding, read_test, write_binding, WireVerdict};
use identity::bindings::{
    Binding, Condition, IdPin, NAMESPACE_ID_CLAIM, OWNER_ID_CLAIM, PROJECT_ID_CLAIM,
    REPOSITORY_ID_CLAIM,
};
use identity::CheckOutcome;
use serde_json::{json, Value};

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum AuthCmd {
    /// CI (OIDC) authentication bindings: `miren auth ci APP --github
    /// OWNER/REPO` lets that repository's pipelines deploy APP.
    Ci(CiArgs),
}

/// `miren auth ci [APP] …` creates a binding; `add`, `list`, `remove` as
/// subcommands.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CiArgs {
    #[command(subcommand)]
    cmd: Option<CiCmd>,
    #[command(flatten)]
    add: Box<AddArgs>,
}

/// What a new binding is.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The app the pipeline may deploy (or -a APP, or MIREN_APP).
    #[arg(value_name = "APP")]
    app_arg: Option<String>,
    #[arg(short = 'a', long = "app", env = "MIREN_APP")]
    app: Option<String>,
    /// GitHub repository OWNER/REPO (issuer and subject set for GitHub
    /// Actions; with --issuer, a GitHub Enterprise Server's issuer).
    #[arg(long)]
    github: Option<String>,
    /// Issuer URL of another CI system (https).
    #[arg(long)]
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
    /// GitHub's immutable repository id (`repository_id` claim); without
    /// it, the first login pins the token's.
    #[arg(long, requires = "github")]
    repository_id: Option<String>,
    /// GitHub's immutable owner id (`repository_owner_id` claim); without
    /// it, the first login pins the token's.
    #[arg(long, requires = "github")]
    owner_id: Option<String>,
    /// GitLab's immutable project id (`project_id` claim).
    #[arg(long, conflicts_with = "github", requires = "issuer")]
    project_id: Option<String>,
    /// GitLab's immutable group or user id (`namespace_id` claim).
    #[arg(long, conflicts_with = "github", requires = "issuer")]
    namespace_id: Option<String>,
    /// Accept patterns that admit other repositories or branches than they
    /// name (`repo:acme/*`, `refs/heads/main*`).
    #[arg(long)]
    allow_broad: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum CiCmd {
    /// Allow a CI pipeline to deploy an app (the same as `miren auth ci APP …`).
    Add(Box<AddArgs>),
    /// List the bindings of an app.
    List {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a binding.
    Remove { id: String },
    /// Show what each binding of an app makes of a token, claim by claim,
    /// without logging in. Without --token in a CI job, the job's own token
    /// is fetched (with the cluster address as audience, as `deploy` does).
    Test {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        /// The token (a JWT), or `-` to read it from stdin.
        #[arg(long)]
        token: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

/// Longest token `auth ci test` reads from stdin (the coordinator refuses
/// tokens over 16 KiB anyway).
const MAX_STDIN_TOKEN_BYTES: u64 = 64 * 1024;

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
        let mut binding = build(
            &app,
            self.github.clone(),
            self.issuer.clone(),
            self.subject.clone(),
            comma_list(&self.allowed_events),
            comma_list(&self.allowed_refs),
            &self.description,
        )?;
        let given = [
            (REPOSITORY_ID_CLAIM, &self.repository_id),
            (OWNER_ID_CLAIM, &self.owner_id),
            (PROJECT_ID_CLAIM, &self.project_id),
            (NAMESPACE_ID_CLAIM, &self.namespace_id),
        ];
        let pins = given
            .iter()
            .filter_map(|(claim, value)| value.as_ref().map(|v| IdPin::given(claim, v)))
            .collect::<Result<Vec<_>, _>>()?;
        binding = binding.with_ids(pins)?;
        binding.allow_broad = self.allow_broad;
        identity::check_breadth(&binding)?;
        Ok(binding)
    }
}

/// The pinned ids as `claim=value` words; learned ones are marked.
fn pinned_ids(b: &Binding) -> String {
    let mut words: Vec<String> = b
        .ids
        .iter()
        .map(|p| match p.learned_unix {
            Some(at) => format!(
                "{}={} (learned {})",
                p.claim,
                p.value,
                output::time(Some(at))
            ),
            None => format!("{}={}", p.claim, p.value),
        })
        .collect();
    let unpinned: Vec<&str> = b
        .learns()
        .iter()
        .copied()
        .filter(|claim| b.id_pin(claim).is_none())
        .collect();
    if !unpinned.is_empty() {
        words.push(format!("{} pinned at first login", unpinned.join(",")));
    }
    words.join(" ")
}

/// What a created binding is, as people read it.
fn describe(b: &Binding) -> String {
    let conditions = b
        .conditions
        .iter()
        .map(|c| format!("{}={}", c.claim, c.patterns.join(",")))
        .collect::<Vec<_>>()
        .join(" ");
    let ids = pinned_ids(b);
    let rows = [
        ("ID", b.id.as_str()),
        ("App", b.app.as_str()),
        ("Provider", b.provider.as_str()),
        ("Issuer", b.issuer.as_str()),
        ("Subject", b.subject.as_str()),
        ("Description", b.description.as_str()),
        ("Conditions", conditions.as_str()),
        ("Ids", ids.as_str()),
        ("Broad", if b.allow_broad { "allowed" } else { "refused" }),
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
        (Some(repo), issuer) => {
            let binding = Binding::github(
                "new",
                app,
                &repo,
                subject.as_deref(),
                events.as_deref(),
                refs.as_deref(),
                description,
            )?;
            // GitHub Enterprise Server: GitHub's claims, its own issuer.
            Ok(match issuer {
                Some(issuer) => binding.with_issuer(&issuer)?,
                None => binding,
            })
        }
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
        (None, None) => {
            bail!("say who may deploy: --github OWNER/REPO, or --issuer URL --subject PATTERN")
        }
    }
}

pub fn run(cmd: AuthCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    let AuthCmd::Ci(args) = cmd;
    let cmd = match args.cmd {
        Some(cmd) => cmd,
        None => CiCmd::Add(args.add),
    };
    let binding = match &cmd {
        CiCmd::Add(add) => Some(add.binding()?),
        _ => None,
    };
    let stdin_token = match &cmd {
        CiCmd::Test { token, .. } if token.as_deref() == Some("-") => Some(read_stdin_token()?),
        _ => None,
    };
    run_local(async move {
        let target = resolve(cluster)?;
        let audience = target.address.host_port();
        let session = Session::open(target).await?;
        let admin = session.admin().await?;
        let result = match cmd {
            CiCmd::Add(_) => {
                let mut binding = binding.ok_or_else(|| anyhow!("no binding"))?;
                let mut req = admin.add_ci_binding_request();
                write_binding(req.get().init_binding(), &binding);
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
                let list = reply
                    .get()?
                    .get_bindings()?
                    .iter()
                    .map(read_binding)
                    .collect::<Result<Vec<Binding>, capnp::Error>>()?;
                match output {
                    Format::Json => output::json(&serde_json::to_value(&list)?),
                    Format::Table => {
                        let rows: Vec<Vec<String>> = list
                            .iter()
                            .map(|b| {
                                let conditions = b
                                    .conditions
                                    .iter()
                                    .map(Condition::to_string)
                                    .collect::<Vec<_>>()
                                    .join(" ");
                                vec![
                                    b.id.clone(),
                                    b.provider.clone(),
                                    b.issuer.clone(),
                                    b.subject.clone(),
                                    conditions,
                                    pinned_ids(b),
                                ]
                            })
                            .collect();
                        if rows.is_empty() {
                            println!("No CI authentication bindings found for app {app}");
                        } else {
                            output::table(
                                &["ID", "PROVIDER", "ISSUER", "SUBJECT", "CONDITIONS", "IDS"],
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
            CiCmd::Test { app, token, output } => {
                let token = match (stdin_token, token) {
                    (Some(t), _) => t,
                    (None, Some(t)) => t,
                    (None, None) if crate::ci::in_ci() => crate::ci::oidc_token(&audience).await?,
                    (None, None) => bail!(
                        "which token? --token JWT, --token - to read it from stdin, or run in a CI job to use the job's own"
                    ),
                };
                let mut req = admin.test_ci_binding_request();
                req.get().set_app(&app);
                req.get().set_token(token.trim());
                let reply = req.send().promise.await.map_err(remote)?;
                let test = read_test(reply.get()?.get_result()?)?;
                show_test(&app, &test, output)
            }
        };
        session.close().await;
        result
    })
}

/// The token from stdin, at most [`MAX_STDIN_TOKEN_BYTES`].
fn read_stdin_token() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_STDIN_TOKEN_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_STDIN_TOKEN_BYTES {
        bail!("the token on stdin is longer than {MAX_STDIN_TOKEN_BYTES} bytes; a CI token is a few KiB");
    }
    Ok(text.trim().to_string())
}

fn outcome_word(o: CheckOutcome) -> &'static str {
    match o {
        CheckOutcome::Matched => "match",
        CheckOutcome::Mismatched => "MISMATCH",
        CheckOutcome::Missing => "MISSING",
        CheckOutcome::WillPin => "will pin",
    }
}

/// Prints a token test; fails when a login with the token would be refused.
fn show_test(
    app: &str,
    test: &coordinator::service::ci_wire::BindingTest,
    output: Format,
) -> anyhow::Result<()> {
    let accepted = test.token_problem.is_none()
        && test
            .bindings
            .iter()
            .any(|b| b.verdict == WireVerdict::Accepts);
    match output {
        Format::Json => {
            let bindings: Vec<Value> = test
                .bindings
                .iter()
                .map(|b| {
                    let (verdict, drift) = match &b.verdict {
                        WireVerdict::Accepts => ("accepts", None),
                        WireVerdict::NoMatch => ("no_match", None),
                        WireVerdict::Drift(d) => ("drift", Some(d.as_str())),
                    };
                    let checks: Vec<Value> = b
                        .checks
                        .iter()
                        .map(|c| {
                            json!({
                                "claim": c.claim,
                                "expected": c.expected,
                                "token_value": c.token_value,
                                "outcome": outcome_word(c.outcome).to_lowercase().replace(' ', "_"),
                            })
                        })
                        .collect();
                    json!({"id": b.binding.id, "verdict": verdict, "drift": drift, "checks": checks})
                })
                .collect();
            output::json(&json!({
                "app": app,
                "token_valid": test.token_problem.is_none(),
                "token_problem": test.token_problem,
                "accepted": accepted,
                "bindings": bindings,
            }))?;
        }
        Format::Table => {
            match &test.token_problem {
                None => println!("Token: verified (signature, issuer, audience, times)"),
                Some(p) => println!(
                    "Token: refused before any binding: {}",
                    output::terminal_safe(p)
                ),
            }
            if test.bindings.is_empty() {
                println!(
                    "No CI authentication bindings found for app {}",
                    output::terminal_safe(app)
                );
            }
            for b in &test.bindings {
                let verdict = match &b.verdict {
                    WireVerdict::Accepts => "accepts the token".to_string(),
                    WireVerdict::NoMatch => "does not match".to_string(),
                    WireVerdict::Drift(d) => format!("refuses: {d}"),
                };
                println!(
                    "\nBinding {} ({}): {}",
                    output::terminal_safe(&b.binding.id),
                    output::terminal_safe(&b.binding.provider),
                    output::terminal_safe(&verdict)
                );
                let rows: Vec<Vec<String>> = b
                    .checks
                    .iter()
                    .map(|c| {
                        let expected = match c.outcome {
                            CheckOutcome::WillPin => "(first login pins it)".to_string(),
                            _ => c.expected.join(","),
                        };
                        vec![
                            c.claim.clone(),
                            expected,
                            c.token_value
                                .clone()
                                .unwrap_or_else(|| "(absent)".to_string()),
                            outcome_word(c.outcome).to_string(),
                        ]
                    })
                    .collect();
                output::table(&["CLAIM", "BINDING EXPECTS", "TOKEN HAS", "RESULT"], &rows);
            }
        }
    }
    if accepted {
        Ok(())
    } else {
        bail!("a CI login for app {app} with this token would be refused")
    }
}
