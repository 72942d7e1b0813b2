//! The artifact store: uploaded `.tar.gz` files kept as
//! `<data dir>/artifacts/<sha256>`, the bounds on getting them there, and
//! their collection once nothing refers to them.
//!
//! Why bounds: an upload is the one thing a CI pipeline (an attacker, as far
//! as the coordinator can tell) makes the coordinator write to disk. So an
//! app has at most [`UploadLimits::per_app`] uploads in progress, each at
//! most [`UploadLimits::max_artifact_bytes`]. An upload lives in a
//! `.upload-*` temporary file that goes away with it: when it is refused,
//! when its connection drops (the RPC system drops the capability holding
//! it), when it sat idle so long that a new upload of the same app took its
//! slot, and at every start.
//!
//! Why collection: every deploy adds an artifact. The records (`apps`)
//! decide which versions live; this module deletes the stored artifacts that
//! no record names any more, by the pure rule [`artifacts_to_delete`]. An
//! artifact uploaded within [`UPLOAD_GRACE`] that no record names yet is left
//! alone, as its deploy may be on its way (after a restart, the files'
//! modification times say which were uploaded lately). Collection, finishing
//! an upload, and "check that an artifact exists, then record a version
//! naming it" ([`ArtifactStore::hold`]) take one lock, so a deploy never
//! names an artifact that is being deleted. That lock is this process's:
//! the artifact store is this coordinator's disk.
//!
//! With `--etcd`, every finished upload is also written to the shared store
//! ([`crate::artifact_chunks`]) and the file is this coordinator's cache of
//! it: a read that misses the file rebuilds it from the store, and an
//! artifact counts as present when the store has it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::artifact_chunks::{ChunkError, SharedArtifacts};

/// Largest artifact accepted: an app bundle, not a disk image; the runner
/// refuses larger ones too.
pub const MAX_ARTIFACT_BYTES: u64 = 512 * 1024 * 1024;
/// Uploads of one app at a time: a deploy and one more (a CI pipeline
/// retried while the first still runs); more is a runaway pipeline.
pub const UPLOADS_PER_APP: usize = 2;
/// An upload without data for this long gives up its slot to a new upload
/// of the same app (a client that stopped without closing its connection).
pub const UPLOAD_IDLE: Duration = Duration::from_secs(300);
/// How long an uploaded artifact that no version names is kept: the client
/// deploys right after uploading, so this only spares a slow deploy, and it
/// bounds what uploads that are never deployed can pile up.
pub const UPLOAD_GRACE: Duration = Duration::from_secs(3600);

/// What temporary upload files are called.
const UPLOAD_PREFIX: &str = ".upload-";

/// Artifact store failures, worded for the uploader or the operator.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("app {app:?} already has {limit} uploads in progress; wait for the running deploy to finish, then try again")]
    TooManyUploads { app: String, limit: usize },
    #[error(
        "artifact larger than {limit_mib} MiB, the coordinator's limit; the upload was discarded"
    )]
    TooLarge { limit_mib: u64 },
    #[error("upload corrupted: received sha256 {received}, client announced {announced}")]
    Corrupted { received: String, announced: String },
    #[error("this upload sat idle for over {idle_secs} s and gave its slot to a newer one; start the upload again")]
    Expired { idle_secs: u64 },
    #[error("upload already finished or refused; start a new one")]
    Closed,
    #[error("not a sha256: {0:?}")]
    NotADigest(String),
    #[error("artifact {0} is not on the coordinator; upload it first")]
    Missing(String),
    /// The shared store (with `--etcd`) failed or holds a damaged copy.
    #[error(transparent)]
    Shared(ChunkError),
    #[error("artifact store {path}: {source}")]
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

/// Whether `s` is a lowercase hex SHA-256, the only names artifacts have.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The bounds on uploads (the constants above, smaller in tests).
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_artifact_bytes: u64,
    pub per_app: usize,
    pub idle: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            max_artifact_bytes: MAX_ARTIFACT_BYTES,
            per_app: UPLOADS_PER_APP,
            idle: UPLOAD_IDLE,
        }
    }
}

/// A stored artifact as the store finds it on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredArtifact {
    sha256: String,
    /// When it was uploaded (the file's modification time: the last write
    /// to its temporary file, which the rename into place keeps).
    uploaded: SystemTime,
}

/// The stored artifacts collection deletes: those no record references,
/// unless uploaded so lately (`awaiting_deploy`) that the deploy naming
/// them may not be recorded yet.
pub fn artifacts_to_delete(
    stored: &[String],
    referenced: &HashSet<String>,
    awaiting_deploy: &HashSet<String>,
) -> Vec<String> {
    stored
        .iter()
        .filter(|sha| !referenced.contains(*sha) && !awaiting_deploy.contains(*sha))
        .cloned()
        .collect()
}

/// One upload in progress, as the store tracks it.
struct InProgress {
    app: String,
    tmp: PathBuf,
    last_write: Instant,
}

/// Uploads in progress and recently finished; its lock is also the one
/// collection and deploys take (see the module doc).
#[derive(Default)]
struct Book {
    next_id: u64,
    in_progress: HashMap<u64, InProgress>,
    /// Digest -> when its upload finished, until a record names it or
    /// [`UPLOAD_GRACE`] has passed.
    awaiting_deploy: HashMap<String, Instant>,
}

impl Book {
    fn forget_old_uploads(&mut self, now: Instant) {
        self.awaiting_deploy
            .retain(|_, at| now.saturating_duration_since(*at) < UPLOAD_GRACE);
    }
}

/// The artifacts directory and its uploads.
pub struct ArtifactStore {
    dir: PathBuf,
    limits: UploadLimits,
    book: Arc<Mutex<Book>>,
    /// The store every coordinator shares artifacts through (`--etcd`).
    shared: OnceLock<Arc<SharedArtifacts>>,
}

fn shared_err(e: ChunkError) -> ArtifactError {
    match e {
        ChunkError::Missing(sha) => ArtifactError::Missing(sha),
        other => ArtifactError::Shared(other),
    }
}

/// Held while an artifact's existence is checked and a reference to it
/// recorded: no collection runs meanwhile.
pub struct Held<'a> {
    book: MutexGuard<'a, Book>,
}

impl Held<'_> {
    /// A record now names `sha`: from here on that record keeps it, not
    /// the grace given to a fresh upload.
    pub fn recorded(&mut self, sha: &str) {
        self.book.awaiting_deploy.remove(sha);
    }
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    // The book holds no invariant a panic elsewhere could break halfway.
    book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ArtifactStore {
    /// Opens (creating, mode 0700) the store at `dir`, removes the
    /// temporary files of uploads a previous run left behind, and gives the
    /// artifacts uploaded within [`UPLOAD_GRACE`] (by their files' age) the
    /// grace of a fresh upload.
    pub fn open(dir: PathBuf, limits: UploadLimits) -> Result<Self, ArtifactError> {
        transport::files::ensure_private_dir(&dir).map_err(io_at(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io_at(&dir))? {
            let entry = entry.map_err(io_at(&dir))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(UPLOAD_PREFIX)
            {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_at(&path))?;
                tracing::info!(
                    "removed {} (an upload interrupted by a restart)",
                    path.display()
                );
            }
        }
        let store = ArtifactStore {
            dir,
            limits,
            book: Arc::new(Mutex::new(Book::default())),
            shared: OnceLock::new(),
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut book = lock(&store.book);
        for a in store.stored()? {
            let age = wall.duration_since(a.uploaded).unwrap_or_default();
            if age < UPLOAD_GRACE {
                let at = now.checked_sub(age).unwrap_or(now);
                book.awaiting_deploy.insert(a.sha256, at);
            }
        }
        drop(book);
        Ok(store)
    }

    /// Shares every artifact uploaded from now on through `store`, and
    /// reads through it those this coordinator has no file of (`--etcd`).
    pub fn share_through(&self, store: Arc<dyn crate::store::Store>) {
        let shared = SharedArtifacts::new(store, self.limits.max_artifact_bytes);
        let _ = self.shared.set(Arc::new(shared));
    }

    /// Starts an upload for `app`, unless it already has as many as allowed
    /// (uploads of `app` idle for longer than the limit give up their slot).
    pub fn begin_upload(&self, app: &str, now: Instant) -> Result<Upload, ArtifactError> {
        let mut book = lock(&self.book);
        let idle = self.limits.idle;
        let stalled: Vec<u64> = book
            .in_progress
            .iter()
            .filter(|(_, u)| u.app == app && now.saturating_duration_since(u.last_write) > idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            if let Some(u) = book.in_progress.remove(&id) {
                let _ = std::fs::remove_file(&u.tmp);
                tracing::warn!(
                    "upload for {app} idle for over {} s: slot reclaimed",
                    idle.as_secs()
                );
            }
        }
        if book.in_progress.values().filter(|u| u.app == app).count() >= self.limits.per_app {
            return Err(ArtifactError::TooManyUploads {
                app: app.to_string(),
                limit: self.limits.per_app,
            });
        }
        let tmp = self
            .dir
            .join(format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        // create_new is O_CREAT|O_EXCL: never an existing file, never
        // through a link.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        book.next_id += 1;
        let id = book.next_id;
        book.in_progress.insert(
            id,
            InProgress {
                app: app.to_string(),
                tmp: tmp.clone(),
                last_write: now,
            },
        );
        Ok(Upload {
            id,
            phase: Phase::Writing {
                file,
                hasher: Sha256::new(),
                size: 0,
            },
            tmp,
            dir: self.dir.clone(),
            max_bytes: self.limits.max_artifact_bytes,
            idle: self.limits.idle,
            book: self.book.clone(),
            shared: self.shared.get().cloned(),
        })
    }

    /// How many uploads of `app` are in progress.
    pub fn uploads_in_progress(&self, app: &str) -> usize {
        lock(&self.book)
            .in_progress
            .values()
            .filter(|u| u.app == app)
            .count()
    }

    /// Holds off collection until the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        Held {
            book: lock(&self.book),
        }
    }

    /// Whether artifact `sha` is stored (here, or complete in the shared
    /// store).
    pub fn contains(&self, sha: &str) -> bool {
        is_sha256_hex(sha)
            && (std::fs::symlink_metadata(self.dir.join(sha)).is_ok_and(|m| m.is_file())
                || self
                    .shared
                    .get()
                    .is_some_and(|s| s.manifest(sha).is_ok_and(|m| m.is_some())))
    }

    /// Up to `length` (at most 4 MiB) bytes of artifact `sha` from `offset`,
    /// and its size.
    pub fn read(
        &self,
        sha: &str,
        offset: u64,
        length: u32,
    ) -> Result<(Vec<u8>, u64), ArtifactError> {
        use std::io::{Read, Seek, SeekFrom};
        if !is_sha256_hex(sha) {
            return Err(ArtifactError::NotADigest(sha.to_string()));
        }
        let path = self.dir.join(sha);
        if let Some(shared) = self.shared.get() {
            if !path.is_file() {
                let tmp = self
                    .dir
                    .join(format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple()));
                shared.rebuild(sha, &path, &tmp).map_err(shared_err)?;
            }
        }
        let mut f = File::open(&path).map_err(|_| ArtifactError::Missing(sha.to_string()))?;
        let size = f.metadata().map_err(io_at(&path))?.len();
        let offset = offset.min(size);
        f.seek(SeekFrom::Start(offset)).map_err(io_at(&path))?;
        let len = u64::from(length.min(4 << 20)).min(size - offset);
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(io_at(&path))?;
        Ok((buf, size))
    }

    /// Every stored artifact (temporary files and anything not named by a
    /// digest are not artifacts).
    fn stored(&self) -> Result<Vec<StoredArtifact>, ArtifactError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let entry = entry.map_err(io_at(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_sha256_hex(&name) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.is_file() {
                out.push(StoredArtifact {
                    sha256: name,
                    uploaded: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// Deletes the artifacts [`artifacts_to_delete`] picks, `referenced`
    /// being read under the lock (so no deploy records a reference
    /// meanwhile). Returns the digests deleted.
    pub fn collect<E: From<ArtifactError>>(
        &self,
        now: Instant,
        referenced: impl FnOnce() -> Result<HashSet<String>, E>,
    ) -> Result<Vec<String>, E> {
        let mut book = lock(&self.book);
        book.forget_old_uploads(now);
        let awaiting: HashSet<String> = book.awaiting_deploy.keys().cloned().collect();
        let referenced = referenced()?;
        let stored: Vec<String> = self.stored()?.into_iter().map(|a| a.sha256).collect();
        let doomed = artifacts_to_delete(&stored, &referenced, &awaiting);
        if let Some(shared) = self.shared.get() {
            // Every coordinator's fresh uploads are spared by their
            // manifest's upload time, not this one's memory.
            let grace_start = transport::clock::now_unix() - UPLOAD_GRACE.as_secs() as i64;
            let gone = shared
                .collect(&referenced, grace_start)
                .map_err(|e| ArtifactError::Shared(e.into()))?;
            if !gone.is_empty() {
                tracing::info!("deleted {} shared artifact(s) no version needs", gone.len());
            }
        }
        let mut deleted = Vec::new();
        for sha in doomed {
            let path = self.dir.join(&sha);
            match std::fs::remove_file(&path) {
                Ok(()) => deleted.push(sha),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e).into()),
            }
        }
        drop(book);
        if !deleted.is_empty() {
            tracing::info!("deleted {} artifact(s) no version needs", deleted.len());
        }
        Ok(deleted)
    }
}

enum Phase {
    Writing {
        file: File,
        hasher: Sha256,
        size: u64,
    },
    Stored,
    Discarded,
}

/// An upload in progress: written to a temporary file while hashing; the
/// file is renamed to its digest when the client's digest matches, and
/// removed in every other case (including the upload being dropped).
pub struct Upload {
    id: u64,
    phase: Phase,
    tmp: PathBuf,
    dir: PathBuf,
    max_bytes: u64,
    idle: Duration,
    book: Arc<Mutex<Book>>,
    shared: Option<Arc<SharedArtifacts>>,
}

impl Upload {
    /// Fails unless this upload still holds its slot; notes activity.
    fn still_mine(&mut self, now: Instant) -> Result<(), ArtifactError> {
        let mut book = lock(&self.book);
        match book.in_progress.get_mut(&self.id) {
            Some(u) => {
                u.last_write = now;
                Ok(())
            }
            None => {
                self.phase = Phase::Discarded;
                Err(ArtifactError::Expired {
                    idle_secs: self.idle.as_secs(),
                })
            }
        }
    }

    /// Drops the file and the slot.
    fn discard(&mut self) {
        if !matches!(self.phase, Phase::Stored) {
            self.phase = Phase::Discarded;
            let _ = std::fs::remove_file(&self.tmp);
        }
        lock(&self.book).in_progress.remove(&self.id);
    }

    /// Appends a chunk; over the size limit the upload is discarded.
    pub fn write(&mut self, data: &[u8], now: Instant) -> Result<(), ArtifactError> {
        if !matches!(self.phase, Phase::Writing { .. }) {
            return Err(ArtifactError::Closed);
        }
        self.still_mine(now)?;
        let Phase::Writing { file, hasher, size } = &mut self.phase else {
            return Err(ArtifactError::Closed);
        };
        let new_size = size.saturating_add(data.len() as u64);
        if new_size > self.max_bytes {
            let limit_mib = self.max_bytes / 1024 / 1024;
            self.discard();
            return Err(ArtifactError::TooLarge { limit_mib });
        }
        if let Err(e) = file.write_all(data) {
            let err = io_at(&self.tmp)(e);
            self.discard();
            return Err(err);
        }
        hasher.update(data);
        *size = new_size;
        Ok(())
    }

    /// Checks the digest the client announced and stores the artifact under
    /// it; returns its size. Syncs to disk: call it off an RPC thread.
    pub fn finish(&mut self, announced: &str) -> Result<u64, ArtifactError> {
        let Phase::Writing { file, hasher, size } =
            std::mem::replace(&mut self.phase, Phase::Discarded)
        else {
            return Err(ArtifactError::Closed);
        };
        let received = hex::encode(hasher.finalize());
        if received != announced {
            self.discard();
            return Err(ArtifactError::Corrupted {
                received,
                // What the client sent back to it, but not a message's worth.
                announced: announced.chars().take(64).collect(),
            });
        }
        if let Err(e) = file.sync_all() {
            let err = io_at(&self.tmp)(e);
            self.discard();
            return Err(err);
        }
        drop(file);
        let mut book = lock(&self.book);
        if book.in_progress.remove(&self.id).is_none() {
            drop(book);
            self.discard();
            return Err(ArtifactError::Expired {
                idle_secs: self.idle.as_secs(),
            });
        }
        let dest = self.dir.join(&received);
        if let Err(e) = std::fs::rename(&self.tmp, &dest) {
            drop(book);
            self.discard();
            return Err(io_at(&dest)(e));
        }
        self.phase = Phase::Stored;
        // The rename is durable before any record names the artifact.
        let _ = File::open(&self.dir).and_then(|d| d.sync_all());
        let now = Instant::now();
        book.forget_old_uploads(now);
        book.awaiting_deploy.insert(received.clone(), now);
        drop(book);
        // Shared before the upload counts as done: a deploy recorded next
        // may start on a runner attached to any coordinator.
        if let Some(shared) = &self.shared {
            shared
                .put(&received, &dest, transport::clock::now_unix())
                .map_err(ArtifactError::Shared)?;
        }
        Ok(size)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(dir: &Path, max: u64) -> ArtifactStore {
        ArtifactStore::open(
            dir.join("artifacts"),
            UploadLimits {
                max_artifact_bytes: max,
                per_app: 2,
                idle: Duration::from_secs(60),
            },
        )
        .unwrap()
    }

    fn files(store: &ArtifactStore) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&store.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn with_a_shared_store_an_upload_here_is_read_by_another_coordinator() {
        let dir = tempfile::tempdir().unwrap();
        let shared: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a_dir).unwrap();
        std::fs::create_dir_all(&b_dir).unwrap();
        let (a, b) = (small(&a_dir, 4 << 20), small(&b_dir, 4 << 20));
        a.share_through(shared.clone());
        b.share_through(shared);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
        let digest = sha(&data);
        assert!(!b.contains(&digest));
        let mut up = a.begin_upload("web", Instant::now()).unwrap();
        up.write(&data, Instant::now()).unwrap();
        up.finish(&digest).unwrap();
        // B has no file, yet has the artifact, and rebuilds it on read.
        assert!(files(&b).is_empty());
        assert!(b.contains(&digest));
        let (head, size) = b.read(&digest, 0, 10).unwrap();
        assert_eq!((head.as_slice(), size), (&data[..10], data.len() as u64));
        assert_eq!(files(&b), vec![digest.clone()]);
        assert!(matches!(
            b.read(&sha(b"never uploaded"), 0, 10),
            Err(ArtifactError::Missing(_))
        ));
    }

    #[test]
    fn a_third_upload_of_an_app_waits_for_one_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 1 << 20);
        let now = Instant::now();
        let first = store.begin_upload("web", now).unwrap();
        let _second = store.begin_upload("web", now).unwrap();
        let refused = store.begin_upload("web", now).err().unwrap();
        assert!(matches!(
            refused,
            ArtifactError::TooManyUploads { limit: 2, .. }
        ));
        assert!(
            refused.to_string().contains("wait for the running deploy"),
            "{refused}"
        );
        // Other apps have their own slots.
        let _other = store.begin_upload("api", now).unwrap();
        // A dropped upload (its connection gone) frees its slot and file.
        drop(first);
        assert_eq!(store.uploads_in_progress("web"), 1);
        assert_eq!(files(&store).len(), 2);
        let _third = store.begin_upload("web", now).unwrap();
    }

    #[test]
    fn an_idle_upload_gives_its_slot_to_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 1 << 20);
        let t0 = Instant::now();
        let mut stalled = store.begin_upload("web", t0).unwrap();
        stalled.write(b"abc", t0).unwrap();
        let mut busy = store.begin_upload("web", t0).unwrap();
        busy.write(b"abc", t0 + Duration::from_secs(50)).unwrap();
        // 61 s later only the stalled one is over the 60 s limit.
        let later = t0 + Duration::from_secs(61);
        let _fresh = store.begin_upload("web", later).unwrap();
        assert_eq!(files(&store).len(), 2, "the stalled upload's file stays");
        let err = stalled.write(b"more", later).unwrap_err();
        assert!(matches!(err, ArtifactError::Expired { .. }), "{err}");
        assert!(matches!(
            stalled.finish(&sha(b"abc")),
            Err(ArtifactError::Closed)
        ));
        busy.write(b"def", later).unwrap();
        assert_eq!(busy.finish(&sha(b"abcdef")).unwrap(), 6);
        assert!(store.contains(&sha(b"abcdef")));
    }

    #[test]
    fn an_oversized_upload_is_refused_and_its_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 8);
        let now = Instant::now();
        let mut up = store.begin_upload("web", now).unwrap();
        up.write(b"12345", now).unwrap();
        let err = up.write(b"6789", now).unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("limit"), "{err}");
        assert!(files(&store).is_empty(), "{:?}", files(&store));
        assert_eq!(store.uploads_in_progress("web"), 0);
        assert!(matches!(up.write(b"1", now), Err(ArtifactError::Closed)));
        assert!(matches!(up.finish("x"), Err(ArtifactError::Closed)));
    }

    #[test]
    fn a_corrupted_upload_leaves_nothing_and_a_good_one_is_stored_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 1 << 20);
        let now = Instant::now();
        let mut bad = store.begin_upload("web", now).unwrap();
        bad.write(b"hello", now).unwrap();
        let err = bad.finish(&sha(b"other")).unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupted { .. }), "{err}");
        assert!(files(&store).is_empty(), "{:?}", files(&store));
        let mut good = store.begin_upload("web", now).unwrap();
        good.write(b"hel", now).unwrap();
        good.write(b"lo", now).unwrap();
        assert_eq!(good.finish(&sha(b"hello")).unwrap(), 5);
        drop(good);
        assert_eq!(files(&store), vec![sha(b"hello")]);
        assert_eq!(store.uploads_in_progress("web"), 0);
        let (data, size) = store.read(&sha(b"hello"), 1, 3).unwrap();
        assert_eq!((data.as_slice(), size), (b"ell".as_slice(), 5));
        let (data, _) = store.read(&sha(b"hello"), 9, 3).unwrap();
        assert!(data.is_empty());
        assert!(matches!(
            store.read("../x", 0, 1),
            Err(ArtifactError::NotADigest(_))
        ));
    }

    #[test]
    fn leftover_upload_files_go_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 1 << 20);
        let up = store.begin_upload("web", Instant::now()).unwrap();
        std::mem::forget(up); // as if the process had died mid-upload
        std::fs::write(store.dir.join(sha(b"kept")), b"kept").unwrap();
        assert_eq!(files(&store).len(), 2);
        let reopened = small(dir.path(), 1 << 20);
        assert_eq!(files(&reopened), vec![sha(b"kept")]);
    }

    #[test]
    fn collection_deletes_what_nothing_references_once_deployed_or_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 1 << 20);
        let now = Instant::now();
        let put = |data: &[u8]| {
            let mut up = store.begin_upload("web", now).unwrap();
            up.write(data, now).unwrap();
            up.finish(&sha(data)).unwrap();
        };
        put(b"v1");
        put(b"v2");
        put(b"v3");
        let referenced: HashSet<String> = [sha(b"v3")].into();
        let collect = |at: Instant| {
            store
                .collect::<ArtifactError>(at, || Ok(referenced.clone()))
                .unwrap()
        };
        // Just uploaded: the deploys naming them may be on their way.
        assert!(collect(now).is_empty());
        // v1 was deployed (and its version has gone since).
        store.hold().recorded(&sha(b"v1"));
        assert_eq!(collect(now), vec![sha(b"v1")]);
        // v2 was never deployed: it goes once its grace is over.
        assert!(collect(now + UPLOAD_GRACE / 2).is_empty());
        let later = now + UPLOAD_GRACE + Duration::from_secs(1);
        assert_eq!(collect(later), vec![sha(b"v2")]);
        assert_eq!(files(&store), vec![sha(b"v3")]);
    }

    #[test]
    fn after_a_restart_the_age_of_a_file_says_whether_it_awaits_its_deploy() {
        let dir = tempfile::tempdir().unwrap();
        let store = small(dir.path(), 1 << 20);
        for (name, age) in [
            ("old", UPLOAD_GRACE * 2),
            ("fresh", Duration::from_secs(60)),
        ] {
            let f = File::create(store.dir.join(sha(name.as_bytes()))).unwrap();
            f.set_modified(SystemTime::now() - age).unwrap();
        }
        let reopened = small(dir.path(), 1 << 20);
        let gone = reopened
            .collect::<ArtifactError>(Instant::now(), || Ok(HashSet::new()))
            .unwrap();
        assert_eq!(gone, vec![sha(b"old")]);
        assert_eq!(files(&reopened), vec![sha(b"fresh")]);
    }

    #[test]
    fn the_delete_rule() {
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        let stored: Vec<String> = ["named", "awaiting", "named-and-awaiting", "unnamed"]
            .map(String::from)
            .to_vec();
        let doomed = artifacts_to_delete(
            &stored,
            &set(&["named", "named-and-awaiting"]),
            &set(&["awaiting", "named-and-awaiting"]),
        );
        assert_eq!(doomed, vec!["unnamed"]);
    }
}
