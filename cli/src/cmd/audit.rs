//! `miren audit`: read the coordinator's audit trail through the admin
//! capability (`Admin.readAudit`), filtered by time, app and action, and
//! follow it with `-f`.
//!
//! Lines come from the cluster, so a table cell goes through
//! `output::terminal_safe` like everything else printed here; `-o json`
//! prints each line as stored (JSON Lines, one object per line), escaped
//! the same way.

use std::time::Duration;

use anyhow::Context;

use crate::config::resolve;
use crate::connect::{remote, run_local, Session};
use crate::output::{self, Format};

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Only lines at or after this: a duration back from now (30m, 1h,
    /// 7d) or an RFC 3339 UTC time (2024-05-01T12:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only lines about this app.
    #[arg(short = 'a', long, env = "MIREN_APP")]
    app: Option<String>,
    /// Only these actions, or those under them (`token` = token.minted and
    /// token.refused); repeatable or comma-separated.
    #[arg(long = "action", value_delimiter = ',')]
    actions: Vec<String>,
    /// Keep printing new lines as they are written.
    #[arg(short = 'f', long)]
    follow: bool,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

/// Why `--since` was not understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--since {0:?}: give a duration back from now (30m, 1h, 7d) or an RFC 3339 UTC time (2024-05-01T12:00:00Z)")]
pub struct SinceError(String);

/// `--since` as Unix milliseconds, relative to `now_ms`.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, SinceError> {
    let t = text.trim();
    if let Some(ms) = coordinator::audit::parse_rfc3339_millis(t) {
        return Ok(ms);
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        Err(_) => Err(SinceError(text.to_string())),
    }
}

/// The fields shown in a table's columns; the rest go to DETAILS.
const COLUMNS: [&str; 5] = ["seq", "time", "actor", "action", "result"];

/// One table row of a line (`None` when the line is not an object).
fn row(line: &serde_json::Value) -> Option<Vec<String>> {
    let obj = line.as_object()?;
    let text = |k: &str| match &obj.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let details: Vec<String> = obj
        .iter()
        .filter(|(k, _)| !COLUMNS.contains(&k.as_str()))
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    Some(vec![
        text("time"),
        text("actor"),
        text("action"),
        text("result"),
        details.join(" "),
    ])
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn run(args: AuditArgs, cluster: Option<&str>) -> anyhow::Result<()> {
    let since = args
        .since
        .as_deref()
        .map(|s| parse_since(s, now_ms()))
        .transpose()?;
    run_local(async move {
        let session = Session::open(resolve(cluster)?).await?;
        let admin = session.admin().await?;
        let mut after = 0u64;
        let mut header_done = false;
        loop {
            let mut req = admin.read_audit_request();
            {
                let mut p = req.get();
                p.set_since_unix_ms(since.unwrap_or(0));
                p.set_after_seq(after);
                p.set_app(args.app.as_deref().unwrap_or(""));
                p.set_limit(coordinator::audit::MAX_READ_LINES as u32);
                let mut list = p.init_actions(args.actions.len() as u32);
                for (i, a) in args.actions.iter().enumerate() {
                    list.set(i as u32, a.trim());
                }
            }
            let reply = req.send().promise.await.map_err(remote)?;
            let r = reply.get()?;
            let mut rows = Vec::new();
            for l in r.get_lines()? {
                let l = l?.to_str()?;
                let v: serde_json::Value = serde_json::from_str(l)
                    .context("the coordinator sent a line that is not JSON")?;
                match args.output {
                    Format::Json => println!("{}", output::json_line(&v)?),
                    Format::Table => rows.extend(row(&v)),
                }
            }
            if args.output == Format::Table && (!rows.is_empty() || !header_done) {
                if header_done {
                    output::table_rows(&rows);
                } else {
                    output::table(&["TIME", "ACTOR", "ACTION", "RESULT", "DETAILS"], &rows);
                    header_done = true;
                }
            }
            after = r.get_last_seq();
            if r.get_more() {
                continue;
            }
            if !args.follow {
                return Ok(());
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_times() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("1h", now), Ok(now - 3_600_000));
        assert_eq!(parse_since("30m", now), Ok(now - 1_800_000));
        assert_eq!(parse_since("7d", now), Ok(now - 7 * 86_400_000));
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_since("2023-11-14T22:13:20.5Z", now),
            Ok(1_700_000_000_500)
        );
        for bad in ["", "yesterday", "1 fortnight", "2023-11-14", "-1h"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_row_puts_the_rest_in_details() {
        let v = serde_json::json!({
            "seq": 1, "time": "2023-11-14T22:13:20.000Z", "actor": "admin:admin-1",
            "action": "route.set", "host": "a.example.com", "app": "web", "result": "ok",
        });
        let r = row(&v).unwrap();
        assert_eq!(
            r[..4],
            [
                "2023-11-14T22:13:20.000Z",
                "admin:admin-1",
                "route.set",
                "ok"
            ]
        );
        assert!(
            r[4].contains("host=a.example.com") && r[4].contains("app=web"),
            "{r:?}"
        );
        assert!(row(&serde_json::json!("x")).is_none());
    }
}
