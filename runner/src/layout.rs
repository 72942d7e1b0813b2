//! Where a sandbox's files live on the runner, and who may write each dir.
//!
//! The rule: **the runner never resolves a path through a directory the
//! sandbox can write.** A sandbox runs as the runner's user outside its
//! namespaces (often root), so whatever it can name — a symlink, a planted
//! temporary name, a socket of its choosing — the runner would follow with
//! its own rights. Everything the runner opens, creates, renames or
//! connects to is therefore in a dir the sandbox sees read-only or not at
//! all, or (the one exception, the app's socket) opened with `O_PATH |
//! O_NOFOLLOW` and checked to be a socket before connecting to that inode.
//!
//! ```text
//! <runner data>/sandboxes/<id>/   runner, 0700; never visible inside
//!   app/        the unpacked app     sandbox writes (bound rw at its own path)
//!   expose/     the shim's app.sock  sandbox writes (bound rw at /run/miren/expose)
//!   identity/   token, token.sock    runner writes; bound READ-ONLY at /run/miren/identity
//!   logs/       output.log(.1)       runner writes; never visible inside
//! ```
//!
//! The runner writes only into `identity/` and `logs/` (atomic token
//! replace with an exclusive, unpredictable temporary name; logs through
//! descriptors it opened itself) and removes the whole tree with
//! [`remove_tree`], which never follows symlinks and copes with any depth. With `--isolation none`
//! the sandbox is a plain process of the runner's user and none of this
//! contains it: that mode is for machines without namespaces, and says so.

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Inside a bubblewrap sandbox: the runner's read-only dir (token file and
/// token socket).
pub const INSIDE_IDENTITY: &str = "/run/miren/identity";
/// Inside a bubblewrap sandbox: where the shim binds the app's socket.
pub const INSIDE_EXPOSE: &str = "/run/miren/expose";
/// The token file, in the identity dir.
pub const TOKEN_FILE: &str = "token";
/// The runner's token endpoint for this sandbox, in the identity dir.
pub const TOKEN_SOCKET: &str = "token.sock";
/// The shim's socket to the service, in the expose dir.
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
    pub expose: PathBuf,
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
            expose: root.join("expose"),
            identity: root.join("identity"),
            logs: root.join("logs"),
            root,
        }
    }

    /// Creates them afresh (whatever an earlier sandbox of this id left is
    /// removed first, without following links).
    pub async fn create(&self) -> std::io::Result<()> {
        remove_tree(&self.root).await?;
        for dir in [&self.root, &self.expose, &self.identity, &self.logs] {
            transport::files::ensure_private_dir(dir)?;
        }
        std::fs::create_dir(&self.app)
    }

    /// The app's socket, as an address for [`connect_exposed_socket`].
    pub fn app_socket(&self) -> PathBuf {
        self.expose.join(APP_SOCKET)
    }
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

/// Connects to the Unix socket at `path` only if `path` itself (no
/// symlink) is a socket owned by this process's user: a sandbox can plant
/// anything in its expose dir, so the name is opened `O_PATH|O_NOFOLLOW`,
/// the inode checked (a symlink opens as itself, which is no socket), and
/// the connection made to that inode through `/proc/self/fd`. A missing or wrong entry is an error (a failed health
/// check), never a connection elsewhere.
pub async fn connect_exposed_socket(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = handle.metadata()?;
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if !meta.file_type().is_socket() || meta.uid() != euid {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not the sandbox's socket", path.display()),
        ));
    }
    let through = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let stream = tokio::net::UnixStream::connect(through).await;
    drop(handle);
    stream
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_to_a_real_socket_and_refuses_a_symlink_to_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let real = d.path().join("real.sock");
        let listener = tokio::net::UnixListener::bind(&real).expect("bind");
        assert!(connect_exposed_socket(&real).await.is_ok());
        let (_s, _) = listener.accept().await.expect("accepted");

        let link = d.path().join("app.sock");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        // O_PATH|O_NOFOLLOW opens the link itself, which is no socket.
        let err = connect_exposed_socket(&link)
            .await
            .expect_err("symlink refused");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

        let file = d.path().join("file.sock");
        std::fs::write(&file, b"").expect("file");
        let err = connect_exposed_socket(&file)
            .await
            .expect_err("file refused");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);

        assert!(connect_exposed_socket(&d.path().join("missing"))
            .await
            .is_err());
        // Nothing was connected through the symlink.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), listener.accept()).await;
        assert!(pending.is_err());
    }

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
        for dir in [&dirs.app, &dirs.expose, &dirs.identity, &dirs.logs] {
            assert!(dir.is_dir());
            assert_eq!(std::fs::read_dir(dir).expect("list").count(), 0);
        }
    }
}
