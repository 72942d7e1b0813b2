//! The in-memory view of sandbox assignments and active versions that the
//! ingress reads on every request, fed by a store watch.
//!
//! The ingress must not read or scan the store per request: a request
//! would cost a scan of every `sandbox/` record. This index is loaded once
//! and then follows the store's change stream (`Store::watch` from the
//! revision it was loaded at), applying each put and delete; when the
//! watch says its history was compacted it loads again. It may lag a
//! commit by the time the change takes to arrive. Minting
//! (`crate::minting`) reads it too, so that workload tokens outlive the
//! loss of the store, and asks the store only when the index does not
//! place the sandbox on the asking runner (a placement younger than the
//! watch's lag); reading artifacts keeps reading the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::apps::{AppRecord, SandboxRecord};
use crate::observed::Observed;
use crate::shutdown::Tasks;
use crate::store::{decode, EventKind, Revision, Store, StoreError};

const SANDBOX_PREFIX: &str = "sandbox/";
const APP_PREFIX: &str = "app/";

#[derive(Default)]
struct Inner {
    /// Assignments by app, then by sandbox id (in order, so a request
    /// gets them sorted without sorting; shared, so without copying).
    sandboxes: HashMap<String, BTreeMap<String, Arc<SandboxRecord>>>,
    /// Where each assignment is filed, by store key.
    app_of: HashMap<String, String>,
    /// The active version of each app.
    active: HashMap<String, Option<String>>,
}

impl Inner {
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if key.starts_with(SANDBOX_PREFIX) {
            let rec: SandboxRecord = decode(key, value)?;
            self.delete(key);
            self.app_of.insert(key.to_string(), rec.app.clone());
            self.sandboxes
                .entry(rec.app.clone())
                .or_default()
                .insert(rec.id.clone(), Arc::new(rec));
        } else if let Some(name) = key.strip_prefix(APP_PREFIX) {
            let rec: AppRecord = decode(key, value)?;
            self.active.insert(name.to_string(), rec.active);
        }
        Ok(())
    }

    fn delete(&mut self, key: &str) {
        if let Some(id) = key.strip_prefix(SANDBOX_PREFIX) {
            if let Some(app) = self.app_of.remove(key) {
                if let Some(m) = self.sandboxes.get_mut(&app) {
                    m.remove(id);
                    if m.is_empty() {
                        self.sandboxes.remove(&app);
                    }
                }
            }
        } else if let Some(name) = key.strip_prefix(APP_PREFIX) {
            self.active.remove(name);
        }
    }
}

/// Sandbox assignments and active versions, kept in step with the store.
#[derive(Default)]
pub struct SandboxIndex {
    inner: RwLock<Inner>,
}

impl crate::watched::Watched for SandboxIndex {
    const NAME: &'static str = "sandbox index";

    fn prefix(&self) -> &str {
        // Assignments and apps: two prefixes, one watch of everything.
        ""
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        self.reload_all(store)
    }

    fn apply(&self, batch: &crate::store::WatchBatch) {
        self.apply_events(&batch.events);
    }
}

impl SandboxIndex {
    /// Loads the index; returns it with the revision to watch from.
    pub fn load(store: &dyn Store) -> Result<(SandboxIndex, Revision), StoreError> {
        let index = SandboxIndex::default();
        let from = index.reload_all(store)?;
        Ok((index, from))
    }

    /// Reads every record again; returns the revision after which changes
    /// are to be applied.
    fn reload_all(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let mut fresh = Inner::default();
        let mut revision = Revision::MAX;
        for prefix in [SANDBOX_PREFIX, APP_PREFIX] {
            // Changes after the oldest read are replayed by the watch.
            let (kvs, read_at) = store.scan_kv(prefix)?;
            revision = revision.min(read_at);
            for kv in &kvs {
                fresh.put(&kv.key, &kv.value)?;
            }
        }
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(revision)
    }

    /// The assignment of sandbox `id`, if the index has it. Read from
    /// memory only.
    pub fn get(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let app = g.app_of.get(&format!("{SANDBOX_PREFIX}{id}"))?;
        g.sandboxes.get(app)?.get(id).cloned()
    }

    /// Follows the store from `from` until shutdown.
    pub fn follow(self: &Arc<Self>, store: Arc<dyn Store>, from: Revision, tasks: &Tasks) {
        crate::watched::follow(self.clone(), store, from, tasks);
    }

    fn apply_events(&self, events: &[crate::store::WatchEvent]) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        for e in events {
            let key = e.kv.key.as_str();
            if !(key.starts_with(SANDBOX_PREFIX) || key.starts_with(APP_PREFIX)) {
                continue;
            }
            match e.kind {
                EventKind::Put => {
                    if let Err(err) = g.put(key, &e.kv.value) {
                        tracing::warn!("sandbox index: {err}");
                    }
                }
                EventKind::Delete => g.delete(key),
            }
        }
    }

    /// Sandboxes to route `app`'s traffic to: those reported healthy on
    /// their runner's live session (`observed`), of the active version, or
    /// (before any version is active, or when none of it is healthy) any
    /// healthy one. Read from memory only.
    pub fn healthy(&self, app: &str, observed: &Observed) -> Vec<Arc<SandboxRecord>> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let Some(assigned) = g.sandboxes.get(app) else {
            return Vec::new();
        };
        let active = g.active.get(app).and_then(Option::as_ref);
        let mut healthy: Vec<Arc<SandboxRecord>> = assigned
            .values()
            .filter(|s| observed.is_healthy(&s.runner, &s.id))
            .cloned()
            .collect();
        if healthy.iter().any(|s| Some(&s.version) == active) {
            healthy.retain(|s| Some(&s.version) == active);
        }
        healthy
    }

    /// The assignments of `app` (by id) and its active version.
    pub fn of_app(&self, app: &str) -> (Vec<Arc<SandboxRecord>>, Option<String>) {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let list: Vec<Arc<SandboxRecord>> = g
            .sandboxes
            .get(app)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        (list, g.active.get(app).cloned().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{encode, Op, RedbStore, Txn};

    fn sandbox(id: &str, app: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            app: app.into(),
            version: "v1".into(),
            service: "web".into(),
            runner: "r".into(),
            artifact: String::new(),
            created_unix: 0,
            retire_at: None,
            replaces: None,
        }
    }

    fn put_all(store: &dyn Store, ops: Vec<(String, Vec<u8>)>) {
        store
            .commit(Txn {
                conditions: vec![],
                ops: ops.into_iter().map(|(k, v)| Op::Put(k, v)).collect(),
            })
            .unwrap();
    }

    #[tokio::test]
    async fn follows_puts_and_deletes_after_loading() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let app = AppRecord {
            name: "web".into(),
            versions: vec![],
            active: Some("v1".into()),
        };
        put_all(
            &*store,
            vec![
                ("app/web".into(), encode(&app)),
                ("sandbox/a".into(), encode(&sandbox("a", "web"))),
            ],
        );
        let (index, from) = SandboxIndex::load(&*store).unwrap();
        let index = Arc::new(index);
        let (list, active) = index.of_app("web");
        assert_eq!((list.len(), active.as_deref()), (1, Some("v1")));
        let tasks = Tasks::new(tokio::runtime::Handle::current());
        index.follow(store.clone(), from, &tasks);
        put_all(
            &*store,
            vec![
                ("sandbox/b".into(), encode(&sandbox("b", "web"))),
                ("sandbox/c".into(), encode(&sandbox("c", "api"))),
            ],
        );
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Delete("sandbox/a".into())],
            })
            .unwrap();
        let settled = async {
            loop {
                let (web, _) = index.of_app("web");
                let (api, _) = index.of_app("api");
                let ids: Vec<String> = web.iter().map(|s| s.id.clone()).collect();
                if ids == ["b"] && api.len() == 1 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), settled)
            .await
            .expect("the index follows the store");
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Delete("app/web".into())],
            })
            .unwrap();
        let gone = async {
            while index.of_app("web").1.is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), gone)
            .await
            .expect("an app's deletion reaches the index");
        tasks.stop();
    }
}
