//! Where a sandbox's writes go: a size-capped tmpfs over its unpacked app,
//! never the runner's disk.
//!
//! Why: a sandbox's app dir used to be a writable bind of a dir on the
//! runner's data-dir filesystem. An app could fill that disk (bytes or
//! inodes; a sandbox that is host root to the kernel takes ext4's reserved
//! blocks too) and so break every other sandbox's token refreshes, logs and
//! artifact downloads, and the runner's certificate renewals.
//!
//! Now, when the runner may mount (root, the documented setup), each
//! sandbox's app dir is an overlay: the unpacked app below (on disk, never
//! written through the overlay), a tmpfs of its own above, capped in bytes
//! and inodes, which also holds the sandbox's `/tmp` and `/dev/shm` (its
//! `/` and `/dev` are read-only: [`crate::shim::bwrap_command`]), so one cap
//! bounds everything it writes. The tmpfs's pages are charged to the memory
//! cgroup of the process that writes them, the sandbox's, so its writes are
//! bounded twice: `No space left on device` at the cap, and its memory limit
//! before that if it also uses its memory. The runner never resolves a path inside either
//! mount: it makes them before the sandbox starts and detaches them by name
//! (`UMOUNT_NOFOLLOW`) under its own 0700 dir.
//!
//! Where the runner cannot mount, the app dir stays a plain writable bind
//! and the runner says at start that sandboxes' writes are not bounded.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How big a sandbox's writable layer may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchCap {
    /// Bytes of file data.
    pub bytes: u64,
    /// Files, dirs and links.
    pub inodes: u64,
}

/// Fewest inodes a writable layer gets (a language's caches, a few logs).
pub const MIN_INODES: u64 = 4096;
/// Most inodes a writable layer gets.
pub const MAX_INODES: u64 = 1 << 20;
/// Bytes of memory limit per inode granted (an inode and its dentry cost
/// the kernel about 1 KiB, charged to the sandbox too): 131,072 files for
/// the default 512 MiB, enough for a package manager's tree.
const BYTES_PER_INODE: u64 = 4 * 1024;

impl ScratchCap {
    /// The cap of a sandbox whose memory limit is `memory_bytes`: half of it
    /// for what it writes (its app dir, `/tmp`, `/dev/shm`), the other half
    /// for the app itself.
    pub fn for_memory(memory_bytes: u64) -> Self {
        ScratchCap {
            bytes: memory_bytes / 2,
            inodes: (memory_bytes / BYTES_PER_INODE).clamp(MIN_INODES, MAX_INODES),
        }
    }

    /// The tmpfs mount options for this cap.
    fn tmpfs_options(self) -> String {
        format!(
            "size={},nr_inodes={},mode=0700",
            self.bytes.max(4096),
            self.inodes
        )
    }
}

/// Whether this runner can give sandboxes a capped writable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScratchSupport {
    /// It can: tmpfs and overlay mounts work here.
    Capped,
    /// It cannot; why (said at start).
    Uncapped(String),
}

impl ScratchSupport {
    /// Finds out by making (and removing) one capped layer under `dir`, a
    /// dir of the runner's own.
    pub fn detect(dir: &Path) -> Self {
        if let Err(why) = mountable(dir) {
            return ScratchSupport::Uncapped(why.to_string());
        }
        let probe = dir.join(".scratch-probe");
        let layer = Layer::new(&probe);
        let lower = probe.join("lower");
        let result = (|| {
            unmount(&layer);
            let _ = std::fs::remove_dir_all(&probe);
            std::fs::create_dir_all(&lower)?;
            mount(&layer, &lower, ScratchCap::for_memory(1 << 20))
        })();
        unmount(&layer);
        let _ = std::fs::remove_dir_all(&probe);
        match result {
            Ok(()) => ScratchSupport::Capped,
            Err(e) => ScratchSupport::Uncapped(format!("mounting a tmpfs and an overlay: {e}")),
        }
    }
}

/// The paths of one writable layer: `scratch/` (the tmpfs, holding the
/// overlay's `upper/` and `work/` and the sandbox's `tmp/` and `shm/`) and
/// `view/` (the overlay the sandbox sees as its app dir).
#[derive(Debug, Clone)]
pub struct Layer {
    pub scratch: PathBuf,
    pub view: PathBuf,
}

impl Layer {
    /// The layer kept in `root`, a runner-only dir.
    pub fn new(root: &Path) -> Self {
        Layer {
            scratch: root.join("scratch"),
            view: root.join("view"),
        }
    }

    /// The sandbox's `/tmp`, in the tmpfs.
    pub fn tmp(&self) -> PathBuf {
        self.scratch.join("tmp")
    }

    /// The sandbox's `/dev/shm`, in the tmpfs.
    pub fn shm(&self) -> PathBuf {
        self.scratch.join("shm")
    }

    /// The sandbox's `/run`, in the tmpfs.
    pub fn run(&self) -> PathBuf {
        self.scratch.join("run")
    }
}

/// A path overlay's mount options cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the path {0} holds `,`, `:` or `\\`, which overlay mount options cannot carry")]
pub struct Unmountable(PathBuf);

/// Overlay options separate paths with `,` and `:` and escape with `\`:
/// a data dir whose path holds one cannot be named in them.
fn mountable(dir: &Path) -> Result<(), Unmountable> {
    let bytes = dir.as_os_str().as_bytes();
    if bytes.iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
        return Err(Unmountable(dir.to_path_buf()));
    }
    Ok(())
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other(format!("{} holds a NUL byte", path.display())))
}

fn mount_one(source: &str, target: &Path, fstype: &str, options: &str) -> std::io::Result<()> {
    let source = CString::new(source).map_err(std::io::Error::other)?;
    let target_c = c_path(target)?;
    let fstype = CString::new(fstype).map_err(std::io::Error::other)?;
    let options = CString::new(options).map_err(std::io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string we own for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("mounting {source:?} at {}: {e}", target.display()),
        ));
    }
    Ok(())
}

/// Mounts the layer over `lower` (the unpacked app): a tmpfs capped at
/// `cap` at `scratch/`, then the overlay at `view/`. Nothing runs in the
/// sandbox yet, so nothing can race the dirs made here. On failure,
/// whatever was mounted is detached again.
pub fn mount(layer: &Layer, lower: &Path, cap: ScratchCap) -> std::io::Result<()> {
    mountable(lower).map_err(std::io::Error::other)?;
    for dir in [&layer.scratch, &layer.view] {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    mount_one(
        "miren-scratch",
        &layer.scratch,
        "tmpfs",
        &cap.tmpfs_options(),
    )?;
    let upper = layer.scratch.join("upper");
    let work = layer.scratch.join("work");
    let made = [&upper, &work, &layer.tmp(), &layer.shm(), &layer.run()]
        .into_iter()
        .try_for_each(std::fs::create_dir);
    let overlay = made.and_then(|()| {
        mount_one(
            "miren-app",
            &layer.view,
            "overlay",
            &format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ),
        )
    });
    if let Err(e) = overlay {
        unmount(layer);
        return Err(e);
    }
    Ok(())
}

/// Detaches the layer's mounts (the overlay, then the tmpfs; whatever is
/// there). Never follows a link; a path that is no mount point is fine.
pub fn unmount(layer: &Layer) {
    for path in [&layer.view, &layer.scratch] {
        let Ok(c) = c_path(path) else { continue };
        // A mount stacked by an interrupted earlier start is detached too.
        for _ in 0..4 {
            // SAFETY: umount2 with a NUL-terminated path we own.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
            if rc != 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_gets_half_the_memory_limit_and_inodes_in_proportion() {
        let cap = ScratchCap::for_memory(512 << 20);
        assert_eq!(cap.bytes, 256 << 20);
        assert_eq!(cap.inodes, 131_072);
        // Floors and ceilings of inodes.
        assert_eq!(ScratchCap::for_memory(16 << 20).inodes, MIN_INODES);
        assert_eq!(ScratchCap::for_memory(1 << 40).inodes, MAX_INODES);
        assert_eq!(
            ScratchCap::for_memory(128 << 20).tmpfs_options(),
            "size=67108864,nr_inodes=32768,mode=0700"
        );
    }

    #[test]
    fn paths_overlay_options_cannot_carry_are_refused() {
        assert!(mountable(Path::new("/var/lib/miren-runner")).is_ok());
        for bad in ["/data/a,b", "/data/a:b", "/data/a\\b"] {
            let err = mountable(Path::new(bad)).expect_err(bad);
            assert!(err.to_string().contains("overlay mount options"), "{err}");
        }
    }

    /// Needs root (mounts); where the runner cannot mount, detection says
    /// why instead.
    #[test]
    fn writes_through_the_view_stay_in_the_capped_tmpfs() {
        let d = tempfile::tempdir().expect("tempdir");
        if let ScratchSupport::Uncapped(why) = ScratchSupport::detect(d.path()) {
            assert!(why.contains("mounting"), "{why}");
            return;
        }
        let lower = d.path().join("app");
        std::fs::create_dir(&lower).expect("lower");
        std::fs::write(lower.join("main.py"), "print('hi')").expect("app file");
        let layer = Layer::new(d.path());
        mount(
            &layer,
            &lower,
            ScratchCap {
                bytes: 1 << 20,
                inodes: 64,
            },
        )
        .expect("mounted");
        // The app is there; writes land above it, never in it.
        assert_eq!(
            std::fs::read_to_string(layer.view.join("main.py")).expect("read"),
            "print('hi')"
        );
        std::fs::write(layer.view.join("main.py"), "changed").expect("copy-up");
        std::fs::write(layer.view.join("new"), "x").expect("new file");
        assert_eq!(
            std::fs::read_to_string(lower.join("main.py")).expect("lower"),
            "print('hi')"
        );
        assert!(!lower.join("new").exists());
        // Bytes over the cap: no space left.
        let big = vec![0u8; 2 << 20];
        let err = std::fs::write(layer.view.join("big"), &big).expect_err("over the cap");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        // Inodes over the cap: no space left either.
        let mut refused = None;
        for i in 0..100 {
            if let Err(e) = std::fs::write(layer.view.join(format!("f{i}")), "") {
                refused = Some(e);
                break;
            }
        }
        let err = refused.expect("inodes run out");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        unmount(&layer);
        assert!(!layer.view.join("new").exists(), "the view is gone");
        assert!(!layer.scratch.join("upper").exists(), "the tmpfs is gone");
        std::fs::remove_dir(&layer.view).expect("view is an empty dir again");
    }
}
