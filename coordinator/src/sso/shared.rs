//! Route OIDC state that every coordinator sharing the store must see at
//! once, or an attacker replays on one what another consumed or ended:
//!
//! - **used login states** (`routeoidc-state/<sha256(state)>`): a callback
//!   reads its `state` here before asking the provider (refused if used)
//!   and consumes it with a create-only transaction only once the provider
//!   exchanged the code and the ID token and nonce checked out, so a
//!   callback used on one coordinator is refused on every other. Anyone can
//!   get a sealed login cookie and its `state` from the gate, so only a
//!   login the provider completed writes here: an anonymous peer cannot
//!   fill the store. Each state lives on a lease that ends after the login
//!   window ([`StateLease`]).
//! - **ended sessions** (`routeoidc-ended/<session id>`): a logout is
//!   written on a lease that ends when the session would have anyway, and
//!   every coordinator follows the prefix by a watch ([`EndedSessions`],
//!   through [`crate::watched`]); the coordinator that wrote it has it in
//!   memory before the logout returns.
//! - **the latest refresh of a session** (`routeoidc-refresh/<session
//!   id>`, [`RefreshRecord`]): changed only by compare-and-set on the
//!   revision read, so of two coordinators refreshing one session at once
//!   one asks the provider and the other reads its result. It holds a
//!   refresh token and claims, so it is sealed with the route OIDC cookie
//!   key (bound to its key name) and leased until the session's cap.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use identity::route_oidc::SessionClaims;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cookie::CookieKey;
use super::flow::LOGIN_SECS;
use crate::store::{
    Condition, EventKind, KeyValue, LeaseId, Op, Outcome, Revision, Store, StoreError, Txn,
    WatchBatch,
};

/// Store prefix of sessions ended by logout: `routeoidc-ended/<session id>`
/// holds the time (Unix seconds) the session would have ended anyway.
pub(super) const ENDED_PREFIX: &str = "routeoidc-ended/";
/// Store prefix of used login states.
const STATE_PREFIX: &str = "routeoidc-state/";
/// Store prefix of the latest refresh of each session.
const REFRESH_PREFIX: &str = "routeoidc-refresh/";

/// Why a login's `state` could not be consumed in the store.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// Another callback (on any coordinator) consumed it first.
    #[error("login state already used")]
    AlreadyUsed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The lease used states are written on. One lease serves every state
/// consumed during [`LOGIN_SECS`] and lives twice that, so each state
/// outlives its login window without a lease grant per login.
#[derive(Default)]
pub struct StateLease {
    /// The lease and when (Unix seconds) it was granted.
    current: Mutex<Option<(LeaseId, i64)>>,
}

impl StateLease {
    fn get(&self, store: &dyn Store, now: i64) -> Result<LeaseId, StoreError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, at)) = *cur {
            if (0..LOGIN_SECS).contains(&(now - at)) {
                return Ok(id);
            }
        }
        let id = store.grant_lease(Duration::from_secs(2 * LOGIN_SECS as u64))?;
        *cur = Some((id, now));
        Ok(id)
    }

    fn forget(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

fn state_key(state: &str) -> String {
    format!(
        "{STATE_PREFIX}{}",
        hex::encode(Sha256::digest(state.as_bytes()))
    )
}

/// Whether `state` was consumed already (by a callback on any
/// coordinator). A read only: a callback asks this before the provider, and
/// writes ([`consume_state`]) only after the provider completed the login.
pub fn state_used(store: &dyn Store, state: &str) -> Result<bool, StoreError> {
    Ok(store.get_kv(&state_key(state))?.is_some())
}

/// Consumes `state` (of a login valid until `exp`) in the store: applied
/// once, on any coordinator. Called only for a login the provider
/// completed, so each write costs a real login.
pub fn consume_state(
    store: &dyn Store,
    lease: &StateLease,
    state: &str,
    exp: i64,
    now: i64,
) -> Result<(), ConsumeError> {
    let key = state_key(state);
    // Once more with a fresh lease when the current one is gone (etcd lost
    // it, or the embedded store restarted).
    let mut retried = false;
    loop {
        let id = lease.get(store, now)?;
        let txn = Txn {
            conditions: vec![Condition::Absent(key.clone())],
            ops: vec![Op::PutLeased(key.clone(), exp.to_string().into_bytes(), id)],
        };
        match store.commit(txn) {
            Ok(Outcome::Applied) => return Ok(()),
            Ok(Outcome::ConditionFailed) => return Err(ConsumeError::AlreadyUsed),
            Err(StoreError::LeaseNotFound(_)) if !retried => {
                lease.forget();
                retried = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sessions ended by logout (session id -> the time it would have ended
/// anyway), following the store.
#[derive(Default)]
pub struct EndedSessions {
    ended: RwLock<HashMap<String, i64>>,
}

fn parse_ended(kv: &KeyValue) -> Option<(String, i64)> {
    let sid = kv.key.strip_prefix(ENDED_PREFIX)?.to_string();
    let until = std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok()?;
    Some((sid, until))
}

impl EndedSessions {
    /// Whether session `sid` was ended and would still be live at `now`.
    pub fn contains(&self, sid: &str, now: i64) -> bool {
        self.ended
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sid)
            .is_some_and(|until| *until > now)
    }

    /// Records the end of `sid` in the store (on a lease running out when
    /// the session would have) and in memory.
    pub fn end(
        &self,
        store: &dyn Store,
        sid: &str,
        until: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.ended
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sid.to_string(), until);
        let ttl = Duration::from_secs((until - now).max(1) as u64);
        let lease = store.grant_lease(ttl)?;
        let written = store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::PutLeased(
                format!("{ENDED_PREFIX}{sid}"),
                until.to_string().into_bytes(),
                lease,
            )],
        });
        if written.is_err() {
            // Nothing is on the lease: do not leave it to run out.
            revoke_unused(store, lease);
        }
        written.map(|_| ())
    }
}

impl crate::watched::Watched for EndedSessions {
    const NAME: &'static str = "route OIDC ended sessions";

    fn prefix(&self) -> &str {
        ENDED_PREFIX
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let (kvs, read_at) = store.scan_kv(ENDED_PREFIX)?;
        let now = transport::clock::now_unix();
        // Records written before ends were leased have no lease to take
        // them away: those that lapsed go now.
        let lapsed: Vec<&KeyValue> = kvs
            .iter()
            .filter(|kv| kv.lease.is_none())
            .filter(|kv| parse_ended(kv).is_none_or(|(_, until)| until <= now))
            .collect();
        if !lapsed.is_empty() {
            let dropped = store.commit(Txn {
                conditions: lapsed
                    .iter()
                    .map(|kv| Condition::ModRevision(kv.key.clone(), kv.mod_revision))
                    .collect(),
                ops: lapsed.iter().map(|kv| Op::Delete(kv.key.clone())).collect(),
            });
            if let Err(e) = dropped {
                tracing::warn!("route OIDC: dropping lapsed unleased logouts: {e}");
            }
        }
        let fresh: HashMap<String, i64> = kvs.iter().filter_map(parse_ended).collect();
        let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
        // Nothing deletes an end before its time: what memory holds beyond
        // the store (a logout whose write failed) stays refused until then.
        ended.retain(|_, until| *until > now);
        ended.extend(fresh);
        Ok(read_at)
    }

    fn apply(&self, batch: &WatchBatch) {
        let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
        for e in &batch.events {
            match e.kind {
                EventKind::Put => {
                    if let Some((sid, until)) = parse_ended(&e.kv) {
                        ended.insert(sid, until);
                    }
                }
                EventKind::Delete => {
                    if let Some(sid) = e.kv.key.strip_prefix(ENDED_PREFIX) {
                        ended.remove(sid);
                    }
                }
            }
        }
    }
}

/// The latest refresh of one session, as every coordinator shares it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefreshRecord {
    /// The session as last renewed (its refresh token the newest); `None`
    /// before a refresh succeeded.
    pub latest: Option<SessionClaims>,
    /// A coordinator is asking the provider until then (Unix seconds); the
    /// others wait for its result, or take over after it.
    pub refreshing_until: Option<i64>,
    /// The provider refused the last refresh then (Unix seconds).
    pub failed_at: Option<i64>,
}

/// Why the refresh record was not written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the route OIDC key could not seal the session's refresh record")]
    Seal,
}

/// A [`RefreshRecord`] as read, with what a compare-and-set needs.
pub struct ReadRefresh {
    pub record: RefreshRecord,
    /// The revision to write over (0: none yet).
    pub revision: Revision,
    pub lease: Option<LeaseId>,
}

fn refresh_key(sid: &str) -> String {
    format!("{REFRESH_PREFIX}{sid}")
}

/// Reads the refresh record of `sid`; one that does not open (sealed under
/// another key, altered) counts as none, to be written over.
pub(super) fn read_refresh(
    store: &dyn Store,
    key: &CookieKey,
    sid: &str,
) -> Result<ReadRefresh, StoreError> {
    let name = refresh_key(sid);
    let Some(kv) = store.get_kv(&name)? else {
        return Ok(ReadRefresh {
            record: RefreshRecord::default(),
            revision: 0,
            lease: None,
        });
    };
    let record = std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|sealed| key.open(&name, sealed))
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .unwrap_or_default();
    Ok(ReadRefresh {
        record,
        revision: kv.mod_revision,
        lease: kv.lease,
    })
}

/// Writes `record` for `sid` if the record is still at `read.revision`;
/// `Ok(None)` when another coordinator changed it first, else the new
/// revision and the lease it is on. The record lives until `ends_at` (the
/// session's cap).
pub(super) fn write_refresh(
    store: &dyn Store,
    key: &CookieKey,
    sid: &str,
    read: &ReadRefresh,
    record: &RefreshRecord,
    ends_at: i64,
    now: i64,
) -> Result<Option<(Revision, LeaseId)>, RecordError> {
    let name = refresh_key(sid);
    let sealed = serde_json::to_vec(record)
        .ok()
        .and_then(|plain| key.seal(&name, &plain))
        .ok_or(RecordError::Seal)?;
    let mut lease = read.lease;
    let mut retried = false;
    loop {
        // A lease granted here (none on the record, or its lease ran out)
        // is revoked again when the record is not written on it.
        let (id, granted) = match lease {
            Some(id) => (id, false),
            None => (
                store.grant_lease(Duration::from_secs((ends_at - now).max(1) as u64))?,
                true,
            ),
        };
        let txn = Txn {
            conditions: vec![Condition::ModRevision(name.clone(), read.revision)],
            ops: vec![Op::PutLeased(name.clone(), sealed.clone().into_bytes(), id)],
        };
        let written = store.txn(txn);
        if granted && !matches!(&written, Ok(c) if c.outcome == Outcome::Applied) {
            revoke_unused(store, id);
        }
        match written {
            Ok(c) if c.outcome == Outcome::Applied => return Ok(Some((c.revision, id))),
            Ok(_) => return Ok(None),
            // The record's lease ran out under us: a new one.
            Err(StoreError::LeaseNotFound(_)) if !retried => {
                lease = None;
                retried = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Revokes `lease`, granted for a write that did not happen. When even
/// that fails, the lease runs out by itself (nothing is on it).
fn revoke_unused(store: &dyn Store, lease: LeaseId) {
    if let Err(e) = store.revoke_lease(lease) {
        tracing::warn!("route OIDC: revoking an unused lease (it runs out by itself): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;
    use crate::watched::Watched;

    fn store() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        (dir, s)
    }

    /// A store that remembers the leases it granted and can be told to
    /// fail every transaction (etcd lost in the middle of a write).
    struct Leases {
        inner: RedbStore,
        granted: Mutex<Vec<LeaseId>>,
        failing: std::sync::atomic::AtomicBool,
    }

    impl Leases {
        fn new(inner: RedbStore) -> Leases {
            Leases {
                inner,
                granted: Mutex::new(Vec::new()),
                failing: Default::default(),
            }
        }

        /// The granted leases that are still alive.
        fn alive(&self) -> Vec<LeaseId> {
            let granted = self.granted.lock().unwrap().clone();
            granted
                .into_iter()
                .filter(|id| self.inner.keep_alive(*id).is_ok())
                .collect()
        }
    }

    impl Store for Leases {
        fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get_kv(key)
        }
        fn range(
            &self,
            prefix: &str,
            after: Option<&str>,
            limit: usize,
        ) -> Result<crate::store::RangePage, StoreError> {
            self.inner.range(prefix, after, limit)
        }
        fn txn(&self, txn: Txn) -> Result<crate::store::Committed, StoreError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Backend(redb::Error::Corrupted(
                    "disk gone".into(),
                )));
            }
            self.inner.txn(txn)
        }
        fn revision(&self) -> Result<Revision, StoreError> {
            self.inner.revision()
        }
        fn watch(
            &self,
            prefix: &str,
            from: Revision,
        ) -> Result<crate::store::WatchStream, StoreError> {
            self.inner.watch(prefix, from)
        }
        fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            let id = self.inner.grant_lease(ttl)?;
            self.granted.lock().unwrap().push(id);
            Ok(id)
        }
        fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease)
        }
        fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke_lease(lease)
        }
    }

    #[test]
    fn a_lease_granted_for_a_write_that_did_not_happen_is_revoked() {
        let (d, s) = store();
        let s = Leases::new(s);
        let key = CookieKey::load_or_create(&d.path().join("k")).unwrap();
        let now = 1_700_000_000;
        let record = RefreshRecord {
            refreshing_until: Some(now + 30),
            ..Default::default()
        };
        // Two coordinators read the same (absent) record; the second's
        // compare-and-set loses, and the lease it was granted goes.
        let first = read_refresh(&s, &key, "sid").unwrap();
        let (_, won) = write_refresh(&s, &key, "sid", &first, &record, now + 100, now)
            .unwrap()
            .expect("the first claim wins");
        assert_eq!(
            write_refresh(&s, &key, "sid", &first, &record, now + 100, now).unwrap(),
            None
        );
        assert_eq!(s.granted.lock().unwrap().len(), 2);
        assert_eq!(s.alive(), vec![won], "the losing write's lease is revoked");

        // A logout whose commit fails leaves no lease either (and is still
        // refused here, from memory).
        let ended = EndedSessions::default();
        s.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(ended.end(&s, "sid-2", now + 60, now).is_err());
        assert!(ended.contains("sid-2", now));
        assert_eq!(s.granted.lock().unwrap().len(), 3);
        assert_eq!(s.alive(), vec![won], "the failed logout's lease is revoked");
    }

    #[test]
    fn a_state_is_read_without_a_write_and_consumed_once_through_any_coordinator() {
        let (_d, s) = store();
        let before = s.revision().unwrap();
        assert!(!state_used(&s, "st-1").unwrap());
        assert_eq!(s.revision().unwrap(), before, "a read writes nothing");
        consume_state(
            &s,
            &StateLease::default(),
            "st-1",
            1_700_000_600,
            1_700_000_000,
        )
        .unwrap();
        assert!(state_used(&s, "st-1").unwrap());
        assert!(!state_used(&s, "st-2").unwrap());
    }

    #[test]
    fn a_state_is_consumed_once_through_any_coordinator_sharing_the_store() {
        let (_d, s) = store();
        // Two coordinators: their own leases, one store.
        let (a, b) = (StateLease::default(), StateLease::default());
        let now = 1_700_000_000;
        consume_state(&s, &a, "st-1", now + 600, now).unwrap();
        assert!(matches!(
            consume_state(&s, &b, "st-1", now + 600, now + 1),
            Err(ConsumeError::AlreadyUsed)
        ));
        consume_state(&s, &b, "st-2", now + 600, now + 1).unwrap();
        // The state itself is not in the key.
        let keys: Vec<String> = s
            .scan(STATE_PREFIX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(keys.iter().all(|k| !k.contains("st-")), "{keys:?}");
        // A lease that is gone is replaced.
        let id = a.get(&s, now).unwrap();
        s.revoke_lease(id).unwrap();
        consume_state(&s, &a, "st-3", now + 600, now + 2).unwrap();
    }

    #[test]
    fn an_end_is_seen_by_a_follower_and_in_memory_at_once() {
        let (_d, s) = store();
        let (writer, follower) = (EndedSessions::default(), EndedSessions::default());
        let from = follower.reload(&s).unwrap();
        let now = 1_700_000_000;
        writer.end(&s, "sid-1", now + 60, now).unwrap();
        assert!(writer.contains("sid-1", now));
        assert!(!writer.contains("sid-1", now + 60), "over by then anyway");
        // The follower applies the store's change.
        let kv = s.get_kv(&format!("{ENDED_PREFIX}sid-1")).unwrap().unwrap();
        assert!(kv.lease.is_some(), "leased");
        follower.apply(&WatchBatch {
            revision: kv.mod_revision,
            events: vec![crate::store::WatchEvent {
                kind: EventKind::Put,
                kv: kv.clone(),
            }],
        });
        assert!(kv.mod_revision > from);
        assert!(follower.contains("sid-1", now));
        // A reload finds it too.
        let fresh = EndedSessions::default();
        fresh.reload(&s).unwrap();
        assert!(fresh.contains("sid-1", now));
        // Unleased records from before: a lapsed one goes at the next
        // load, a live one stays.
        let live = transport::clock::now_unix() + 600;
        s.commit(Txn {
            conditions: vec![],
            ops: vec![
                Op::Put(format!("{ENDED_PREFIX}old"), b"1000".to_vec()),
                Op::Put(
                    format!("{ENDED_PREFIX}young"),
                    live.to_string().into_bytes(),
                ),
            ],
        })
        .unwrap();
        fresh.reload(&s).unwrap();
        assert!(s.get(&format!("{ENDED_PREFIX}old")).unwrap().is_none());
        assert!(s.get(&format!("{ENDED_PREFIX}young")).unwrap().is_some());
        assert!(fresh.contains("young", live - 1));
    }

    #[test]
    fn a_refresh_record_is_compare_and_set_and_sealed() {
        let (d, s) = store();
        let key = CookieKey::load_or_create(&d.path().join("k")).unwrap();
        let now = 1_700_000_000;
        let first = read_refresh(&s, &key, "sid").unwrap();
        assert_eq!(first.revision, 0);
        let claiming = RefreshRecord {
            refreshing_until: Some(now + 30),
            ..Default::default()
        };
        let (rev, _) = write_refresh(&s, &key, "sid", &first, &claiming, now + 100, now)
            .unwrap()
            .expect("the first claim wins");
        // A second writer that read before loses.
        assert_eq!(
            write_refresh(&s, &key, "sid", &first, &claiming, now + 100, now).unwrap(),
            None
        );
        let read = read_refresh(&s, &key, "sid").unwrap();
        assert_eq!(read.revision, rev);
        assert_eq!(read.record.refreshing_until, Some(now + 30));
        // Sealed: the stored bytes hold no JSON field name.
        let raw = s.get(&refresh_key("sid")).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("refreshing_until"));
        // Moved to another session's key, it does not open.
        s.commit(Txn {
            conditions: vec![],
            ops: vec![Op::Put(refresh_key("other"), raw)],
        })
        .unwrap();
        assert!(read_refresh(&s, &key, "other")
            .unwrap()
            .record
            .refreshing_until
            .is_none());
    }
}
