//! Packing an app directory into a `.tar.gz` for upload.
//!
//! What goes in: every file and directory under the app directory, hidden
//! ones included, except what `.gitignore` or `.mirenignore` files *inside the
//! directory* exclude (honoured with or without a git repository; a
//! `.mirenignore` can re-include with `!pattern` what a `.gitignore`
//! excludes) and except anything named `.git`. Parent directories' ignore
//! files, the global git excludes and `.git/info/exclude` are not consulted,
//! so the artifact depends only on the tree itself.
//!
//! The output is deterministic: entries sorted by path, mtime 0, uid/gid 0,
//! no user/group names, mode 0o755 for anything executable and 0o644
//! otherwise (directories 0o755), gzip header without mtime or name. The same
//! tree always gives the same bytes and so the same SHA-256.
//!
//! Symlinks are stored as symlinks. One whose target is absolute or leaves the
//! directory is refused, as is one using `..` after a name (`a/../x`): the
//! runner refuses those too, since `a` could itself be a symlink. Sockets,
//! FIFOs and device files are skipped.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flate2::{Compression, GzBuilder};
use ignore::WalkBuilder;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// A packed app.
#[derive(Debug, Clone)]
pub struct Packed {
    /// The `.tar.gz`.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, lowercase hex.
    pub sha256_hex: String,
    /// Regular files and symlinks packed (directories not counted).
    pub files: usize,
}

/// Gzip's "unknown" operating system, fixed so the bytes do not depend on the
/// machine that packed them.
const GZIP_OS_UNKNOWN: u8 = 255;

enum Item {
    Dir,
    File { executable: bool },
    Symlink { target: PathBuf },
}

/// Pack `dir` (see the module docs for what is included and how).
pub fn pack_dir(dir: &Path) -> anyhow::Result<Packed> {
    let meta = fs::metadata(dir).with_context(|| format!("app directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let root = dir
        .canonicalize()
        .with_context(|| format!("app directory {}", dir.display()))?;

    let mut items = collect(&root, dir)?;
    // `Path`'s order compares component by component: deterministic, and a
    // directory always comes before what it contains.
    items.sort_by(|a, b| a.0.cmp(&b.0));

    let gz = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS_UNKNOWN)
        .write(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut files = 0;
    for (rel, item) in &items {
        let shown = rel.display();
        match item {
            Item::Dir => {
                let mut h = header(EntryType::Directory, 0o755, 0);
                tar.append_data(&mut h, rel, io::empty())
                    .with_context(|| format!("packing {shown}"))?;
            }
            Item::File { executable } => {
                let data = fs::read(root.join(rel)).with_context(|| format!("reading {shown}"))?;
                let mode = if *executable { 0o755 } else { 0o644 };
                let mut h = header(EntryType::Regular, mode, data.len() as u64);
                tar.append_data(&mut h, rel, data.as_slice())
                    .with_context(|| format!("packing {shown}"))?;
                files += 1;
            }
            Item::Symlink { target } => {
                let mut h = header(EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut h, rel, target)
                    .with_context(|| format!("packing {shown}"))?;
                files += 1;
            }
        }
    }
    let bytes = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .context("finishing the archive")?;
    let sha256_hex = hex::encode(Sha256::digest(&bytes));
    Ok(Packed {
        bytes,
        sha256_hex,
        files,
    })
}

/// Walk `root` (the canonical form of `shown_root`, which is what error
/// messages name) and classify everything that is not ignored.
fn collect(root: &Path, shown_root: &Path) -> anyhow::Result<Vec<(PathBuf, Item)>> {
    let mut walk = WalkBuilder::new(root);
    walk.hidden(false)
        .parents(false)
        .ignore(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .follow_links(false)
        .add_custom_ignore_filename(".mirenignore")
        .filter_entry(|e| e.file_name() != OsStr::new(".git"));

    let mut items = Vec::new();
    for entry in walk.build() {
        let entry = entry.with_context(|| format!("walking {}", shown_root.display()))?;
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .with_context(|| format!("{} is outside {}", path.display(), root.display()))?
            .to_path_buf();
        let shown = shown_root.join(&rel);
        let meta = fs::symlink_metadata(path).with_context(|| format!("{}", shown.display()))?;
        let kind = meta.file_type();
        let item = if kind.is_dir() {
            Item::Dir
        } else if kind.is_file() {
            Item::File {
                executable: meta.permissions().mode() & 0o111 != 0,
            }
        } else if kind.is_symlink() {
            let target =
                fs::read_link(path).with_context(|| format!("reading link {}", shown.display()))?;
            check_link(&rel, &target).with_context(|| {
                format!(
                    "refusing symlink {} -> {}",
                    shown.display(),
                    target.display()
                )
            })?;
            Item::Symlink { target }
        } else {
            tracing::debug!(path = %shown.display(), "skipping socket, FIFO or device file");
            continue;
        };
        items.push((rel, item));
    }
    Ok(items)
}

/// The same rule the runner applies when unpacking: the target is relative,
/// and resolved from the link's directory it stays inside the app directory,
/// with `..` only as a leading run.
fn check_link(rel: &Path, target: &Path) -> anyhow::Result<()> {
    let bytes = target.as_os_str().as_bytes();
    if bytes.first() == Some(&b'/') {
        bail!("it points outside the app directory (absolute target)");
    }
    let mut depth = rel.components().count().saturating_sub(1);
    let mut seen_name = false;
    for part in bytes.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if seen_name => {
                bail!("`..` after a directory name in a link target is not supported")
            }
            b".." => {
                if depth == 0 {
                    bail!("it points outside the app directory");
                }
                depth -= 1;
            }
            _ => seen_name = true,
        }
    }
    Ok(())
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::time::{Duration, SystemTime};

    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    fn chmod(root: &Path, rel: &str, mode: u32) {
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Dir,
        File(u32, String),
        Link(String),
    }

    /// Decode a packed archive into path -> entry, checking the
    /// deterministic header fields on the way.
    fn entries(packed: &Packed) -> BTreeMap<String, Got> {
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(packed.bytes.as_slice()));
        let mut out = BTreeMap::new();
        let mut order = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 0);
            assert_eq!(h.uid().unwrap(), 0);
            assert_eq!(h.gid().unwrap(), 0);
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            let path = e.path().unwrap().display().to_string();
            let mode = h.mode().unwrap();
            let got = match h.entry_type() {
                EntryType::Directory => {
                    assert_eq!(mode, 0o755);
                    Got::Dir
                }
                EntryType::Regular => {
                    let mut s = String::new();
                    e.read_to_string(&mut s).unwrap();
                    Got::File(mode, s)
                }
                EntryType::Symlink => {
                    Got::Link(e.link_name().unwrap().unwrap().display().to_string())
                }
                other => panic!("unexpected {other:?} for {path}"),
            };
            order.push(path.clone());
            out.insert(path, got);
        }
        let mut sorted = order.clone();
        sorted.sort_by(|a, b| Path::new(a).cmp(Path::new(b)));
        assert_eq!(order, sorted, "entries are sorted");
        out
    }

    fn paths(packed: &Packed) -> Vec<String> {
        entries(packed).into_keys().collect()
    }

    #[test]
    fn ignored_files_are_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "app.py", "print('hi')");
        write(d, ".gitignore", "*.log\nbuild/\n");
        write(d, "debug.log", "noise");
        write(d, "build/out.bin", "artifact");
        write(d, ".mirenignore", "secrets.txt\n!keep.log\n");
        write(d, "secrets.txt", "hunter2");
        write(d, "keep.log", "re-included by .mirenignore");
        write(d, "sub/.gitignore", "local.cfg\n");
        write(d, "sub/local.cfg", "mine");
        write(d, "sub/shared.cfg", "ours");
        write(d, "sub/nested/.mirenignore", "*.tmp\n");
        write(d, "sub/nested/a.tmp", "x");
        write(d, "sub/nested/a.txt", "y");
        write(d, ".env.example", "hidden files are included");
        write(d, ".miren/app.toml", "name = \"demo\"\n");

        let packed = pack_dir(d).unwrap();
        assert_eq!(
            paths(&packed),
            vec![
                ".env.example",
                ".gitignore",
                ".miren",
                ".miren/app.toml",
                ".mirenignore",
                "app.py",
                "keep.log",
                "sub",
                "sub/.gitignore",
                "sub/nested",
                "sub/nested/.mirenignore",
                "sub/nested/a.txt",
                "sub/shared.cfg",
            ]
        );
        assert_eq!(packed.files, 10);
        assert_eq!(
            entries(&packed)["app.py"],
            Got::File(0o644, "print('hi')".into())
        );
    }

    #[test]
    fn git_directory_is_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "main.go", "package main");
        write(d, ".git/HEAD", "ref: refs/heads/main\n");
        write(d, ".git/config", "[core]\n");
        write(d, ".git/objects/ab/cdef", "blob");
        // A submodule's `.git` is a file.
        write(d, "vendor/lib/.git", "gitdir: ../../.git/modules/lib\n");
        write(d, "vendor/lib/lib.go", "package lib");
        // With a `.git` directory present, `.gitignore` applies as usual.
        write(d, ".gitignore", "*.secret\n");
        write(d, "x.secret", "no");

        let packed = pack_dir(d).unwrap();
        assert_eq!(
            paths(&packed),
            vec![
                ".gitignore",
                "main.go",
                "vendor",
                "vendor/lib",
                "vendor/lib/lib.go"
            ]
        );
    }

    fn sample_tree(d: &Path, reverse: bool) {
        let mut files = vec![
            ("a.txt", "alpha"),
            ("b/c.txt", "gamma"),
            ("b/d/e.txt", "epsilon"),
            ("z.sh", "#!/bin/sh\n"),
            ("a.b/x", "dot dir"),
        ];
        if reverse {
            files.reverse();
        }
        for (rel, data) in files {
            write(d, rel, data);
        }
        chmod(d, "z.sh", 0o700);
        std::os::unix::fs::symlink("b/c.txt", d.join("link")).unwrap();
    }

    #[test]
    fn packing_is_deterministic() {
        let one = tempfile::tempdir().unwrap();
        sample_tree(one.path(), false);
        let first = pack_dir(one.path()).unwrap();
        let again = pack_dir(one.path()).unwrap();
        assert_eq!(first.sha256_hex, again.sha256_hex);
        assert_eq!(first.bytes, again.bytes);
        assert_eq!(first.sha256_hex.len(), 64);
        assert_eq!(
            first.sha256_hex,
            hex::encode(Sha256::digest(&first.bytes)),
            "sha256_hex is the digest of the bytes"
        );

        // The same tree created in another order, at another time, with other
        // mtimes, elsewhere: the same bytes.
        let two = tempfile::tempdir().unwrap();
        sample_tree(two.path(), true);
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        fs::File::options()
            .write(true)
            .open(two.path().join("a.txt"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        chmod(two.path(), "a.txt", 0o600);
        let other = pack_dir(two.path()).unwrap();
        assert_eq!(first.sha256_hex, other.sha256_hex);

        // A change in content changes the digest.
        write(two.path(), "a.txt", "ALPHA");
        assert_ne!(pack_dir(two.path()).unwrap().sha256_hex, first.sha256_hex);
    }

    #[test]
    fn the_runner_unpacks_what_we_pack() {
        let src = tempfile::tempdir().unwrap();
        sample_tree(src.path(), false);
        std::os::unix::fs::symlink("../../a.txt", src.path().join("b/d/up")).unwrap();
        let packed = pack_dir(src.path()).unwrap();

        let dest = tempfile::tempdir().unwrap();
        let stats = runner::unpack::unpack(
            packed.bytes.as_slice(),
            dest.path(),
            &runner::unpack::Limits::default(),
        )
        .unwrap();
        assert_eq!((stats.files + stats.symlinks) as usize, packed.files);
        let d = dest.path();
        assert_eq!(fs::read_to_string(d.join("b/d/e.txt")).unwrap(), "epsilon");
        assert_eq!(fs::read_to_string(d.join("b/d/up")).unwrap(), "alpha");
        assert_eq!(fs::read_link(d.join("link")).unwrap(), Path::new("b/c.txt"));
        let mode = fs::metadata(d.join("z.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn executable_bit_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "run.sh", "#!/bin/sh\n");
        write(d, "data.txt", "d");
        write(d, "group-exec", "g");
        chmod(d, "run.sh", 0o700);
        chmod(d, "data.txt", 0o600);
        chmod(d, "group-exec", 0o4650);

        let got = entries(&pack_dir(d).unwrap());
        assert_eq!(got["run.sh"], Got::File(0o755, "#!/bin/sh\n".into()));
        assert_eq!(got["data.txt"], Got::File(0o644, "d".into()));
        assert_eq!(got["group-exec"], Got::File(0o755, "g".into()));
    }

    #[test]
    fn in_tree_symlinks_are_stored_as_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "lib/real.txt", "real");
        std::os::unix::fs::symlink("lib/real.txt", d.join("top")).unwrap();
        std::os::unix::fs::symlink("../lib", d.join("lib/self")).unwrap();
        std::os::unix::fs::symlink("missing", d.join("dangling")).unwrap();
        std::os::unix::fs::symlink(".", d.join("here")).unwrap();

        let packed = pack_dir(d).unwrap();
        let got = entries(&packed);
        assert_eq!(got["top"], Got::Link("lib/real.txt".into()));
        assert_eq!(got["lib/self"], Got::Link("../lib".into()));
        assert_eq!(got["dangling"], Got::Link("missing".into()));
        assert_eq!(got["here"], Got::Link(".".into()));
        assert_eq!(packed.files, 5);
        assert!(!got.contains_key("here/lib"), "symlinks are not followed");
    }

    #[test]
    fn escaping_symlink_is_refused() {
        for target in ["../outside", "/etc/passwd", "sub/../../x"] {
            let tmp = tempfile::tempdir().unwrap();
            let d = tmp.path().join("app");
            write(&d, "sub/ok.txt", "ok");
            std::os::unix::fs::symlink(target, d.join("sub/evil")).unwrap();
            // One level down, `../outside` would still be inside: put the
            // link at the top for the first case.
            let link = if target == "../outside" {
                fs::rename(d.join("sub/evil"), d.join("evil")).unwrap();
                "evil"
            } else {
                "sub/evil"
            };
            let err = format!("{:#}", pack_dir(&d).unwrap_err());
            assert!(err.contains(link), "{err}");
            assert!(err.contains(target), "{err}");
            assert!(err.contains("refusing symlink"), "{err}");
        }
    }

    #[test]
    fn sockets_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "a.txt", "a");
        let _listener = std::os::unix::net::UnixListener::bind(d.join("app.sock")).unwrap();
        assert_eq!(paths(&pack_dir(d).unwrap()), vec!["a.txt"]);
    }

    #[test]
    fn not_a_directory_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "f", "x");
        let err = pack_dir(&tmp.path().join("f")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(pack_dir(&tmp.path().join("missing")).is_err());
    }
}
