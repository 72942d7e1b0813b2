//! Unpacking an app artifact (a `.tar.gz`) into a fresh directory, safely.
//!
//! The archive is untrusted input. We iterate its entries ourselves and
//! enforce every rule in our code rather than relying on `tar`'s unpacker:
//!
//! - entry paths must be relative, without `..`, without NUL and not empty
//!   (a bare `.`/`./` directory entry, naming `dest` itself, is accepted and
//!   skipped);
//! - only regular files, directories and symlinks are created; hard links,
//!   device files, FIFOs and every other entry type are refused;
//! - a symlink's target must be relative and stay inside `dest` when resolved
//!   lexically from the link's directory; `..` is only accepted as a leading
//!   run (`../../lib/x`), never after a name (`a/../..`), because the kernel
//!   resolves `a/..` physically and `a` may itself be a symlink;
//! - no entry is ever written through a symlink: every parent component is
//!   checked with `symlink_metadata`, files are created with `create_new`
//!   (`O_EXCL`, which does not follow a final symlink) and directories with
//!   `mkdir` (which does not either);
//! - decompressed bytes are metered as they are read, never trusting header
//!   sizes alone: per file, in total, and for the metadata (headers, long
//!   names, pax records, skipped data) in front of each entry — so a gzip bomb
//!   stops after at most the configured amount of output;
//! - file modes are reduced to 0o755 (any execute bit set) or 0o644; no
//!   setuid/setgid/sticky bits, no ownership, no mtimes; directories are 0o755.
//!
//! `dest` must exist and be empty. On any error everything written under
//! `dest` is removed again, so a failed unpack leaves an empty directory.

use std::cell::Cell;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::GzDecoder;
use tar::EntryType;

/// Caps on what one archive may unpack to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Sum of all regular files' sizes, counted as bytes are read.
    pub max_total_bytes: u64,
    /// Number of archive entries (files, directories, links, metadata).
    pub max_entries: u64,
    /// Size of any one regular file, counted as bytes are read.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 1 << 30,
            max_entries: 100_000,
            max_file_bytes: 512 << 20,
        }
    }
}

/// What an unpack created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created (explicit entries and implied parents).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes written to regular files.
    pub bytes: u64,
}

/// Which cap an archive ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// [`Limits::max_file_bytes`].
    FileSize,
    /// [`Limits::max_total_bytes`].
    TotalSize,
    /// Metadata in front of one entry (headers, long names, pax records,
    /// data of non-file entries): [`METADATA_PER_ENTRY`].
    EntryMetadata,
    /// Metadata over the whole archive: [`metadata_budget`].
    TotalMetadata,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::FileSize => "file size",
            LimitKind::TotalSize => "total unpacked size",
            LimitKind::EntryMetadata => "metadata for one entry",
            LimitKind::TotalMetadata => "archive metadata in total",
        })
    }
}

/// Why an archive was refused. Every refusal leaves `dest` empty.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("destination {}: {reason}", path.display())]
    Destination { path: PathBuf, reason: &'static str },
    #[error("archive entry has an empty path")]
    EmptyPath,
    #[error("entry `{0}`: path contains a NUL byte")]
    NulInPath(String),
    #[error("entry `{0}`: absolute paths are not allowed")]
    AbsolutePath(String),
    #[error("entry `{0}`: `..` path components are not allowed")]
    ParentTraversal(String),
    #[error("entry `{path}`: symlink target `{target}` points outside the destination")]
    LinkEscapes { path: String, target: String },
    #[error("entry `{path}`: symlink target `{target}` is not allowed: {reason}")]
    BadLinkTarget {
        path: String,
        target: String,
        reason: &'static str,
    },
    #[error("entry `{0}`: hard links are not allowed")]
    HardLink(String),
    #[error("entry `{0}`: device files and FIFOs are not allowed")]
    DeviceOrFifo(String),
    #[error("entry `{path}`: unsupported entry type {kind}")]
    Unsupported { path: String, kind: String },
    #[error("entry `{path}`: `{parent}` is a symlink; refusing to write through it")]
    ThroughSymlink { path: String, parent: String },
    #[error("entry `{path}`: {reason}")]
    Conflict { path: String, reason: &'static str },
    #[error("{at}: {limit} exceeds the limit of {max} bytes")]
    TooLarge {
        /// Which entry (or the metadata after which entry).
        at: String,
        limit: LimitKind,
        max: u64,
    },
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("corrupt archive: {0}")]
    Corrupt(#[source] Corruption),
    #[error("I/O error at {at}: {source}")]
    Io {
        at: String,
        #[source]
        source: io::Error,
    },
}

/// How an archive is broken (not unsafe: unreadable).
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    /// The compressed stream or the tar structure could not be read.
    #[error("{at}: {source}")]
    Stream {
        /// Where in the archive.
        at: String,
        /// What the reader said.
        #[source]
        source: io::Error,
    },
    /// An entry's mode field does not parse.
    #[error("entry `{entry}`: {source}")]
    Mode {
        /// The entry.
        entry: String,
        /// What the tar reader said.
        #[source]
        source: io::Error,
    },
    /// An entry holds fewer bytes than its header declares.
    #[error("entry `{entry}`: truncated ({written} of {declared} bytes)")]
    Truncated {
        /// The entry.
        entry: String,
        /// Bytes it held.
        written: u64,
        /// Bytes its header declared.
        declared: u64,
    },
    /// Data follows the end of the archive.
    #[error("more than {limit} bytes of data after the end of the archive")]
    TrailingData {
        /// How much trailing data is read through before giving up.
        limit: u64,
    },
}

/// Metadata bytes allowed in front of one entry: its header, GNU long
/// name/link entries, pax records, the padding of the previous file and any
/// data of a non-file entry (which is skipped, never written).
pub const METADATA_PER_ENTRY: u64 = 64 << 10;

/// Decompressed bytes allowed after the end-of-archive marker (tar writers pad
/// to a 10 KiB record); reading them to the end lets gzip check its CRC.
const TRAILER_BUDGET: u64 = 1 << 20;

const COPY_BUFFER: usize = 64 << 10;

/// Metadata allowed over the whole archive: 4 KiB per permitted entry plus
/// 16 MiB (a legitimate entry needs about 1 KiB, 2–3 with a long name).
pub fn metadata_budget(limits: &Limits) -> u64 {
    limits
        .max_entries
        .saturating_mul(4 << 10)
        .saturating_add(16 << 20)
}

/// Unpack the gzip-compressed tar `archive` into `dest` (which must exist and
/// be empty), enforcing the rules in the module docs. On error, `dest` is
/// emptied again (unless the error is about `dest` itself).
pub fn unpack(
    archive: impl Read,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    check_dest(dest)?;
    let meter = Rc::new(MeterState::default());
    let gz = GzDecoder::new(SourceGuard {
        inner: archive,
        state: meter.clone(),
    });
    let result = unpack_tar(gz, dest, limits, meter);
    if result.is_err() {
        clear_dir(dest);
    }
    result
}

/// Like [`unpack`] for an uncompressed tar stream (tests meter the stream).
#[cfg(test)]
fn unpack_uncompressed(
    tar_stream: impl Read,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    check_dest(dest)?;
    let result = unpack_tar(tar_stream, dest, limits, Rc::default());
    if result.is_err() {
        clear_dir(dest);
    }
    result
}

fn check_dest(dest: &Path) -> Result<(), UnpackError> {
    let bad = |reason| UnpackError::Destination {
        path: dest.to_path_buf(),
        reason,
    };
    match fs::metadata(dest) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad("is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(bad("does not exist")),
        Err(e) => return Err(io_err(dest.display(), e)),
    }
    let mut listing = fs::read_dir(dest).map_err(|e| io_err(dest.display(), e))?;
    if listing.next().is_some() {
        return Err(bad("is not empty"));
    }
    Ok(())
}

/// Remove everything under `dest` (which was empty before we started, so all
/// of it is ours). Never follows symlinks: `DirEntry::file_type` does not, and
/// `remove_dir_all` does not either.
fn clear_dir(dest: &Path) {
    let listing = match fs::read_dir(dest) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dest = %dest.display(), "cleaning up after a failed unpack: {e}");
            return;
        }
    };
    for entry in listing {
        let result = entry.and_then(|entry| {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            }
        });
        if let Err(e) = result {
            tracing::warn!(dest = %dest.display(), "cleaning up after a failed unpack: {e}");
        }
    }
}

/// Shared between the reader layers and the unpack loop: how many
/// decompressed bytes were read, how many may be read, and what went wrong.
#[derive(Default)]
struct MeterState {
    consumed: Cell<u64>,
    allowed: Cell<u64>,
    limit: Cell<Option<(LimitKind, u64)>>,
    tripped: Cell<bool>,
    source_failed: Cell<bool>,
}

impl MeterState {
    /// Allow `room` more bytes from now on; running past them is reported as
    /// `kind` with limit `max`.
    fn allow(&self, room: u64, kind: LimitKind, max: u64) {
        self.allowed.set(self.consumed.get().saturating_add(room));
        self.limit.set(Some((kind, max)));
    }
}

/// Records whether the caller's reader (rather than the data) failed.
struct SourceGuard<R> {
    inner: R,
    state: Rc<MeterState>,
}

impl<R: Read> Read for SourceGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        if let Err(e) = &r {
            if e.kind() != io::ErrorKind::Interrupted {
                self.state.source_failed.set(true);
            }
        }
        r
    }
}

/// Meters the decompressed tar stream: `tar` reads headers and data straight
/// from it, without buffering, so every byte it consumes is counted here.
struct Meter<R> {
    inner: R,
    state: Rc<MeterState>,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.state.allowed.get() - self.state.consumed.get();
        if room == 0 {
            self.state.tripped.set(true);
            return Err(io::Error::other("decompressed size limit reached"));
        }
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.state
            .consumed
            .set(self.state.consumed.get() + n as u64);
        Ok(n)
    }
}

/// Map an error from reading the archive stream.
fn stream_err(state: &MeterState, e: io::Error, at: String) -> UnpackError {
    if state.source_failed.get() {
        UnpackError::Io {
            at: "the archive input".into(),
            source: e,
        }
    } else if state.tripped.get() {
        let (limit, max) = state.limit.get().unwrap_or((LimitKind::TotalMetadata, 0));
        UnpackError::TooLarge { at, limit, max }
    } else {
        UnpackError::Corrupt(Corruption::Stream { at, source: e })
    }
}

fn io_err(at: impl fmt::Display, source: io::Error) -> UnpackError {
    UnpackError::Io {
        at: format!("`{at}`"),
        source,
    }
}

/// A name for messages: lossy UTF-8 with control characters (NUL, newlines,
/// escape sequences) escaped.
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn unpack_tar<R: Read>(
    stream: R,
    dest: &Path,
    limits: &Limits,
    state: Rc<MeterState>,
) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(Meter {
        inner: stream,
        state: state.clone(),
    });
    let mut stats = UnpackStats::default();
    let metadata_max = metadata_budget(limits);
    let mut metadata_used = 0u64;
    let mut count = 0u64;
    let mut last = String::new();
    {
        let mut entries = archive
            .entries()
            .map_err(|e| stream_err(&state, e, "the archive".into()))?;
        loop {
            let where_ = || {
                if last.is_empty() {
                    "the first archive header".to_string()
                } else {
                    format!("the archive header after entry `{last}`")
                }
            };
            let left = metadata_max - metadata_used;
            if left < METADATA_PER_ENTRY {
                state.allow(left, LimitKind::TotalMetadata, metadata_max);
            } else {
                state.allow(
                    METADATA_PER_ENTRY,
                    LimitKind::EntryMetadata,
                    METADATA_PER_ENTRY,
                );
            }
            let before = state.consumed.get();
            let next = entries.next();
            metadata_used += state.consumed.get() - before;
            let mut entry = match next {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(stream_err(&state, e, where_())),
            };
            count += 1;
            if count > limits.max_entries {
                return Err(UnpackError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
            let kind = entry.header().entry_type();
            if kind == EntryType::XGlobalHeader {
                // pax global metadata (e.g. `git archive`'s commit id): nothing
                // to create; its data is skipped within the metadata budget.
                continue;
            }
            let raw_path = entry.path_bytes().into_owned();
            let name = lossy(&raw_path);
            let rel = entry_path(&raw_path)?;
            last = name.clone();
            match kind {
                EntryType::Regular | EntryType::Continuous => {
                    if rel.as_os_str().is_empty() {
                        return Err(UnpackError::EmptyPath);
                    }
                    let mode = entry.header().mode().map_err(|source| {
                        UnpackError::Corrupt(Corruption::Mode {
                            entry: name.clone(),
                            source,
                        })
                    })?;
                    let declared = entry.size();
                    let full = prepare_parents(dest, &rel, &name, &mut stats)?;
                    write_file(
                        &mut entry, declared, mode, &full, &name, limits, &mut stats, &state,
                    )?;
                }
                EntryType::Directory => {
                    if rel.as_os_str().is_empty() {
                        // `.` or `./`: `dest` itself.
                        continue;
                    }
                    let full = prepare_parents(dest, &rel, &name, &mut stats)?;
                    make_dir(&full, &name, &mut stats)?;
                }
                EntryType::Symlink => {
                    if rel.as_os_str().is_empty() {
                        return Err(UnpackError::EmptyPath);
                    }
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    check_link_target(&rel, &name, &target)?;
                    let full = prepare_parents(dest, &rel, &name, &mut stats)?;
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full).map_err(|e| {
                        match e.kind() {
                            io::ErrorKind::AlreadyExists => UnpackError::Conflict {
                                path: name.clone(),
                                reason: "an earlier entry has the same path",
                            },
                            _ => io_err(&name, e),
                        }
                    })?;
                    stats.symlinks += 1;
                }
                EntryType::Link => return Err(UnpackError::HardLink(name)),
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    return Err(UnpackError::DeviceOrFifo(name))
                }
                other => {
                    return Err(UnpackError::Unsupported {
                        path: name,
                        kind: match other {
                            EntryType::GNUSparse => "GNU sparse file".to_string(),
                            _ => format!("`{}`", other.as_byte().escape_ascii()),
                        },
                    })
                }
            }
        }
    }
    // Read what follows the end-of-archive marker to the end, so that gzip
    // verifies its checksum and length: a damaged or truncated artifact is
    // refused rather than half-trusted.
    state.allow(TRAILER_BUDGET, LimitKind::TotalMetadata, TRAILER_BUDGET);
    let mut rest = archive.into_inner();
    if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
        if state.tripped.get() && !state.source_failed.get() {
            return Err(UnpackError::Corrupt(Corruption::TrailingData {
                limit: TRAILER_BUDGET,
            }));
        }
        return Err(stream_err(&state, e, "the end of the archive".into()));
    }
    Ok(stats)
}

/// Validate an entry path and turn it into a relative path of normal
/// components (empty for `.`).
fn entry_path(raw: &[u8]) -> Result<PathBuf, UnpackError> {
    if raw.is_empty() {
        return Err(UnpackError::EmptyPath);
    }
    if raw.contains(&0) {
        return Err(UnpackError::NulInPath(lossy(raw)));
    }
    if raw[0] == b'/' {
        return Err(UnpackError::AbsolutePath(lossy(raw)));
    }
    let mut rel = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(UnpackError::ParentTraversal(lossy(raw))),
            name => rel.push(OsStr::from_bytes(name)),
        }
    }
    Ok(rel)
}

/// A symlink at `rel` (relative to `dest`) may point at `target` only if the
/// target is relative and, resolved lexically from the link's directory,
/// stays inside `dest`. `..` must come before any name: the link's directory
/// and its ancestors are real directories (we never write through symlinks),
/// so going up is resolved the same way by the kernel, while `name/..` would
/// go up from wherever `name` points if it is a symlink.
fn check_link_target(rel: &Path, name: &str, target: &[u8]) -> Result<(), UnpackError> {
    let bad = |reason| UnpackError::BadLinkTarget {
        path: name.to_string(),
        target: lossy(target),
        reason,
    };
    if target.is_empty() {
        return Err(bad("the target is empty"));
    }
    if target.contains(&0) {
        return Err(bad("the target contains a NUL byte"));
    }
    let escapes = || UnpackError::LinkEscapes {
        path: name.to_string(),
        target: lossy(target),
    };
    if target[0] == b'/' {
        return Err(escapes());
    }
    // Depth of the link's directory below `dest`.
    let mut depth = rel.components().count().saturating_sub(1);
    let mut seen_name = false;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if seen_name => {
                return Err(bad(
                    "`..` after a name could resolve through another symlink",
                ))
            }
            b".." => {
                if depth == 0 {
                    return Err(escapes());
                }
                depth -= 1;
            }
            _ => seen_name = true,
        }
    }
    Ok(())
}

/// Make sure every parent of `rel` under `dest` is a real directory (creating
/// missing ones) and return the full path of `rel`. Refuses to go through a
/// symlink or a non-directory.
fn prepare_parents(
    dest: &Path,
    rel: &Path,
    name: &str,
    stats: &mut UnpackStats,
) -> Result<PathBuf, UnpackError> {
    let mut full = dest.to_path_buf();
    let mut parent_rel = PathBuf::new();
    let mut parts = rel.iter().peekable();
    while let Some(part) = parts.next() {
        full.push(part);
        if parts.peek().is_none() {
            break;
        }
        parent_rel.push(part);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink {
                    path: name.to_string(),
                    parent: parent_rel.display().to_string(),
                })
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(UnpackError::Conflict {
                    path: name.to_string(),
                    reason: "a parent path is not a directory",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dir(&full).map_err(|e| io_err(parent_rel.display(), e))?;
                stats.dirs += 1;
            }
            Err(e) => return Err(io_err(parent_rel.display(), e)),
        }
    }
    Ok(full)
}

fn create_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    // Not subject to the umask.
    fs::set_permissions(path, Permissions::from_mode(0o755))
}

fn make_dir(full: &Path, name: &str, stats: &mut UnpackStats) -> Result<(), UnpackError> {
    match fs::symlink_metadata(full) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(_) => Err(UnpackError::Conflict {
            path: name.to_string(),
            reason: "an earlier entry with this path is not a directory",
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_dir(full).map_err(|e| io_err(name, e))?;
            stats.dirs += 1;
            Ok(())
        }
        Err(e) => Err(io_err(name, e)),
    }
}

#[allow(clippy::too_many_arguments)]
fn write_file(
    entry: &mut impl Read,
    declared: u64,
    mode: u32,
    full: &Path,
    name: &str,
    limits: &Limits,
    stats: &mut UnpackStats,
    state: &MeterState,
) -> Result<(), UnpackError> {
    let total_left = limits.max_total_bytes.saturating_sub(stats.bytes);
    let (cap, kind, max) = if limits.max_file_bytes <= total_left {
        (
            limits.max_file_bytes,
            LimitKind::FileSize,
            limits.max_file_bytes,
        )
    } else {
        (total_left, LimitKind::TotalSize, limits.max_total_bytes)
    };
    let too_large = || UnpackError::TooLarge {
        at: format!("entry `{name}`"),
        limit: kind,
        max,
    };
    // Fail fast on what the header declares; what is actually read is counted
    // below (and by the meter) regardless.
    if declared > cap {
        return Err(too_large());
    }
    state.allow(declared, kind, max);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(full)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => UnpackError::Conflict {
                path: name.to_string(),
                reason: "an earlier entry has the same path",
            },
            _ => io_err(name, e),
        })?;
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut written = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_err(state, e, format!("entry `{name}`"))),
        };
        written += n as u64;
        if written > cap {
            return Err(too_large());
        }
        file.write_all(&buf[..n]).map_err(|e| io_err(name, e))?;
    }
    if written != declared {
        return Err(UnpackError::Corrupt(Corruption::Truncated {
            entry: name.to_string(),
            written,
            declared,
        }));
    }
    let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
    file.set_permissions(Permissions::from_mode(perm))
        .map_err(|e| io_err(name, e))?;
    stats.files += 1;
    stats.bytes += written;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::sync::OnceLock;
    use tar::Header;

    /// A header with `name` written as raw bytes (so `..` and absolute paths
    /// can be expressed), mtime 0 and a valid checksum.
    fn header(kind: EntryType, name: &[u8], size: u64, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        let slot = &mut h.as_old_mut().name;
        assert!(name.len() < slot.len());
        slot[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        h
    }

    fn link_header(kind: EntryType, name: &[u8], target: &[u8]) -> Header {
        let mut h = header(kind, name, 0, 0o777);
        h.set_link_name_literal(target).unwrap();
        h.set_cksum();
        h
    }

    enum E {
        File(&'static str, u32, &'static [u8]),
        Dir(&'static str),
        Link(&'static str, &'static str),
        Raw(Box<Header>, Vec<u8>),
    }

    fn tar_bytes(entries: Vec<E>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        append_all(&mut b, entries);
        b.into_inner().unwrap()
    }

    fn append_all<W: Write>(b: &mut tar::Builder<W>, entries: Vec<E>) {
        for e in entries {
            match e {
                E::File(name, mode, data) => {
                    let h = header(EntryType::Regular, name.as_bytes(), data.len() as u64, mode);
                    b.append(&h, data).unwrap();
                }
                E::Dir(name) => {
                    let h = header(EntryType::Directory, name.as_bytes(), 0, 0o755);
                    b.append(&h, io::empty()).unwrap();
                }
                E::Link(name, target) => {
                    let h = link_header(EntryType::Symlink, name.as_bytes(), target.as_bytes());
                    b.append(&h, io::empty()).unwrap();
                }
                E::Raw(h, data) => b.append(&h, data.as_slice()).unwrap(),
            }
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn tgz(entries: Vec<E>) -> Vec<u8> {
        gzip(&tar_bytes(entries))
    }

    /// A scratch area: `root/dest` (empty) and `root/outside` (empty, a place
    /// an escaping archive might try to write to).
    struct Scratch {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn scratch() -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let dest = root.join("dest");
        let outside = root.join("outside");
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&outside).unwrap();
        Scratch {
            _tmp: tmp,
            root,
            dest,
            outside,
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn assert_nothing_left(s: &Scratch) {
        assert_eq!(listing(&s.dest), Vec::<String>::new(), "dest is not empty");
        assert_eq!(
            listing(s.root.parent().unwrap()),
            vec!["root", "root/dest", "root/outside"],
            "something was written outside dest"
        );
    }

    /// Unpack `archive` with `limits`, expecting a refusal that leaves
    /// nothing behind.
    fn refused_with(archive: &[u8], limits: &Limits) -> UnpackError {
        let s = scratch();
        let err = unpack(archive, &s.dest, limits).expect_err("archive was accepted");
        assert_nothing_left(&s);
        err
    }

    fn refused(archive: &[u8]) -> UnpackError {
        refused_with(archive, &Limits::default())
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn normal_archive_round_trips() {
        let archive = tgz(vec![
            E::Dir("./"),
            E::Dir("app/"),
            E::Dir("app/bin/"),
            E::File("app/bin/run", 0o4755, b"#!/bin/sh\necho hi\n"),
            E::Dir("app/lib"),
            E::File("app/lib/data.txt", 0o664, b"data"),
            E::File("./app/lib/empty", 0o600, b""),
            E::File("other/deep/implied.txt", 0o644, b"implied parents"),
            E::Link("app/current", "bin/run"),
            E::Link("app/lib/bin", "../bin"),
            E::Link("app/self", "."),
            E::Dir("app/bin"),
        ]);
        let s = scratch();
        let stats = unpack(archive.as_slice(), &s.dest, &Limits::default()).unwrap();
        assert_eq!(
            stats,
            UnpackStats {
                files: 4,
                dirs: 5,
                symlinks: 3,
                bytes: 18 + 4 + 15,
            }
        );
        let d = &s.dest;
        assert_eq!(
            fs::read(d.join("app/bin/run")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode_of(&d.join("app/bin/run")), 0o755, "setuid dropped");
        assert_eq!(fs::read(d.join("app/lib/data.txt")).unwrap(), b"data");
        assert_eq!(mode_of(&d.join("app/lib/data.txt")), 0o644);
        assert_eq!(mode_of(&d.join("app/lib/empty")), 0o644);
        assert_eq!(
            fs::read(d.join("other/deep/implied.txt")).unwrap(),
            b"implied parents"
        );
        for dir in ["app", "app/bin", "app/lib", "other", "other/deep"] {
            assert_eq!(mode_of(&d.join(dir)), 0o755, "{dir}");
        }
        assert_eq!(
            fs::read_link(d.join("app/current")).unwrap(),
            Path::new("bin/run")
        );
        assert_eq!(
            fs::read(d.join("app/current")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::read_link(d.join("app/lib/bin")).unwrap(),
            Path::new("../bin")
        );
        assert!(d.join("app/lib/bin/run").exists());
        assert!(d.join("app/self/bin/run").exists());
        assert_eq!(listing(&s.outside), Vec::<String>::new(), "nothing outside");
    }

    #[test]
    fn parent_traversal_is_refused() {
        let err = refused(&tgz(vec![E::File("../../etc/x", 0o644, b"pwned")]));
        assert!(
            matches!(&err, UnpackError::ParentTraversal(p) if p == "../../etc/x"),
            "{err}"
        );
        assert!(err.to_string().contains("../../etc/x"), "{err}");

        // In the middle of a path, and after a good entry was written.
        let err = refused(&tgz(vec![
            E::File("fine.txt", 0o644, b"ok"),
            E::File("a/../../outside/x", 0o644, b"pwned"),
        ]));
        assert!(matches!(err, UnpackError::ParentTraversal(_)), "{err}");
    }

    #[test]
    fn absolute_path_is_refused() {
        let err = refused(&tgz(vec![E::File("/etc/x", 0o644, b"pwned")]));
        assert!(
            matches!(&err, UnpackError::AbsolutePath(p) if p == "/etc/x"),
            "{err}"
        );
    }

    #[test]
    fn symlink_escaping_upwards_is_refused() {
        let err = refused(&tgz(vec![E::Link("link", "../../outside")]));
        assert!(
            matches!(&err, UnpackError::LinkEscapes { path, target }
                if path == "link" && target == "../../outside"),
            "{err}"
        );
        // One level deep, two levels up.
        let err = refused(&tgz(vec![E::Dir("sub/"), E::Link("sub/link", "../..")]));
        assert!(matches!(err, UnpackError::LinkEscapes { .. }), "{err}");
        // `..` after a name: lexically inside, but not safe to resolve.
        let err = refused(&tgz(vec![
            E::Dir("a/"),
            E::Link("a/b", ".."),
            E::Link("c", "a/b/.."),
        ]));
        assert!(matches!(err, UnpackError::BadLinkTarget { .. }), "{err}");
    }

    #[test]
    fn symlink_to_absolute_path_is_refused() {
        let err = refused(&tgz(vec![E::Link("link", "/etc")]));
        assert!(
            matches!(&err, UnpackError::LinkEscapes { path, target }
                if path == "link" && target == "/etc"),
            "{err}"
        );
    }

    #[test]
    fn writing_through_an_earlier_symlink_is_refused() {
        // `a -> /outside` is refused at once, so `a/x` never gets a chance.
        let s = scratch();
        let target = s.outside.display().to_string();
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let h = link_header(EntryType::Symlink, b"a", target.as_bytes());
        b.append(&h, io::empty()).unwrap();
        append_all(&mut b, vec![E::File("a/x", 0o644, b"pwned")]);
        let archive = b.into_inner().unwrap().finish().unwrap();
        let err = unpack(archive.as_slice(), &s.dest, &Limits::default()).unwrap_err();
        assert!(matches!(err, UnpackError::LinkEscapes { .. }), "{err}");
        assert_nothing_left(&s);

        // An in-tree symlink is fine, but is never written through.
        let err = refused(&tgz(vec![
            E::Dir("real/"),
            E::Link("a", "real"),
            E::File("a/x", 0o644, b"through the link"),
        ]));
        assert!(
            matches!(&err, UnpackError::ThroughSymlink { path, parent }
                if path == "a/x" && parent == "a"),
            "{err}"
        );
        // Deeper parent, and a directory entry through it.
        let err = refused(&tgz(vec![
            E::Dir("real/"),
            E::Link("real/l", "."),
            E::Dir("real/l/sub/"),
        ]));
        assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
        // Replacing the symlink itself with a file or directory.
        let err = refused(&tgz(vec![
            E::Dir("real/"),
            E::Link("a", "real"),
            E::File("a", 0o644, b"x"),
        ]));
        assert!(matches!(err, UnpackError::Conflict { .. }), "{err}");
        let err = refused(&tgz(vec![
            E::Dir("real/"),
            E::Link("a", "real"),
            E::Dir("a/"),
        ]));
        assert!(matches!(err, UnpackError::Conflict { .. }), "{err}");
    }

    #[test]
    fn hard_link_is_refused() {
        let err = refused(&tgz(vec![
            E::File("target", 0o644, b"x"),
            E::Raw(
                Box::new(link_header(EntryType::Link, b"hard", b"target")),
                vec![],
            ),
        ]));
        assert!(
            matches!(&err, UnpackError::HardLink(p) if p == "hard"),
            "{err}"
        );
    }

    #[test]
    fn device_files_are_refused() {
        for kind in [EntryType::Char, EntryType::Block] {
            let mut h = header(kind, b"dev/null", 0, 0o666);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            h.set_cksum();
            let err = refused(&tgz(vec![E::Raw(Box::new(h), vec![])]));
            assert!(
                matches!(&err, UnpackError::DeviceOrFifo(p) if p == "dev/null"),
                "{err}"
            );
        }
    }

    #[test]
    fn fifo_is_refused() {
        let h = header(EntryType::Fifo, b"pipe", 0, 0o644);
        let err = refused(&tgz(vec![E::Raw(Box::new(h), vec![])]));
        assert!(
            matches!(&err, UnpackError::DeviceOrFifo(p) if p == "pipe"),
            "{err}"
        );
    }

    #[test]
    fn unknown_and_sparse_entry_types_are_refused() {
        for byte in [b'S', b'Z'] {
            let h = header(EntryType::new(byte), b"odd", 0, 0o644);
            let err = refused(&tgz(vec![E::Raw(Box::new(h), vec![])]));
            assert!(
                matches!(&err, UnpackError::Unsupported { path, .. } if path == "odd")
                    || matches!(err, UnpackError::Corrupt(_)),
                "{err}"
            );
        }
    }

    /// 50 MiB of zeros in one file, compressed (about 50 KiB).
    fn zero_bomb() -> &'static [u8] {
        static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
        BOMB.get_or_init(|| {
            let size = 50u64 << 20;
            let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
            let h = header(EntryType::Regular, b"zeros", size, 0o644);
            b.append(&h, io::repeat(0).take(size)).unwrap();
            b.into_inner().unwrap().finish().unwrap()
        })
    }

    #[test]
    fn gzip_bomb_is_refused_by_the_byte_cap() {
        let archive = zero_bomb();
        assert!(archive.len() < 1 << 20, "{} bytes", archive.len());
        let limits = Limits {
            max_total_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = refused_with(archive, &limits);
        assert!(
            matches!(&err, UnpackError::TooLarge { limit: LimitKind::TotalSize, max, .. }
                if *max == 1 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("zeros"), "{err}");

        let limits = Limits {
            max_file_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = refused_with(archive, &limits);
        assert!(
            matches!(
                err,
                UnpackError::TooLarge {
                    limit: LimitKind::FileSize,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// Counts the bytes read through it.
    struct Counting<R> {
        inner: R,
        count: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.count.set(self.count.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn many_small_files_stop_at_the_total_cap_while_reading() {
        // 200 files of 256 KiB each (50 MiB) against a 1 MiB total: refused
        // after four files, having read little more than the cap.
        let chunk = vec![0u8; 256 << 10];
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..200 {
            let name = format!("f{i:03}");
            let h = header(
                EntryType::Regular,
                name.as_bytes(),
                chunk.len() as u64,
                0o644,
            );
            b.append(&h, chunk.as_slice()).unwrap();
        }
        let stream = b.into_inner().unwrap();
        let limits = Limits {
            max_total_bytes: 1 << 20,
            ..Limits::default()
        };

        let s = scratch();
        let count = Rc::new(Cell::new(0));
        let reader = Counting {
            inner: stream.as_slice(),
            count: count.clone(),
        };
        let err = unpack_uncompressed(reader, &s.dest, &limits).unwrap_err();
        assert!(
            matches!(&err, UnpackError::TooLarge { at, limit: LimitKind::TotalSize, .. }
                if at == "entry `f004`"),
            "{err}"
        );
        assert_nothing_left(&s);
        assert!(
            count.get() <= (1 << 20) + 8 * METADATA_PER_ENTRY,
            "read {} bytes of the stream",
            count.get()
        );

        // The same, compressed.
        let err = refused_with(&gzip(&stream), &limits);
        assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn oversized_metadata_is_refused_while_reading() {
        // A GNU long-name entry of 16 MiB in front of a file: `tar` would
        // buffer it whole; the meter stops it at 64 KiB.
        let size = 16u64 << 20;
        let mut long = Header::new_gnu();
        long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        long.set_entry_type(EntryType::GNULongName);
        long.set_size(size);
        long.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&long, io::repeat(b'a').take(size)).unwrap();
        append_all(&mut b, vec![E::File("x", 0o644, b"x")]);
        let stream = b.into_inner().unwrap();

        let s = scratch();
        let count = Rc::new(Cell::new(0));
        let reader = Counting {
            inner: stream.as_slice(),
            count: count.clone(),
        };
        let err = unpack_uncompressed(reader, &s.dest, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::TooLarge {
                    limit: LimitKind::EntryMetadata,
                    ..
                }
            ),
            "{err}"
        );
        assert_nothing_left(&s);
        assert!(count.get() <= METADATA_PER_ENTRY, "read {}", count.get());
    }

    #[test]
    fn too_many_entries_are_refused() {
        let entries = (0..20).map(|_| E::Dir("d/")).collect();
        let limits = Limits {
            max_entries: 10,
            ..Limits::default()
        };
        let err = refused_with(&tgz(entries), &limits);
        assert!(
            matches!(err, UnpackError::TooManyEntries { limit: 10 }),
            "{err}"
        );
        // Exactly at the limit is fine.
        let s = scratch();
        let entries = (0..10).map(|_| E::Dir("d/")).collect();
        unpack(tgz(entries).as_slice(), &s.dest, &limits).unwrap();
    }

    #[test]
    fn corrupt_gzip_is_refused() {
        let good = tgz(vec![
            E::File("a.txt", 0o644, &[7u8; 4000]),
            E::File("b.txt", 0o644, b"b"),
        ]);

        // Not gzip at all.
        let err = refused(b"this is not a gzip stream, just some text");
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
        // Damaged compressed data.
        let mut damaged = good.clone();
        let mid = damaged.len() / 2;
        for b in &mut damaged[mid..mid + 8] {
            *b ^= 0x5a;
        }
        let err = refused(&damaged);
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
        // Damaged CRC (the tar content itself is intact).
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 0xff;
        let err = refused(&bad_crc);
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
        // Truncated.
        let err = refused(&good[..good.len() - 20]);
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
        // Empty input.
        let err = refused(b"");
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
    }

    #[test]
    fn corrupt_tar_is_refused() {
        let mut stream = tar_bytes(vec![E::File("a.txt", 0o644, b"hello")]);
        stream[0] ^= 1; // header checksum no longer matches
        let err = refused(&gzip(&stream));
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");

        // A file whose data stops short.
        let stream = tar_bytes(vec![E::File("a.txt", 0o644, &[1u8; 3000])]);
        let err = refused(&gzip(&stream[..512 + 1000]));
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
    }

    #[test]
    fn nul_and_empty_paths_are_refused() {
        let mut long = Header::new_gnu();
        long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        long.set_entry_type(EntryType::GNULongName);
        long.set_size(4);
        long.set_cksum();
        let err = refused(&tgz(vec![
            E::Raw(Box::new(long), b"a\0/b".to_vec()),
            E::File("placeholder", 0o644, b"x"),
        ]));
        assert!(
            matches!(&err, UnpackError::NulInPath(p) if p == "a\\u{0}/b"),
            "{err:?}"
        );

        let err = refused(&tgz(vec![E::File("", 0o644, b"x")]));
        assert!(matches!(err, UnpackError::EmptyPath), "{err}");
        let err = refused(&tgz(vec![E::File("./", 0o644, b"x")]));
        assert!(matches!(err, UnpackError::EmptyPath), "{err}");
    }

    #[test]
    fn duplicate_file_is_refused() {
        let err = refused(&tgz(vec![
            E::File("a", 0o644, b"one"),
            E::File("a", 0o644, b"two"),
        ]));
        assert!(
            matches!(&err, UnpackError::Conflict { path, .. } if path == "a"),
            "{err}"
        );
        let err = refused(&tgz(vec![
            E::File("a", 0o644, b"one"),
            E::File("a/b", 0o644, b"two"),
        ]));
        assert!(matches!(err, UnpackError::Conflict { .. }), "{err}");
    }

    #[test]
    fn destination_must_exist_and_be_empty() {
        let archive = tgz(vec![E::File("a", 0o644, b"x")]);
        let s = scratch();
        fs::write(s.dest.join("mine"), b"keep me").unwrap();
        let err = unpack(archive.as_slice(), &s.dest, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::Destination {
                    reason: "is not empty",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(fs::read(s.dest.join("mine")).unwrap(), b"keep me");

        let missing = s.root.join("missing");
        let err = unpack(archive.as_slice(), &missing, &Limits::default()).unwrap_err();
        assert!(matches!(err, UnpackError::Destination { .. }), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn failing_input_is_an_io_error() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"))
            }
        }
        let s = scratch();
        let err = unpack(Broken, &s.dest, &Limits::default()).unwrap_err();
        assert!(matches!(err, UnpackError::Io { .. }), "{err}");
        assert_nothing_left(&s);
    }
}
