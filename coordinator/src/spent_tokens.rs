//! CI tokens are spent once: the `jti` of every CI token traded at the
//! token endpoint (and so every `ciLogin`) is remembered until the token
//! expires, and a second use is refused (attack catalogue item 17: a token
//! read from a job's log or environment cannot be replayed).
//!
//! Remembered in the store (`spentjti/<sha256(iss NUL jti)>`, value the
//! token's `exp`) so that a restart does not reopen a token and
//! coordinators sharing the store refuse each other's replays (the write
//! is conditioned on the key being absent); and in memory, bounded by
//! `identity::UsedStates` (over [`MAX_SPENT`] live tokens a new one is
//! refused as busy rather than forgetting one that could be replayed).
//! Expired entries are pruned from the store by [`prune_forever`].
//!
//! Spends arriving together share one store commit (a group commit: the
//! first caller writes every spend queued by then, the others wait for
//! its outcome), so a burst of logins costs one disk sync, not one each.
//! When a shared commit fails its condition (a replay from another
//! coordinator among them), its spends are committed one by one to tell
//! which.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use identity::{StateRefusal, UsedStates};
use sha2::{Digest, Sha256};

use crate::shutdown::Tasks;
use crate::store::{Condition, Op, Outcome, Store, StoreError, Txn};

const PREFIX: &str = "spentjti/";
/// Live CI tokens remembered at most (CI tokens live minutes).
pub const MAX_SPENT: usize = 100_000;
/// How often expired entries leave the store.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why a token could not be spent.
#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    #[error("this CI token was already used; each token is accepted once (fetch a new one, or let the CLI reuse the access token it got)")]
    AlreadySpent,
    #[error("too many CI tokens are live at once; retry in a minute")]
    Full,
    #[error("the spent-token memory is unavailable")]
    Unavailable,
    #[error(transparent)]
    Store(#[from] Arc<StoreError>),
}

/// One queued spend and where its outcome goes.
struct Queued {
    key: String,
    exp: i64,
    outcome: Arc<Slot>,
}

/// The outcome of one queued spend.
#[derive(Default)]
struct Slot {
    value: Mutex<Option<Result<Outcome, Arc<StoreError>>>>,
    ready: Condvar,
}

impl Slot {
    fn set(&self, v: Result<Outcome, Arc<StoreError>>) {
        if let Ok(mut slot) = self.value.lock() {
            *slot = Some(v);
        }
        self.ready.notify_all();
    }
}

/// Spends waiting for the next commit, and whether one is running.
#[derive(Default)]
struct Queue {
    waiting: Vec<Queued>,
    writing: bool,
}

/// The spent CI tokens.
pub struct SpentTokens {
    store: Arc<dyn Store>,
    memory: Mutex<UsedStates>,
    queue: Mutex<Queue>,
}

fn entry_key(issuer: &str, jti: &str) -> String {
    let mut h = Sha256::new();
    h.update(issuer.as_bytes());
    h.update([0]);
    h.update(jti.as_bytes());
    format!("{PREFIX}{}", hex::encode(h.finalize()))
}

impl SpentTokens {
    /// Loads the live entries of the store at `now`.
    pub fn load(store: Arc<dyn Store>, now: i64) -> Result<SpentTokens, StoreError> {
        let mut memory = UsedStates::new(MAX_SPENT);
        for (k, v) in store.scan(PREFIX)? {
            let exp: i64 = crate::store::decode(&k, &v)?;
            if exp > now {
                // Full only past MAX_SPENT live entries: the store holds
                // them all the same, and `spend` checks it.
                let _ = memory.accept(&k, exp, now);
            }
        }
        Ok(SpentTokens {
            store,
            memory: Mutex::new(memory),
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Spends the token `jti` of `issuer`, valid until `exp`, at `now`.
    pub fn spend(&self, issuer: &str, jti: &str, exp: i64, now: i64) -> Result<(), SpendError> {
        let key = entry_key(issuer, jti);
        self.memory
            .lock()
            .map_err(|_| SpendError::Unavailable)?
            .accept(&key, exp, now)
            .map_err(|r| match r {
                StateRefusal::AlreadyUsed => SpendError::AlreadySpent,
                StateRefusal::Full => SpendError::Full,
            })?;
        match self.commit_grouped(key.clone(), exp) {
            Ok(Outcome::Applied) => Ok(()),
            Ok(Outcome::ConditionFailed) => Err(SpendError::AlreadySpent),
            // Not recorded, so not spent: the caller was told to retry, and
            // its retry must not be refused as a replay.
            Err(e) => {
                if let Ok(mut memory) = self.memory.lock() {
                    memory.forget(&key);
                }
                Err(e)
            }
        }
    }

    /// Writes `key` (absent before) in the next group commit; returns its
    /// own outcome.
    fn commit_grouped(&self, key: String, exp: i64) -> Result<Outcome, SpendError> {
        let slot = Arc::new(Slot::default());
        let lead = {
            let mut q = self.queue.lock().map_err(|_| SpendError::Unavailable)?;
            q.waiting.push(Queued {
                key,
                exp,
                outcome: slot.clone(),
            });
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            loop {
                let batch = {
                    let mut q = self.queue.lock().map_err(|_| SpendError::Unavailable)?;
                    if q.waiting.is_empty() {
                        q.writing = false;
                        break;
                    }
                    std::mem::take(&mut q.waiting)
                };
                self.write(batch);
            }
        }
        let mut value = slot.value.lock().map_err(|_| SpendError::Unavailable)?;
        loop {
            if let Some(v) = value.take() {
                return Ok(v?);
            }
            value = slot
                .ready
                .wait(value)
                .map_err(|_| SpendError::Unavailable)?;
        }
    }

    /// One commit for `batch`; one per spend when a condition failed.
    fn write(&self, batch: Vec<Queued>) {
        let txn = |items: &[&Queued]| Txn {
            conditions: items
                .iter()
                .map(|q| Condition::Absent(q.key.clone()))
                .collect(),
            ops: items
                .iter()
                .map(|q| Op::Put(q.key.clone(), crate::store::encode(&q.exp)))
                .collect(),
        };
        let all: Vec<&Queued> = batch.iter().collect();
        match self.store.commit(txn(&all)) {
            Ok(Outcome::ConditionFailed) if batch.len() > 1 => {
                for q in &batch {
                    q.outcome
                        .set(self.store.commit(txn(&[q])).map_err(Arc::new));
                }
            }
            other => {
                let other = other.map_err(Arc::new);
                for q in &batch {
                    q.outcome.set(other.clone());
                }
            }
        }
    }

    /// Deletes the store's entries expired at `now`; returns how many.
    pub fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let mut ops = Vec::new();
        for (k, v) in self.store.scan(PREFIX)? {
            let exp: i64 = crate::store::decode(&k, &v).unwrap_or(0);
            if exp <= now {
                ops.push(Op::Delete(k));
            }
        }
        let n = ops.len();
        if n > 0 {
            self.store.commit(Txn {
                conditions: vec![],
                ops,
            })?;
        }
        Ok(n)
    }
}

/// Prunes expired entries every [`PRUNE_EVERY`] until shutdown.
pub async fn prune_forever(spent: Arc<SpentTokens>, tasks: Tasks) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tasks.stopping() => return,
        }
        if let Err(e) = spent.prune(transport::clock::now_unix()) {
            tracing::warn!("could not prune spent CI tokens: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    /// A store whose next commit fails (a lost etcd, a full disk).
    struct FailingOnce {
        inner: RedbStore,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Store for FailingOnce {
        fn get_kv(&self, key: &str) -> Result<Option<crate::store::KeyValue>, StoreError> {
            self.inner.get_kv(key)
        }
        fn range(
            &self,
            from: &str,
            to: Option<&str>,
            limit: usize,
        ) -> Result<crate::store::RangePage, StoreError> {
            self.inner.range(from, to, limit)
        }
        fn txn(&self, txn: Txn) -> Result<crate::store::Committed, StoreError> {
            if self.fail.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Backend(redb::Error::Corrupted(
                    "disk gone".into(),
                )));
            }
            self.inner.txn(txn)
        }
        fn revision(&self) -> Result<crate::store::Revision, StoreError> {
            self.inner.revision()
        }
        fn watch(
            &self,
            prefix: &str,
            from: crate::store::Revision,
        ) -> Result<crate::store::WatchStream, StoreError> {
            self.inner.watch(prefix, from)
        }
        fn grant_lease(&self, ttl: Duration) -> Result<crate::store::LeaseId, StoreError> {
            self.inner.grant_lease(ttl)
        }
        fn keep_alive(&self, lease: crate::store::LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease)
        }
        fn revoke_lease(&self, lease: crate::store::LeaseId) -> Result<(), StoreError> {
            self.inner.revoke_lease(lease)
        }
    }

    #[test]
    fn a_spend_the_store_did_not_record_is_not_a_spend() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingOnce {
            inner: RedbStore::open(&dir.path().join("s.redb")).unwrap(),
            fail: std::sync::atomic::AtomicBool::new(true),
        });
        let spent = SpentTokens::load(store, 100).unwrap();
        assert!(matches!(
            spent.spend("https://ci", "j1", 200, 100),
            Err(SpendError::Store(_))
        ));
        // Its retry goes through, once.
        spent.spend("https://ci", "j1", 200, 101).unwrap();
        assert!(matches!(
            spent.spend("https://ci", "j1", 200, 102),
            Err(SpendError::AlreadySpent)
        ));
    }

    #[test]
    fn a_token_is_spent_once_even_across_a_restart_and_expired_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let spent = SpentTokens::load(store.clone(), 100).unwrap();
        spent.spend("https://ci", "j1", 200, 100).unwrap();
        assert!(matches!(
            spent.spend("https://ci", "j1", 200, 101),
            Err(SpendError::AlreadySpent)
        ));
        spent.spend("https://other", "j1", 200, 101).unwrap();
        let restarted = SpentTokens::load(store.clone(), 150).unwrap();
        assert!(matches!(
            restarted.spend("https://ci", "j1", 200, 151),
            Err(SpendError::AlreadySpent)
        ));
        // A second coordinator on the same store, whose memory is empty.
        let other = SpentTokens {
            store: store.clone(),
            memory: Mutex::new(UsedStates::new(10)),
            queue: Mutex::new(Queue::default()),
        };
        assert!(matches!(
            other.spend("https://ci", "j1", 200, 151),
            Err(SpendError::AlreadySpent)
        ));
        // Spends from many threads at once share commits; each gets its
        // own answer, and a replay among them is still refused.
        let spent = Arc::new(restarted);
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let spent = spent.clone();
                std::thread::spawn(move || {
                    let jti = if i == 0 {
                        "j1".to_string()
                    } else {
                        format!("t{i}")
                    };
                    spent.spend("https://ci", &jti, 200, 152).is_ok()
                })
            })
            .collect();
        let oks: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(oks.iter().filter(|ok| **ok).count(), 15, "{oks:?}");
        assert!(!oks[0]);
        let restarted = spent;
        assert_eq!(store.count(PREFIX).unwrap(), 17);
        assert_eq!(restarted.prune(150).unwrap(), 0);
        assert_eq!(restarted.prune(200).unwrap(), 17);
        assert_eq!(store.count(PREFIX).unwrap(), 0);
    }
}
