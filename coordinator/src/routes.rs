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
//!
//! The ingress chooses a route on every request, so routes are read from
//! memory: [`RouteIndex`] is loaded once and fed by a store watch
//! ([`crate::watched`]), and a change made here is in it when the command
//! returns (each entry carries the revision it was seen at, so a late event
//! never undoes a newer write). Another coordinator's change arrives by the
//! watch; while the store is unreachable the ingress keeps routing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use identity::route_oidc::ClaimHeader;
use serde::{Deserialize, Serialize};

use crate::apps::{AppError, Apps};
use crate::shutdown::Tasks;
use crate::store::{
    decode, encode, Condition, EventKind, Op, Outcome, Revision, Store, StoreError, Txn, WatchBatch,
};

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
    /// The route record serving a host does not decode (logged when it
    /// was read); the host is not served by the default route instead.
    #[error("the route record for {0} cannot be read; remove the route and set it again")]
    UnreadableRecord(String),
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
    #[error("the route was changed meanwhile (another admin's change won, through this or another coordinator); nothing was changed by this command: check `miren route list` and run it again if still needed")]
    RouteChanged,
    /// A configuration change read records that changed before its commit.
    #[error("the route or provider was changed meanwhile (another admin's change won, through this or another coordinator); nothing was changed by this command: check `miren route list` and run it again if still needed")]
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

/// Normalises a host for routing: lowercase, without port, without the
/// trailing dot of a fully qualified name (`app.example.` is the host
/// `app.example`, and must find its route, not fall to the default one).
pub fn normalize_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    let name = match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h.as_str(),
    };
    name.strip_suffix('.').unwrap_or(name).to_string()
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

/// What the index knows of one `route/` key.
#[derive(Debug, Clone)]
enum Entry {
    /// Shared with the requests that read it (the ingress reads it per
    /// request, and copies no strings for that).
    Route(Arc<Route>),
    /// The record does not decode.
    Unreadable,
    /// Deleted (kept so that an older event does not bring it back).
    Gone,
}

/// The routes by store key, each with the revision it was seen at.
#[derive(Default)]
pub struct RouteIndex {
    entries: RwLock<HashMap<String, (Revision, Entry)>>,
}

const ROUTE_PREFIX: &str = "route/";

impl RouteIndex {
    fn entry_of(key: &str, value: &[u8]) -> Entry {
        match decode::<Route>(key, value) {
            Ok(r) => Entry::Route(Arc::new(r)),
            Err(e) => {
                tracing::error!("route index: {e}");
                Entry::Unreadable
            }
        }
    }

    /// Records `entry` for `key` as of `revision`, unless something newer
    /// is known.
    fn note(&self, key: &str, revision: Revision, entry: Entry) {
        let mut g = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match g.get(key) {
            Some((seen, _)) if *seen >= revision => {}
            _ => {
                g.insert(key.to_string(), (revision, entry));
            }
        }
    }

    /// Takes the route writes of a transaction committed at `revision`.
    fn note_ops(&self, ops: &[Op], revision: Revision) {
        for op in ops {
            match op {
                Op::Put(k, v) | Op::PutLeased(k, v, _) if k.starts_with(ROUTE_PREFIX) => {
                    self.note(k, revision, Self::entry_of(k, v))
                }
                Op::Delete(k) if k.starts_with(ROUTE_PREFIX) => self.note(k, revision, Entry::Gone),
                _ => {}
            }
        }
    }

    fn get(&self, key: &str) -> Option<Entry> {
        let g = self.entries.read().unwrap_or_else(|p| p.into_inner());
        g.get(key).map(|(_, e)| e.clone())
    }
}

impl crate::watched::Watched for RouteIndex {
    const NAME: &'static str = "route index";

    fn prefix(&self) -> &str {
        ROUTE_PREFIX
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let (kvs, read_at) = store.scan_kv(ROUTE_PREFIX)?;
        let fresh: HashMap<String, (Revision, Entry)> = kvs
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    (kv.mod_revision, Self::entry_of(&kv.key, &kv.value)),
                )
            })
            .collect();
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(read_at)
    }

    fn apply(&self, batch: &WatchBatch) {
        for e in &batch.events {
            let entry = match e.kind {
                EventKind::Put => Self::entry_of(&e.kv.key, &e.kv.value),
                EventKind::Delete => Entry::Gone,
            };
            self.note(&e.kv.key, batch.revision, entry);
        }
    }
}

/// The routes and route OIDC providers in the store.
pub struct Routes {
    store: Arc<dyn Store>,
    index: Arc<RouteIndex>,
    /// The revision the index was loaded at (where `follow` starts).
    loaded_at: Revision,
}

impl Routes {
    /// Loads the routes into memory; [`Routes::follow`] keeps them current.
    pub fn open(store: Arc<dyn Store>) -> Result<Routes, RoutesError> {
        let index = Arc::new(RouteIndex::default());
        let loaded_at = crate::watched::Watched::reload(&*index, &*store)?;
        Ok(Routes {
            store,
            index,
            loaded_at,
        })
    }

    /// Keeps the in-memory routes in step with the store until shutdown.
    pub fn follow(&self, tasks: &Tasks) {
        crate::watched::follow(
            self.index.clone(),
            self.store.clone(),
            self.loaded_at,
            tasks,
        );
    }

    /// Commits `txn`; when applied, its route writes are in the index.
    fn write(&self, txn: Txn) -> Result<Outcome, RoutesError> {
        let ops = txn.ops.clone();
        let committed = self.store.txn(txn)?;
        if committed.outcome == Outcome::Applied {
            self.index.note_ops(&ops, committed.revision);
        }
        Ok(committed.outcome)
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
        let outcome = self.write(Txn {
            conditions: vec![condition],
            ops: vec![Op::Put(key, encode(&route))],
        })?;
        match outcome {
            Outcome::Applied => Ok(()),
            Outcome::ConditionFailed => Err(RoutesError::RouteChanged),
        }
    }

    /// Removes the route of `host`, if it is still the one read (a route
    /// pointed elsewhere meanwhile is not removed unseen).
    pub fn remove(&self, host: &str) -> Result<(), RoutesError> {
        let key = route_key(host);
        let Some(old) = self.store.get(&key)? else {
            return Err(RoutesError::NoRoute(host_flag(host).to_string()));
        };
        match self.write(Txn {
            conditions: vec![Condition::Equals(key.clone(), old)],
            ops: vec![Op::Delete(key)],
        })? {
            Outcome::Applied => Ok(()),
            Outcome::ConditionFailed => Err(RoutesError::RouteChanged),
        }
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
    pub fn route_for(&self, host: &str) -> Result<Option<Arc<Route>>, RoutesError> {
        for key in [route_key(host), route_key("")] {
            match self.index.get(&key) {
                Some(Entry::Route(r)) => return Ok(Some(r)),
                Some(Entry::Unreadable) => {
                    return Err(RoutesError::UnreadableRecord(host_flag(host).to_string()))
                }
                Some(Entry::Gone) | None => {}
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
        match self.write(txn)? {
            Outcome::Applied => Ok(()),
            Outcome::ConditionFailed => Err(RoutesError::Changed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{KeyValue, RedbStore, WatchEvent};
    use crate::watched::Watched;

    fn route(host: &str, app: &str) -> Route {
        Route {
            host: host.into(),
            app: app.into(),
            oidc: None,
        }
    }

    fn event(kind: EventKind, key: &str, value: &[u8], revision: Revision) -> WatchBatch {
        WatchBatch {
            revision,
            events: vec![WatchEvent {
                kind,
                kv: KeyValue {
                    key: key.into(),
                    value: value.to_vec(),
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                    lease: None,
                },
            }],
        }
    }

    #[test]
    fn routes_are_chosen_from_memory_and_a_late_event_never_undoes_a_newer_write() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let key = route_key("a.test");
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![
                    Op::Put(key.clone(), encode(&route("a.test", "one"))),
                    Op::Put(route_key(""), encode(&route("", "fallback"))),
                ],
            })
            .unwrap();
        let routes = Routes::open(store.clone()).unwrap();
        assert_eq!(routes.route_for("a.test").unwrap().unwrap().app, "one");
        assert_eq!(routes.route_for("b.test").unwrap().unwrap().app, "fallback");

        // A write through `Routes` shows at once, before any watch event.
        let rev = store.revision().unwrap();
        routes
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(key.clone(), encode(&route("a.test", "two")))],
            })
            .unwrap();
        assert_eq!(routes.route_for("a.test").unwrap().unwrap().app, "two");
        // The watch then replays the older put: it is ignored.
        routes.index.apply(&event(
            EventKind::Put,
            &key,
            &encode(&route("a.test", "one")),
            rev,
        ));
        assert_eq!(routes.route_for("a.test").unwrap().unwrap().app, "two");
        // A delete newer than everything wins; the host falls back.
        routes
            .index
            .apply(&event(EventKind::Delete, &key, b"", rev + 10));
        assert_eq!(routes.route_for("a.test").unwrap().unwrap().app, "fallback");
        routes.index.apply(&event(
            EventKind::Put,
            &key,
            &encode(&route("a.test", "one")),
            rev + 5,
        ));
        assert_eq!(routes.route_for("a.test").unwrap().unwrap().app, "fallback");
    }

    #[test]
    fn an_unreadable_route_is_an_error_not_the_default_route() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![
                    Op::Put(route_key("a.test"), b"{not json".to_vec()),
                    Op::Put(route_key(""), encode(&route("", "fallback"))),
                ],
            })
            .unwrap();
        let routes = Routes::open(store).unwrap();
        assert!(matches!(
            routes.route_for("a.test"),
            Err(RoutesError::UnreadableRecord(_))
        ));
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("Example.com.:443"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert!(check_host("app.example.com").is_ok());
        assert!(check_host("App.example.com").is_err());
        assert!(check_host("*.example.com").is_err());
        assert!(check_host("").is_err());
    }
}
