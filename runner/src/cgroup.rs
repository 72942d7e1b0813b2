//! One cgroup per sandbox: the kernel bounds its memory, tasks and CPU.
//!
//! Why: a sandbox is hostile. Namespaces hide the host from it but do not
//! stop it from eating the host's RAM, forking until the pid table is full
//! or spinning every core. A cgroup per sandbox does, and it also names every
//! process the sandbox ever made, so stopping a sandbox kills all of them,
//! even those that left its process group with `setsid`.
//!
//! Layout: `<the runner's own cgroup>/miren-runner-<runner id>/sandbox-<id>`,
//! in the unified (v2) hierarchy when it has the `memory` and `pids`
//! controllers, else in the v1 hierarchies of `memory`, `pids` and `cpu`
//! (each may be mounted on its own; paths come from `/proc/self/cgroup` and
//! `/proc/self/mountinfo`). `cpu` is optional: without it (or without CFS
//! bandwidth) the runner says so in [`Cgroups::describe`] and limits the rest.
//!
//! Decisions:
//! - **Scope.** A runner only ever looks inside its own `miren-runner-<id>`
//!   dir: several runners share a host (in tests, one cgroup), and a runner
//!   cleaning up after a crash must never touch another's sandboxes.
//!   Leftover `sandbox-*` cgroups there are killed and removed by
//!   [`Cgroups::detect`]; anything else there is left alone.
//! - **v2's no-internal-processes rule.** Controllers can be enabled for
//!   children only in a cgroup without processes (the root excepted). If the
//!   runner's own cgroup holds just the runner, the runner moves itself into
//!   the leaf `miren-runner-<id>/runner` first (a systemd unit should say
//!   `Delegate=yes`). If it holds other processes too, the runner will not
//!   move them: cgroups are [`Cgroups::Unavailable`], with that reason.
//!   Detecting again from inside such a leaf uses the cgroup above it.
//! - **No symlinks.** Every dir below the runner's own cgroup is opened with
//!   `O_NOFOLLOW` relative to its parent's fd, and kept open; paths are built
//!   only from checked ids (`[A-Za-z0-9_-]{1,128}`). cgroupfs has no
//!   symlinks, but a test layout or a confused setup could.
//! - **Memory** is `memory.max` with `memory.swap.max = 0` (v2), or
//!   `memory.limit_in_bytes` then `memory.memsw.limit_in_bytes` equal to it
//!   (v1; the order matters, memsw may not be below the limit). Without swap
//!   accounting, v1 gets `memory.swappiness = 0`, which keeps its pages out of
//!   swap; v2 has no such knob, so there swap accounting is the only guard.
//!   v1 also writes `oom_kill_disable 0`, which a cgroup inherits from its
//!   parent: with it set, a sandbox at its limit would hang instead of die.
//! - **OOM kills** are the kernel's own counter: `oom_kill` of
//!   `memory.events` (v2) or of `memory.oom_control` (v1, Linux 4.13+).
//!   Older kernels lack it; [`SandboxCgroup::oom_kills`] then says 0. We do
//!   not guess from `memory.failcnt`: it counts limit hits that reclaim
//!   usually absorbs, not kills.
//! - **Killing** first sets `pids.max` to 0, so nothing in the cgroup can fork
//!   any more, then writes `cgroup.kill` (v2, Linux 5.14+) or SIGKILLs every
//!   pid of `cgroup.procs`, in a bounded loop until it is empty. Each pid is
//!   opened as a pidfd and found again in `cgroup.procs` before the signal,
//!   so a pid reused by a process elsewhere is never signalled.
//! - **Blocking.** Everything here is synchronous file IO on cgroupfs, and
//!   killing waits (bounded, at most a few seconds); call it from
//!   `spawn_blocking` in async code. [`SandboxCgroup::join_hook`] is the
//!   exception: it runs in the child between fork and exec.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::limits::Resolved;

const RUNNER_PREFIX: &str = "miren-runner-";
const SANDBOX_PREFIX: &str = "sandbox-";
/// v2 only: where the runner moves itself when its own cgroup must be empty.
const RUNNER_LEAF: &str = "runner";
/// The CFS period written with every CPU quota, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// The most bytes read from a cgroupfs file (a `cgroup.procs` of 4M pids
/// is about 30 MB; more than that is not a file we wrote).
const READ_CAP: u64 = 32 << 20;
/// How deep a sandbox's own sub-cgroups are walked when removing it.
const MAX_DEPTH: usize = 8;
/// Rounds of "list, kill, wait" before giving up (waits grow to 50 ms).
const KILL_ROUNDS: u32 = 100;

/// Which cgroup hierarchy the runner uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    /// `v1`, `v2`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// Where the runner's own cgroups are: given to [`Cgroups::at`], found by
/// [`Cgroups::detect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The runner's own cgroup in the unified hierarchy.
    V2 { own: PathBuf },
    /// The runner's own cgroup in each controller's v1 hierarchy (two may be
    /// the same dir when controllers are mounted together).
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
}

/// How [`Cgroups::describe`] starts when sandboxes get no limits here
/// (`runner list` shows such a runner as `no-limits`).
pub const NO_LIMITS: &str = "no limits";

/// Why something failed; every message names the path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup limits on this runner: {0}")]
    Unavailable(#[source] Arc<SetupError>),
    #[error("invalid sandbox id {0:?}: expected 1 to 128 characters of A-Z a-z 0-9 _ -")]
    InvalidId(String),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("processes are still left in {} after killing them", path.display())]
    NotEmptied { path: PathBuf },
}

/// Why this runner has no cgroups to limit sandboxes with (shown as
/// `no limits: <why>`); every message names the path.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The runner id cannot name a cgroup dir.
    #[error("invalid runner id {0:?}")]
    InvalidRunnerId(String),
    /// A `/proc/self` file could not be read.
    #[error("reading {path}: {source}")]
    ReadProc {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    /// No hierarchy holds the memory and pids controllers for this process.
    #[error("{v2}, and no cgroup v1 hierarchy of {} is mounted", .missing.join(" or "))]
    NoHierarchy {
        /// Why the unified hierarchy does not serve.
        v2: NoV2,
        /// The v1 controllers with no hierarchy.
        missing: Vec<&'static str>,
    },
    /// A name that cannot be a path (a NUL byte).
    #[error(transparent)]
    Name(#[from] std::ffi::NulError),
    /// A file of a cgroup could not be read, opened, written or made
    /// ([`CgroupError::Io`]).
    #[error(transparent)]
    Io(#[from] CgroupError),
    /// A dir that should be cgroupfs is another filesystem.
    #[error("{} is not a cgroup {version} filesystem", path.display())]
    NotCgroupFs { path: PathBuf, version: Version },
    /// The unified hierarchy lacks a controller limits need.
    #[error(
        "the cgroup v2 hierarchy at {} lacks the {} controller{} (it has: {})",
        own.display(),
        .missing.join(" and "),
        if .missing.len() > 1 { "s" } else { "" },
        if .available.trim().is_empty() { "none" } else { .available.trim() }
    )]
    MissingControllers {
        own: PathBuf,
        missing: Vec<&'static str>,
        available: String,
    },
    /// cgroup v2 enables limits only below a cgroup without processes.
    #[error(
        "the runner's cgroup {} also holds {} other process{} (pid {first}…), and \
         cgroup v2 enables limits only below a cgroup without processes: run the \
         runner in a cgroup of its own (systemd: Delegate=yes)",
        own.display(),
        others,
        if *.others > 1 { "es" } else { "" }
    )]
    SharedCgroup {
        own: PathBuf,
        others: usize,
        first: u32,
    },
}

/// Why the unified (v2) hierarchy does not serve this runner.
#[derive(Debug, thiserror::Error)]
pub enum NoV2 {
    /// No cgroup2 mount shows this process's cgroup.
    #[error("no cgroup2 filesystem holds this process's cgroup")]
    NotMounted,
    /// Its controllers could not be read.
    #[error("reading {}/cgroup.controllers: {source}", own.display())]
    Unreadable {
        own: PathBuf,
        #[source]
        source: io::Error,
    },
    /// It has one of memory and pids, or neither.
    #[error("cgroup2 at {} has {} of the memory and pids controllers", own.display(), if *.one { "only one" } else { "neither" })]
    Controllers { own: PathBuf, one: bool },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// How cgroup dirs behave: the kernel's, or (tests) plain dirs made to look
/// like them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fs {
    Kernel,
    /// mkdir copies the parent's control files, rmdir deletes them first, and
    /// "killing" empties `cgroup.procs` instead of signalling anyone.
    #[cfg(test)]
    Simulated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Controllers {
    memory: bool,
    pids: bool,
    cpu: bool,
}

/// The runner's dir in one hierarchy.
#[derive(Debug)]
struct Hierarchy {
    controllers: Controllers,
    /// `.../miren-runner-<id>`
    path: PathBuf,
    dir: Arc<OwnedFd>,
    /// The runner's own cgroup, which holds `dir`.
    base: OwnedFd,
    name: CString,
}

/// The runner's cgroup dirs, ready to hold sandboxes.
#[derive(Debug)]
pub struct RunnerCgroup {
    version: Version,
    hierarchies: Vec<Hierarchy>,
    /// Why CPU is not limited, when it is not.
    no_cpu: Option<String>,
    fs: Fs,
}

/// The cgroups of this runner, or why there are none.
#[derive(Debug)]
pub enum Cgroups {
    V2(RunnerCgroup),
    V1(RunnerCgroup),
    Unavailable { reason: Arc<SetupError> },
}

impl Cgroups {
    /// Finds the hierarchy from `/proc/self/cgroup` and `/proc/self/mountinfo`
    /// and sets up this runner's dirs (see [`Cgroups::at`]). Never fails:
    /// anything missing ends in [`Cgroups::Unavailable`] with the reason, to
    /// be printed loudly.
    pub fn detect(runner_id: &str) -> Cgroups {
        match detect_layout() {
            Ok(layout) => Cgroups::at(layout, runner_id),
            Err(reason) => Cgroups::Unavailable {
                reason: Arc::new(reason),
            },
        }
    }

    /// Sets up this runner's dirs under the runner's own cgroups given in
    /// `layout`: creates `miren-runner-<runner_id>` in each (v2: enables
    /// `memory`, `pids` and `cpu` for it and for its children, moving the
    /// runner into a leaf when its cgroup must be emptied), then kills and
    /// removes the `sandbox-*` cgroups a previous run of this runner left.
    /// The dirs must be cgroupfs.
    pub fn at(layout: Layout, runner_id: &str) -> Cgroups {
        Cgroups::set_up(layout, runner_id, Fs::Kernel)
    }

    fn set_up(layout: Layout, runner_id: &str, fs: Fs) -> Cgroups {
        if !valid_id(runner_id) {
            return Cgroups::Unavailable {
                reason: Arc::new(SetupError::InvalidRunnerId(cut(runner_id))),
            };
        }
        match RunnerCgroup::set_up(layout, runner_id, fs) {
            Ok(rc) => {
                rc.remove_sandboxes();
                match rc.version {
                    Version::V1 => Cgroups::V1(rc),
                    Version::V2 => Cgroups::V2(rc),
                }
            }
            Err(reason) => Cgroups::Unavailable {
                reason: Arc::new(reason),
            },
        }
    }

    fn runner(&self) -> Option<&RunnerCgroup> {
        match self {
            Cgroups::V2(rc) | Cgroups::V1(rc) => Some(rc),
            Cgroups::Unavailable { .. } => None,
        }
    }

    /// Whether sandboxes get limits here.
    pub fn is_available(&self) -> bool {
        self.runner().is_some()
    }

    /// The hierarchy in use, if any.
    pub fn version(&self) -> Option<Version> {
        self.runner().map(|rc| rc.version)
    }

    /// One line for `runner list` and the runner's start-up:
    /// `cgroup v1 (memory, pids, cpu)`,
    /// `cgroup v2 (memory, pids; cpu not limited: …)` or `no limits: …`.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::Unavailable { reason } => format!("{NO_LIMITS}: {reason}"),
            Cgroups::V1(rc) | Cgroups::V2(rc) => {
                let v = rc.version;
                match &rc.no_cpu {
                    None => format!("cgroup {v} (memory, pids, cpu)"),
                    Some(why) => format!("cgroup {v} (memory, pids; cpu not limited: {why})"),
                }
            }
        }
    }

    /// The runner's dirs (`.../miren-runner-<id>`), one per hierarchy.
    pub fn runner_dirs(&self) -> Vec<PathBuf> {
        self.runner()
            .map(|rc| rc.hierarchies.iter().map(|h| h.path.clone()).collect())
            .unwrap_or_default()
    }

    /// Creates the cgroup of a sandbox with its limits written, before any
    /// process joins it. A cgroup left with the same id (a crashed earlier
    /// start) is killed and replaced. On error nothing is left behind.
    /// Create once per sandbox; its restarts join the same cgroup.
    pub fn create(
        &self,
        sandbox_id: &str,
        limits: &Resolved,
    ) -> Result<SandboxCgroup, CgroupError> {
        if !valid_id(sandbox_id) {
            return Err(CgroupError::InvalidId(cut(sandbox_id)));
        }
        match self {
            Cgroups::Unavailable { reason } => Err(CgroupError::Unavailable(reason.clone())),
            Cgroups::V1(rc) | Cgroups::V2(rc) => rc.create(sandbox_id, limits),
        }
    }

    /// Kills and removes every sandbox cgroup of this runner, then its own
    /// dirs where they can go (not v2's while the runner is in their leaf).
    /// For a runner's last moment and for tests; errors are logged.
    pub fn remove_all(&self) {
        let Some(rc) = self.runner() else { return };
        rc.remove_sandboxes();
        for h in &rc.hierarchies {
            if rc.version == Version::V2 {
                // Goes only if the runner is no longer in it; never killed.
                let _ = remove_dir(rc.fs, h.dir.as_fd(), c"runner");
            }
            if let Err(e) = remove_dir(rc.fs, h.base.as_fd(), &h.name) {
                let quiet = [libc::EBUSY, libc::ENOENT, libc::ENOTEMPTY];
                if !e.raw_os_error().is_some_and(|n| quiet.contains(&n)) {
                    tracing::warn!("could not remove {}: {e}", h.path.display());
                }
            }
        }
    }
}

impl RunnerCgroup {
    fn set_up(layout: Layout, runner_id: &str, fs: Fs) -> Result<RunnerCgroup, SetupError> {
        let runner_name = format!("{RUNNER_PREFIX}{runner_id}");
        let runner_cname = CString::new(runner_name.as_str())?;
        match layout {
            Layout::V1 { memory, pids, cpu } => {
                let mut groups: Vec<(PathBuf, Controllers)> = Vec::new();
                let mut add = |path: PathBuf, set: fn(&mut Controllers)| match groups
                    .iter_mut()
                    .find(|(p, _)| *p == path)
                {
                    Some((_, c)) => set(c),
                    None => {
                        let mut c = Controllers::default();
                        set(&mut c);
                        groups.push((path, c));
                    }
                };
                add(memory, |c| c.memory = true);
                add(pids, |c| c.pids = true);
                let mut no_cpu = None;
                match cpu {
                    Some(cpu) => add(cpu, |c| c.cpu = true),
                    None => no_cpu = Some("no cpu controller is mounted".to_string()),
                }
                let mut hierarchies = Vec::new();
                for (path, mut controllers) in groups {
                    let base = open_base(&path, fs, Version::V1)?;
                    if controllers.cpu && !file_exists(base.as_fd(), c"cpu.cfs_quota_us") {
                        controllers.cpu = false;
                        no_cpu = Some(format!(
                            "{} has no cpu.cfs_quota_us (a kernel without CFS bandwidth control)",
                            path.display()
                        ));
                        if !controllers.memory && !controllers.pids {
                            continue;
                        }
                    }
                    let (dir, dir_path) = make_runner_dir(fs, &base, &path, &runner_name)?;
                    hierarchies.push(Hierarchy {
                        controllers,
                        path: dir_path,
                        dir: Arc::new(dir),
                        base,
                        name: runner_cname.clone(),
                    });
                }
                Ok(RunnerCgroup {
                    version: Version::V1,
                    hierarchies,
                    no_cpu,
                    fs,
                })
            }
            Layout::V2 { own } => {
                let base = open_base(&own, fs, Version::V2)?;
                let available = read_at(base.as_fd(), c"cgroup.controllers")
                    .map_err(io_err("reading", &own.join("cgroup.controllers")))?;
                let has = |c: &str| available.split_whitespace().any(|w| w == c);
                let missing: Vec<&str> =
                    ["memory", "pids"].into_iter().filter(|c| !has(c)).collect();
                if !missing.is_empty() {
                    return Err(SetupError::MissingControllers {
                        own,
                        missing,
                        available,
                    });
                }
                let cpu = has("cpu");
                let enable = if cpu {
                    "+memory +pids +cpu"
                } else {
                    "+memory +pids"
                };
                // The root cgroup has no cgroup.type and may hold processes.
                let is_root = !file_exists(base.as_fd(), c"cgroup.type");
                let me = std::process::id();
                let mut move_me = false;
                if !is_root {
                    let procs = read_pids(base.as_fd())
                        .map_err(io_err("reading", &own.join("cgroup.procs")))?;
                    let others: Vec<u32> = procs.iter().copied().filter(|&p| p != me).collect();
                    if let Some(&first) = others.first() {
                        return Err(SetupError::SharedCgroup {
                            own,
                            others: others.len(),
                            first,
                        });
                    }
                    move_me = procs.contains(&me);
                }
                let (dir, dir_path) = make_runner_dir(fs, &base, &own, &runner_name)?;
                if move_me {
                    let leaf = CString::new(RUNNER_LEAF)?;
                    let leaf_path = dir_path.join(RUNNER_LEAF);
                    make_dir(fs, dir.as_fd(), &leaf).map_err(io_err("creating", &leaf_path))?;
                    let leaf_fd =
                        open_subdir(dir.as_fd(), &leaf).map_err(io_err("opening", &leaf_path))?;
                    write_at(leaf_fd.as_fd(), c"cgroup.procs", &me.to_string())
                        .map_err(io_err("moving the runner into", &leaf_path))?;
                }
                let action = if cpu {
                    "enabling +memory +pids +cpu in"
                } else {
                    "enabling +memory +pids in"
                };
                for (fd, path) in [(&base, &own), (&dir, &dir_path)] {
                    write_at(fd.as_fd(), c"cgroup.subtree_control", enable)
                        .map_err(io_err(action, &path.join("cgroup.subtree_control")))?;
                }
                Ok(RunnerCgroup {
                    version: Version::V2,
                    hierarchies: vec![Hierarchy {
                        controllers: Controllers {
                            memory: true,
                            pids: true,
                            cpu,
                        },
                        path: dir_path,
                        dir: Arc::new(dir),
                        base,
                        name: runner_cname,
                    }],
                    no_cpu: (!cpu).then(|| {
                        format!(
                            "the cgroup v2 hierarchy at {} has no cpu controller",
                            own.display()
                        )
                    }),
                    fs,
                })
            }
        }
    }

    /// Opens whatever exists of sandbox cgroup `name` in each hierarchy.
    fn open_existing(&self, name: &CStr, limits: Option<Resolved>) -> SandboxCgroup {
        let mut dirs = Vec::new();
        for h in &self.hierarchies {
            if let Ok(dir) = open_subdir(h.dir.as_fd(), name) {
                dirs.push(SandboxDir {
                    controllers: h.controllers,
                    path: h.path.join(std::ffi::OsStr::from_bytes(name.to_bytes())),
                    dir,
                    parent: h.dir.clone(),
                    name: name.to_owned(),
                });
            }
        }
        SandboxCgroup {
            inner: Arc::new(Inner {
                version: self.version,
                fs: self.fs,
                limits,
                dirs,
            }),
        }
    }

    /// Kills and removes every `sandbox-*` cgroup in this runner's dirs.
    fn remove_sandboxes(&self) {
        let mut names = std::collections::BTreeSet::new();
        for h in &self.hierarchies {
            let entries = match list_dir(h.dir.as_fd()) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("could not list {}: {e}", h.path.display());
                    continue;
                }
            };
            for (name, is_dir) in entries {
                if !is_dir || (name == RUNNER_LEAF && self.version == Version::V2) {
                    continue;
                }
                if name.strip_prefix(SANDBOX_PREFIX).is_some_and(valid_id) {
                    names.insert(name);
                } else {
                    tracing::warn!(
                        "leaving {}/{name}: not a sandbox cgroup of this runner",
                        h.path.display()
                    );
                }
            }
        }
        for name in names {
            let Ok(cname) = CString::new(name.as_str()) else {
                continue;
            };
            let leftover = self.open_existing(&cname, None);
            let paths: Vec<String> = leftover
                .inner
                .dirs
                .iter()
                .map(|d| d.path.display().to_string())
                .collect();
            match leftover.remove() {
                Ok(()) => tracing::info!("removed leftover sandbox cgroup {}", paths.join(", ")),
                Err(e) => tracing::warn!("could not remove leftover sandbox cgroup: {e}"),
            }
        }
    }

    fn create(&self, sandbox_id: &str, limits: &Resolved) -> Result<SandboxCgroup, CgroupError> {
        let name = CString::new(format!("{SANDBOX_PREFIX}{sandbox_id}"))
            .map_err(|_| CgroupError::InvalidId(cut(sandbox_id)))?;
        let stale = self.open_existing(&name, None);
        if !stale.inner.dirs.is_empty() {
            tracing::warn!("replacing the stale cgroup of sandbox {sandbox_id}");
            stale.remove()?;
        }
        let mut dirs = Vec::new();
        let mut result = Ok(());
        for h in &self.hierarchies {
            let path = h.path.join(name.to_string_lossy().as_ref());
            let made = make_dir(self.fs, h.dir.as_fd(), &name)
                .map_err(io_err("creating", &path))
                .and_then(|()| open_subdir(h.dir.as_fd(), &name).map_err(io_err("opening", &path)));
            match made {
                Ok(dir) => dirs.push(SandboxDir {
                    controllers: h.controllers,
                    path,
                    dir,
                    parent: h.dir.clone(),
                    name: name.clone(),
                }),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = dirs
                .iter()
                .try_for_each(|d| d.write_limits(self.version, limits));
        }
        let sandbox = SandboxCgroup {
            inner: Arc::new(Inner {
                version: self.version,
                fs: self.fs,
                limits: Some(*limits),
                dirs,
            }),
        };
        match result {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                if let Err(cleanup) = sandbox.remove() {
                    tracing::warn!("{cleanup}");
                }
                Err(e)
            }
        }
    }
}

/// The cgroup of one sandbox (a dir in each hierarchy).
#[derive(Debug)]
pub struct SandboxCgroup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    version: Version,
    fs: Fs,
    /// What `pids.max` goes back to after [`SandboxCgroup::kill_all`];
    /// None for a leftover being removed.
    limits: Option<Resolved>,
    dirs: Vec<SandboxDir>,
}

#[derive(Debug)]
struct SandboxDir {
    controllers: Controllers,
    path: PathBuf,
    dir: OwnedFd,
    /// The runner's dir it is in.
    parent: Arc<OwnedFd>,
    name: CString,
}

impl SandboxDir {
    fn write(&self, file: &CStr, value: &str) -> Result<(), CgroupError> {
        write_at(self.dir.as_fd(), file, value).map_err(|source| CgroupError::Io {
            action: "writing",
            path: self.path.join(file.to_string_lossy().as_ref()),
            source,
        })
    }

    fn has(&self, file: &CStr) -> bool {
        file_exists(self.dir.as_fd(), file)
    }

    fn write_limits(&self, version: Version, limits: &Resolved) -> Result<(), CgroupError> {
        let c = self.controllers;
        let memory = limits.memory_bytes.to_string();
        let quota = u64::from(limits.cpu_millis) * (CPU_PERIOD_US / 1000);
        match version {
            Version::V1 => {
                if c.memory {
                    self.write(c"memory.oom_control", "0")?;
                    self.write(c"memory.limit_in_bytes", &memory)?;
                    if self.has(c"memory.memsw.limit_in_bytes") {
                        self.write(c"memory.memsw.limit_in_bytes", &memory)?;
                    } else if self.has(c"memory.swappiness") {
                        self.write(c"memory.swappiness", "0")?;
                    }
                }
                if c.cpu {
                    self.write(c"cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    self.write(c"cpu.cfs_quota_us", &quota.to_string())?;
                }
            }
            Version::V2 => {
                if c.memory {
                    self.write(c"memory.max", &memory)?;
                    if self.has(c"memory.swap.max") {
                        self.write(c"memory.swap.max", "0")?;
                    }
                }
                if c.cpu {
                    self.write(c"cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
        }
        if c.pids {
            self.write(c"pids.max", &limits.pids.to_string())?;
        }
        Ok(())
    }
}

impl SandboxCgroup {
    /// The sandbox's dirs, one per hierarchy.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.inner.dirs.iter().map(|d| d.path.clone()).collect()
    }

    /// For `Command::pre_exec`: puts the calling process (the child, between
    /// fork and exec) into the sandbox's cgroup in every hierarchy, before it
    /// runs any code of the sandbox. Async-signal-safe: `getpid`, then
    /// `openat`/`write`/`close` on dir fds opened beforehand (the cgroup dir
    /// itself cannot be swapped underneath), no allocation. An error fails
    /// the spawn, so no sandbox process starts outside its cgroup (including
    /// after [`SandboxCgroup::remove`], when the dirs are gone).
    pub fn join_hook(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        let inner = self.inner.clone();
        move || {
            // SAFETY: getpid cannot fail and touches no memory.
            let pid = unsafe { libc::getpid() };
            let mut buf = [0u8; 20];
            let text = decimal(pid as u32, &mut buf);
            for d in &inner.dirs {
                // SAFETY: a valid dir fd and a NUL-terminated name; the
                // returned fd is closed below.
                let fd = unsafe {
                    libc::openat(
                        d.dir.as_raw_fd(),
                        c"cgroup.procs".as_ptr(),
                        libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `text` is a live buffer of that length.
                let n = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
                let error = io::Error::last_os_error();
                // SAFETY: `fd` is ours and not used again.
                unsafe { libc::close(fd) };
                if n < 0 {
                    return Err(error);
                }
                if n as usize != text.len() {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            Ok(())
        }
    }

    /// How many processes of the sandbox the kernel's OOM killer has killed
    /// so far; 0 when the kernel does not say (see the module doc).
    pub fn oom_kills(&self) -> u64 {
        let Some(d) = self.inner.dirs.iter().find(|d| d.controllers.memory) else {
            return 0;
        };
        let file = match self.inner.version {
            Version::V1 => c"memory.oom_control",
            Version::V2 => c"memory.events",
        };
        read_at(d.dir.as_fd(), file)
            .ok()
            .and_then(|text| keyed_value(&text, "oom_kill"))
            .unwrap_or(0)
    }

    /// Kills every process in the sandbox's cgroup, descendants included,
    /// however it got there and whatever process group or session it is in.
    /// Forking is stopped first (`pids.max` 0) and allowed again after, so
    /// the cgroup can be joined again by the sandbox's next start. Bounded:
    /// gives up with [`CgroupError::NotEmptied`] after about 5 s.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let inner = &self.inner;
        let pids_dir = inner.dirs.iter().find(|d| d.controllers.pids);
        if let Some(d) = pids_dir {
            // Best effort: a leftover from an older layout may lack it.
            let _ = write_at(d.dir.as_fd(), c"pids.max", "0");
        }
        let result = self.kill_loop();
        if let (Some(d), Some(limits)) = (pids_dir, inner.limits) {
            d.write(c"pids.max", &limits.pids.to_string())?;
        }
        result
    }

    fn kill_loop(&self) -> Result<(), CgroupError> {
        let inner = &self.inner;
        if inner.version == Version::V2 && inner.fs == Fs::Kernel {
            for d in &inner.dirs {
                if d.has(c"cgroup.kill") {
                    let _ = d.write(c"cgroup.kill", "1");
                }
            }
        }
        let mut wait = Duration::from_millis(1);
        for _ in 0..KILL_ROUNDS {
            let mut left = false;
            for d in &inner.dirs {
                walk(d.dir.as_fd(), 0, &mut |dir| {
                    if kill_members(inner.fs, dir) > 0 {
                        left = true;
                    }
                });
            }
            if !left {
                return Ok(());
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(50));
        }
        Err(CgroupError::NotEmptied {
            path: inner
                .dirs
                .first()
                .map(|d| d.path.clone())
                .unwrap_or_default(),
        })
    }

    /// [`SandboxCgroup::kill_all`], then removes the dirs (and any cgroups
    /// the sandbox made inside them). Returns the first error; what can be
    /// removed is removed regardless.
    pub fn remove(self) -> Result<(), CgroupError> {
        let killed = self.kill_all();
        let mut first_error = killed.err();
        for d in &self.inner.dirs {
            if let Err(e) = remove_tree(self.inner.fs, d.parent.as_fd(), &d.name, &d.path, 0) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Removes the cgroup `name` under `parent`, its own sub-cgroups first,
/// killing what is in each, retrying while the kernel still says busy.
fn remove_tree(
    fs: Fs,
    parent: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
    depth: usize,
) -> Result<(), CgroupError> {
    let dir = match open_subdir(parent, name) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    if depth < MAX_DEPTH {
        for (child, is_dir) in list_dir(dir.as_fd()).map_err(io_err("listing", path))? {
            if is_dir {
                if let Ok(cname) = CString::new(child.as_str()) {
                    remove_tree(fs, dir.as_fd(), &cname, &path.join(&child), depth + 1)?;
                }
            }
        }
    }
    let mut wait = Duration::from_millis(1);
    for round in 0..KILL_ROUNDS {
        match remove_dir(fs, parent, name) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && round + 1 < KILL_ROUNDS => {
                kill_members(fs, dir.as_fd());
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(io_err("removing", path)(e)),
        }
    }
    Err(CgroupError::NotEmptied {
        path: path.to_path_buf(),
    })
}

/// Calls `f` on `dir` and every cgroup below it (to [`MAX_DEPTH`]).
fn walk(dir: BorrowedFd<'_>, depth: usize, f: &mut dyn FnMut(BorrowedFd<'_>)) {
    f(dir);
    if depth >= MAX_DEPTH {
        return;
    }
    for (name, is_dir) in list_dir(dir).unwrap_or_default() {
        if !is_dir {
            continue;
        }
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        if let Ok(child) = open_subdir(dir, &cname) {
            walk(child.as_fd(), depth + 1, f);
        }
    }
}

/// SIGKILLs the processes listed in `dir`'s `cgroup.procs`; returns how many
/// were listed. Each is opened as a pidfd first and signalled only if it is
/// still listed after that, so a pid that died and was reused elsewhere in
/// between is never hit (the pidfd pins the process it was opened on).
fn kill_members(fs: Fs, dir: BorrowedFd<'_>) -> usize {
    let Ok(pids) = read_pids(dir) else { return 0 };
    #[cfg(test)]
    if fs == Fs::Simulated {
        let _ = write_at(dir, c"cgroup.procs", "");
        return pids.len();
    }
    let _ = fs;
    let me = std::process::id();
    for chunk in pids.chunks(256) {
        let opened: Vec<(u32, io::Result<OwnedFd>)> = chunk
            .iter()
            .filter(|&&p| p > 1 && p != me)
            .map(|&p| (p, pidfd_open(p)))
            .collect();
        let Ok(still) = read_pids(dir) else {
            return pids.len();
        };
        let still: HashSet<u32> = still.into_iter().collect();
        for (pid, fd) in opened {
            if !still.contains(&pid) {
                continue;
            }
            match fd {
                Ok(fd) => {
                    // SAFETY: a pidfd we own; no siginfo.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            fd.as_raw_fd(),
                            libc::SIGKILL,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        );
                    }
                }
                // Kernels before 5.3 have no pidfds: a plain kill, just
                // after finding the pid listed again.
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    // SAFETY: kill(2) touches no memory.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                Err(_) => {} // gone already
            }
        }
    }
    pids.len()
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

// ----- Finding the hierarchies -----

/// What `/proc/self/cgroup` and `/proc/self/mountinfo` say about where this
/// process's cgroups are (dirs, not yet checked for controllers).
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    v2: Option<PathBuf>,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
}

fn detect_layout() -> Result<Layout, SetupError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| SetupError::ReadProc { path, source })
    };
    let cgroup = read("/proc/self/cgroup")?;
    let mountinfo = read("/proc/self/mountinfo")?;
    let found = find_hierarchies(&cgroup, &mountinfo);
    let mut why_not_v2 = NoV2::NotMounted;
    if let Some(own) = &found.v2 {
        match std::fs::read_to_string(own.join("cgroup.controllers")) {
            Ok(c) => {
                let words: Vec<&str> = c.split_whitespace().collect();
                if words.contains(&"memory") && words.contains(&"pids") {
                    return Ok(Layout::V2 { own: own.clone() });
                }
                why_not_v2 = NoV2::Controllers {
                    own: own.clone(),
                    one: words.contains(&"memory") || words.contains(&"pids"),
                };
            }
            Err(source) => {
                why_not_v2 = NoV2::Unreadable {
                    own: own.clone(),
                    source,
                }
            }
        }
    }
    match (found.memory, found.pids) {
        (Some(memory), Some(pids)) => Ok(Layout::V1 {
            memory,
            pids,
            cpu: found.cpu,
        }),
        (memory, pids) => {
            let missing: Vec<&str> = [("memory", memory.is_none()), ("pids", pids.is_none())]
                .into_iter()
                .filter_map(|(n, m)| m.then_some(n))
                .collect();
            Err(SetupError::NoHierarchy {
                v2: why_not_v2,
                missing,
            })
        }
    }
}

fn find_hierarchies(cgroup: &str, mountinfo: &str) -> Found {
    let mut v2_own: Option<&str> = None;
    let mut v1_own: Vec<(&str, &str)> = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2_own = Some(path);
        } else {
            v1_own.extend(controllers.split(',').map(|c| (c, path)));
        }
    }
    let v2_own = v2_own.map(strip_runner_leaf);
    let mut found = Found::default();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mut rest = after.split(' ');
        let fstype = rest.next().unwrap_or_default();
        let options = rest.nth(1).unwrap_or_default();
        let (root, mount_point) = (unescape(root), unescape(mount_point));
        let dir_of =
            |own: &str| within_mount(own, &root).map(|rel| PathBuf::from(&mount_point).join(rel));
        if fstype == "cgroup2" {
            if found.v2.is_none() {
                found.v2 = v2_own.as_deref().and_then(dir_of);
            }
        } else if fstype == "cgroup" {
            for (controller, slot) in [
                ("memory", &mut found.memory),
                ("pids", &mut found.pids),
                ("cpu", &mut found.cpu),
            ] {
                if slot.is_none() && options.split(',').any(|o| o == controller) {
                    *slot = v1_own
                        .iter()
                        .find(|(c, _)| *c == controller)
                        .and_then(|(_, own)| dir_of(own));
                }
            }
        }
    }
    found
}

/// A v2 path inside `/miren-runner-<id>/runner` means an earlier detect
/// moved this process there: the runner's own cgroup is the one above.
fn strip_runner_leaf(path: &str) -> String {
    let mut parts: Vec<&str> = path.split('/').collect();
    if parts.len() >= 3
        && parts[parts.len() - 1] == RUNNER_LEAF
        && parts[parts.len() - 2]
            .strip_prefix(RUNNER_PREFIX)
            .is_some_and(valid_id)
    {
        parts.truncate(parts.len() - 2);
        let joined = parts.join("/");
        return if joined.is_empty() {
            "/".into()
        } else {
            joined
        };
    }
    path.to_string()
}

/// `own` relative to a mount whose root is `root`, or None when the mount
/// does not show it (another part of the hierarchy, `..` of a namespace).
fn within_mount(own: &str, root: &str) -> Option<PathBuf> {
    let rel = Path::new(own).strip_prefix(root).ok()?;
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| rel.to_path_buf())
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ----- Small helpers -----

/// Sandbox and runner ids: `[A-Za-z0-9_-]{1,128}`, one rule with the
/// sandbox dirs'.
use crate::layout::valid_sandbox_id as valid_id;

/// An id as shown in a message: at most 140 characters.
fn cut(id: &str) -> String {
    id.chars().take(140).collect()
}

/// Writes `n` in decimal into `buf` without allocating; returns the digits.
fn decimal(mut n: u32, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The number after `key` on its own line (`oom_kill 3`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key)).then(|| words.next()?.parse().ok())?
    })
}

fn open_base(path: &Path, fs: Fs, version: Version) -> Result<OwnedFd, SetupError> {
    let fd = open_dir(path).map_err(io_err("opening", path))?;
    if fs == Fs::Kernel {
        // SAFETY: a plain C struct; all zeroes is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a statfs buffer of the right type.
        if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io_err("statfs", path)(io::Error::last_os_error()).into());
        }
        // The constants and f_type are i64 on some targets, u32 on others.
        #[allow(clippy::unnecessary_cast)]
        let (want, got) = match version {
            Version::V1 => (libc::CGROUP_SUPER_MAGIC as i64, st.f_type as i64),
            Version::V2 => (libc::CGROUP2_SUPER_MAGIC as i64, st.f_type as i64),
        };
        if got != want {
            return Err(SetupError::NotCgroupFs {
                path: path.to_path_buf(),
                version,
            });
        }
    }
    Ok(fd)
}

/// Creates (or finds, after a restart) `name` under `base`, never through a
/// symlink.
fn make_runner_dir(
    fs: Fs,
    base: &OwnedFd,
    base_path: &Path,
    name: &str,
) -> Result<(OwnedFd, PathBuf), SetupError> {
    let path = base_path.join(name);
    let cname = CString::new(name)?;
    make_dir(fs, base.as_fd(), &cname).map_err(io_err("creating", &path))?;
    let dir = open_subdir(base.as_fd(), &cname).map_err(io_err("opening", &path))?;
    Ok((dir, path))
}

/// Opens a dir given by the kernel or the caller (symlinks in it followed).
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path; the fd returned is new and ours.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the dir `name` in `parent`, refusing a symlink.
fn open_subdir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a valid dir fd and a NUL-terminated name; the fd is new.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_file(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<std::fs::File> {
    // SAFETY: a valid dir fd and a NUL-terminated name; the fd is new.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Writes a control file in one write(2), as cgroupfs wants.
fn write_at(dir: BorrowedFd<'_>, name: &CStr, value: &str) -> io::Result<()> {
    let mut f = open_file(dir, name, libc::O_WRONLY | libc::O_TRUNC)?;
    let n = f.write(value.as_bytes())?;
    if n != value.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

fn read_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<String> {
    let f = open_file(dir, name, libc::O_RDONLY)?;
    let mut bytes = Vec::new();
    f.take(READ_CAP).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The pids of `cgroup.procs`; lines that are not pids are skipped.
fn read_pids(dir: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    Ok(read_at(dir, c"cgroup.procs")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Whether `name` in `dir` is a regular file (not through a symlink).
fn file_exists(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    // SAFETY: a plain C struct; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, a stat buffer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
}

/// Entries of `dir` with whether each is a dir (a symlink is not).
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(String, bool)>> {
    // Reading through our own fd: the path is never walked again.
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let entry = entry?;
        let is_dir = entry.file_type()?.is_dir();
        if let Some(name) = entry.file_name().to_str() {
            out.push((name.to_string(), is_dir));
        }
    }
    Ok(out)
}

/// mkdir; an existing dir is fine (it is opened with O_NOFOLLOW next).
fn make_dir(fs: Fs, parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fd, NUL-terminated name.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EEXIST) {
            Ok(())
        } else {
            Err(e)
        };
    }
    #[cfg(test)]
    if fs == Fs::Simulated {
        simulate_mkdir(parent, name)?;
    }
    let _ = fs;
    Ok(())
}

fn remove_dir(fs: Fs, parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    #[cfg(test)]
    if fs == Fs::Simulated {
        if let Ok(dir) = open_subdir(parent, name) {
            for (file, is_dir) in list_dir(dir.as_fd())? {
                if !is_dir {
                    let c = CString::new(file)
                        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                    // SAFETY: valid fd, NUL-terminated name.
                    unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
                }
            }
        }
    }
    let _ = fs;
    // SAFETY: valid fd, NUL-terminated name.
    if unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the kernel does on mkdir in cgroupfs, roughly: the new dir gets the
/// parent's control files, with empty membership.
#[cfg(test)]
fn simulate_mkdir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let dir = open_subdir(parent, name)?;
    for (file, is_dir) in list_dir(parent)? {
        let c =
            CString::new(file.as_str()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if is_dir || !file_exists(parent, &c) {
            continue;
        }
        let content = match file.as_str() {
            "cgroup.procs" | "tasks" | "cgroup.subtree_control" => String::new(),
            _ => read_at(parent, &c)?,
        };
        let mut f = open_file(dir.as_fd(), &c, libc::O_WRONLY | libc::O_CREAT)?;
        f.write_all(content.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    const MIB: u64 = 1 << 20;

    fn limits() -> Resolved {
        Resolved {
            memory_bytes: 64 * MIB,
            cpu_millis: 500,
            pids: 32,
        }
    }

    fn put(path: &Path, content: &str) {
        std::fs::write(path, content).unwrap();
    }

    fn get(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// A temp dir laid out like three v1 hierarchies, the runner's own
    /// memory cgroup not being the root (as on this machine).
    fn v1_layout(tmp: &Path, memsw: bool, cpu: bool) -> Layout {
        let memory = tmp.join("memory/process_api/abc");
        let pids = tmp.join("pids");
        let cpu_dir = tmp.join("cpu,cpuacct");
        for d in [&memory, &pids, &cpu_dir] {
            std::fs::create_dir_all(d).unwrap();
            put(&d.join("cgroup.procs"), "1\n77\n");
            put(&d.join("tasks"), "1\n77\n");
        }
        put(
            &memory.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        if memsw {
            put(
                &memory.join("memory.memsw.limit_in_bytes"),
                "9223372036854771712\n",
            );
        }
        put(&memory.join("memory.swappiness"), "60\n");
        put(
            &memory.join("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 0\noom_kill 0\n",
        );
        put(&pids.join("pids.max"), "max\n");
        put(&cpu_dir.join("cpu.cfs_period_us"), "100000\n");
        if cpu {
            put(&cpu_dir.join("cpu.cfs_quota_us"), "-1\n");
        }
        Layout::V1 {
            memory,
            pids,
            cpu: Some(cpu_dir),
        }
    }

    /// A temp dir laid out like the runner's own cgroup in a v2 hierarchy.
    fn v2_layout(tmp: &Path, controllers: &str, procs: &str, root: bool) -> Layout {
        let own = tmp.join("system.slice/miren.service");
        std::fs::create_dir_all(&own).unwrap();
        put(&own.join("cgroup.controllers"), controllers);
        put(&own.join("cgroup.subtree_control"), "");
        put(&own.join("cgroup.procs"), procs);
        put(&own.join("cgroup.kill"), "");
        if !root {
            put(&own.join("cgroup.type"), "domain\n");
        }
        put(&own.join("memory.max"), "max\n");
        put(&own.join("memory.swap.max"), "max\n");
        put(
            &own.join("memory.events"),
            "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        );
        put(&own.join("pids.max"), "max\n");
        put(&own.join("cpu.max"), "max 100000\n");
        Layout::V2 { own }
    }

    fn simulated(layout: Layout, runner: &str) -> Cgroups {
        Cgroups::set_up(layout, runner, Fs::Simulated)
    }

    #[test]
    fn v1_writes_each_limit_in_its_controller() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, true), "r1");
        assert_eq!(cg.describe(), "cgroup v1 (memory, pids, cpu)");
        assert_eq!(cg.version(), Some(Version::V1));
        let sb = cg.create("web-1_a", &limits()).unwrap();
        let m = tmp
            .path()
            .join("memory/process_api/abc/miren-runner-r1/sandbox-web-1_a");
        let p = tmp.path().join("pids/miren-runner-r1/sandbox-web-1_a");
        let c = tmp
            .path()
            .join("cpu,cpuacct/miren-runner-r1/sandbox-web-1_a");
        assert_eq!(sb.paths(), vec![m.clone(), p.clone(), c.clone()]);
        assert_eq!(get(&m.join("memory.limit_in_bytes")), "67108864");
        assert_eq!(get(&m.join("memory.memsw.limit_in_bytes")), "67108864");
        assert_eq!(get(&m.join("memory.oom_control")), "0");
        assert_eq!(
            get(&m.join("memory.swappiness")),
            "60\n",
            "memsw covers swap"
        );
        assert_eq!(get(&p.join("pids.max")), "32");
        assert_eq!(get(&c.join("cpu.cfs_period_us")), "100000");
        assert_eq!(get(&c.join("cpu.cfs_quota_us")), "50000");
        // Nothing of another controller leaks into a hierarchy.
        assert!(!p.join("memory.limit_in_bytes").exists());
        assert!(!m.join("pids.max").exists());
        sb.remove().unwrap();
        for d in [&m, &p, &c] {
            assert!(!d.exists(), "{}", d.display());
        }
    }

    #[test]
    fn v1_without_swap_accounting_keeps_the_sandbox_out_of_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), false, true), "r1");
        let sb = cg.create("s", &limits()).unwrap();
        let m = &sb.paths()[0];
        assert_eq!(get(&m.join("memory.limit_in_bytes")), "67108864");
        assert_eq!(get(&m.join("memory.swappiness")), "0");
        assert!(!m.join("memory.memsw.limit_in_bytes").exists());
    }

    #[test]
    fn v1_without_cpu_limits_the_rest_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, false), "r1");
        assert!(
            cg.describe()
                .starts_with("cgroup v1 (memory, pids; cpu not limited: ")
                && cg.describe().contains("no cpu.cfs_quota_us"),
            "{}",
            cg.describe()
        );
        let sb = cg.create("s", &limits()).unwrap();
        assert_eq!(sb.paths().len(), 2);
        assert!(!tmp.path().join("cpu,cpuacct/miren-runner-r1").exists());

        let tmp = tempfile::tempdir().unwrap();
        let Layout::V1 { memory, pids, .. } = v1_layout(tmp.path(), true, true) else {
            unreachable!()
        };
        let cg = simulated(
            Layout::V1 {
                memory,
                pids,
                cpu: None,
            },
            "r1",
        );
        assert_eq!(
            cg.describe(),
            "cgroup v1 (memory, pids; cpu not limited: no cpu controller is mounted)"
        );
    }

    #[test]
    fn v1_controllers_mounted_together_share_one_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let both = tmp.path().join("memory,pids");
        std::fs::create_dir_all(&both).unwrap();
        put(&both.join("cgroup.procs"), "");
        put(&both.join("memory.limit_in_bytes"), "max");
        put(&both.join("memory.oom_control"), "oom_kill 0\n");
        put(&both.join("pids.max"), "max");
        let cg = simulated(
            Layout::V1 {
                memory: both.clone(),
                pids: both.clone(),
                cpu: None,
            },
            "r1",
        );
        let sb = cg.create("s", &limits()).unwrap();
        assert_eq!(sb.paths(), vec![both.join("miren-runner-r1/sandbox-s")]);
        assert_eq!(get(&sb.paths()[0].join("pids.max")), "32");
        assert_eq!(
            get(&sb.paths()[0].join("memory.limit_in_bytes")),
            "67108864"
        );
    }

    #[test]
    fn v2_enables_controllers_and_moves_the_runner_into_a_leaf() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let layout = v2_layout(
            tmp.path(),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
            &format!("{me}\n"),
            false,
        );
        let Layout::V2 { own } = &layout else {
            unreachable!()
        };
        let own = own.clone();
        let cg = simulated(layout, "r2");
        assert_eq!(cg.describe(), "cgroup v2 (memory, pids, cpu)");
        let runner_dir = own.join("miren-runner-r2");
        assert_eq!(cg.runner_dirs(), vec![runner_dir.clone()]);
        assert_eq!(get(&runner_dir.join("runner/cgroup.procs")), me.to_string());
        assert_eq!(
            get(&own.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            get(&runner_dir.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        let sb = cg.create("web", &limits()).unwrap();
        let d = runner_dir.join("sandbox-web");
        assert_eq!(sb.paths(), vec![d.clone()]);
        assert_eq!(get(&d.join("memory.max")), "67108864");
        assert_eq!(get(&d.join("memory.swap.max")), "0");
        assert_eq!(get(&d.join("pids.max")), "32");
        assert_eq!(get(&d.join("cpu.max")), "50000 100000");
        // The runner's leaf is not a leftover: detecting again keeps it.
        drop(sb);
        let again = simulated(v2_layout(tmp.path(), "cpu memory pids", "", false), "r2");
        assert!(again.is_available());
        assert!(runner_dir.join("runner").exists());
        assert!(!d.exists(), "the sandbox cgroup was a leftover");
    }

    #[test]
    fn v2_without_cpu_or_swap_accounting() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = v2_layout(tmp.path(), "memory pids", "", false);
        let Layout::V2 { own } = &layout else {
            unreachable!()
        };
        std::fs::remove_file(own.join("memory.swap.max")).unwrap();
        let own = own.clone();
        let cg = simulated(layout, "r2");
        assert!(
            cg.describe()
                .starts_with("cgroup v2 (memory, pids; cpu not limited: "),
            "{}",
            cg.describe()
        );
        assert_eq!(get(&own.join("cgroup.subtree_control")), "+memory +pids");
        let sb = cg.create("web", &limits()).unwrap();
        let d = &sb.paths()[0];
        assert_eq!(get(&d.join("memory.max")), "67108864");
        assert_eq!(get(&d.join("cpu.max")), "max 100000\n", "cpu.max untouched");
        assert!(!d.join("memory.swap.max").exists());
    }

    #[test]
    fn v2_at_the_root_does_not_move_the_runner() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let layout = v2_layout(tmp.path(), "memory pids cpu", &format!("1\n{me}\n"), true);
        let Layout::V2 { own } = &layout else {
            unreachable!()
        };
        let own = own.clone();
        let cg = simulated(layout, "r3");
        assert!(cg.is_available(), "{}", cg.describe());
        assert!(!own.join("miren-runner-r3/runner").exists());
        assert_eq!(
            get(&own.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
    }

    #[test]
    fn v2_refuses_a_cgroup_shared_with_other_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let layout = v2_layout(
            tmp.path(),
            "memory pids cpu",
            &format!("4242\n{me}\n"),
            false,
        );
        let Layout::V2 { own } = &layout else {
            unreachable!()
        };
        let own = own.clone();
        let cg = simulated(layout, "r4");
        let d = cg.describe();
        assert!(d.starts_with("no limits: the runner's cgroup "), "{d}");
        assert!(d.contains("1 other process (pid 4242…)"), "{d}");
        assert!(d.contains("Delegate=yes"), "{d}");
        assert!(!own.join("miren-runner-r4").exists(), "nothing made");
        assert_eq!(get(&own.join("cgroup.subtree_control")), "");
        assert!(matches!(
            cg.create("s", &limits()),
            Err(CgroupError::Unavailable(_))
        ));
    }

    #[test]
    fn v2_without_memory_or_pids_is_unavailable() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v2_layout(tmp.path(), "cpu io\n", "", false), "r5");
        assert!(!cg.is_available());
        assert_eq!(cg.version(), None);
        let d = cg.describe();
        assert!(
            d.starts_with("no limits: the cgroup v2 hierarchy at ")
                && d.ends_with("lacks the memory and pids controllers (it has: cpu io)"),
            "{d}"
        );
        let cg = simulated(v2_layout(tmp.path(), "", "", false), "r5");
        assert!(
            cg.describe().ends_with("(it has: none)"),
            "{}",
            cg.describe()
        );
    }

    #[test]
    fn a_plain_dir_is_not_taken_for_cgroupfs() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = Cgroups::at(v1_layout(tmp.path(), true, true), "r6");
        assert!(
            cg.describe().ends_with("is not a cgroup v1 filesystem"),
            "{}",
            cg.describe()
        );
        let cg = Cgroups::at(v2_layout(tmp.path(), "memory pids", "", false), "r6");
        assert!(
            cg.describe().ends_with("is not a cgroup v2 filesystem"),
            "{}",
            cg.describe()
        );
    }

    #[test]
    fn leftovers_of_this_runner_only_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = v1_layout(tmp.path(), true, true);
        let a = simulated(layout.clone(), "A");
        let b = simulated(layout.clone(), "B");
        // A "crashes" with two sandboxes; B has one; A's dir also holds an
        // unknown dir and a file, which are not A's sandboxes.
        std::mem::forget(a.create("old-1", &limits()).unwrap());
        std::mem::forget(a.create("old-2", &limits()).unwrap());
        let b_sandbox = b.create("other", &limits()).unwrap();
        let a_dir = tmp.path().join("pids/miren-runner-A");
        std::fs::create_dir(a_dir.join("keep-me")).unwrap();
        put(&a_dir.join("sandbox-file"), "");
        put(&a_dir.join("sandbox-old-1/cgroup.procs"), "12345\n");
        drop(a);

        let a = simulated(layout, "A");
        assert!(a.is_available());
        for root in ["memory/process_api/abc", "pids", "cpu,cpuacct"] {
            let dir = tmp.path().join(root).join("miren-runner-A");
            assert!(dir.exists());
            assert!(!dir.join("sandbox-old-1").exists(), "{}", dir.display());
            assert!(!dir.join("sandbox-old-2").exists(), "{}", dir.display());
            let b_dir = tmp.path().join(root).join("miren-runner-B/sandbox-other");
            assert!(b_dir.exists(), "{}", b_dir.display());
        }
        assert!(a_dir.join("keep-me").exists());
        assert!(a_dir.join("sandbox-file").exists());
        assert_eq!(
            get(&tmp
                .path()
                .join("pids/miren-runner-B/sandbox-other/pids.max")),
            "32"
        );
        drop(b_sandbox);
        a.remove_all();
        assert!(!tmp
            .path()
            .join("memory/process_api/abc/miren-runner-A/sandbox-x")
            .exists());
        assert!(tmp.path().join("pids/miren-runner-B").exists());
    }

    #[test]
    fn ids_are_checked_before_any_path_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, true), "r7");
        let long = "a".repeat(129);
        for bad in [
            "",
            "../x",
            "a/b",
            ".",
            "..",
            "a b",
            "é",
            "a\0b",
            long.as_str(),
        ] {
            assert!(
                matches!(cg.create(bad, &limits()), Err(CgroupError::InvalidId(_))),
                "{bad:?}"
            );
        }
        assert!(cg.create(&"a".repeat(128), &limits()).is_ok());
        let e = cg.create("../../etc", &limits()).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid sandbox id \"../../etc\": expected 1 to 128 characters of A-Z a-z 0-9 _ -"
        );
        for bad in ["", "../up", "a/b"] {
            let cg = simulated(v1_layout(tmp.path(), true, true), bad);
            assert!(
                cg.describe().starts_with("no limits: invalid runner id"),
                "{}",
                cg.describe()
            );
        }
        assert!(!tmp.path().join("pids/miren-runner-").exists());
    }

    #[test]
    fn symlinks_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        put(&elsewhere.join("pids.max"), "untouched");
        let layout = v1_layout(tmp.path(), true, true);
        // The runner's dir is a symlink: unavailable, nothing written there.
        std::os::unix::fs::symlink(&elsewhere, tmp.path().join("pids/miren-runner-evil")).unwrap();
        let cg = simulated(layout.clone(), "evil");
        assert!(
            cg.describe().contains("opening ") && cg.describe().contains("miren-runner-evil"),
            "{}",
            cg.describe()
        );
        // A sandbox dir that is a symlink: refused, not removed as a
        // leftover, not written through.
        let cg = simulated(layout.clone(), "good");
        let link = tmp.path().join("pids/miren-runner-good/sandbox-s");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let e = cg.create("s", &limits()).unwrap_err();
        assert!(
            matches!(
                e,
                CgroupError::Io {
                    action: "opening",
                    ..
                }
            ),
            "{e}"
        );
        let again = simulated(layout, "good");
        assert!(again.is_available());
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(get(&elsewhere.join("pids.max")), "untouched");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1);
        // The sandbox's other dirs were removed when create failed.
        assert!(!tmp
            .path()
            .join("memory/process_api/abc/miren-runner-good/sandbox-s")
            .exists());
    }

    #[test]
    fn a_stale_cgroup_of_the_same_sandbox_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, true), "r8");
        let first = cg.create("s", &limits()).unwrap();
        put(&first.paths()[1].join("pids.max"), "999");
        std::mem::forget(first);
        let second = cg
            .create(
                "s",
                &Resolved {
                    pids: 64,
                    ..limits()
                },
            )
            .unwrap();
        assert_eq!(get(&second.paths()[1].join("pids.max")), "64");
    }

    #[test]
    fn oom_kills_are_the_kernels_counter() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, true), "r9");
        let sb = cg.create("s", &limits()).unwrap();
        assert_eq!(sb.oom_kills(), 0);
        put(
            &sb.paths()[0].join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        assert_eq!(sb.oom_kills(), 3);
        put(
            &sb.paths()[0].join("memory.oom_control"),
            "oom_kill_disable 0\n",
        );
        assert_eq!(sb.oom_kills(), 0, "an old kernel without the counter");
        put(&sb.paths()[0].join("memory.oom_control"), "oom_kill lots\n");
        assert_eq!(sb.oom_kills(), 0);

        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v2_layout(tmp.path(), "memory pids", "", false), "r9");
        let sb = cg.create("s", &limits()).unwrap();
        assert_eq!(sb.oom_kills(), 0);
        put(
            &sb.paths()[0].join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n",
        );
        assert_eq!(sb.oom_kills(), 2);
    }

    #[test]
    fn join_hook_writes_the_childs_own_pid_in_every_hierarchy() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, true), "r10");
        let sb = cg.create("s", &limits()).unwrap();
        let mut cmd = std::process::Command::new("/bin/true");
        // SAFETY: the hook is async-signal-safe (see join_hook).
        unsafe { cmd.pre_exec(sb.join_hook()) };
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        for d in sb.paths() {
            assert_eq!(
                get(&d.join("cgroup.procs")),
                pid.to_string(),
                "{}",
                d.display()
            );
        }
        // After remove, a spawn with the hook fails instead of running
        // outside any cgroup.
        let hook = sb.join_hook();
        sb.remove().unwrap();
        let mut cmd = std::process::Command::new("/bin/true");
        // SAFETY: as above.
        unsafe { cmd.pre_exec(hook) };
        assert!(cmd.spawn().is_err());
    }

    #[test]
    fn kill_all_restores_the_pids_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = simulated(v1_layout(tmp.path(), true, true), "r11");
        let sb = cg.create("s", &limits()).unwrap();
        put(&sb.paths()[1].join("cgroup.procs"), "4242\n4243\n");
        sb.kill_all().unwrap();
        assert_eq!(get(&sb.paths()[1].join("cgroup.procs")), "");
        assert_eq!(get(&sb.paths()[1].join("pids.max")), "32");
    }

    /// /proc/self/cgroup and mountinfo of this machine (v1, with an empty
    /// cgroup2 at /sys/fs/cgroup/unified).
    const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
        4:memory:/process_api/0779c8\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
22 1 253:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hierarchies_of_a_hybrid_host() {
        assert_eq!(
            find_hierarchies(HYBRID_CGROUP, HYBRID_MOUNTS),
            Found {
                v2: Some("/sys/fs/cgroup/unified".into()),
                memory: Some("/sys/fs/cgroup/memory/process_api/0779c8".into()),
                pids: Some("/sys/fs/cgroup/pids".into()),
                cpu: Some("/sys/fs/cgroup/cpu".into()),
            }
        );
    }

    #[test]
    fn hierarchies_of_a_systemd_v1_host_with_comounted_cpu() {
        let cgroup = "11:cpu,cpuacct:/system.slice/miren.service\n\
            6:memory:/system.slice/miren.service\n4:pids:/system.slice/miren.service\n";
        let mounts = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:13 - cgroup cgroup rw,pids
";
        let f = find_hierarchies(cgroup, mounts);
        assert_eq!(
            f.cpu,
            Some("/sys/fs/cgroup/cpu,cpuacct/system.slice/miren.service".into())
        );
        assert_eq!(
            f.memory,
            Some("/sys/fs/cgroup/memory/system.slice/miren.service".into())
        );
        assert_eq!(f.v2, None);
    }

    #[test]
    fn hierarchies_of_a_v2_host_and_a_container() {
        let mounts = "25 20 0:23 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let f = find_hierarchies("0::/system.slice/miren.service\n", mounts);
        assert_eq!(
            f.v2,
            Some("/sys/fs/cgroup/system.slice/miren.service".into())
        );
        assert_eq!(f.memory, None);
        // Detecting again from the leaf an earlier detect moved us into.
        let f = find_hierarchies(
            "0::/system.slice/miren.service/miren-runner-abc/runner\n",
            mounts,
        );
        assert_eq!(
            f.v2,
            Some("/sys/fs/cgroup/system.slice/miren.service".into())
        );
        let f = find_hierarchies("0::/miren-runner-abc/runner\n", mounts);
        assert_eq!(f.v2, Some("/sys/fs/cgroup".into()));
        // Only that exact leaf shape is stripped.
        let f = find_hierarchies("0::/a/miren-runner-../runner\n", mounts);
        assert_eq!(f.v2, Some("/sys/fs/cgroup/a/miren-runner-../runner".into()));
        // A container whose mount shows only its part of the hierarchy.
        let mounts = "700 600 0:23 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        let f = find_hierarchies("0::/docker/abc/app\n", mounts);
        assert_eq!(f.v2, Some("/sys/fs/cgroup/app".into()));
        // Our cgroup is not under the mount's root: not visible there.
        let f = find_hierarchies("0::/docker/other\n", mounts);
        assert_eq!(f.v2, None);
        let f = find_hierarchies("0::/docker/abc/../x\n", mounts);
        assert_eq!(f.v2, None);
        // Escaped mount points.
        let mounts = "25 20 0:23 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        let f = find_hierarchies("0::/\n", mounts);
        assert_eq!(f.v2, Some("/mnt/my cgroups".into()));
        // Garbage is ignored, not a panic.
        let f = find_hierarchies("::\n:\nx\n", "- - -\n1 2 3\n\\\n");
        assert_eq!(f, Found::default());
    }

    #[test]
    fn handles_can_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Cgroups>();
        send_sync::<SandboxCgroup>();
        send_sync::<CgroupError>();
    }

    #[test]
    fn small_helpers() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(7, &mut buf), b"7");
        assert_eq!(decimal(4194304, &mut buf), b"4194304");
        assert_eq!(decimal(u32::MAX, &mut buf), b"4294967295");
        assert_eq!(keyed_value("a 1\noom_kill 5\n", "oom_kill"), Some(5));
        assert_eq!(keyed_value("oom_kill_x 5\n", "oom_kill"), None);
        assert_eq!(unescape("a\\040b\\134c\\"), "a b\\c\\");
        assert_eq!(unescape("\\999"), "\\999");
        assert_eq!(strip_runner_leaf("/"), "/");
    }

    /// Tests against this machine's kernel: they need root and writable
    /// cgroups, and say why when they skip.
    mod real {
        use super::*;
        use std::os::unix::process::ExitStatusExt;
        use std::process::{Command, Stdio};

        /// Says why a test skips, past libtest's capture of `eprintln!`, so a
        /// skip is never mistaken for a pass.
        macro_rules! skipped {
            ($($arg:tt)*) => {{
                let _ = writeln!(std::io::stderr(), $($arg)*);
            }};
        }

        /// Removes the runner's dirs even when the test fails.
        struct Real(Cgroups);

        impl Drop for Real {
            fn drop(&mut self) {
                self.0.remove_all();
            }
        }

        fn runner_id(tag: &str) -> String {
            format!("test-{tag}-{:016x}", rand::random::<u64>())
        }

        fn real(tag: &str) -> Option<Real> {
            // SAFETY: geteuid has no failure mode.
            if unsafe { libc::geteuid() } != 0 {
                skipped!("SKIPPED {tag}: not root, cgroups are not writable");
                return None;
            }
            let layout = match detect_layout() {
                Ok(l) => l,
                Err(reason) => {
                    skipped!("SKIPPED {tag}: {reason}");
                    return None;
                }
            };
            let dirs = match &layout {
                Layout::V2 { own } => vec![own.clone()],
                Layout::V1 { memory, pids, .. } => vec![memory.clone(), pids.clone()],
            };
            for d in dirs {
                let c = CString::new(d.as_os_str().as_bytes()).unwrap();
                // SAFETY: a NUL-terminated path.
                if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
                    skipped!(
                        "SKIPPED {tag}: {} is not writable: {}",
                        d.display(),
                        io::Error::last_os_error()
                    );
                    return None;
                }
            }
            let cg = Cgroups::detect(&runner_id(tag));
            assert!(cg.is_available(), "root, writable, yet {}", cg.describe());
            eprintln!("{tag}: {}", cg.describe());
            Some(Real(cg))
        }

        fn spawn_in(sb: &SandboxCgroup, program: &str, args: &[&str]) -> std::process::Child {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // SAFETY: the hook is async-signal-safe (see join_hook).
            unsafe { cmd.pre_exec(sb.join_hook()) };
            cmd.spawn().unwrap()
        }

        fn file(d: &Path, name: &str) -> String {
            std::fs::read_to_string(d.join(name))
                .unwrap()
                .trim()
                .to_string()
        }

        fn members(d: &Path) -> Vec<u32> {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect()
        }

        /// Gone, or a zombie waiting for whoever reaps orphans.
        fn dead(pid: u32) -> bool {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => true,
                Ok(stat) => stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
            }
        }

        #[test]
        fn limits_are_written_and_a_child_joins_every_controller() {
            let Some(cg) = real("limits") else { return };
            let sb = cg.0.create("limits", &limits()).unwrap();
            for d in sb.paths() {
                assert!(d.is_dir(), "{}", d.display());
            }
            let dir_of = |controller: &str| {
                sb.paths()
                    .into_iter()
                    .find(|p| p.join(controller).exists())
                    .unwrap_or_else(|| panic!("no dir with {controller}"))
            };
            match cg.0.version() {
                Some(Version::V1) => {
                    let m = dir_of("memory.limit_in_bytes");
                    assert_eq!(file(&m, "memory.limit_in_bytes"), "67108864");
                    if m.join("memory.memsw.limit_in_bytes").exists() {
                        assert_eq!(file(&m, "memory.memsw.limit_in_bytes"), "67108864");
                    }
                    assert!(file(&m, "memory.oom_control").contains("oom_kill_disable 0"));
                    if cg.0.describe().contains("cpu)") {
                        let c = dir_of("cpu.cfs_quota_us");
                        assert_eq!(file(&c, "cpu.cfs_period_us"), "100000");
                        assert_eq!(file(&c, "cpu.cfs_quota_us"), "50000");
                    }
                }
                Some(Version::V2) => {
                    let d = dir_of("memory.max");
                    assert_eq!(file(&d, "memory.max"), "67108864");
                    if cg.0.describe().contains("cpu)") {
                        assert_eq!(file(&d, "cpu.max"), "50000 100000");
                    }
                }
                None => unreachable!(),
            }
            assert_eq!(file(&dir_of("pids.max"), "pids.max"), "32");

            let mut child = spawn_in(&sb, "/bin/sleep", &["60"]);
            let pid = child.id();
            let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            for d in sb.paths() {
                assert!(members(&d).contains(&pid), "{} lacks {pid}", d.display());
            }
            assert!(own.contains("sandbox-limits"), "{own}");
            let paths = sb.paths();
            sb.remove().unwrap();
            let status = child.wait().unwrap();
            assert_eq!(status.signal(), Some(libc::SIGKILL));
            for d in paths {
                assert!(!d.exists(), "{} left", d.display());
            }
        }

        #[test]
        fn memory_over_the_limit_is_oom_killed_and_counted() {
            let Some(cg) = real("oom") else { return };
            let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
                .into_iter()
                .find(|p| Path::new(p).exists());
            let Some(python) = python else {
                skipped!("SKIPPED oom: no python3 to allocate with");
                return;
            };
            let sb = cg.0.create("oom", &limits()).unwrap();
            assert_eq!(sb.oom_kills(), 0);
            // 512 MiB, every byte written, in a 64 MiB cgroup.
            let child = spawn_in(&sb, python, &["-c", "b = b'x' * (512 * 1024 * 1024)"]);
            let out = child.wait_with_output().unwrap();
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGKILL),
                "{:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(sb.oom_kills() >= 1, "oom_kills {}", sb.oom_kills());
            sb.remove().unwrap();
        }

        #[test]
        fn a_fork_bomb_is_held_at_the_pids_limit_and_killed_whole() {
            let Some(cg) = real("pids") else { return };
            let sb = cg.0.create("pids", &limits()).unwrap();
            let pids_dir = sb
                .paths()
                .into_iter()
                .find(|p| p.join("pids.max").exists())
                .unwrap();
            // Each sleep leaves the shell's process group and session (and
            // lets go of stderr, which the test reads to the end).
            let script = "i=0; while [ $i -lt 200 ]; do \
                setsid sleep 300 >/dev/null 2>&1 & i=$((i+1)); done; wait";
            let mut child = spawn_in(&sb, "/bin/sh", &["-c", script]);
            let mut most = 0usize;
            let mut exited = None;
            for _ in 0..400 {
                let current: usize = file(&pids_dir, "pids.current").parse().unwrap();
                most = most.max(current).max(members(&pids_dir).len());
                if let Some(status) = child.try_wait().unwrap() {
                    exited = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            if exited.is_none() {
                let _ = child.kill();
            }
            let status = child.wait().unwrap();
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            // The kernel refused forks, the shell said so.
            let events = file(&pids_dir, "pids.events");
            assert!(
                keyed_value(&events, "max").is_some_and(|n| n >= 1),
                "pids.events: {events}"
            );
            assert!(
                stderr.to_lowercase().contains("fork"),
                "status {status:?}, stderr {stderr:?}"
            );
            assert!(most <= 32, "saw {most} tasks under a limit of 32");
            let escaped = members(&pids_dir);
            assert!(escaped.len() >= 16, "only {} sleeps running", escaped.len());
            // SAFETY: getsid only reads.
            let sid = unsafe { libc::getsid(escaped[0] as i32) };
            // SAFETY: getpgid only reads.
            let pgid = unsafe { libc::getpgid(escaped[0] as i32) };
            assert_eq!(sid, escaped[0] as i32, "setsid made its own session");
            assert_eq!(pgid, escaped[0] as i32, "and its own process group");
            let paths = sb.paths();
            sb.remove().unwrap();
            for pid in escaped {
                assert!(dead(pid), "pid {pid} survived");
            }
            for d in paths {
                assert!(!d.exists(), "{} left", d.display());
            }
        }

        #[test]
        fn a_live_fork_bomb_is_killed_while_it_forks() {
            let Some(cg) = real("bomb") else { return };
            let sb = cg.0.create("bomb", &limits()).unwrap();
            let pids_dir = sb
                .paths()
                .into_iter()
                .find(|p| p.join("pids.max").exists())
                .unwrap();
            // Every member forks forever in its own session and never exits
            // on its own (a failed fork is just tried again), so the bomb is
            // alive and forking at the limit when it is killed. (A bomb whose
            // members exit when a fork fails can die out by itself before
            // it is looked at, which made this test flaky.)
            let mut child = spawn_in(
                &sb,
                "/bin/sh",
                &["-c", "while :; do setsid sh -c 'while :; do sleep 100 & done' 2>/dev/null & done 2>/dev/null"],
            );
            // Wait (bounded) until the bomb has reached the limit once.
            for _ in 0..400 {
                let events = file(&pids_dir, "pids.events");
                if keyed_value(&events, "max").is_some_and(|n| n >= 1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let events = file(&pids_dir, "pids.events");
            assert!(
                keyed_value(&events, "max").is_some_and(|n| n >= 1),
                "the bomb never reached the limit: {events}"
            );
            let paths = sb.paths();
            let seen = members(&pids_dir);
            assert!(!seen.is_empty());
            sb.remove().unwrap();
            let _ = child.wait();
            for pid in seen {
                assert!(dead(pid), "pid {pid} survived");
            }
            for d in paths {
                assert!(!d.exists(), "{} left", d.display());
            }
        }

        #[test]
        fn leftovers_are_killed_at_the_next_start_of_the_same_runner_only() {
            // SAFETY: geteuid has no failure mode.
            if unsafe { libc::geteuid() } != 0 {
                skipped!("SKIPPED leftovers: not root, cgroups are not writable");
                return;
            }
            let Some(other) = real("other") else { return };
            let id = runner_id("leftovers");
            let first = Cgroups::detect(&id);
            assert!(first.is_available(), "{}", first.describe());
            let first = Real(first);
            let sb = first.0.create("crashed", &limits()).unwrap();
            let mut orphan = spawn_in(&sb, "/bin/sleep", &["300"]);
            let paths = sb.paths();
            let other_sb = other.0.create("crashed", &limits()).unwrap();
            let mut bystander = spawn_in(&other_sb, "/bin/sleep", &["300"]);
            // The runner "crashes": its handles are lost, its dirs stay.
            std::mem::forget(sb);
            std::mem::forget(first);

            let second = Real(Cgroups::detect(&id));
            assert!(second.0.is_available(), "{}", second.0.describe());
            assert_eq!(orphan.wait().unwrap().signal(), Some(libc::SIGKILL));
            for d in &paths {
                assert!(!d.exists(), "{} left", d.display());
            }
            // Another runner's sandbox is untouched.
            assert!(bystander.try_wait().unwrap().is_none());
            for d in other_sb.paths() {
                assert!(members(&d).contains(&bystander.id()));
            }
            other_sb.remove().unwrap();
            assert_eq!(bystander.wait().unwrap().signal(), Some(libc::SIGKILL));
        }
    }
}
