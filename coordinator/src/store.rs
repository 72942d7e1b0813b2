//! The coordinator's durable state behind a small key-value trait.
//!
//! The trait is shaped like etcd's transactions (compare, then put/delete
//! atomically) so that an etcd backend can later serve several coordinators;
//! the embedded backend is redb. Keys are `kind/id` strings, values JSON.
//! Higher layers keep in-memory indexes in step with what they commit here.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

/// Store failures. `Corrupt` names the file so operators know what to restore.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} could not be opened: {reason} (restore it from a backup, or move the data dir aside to start a new cluster)")]
    Open { path: PathBuf, reason: String },
    #[error("store operation failed: {0}")]
    Backend(String),
    #[error("stored record {key} is not valid: {reason}")]
    Record { key: String, reason: String },
}

/// Reads a JSON record; a record that does not parse names its key.
pub fn decode<T: for<'de> serde::Deserialize<'de>>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Record {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Encodes a record as JSON (our record types always serialise).
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A precondition of a transaction.
#[derive(Debug, Clone)]
pub enum Condition {
    /// The key must not exist.
    Absent(String),
    /// The key must hold exactly these bytes.
    Equals(String, Vec<u8>),
}

/// A write of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put(String, Vec<u8>),
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

/// The storage backend the coordinator runs on.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    fn commit(&self, txn: Txn) -> Result<Outcome, StoreError>;

    /// How many keys start with `prefix`.
    fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        Ok(self.scan(prefix)?.len())
    }
}

/// The embedded single-machine backend.
pub struct RedbStore {
    db: Database,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (creating if absent) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        let db = Database::create(path).map_err(|e| open_err(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        txn.open_table(KV).map_err(|e| open_err(e.to_string()))?;
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(RedbStore { db })
    }
}

impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(KV).map_err(backend)?;
        Ok(table.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        let w = self.db.begin_write().map_err(backend)?;
        {
            let mut table = w.open_table(KV).map_err(backend)?;
            for cond in &txn.conditions {
                let holds = match cond {
                    Condition::Absent(k) => table.get(k.as_str()).map_err(backend)?.is_none(),
                    Condition::Equals(k, want) => table
                        .get(k.as_str())
                        .map_err(backend)?
                        .is_some_and(|v| v.value() == want.as_slice()),
                };
                if !holds {
                    return Ok(Outcome::ConditionFailed);
                }
            }
            for op in &txn.ops {
                match op {
                    Op::Put(k, v) => {
                        table.insert(k.as_str(), v.as_slice()).map_err(backend)?;
                    }
                    Op::Delete(k) => {
                        table.remove(k.as_str()).map_err(backend)?;
                    }
                }
            }
        }
        w.commit().map_err(backend)?;
        Ok(Outcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_make_writes_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let put = |k: &str, v: &str| Op::Put(k.into(), v.as_bytes().to_vec());
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
    fn corrupt_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, b"this is not a redb file at all, not even close").unwrap();
        let err = RedbStore::open(&path).err().expect("must refuse");
        assert!(err.to_string().contains("s.redb"), "{err}");
    }
}
