//! `miren identity`: signing keys and operator-minted tokens.

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};
use serde_json::json;

#[derive(clap::Subcommand, Debug)]
pub enum IdentityCmd {
    /// Signing keys of the cluster's issuer.
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum KeysCmd {
    /// List signing keys (kid, alg, state, created, retires).
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

pub fn run(cmd: IdentityCmd, cluster: Option<&str>) -> anyhow::Result<()> {
    match cmd {
        IdentityCmd::Keys(KeysCmd::List { output }) => run_local(list_keys(cluster, output)),
    }
}

async fn list_keys(cluster: Option<&str>, format: Format) -> anyhow::Result<()> {
    let session = Session::open(resolve(cluster)?).await?;
    let admin = session.admin().await?;
    let reply = admin
        .list_signing_keys_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let mut rows = Vec::new();
    for k in reply.get()?.get_keys()? {
        rows.push(json!({
            "kid": k.get_kid()?.to_str()?,
            "alg": k.get_alg()?.to_str()?,
            "state": k.get_state()?.to_str()?,
            "created_unix": k.get_created_unix(),
            "activates_unix": k.get_activates_unix(),
            "retires_unix": if k.get_retires_unix() == 0 { serde_json::Value::Null } else { json!(k.get_retires_unix()) },
        }));
    }
    session.close().await;
    match format {
        Format::Json => output::json(&json!(rows)),
        Format::Table => {
            let t: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r["kid"].as_str().unwrap_or_default().to_string(),
                        r["alg"].as_str().unwrap_or_default().to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                        fmt_time(r["created_unix"].as_i64()),
                        fmt_time(r["retires_unix"].as_i64()),
                    ]
                })
                .collect();
            output::table(&["KID", "ALG", "STATE", "CREATED", "RETIRES"], &t);
            Ok(())
        }
    }
}

fn fmt_time(t: Option<i64>) -> String {
    match t {
        Some(t) if t > 0 => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
        )
        .to_string(),
        _ => "-".to_string(),
    }
}
