//! `.miren/app.toml`: what an app is made of.
//!
//! ```toml
//! name = "web"
//! [env]                 # for every service
//! GREETING = "hello"
//! [services.web]
//! command = "python3 server.py"
//! port = 8080           # given to the process as PORT
//! instances = 2
//! [services.web.env]    # for this service only
//! MODE = "prod"
//! [services.web.limits] # per sandbox; the runner's defaults otherwise
//! memory = "256MiB"     # killed and restarted when over it
//! cpus = 0.5
//! pids = 256
//! ```
//!
//! Errors point at the line.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    command: Option<String>,
    port: Option<u16>,
    instances: Option<u32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    limits: Option<RawLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<Number>,
    cpus: Option<Number>,
    pids: Option<Number>,
}

/// A value written as a number or as text (`memory = "256MiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Number {
    Integer(i64),
    Float(f64),
    Text(String),
}

/// One service of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub command: String,
    pub port: u16,
    pub instances: u32,
    pub env: Vec<(String, String)>,
    /// What each sandbox of the service may use; unset values take the
    /// runner's defaults.
    pub limits: runner::limits::Limits,
}

/// A parsed app config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    pub name: Option<String>,
    pub services: Vec<ServiceConfig>,
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(needle))
        .map(|i| i + 1)
        .unwrap_or(1)
}

/// The line of `key = …` inside the section `header`, else the header's.
fn line_in_section(text: &str, header: &str, key: &str) -> usize {
    let start = line_of(text, header);
    text.lines()
        .enumerate()
        .skip(start)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|(i, _)| i + 1)
        .unwrap_or(start)
}

/// `[services.NAME.limits]`, checked with the runner's own rules; errors
/// name the line.
fn parse_limits(
    raw: Option<RawLimits>,
    text: &str,
    path: &Path,
    service: &str,
) -> anyhow::Result<runner::limits::Limits> {
    use runner::limits;
    let Some(raw) = raw else {
        return Ok(limits::Limits::default());
    };
    let header = format!("[services.{service}.limits]");
    let at = |key: &str, msg: String| {
        anyhow!(
            "{}:{}: {header}: {key}: {msg}",
            path.display(),
            line_in_section(text, &header, key)
        )
    };
    let memory = match raw.memory {
        None => None,
        Some(Number::Text(t)) => {
            Some(limits::parse_memory(&t).map_err(|e| at("memory", e.to_string()))?)
        }
        Some(Number::Integer(n)) => {
            Some(limits::parse_memory(&n.to_string()).map_err(|e| at("memory", e.to_string()))?)
        }
        Some(Number::Float(_)) => {
            return Err(at(
                "memory",
                "write it with a unit, e.g. memory = \"256MiB\"".into(),
            ))
        }
    };
    let cpus = match raw.cpus {
        None => None,
        Some(Number::Float(f)) => {
            Some(limits::parse_cpus(f).map_err(|e| at("cpus", e.to_string()))?)
        }
        Some(Number::Integer(n)) => {
            Some(limits::parse_cpus(n as f64).map_err(|e| at("cpus", e.to_string()))?)
        }
        Some(Number::Text(_)) => {
            return Err(at("cpus", "a number of CPUs, e.g. cpus = 0.5".into()))
        }
    };
    let pids = match raw.pids {
        None => None,
        Some(Number::Integer(n)) => {
            Some(limits::parse_pids(n).map_err(|e| at("pids", e.to_string()))?)
        }
        Some(_) => return Err(at("pids", "a whole number, e.g. pids = 256".into())),
    };
    Ok(limits::Limits {
        memory_bytes: memory,
        cpu_millis: cpus,
        pids,
    })
}

fn valid_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses the text of an app.toml; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> anyhow::Result<AppConfig> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(1);
        anyhow!("{}:{line}: {}", path.display(), e.message())
    })?;
    if raw.services.is_empty() {
        bail!(
            "{}:1: no services: add a [services.NAME] section with a command",
            path.display()
        );
    }
    let mut services = Vec::new();
    for (name, s) in raw.services {
        let header = format!("[services.{name}]");
        let line = line_of(text, &header);
        let at = |msg: String| anyhow!("{}:{line}: {header}: {msg}", path.display());
        identity::check_name(identity::NameKind::Service, &name).map_err(|e| at(e.to_string()))?;
        let command = s.command.filter(|c| !c.trim().is_empty()).ok_or_else(|| {
            at("command is required (e.g. command = \"python3 server.py\")".into())
        })?;
        let instances = s.instances.unwrap_or(1);
        if !(1..=100).contains(&instances) {
            return Err(at(format!("instances = {instances}: use 1 to 100")));
        }
        let mut env: Vec<(String, String)> = raw.env.clone().into_iter().collect();
        for (k, v) in s.env {
            env.retain(|(ek, _)| ek != &k);
            env.push((k, v));
        }
        if let Some((k, _)) = env.iter().find(|(k, _)| !valid_env_name(k)) {
            return Err(at(format!("environment variable name {k:?} is not valid")));
        }
        if let Some((k, _)) = env
            .iter()
            .find(|(k, _)| k == "PORT" || k.starts_with("MIREN_"))
        {
            return Err(at(format!("{k} is set by miren and cannot be configured")));
        }
        let port = s.port.unwrap_or(8080);
        if port < 1024 {
            return Err(at(format!(
                "port {port}: apps listen on an unprivileged port (1024 or above) inside their sandbox, where they run without privileges; the ingress serves ports 80 and 443 for them"
            )));
        }
        let limits = parse_limits(s.limits, text, path, &name)?;
        services.push(ServiceConfig {
            name,
            command,
            port,
            instances,
            env,
            limits,
        });
    }
    Ok(AppConfig {
        name: raw.name,
        services,
    })
}

/// Reads `<dir>/.miren/app.toml`.
pub fn load(dir: &Path) -> anyhow::Result<AppConfig> {
    let path = dir.join(".miren").join("app.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow!(
            "{}: {e} (an app needs .miren/app.toml with a [services.NAME] section)",
            path.display()
        )
    })?;
    parse(&text, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> anyhow::Result<AppConfig> {
        parse(text, Path::new("app.toml"))
    }

    #[test]
    fn full_config() {
        let c = p(r#"
name = "web"
[env]
A = "1"
[services.web]
command = "python3 server.py"
port = 9000
instances = 2
[services.web.env]
A = "2"
B = "x"
[services.worker]
command = "./work"
"#)
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("web"));
        assert_eq!(c.services.len(), 2);
        let web = c.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.port, 9000);
        assert_eq!(web.instances, 2);
        assert_eq!(
            web.env,
            vec![("A".into(), "2".into()), ("B".into(), "x".into())]
        );
        let worker = c.services.iter().find(|s| s.name == "worker").unwrap();
        assert_eq!(worker.instances, 1);
        assert_eq!(worker.env, vec![("A".into(), "1".into())]);
    }

    #[test]
    fn limits_are_parsed_and_bad_values_name_their_line() {
        let c = p("[services.web]\ncommand = \"a\"\n[services.web.limits]\nmemory = \"256MiB\"\ncpus = 0.5\npids = 128\n")
            .unwrap();
        let l = c.services[0].limits;
        assert_eq!(l.memory_bytes, Some(256 << 20));
        assert_eq!(l.cpu_millis, Some(500));
        assert_eq!(l.pids, Some(128));
        let c = p("[services.web]\ncommand = \"a\"\n[services.web.limits]\ncpus = 2\n").unwrap();
        assert_eq!(c.services[0].limits.cpu_millis, Some(2000));
        assert_eq!(c.services[0].limits.memory_bytes, None);
        let c = p("[services.web]\ncommand = \"a\"\n").unwrap();
        assert_eq!(c.services[0].limits, runner::limits::Limits::default());

        let bad = |toml: &str| p(toml).unwrap_err().to_string();
        let e = bad(
            "[services.web]\ncommand = \"a\"\n[services.web.limits]\ncpus = 1\nmemory = \"lots\"\n",
        );
        assert!(e.starts_with("app.toml:5:") && e.contains("memory"), "{e}");
        let e = bad("[services.web]\ncommand = \"a\"\n[services.web.limits]\npids = -3\n");
        assert!(e.starts_with("app.toml:4:") && e.contains("pids"), "{e}");
        let e = bad("[services.web]\ncommand = \"a\"\n[services.web.limits]\ncpus = \"half\"\n");
        assert!(e.starts_with("app.toml:4:") && e.contains("cpus"), "{e}");
        let e = bad("[services.web]\ncommand = \"a\"\n[services.web.limits]\ncpus = 0\n");
        assert!(e.starts_with("app.toml:4:"), "{e}");
        let e = bad("[services.web]\ncommand = \"a\"\n[services.web.limits]\nswap = 1\n");
        assert!(e.contains("swap"), "{e}");
    }

    #[test]
    fn errors_point_at_the_line() {
        let e = p("name = \"x\"\n[services.web]\nport = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("app.toml:2:"), "{e}");
        assert!(e.contains("command is required"), "{e}");
        let e = p("name = \"x\"\n[services.web]\ncommand = \"a\"\nport = 80\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("app.toml:2:") && e.contains("1024 or above"),
            "{e}"
        );
        let e = p("name = \"x\"\n\n[services.web]\ncommand = \"a\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("app.toml:5:"), "{e}");
        let e = p("name = \n").unwrap_err().to_string();
        assert!(e.starts_with("app.toml:1:"), "{e}");
        let e = p("name = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("no services"), "{e}");
        let e = p("[services.web]\ncommand = \"a\"\ninstances = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("instances = 0"), "{e}");
        let e = p("[services.web]\ncommand = \"a\"\n[services.web.env]\nPORT = \"1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("PORT is set by miren"), "{e}");
    }
}
