//! The coordinator's durable state behind a key-value trait shaped like etcd.
//!
//! A converging control plane needs more than get/put: every key carries the
//! revision that last changed it (so writes are compare-and-set on what was
//! read), changes can be watched in order from a revision (so in-memory
//! indexes follow the store instead of re-reading it), ranges are paged (so
//! no reply is unbounded), and records can be tied to a lease (so they vanish
//! with their owner). The trait is etcd's model — one revision counter for
//! the whole store, transactions of compare-then-ops, watches that say
//! "compacted, re-list" when asked for history that is gone — so that an etcd
//! backend can serve several coordinators behind the same trait. The embedded
//! backend, [`RedbStore`], implements all of it in-process on redb.
//!
//! Keys are `kind/id` strings, values JSON ([`encode`], [`decode`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// A point in the store's history: every applied transaction that writes
/// increases it by one. Revision 0 is "before anything".
pub type Revision = u64;

/// Values by key.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Per key: create revision, mod revision, version, lease ([`KeyMeta`]).
const KV_META: TableDefinition<&str, &[u8]> = TableDefinition::new("kv_meta");
/// The change log by revision, kept for [`LOG_RETAIN`] revisions.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Leases by id: their TTL in seconds.
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
/// Counters: the current revision, the compacted revision, the lease sequence.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_LEASE_SEQ: &str = "lease_seq";

/// How many revisions of change log a watcher can resume from; older ones
/// are compacted and a watch from before them is told to re-list.
pub const LOG_RETAIN: u64 = 10_000;
/// Largest page [`Store::range`] returns, whatever the caller asks.
pub const MAX_RANGE_LIMIT: usize = 10_000;
/// How often the embedded backend looks for expired leases.
const LEASE_TICK: Duration = Duration::from_millis(200);

/// Store failures. `Open` names the file so operators know what to restore.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} could not be opened: {reason} (restore it from a backup, or move the data dir aside to start a new cluster)")]
    Open {
        path: PathBuf,
        #[source]
        reason: OpenFault,
    },
    #[error("store operation failed: {0}")]
    Backend(#[source] redb::Error),
    #[error("stored record {key} is not valid: {reason}")]
    Record {
        key: String,
        #[source]
        reason: RecordFault,
    },
    /// A watch asked for history that compaction removed: re-list the
    /// prefix at the current revision and watch from there.
    #[error("revision {requested} is compacted (history kept from {first_kept}); re-list and watch again")]
    Compacted {
        requested: Revision,
        first_kept: Revision,
    },
    /// A put named a lease that does not exist (expired or revoked).
    #[error("lease {0:x} not found (it expired or was revoked); grant a new one")]
    LeaseNotFound(LeaseId),
    /// etcd refused or failed a request (unreachable, no quorum, …).
    #[error("etcd {what} failed: {source} (check that etcd is reachable at the --etcd addresses and has a quorum; the change was not made and can be retried)")]
    Etcd {
        what: &'static str,
        #[source]
        source: Box<etcd_client::Error>,
    },
    /// etcd did not answer in time.
    #[error("etcd {what} got no answer within {after:?} (check that etcd is reachable at the --etcd addresses and has a quorum; the change was not made and can be retried)")]
    EtcdTimeout { what: &'static str, after: Duration },
    /// The etcd options cannot work.
    #[error("{0}")]
    EtcdConfig(String),
    /// etcd ended a watch without saying why (a member restart, say):
    /// re-list and watch again.
    #[error("etcd ended the watch; re-list and watch again")]
    EtcdWatchEnded,
    /// A transaction too large for etcd.
    #[error(
        "a store transaction of {bytes} bytes is over the {limit}-byte limit of the etcd backend"
    )]
    TooLarge { bytes: usize, limit: usize },
    /// The shared store belongs to another cluster.
    #[error("the etcd store holds the state of the cluster whose CA is {owner}, not this data dir's ({ours}); give this cluster its own --etcd-prefix, or start with that cluster's data dir")]
    OtherCluster { owner: String, ours: String },
}

/// Why the store file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenFault {
    /// redb refused the file.
    #[error(transparent)]
    Database(#[from] redb::DatabaseError),
    /// Creating its tables or bringing an old store up to date failed.
    #[error(transparent)]
    Prepare(Box<StoreError>),
}

/// Why a stored record is not valid.
#[derive(Debug, thiserror::Error)]
pub enum RecordFault {
    /// Its JSON does not parse as the record type.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Its revision metadata is not the 32 bytes it always is.
    #[error("key metadata is {0} bytes, not 32")]
    MetadataLength(usize),
    /// A value with no revision metadata beside it.
    #[error("value without revision metadata")]
    NoMetadata,
    /// A key (in etcd) that is not UTF-8.
    #[error("the key is not UTF-8")]
    KeyNotUtf8,
}

/// Reads a JSON record; a record that does not parse names its key.
pub fn decode<T: for<'de> serde::Deserialize<'de>>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Record {
        key: key.to_string(),
        reason: e.into(),
    })
}

/// Encodes a record as JSON (our record types always serialise).
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Identifies a lease; never 0.
pub type LeaseId = u64;

/// A key with its value and history, as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision that last changed it.
    pub mod_revision: Revision,
    /// How many times it was written since created (1 after the first put).
    pub version: u64,
    /// The lease it vanishes with, if any.
    pub lease: Option<LeaseId>,
}

/// A precondition of a transaction.
#[derive(Debug, Clone)]
pub enum Condition {
    /// The key must not exist.
    Absent(String),
    /// The key must hold exactly these bytes.
    Equals(String, Vec<u8>),
    /// The key must have been last changed at this revision (0: absent).
    /// This is the compare-and-set of a read-modify-write.
    ModRevision(String, Revision),
}

/// A write of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put(String, Vec<u8>),
    /// A put whose key is deleted when the lease expires or is revoked.
    PutLeased(String, Vec<u8>, LeaseId),
    Delete(String),
}

/// All conditions are checked and all ops applied atomically, or nothing.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

/// Whether a transaction's conditions held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    ConditionFailed,
}

/// What a transaction did, and the store's revision after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub outcome: Outcome,
    /// The revision the writes were applied at, or the current revision
    /// when nothing was written.
    pub revision: Revision,
}

/// One page of a range read, all at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned: ask again after it.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: Revision,
}

/// Whether a watched key was written or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// The changes of one revision under a watched prefix, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<WatchEvent>,
}

/// Ordered batches from a watch; ends with `Err(Compacted)` when the watcher
/// fell behind the kept history.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// The storage backend the coordinator runs on.
pub trait Store: Send + Sync + 'static {
    /// A key with its revisions.
    fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Up to `limit` keys (at most [`MAX_RANGE_LIMIT`]) starting with
    /// `prefix`, in key order, after `after` when given.
    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError>;

    /// Checks the conditions and applies the ops atomically, or nothing.
    fn txn(&self, txn: Txn) -> Result<Committed, StoreError>;

    /// The store's current revision.
    fn revision(&self) -> Result<Revision, StoreError>;

    /// Changes under `prefix` at revisions `from` and later, in order
    /// (`from == 0`: from the next change on). A `from` older than the kept
    /// history yields `Err(Compacted)` at once.
    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// A new lease that expires `ttl` after its last keep-alive.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Pushes the lease's expiry `ttl` into the future.
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends the lease now and deletes its keys (no-op when already gone).
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// A key's value.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_kv(key)?.map(|kv| kv.value))
    }

    /// Every key starting with `prefix`, in key order (read page by page).
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (kvs, _) = self.scan_kv(prefix)?;
        Ok(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }

    /// Every key starting with `prefix` with its revisions, in key order,
    /// read page by page; and the revision of the first page. Pages are
    /// read at rising revisions, so watching from just after the returned
    /// one replays every change the list may have missed (a put or delete
    /// applied twice leaves the same state).
    fn scan_kv(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut first: Option<Revision> = None;
        loop {
            let page = self.range(prefix, after.as_deref(), MAX_RANGE_LIMIT)?;
            first.get_or_insert(page.revision);
            after = page.kvs.last().map(|kv| kv.key.clone());
            let more = page.more;
            out.extend(page.kvs);
            if !more {
                return Ok((out, first.unwrap_or(page.revision)));
            }
        }
    }

    /// [`Store::txn`] when only the outcome matters.
    fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        Ok(self.txn(txn)?.outcome)
    }

    /// How many keys start with `prefix`.
    fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        Ok(self.scan(prefix)?.len())
    }
}

/// A key's history fields, stored beside its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyMeta {
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
    lease: LeaseId,
}

impl KeyMeta {
    fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.create_revision.to_be_bytes());
        b[8..16].copy_from_slice(&self.mod_revision.to_be_bytes());
        b[16..24].copy_from_slice(&self.version.to_be_bytes());
        b[24..32].copy_from_slice(&self.lease.to_be_bytes());
        b
    }

    fn from_bytes(key: &str, b: &[u8]) -> Result<Self, StoreError> {
        let word = |i: usize| -> Result<u64, StoreError> {
            b.get(i * 8..i * 8 + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Record {
                    key: key.to_string(),
                    reason: RecordFault::MetadataLength(b.len()),
                })
        };
        Ok(KeyMeta {
            create_revision: word(0)?,
            mod_revision: word(1)?,
            version: word(2)?,
            lease: word(3)?,
        })
    }

    fn into_kv(self, key: String, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: (self.lease != 0).then_some(self.lease),
        }
    }
}

/// One change as kept in the log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LoggedChange {
    key: String,
    kind: EventKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    value: Vec<u8>,
    create_revision: Revision,
    version: u64,
    #[serde(default)]
    lease: LeaseId,
}

/// The embedded single-machine backend.
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Revisions of change log kept for watchers.
    retain: u64,
    /// The latest committed revision, for watchers to wait on.
    head: tokio::sync::watch::Sender<Revision>,
    /// Deadlines of live leases. Deadlines are monotonic and not stored: a
    /// restarted store gives every lease a full TTL again, as etcd does on
    /// a leader change, so an owner that comes back in time keeps its keys.
    deadlines: Mutex<HashMap<LeaseId, (Instant, Duration)>>,
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(e.into())
}

impl RedbStore {
    /// Opens (creating if absent) the store file at `path`. A store written
    /// before keys carried revisions is brought up to date: every existing
    /// key gets revision 1.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_keeping(path, LOG_RETAIN)
    }

    /// [`RedbStore::open`] keeping `retain` revisions of change log.
    pub fn open_keeping(path: &Path, retain: u64) -> Result<Self, StoreError> {
        let open_err = |reason: OpenFault| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        let db = Database::create(path).map_err(|e| open_err(e.into()))?;
        let (revision, leases) =
            Self::prepare(&db).map_err(|e| open_err(OpenFault::Prepare(Box::new(e))))?;
        let now = Instant::now();
        let deadlines = leases
            .into_iter()
            .map(|(id, ttl)| (id, (now + ttl, ttl)))
            .collect();
        let (head, _) = tokio::sync::watch::channel(revision);
        let inner = Arc::new(Inner {
            db,
            retain: retain.max(1),
            head,
            deadlines: Mutex::new(deadlines),
        });
        spawn_lease_expiry(Arc::downgrade(&inner));
        Ok(RedbStore { inner })
    }

    /// Creates the tables, migrates a store without key metadata, and reads
    /// the current revision and the leases.
    fn prepare(db: &Database) -> Result<(Revision, Vec<(LeaseId, Duration)>), StoreError> {
        let w = db.begin_write().map_err(backend)?;
        let revision;
        let mut leases = Vec::new();
        {
            let kv = w.open_table(KV).map_err(backend)?;
            let mut kv_meta = w.open_table(KV_META).map_err(backend)?;
            w.open_table(LOG).map_err(backend)?;
            let lease_table = w.open_table(LEASES).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            let existing = meta.get(META_REVISION).map_err(backend)?.map(|v| v.value());
            revision = match existing {
                Some(r) => r,
                None => {
                    // Keys from before revisions: all of them were there at 1.
                    let mut any = false;
                    for item in kv.iter().map_err(backend)? {
                        let (k, _) = item.map_err(backend)?;
                        let m = KeyMeta {
                            create_revision: 1,
                            mod_revision: 1,
                            version: 1,
                            lease: 0,
                        };
                        kv_meta
                            .insert(k.value(), m.to_bytes().as_slice())
                            .map_err(backend)?;
                        any = true;
                    }
                    let r = u64::from(any);
                    meta.insert(META_REVISION, r).map_err(backend)?;
                    // History before the first logged revision is gone.
                    meta.insert(META_COMPACTED, r).map_err(backend)?;
                    r
                }
            };
            for item in lease_table.iter().map_err(backend)? {
                let (id, ttl) = item.map_err(backend)?;
                leases.push((id.value(), Duration::from_secs(ttl.value())));
            }
        }
        w.commit().map_err(backend)?;
        Ok((revision, leases))
    }

    /// Deletes the keys of every lease whose deadline is before `now`, in
    /// one revision per lease. Returns how many leases expired.
    pub fn expire_due_leases(&self, now: Instant) -> Result<usize, StoreError> {
        self.inner.expire_due_leases(now)
    }
}

/// Runs lease expiry while the store lives (the thread holds only a weak
/// reference, so dropping the store ends it).
fn spawn_lease_expiry(inner: Weak<Inner>) {
    let spawned = std::thread::Builder::new()
        .name("store-leases".into())
        .spawn(move || loop {
            std::thread::sleep(LEASE_TICK);
            let Some(inner) = inner.upgrade() else { return };
            if let Err(e) = inner.expire_due_leases(Instant::now()) {
                tracing::warn!(error = %e, "lease expiry failed; retrying");
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the lease expiry thread; leased keys will not expire");
    }
}

impl Inner {
    fn deadlines(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, (Instant, Duration)>> {
        self.deadlines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expire_due_leases(&self, now: Instant) -> Result<usize, StoreError> {
        let due: Vec<LeaseId> = self
            .deadlines()
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.revoke(*id)?;
        }
        Ok(due.len())
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(backend)?;
        let mut wrote = None;
        {
            w.open_table(LEASES)
                .map_err(backend)?
                .remove(lease)
                .map_err(backend)?;
            let kv_meta = w.open_table(KV_META).map_err(backend)?;
            let mut keys = Vec::new();
            for item in kv_meta.iter().map_err(backend)? {
                let (k, m) = item.map_err(backend)?;
                if KeyMeta::from_bytes(k.value(), m.value())?.lease == lease {
                    keys.push(k.value().to_string());
                }
            }
            drop(kv_meta);
            if !keys.is_empty() {
                let ops = keys.into_iter().map(Op::Delete).collect::<Vec<_>>();
                wrote = Some(apply_ops(&w, &ops, self.retain)?);
            }
        }
        w.commit().map_err(backend)?;
        self.deadlines().remove(&lease);
        if let Some(r) = wrote {
            self.head.send_replace(r);
        }
        Ok(())
    }

    fn current(&self) -> Result<(Revision, Revision), StoreError> {
        let r = self.db.begin_read().map_err(backend)?;
        let meta = r.open_table(META).map_err(backend)?;
        let get = |k: &str| -> Result<u64, StoreError> {
            Ok(meta
                .get(k)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        Ok((get(META_REVISION)?, get(META_COMPACTED)?))
    }

    /// Logged changes under `prefix` at revisions `from..=to`.
    fn read_log(
        &self,
        prefix: &str,
        from: Revision,
        to: Revision,
    ) -> Result<Vec<WatchBatch>, StoreError> {
        let r = self.db.begin_read().map_err(backend)?;
        let log = r.open_table(LOG).map_err(backend)?;
        let mut out = Vec::new();
        for item in log.range(from..=to).map_err(backend)? {
            let (rev, bytes) = item.map_err(backend)?;
            let rev = rev.value();
            let changes: Vec<LoggedChange> = decode(&format!("log/{rev}"), bytes.value())?;
            let events: Vec<WatchEvent> = changes
                .into_iter()
                .filter(|c| c.key.starts_with(prefix))
                .map(|c| WatchEvent {
                    kind: c.kind,
                    kv: KeyValue {
                        key: c.key,
                        value: c.value,
                        create_revision: c.create_revision,
                        mod_revision: rev,
                        version: c.version,
                        lease: (c.lease != 0).then_some(c.lease),
                    },
                })
                .collect();
            if !events.is_empty() {
                out.push(WatchBatch {
                    revision: rev,
                    events,
                });
            }
        }
        Ok(out)
    }
}

/// Applies `ops` at the next revision inside the write transaction `w`,
/// logging each change and compacting old history; returns that revision.
fn apply_ops(w: &redb::WriteTransaction, ops: &[Op], retain: u64) -> Result<Revision, StoreError> {
    let mut kv = w.open_table(KV).map_err(backend)?;
    let mut kv_meta = w.open_table(KV_META).map_err(backend)?;
    let mut log = w.open_table(LOG).map_err(backend)?;
    let leases = w.open_table(LEASES).map_err(backend)?;
    let mut meta = w.open_table(META).map_err(backend)?;
    let revision = meta
        .get(META_REVISION)
        .map_err(backend)?
        .map(|v| v.value())
        .unwrap_or(0)
        + 1;
    let mut changes = Vec::with_capacity(ops.len());
    for op in ops {
        let (key, value, lease) = match op {
            Op::Put(k, v) => (k, Some(v), 0),
            Op::PutLeased(k, v, l) => {
                if leases.get(*l).map_err(backend)?.is_none() {
                    return Err(StoreError::LeaseNotFound(*l));
                }
                (k, Some(v), *l)
            }
            Op::Delete(k) => (k, None, 0),
        };
        let old = match kv_meta.get(key.as_str()).map_err(backend)? {
            Some(m) => Some(KeyMeta::from_bytes(key, m.value())?),
            None => None,
        };
        match value {
            Some(v) => {
                let m = KeyMeta {
                    create_revision: old.map_or(revision, |o| o.create_revision),
                    mod_revision: revision,
                    version: old.map_or(1, |o| o.version + 1),
                    lease,
                };
                kv.insert(key.as_str(), v.as_slice()).map_err(backend)?;
                kv_meta
                    .insert(key.as_str(), m.to_bytes().as_slice())
                    .map_err(backend)?;
                changes.push(LoggedChange {
                    key: key.clone(),
                    kind: EventKind::Put,
                    value: v.clone(),
                    create_revision: m.create_revision,
                    version: m.version,
                    lease,
                });
            }
            None => {
                let Some(old) = old else { continue };
                kv.remove(key.as_str()).map_err(backend)?;
                kv_meta.remove(key.as_str()).map_err(backend)?;
                changes.push(LoggedChange {
                    key: key.clone(),
                    kind: EventKind::Delete,
                    value: Vec::new(),
                    create_revision: old.create_revision,
                    version: 0,
                    lease: old.lease,
                });
            }
        }
    }
    log.insert(revision, encode(&changes).as_slice())
        .map_err(backend)?;
    meta.insert(META_REVISION, revision).map_err(backend)?;
    let compacted = meta
        .get(META_COMPACTED)
        .map_err(backend)?
        .map(|v| v.value())
        .unwrap_or(0);
    // Compaction runs when the log exceeds what is kept by a tenth, so a
    // write does not pay for it every time.
    if revision.saturating_sub(compacted) > retain + retain.div_ceil(10) {
        let keep_from = revision - retain;
        log.retain_in(..keep_from, |_, _| false).map_err(backend)?;
        meta.insert(META_COMPACTED, keep_from - 1)
            .map_err(backend)?;
    }
    Ok(revision)
}

fn condition_holds(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    kv_meta: &impl ReadableTable<&'static str, &'static [u8]>,
    cond: &Condition,
) -> Result<bool, StoreError> {
    Ok(match cond {
        Condition::Absent(k) => kv.get(k.as_str()).map_err(backend)?.is_none(),
        Condition::Equals(k, want) => kv
            .get(k.as_str())
            .map_err(backend)?
            .is_some_and(|v| v.value() == want.as_slice()),
        Condition::ModRevision(k, want) => {
            let have = match kv_meta.get(k.as_str()).map_err(backend)? {
                Some(m) => KeyMeta::from_bytes(k, m.value())?.mod_revision,
                None => 0,
            };
            have == *want
        }
    })
}

impl Store for RedbStore {
    fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.inner.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        let kv_meta = r.open_table(KV_META).map_err(backend)?;
        let Some(value) = kv.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let meta = match kv_meta.get(key).map_err(backend)? {
            Some(m) => KeyMeta::from_bytes(key, m.value())?,
            None => {
                return Err(StoreError::Record {
                    key: key.to_string(),
                    reason: RecordFault::NoMetadata,
                })
            }
        };
        Ok(Some(meta.into_kv(key.to_string(), value.value().to_vec())))
    }

    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        let limit = limit.clamp(1, MAX_RANGE_LIMIT);
        let r = self.inner.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        let kv_meta = r.open_table(KV_META).map_err(backend)?;
        let meta = r.open_table(META).map_err(backend)?;
        let revision = meta
            .get(META_REVISION)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for item in kv.range(start..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            if after == Some(k) {
                continue;
            }
            if kvs.len() == limit {
                more = true;
                break;
            }
            let m = match kv_meta.get(k).map_err(backend)? {
                Some(m) => KeyMeta::from_bytes(k, m.value())?,
                None => {
                    return Err(StoreError::Record {
                        key: k.to_string(),
                        reason: RecordFault::NoMetadata,
                    })
                }
            };
            kvs.push(m.into_kv(k.to_string(), v.value().to_vec()));
        }
        Ok(RangePage {
            kvs,
            more,
            revision,
        })
    }

    fn txn(&self, txn: Txn) -> Result<Committed, StoreError> {
        let w = self.inner.db.begin_write().map_err(backend)?;
        {
            let kv = w.open_table(KV).map_err(backend)?;
            let kv_meta = w.open_table(KV_META).map_err(backend)?;
            for cond in &txn.conditions {
                if !condition_holds(&kv, &kv_meta, cond)? {
                    drop((kv, kv_meta));
                    let meta = w.open_table(META).map_err(backend)?;
                    let revision = meta
                        .get(META_REVISION)
                        .map_err(backend)?
                        .map(|v| v.value())
                        .unwrap_or(0);
                    return Ok(Committed {
                        outcome: Outcome::ConditionFailed,
                        revision,
                    });
                }
            }
        }
        if txn.ops.is_empty() {
            let (revision, _) = self.inner.current()?;
            return Ok(Committed {
                outcome: Outcome::Applied,
                revision,
            });
        }
        // Dropping `w` on an error aborts the whole transaction.
        let revision = apply_ops(&w, &txn.ops, self.inner.retain)?;
        w.commit().map_err(backend)?;
        self.inner.head.send_replace(revision);
        Ok(Committed {
            outcome: Outcome::Applied,
            revision,
        })
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.current()?.0)
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (current, compacted) = self.inner.current()?;
        let next = if from == 0 { current + 1 } else { from };
        if next <= compacted {
            return Err(StoreError::Compacted {
                requested: next,
                first_kept: compacted + 1,
            });
        }
        struct Cursor {
            inner: Arc<Inner>,
            prefix: String,
            next: Revision,
            head: tokio::sync::watch::Receiver<Revision>,
            ready: std::collections::VecDeque<WatchBatch>,
            done: bool,
        }
        let cursor = Cursor {
            head: self.inner.head.subscribe(),
            inner: self.inner.clone(),
            prefix: prefix.to_string(),
            next,
            ready: Default::default(),
            done: false,
        };
        let stream = futures::stream::unfold(cursor, |mut c| async move {
            loop {
                if c.done {
                    return None;
                }
                if let Some(batch) = c.ready.pop_front() {
                    return Some((Ok(batch), c));
                }
                let head = *c.head.borrow_and_update();
                if head >= c.next {
                    let (_, compacted) = match c.inner.current() {
                        Ok(v) => v,
                        Err(e) => {
                            c.done = true;
                            return Some((Err(e), c));
                        }
                    };
                    if c.next <= compacted {
                        c.done = true;
                        let err = StoreError::Compacted {
                            requested: c.next,
                            first_kept: compacted + 1,
                        };
                        return Some((Err(err), c));
                    }
                    match c.inner.read_log(&c.prefix, c.next, head) {
                        Ok(batches) => {
                            c.ready.extend(batches);
                            c.next = head + 1;
                            continue;
                        }
                        Err(e) => {
                            c.done = true;
                            return Some((Err(e), c));
                        }
                    }
                }
                if c.head.changed().await.is_err() {
                    // The store was dropped: no more changes will come.
                    return None;
                }
            }
        });
        Ok(Box::pin(stream))
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl = ttl.max(Duration::from_secs(1));
        let w = self.inner.db.begin_write().map_err(backend)?;
        let id;
        {
            let mut meta = w.open_table(META).map_err(backend)?;
            let seq = meta
                .get(META_LEASE_SEQ)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            // Lease ids are not secrets; a counter keeps them unique.
            id = seq + 1;
            meta.insert(META_LEASE_SEQ, id).map_err(backend)?;
            let mut leases = w.open_table(LEASES).map_err(backend)?;
            leases.insert(id, ttl.as_secs()).map_err(backend)?;
        }
        w.commit().map_err(backend)?;
        self.inner
            .deadlines()
            .insert(id, (Instant::now() + ttl, ttl));
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut deadlines = self.inner.deadlines();
        let Some((deadline, ttl)) = deadlines.get_mut(&lease) else {
            return Err(StoreError::LeaseNotFound(lease));
        };
        *deadline = Instant::now() + *ttl;
        Ok(())
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn open(dir: &tempfile::TempDir) -> RedbStore {
        RedbStore::open(&dir.path().join("s.redb")).unwrap()
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put(k.into(), v.as_bytes().to_vec())
    }

    #[test]
    fn failures_keep_their_words_and_their_typed_causes() {
        use std::error::Error as _;
        let e = decode::<Vec<u32>>("app/web", b"{not json").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("stored record app/web is not valid: invalid type: map"),
            "{e}"
        );
        let cause = e.source().expect("a cause");
        assert!(cause.downcast_ref::<RecordFault>().is_some(), "{cause:?}");
        assert!(matches!(
            e,
            StoreError::Record {
                reason: RecordFault::Json(_),
                ..
            }
        ));
        assert_eq!(
            KeyMeta::from_bytes("k", &[0; 3]).unwrap_err().to_string(),
            "stored record k is not valid: key metadata is 3 bytes, not 32"
        );

        // Not a redb file: the path, redb's words, and redb's error as the cause.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let e = RedbStore::open(&path).err().expect("refused");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("store {} could not be opened: ", path.display()))
                && text.ends_with(
                    "(restore it from a backup, or move the data dir aside to start a new cluster)"
                ),
            "{text}"
        );
        assert!(matches!(
            e,
            StoreError::Open {
                reason: OpenFault::Database(_),
                ..
            }
        ));
    }

    #[test]
    fn conditions_make_writes_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = Txn {
            conditions: vec![Condition::Absent("a/1".into())],
            ops: vec![put("a/1", "x"), put("a/2", "y")],
        };
        assert_eq!(store.commit(first.clone()).unwrap(), Outcome::Applied);
        // The same transaction again fails its condition and writes nothing.
        let again = Txn {
            ops: vec![put("a/3", "z")],
            ..first
        };
        assert_eq!(store.commit(again).unwrap(), Outcome::ConditionFailed);
        assert_eq!(store.get("a/3").unwrap(), None);
        assert_eq!(store.count("a/").unwrap(), 2);
        assert_eq!(store.count("b/").unwrap(), 0);
        let swap = Txn {
            conditions: vec![Condition::Equals("a/1".into(), b"x".to_vec())],
            ops: vec![Op::Delete("a/1".into())],
        };
        assert_eq!(store.commit(swap).unwrap(), Outcome::Applied);
        assert_eq!(
            store.scan("a/").unwrap(),
            vec![("a/2".to_string(), b"y".to_vec())]
        );
    }

    #[test]
    fn every_write_has_a_revision_and_cas_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(store.revision().unwrap(), 0);
        let c1 = store
            .txn(Txn {
                ops: vec![put("k", "1")],
                ..Default::default()
            })
            .unwrap();
        assert_eq!((c1.outcome, c1.revision), (Outcome::Applied, 1));
        let c2 = store
            .txn(Txn {
                ops: vec![put("k", "2"), put("other", "x")],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c2.revision, 2);
        let kv = store.get_kv("k").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
        // A writer that read revision 1 loses to the one that wrote 2.
        let stale = Txn {
            conditions: vec![Condition::ModRevision("k".into(), 1)],
            ops: vec![put("k", "stale")],
        };
        let c = store.txn(stale).unwrap();
        assert_eq!((c.outcome, c.revision), (Outcome::ConditionFailed, 2));
        assert_eq!(store.get("k").unwrap().unwrap(), b"2");
        let fresh = Txn {
            conditions: vec![Condition::ModRevision("k".into(), 2)],
            ops: vec![put("k", "3")],
        };
        assert_eq!(store.txn(fresh).unwrap().revision, 3);
        // Revision 0 means "absent": create-only.
        let create = Txn {
            conditions: vec![Condition::ModRevision("new".into(), 0)],
            ops: vec![put("new", "n")],
        };
        assert_eq!(store.commit(create.clone()).unwrap(), Outcome::Applied);
        assert_eq!(store.commit(create).unwrap(), Outcome::ConditionFailed);
        // Deleting what is absent writes no revision of its own keys.
        let before = store.revision().unwrap();
        store
            .txn(Txn {
                ops: vec![Op::Delete("never".into())],
                ..Default::default()
            })
            .unwrap();
        assert!(store.get("never").unwrap().is_none());
        assert_eq!(store.revision().unwrap(), before + 1);
    }

    #[test]
    fn revisions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir);
            store
                .commit(Txn {
                    ops: vec![put("a", "1")],
                    ..Default::default()
                })
                .unwrap();
        }
        let store = open(&dir);
        assert_eq!(store.revision().unwrap(), 1);
        assert_eq!(store.get_kv("a").unwrap().unwrap().mod_revision, 1);
    }

    #[test]
    fn a_store_from_before_revisions_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            // The old layout: one table of values, nothing else.
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(KV).unwrap();
                t.insert("app/x", b"{}".as_slice()).unwrap();
                t.insert("app/y", b"{}".as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.revision().unwrap(), 1);
        let kv = store.get_kv("app/x").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (1, 1));
        // History before the migration cannot be watched.
        assert!(matches!(
            store.watch("app/", 1),
            Err(StoreError::Compacted { .. })
        ));
        assert!(store.watch("app/", 2).is_ok());
    }

    #[test]
    fn ranges_are_paged_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let ops = (0..25).map(|i| put(&format!("p/{i:02}"), "v")).collect();
        store
            .commit(Txn {
                ops,
                ..Default::default()
            })
            .unwrap();
        store
            .commit(Txn {
                ops: vec![put("q/0", "v"), put("o/0", "v")],
                ..Default::default()
            })
            .unwrap();
        let first = store.range("p/", None, 10).unwrap();
        assert_eq!(first.kvs.len(), 10);
        assert!(first.more);
        assert_eq!(first.revision, 2);
        let second = store.range("p/", Some("p/09"), 10).unwrap();
        assert_eq!(second.kvs[0].key, "p/10");
        let last = store.range("p/", Some("p/19"), 10).unwrap();
        assert_eq!(last.kvs.len(), 5);
        assert!(!last.more);
        assert_eq!(store.scan("p/").unwrap().len(), 25);
        // A limit of 0 still makes progress; an `after` before the prefix is
        // the prefix's start.
        assert_eq!(store.range("p/", Some("a"), 0).unwrap().kvs.len(), 1);
    }

    #[tokio::test]
    async fn watch_delivers_changes_in_order_from_a_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .commit(Txn {
                ops: vec![put("w/a", "1")],
                ..Default::default()
            })
            .unwrap();
        // From revision 1: sees the past write, then live ones, only under
        // the prefix, deletes included.
        let mut watch = store.watch("w/", 1).unwrap();
        store
            .commit(Txn {
                ops: vec![put("x/other", "no"), put("w/b", "2")],
                ..Default::default()
            })
            .unwrap();
        store
            .commit(Txn {
                ops: vec![Op::Delete("w/a".into())],
                ..Default::default()
            })
            .unwrap();
        let b1 = watch.next().await.unwrap().unwrap();
        assert_eq!(b1.revision, 1);
        assert_eq!(b1.events[0].kv.key, "w/a");
        let b2 = watch.next().await.unwrap().unwrap();
        assert_eq!(b2.revision, 2);
        assert_eq!(b2.events.len(), 1, "only the watched prefix");
        assert_eq!(b2.events[0].kv.value, b"2");
        let b3 = watch.next().await.unwrap().unwrap();
        assert_eq!(b3.revision, 3);
        assert_eq!(b3.events[0].kind, EventKind::Delete);
        assert_eq!(b3.events[0].kv.key, "w/a");
        assert_eq!(b3.events[0].kv.mod_revision, 3);

        // From 0: only what happens after the call.
        let mut live = store.watch("w/", 0).unwrap();
        store
            .commit(Txn {
                ops: vec![put("w/c", "3")],
                ..Default::default()
            })
            .unwrap();
        let b = live.next().await.unwrap().unwrap();
        assert_eq!((b.revision, b.events[0].kv.key.as_str()), (4, "w/c"));
    }

    #[tokio::test]
    async fn a_watcher_behind_compaction_is_told_to_relist() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open_keeping(&dir.path().join("s.redb"), 20).unwrap();
        let mut early = store.watch("c/", 1).unwrap();
        for i in 0..30 {
            store
                .commit(Txn {
                    ops: vec![put("c/k", &i.to_string())],
                    ..Default::default()
                })
                .unwrap();
        }
        assert!(matches!(
            store.watch("c/", 1),
            Err(StoreError::Compacted { .. })
        ));
        // The watcher that had not read yet learns it fell behind.
        match early.next().await {
            Some(Err(StoreError::Compacted {
                requested,
                first_kept,
            })) => {
                assert_eq!(requested, 1);
                assert!(first_kept > 1);
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(early.next().await.is_none());
        // A fresh watch from the kept history works.
        let head = store.revision().unwrap();
        let mut recent = store.watch("c/", head).unwrap();
        assert_eq!(recent.next().await.unwrap().unwrap().revision, head);
    }

    #[tokio::test]
    async fn leased_keys_vanish_with_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let lease = store.grant_lease(Duration::from_secs(30)).unwrap();
        let other = store.grant_lease(Duration::from_secs(30)).unwrap();
        assert_ne!(lease, other);
        store
            .commit(Txn {
                ops: vec![
                    Op::PutLeased("live/r1".into(), b"a".to_vec(), lease),
                    Op::PutLeased("live/r2".into(), b"b".to_vec(), other),
                    put("keep", "k"),
                ],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(store.get_kv("live/r1").unwrap().unwrap().lease, Some(lease));
        let mut watch = store.watch("live/", 0).unwrap();

        // Not due yet: nothing expires.
        assert_eq!(store.expire_due_leases(Instant::now()).unwrap(), 0);
        store.keep_alive(other).unwrap();
        // Past the TTL of both, but `other` was kept alive just now... both
        // are due 30 s from their last keep-alive, so 31 s on expires both.
        let later = Instant::now() + Duration::from_secs(31);
        assert_eq!(store.expire_due_leases(later).unwrap(), 2);
        assert_eq!(store.scan("live/").unwrap(), vec![]);
        assert_eq!(store.get("keep").unwrap().unwrap(), b"k");
        let b = watch.next().await.unwrap().unwrap();
        assert_eq!(b.events[0].kind, EventKind::Delete);

        // A put on an expired lease fails and writes nothing.
        let err = store
            .commit(Txn {
                ops: vec![
                    put("live/x", "x"),
                    Op::PutLeased("live/y".into(), vec![], lease),
                ],
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseNotFound(l) if l == lease));
        assert!(store.get("live/x").unwrap().is_none());
        assert!(matches!(
            store.keep_alive(lease),
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    #[test]
    fn a_revoked_lease_deletes_its_keys_and_leases_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, gone);
        {
            let store = open(&dir);
            kept = store.grant_lease(Duration::from_secs(60)).unwrap();
            gone = store.grant_lease(Duration::from_secs(60)).unwrap();
            store
                .commit(Txn {
                    ops: vec![
                        Op::PutLeased("l/kept".into(), vec![1], kept),
                        Op::PutLeased("l/gone".into(), vec![2], gone),
                    ],
                    ..Default::default()
                })
                .unwrap();
            store.revoke_lease(gone).unwrap();
            store.revoke_lease(gone).unwrap();
            assert!(store.get("l/gone").unwrap().is_none());
        }
        // After a restart the surviving lease gets its full TTL again.
        let store = open(&dir);
        assert!(store.get("l/kept").unwrap().is_some());
        store.keep_alive(kept).unwrap();
        assert!(store.keep_alive(gone).is_err());
        assert_eq!(store.expire_due_leases(Instant::now()).unwrap(), 0);
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(store.expire_due_leases(later).unwrap(), 1);
        assert!(store.get("l/kept").unwrap().is_none());
    }

    #[test]
    fn corrupt_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, b"this is not a redb file at all, not even close").unwrap();
        let err = RedbStore::open(&path).err().expect("must refuse");
        assert!(err.to_string().contains("s.redb"), "{err}");
    }
}
