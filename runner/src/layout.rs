//! Where a sandbox's files live on the runner, and who may write each dir.
//!
//! The rule: **the runner never resolves a path through a directory the
//! sandbox can write.** A sandbox runs as the runner's user outside its
//! namespaces (often root), so whatever it can name — a symlink, a planted
//! temporary name, a socket of its choosing — the runner would follow with
//! its own rights. Everything the runner opens, creates, renames or
//! connects to is therefore in a dir the sandbox sees read-only or not at
//! all.
//!
//! ```text
//! <runner data>/sandboxes/<id>/   runner, 0700; never visible inside
//!   app/        the unpacked app     runner writes; the sandbox sees it through view/
//!   scratch/    capped tmpfs         the sandbox's writes (crate::scratch)
//!   view/       overlay app+scratch  bound rw at app/'s path inside
//!   app.sock    the service's socket bound by the runner; the shim listens
//!               on it through an inherited descriptor once the service is up
//!   identity/   token, token.sock    runner writes; bound READ-ONLY at /run/miren/identity
//!   logs/       output.log(.1)       runner writes; never visible inside
//! ```
//!
//! No dir on the runner's disk is writable from inside: where the runner
//! cannot mount (not root), app/ itself is bound writable instead of view/,
//! and the runner says at start that sandboxes' writes are not bounded.
//! The runner writes only into `identity/` and `logs/` (atomic token
//! replace with an exclusive, unpredictable temporary name; logs through
//! descriptors it opened itself), detaches `view/` and `scratch/` by name,
//! and removes the whole tree with [`remove_tree`], which never follows
//! symlinks and copes with any depth. With `--isolation none` the sandbox is
//! a plain process of the runner's user and none of this contains it: that
//! mode is for machines without namespaces, and says so.

use std::path::{Path, PathBuf};

use crate::scratch::Layer;

/// Inside a bubblewrap sandbox: the runner's read-only dir (token file and
/// token socket).
pub const INSIDE_IDENTITY: &str = "/run/miren/identity";
/// The token file, in the identity dir.
pub const TOKEN_FILE: &str = "token";
/// The runner's token endpoint for this sandbox, in the identity dir.
pub const TOKEN_SOCKET: &str = "token.sock";
/// The service's socket, in the sandbox's runner-only root.
pub const APP_SOCKET: &str = "app.sock";

/// Whether `id` may name a sandbox's dirs and cgroup: `[A-Za-z0-9_-]{1,128}`
/// (never `.`, `..` or a path).
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The dirs of one sandbox on the runner.
#[derive(Debug, Clone)]
pub struct SandboxDirs {
    pub root: PathBuf,
    pub app: PathBuf,
    /// The capped writable layer over `app` ([`crate::scratch`]).
    pub layer: Layer,
    pub identity: PathBuf,
    pub logs: PathBuf,
}

impl SandboxDirs {
    /// The dirs of sandbox `id` under the runner's data dir. `id` must
    /// already be checked (`[A-Za-z0-9_-]`).
    pub fn new(data_dir: &Path, id: &str) -> Self {
        let root = data_dir.join("sandboxes").join(id);
        SandboxDirs {
            app: root.join("app"),
            layer: Layer::new(&root),
            identity: root.join("identity"),
            logs: root.join("logs"),
            root,
        }
    }

    /// Creates them afresh (whatever an earlier sandbox of this id left,
    /// mounts included, is detached and removed first, without following
    /// links).
    pub async fn create(&self) -> std::io::Result<()> {
        self.remove().await?;
        for dir in [&self.root, &self.identity, &self.logs] {
            transport::files::ensure_private_dir(dir)?;
        }
        std::fs::create_dir(&self.app)
    }

    /// Detaches the writable layer and removes the whole tree.
    pub async fn remove(&self) -> std::io::Result<()> {
        crate::scratch::unmount(&self.layer);
        remove_tree(&self.root).await
    }

    /// The service's socket: in the runner-only root, so no name the
    /// sandbox planted can stand in for it.
    pub fn app_socket(&self) -> PathBuf {
        self.root.join(APP_SOCKET)
    }
}

/// Detaches and removes every sandbox's dirs left under `data_dir` by an
/// earlier run of this runner (its sandboxes died with it: bubblewrap's
/// `--die-with-parent`), mounts of their writable layers included. Run at
/// start, before any sandbox. Returns how many were removed.
/// An entry that could not be removed is said and skipped: the others go
/// all the same.
pub async fn remove_leftovers(data_dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(data_dir.join("sandboxes")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) => {
                tracing::warn!("listing leftover sandboxes: {e}");
                continue;
            }
        };
        let done = match path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| valid_sandbox_id(n))
        {
            Some(id) => SandboxDirs::new(data_dir, id).remove().await,
            // Never one of ours: removed all the same, links unfollowed.
            None => remove_tree(&path).await,
        };
        match done {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!("leftover sandbox {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

/// Removes the tree at `path` (gone already is fine), never following a
/// link, off the runner's thread and with bounded descriptors and stack.
///
/// A sandbox writes what it likes under its app dir, such as 18,000 nested
/// dirs: `std::fs::remove_dir_all` recurses with a descriptor per level
/// (overflowing a thread's stack, or failing at the open-files limit and
/// leaving the tree). GNU `rm -rf --one-file-system` walks any depth with a
/// bounded number of descriptors and never follows symlinks.
pub async fn remove_tree(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let out = tokio::process::Command::new("rm")
        .args(["-rf", "--one-file-system", "--"])
        .arg(path)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    if out.status.success() && std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "could not remove {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deep_tree_is_removed() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("deep");
        // Deeper than PATH_MAX allows by path: made one level at a time.
        std::fs::create_dir(&root).expect("root");
        let mut dir = std::fs::File::open(&root).expect("open root");
        for _ in 0..3000 {
            use std::os::unix::io::AsRawFd;
            let name = c"d";
            // SAFETY: mkdirat on a descriptor we own with a C string.
            unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) };
            // SAFETY: openat on a descriptor we own with a C string.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            assert!(fd >= 0);
            // SAFETY: fd was just opened and is owned by nothing else.
            dir = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        }
        drop(dir);
        remove_tree(&root).await.expect("removed");
        assert!(!root.exists());
        remove_tree(&root).await.expect("gone already is fine");
    }

    #[tokio::test]
    async fn create_replaces_a_planted_tree_without_following_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(outside.join("keep"), b"k").expect("keep");
        let dirs = SandboxDirs::new(d.path(), "s1");
        std::fs::create_dir_all(&dirs.app).expect("app");
        std::os::unix::fs::symlink(&outside, dirs.app.join("link")).expect("link");
        dirs.create().await.expect("create");
        assert!(outside.join("keep").exists());
        for dir in [&dirs.app, &dirs.identity, &dirs.logs] {
            assert!(dir.is_dir());
            assert_eq!(std::fs::read_dir(dir).expect("list").count(), 0);
        }
    }
}
