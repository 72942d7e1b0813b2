//! The runner's artifact cache: `<runner data dir>/artifacts/<sha256>.tar.gz`.
//!
//! Why it exists: an artifact can be as large as the coordinator accepts, so
//! it is streamed to disk chunk by chunk instead of gathered in memory, and
//! nothing on this path trusts what it is sent. Each download goes to its own
//! temporary file, created exclusively (`O_EXCL|O_NOFOLLOW`, mode 0600) in
//! the runner-private directory, hashed as it is written, bounded by the
//! size the coordinator announced and by [`MAX_ARTIFACT_BYTES`], and renamed
//! to its digest only when the SHA-256 matches; on any failure (or when the
//! start is abandoned) the temporary file goes. So a file under a digest's
//! name always holds those bytes.
//!
//! A cache is its directory: [`ArtifactCache::open`] returns a handle onto
//! the one state this process keeps for that directory, so any number of
//! handles (one per sandbox start, say) agree on which downloads are under
//! way (one per digest: two sandboxes starting from the same artifact wait
//! for one download) and on which sandbox uses which artifact.
//!
//! Collection: when a sandbox stops ([`ArtifactCache::release`]), the
//! artifacts no sandbox here uses are removed, but the [`KEEP_UNUSED`] most
//! recently used (a rollback or a restart on this runner then needs no
//! fetch); the rule is [`artifacts_to_remove`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::call::CallError;

/// Largest artifact this runner fetches (the coordinator accepts no larger
/// ones either).
pub const MAX_ARTIFACT_BYTES: u64 = 512 * 1024 * 1024;
/// Bytes asked for per fetch call (the coordinator answers at most 4 MiB).
pub const CHUNK_BYTES: u32 = 1 << 20;
/// Artifacts kept on this runner that no sandbox here uses: the previous
/// version's and one more, for a rollback without a fetch; every other one
/// can be fetched again.
pub const KEEP_UNUSED: usize = 2;

/// What temporary download files are called.
const FETCH_PREFIX: &str = ".fetch-";

/// Why an artifact could not be had; the sandbox start fails with it.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("invalid artifact digest {0:?}")]
    InvalidDigest(String),
    #[error("artifact {sha} is {size} bytes, more than this runner's limit of {limit}")]
    TooLarge { sha: String, size: u64, limit: u64 },
    #[error("artifact {sha}: the coordinator announced {first} bytes, then {then}")]
    SizeChanged { sha: String, first: u64, then: u64 },
    #[error("artifact {sha}: the coordinator sent more than the {size} bytes it announced")]
    Overrun { sha: String, size: u64 },
    #[error("artifact {sha} ended after {received} of {size} bytes")]
    Truncated {
        sha: String,
        received: u64,
        size: u64,
    },
    #[error("artifact {sha} arrived corrupted (sha256 {got})")]
    Corrupted { sha: String, got: String },
    #[error("fetching artifact {sha}: {source}")]
    Fetch {
        sha: String,
        #[source]
        source: CallError,
    },
    #[error("artifact cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A cached artifact as collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedArtifact {
    pub sha256: String,
    /// When a sandbox last started from it (the file's modification time).
    pub last_used: SystemTime,
}

/// The cached artifacts to remove: all that no sandbox uses (`in_use`),
/// but the `keep_unused` most recently used of those.
pub fn artifacts_to_remove(
    cached: &[CachedArtifact],
    in_use: &HashSet<&str>,
    keep_unused: usize,
) -> Vec<String> {
    let mut unused: Vec<&CachedArtifact> = cached
        .iter()
        .filter(|a| !in_use.contains(a.sha256.as_str()))
        .collect();
    unused.sort_by_key(|a| std::cmp::Reverse(a.last_used));
    unused
        .into_iter()
        .skip(keep_unused)
        .map(|a| a.sha256.clone())
        .collect()
}

/// What this process knows about one cache directory.
#[derive(Default)]
struct State {
    /// Sandbox id -> the artifact it started from.
    uses: HashMap<String, String>,
    /// Digest -> its turn: one download of a digest at a time. Present
    /// while someone fetches or waits for it.
    fetching: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // No invariant of the state spans a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle on the artifact cache in one directory.
#[derive(Clone)]
pub struct ArtifactCache {
    shared: Arc<Shared>,
    max_bytes: u64,
}

/// Removes its temporary file when dropped: after a rename it is gone
/// already, and in every other case (an error, an abandoned start) it must go.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Gives up a digest's turn, forgetting the turn once nobody waits for it.
struct Turn<'a> {
    shared: &'a Shared,
    sha: String,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        // Only the map's reference and ours: nobody else waits.
        if Arc::strong_count(&self.gate) == 2 {
            state.fetching.remove(&self.sha);
        }
    }
}

impl ArtifactCache {
    /// The cache in `dir` (created, mode 0700, at the first fetch). The
    /// first handle on a directory in this process removes what
    /// interrupted downloads left there.
    pub fn open(dir: PathBuf) -> ArtifactCache {
        static CACHES: OnceLock<Mutex<HashMap<PathBuf, Arc<Shared>>>> = OnceLock::new();
        let mut caches = CACHES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let shared = caches
            .entry(dir.clone())
            .or_insert_with(|| {
                remove_leftover_downloads(&dir);
                Arc::new(Shared {
                    dir,
                    state: Mutex::new(State::default()),
                })
            })
            .clone();
        ArtifactCache {
            shared,
            max_bytes: MAX_ARTIFACT_BYTES,
        }
    }

    /// This handle with another size limit.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> ArtifactCache {
        self.max_bytes = max_bytes;
        self
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.shared.dir.join(format!("{sha}.tar.gz"))
    }

    /// The cached file of artifact `sha` for `sandbox`, fetched first if it
    /// is not here: `fetch(sha, offset, length)` answers bytes from `offset`
    /// and the artifact's size. Records that `sandbox` uses it until
    /// [`ArtifactCache::release`].
    pub async fn checkout<F, Fut>(
        &self,
        sandbox: &str,
        sha: &str,
        fetch: F,
    ) -> Result<PathBuf, ArtifactError>
    where
        F: Fn(String, u64, u32) -> Fut,
        Fut: Future<Output = Result<(Vec<u8>, u64), CallError>>,
    {
        if !is_sha256_hex(sha) {
            return Err(ArtifactError::InvalidDigest(sha.to_string()));
        }
        let dir = &self.shared.dir;
        transport::files::ensure_private_dir(dir).map_err(io_at(dir))?;
        let gate = self
            .shared
            .state()
            .fetching
            .entry(sha.to_string())
            .or_default()
            .clone();
        let turn = Turn {
            shared: &self.shared,
            sha: sha.to_string(),
            gate,
        };
        let path = {
            let _mine = turn.gate.lock().await;
            self.cached_or_fetched(sha, &fetch).await?
        };
        // Recorded before the turn is given up: collection, which counts
        // digests with a turn as used, never sees this one unused.
        self.shared
            .state()
            .uses
            .insert(sandbox.to_string(), sha.to_string());
        drop(turn);
        Ok(path)
    }

    async fn cached_or_fetched<F, Fut>(
        &self,
        sha: &str,
        fetch: &F,
    ) -> Result<PathBuf, ArtifactError>
    where
        F: Fn(String, u64, u32) -> Fut,
        Fut: Future<Output = Result<(Vec<u8>, u64), CallError>>,
    {
        let path = self.path_of(sha);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                // Last use, for collection.
                if let Ok(f) = std::fs::File::open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                return Ok(path);
            }
            Ok(_) => {
                return Err(ArtifactError::Io {
                    path,
                    source: std::io::Error::other("not a regular file"),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
        self.download(sha, fetch).await?;
        Ok(path)
    }

    /// Streams artifact `sha` into a temporary file and renames it into
    /// place once complete and verified.
    async fn download<F, Fut>(&self, sha: &str, fetch: &F) -> Result<(), ArtifactError>
    where
        F: Fn(String, u64, u32) -> Fut,
        Fut: Future<Output = Result<(Vec<u8>, u64), CallError>>,
    {
        let dir = self.shared.dir.clone();
        let tmp = TempFile(dir.join(format!(
            "{FETCH_PREFIX}{sha}-{:016x}",
            rand::random::<u64>()
        )));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp.0)
            .map_err(io_at(&tmp.0))?;
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let mut announced: Option<u64> = None;
        loop {
            let (chunk, size) = fetch(sha.to_string(), received, CHUNK_BYTES)
                .await
                .map_err(|source| ArtifactError::Fetch {
                    sha: sha.to_string(),
                    source,
                })?;
            let total = *announced.get_or_insert(size);
            if size != total {
                return Err(ArtifactError::SizeChanged {
                    sha: sha.to_string(),
                    first: total,
                    then: size,
                });
            }
            if total > self.max_bytes {
                return Err(ArtifactError::TooLarge {
                    sha: sha.to_string(),
                    size: total,
                    limit: self.max_bytes,
                });
            }
            let after = received.saturating_add(chunk.len() as u64);
            if after > total {
                return Err(ArtifactError::Overrun {
                    sha: sha.to_string(),
                    size: total,
                });
            }
            if chunk.is_empty() && received < total {
                return Err(ArtifactError::Truncated {
                    sha: sha.to_string(),
                    received,
                    size: total,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io_at(&tmp.0))?;
            received = after;
            if received == total {
                break;
            }
        }
        let got = hex::encode(hasher.finalize());
        if got != sha {
            return Err(ArtifactError::Corrupted {
                sha: sha.to_string(),
                got,
            });
        }
        // Syncing up to 512 MiB must not stall this thread's other tasks.
        let (from, to) = (tmp.0.clone(), self.path_of(sha));
        tokio::task::spawn_blocking(move || -> Result<(), ArtifactError> {
            file.sync_all().map_err(io_at(&from))?;
            std::fs::rename(&from, &to).map_err(io_at(&to))?;
            let _ = std::fs::File::open(&dir).and_then(|d| d.sync_all());
            Ok(())
        })
        .await
        .map_err(|e| ArtifactError::Io {
            path: tmp.0.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
        Ok(())
    }

    /// Forgets that `sandbox` uses its artifact and collects.
    pub fn release(&self, sandbox: &str) {
        self.shared.state().uses.remove(sandbox);
        match self.collect() {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(
                    "removed {} cached artifact(s) no sandbox uses",
                    removed.len()
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("collecting cached artifacts: {e}"),
        }
    }

    /// Removes the cached artifacts [`artifacts_to_remove`] picks, counting
    /// as used those of running sandboxes and those being fetched. Returns
    /// their digests.
    pub fn collect(&self) -> Result<Vec<String>, ArtifactError> {
        let dir = &self.shared.dir;
        let state = self.shared.state();
        let mut in_use: HashSet<&str> = state.uses.values().map(String::as_str).collect();
        in_use.extend(state.fetching.keys().map(String::as_str));
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_at(dir)(e)),
        };
        let mut cached = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_at(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".tar.gz").filter(|s| is_sha256_hex(s)) else {
                continue;
            };
            match std::fs::symlink_metadata(entry.path()) {
                Ok(meta) if meta.is_file() => cached.push(CachedArtifact {
                    sha256: sha.to_string(),
                    last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                _ => {}
            }
        }
        let doomed = artifacts_to_remove(&cached, &in_use, KEEP_UNUSED);
        for sha in &doomed {
            let path = self.path_of(sha);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        Ok(doomed)
    }
}

/// Removes the temporary files of downloads a previous run left in `dir`.
fn remove_leftover_downloads(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(FETCH_PREFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    type Reply = futures::future::Ready<Result<(Vec<u8>, u64), CallError>>;

    /// A coordinator serving `data` in chunks of at most `chunk` bytes,
    /// counting calls.
    fn serving(
        data: Vec<u8>,
        chunk: usize,
        calls: Rc<Cell<u32>>,
    ) -> impl Fn(String, u64, u32) -> Reply {
        move |_sha, offset, len| {
            calls.set(calls.get() + 1);
            let start = (offset as usize).min(data.len());
            let end = (start + chunk.min(len as usize)).min(data.len());
            futures::future::ready(Ok((data[start..end].to_vec(), data.len() as u64)))
        }
    }

    #[tokio::test]
    async fn an_artifact_is_fetched_in_chunks_once_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts"));
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let calls = Rc::new(Cell::new(0));
        let path = cache
            .checkout(
                "sb-1",
                &sha(&data),
                serving(data.clone(), 4096, calls.clone()),
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(calls.get(), 10, "40000 bytes in 4096-byte chunks");
        // Cached: no fetch for the next sandbox.
        let again = cache
            .checkout("sb-2", &sha(&data), serving(vec![], 1, calls.clone()))
            .await
            .unwrap();
        assert_eq!(again, path);
        assert_eq!(calls.get(), 10);
        assert_eq!(
            files(&dir.path().join("artifacts")),
            vec![format!("{}.tar.gz", sha(&data))]
        );
    }

    #[tokio::test]
    async fn a_corrupted_chunk_leaves_nothing_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts"));
        let data = b"the real artifact".to_vec();
        let mut tampered = data.clone();
        tampered[3] ^= 1;
        let err = cache
            .checkout("sb", &sha(&data), serving(tampered, 5, Rc::default()))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupted { .. }), "{err}");
        assert!(err.to_string().contains("arrived corrupted"), "{err}");
        assert!(files(&dir.path().join("artifacts")).is_empty());
        // Not recorded as used, and a good fetch afterwards works.
        assert!(cache.shared.state().uses.is_empty());
        assert!(cache.shared.state().fetching.is_empty());
        cache
            .checkout("sb", &sha(&data), serving(data.clone(), 5, Rc::default()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sizes_are_bounded_and_must_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts")).with_max_bytes(8);
        let calls = Rc::new(Cell::new(0));
        let big = b"0123456789".to_vec();
        let err = cache
            .checkout("sb", &sha(&big), serving(big.clone(), 2, calls.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::TooLarge {
                    size: 10,
                    limit: 8,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(calls.get(), 1, "refused at the first answer");

        // More bytes than announced.
        let liar = |_: String, _: u64, _: u32| futures::future::ready(Ok((b"123456".to_vec(), 4)));
        let err = cache.checkout("sb", &sha(b"1234"), liar).await.unwrap_err();
        assert!(matches!(err, ArtifactError::Overrun { .. }), "{err}");

        // A size that changes midway.
        let shifty = |_: String, offset: u64, _: u32| {
            futures::future::ready(Ok((b"12".to_vec(), if offset == 0 { 4 } else { 6 })))
        };
        let err = cache
            .checkout("sb", &sha(b"1234"), shifty)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::SizeChanged { .. }), "{err}");

        // An answer that stops early.
        let short = |_: String, offset: u64, _: u32| {
            let chunk = if offset == 0 { b"12".to_vec() } else { vec![] };
            futures::future::ready(Ok((chunk, 4)))
        };
        let err = cache
            .checkout("sb", &sha(b"1234"), short)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::Truncated { received: 2, .. }),
            "{err}"
        );

        // The coordinator's refusal.
        let refusing = |_: String, _: u64, _: u32| {
            futures::future::ready(Err(CallError::Rpc {
                kind: capnp::ErrorKind::Failed,
                message: "artifact is not on the coordinator".into(),
            }))
        };
        let err = cache
            .checkout("sb", &sha(b"1234"), refusing)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not on the coordinator"), "{err}");

        let err = cache
            .checkout("sb", "../../etc/passwd", refusing)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::InvalidDigest(_)), "{err}");
        assert!(files(&dir.path().join("artifacts")).is_empty());
    }

    #[tokio::test]
    async fn two_sandboxes_starting_from_one_artifact_share_one_download() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts"));
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let calls = Rc::new(Cell::new(0));
        // Each chunk arrives after a pause, so both starts overlap.
        let slow = {
            let calls = calls.clone();
            let data = data.clone();
            move |_: String, offset: u64, _: u32| {
                calls.set(calls.get() + 1);
                let start = offset as usize;
                let end = (start + 10_000).min(data.len());
                let chunk = data[start..end].to_vec();
                let size = data.len() as u64;
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok((chunk, size))
                }
            }
        };
        let second = cache.clone();
        let digest = sha(&data);
        let (a, b) = tokio::join!(
            cache.checkout("sb-a", &digest, &slow),
            second.checkout("sb-b", &digest, &slow),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), data);
        assert_eq!(calls.get(), 10, "one download of 10 chunks");
        assert_eq!(files(&dir.path().join("artifacts")).len(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_fetch_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts"));
        let never = |_: String, offset: u64, _: u32| async move {
            if offset > 0 {
                std::future::pending::<()>().await;
            }
            Ok((b"12".to_vec(), 4))
        };
        let started = tokio::time::timeout(
            Duration::from_millis(50),
            cache.checkout("sb", &sha(b"1234"), never),
        )
        .await;
        assert!(started.is_err(), "the fetch hangs by construction");
        assert!(files(&dir.path().join("artifacts")).is_empty());
        assert!(cache.shared.state().fetching.is_empty());
    }

    #[tokio::test]
    async fn stopped_sandboxes_release_their_artifacts_but_the_newest_unused_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts"));
        let versions: Vec<Vec<u8>> = (1..=5)
            .map(|i| format!("version {i}").into_bytes())
            .collect();
        for (i, data) in versions.iter().enumerate() {
            let path = cache
                .checkout(
                    &format!("sb-{i}"),
                    &sha(data),
                    serving(data.clone(), 64, Rc::default()),
                )
                .await
                .unwrap();
            // Distinct, increasing last-use times.
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + i as u64);
            std::fs::File::open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        // Something not ours in the directory is left alone.
        std::fs::write(dir.path().join("artifacts/notes.txt"), "x").unwrap();
        // sb-0 (the oldest) keeps running; the others stop.
        for i in 1..=4 {
            cache.release(&format!("sb-{i}"));
        }
        let mut expected = vec![
            format!("{}.tar.gz", sha(&versions[0])),
            format!("{}.tar.gz", sha(&versions[3])),
            format!("{}.tar.gz", sha(&versions[4])),
            "notes.txt".to_string(),
        ];
        expected.sort();
        assert_eq!(files(&dir.path().join("artifacts")), expected);
    }

    #[test]
    fn the_removal_rule() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let cached: Vec<CachedArtifact> = [("a", 1), ("b", 5), ("c", 3), ("d", 4), ("e", 2)]
            .iter()
            .map(|(n, t)| CachedArtifact {
                sha256: n.to_string(),
                last_used: at(*t),
            })
            .collect();
        let in_use: HashSet<&str> = ["b", "e"].into();
        let mut doomed = artifacts_to_remove(&cached, &in_use, 1);
        doomed.sort();
        // Unused: d (4), c (3), a (1); the newest one stays.
        assert_eq!(doomed, vec!["a", "c"]);
        assert!(artifacts_to_remove(&cached, &HashSet::new(), 5).is_empty());
    }

    #[test]
    fn leftover_downloads_go_when_a_cache_is_first_opened() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("artifacts");
        std::fs::create_dir(&cache_dir).unwrap();
        std::fs::write(cache_dir.join(".fetch-abc-0000000000000001"), "partial").unwrap();
        let _cache = ArtifactCache::open(cache_dir.clone());
        assert!(files(&cache_dir).is_empty());
    }
}
