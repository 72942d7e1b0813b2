//! The runner records (`runner/<id>`) in memory, fed by a store watch.
//!
//! A runner's connection, heartbeats and certificate renewals are decided
//! on its record (is it still registered, is it cordoned); reading the
//! store for each would tie every runner session to the store being up,
//! and issue 18 wants sessions and workload tokens to outlive the loss of
//! etcd. So the registry reads this index, and asks the store only about a
//! runner the index does not know yet (one that joined through another
//! coordinator a moment ago). The index also tells the registry which
//! runners went away, so that every coordinator cuts a removed runner off
//! at once, not only the one the removal went through.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::store::{decode, EventKind, Revision, Store, StoreError, WatchBatch};
use serde::{Deserialize, Serialize};

/// The prefix of runner records.
pub const PREFIX: &str = "runner/";

/// `runner/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRecord {
    pub id: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub created_unix: i64,
    pub cordoned: bool,
    /// Being drained: its sandboxes move to other runners (each old one
    /// stops once its replacement is healthy); it stays cordoned after.
    #[serde(default)]
    pub draining: bool,
    pub cert_expires_unix: i64,
    pub joined_with: String,
}

/// Runner records by id, each with the revision it was seen at (`None`
/// once deleted, so that an older event arriving late changes nothing).
#[derive(Default)]
pub struct RunnerRecords {
    by_id: RwLock<HashMap<String, (Revision, Option<RunnerRecord>)>>,
}

impl RunnerRecords {
    /// The record of runner `id`, if the index has it.
    pub fn get(&self, id: &str) -> Option<RunnerRecord> {
        self.read().get(id).and_then(|(_, r)| r.clone())
    }

    /// Every record, in no order.
    pub fn all(&self) -> Vec<RunnerRecord> {
        self.read()
            .values()
            .filter_map(|(_, r)| r.clone())
            .collect()
    }

    /// Notes a write committed here at `revision` (`None`: a delete), so
    /// that this coordinator reads its own writes before the watch brings
    /// them.
    pub fn note(&self, id: &str, revision: Revision, record: Option<RunnerRecord>) {
        let mut known = self.write();
        if known.get(id).is_some_and(|(r, _)| *r >= revision) {
            return;
        }
        known.insert(id.to_string(), (revision, record));
    }

    /// Reads every record again; returns the revision to follow from and
    /// the runners that were known and are gone.
    pub fn reload(&self, store: &dyn Store) -> Result<(Revision, Vec<String>), StoreError> {
        let (kvs, read_at) = store.scan_kv(PREFIX)?;
        let mut fresh = HashMap::new();
        for kv in kvs {
            match decode::<RunnerRecord>(&kv.key, &kv.value) {
                Ok(r) => {
                    fresh.insert(r.id.clone(), (kv.mod_revision, Some(r)));
                }
                Err(e) => tracing::warn!("runner records: {e}"),
            }
        }
        let mut known = self.write();
        let gone = known
            .iter()
            .filter(|(id, (_, r))| r.is_some() && !fresh.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        *known = fresh;
        Ok((read_at, gone))
    }

    /// Applies one revision's changes; returns the runners whose record
    /// was deleted.
    pub fn apply(&self, batch: &WatchBatch) -> Vec<String> {
        let mut known = self.write();
        let mut gone = Vec::new();
        for e in &batch.events {
            let Some(id) = e.kv.key.strip_prefix(PREFIX) else {
                continue;
            };
            if known.get(id).is_some_and(|(r, _)| *r >= batch.revision) {
                continue;
            }
            let record = match e.kind {
                EventKind::Put => match decode::<RunnerRecord>(&e.kv.key, &e.kv.value) {
                    Ok(r) => Some(r),
                    Err(err) => {
                        tracing::warn!("runner records: {err}");
                        continue;
                    }
                },
                EventKind::Delete => None,
            };
            let was = known.insert(id.to_string(), (batch.revision, record.clone()));
            if record.is_none() && was.is_some_and(|(_, r)| r.is_some()) {
                gone.push(id.to_string());
            }
        }
        gone
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.by_id.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.by_id.write().unwrap_or_else(|p| p.into_inner())
    }
}

type Known = HashMap<String, (Revision, Option<RunnerRecord>)>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{encode, KeyValue, Op, RedbStore, Txn, WatchEvent};

    fn rec(id: &str) -> RunnerRecord {
        RunnerRecord {
            id: id.into(),
            name: format!("n-{id}"),
            labels: vec![],
            created_unix: 1,
            cordoned: false,
            draining: false,
            cert_expires_unix: 2,
            joined_with: "t".into(),
        }
    }

    fn event(kind: EventKind, id: &str) -> WatchEvent {
        WatchEvent {
            kind,
            kv: KeyValue {
                key: format!("{PREFIX}{id}"),
                value: match kind {
                    EventKind::Put => encode(&rec(id)),
                    EventKind::Delete => vec![],
                },
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: None,
            },
        }
    }

    #[test]
    fn deletes_are_reported_and_reload_reports_what_went_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        for id in ["a", "b"] {
            store
                .commit(Txn {
                    conditions: vec![],
                    ops: vec![Op::Put(format!("{PREFIX}{id}"), encode(&rec(id)))],
                })
                .unwrap();
        }
        let index = RunnerRecords::default();
        let (_, gone) = index.reload(&store).unwrap();
        assert!(gone.is_empty());
        assert_eq!(index.get("a"), Some(rec("a")));
        let gone = index.apply(&WatchBatch {
            revision: 9,
            events: vec![
                event(EventKind::Put, "c"),
                event(EventKind::Delete, "a"),
                // Not a runner record: ignored.
                WatchEvent {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key: "runnerx".into(),
                        value: vec![],
                        create_revision: 1,
                        mod_revision: 1,
                        version: 1,
                        lease: None,
                    },
                },
            ],
        });
        assert_eq!(gone, ["a"]);
        assert_eq!(index.get("a"), None);
        assert_eq!(index.get("c"), Some(rec("c")));
        // An older event arriving late changes nothing.
        let late = index.apply(&WatchBatch {
            revision: 8,
            events: vec![event(EventKind::Put, "a")],
        });
        assert!(late.is_empty());
        assert_eq!(index.get("a"), None);
        // A write noted here shows before the watch brings it.
        index.note("d", 10, Some(rec("d")));
        assert_eq!(index.get("d"), Some(rec("d")));
        // The store never had "c" nor "d": a reload says they are gone.
        let (_, mut gone) = index.reload(&store).unwrap();
        gone.sort();
        assert_eq!(gone, ["c", "d"]);
        let mut ids: Vec<String> = index.all().into_iter().map(|r| r.id).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
    }
}
