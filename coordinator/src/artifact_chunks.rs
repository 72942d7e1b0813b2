//! Artifacts in the shared store, so a runner can fetch one through any
//! coordinator even when the machine that received the upload is gone
//! (issue 18, item 5). Only with `--etcd`: on one machine the artifact's
//! file is all there is.
//!
//! Content-addressed: an artifact of digest `S` is kept as chunks
//! `artifactchunk/S/<n>` of at most [`CHUNK_BYTES`] (one chunk per
//! transaction, well under the etcd backend's request limit) and a
//! manifest `artifact/S` ([`Manifest`]) written last, so a manifest present
//! means every chunk is. Chunks live under a prefix of their own so that
//! listing manifests never reads chunk bytes. The coordinator's file stays
//! the cache: a coordinator without it rebuilds it from the chunks on first
//! read, checking size and digest before anything is served (a chunk
//! altered in the store is refused, not served), into a temporary file
//! renamed into place, one rebuild per artifact at a time.
//!
//! Collection deletes a manifest first (on the revision read, so a
//! concurrent re-upload wins) and then its chunks.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{decode, encode, Condition, Op, Outcome, Store, StoreError, Txn};

/// Largest chunk: a quarter of the etcd backend's transaction limit.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Manifests, by digest.
const MANIFEST_PREFIX: &str = "artifact/";
/// Chunks, by digest and index.
const CHUNK_PREFIX: &str = "artifactchunk/";
/// Chunk deletes per transaction.
const DELETES_PER_TXN: usize = 256;

/// What the store holds of one artifact; written after all its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub sha256: String,
    pub size: u64,
    pub chunks: u64,
    /// When the upload finished (Unix seconds): collection spares younger
    /// artifacts no record names yet, on every coordinator.
    pub uploaded_unix: i64,
}

/// Shared-store failures.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("artifact {0} is not in the shared store")]
    Missing(String),
    #[error("artifact {sha} in the shared store is damaged ({what}); it was not served: upload it again")]
    Damaged { sha: String, what: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rebuilding artifact {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn manifest_key(sha: &str) -> String {
    format!("{MANIFEST_PREFIX}{sha}")
}

fn chunk_key(sha: &str, n: u64) -> String {
    format!("{CHUNK_PREFIX}{sha}/{n:08}")
}

/// The store artifacts are shared through, and the rebuilds in progress.
pub struct SharedArtifacts {
    store: Arc<dyn Store>,
    /// The largest artifact accepted: a manifest saying more is damaged.
    max_bytes: u64,
    /// One lock per artifact being rebuilt: concurrent readers wait for
    /// the one rebuild.
    rebuilding: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl SharedArtifacts {
    pub fn new(store: Arc<dyn Store>, max_bytes: u64) -> SharedArtifacts {
        SharedArtifacts {
            store,
            max_bytes,
            rebuilding: Mutex::new(HashMap::new()),
        }
    }

    /// The manifest of `sha`, when the store has all of it.
    pub fn manifest(&self, sha: &str) -> Result<Option<Manifest>, StoreError> {
        let key = manifest_key(sha);
        self.store.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Writes the artifact at `path` (of digest `sha`, checked by the
    /// caller) into the store: its chunks, then its manifest. Written
    /// again when the store has it already, so uploading an artifact again
    /// repairs a damaged copy (and restarts its grace).
    pub fn put(&self, sha: &str, path: &Path, now_unix: i64) -> Result<(), ChunkError> {
        let io = |source| ChunkError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = File::open(path).map_err(io)?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        let (mut n, mut size) = (0u64, 0u64);
        loop {
            let filled = read_full(&mut f, &mut buf).map_err(io)?;
            if filled == 0 {
                break;
            }
            self.store.commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(chunk_key(sha, n), buf[..filled].to_vec())],
            })?;
            n += 1;
            size += filled as u64;
        }
        let manifest = Manifest {
            sha256: sha.to_string(),
            size,
            chunks: n,
            uploaded_unix: now_unix,
        };
        self.store.commit(Txn {
            conditions: vec![],
            ops: vec![Op::Put(manifest_key(sha), encode(&manifest))],
        })?;
        Ok(())
    }

    /// Makes `dest` (the artifact's cache file, absent) from the store's
    /// chunks, checking size and digest before it is renamed into place.
    /// `tmp` is a fresh temporary path in the same directory.
    pub fn rebuild(&self, sha: &str, dest: &Path, tmp: &Path) -> Result<(), ChunkError> {
        let lock = {
            let mut all = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|_, l| Arc::strong_count(l) > 1);
            all.entry(sha.to_string()).or_default().clone()
        };
        let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
        if dest.is_file() {
            // Another reader rebuilt it meanwhile.
            return Ok(());
        }
        let manifest = self
            .manifest(sha)?
            .ok_or_else(|| ChunkError::Missing(sha.to_string()))?;
        // The content is checked against the digest asked for, not only the
        // one the manifest names: a manifest under one name describing
        // another artifact must not fill this name's file.
        if manifest.sha256 != sha {
            return Err(ChunkError::Damaged {
                sha: sha.to_string(),
                what: format!("its manifest describes artifact {}", manifest.sha256),
            });
        }
        let result = self.write_checked(&manifest, tmp);
        let result = result.and_then(|()| {
            std::fs::rename(tmp, dest).map_err(|source| ChunkError::Io {
                path: dest.to_path_buf(),
                source,
            })
        });
        if result.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        result
    }

    fn write_checked(&self, m: &Manifest, tmp: &Path) -> Result<(), ChunkError> {
        let io = |source| ChunkError::Io {
            path: tmp.to_path_buf(),
            source,
        };
        let damaged = |what: String| ChunkError::Damaged {
            sha: m.sha256.clone(),
            what,
        };
        // What the manifest says is checked before any byte is written: a
        // manifest altered to name more cannot fill the disk.
        if m.size > self.max_bytes || m.chunks != m.size.div_ceil(CHUNK_BYTES as u64) {
            return Err(damaged(format!(
                "the manifest says {} bytes in {} chunks",
                m.size, m.chunks
            )));
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        for n in 0..m.chunks {
            let chunk = self
                .store
                .get(&chunk_key(&m.sha256, n))?
                .ok_or_else(|| damaged(format!("chunk {n} of {} is missing", m.chunks)))?;
            size += chunk.len() as u64;
            if size > m.size || chunk.len() > CHUNK_BYTES {
                return Err(damaged(format!(
                    "chunk {n} is larger than the manifest says"
                )));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).map_err(io)?;
        }
        if size != m.size {
            return Err(damaged(format!(
                "{size} bytes, the manifest says {}",
                m.size
            )));
        }
        let got = hex::encode(hasher.finalize());
        if got != m.sha256 {
            return Err(damaged(format!("its chunks hash to {got}")));
        }
        f.sync_all().map_err(io)?;
        Ok(())
    }

    /// Deletes the shared artifacts nothing references that were uploaded
    /// before `grace_until` (Unix seconds): each manifest first, on the
    /// revision read, then its chunks. Returns the digests deleted.
    pub fn collect(
        &self,
        referenced: &HashSet<String>,
        uploaded_before: i64,
    ) -> Result<Vec<String>, StoreError> {
        let (manifests, _) = self.store.scan_kv(MANIFEST_PREFIX)?;
        let mut deleted = Vec::new();
        for kv in manifests {
            let Ok(m) = decode::<Manifest>(&kv.key, &kv.value) else {
                continue;
            };
            if referenced.contains(&m.sha256) || m.uploaded_unix >= uploaded_before {
                continue;
            }
            let gone = self.store.commit(Txn {
                conditions: vec![Condition::ModRevision(kv.key.clone(), kv.mod_revision)],
                ops: vec![Op::Delete(kv.key.clone())],
            })?;
            if gone != Outcome::Applied {
                continue;
            }
            // No more chunks than the largest artifact has, whatever an
            // altered manifest says.
            let most = self.max_bytes.div_ceil(CHUNK_BYTES as u64);
            let keys: Vec<String> = (0..m.chunks.min(most))
                .map(|n| chunk_key(&m.sha256, n))
                .collect();
            for batch in keys.chunks(DELETES_PER_TXN) {
                self.store.commit(Txn {
                    conditions: vec![],
                    ops: batch.iter().cloned().map(Op::Delete).collect(),
                })?;
            }
            deleted.push(m.sha256);
        }
        Ok(deleted)
    }
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            k => filled += k,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn setup() -> (tempfile::TempDir, SharedArtifacts) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        (dir, SharedArtifacts::new(store, 1 << 30))
    }

    fn artifact(dir: &Path, len: usize) -> (String, std::path::PathBuf) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&data));
        let path = dir.join("src");
        std::fs::write(&path, &data).unwrap();
        (sha, path)
    }

    #[test]
    fn an_artifact_is_rebuilt_from_its_chunks_and_a_damaged_one_is_refused() {
        let (dir, shared) = setup();
        let (sha, src) = artifact(dir.path(), 2 * CHUNK_BYTES + 5);
        shared.put(&sha, &src, 100).unwrap();
        let m = shared.manifest(&sha).unwrap().unwrap();
        assert_eq!((m.chunks, m.size), (3, 2 * CHUNK_BYTES as u64 + 5));
        let dest = dir.path().join("dest");
        shared
            .rebuild(&sha, &dest, &dir.path().join(".tmp1"))
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());

        // A manifest altered to name more: refused before anything is
        // written.
        let honest = encode(&m);
        for (size, chunks) in [(2u64 << 30, 8192), (m.size, m.chunks + 1)] {
            let lie = Manifest {
                size,
                chunks,
                ..m.clone()
            };
            shared
                .store
                .commit(Txn {
                    conditions: vec![],
                    ops: vec![Op::Put(manifest_key(&sha), encode(&lie))],
                })
                .unwrap();
            let tmp = dir.path().join(".tmp-lie");
            let err = shared
                .rebuild(&sha, &dir.path().join("lie"), &tmp)
                .unwrap_err();
            assert!(matches!(err, ChunkError::Damaged { .. }), "{err}");
            assert!(!tmp.exists());
        }
        shared
            .store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(manifest_key(&sha), honest)],
            })
            .unwrap();

        // One byte of one chunk altered in the store: refused, no file.
        let key = chunk_key(&sha, 1);
        let mut chunk = shared.store.get(&key).unwrap().unwrap();
        chunk[9] ^= 1;
        shared
            .store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(key, chunk)],
            })
            .unwrap();
        let again = dir.path().join("again");
        let tmp = dir.path().join(".tmp2");
        let err = shared.rebuild(&sha, &again, &tmp).unwrap_err();
        assert!(matches!(err, ChunkError::Damaged { .. }), "{err}");
        assert!(!again.exists() && !tmp.exists());
    }

    #[test]
    fn collection_removes_old_unreferenced_artifacts_manifest_and_chunks() {
        let (dir, shared) = setup();
        let (sha, src) = artifact(dir.path(), CHUNK_BYTES + 1);
        shared.put(&sha, &src, 100).unwrap();
        // Referenced, or uploaded lately: kept.
        let refd: HashSet<String> = [sha.clone()].into();
        assert!(shared.collect(&refd, 200).unwrap().is_empty());
        assert!(shared.collect(&HashSet::new(), 100).unwrap().is_empty());
        assert_eq!(
            shared.collect(&HashSet::new(), 200).unwrap(),
            vec![sha.clone()]
        );
        assert!(shared.manifest(&sha).unwrap().is_none());
        assert!(shared.store.scan(CHUNK_PREFIX).unwrap().is_empty());
        let err = shared
            .rebuild(&sha, &dir.path().join("d"), &dir.path().join(".t"))
            .unwrap_err();
        assert!(matches!(err, ChunkError::Missing(_)));
    }
}
