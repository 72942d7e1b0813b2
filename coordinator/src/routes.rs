//! Routes: which app serves which host, and the single sign-on (labs)
//! in front of a route. The records, their store keys and every operation
//! on them live here; the HTTP proxy ([`crate::ingress`]) reads them, the
//! admin commands ([`crate::route_oidc`] for the OIDC part) change them,
//! and the login flow ([`crate::sso`]) reads the providers.
//!
//! Records: `route/<host>` (`route/_default` for the default route) holds a
//! [`Route`], with its [`RouteOidc`] protection when it has one;
//! `oidcprovider/<name>` holds a [`Provider`], stored once and reused by
//! routes. Client secrets are stored but never returned: every listing
//! redacts them. A route is chosen by [`Routes::route_for`]: the Host
//! (normalised by [`normalize_host`]) exactly, else the default route.
//! Changes made from records read just before are committed on the
//! condition that those records did not change meanwhile.

use std::sync::Arc;

use identity::route_oidc::ClaimHeader;
use serde::{Deserialize, Serialize};

use crate::apps::{AppError, Apps};
use crate::store::{decode, encode, Condition, Op, Outcome, Store, StoreError, Txn};

/// Why a route or provider operation was refused, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The host is no lowercase DNS name.
    #[error("route host {0:?} must be a lowercase DNS name (or use --default)")]
    BadHost(String),
    /// A route to an app that does not exist.
    #[error("app {0:?} does not exist (deploy it first)")]
    NoSuchApp(String),
    /// The app's record could not be read.
    #[error(transparent)]
    Apps(#[from] AppError),
    /// The existing route record does not decode.
    #[error("{0}; remove the route and set it again")]
    UnreadableRoute(#[source] StoreError),
    /// A route (the `--host` or `--default` flag it was named by) has no record.
    #[error("no route for {0}")]
    NoRoute(String),
    /// Protection asked of a host with no route.
    #[error("no route for {0}: set one first with `miren route set {0} -a APP`")]
    NoRouteToProtect(String),
    /// `disable` of a route without protection.
    #[error("this route is not protected by OIDC")]
    NotProtected,
    /// No provider of that name.
    #[error("no provider named {0:?}")]
    NoProvider(String),
    /// The provider still protects a route.
    #[error("provider {name} protects route {host}; `miren route oidc disable {host}` first")]
    ProviderInUse { name: String, host: String },
    /// `route set` read a route that changed before its commit.
    #[error("the route changed meanwhile; run the command again")]
    RouteChanged,
    /// A configuration change read records that changed before its commit.
    #[error("the route or provider changed meanwhile; run the command again")]
    Changed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `route/<host>` (`route/_default` for the default route).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub app: String,
    /// Single sign-on in front of this route (labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<RouteOidc>,
}

/// A route's OIDC protection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteOidc {
    pub provider: String,
    pub claim_headers: Vec<ClaimHeader>,
}

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
    /// The provider as shown to people: without its secret.
    pub fn shown(&self) -> ShownProvider {
        ShownProvider {
            name: self.name.clone(),
            issuer: self.issuer.clone(),
            client_id: self.client_id.clone(),
            client_secret: SecretNotShown,
            scope: self.scope.clone(),
        }
    }
}

/// A provider as listings show it (and as it crosses the wire): its client
/// secret never leaves the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShownProvider {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    /// Always shown as `(set, not shown)`.
    pub client_secret: SecretNotShown,
    pub scope: String,
}

/// Where a listing would show a client secret: `(set, not shown)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretNotShown;

impl Serialize for SecretNotShown {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("(set, not shown)")
    }
}

/// Store key of the route for `host` ("" = the default route).
pub fn route_key(host: &str) -> String {
    if host.is_empty() {
        "route/_default".to_string()
    } else {
        format!("route/{host}")
    }
}

fn provider_key(name: &str) -> String {
    format!("oidcprovider/{name}")
}

/// How a host is named in messages ("" is the default route).
fn host_flag(host: &str) -> &str {
    if host.is_empty() {
        "--default"
    } else {
        host
    }
}

/// Normalises a host for routing: lowercase, without port.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
        _ => h,
    }
}

/// Checks a route host: a DNS name (wildcards are not supported).
pub fn check_host(host: &str) -> Result<(), RoutesError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(RoutesError::BadHost(host.to_string()))
    }
}

/// What protecting a route does to its provider record (decided by
/// [`crate::route_oidc::provider_use`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderWrite {
    /// The provider stays as it is (read as these bytes).
    Keep(Vec<u8>),
    /// The provider (read as these bytes) is replaced.
    Replace(Vec<u8>, Provider),
    /// A new provider is created (none of that name may exist).
    Create(Provider),
}

/// The routes and route OIDC providers in the store.
pub struct Routes {
    store: Arc<dyn Store>,
}

impl Routes {
    pub fn new(store: Arc<dyn Store>) -> Routes {
        Routes { store }
    }

    /// Routes `host` ("" = the default route) to `app`, which must exist.
    pub fn set(&self, apps: &Apps, host: &str, app: &str) -> Result<(), RoutesError> {
        if !host.is_empty() {
            check_host(host)?;
        }
        if apps.app(app)?.is_none() {
            return Err(RoutesError::NoSuchApp(app.to_string()));
        }
        // Pointing a host at another app keeps the host's single sign-on:
        // the protection belongs to the address users reach.
        let key = route_key(host);
        let old = self.store.get(&key)?;
        let oidc = match &old {
            Some(bytes) => {
                decode::<Route>(&key, bytes)
                    .map_err(RoutesError::UnreadableRoute)?
                    .oidc
            }
            None => None,
        };
        let route = Route {
            host: host.to_string(),
            app: app.to_string(),
            oidc,
        };
        let condition = match old {
            Some(bytes) => Condition::Equals(key.clone(), bytes),
            None => Condition::Absent(key.clone()),
        };
        let outcome = self.store.commit(Txn {
            conditions: vec![condition],
            ops: vec![Op::Put(key, encode(&route))],
        })?;
        match outcome {
            Outcome::Applied => Ok(()),
            Outcome::ConditionFailed => Err(RoutesError::RouteChanged),
        }
    }

    pub fn remove(&self, host: &str) -> Result<(), RoutesError> {
        let key = route_key(host);
        if self.store.get(&key)?.is_none() {
            return Err(RoutesError::NoRoute(host_flag(host).to_string()));
        }
        self.store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::Delete(key)],
        })?;
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<Route>, RoutesError> {
        self.store
            .scan("route/")?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map_err(RoutesError::UnreadableRoute))
            .collect()
    }

    /// The route serving `host`: its own, else the default route. A
    /// record that cannot be read is an error, never a reason to fall back
    /// to the default route (which may be unprotected).
    pub fn route_for(&self, host: &str) -> Result<Option<Route>, RoutesError> {
        for key in [route_key(host), route_key("")] {
            if let Some(bytes) = self.store.get(&key)? {
                return Ok(Some(decode::<Route>(&key, &bytes)?));
            }
        }
        Ok(None)
    }

    /// The route of `host` exactly, with the bytes it was read as (for a
    /// conditional change).
    pub fn load(&self, host: &str) -> Result<(Vec<u8>, Route), RoutesError> {
        let key = route_key(host);
        let bytes = self
            .store
            .get(&key)?
            .ok_or_else(|| RoutesError::NoRouteToProtect(host_flag(host).to_string()))?;
        let route: Route = decode(&key, &bytes)?;
        Ok((bytes, route))
    }

    /// A stored provider.
    pub fn provider(&self, name: &str) -> Result<Option<Provider>, RoutesError> {
        Ok(self.provider_record(name)?.map(|(_, p)| p))
    }

    /// A stored provider with the bytes it was read as.
    pub fn provider_record(&self, name: &str) -> Result<Option<(Vec<u8>, Provider)>, RoutesError> {
        let key = provider_key(name);
        match self.store.get(&key)? {
            Some(b) => {
                let p = decode(&key, &b)?;
                Ok(Some((b, p)))
            }
            None => Ok(None),
        }
    }

    /// Every stored provider.
    pub fn providers(&self) -> Result<Vec<Provider>, RoutesError> {
        let mut out = Vec::new();
        for (k, v) in self.store.scan("oidcprovider/")? {
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Protects the route of `host` (read as `route_bytes`) with `oidc`,
    /// writing its provider as `provider` says, in one commit conditioned
    /// on both records being as read.
    pub fn protect(
        &self,
        host: &str,
        route_bytes: Vec<u8>,
        mut route: Route,
        oidc: RouteOidc,
        provider: ProviderWrite,
    ) -> Result<(), RoutesError> {
        let key = provider_key(&oidc.provider);
        let mut conditions = vec![Condition::Equals(route_key(host), route_bytes)];
        let mut ops = Vec::new();
        match provider {
            ProviderWrite::Keep(bytes) => conditions.push(Condition::Equals(key, bytes)),
            ProviderWrite::Replace(bytes, p) => {
                conditions.push(Condition::Equals(key.clone(), bytes));
                ops.push(Op::Put(key, encode(&p)));
            }
            ProviderWrite::Create(p) => {
                conditions.push(Condition::Absent(key.clone()));
                ops.push(Op::Put(key, encode(&p)));
            }
        }
        route.oidc = Some(oidc);
        ops.push(Op::Put(route_key(host), encode(&route)));
        self.commit(Txn { conditions, ops })
    }

    /// Removes a route's protection; the provider stays for reuse.
    pub fn unprotect(&self, host: &str) -> Result<(), RoutesError> {
        let (old, mut route) = self.load(host)?;
        if route.oidc.take().is_none() {
            return Err(RoutesError::NotProtected);
        }
        self.commit(Txn {
            conditions: vec![Condition::Equals(route_key(host), old)],
            ops: vec![Op::Put(route_key(host), encode(&route))],
        })
    }

    /// Removes a provider no route uses.
    pub fn remove_provider(&self, name: &str) -> Result<(), RoutesError> {
        let Some(existing) = self.provider(name)? else {
            return Err(RoutesError::NoProvider(name.to_string()));
        };
        for (k, v) in self.store.scan("route/")? {
            let r: Route = decode(&k, &v)?;
            if r.oidc.as_ref().is_some_and(|o| o.provider == name) {
                return Err(RoutesError::ProviderInUse {
                    name: name.to_string(),
                    host: host_flag(&r.host).to_string(),
                });
            }
        }
        // Only if the provider is still the one checked above. (A route
        // enabled with it in between would be left without its provider: it
        // then answers 500, failing closed, until enabled again.)
        self.commit(Txn {
            conditions: vec![Condition::Equals(provider_key(name), encode(&existing))],
            ops: vec![Op::Delete(provider_key(name))],
        })
    }

    /// Commits a configuration change made from records read just before:
    /// refused, not silently dropped, when one of them changed meanwhile.
    fn commit(&self, txn: Txn) -> Result<(), RoutesError> {
        match self.store.commit(txn)? {
            Outcome::Applied => Ok(()),
            Outcome::ConditionFailed => Err(RoutesError::Changed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert!(check_host("app.example.com").is_ok());
        assert!(check_host("App.example.com").is_err());
        assert!(check_host("*.example.com").is_err());
        assert!(check_host("").is_err());
    }
}
