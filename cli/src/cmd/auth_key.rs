//! `miren auth key`: deploy keys, for CI systems without OIDC.
//!
//! `create` prints the key once (`miren_key_…`: cluster address with its
//! pin, client id and secret in one string for `MIREN_API_KEY`); `list`
//! never shows a secret; `rotate` makes a new secret while the old one
//! keeps working for the overlap; `revoke` ends a key at once. The rules
//! are `identity::deploy_key`, enforced by the coordinator.

use std::time::Duration;

use coordinator::wire_types::{read_deploy_key, DeployKeyView};
use identity::deploy_key;
use serde::Serialize;

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a deploy key for an app; the key is printed once.
    Create {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        /// Lifetime (at most 365d).
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        expires: Duration,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// List the deploy keys of an app (never their secrets).
    List {
        #[arg(short = 'a', long = "app", env = "MIREN_APP")]
        app: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Give a key a new secret; the old one keeps working for the overlap.
    Rotate {
        id: String,
        /// How long the old secret keeps working (at most 7d; 0s ends it now).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        overlap: Duration,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke a key at once.
    Revoke { id: String },
}

/// What `create` and `rotate` print with `-o json`: the key, and its
/// parts apart for OAuth clients configured by hand.
#[derive(Serialize)]
struct NewKeyDoc<'a> {
    #[serde(flatten)]
    view: &'a DeployKeyView,
    client_secret: &'a str,
    key: &'a str,
}

fn print_key(
    key: &str,
    secret: &str,
    view: &DeployKeyView,
    output: Format,
    verb: &str,
) -> anyhow::Result<()> {
    if output == Format::Json {
        return output::json(&NewKeyDoc {
            view,
            client_secret: secret,
            key,
        });
    }
    println!(
        "{verb} deploy key {} for app {} (expires {})",
        output::terminal_safe(&view.id),
        output::terminal_safe(&view.app),
        output::time(Some(view.expires_at))
    );
    println!("Store it as the secret MIREN_API_KEY; it is not shown again:\n\n{key}\n");
    Ok(())
}

pub fn run(cmd: KeyCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    if let KeyCmd::Create { expires, .. } = &cmd {
        deploy_key::check_ttl(Some(expires.as_secs()))?;
    }
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let admin = session.admin().await?;
        let result = match cmd {
            KeyCmd::Create {
                app,
                expires,
                description,
                output,
            } => {
                let mut req = admin.create_deploy_key_request();
                req.get().set_app(&app);
                req.get().set_ttl_secs(expires.as_secs());
                req.get().set_description(&description);
                let reply = req.send().promise.await.map_err(remote)?;
                let r = reply.get()?;
                let view = read_deploy_key(r.get_info()?)?;
                let secret = r.get_client_secret()?.to_str()?;
                print_key(r.get_key()?.to_str()?, secret, &view, output, "Created")
            }
            KeyCmd::List { app, output } => {
                let mut req = admin.list_deploy_keys_request();
                req.get().set_app(&app);
                let reply = req.send().promise.await.map_err(remote)?;
                let list = reply
                    .get()?
                    .get_keys()?
                    .iter()
                    .map(read_deploy_key)
                    .collect::<Result<Vec<_>, _>>()?;
                if output == Format::Json {
                    output::json(&list)
                } else {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.clone(),
                                k.app.clone(),
                                k.state.as_str().to_string(),
                                output::time(Some(k.created_at)),
                                output::time(Some(k.expires_at)),
                                output::time(k.last_used_at),
                                k.description.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "ID",
                            "APP",
                            "STATE",
                            "CREATED",
                            "EXPIRES",
                            "LAST USED",
                            "DESCRIPTION",
                        ],
                        &rows,
                    );
                    Ok(())
                }
            }
            KeyCmd::Rotate {
                id,
                overlap,
                output,
            } => {
                let mut req = admin.rotate_deploy_key_request();
                req.get().set_id(&id);
                req.get().set_overlap_secs(overlap.as_secs());
                let reply = req.send().promise.await.map_err(remote)?;
                let r = reply.get()?;
                let view = read_deploy_key(r.get_info()?)?;
                if output != Format::Json {
                    println!(
                        "The old secret works until {}.",
                        output::time(view.overlap_until)
                    );
                }
                let secret = r.get_client_secret()?.to_str()?;
                print_key(r.get_key()?.to_str()?, secret, &view, output, "Rotated")
            }
            KeyCmd::Revoke { id } => {
                let mut req = admin.revoke_deploy_key_request();
                req.get().set_id(&id);
                req.send().promise.await.map_err(remote)?;
                println!("Revoked deploy key {}", output::terminal_safe(&id));
                Ok(())
            }
        };
        session.close().await;
        result
    })
}
