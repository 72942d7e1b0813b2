//! The coordinators of a cluster: each one present in the store while it
//! runs, so that operators (`cluster status`), the CLI (`cluster
//! export-address`) and runners can learn every address of the cluster.
//!
//! A coordinator puts `coordinator/<id>` (its [`CoordinatorRecord`]) on a
//! lease it keeps alive; when it dies the lease ends and the record goes,
//! so the list is what is running now, not what once ran. Which one leads
//! is read from [`crate::leader::LEADER_KEY`]. Anonymous peers ask for the
//! list (`Cluster.info`), so it is answered from memory ([`CoordinatorIndex`],
//! fed by a store watch), never by a store read per call.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::leader::{LeaderRecord, LEADER_KEY};
use crate::shutdown::Tasks;
use crate::store::{
    decode, encode, EventKind, LeaseId, Op, Revision, Store, StoreError, Txn, WatchBatch,
};

const PREFIX: &str = "coordinator/";
/// How long a dead coordinator stays listed.
pub const PRESENCE_TTL: Duration = Duration::from_secs(10);

/// What a coordinator says of itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoordinatorRecord {
    /// Its [`crate::leader::coordinator_id`].
    pub id: String,
    /// Its first `--name` (or listen address).
    pub name: String,
    /// `host:port` clients and runners dial.
    pub address: String,
    pub version: String,
    pub started_unix: i64,
}

/// A running coordinator and whether it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub record: CoordinatorRecord,
    pub leader: bool,
}

/// What the index knows: each key with the revision it was seen at (`None`
/// once deleted).
#[derive(Default)]
struct Known {
    coordinators: HashMap<String, (Revision, Option<CoordinatorRecord>)>,
    leader: (Revision, Option<String>),
}

/// The running coordinators and the leader, in memory.
#[derive(Default)]
pub struct CoordinatorIndex {
    known: RwLock<Known>,
}

impl CoordinatorIndex {
    /// Loads the index; returns it with the revision to follow from.
    pub fn load(store: &dyn Store) -> Result<(CoordinatorIndex, Revision), StoreError> {
        let index = CoordinatorIndex::default();
        let from = crate::watched::Watched::reload(&index, store)?;
        Ok((index, from))
    }

    /// The running coordinators, `first` (an id) first, then by name.
    pub fn list(&self, first: &str) -> Vec<Listed> {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let leader = known.leader.1.as_deref();
        let mut out: Vec<Listed> = known
            .coordinators
            .values()
            .filter_map(|(_, r)| r.clone())
            .map(|record| Listed {
                leader: leader == Some(record.id.as_str()),
                record,
            })
            .collect();
        out.sort_by(|a, b| {
            (a.record.id != first, &a.record.name).cmp(&(b.record.id != first, &b.record.name))
        });
        out
    }
}

fn leader_of(value: &[u8]) -> Option<String> {
    decode::<LeaderRecord>(LEADER_KEY, value).ok().map(|l| l.id)
}

impl crate::watched::Watched for CoordinatorIndex {
    const NAME: &'static str = "coordinator index";

    fn prefix(&self) -> &str {
        // `coordinator/` and the leader key: one watch of everything,
        // filtered here.
        ""
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let (kvs, read_at) = store.scan_kv(PREFIX)?;
        let mut fresh = Known::default();
        for kv in kvs {
            match decode::<CoordinatorRecord>(&kv.key, &kv.value) {
                Ok(r) => {
                    fresh
                        .coordinators
                        .insert(kv.key.clone(), (kv.mod_revision, Some(r)));
                }
                Err(e) => tracing::warn!("coordinator index: {e}"),
            }
        }
        fresh.leader = match store.get_kv(LEADER_KEY)? {
            Some(kv) => (kv.mod_revision, leader_of(&kv.value)),
            None => (0, None),
        };
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(read_at)
    }

    fn apply(&self, batch: &WatchBatch) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for e in &batch.events {
            let key = e.kv.key.as_str();
            if key == LEADER_KEY {
                if known.leader.0 < batch.revision {
                    known.leader = (
                        batch.revision,
                        match e.kind {
                            EventKind::Put => leader_of(&e.kv.value),
                            EventKind::Delete => None,
                        },
                    );
                }
            } else if key.starts_with(PREFIX) {
                if known
                    .coordinators
                    .get(key)
                    .is_some_and(|(r, _)| *r >= batch.revision)
                {
                    continue;
                }
                let record = match e.kind {
                    EventKind::Put => decode::<CoordinatorRecord>(key, &e.kv.value).ok(),
                    EventKind::Delete => None,
                };
                known
                    .coordinators
                    .insert(key.to_string(), (batch.revision, record));
            }
        }
    }
}

/// Keeps this coordinator listed until shutdown.
pub struct Presence {
    store: Arc<dyn Store>,
    record: CoordinatorRecord,
}

impl Presence {
    /// Lists `record` now (so that it shows from the first request on).
    pub fn start(store: Arc<dyn Store>, record: CoordinatorRecord) -> (Presence, Option<LeaseId>) {
        let p = Presence { store, record };
        let lease = match p.put() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("listing this coordinator: {e}");
                None
            }
        };
        (p, lease)
    }

    fn put(&self) -> Result<LeaseId, StoreError> {
        let lease = self.store.grant_lease(PRESENCE_TTL)?;
        self.store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::PutLeased(
                format!("{PREFIX}{}", self.record.id),
                encode(&self.record),
                lease,
            )],
        })?;
        Ok(lease)
    }

    /// Renews the record's lease (listing it again when the lease was
    /// lost) until shutdown; the record then runs out with its lease.
    pub async fn run(self, lease: Option<LeaseId>, tasks: Tasks) {
        let mut lease = lease;
        loop {
            tokio::select! {
                _ = tasks.stopping() => return,
                _ = tokio::time::sleep(PRESENCE_TTL / 3) => {}
            }
            let renewed = match lease {
                Some(l) => self.store.keep_alive(l).map(|()| l),
                None => Err(StoreError::LeaseNotFound(0)),
            };
            lease = match renewed {
                Ok(l) => Some(l),
                Err(StoreError::LeaseNotFound(_)) => match self.put() {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::info!("listing this coordinator: {e}");
                        None
                    }
                },
                Err(e) => {
                    tracing::info!("keeping this coordinator listed: {e}");
                    lease
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn rec(id: &str, name: &str) -> CoordinatorRecord {
        CoordinatorRecord {
            id: id.into(),
            name: name.into(),
            address: format!("{name}:8443"),
            version: "v".into(),
            started_unix: 1,
        }
    }

    #[test]
    fn running_coordinators_are_listed_this_one_first_with_the_leader_marked() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let (_a, _) = Presence::start(store.clone(), rec("a", "alpha"));
        let (_b, lease_b) = Presence::start(store.clone(), rec("b", "beta"));
        let (_e, _, _) = crate::leader::Elector::new(
            store.clone(),
            "a".into(),
            "alpha".into(),
            crate::leader::LEASE_TTL,
        );
        let listed = CoordinatorIndex::load(&*store).unwrap().0.list("b");
        let names: Vec<(&str, bool)> = listed
            .iter()
            .map(|l| (l.record.name.as_str(), l.leader))
            .collect();
        assert_eq!(names, [("beta", false), ("alpha", true)]);
        // A coordinator whose lease ends is no longer listed.
        store.revoke_lease(lease_b.unwrap()).unwrap();
        assert_eq!(
            CoordinatorIndex::load(&*store).unwrap().0.list("b").len(),
            1
        );
    }
}
