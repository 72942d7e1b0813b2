//! Route OIDC configuration (labs: `--labs routeoidc`): which routes are
//! protected by which OpenID provider, and which claims become headers.
//!
//! Providers are stored once (`oidcprovider/<name>`) and reused by routes;
//! a route's record carries its provider name and claim headers. Client
//! secrets are stored but never returned: every listing redacts them.
//! The login flow at the ingress (`crate::sso`) builds on these records and
//! on the pure rules in `identity::route_oidc`.

use identity::route_oidc::{ensure_distinct_headers, ClaimHeader};
use identity::IssuerUrl;
use serde::{Deserialize, Serialize};

use crate::ingress::{route_key, Route};
use crate::service::State;
use crate::store::{decode, encode, Condition, Op, Outcome, Txn};

/// The labs flag that turns route OIDC on.
pub const LABS_FLAG: &str = "routeoidc";

/// `oidcprovider/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub scope: String,
}

impl Provider {
    /// The provider as shown to people: the secret replaced.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "issuer": self.issuer, "client_id": self.client_id,
            "client_secret": "(set, not shown)", "scope": self.scope,
        })
    }
}

/// A route's OIDC protection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteOidc {
    pub provider: String,
    pub claim_headers: Vec<ClaimHeader>,
}

/// What `route oidc enable` sends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnableRequest {
    /// Reuse (or name) a provider.
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub provider_url: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub claim_headers: Vec<String>,
    /// Replace an existing provider of that name that has other settings.
    #[serde(default)]
    pub replace_provider: bool,
}

fn labs_error() -> String {
    format!("route OIDC is a labs feature: start the server with --labs {LABS_FLAG} (or MIREN_LABS={LABS_FLAG})")
}

fn provider_key(name: &str) -> String {
    format!("oidcprovider/{name}")
}

/// A provider name derived from its URL's host (`login.example.com` ->
/// `login-example-com`).
fn name_from_url(url: &IssuerUrl) -> String {
    let host = url
        .as_str()
        .trim_start_matches("https://")
        .split(['/', ':'])
        .next()
        .unwrap_or("provider");
    host.replace('.', "-")
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("provider name {name:?} must be 1-63 of [a-z0-9-]"))
    }
}

fn ensure_labs(state: &State) -> Result<(), String> {
    if state.labs.iter().any(|l| l == LABS_FLAG) {
        Ok(())
    } else {
        Err(labs_error())
    }
}

fn load_route(state: &State, host: &str) -> Result<(Vec<u8>, Route), String> {
    let key = route_key(host);
    let bytes = state
        .store
        .get(&key)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no route for {}: set one first with `miren route set {} -a APP`",
                if host.is_empty() { "--default" } else { host },
                if host.is_empty() { "--default" } else { host }
            )
        })?;
    let route: Route = decode(&key, &bytes).map_err(|e| e.to_string())?;
    Ok((bytes, route))
}

/// Protects a route with a provider (creating the provider when its
/// settings are given).
pub fn enable(state: &State, host: &str, req: EnableRequest) -> Result<(), String> {
    ensure_labs(state)?;
    let (old_bytes, mut route) = load_route(state, host)?;
    let claim_headers: Vec<ClaimHeader> = req
        .claim_headers
        .iter()
        .map(|c| {
            c.parse::<ClaimHeader>()
                .map_err(|e| format!("--claim-header {c:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    ensure_distinct_headers(&claim_headers).map_err(|e| e.to_string())?;
    let mut ops = Vec::new();
    let mut conditions = vec![Condition::Equals(route_key(host), old_bytes)];
    let provider_name = match (req.provider_url, req.client_id, req.client_secret) {
        (Some(url), Some(id), Some(secret)) => {
            let issuer = IssuerUrl::parse(&url).map_err(|e| format!("--provider-url: {e}"))?;
            if id.is_empty() || secret.is_empty() {
                return Err("--client-id and --client-secret must not be empty".into());
            }
            let name = req.provider.unwrap_or_else(|| name_from_url(&issuer));
            check_name(&name)?;
            let provider = Provider {
                name: name.clone(),
                issuer: issuer.as_str().to_string(),
                client_id: id,
                client_secret: secret,
                scope: req.scope.unwrap_or_else(|| "openid email profile".into()),
            };
            // A provider may protect other routes: changing it under them
            // would let another client's users in. Same settings: reuse.
            let key = provider_key(&name);
            let stored = state.store.get(&key).map_err(|e| e.to_string())?;
            let existing = match &stored {
                Some(b) => Some(decode::<Provider>(&key, b).map_err(|e| e.to_string())?),
                None => None,
            };
            match (existing, stored) {
                (Some(existing), Some(bytes)) if existing == provider => {
                    conditions.push(Condition::Equals(key, bytes));
                }
                (Some(_), Some(bytes)) if req.replace_provider => {
                    conditions.push(Condition::Equals(key.clone(), bytes));
                    ops.push(Op::Put(key, encode(&provider)));
                }
                (Some(_), _) => {
                    return Err(format!(
                        "a provider named {name:?} already exists with other settings; reuse it with --provider {name} (and no --provider-url), replace it for every route that uses it with --replace-provider, or name a new one with --provider NEW-NAME"
                    ))
                }
                _ => {
                    conditions.push(Condition::Absent(provider_key(&name)));
                    ops.push(Op::Put(provider_key(&name), encode(&provider)));
                }
            }
            name
        }
        (None, None, None) => {
            let name = req.provider.ok_or(
                "give --provider NAME, or --provider-url, --client-id and --client-secret",
            )?;
            let Some(existing) = state
                .store
                .get(&provider_key(&name))
                .map_err(|e| e.to_string())?
            else {
                return Err(format!(
                    "no provider named {name:?} (see `miren route oidc providers`)"
                ));
            };
            conditions.push(Condition::Equals(provider_key(&name), existing));
            name
        }
        _ => return Err("--provider-url, --client-id and --client-secret go together".into()),
    };
    route.oidc = Some(RouteOidc {
        provider: provider_name,
        claim_headers,
    });
    ops.push(Op::Put(route_key(host), encode(&route)));
    commit(state, Txn { conditions, ops })
}

/// Commits a configuration change made from records read just before:
/// refused, not silently dropped, when one of them changed meanwhile.
fn commit(state: &State, txn: Txn) -> Result<(), String> {
    match state.store.commit(txn).map_err(|e| e.to_string())? {
        Outcome::Applied => Ok(()),
        Outcome::ConditionFailed => {
            Err("the route or provider changed meanwhile; run the command again".into())
        }
    }
}

/// The protection of a route, secrets redacted.
pub fn show(state: &State, host: &str) -> Result<serde_json::Value, String> {
    ensure_labs(state)?;
    let (_, route) = load_route(state, host)?;
    let Some(oidc) = route.oidc else {
        return Ok(serde_json::json!({"host": host, "app": route.app, "oidc": null}));
    };
    let provider = provider(state, &oidc.provider)?;
    Ok(serde_json::json!({
        "host": host, "app": route.app,
        "oidc": {
            "provider": provider.map(|p| p.redacted()),
            "claim_headers": oidc.claim_headers.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        }
    }))
}

/// Removes a route's protection; the provider stays for reuse. Works
/// without the labs flag, so a protected route (which then answers 503)
/// can be opened up again.
pub fn disable(state: &State, host: &str) -> Result<(), String> {
    let (old, mut route) = load_route(state, host)?;
    if route.oidc.take().is_none() {
        return Err("this route is not protected by OIDC".into());
    }
    commit(
        state,
        Txn {
            conditions: vec![Condition::Equals(route_key(host), old)],
            ops: vec![Op::Put(route_key(host), encode(&route))],
        },
    )
}

/// A stored provider.
pub fn provider(state: &State, name: &str) -> Result<Option<Provider>, String> {
    let key = provider_key(name);
    match state.store.get(&key).map_err(|e| e.to_string())? {
        Some(b) => Ok(Some(decode(&key, &b).map_err(|e| e.to_string())?)),
        None => Ok(None),
    }
}

/// Every provider, secrets redacted.
pub fn providers(state: &State) -> Result<serde_json::Value, String> {
    ensure_labs(state)?;
    let mut out = Vec::new();
    for (k, v) in state
        .store
        .scan("oidcprovider/")
        .map_err(|e| e.to_string())?
    {
        let p: Provider = decode(&k, &v).map_err(|e| e.to_string())?;
        out.push(p.redacted());
    }
    Ok(serde_json::Value::Array(out))
}

/// Removes a provider no route uses.
pub fn remove_provider(state: &State, name: &str) -> Result<(), String> {
    ensure_labs(state)?;
    let Some(existing) = provider(state, name)? else {
        return Err(format!("no provider named {name:?}"));
    };
    for (k, v) in state.store.scan("route/").map_err(|e| e.to_string())? {
        let r: Route = decode(&k, &v).map_err(|e| e.to_string())?;
        if r.oidc.as_ref().is_some_and(|o| o.provider == name) {
            let host = if r.host.is_empty() {
                "--default".to_string()
            } else {
                r.host
            };
            return Err(format!(
                "provider {name} protects route {host}; `miren route oidc disable {host}` first"
            ));
        }
    }
    // Only if the provider is still the one checked above. (A route
    // enabled with it in between would be left without its provider: it
    // then answers 500, failing closed, until enabled again.)
    commit(
        state,
        Txn {
            conditions: vec![Condition::Equals(provider_key(name), encode(&existing))],
            ops: vec![Op::Delete(provider_key(name))],
        },
    )
}
