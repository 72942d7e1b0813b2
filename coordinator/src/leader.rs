//! One leader among the coordinators sharing a store, for the work that
//! must not run twice at once: the reconcile loop and key rotation.
//!
//! The leader holds one key, [`LEADER_KEY`], put on a lease it keeps alive;
//! when it dies the lease expires, the key goes, and the next candidate
//! that sees it gone puts its own (compare-and-set on "absent", so exactly
//! one wins). A coordinator restarted on the same data dir (same
//! [`coordinator_id`]) finds its own name on the key and takes it back at
//! once instead of waiting out the lease of its previous life. Nothing the
//! leader does relies on being the only writer: every step of the work is
//! a compare-and-set on revisions, so a leader that lost its lease without
//! noticing yet can fail a write, never corrupt one.
//!
//! With the embedded store there is one coordinator and it leads from
//! start; with etcd the same code elects one of several.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use crate::shutdown::Tasks;
use crate::store::{Condition, EventKind, LeaseId, Op, Outcome, Store, StoreError, Txn};

/// The key the leader holds.
pub const LEADER_KEY: &str = "leader/coordinator";
/// How long a dead leader keeps the key: the longest the work waits for
/// another coordinator to take over.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// The data dir file naming this coordinator among the others.
pub const COORDINATOR_ID_FILE: &str = "coordinator-id";

/// What the leader key says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderRecord {
    /// The leading coordinator's [`coordinator_id`].
    pub id: String,
    /// The name operators know it by (its first `--name`).
    pub name: String,
    pub since_unix: i64,
}

/// What a candidate should do about the leader key, given what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody leads: put ours if the key is still absent.
    Create,
    /// The key names us (from before a restart): replace it if it has not
    /// changed since it was read.
    TakeBack { mod_revision: u64 },
    /// Another coordinator leads.
    Wait,
}

/// The rule: lead when nobody does or when the leader is ourselves.
pub fn claim(existing: Option<(&LeaderRecord, u64)>, ours: &str) -> Claim {
    match existing {
        None => Claim::Create,
        Some((rec, mod_revision)) if rec.id == ours => Claim::TakeBack { mod_revision },
        Some(_) => Claim::Wait,
    }
}

/// Failures of the data dir's coordinator id.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "{path}: {source} (fix its permissions, or delete it to give this coordinator a new id)"
    )]
    IdFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a coordinator id (delete it to give this coordinator a new id)")]
    BadId { path: std::path::PathBuf },
}

/// This coordinator's id: made once per data dir, kept across restarts.
pub fn coordinator_id(dir: &Path) -> Result<String, LeaderError> {
    let path = dir.join(COORDINATOR_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if uuid::Uuid::parse_str(id).is_err() {
                return Err(LeaderError::BadId { path });
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            transport::files::write_atomic(&path, id.as_bytes(), 0o644)
                .map_err(|source| LeaderError::IdFile { path, source })?;
            Ok(id)
        }
        Err(source) => Err(LeaderError::IdFile { path, source }),
    }
}

/// Whether this coordinator leads now, and a way to wait until it does.
#[derive(Debug, Clone)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
}

impl Leadership {
    /// A leadership that is always held (tests, and parts built without an
    /// election).
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        // Keep the value: a receiver whose sender is gone still reads it.
        drop(tx);
        Leadership { leading: rx }
    }

    /// Whether this coordinator leads right now.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until this coordinator leads (at once when it does).
    pub async fn leading(&self) {
        let mut rx = self.leading.clone();
        let _ = rx.wait_for(|l| *l).await;
    }
}

/// A coordinator standing for leader.
pub struct Elector {
    store: Arc<dyn Store>,
    record: LeaderRecord,
    ttl: Duration,
    tx: watch::Sender<bool>,
}

impl Elector {
    /// Stands for leader with `id` and `name`; tries once at once, so that
    /// a lone coordinator (or one restarted on its data dir) leads before
    /// its loops start.
    pub fn new(
        store: Arc<dyn Store>,
        id: String,
        name: String,
        ttl: Duration,
    ) -> (Elector, Leadership, Option<LeaseId>) {
        let (tx, rx) = watch::channel(false);
        let record = LeaderRecord {
            id,
            name,
            since_unix: transport::clock::now_unix(),
        };
        let e = Elector {
            store,
            record,
            ttl,
            tx,
        };
        let lease = match e.try_lead() {
            Ok(lease) => lease,
            Err(err) => {
                tracing::warn!("leader election: {err}");
                None
            }
        };
        e.tx.send_replace(lease.is_some());
        (e, Leadership { leading: rx }, lease)
    }

    /// One attempt; `Some(lease)` when this coordinator now leads.
    fn try_lead(&self) -> Result<Option<LeaseId>, StoreError> {
        let existing = self.store.get_kv(LEADER_KEY)?;
        let parsed = match &existing {
            Some(kv) => match serde_json::from_slice::<LeaderRecord>(&kv.value) {
                Ok(rec) => Some((rec, kv.mod_revision, kv.lease)),
                // Unreadable: treat as someone else's until its lease ends.
                Err(_) => return Ok(None),
            },
            None => None,
        };
        let condition = match claim(parsed.as_ref().map(|(r, m, _)| (r, *m)), &self.record.id) {
            Claim::Wait => return Ok(None),
            Claim::Create => Condition::Absent(LEADER_KEY.into()),
            Claim::TakeBack { mod_revision } => {
                Condition::ModRevision(LEADER_KEY.into(), mod_revision)
            }
        };
        let lease = self.store.grant_lease(self.ttl)?;
        let record = LeaderRecord {
            since_unix: transport::clock::now_unix(),
            ..self.record.clone()
        };
        let txn = Txn {
            conditions: vec![condition],
            ops: vec![Op::PutLeased(
                LEADER_KEY.into(),
                crate::store::encode(&record),
                lease,
            )],
        };
        match self.store.commit(txn)? {
            Outcome::Applied => {
                // Our previous life's lease has nothing left to hold.
                if let Some((_, _, Some(old))) = parsed {
                    let _ = self.store.revoke_lease(old);
                }
                tracing::info!(id = %self.record.id, "leading the coordinators");
                Ok(Some(lease))
            }
            Outcome::ConditionFailed => {
                let _ = self.store.revoke_lease(lease);
                Ok(None)
            }
        }
    }

    /// Whether the key still names us on `lease`.
    fn still_ours(&self, lease: LeaseId) -> Result<bool, StoreError> {
        Ok(self.store.get_kv(LEADER_KEY)?.is_some_and(|kv| {
            kv.lease == Some(lease)
                && serde_json::from_slice::<LeaderRecord>(&kv.value)
                    .is_ok_and(|r| r.id == self.record.id)
        }))
    }

    /// Keeps the leadership (or stands again) until shutdown.
    pub async fn run(self, lease: Option<LeaseId>, tasks: Tasks) {
        let mut lease = lease;
        let every = self.ttl / 3;
        // When renewals last succeeded: past a TTL without one, another
        // coordinator may lead, so we stop.
        let mut renewed = tokio::time::Instant::now();
        loop {
            match lease {
                Some(l) => {
                    tokio::select! {
                        _ = tasks.stopping() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                    match self.store.keep_alive(l).and_then(|()| self.still_ours(l)) {
                        Ok(true) => renewed = tokio::time::Instant::now(),
                        Ok(false) | Err(StoreError::LeaseNotFound(_)) => {
                            tracing::warn!("leadership lost (lease ended)");
                            lease = None;
                            self.tx.send_replace(false);
                        }
                        Err(e) => {
                            if renewed.elapsed() >= self.ttl {
                                tracing::warn!(
                                    "leadership given up: no renewal for a lease time ({e})"
                                );
                                lease = None;
                                self.tx.send_replace(false);
                            } else {
                                tracing::info!("leadership renewal failed: {e}");
                            }
                        }
                    }
                }
                None => {
                    // Wait for the key to go (or a while), then stand again.
                    let watch = self.store.watch(LEADER_KEY, 0);
                    let gone = async {
                        match watch {
                            Ok(mut w) => {
                                while let Some(Ok(b)) = w.next().await {
                                    if b.events.iter().any(|e| e.kind == EventKind::Delete) {
                                        return;
                                    }
                                }
                            }
                            Err(_) => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = tasks.stopping() => break,
                        _ = gone => {}
                        _ = tokio::time::sleep(every) => {}
                    }
                    match self.try_lead() {
                        Ok(Some(l)) => {
                            lease = Some(l);
                            renewed = tokio::time::Instant::now();
                            self.tx.send_replace(true);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::info!("leader election: {e}"),
                    }
                }
            }
        }
        // At shutdown the lease is left to run out rather than revoked: the
        // reconcile loop still records interrupted rollouts as leader while
        // the process drains, and the same coordinator started again takes
        // the key back at once. Another one takes over within the TTL.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn rec(id: &str) -> LeaderRecord {
        LeaderRecord {
            id: id.into(),
            name: "n".into(),
            since_unix: 0,
        }
    }

    #[test]
    fn lead_when_nobody_does_or_when_the_leader_is_us() {
        assert_eq!(claim(None, "a"), Claim::Create);
        assert_eq!(
            claim(Some((&rec("a"), 7)), "a"),
            Claim::TakeBack { mod_revision: 7 }
        );
        assert_eq!(claim(Some((&rec("b"), 7)), "a"), Claim::Wait);
    }

    #[test]
    fn one_of_two_leads_and_a_restarted_leader_takes_its_place_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let (_a, a, lease_a) = Elector::new(store.clone(), "a".into(), "a".into(), LEASE_TTL);
        let (_b, b, lease_b) = Elector::new(store.clone(), "b".into(), "b".into(), LEASE_TTL);
        assert!(a.is_leader() && lease_a.is_some());
        assert!(!b.is_leader() && lease_b.is_none());
        // "a" again (its process restarted on its data dir): leads at once,
        // and its old lease no longer holds the key.
        let (_a2, a2, lease_a2) = Elector::new(store.clone(), "a".into(), "a".into(), LEASE_TTL);
        assert!(a2.is_leader());
        let kv = store.get_kv(LEADER_KEY).unwrap().unwrap();
        assert_eq!(kv.lease, lease_a2);
        assert!(store.keep_alive(lease_a.unwrap()).is_err());
    }

    #[test]
    fn a_coordinator_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = coordinator_id(dir.path()).unwrap();
        assert_eq!(coordinator_id(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join(COORDINATOR_ID_FILE), "junk").unwrap();
        assert!(matches!(
            coordinator_id(dir.path()),
            Err(LeaderError::BadId { .. })
        ));
    }
}
