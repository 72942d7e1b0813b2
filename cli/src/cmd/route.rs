//! `miren route`: which host goes to which app through the HTTP ingress.

use serde_json::Value;

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum RouteCmd {
    /// Route HOST (or every other host, with --default) to an app.
    Set {
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        host: Option<String>,
        #[arg(long)]
        default: bool,
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
    },
    /// List routes.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a route.
    Remove {
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        host: Option<String>,
        #[arg(long)]
        default: bool,
    },
}

pub fn run(cmd: RouteCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let admin = session.admin().await?;
        let result = match cmd {
            RouteCmd::Set { host, default, app } => {
                let host = if default {
                    String::new()
                } else {
                    host.unwrap_or_default().to_ascii_lowercase()
                };
                let mut req = admin.set_route_request();
                req.get().set_host(&host);
                req.get().set_app(&app);
                req.send().promise.await.map_err(remote)?;
                println!(
                    "Route {} -> {app}",
                    if host.is_empty() { "(default)" } else { &host }
                );
                Ok(())
            }
            RouteCmd::Remove { host, default } => {
                let host = if default {
                    String::new()
                } else {
                    host.unwrap_or_default().to_ascii_lowercase()
                };
                let mut req = admin.remove_route_request();
                req.get().set_host(&host);
                req.send().promise.await.map_err(remote)?;
                println!(
                    "Removed route {}",
                    if host.is_empty() { "(default)" } else { &host }
                );
                Ok(())
            }
            RouteCmd::List { output } => {
                let reply = admin
                    .list_routes_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let routes: Value =
                    serde_json::from_str(reply.get()?.get_routes_json()?.to_str()?)?;
                match output {
                    Format::Json => output::json(&routes),
                    Format::Table => {
                        let rows: Vec<Vec<String>> = routes
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|r| {
                                let host = r["host"].as_str().unwrap_or_default();
                                vec![
                                    if host.is_empty() {
                                        "(default)".to_string()
                                    } else {
                                        host.to_string()
                                    },
                                    r["app"].as_str().unwrap_or_default().to_string(),
                                ]
                            })
                            .collect();
                        output::table(&["HOST", "APP"], &rows);
                        Ok(())
                    }
                }
            }
        };
        session.close().await;
        result
    })
}
