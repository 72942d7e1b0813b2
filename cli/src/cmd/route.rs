//! `miren route`: which host goes to which app through the HTTP ingress.

use coordinator::route_oidc::EnableRequest;
use coordinator::sso::CALLBACK_PATH as CALLBACK;
use coordinator::wire_types::{
    read_providers, read_route_protection, read_routes, write_enable_request,
};

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
    /// Single sign-on in front of a route (labs: server --labs routeoidc).
    #[command(subcommand)]
    Oidc(OidcCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum OidcCmd {
    /// Protect a route with an OpenID provider; claims reach the app as headers.
    Enable {
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        host: Option<String>,
        #[arg(long)]
        default: bool,
        /// Reuse a stored provider (or name a new one).
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        provider_url: Option<String>,
        #[arg(long)]
        client_id: Option<String>,
        #[arg(long, env = "MIREN_OIDC_CLIENT_SECRET", hide_env_values = true)]
        client_secret: Option<String>,
        /// Scopes to ask for: `--scope openid email profile` and
        /// `--scope 'openid email profile'` mean the same (default
        /// `openid email profile`).
        #[arg(long, num_args = 1..)]
        scope: Vec<String>,
        /// CLAIM:HEADER, e.g. email:X-User-Email; repeatable, or several
        /// after one flag.
        #[arg(long = "claim-header", num_args = 1..)]
        claim_headers: Vec<String>,
        /// Replace the settings of an existing provider of that name, for
        /// every route that uses it (e.g. to rotate its client secret).
        #[arg(long, requires = "provider_url")]
        replace_provider: bool,
    },
    /// Show a route's protection (secrets are never shown).
    Show {
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        host: Option<String>,
        #[arg(long)]
        default: bool,
    },
    /// Remove a route's protection (the provider stays for reuse).
    Disable {
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        host: Option<String>,
        #[arg(long)]
        default: bool,
    },
    /// List providers.
    Providers {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a provider no route uses.
    RemoveProvider { name: String },
}

fn host_arg(host: Option<String>, default: bool) -> String {
    if default {
        String::new()
    } else {
        host.unwrap_or_default().to_ascii_lowercase()
    }
}

async fn oidc(admin: &schema::miren_capnp::admin::Client, cmd: OidcCmd) -> anyhow::Result<()> {
    match cmd {
        OidcCmd::Enable {
            host,
            default,
            provider,
            provider_url,
            client_id,
            client_secret,
            scope,
            claim_headers,
            replace_provider,
        } => {
            let host = host_arg(host, default);
            // The coordinator's own request type, written by the one
            // function the coordinator reads it back with.
            let config = EnableRequest {
                provider,
                provider_url,
                client_id,
                client_secret,
                scope: scope_list(&scope),
                claim_headers,
                replace_provider,
            };
            let mut req = admin.route_oidc_enable_request();
            req.get().set_host(&host);
            write_enable_request(&config, req.get().init_config());
            req.send().promise.await.map_err(remote)?;
            println!(
                "Route {} is protected by OIDC",
                if host.is_empty() { "(default)" } else { &host }
            );
            let shown = if host.is_empty() { "HOST" } else { &host };
            println!(
                "Register the redirect URI at the provider: https://{shown}{CALLBACK} (http:// and the port for a plain HTTP ingress{})",
                if host.is_empty() { "; one per host served by the default route" } else { "" }
            );
            Ok(())
        }
        OidcCmd::Show { host, default } => {
            let mut req = admin.route_oidc_show_request();
            req.get().set_host(host_arg(host, default));
            let reply = req.send().promise.await.map_err(remote)?;
            output::json(&read_route_protection(reply.get()?.get_route()?)?)
        }
        OidcCmd::Disable { host, default } => {
            let host = host_arg(host, default);
            let mut req = admin.route_oidc_disable_request();
            req.get().set_host(&host);
            req.send().promise.await.map_err(remote)?;
            println!(
                "Route {} is no longer protected by OIDC (the provider is kept)",
                if host.is_empty() { "(default)" } else { &host }
            );
            Ok(())
        }
        OidcCmd::Providers { output } => {
            let reply = admin
                .list_oidc_providers_request()
                .send()
                .promise
                .await
                .map_err(remote)?;
            let providers = read_providers(reply.get()?.get_providers()?)?;
            match output {
                Format::Json => output::json(&providers),
                Format::Table => {
                    let rows: Vec<Vec<String>> = providers
                        .into_iter()
                        .map(|p| vec![p.name, p.issuer, p.client_id, p.scope])
                        .collect();
                    output::table(&["NAME", "ISSUER", "CLIENT ID", "SCOPE"], &rows);
                    Ok(())
                }
            }
        }
        OidcCmd::RemoveProvider { name } => {
            let mut req = admin.remove_oidc_provider_request();
            req.get().set_name(&name);
            req.send().promise.await.map_err(remote)?;
            println!("Removed provider {name}");
            Ok(())
        }
    }
}

/// Scopes given as separate values or one quoted list, as one
/// space-separated list; none is `None` (the server's default).
fn scope_list(values: &[String]) -> Option<String> {
    let scopes: Vec<&str> = values.iter().flat_map(|v| v.split_whitespace()).collect();
    (!scopes.is_empty()).then(|| scopes.join(" "))
}

pub fn run(cmd: RouteCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let admin = session.admin().await?;
        let result = match cmd {
            RouteCmd::Oidc(o) => oidc(&admin, o).await,
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
                let routes = read_routes(reply.get()?.get_routes()?)?;
                match output {
                    Format::Json => output::json(&routes),
                    Format::Table => {
                        let rows: Vec<Vec<String>> = routes
                            .into_iter()
                            .map(|r| {
                                let host = if r.host.is_empty() {
                                    "(default)".to_string()
                                } else {
                                    r.host
                                };
                                vec![host, r.app]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enable_request_reads_back_as_the_coordinator_reads_it() {
        let sent = EnableRequest {
            provider: Some("corp".into()),
            provider_url: Some("https://login.example.com".into()),
            client_id: Some("id".into()),
            client_secret: Some("secret".into()),
            scope: scope_list(&["openid email".into(), "profile".into()]),
            claim_headers: vec!["email:X-User-Email".into()],
            replace_provider: true,
        };
        let mut message = capnp::message::Builder::new_default();
        write_enable_request(
            &sent,
            message.init_root::<schema::miren_capnp::route_oidc_config::Builder<'_>>(),
        );
        let root = message
            .get_root_as_reader::<schema::miren_capnp::route_oidc_config::Reader<'_>>()
            .expect("root");
        let read = coordinator::wire_types::read_enable_request(root).expect("read");
        assert_eq!(read.scope.as_deref(), Some("openid email profile"));
        assert_eq!(read, sent);
    }
}
