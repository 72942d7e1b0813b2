//! `miren identity`: signing keys, operator-minted tokens, verification.

use std::time::Duration;

use coordinator::keyring::KeyStatus;
use coordinator::wire_types::{read_claims, read_keys};

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Subcommand, Debug)]
pub enum IdentityCmd {
    /// Signing keys of the cluster's issuer.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Mint a workload token (admin; for debugging trust set-ups).
    Token {
        /// App the token is for.
        #[arg(long)]
        app: String,
        /// Sandbox id the token is for.
        #[arg(long)]
        sandbox: String,
        /// Organization id (omitted from the subject when empty).
        #[arg(long, default_value = "")]
        org: String,
        /// Audience; repeatable (default "miren").
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// Lifetime, clamped to 60s..24h (default 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Verify a token of this cluster and print its claims (admin).
    Verify {
        token: String,
        /// Audience the token must carry (default "miren").
        #[arg(long, default_value = "")]
        audience: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum KeysCmd {
    /// List signing keys (kid, alg, state, created, retires).
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Start a new signing key; it signs once verifiers have had time to fetch it.
    Rotate {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

pub fn run(cmd: IdentityCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    match cmd {
        IdentityCmd::Keys(KeysCmd::List { output }) => run_local(keys(cluster, output, false)),
        IdentityCmd::Keys(KeysCmd::Rotate { output }) => run_local(keys(cluster, output, true)),
        IdentityCmd::Token {
            app,
            sandbox,
            org,
            audiences,
            ttl,
        } => run_local(async move {
            let ttl_secs = match ttl {
                None => 0,
                Some(d) => u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX),
            };
            let session = Session::open(resolve(cluster)?).await?;
            let admin = session.admin().await?;
            let mut req = admin.mint_workload_token_request();
            {
                let mut p = req.get();
                p.set_app(&app);
                p.set_sandbox_id(&sandbox);
                p.set_organization(&org);
                p.set_ttl_secs(ttl_secs);
                let mut list = p.init_audiences(audiences.len() as u32);
                for (i, a) in audiences.iter().enumerate() {
                    list.set(i as u32, a);
                }
            }
            let reply = req.send().promise.await.map_err(remote)?;
            let token = reply.get()?.get_token()?.to_str()?.to_string();
            session.close().await;
            println!("{}", output::terminal_safe(&token));
            Ok(())
        }),
        IdentityCmd::Verify { token, audience } => run_local(async move {
            let session = Session::open(resolve(cluster)?).await?;
            let admin = session.admin().await?;
            let mut req = admin.verify_workload_token_request();
            req.get().set_token(&token);
            req.get().set_audience(&audience);
            let reply = req.send().promise.await.map_err(remote)?;
            let claims = read_claims(reply.get()?.get_claims()?)?;
            session.close().await;
            output::json(&claims)
        }),
    }
}

async fn keys(cluster: Option<&str>, format: Format, rotate: bool) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    let rows = if rotate {
        let r = admin
            .rotate_signing_key_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        read_keys(r.get()?.get_keys()?)?
    } else {
        let r = admin
            .list_signing_keys_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        read_keys(r.get()?.get_keys()?)?
    };
    session.close().await;
    print_keys(rows, format)
}

fn print_keys(keys: Vec<KeyStatus>, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => output::json(&keys),
        Format::Table => {
            let t: Vec<Vec<String>> = keys
                .into_iter()
                .map(|k| {
                    vec![
                        k.kid,
                        k.alg,
                        k.state.as_str().to_string(),
                        crate::output::time(Some(k.created_unix)),
                        crate::output::time(Some(k.activates_unix)),
                        crate::output::time(k.retires_unix),
                    ]
                })
                .collect();
            output::table(
                &["KID", "ALG", "STATE", "CREATED", "ACTIVATES", "RETIRES"],
                &t,
            );
            Ok(())
        }
    }
}
