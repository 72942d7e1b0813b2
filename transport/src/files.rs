//! Private files on disk: atomic writes with a mode, private directories.
//!
//! Every component keeps keys on disk (the coordinator's CA and signing
//! keys, a runner's identity, the CLI's client config), and the runner
//! publishes token files to sandboxes. They all write the same way: to a
//! temporary name in the same directory, synced, renamed, so a crash leaves
//! the old file or the new one, never half of either.
//!
//! The temporary name is unpredictable and created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`: a name planted in advance (a symlink, a
//! file, a fifo) makes the write fail instead of redirecting it, so even a
//! directory someone else can write cannot turn the write against another
//! file. (The runner still never writes into a directory a sandbox can
//! write: this is the second wall, not the first.)
//!
//! [`PathError`] is the IO error that names its file, for every side's
//! typed errors.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// An IO error with what was being done and to which path, so that every
/// message names the file (`creating /var/lib/miren-runner: Permission
/// denied`).
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct PathError {
    /// What was being done (`reading`, `writing`, `creating`, `binding`).
    pub action: &'static str,
    /// The file or dir.
    pub path: PathBuf,
    /// Why it failed.
    #[source]
    pub source: std::io::Error,
}

impl PathError {
    /// A `map_err` adapter: `.map_err(PathError::at("reading", &path))`.
    pub fn at<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> PathError + 'a {
        move |source| PathError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Creates `dir` (and parents) and sets it to mode 0700.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// A fresh temporary name beside `path`: `.<name>.tmp-<128 random bits>`.
fn temporary_name(dir: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(
        ".{name}.tmp-{}",
        hex::encode(rand::random::<[u8; 16]>())
    ))
}

/// Writes `bytes` to `path` atomically with the given mode.
///
/// The temporary file is created exclusively and without following
/// symlinks; its mode is set on the open descriptor, never through a path.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temporary_name(dir, path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let result = (|| {
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // We created this name exclusively: it is ours to remove.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Why a 32-byte secret file could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file is not 32 bytes.
    #[error("{path} is corrupt (expected 32 bytes); {remedy}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What deleting it costs.
        remedy: &'static str,
    },
    /// It could not be read or created.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the 32-byte secret at `path`, creating it (random, mode 0600,
/// [`write_atomic`]) the first time. `remedy` tells the operator what
/// deleting a corrupt one costs.
pub fn secret_32(path: &Path, remedy: &'static str) -> Result<[u8; 32], SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::read(path) {
        Ok(b) => <[u8; 32]>::try_from(b.as_slice()).map_err(|_| SecretFileError::Corrupt {
            path: path.to_path_buf(),
            remedy,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k: [u8; 32] = rand::random();
            write_atomic(path, &k, 0o600).map_err(io)?;
            Ok(k)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_the_file_with_its_mode_and_leaves_no_temporary() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("token");
        write_atomic(&p, b"one", 0o644).expect("first write");
        write_atomic(&p, b"two", 0o600).expect("second write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::metadata(&p).expect("meta").mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    }

    #[test]
    fn temporary_names_are_unpredictable() {
        let d = Path::new("/x");
        let a = temporary_name(d, Path::new("/x/token"));
        let b = temporary_name(d, Path::new("/x/token"));
        assert_ne!(a, b);
        let a = a.to_string_lossy().into_owned();
        // 128 random bits and nothing a sandbox could know (the old name
        // was the runner's pid).
        assert!(a.starts_with("/x/.token.tmp-") && a.len() == "/x/.token.tmp-".len() + 32);
    }

    #[test]
    fn a_planted_symlink_never_redirects_the_write() {
        // Every name the writer could use is planted: the old `<pid>` name
        // and a symlink where the file goes. The victim stays untouched.
        let d = tempfile::tempdir().expect("tempdir");
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").expect("victim");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).expect("mode");
        let p = d.path().join("token");
        std::os::unix::fs::symlink(
            &victim,
            d.path().join(format!(".token.tmp-{}", std::process::id())),
        )
        .expect("planted tmp");
        std::os::unix::fs::symlink(&victim, &p).expect("planted target");
        write_atomic(&p, b"tok", 0o644).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(fs::metadata(&victim).expect("meta").mode() & 0o777, 0o600);
        // The symlink at the target name was replaced by our file.
        assert!(fs::symlink_metadata(&p)
            .expect("meta")
            .file_type()
            .is_file());
        assert_eq!(fs::read(&p).expect("token"), b"tok");
    }
}
