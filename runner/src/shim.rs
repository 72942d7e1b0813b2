//! `miren sandbox-shim`: the first process inside an isolated sandbox.
//!
//! A sandbox has its own network namespace with only loopback, so nothing
//! outside can reach its ports and it can reach nothing outside. The shim is
//! the sandbox's only door, through two unix sockets (see [`crate::layout`]
//! for who may write which dir):
//!
//! - `127.0.0.1:<token port>` inside -> `/run/miren/identity/token.sock`,
//!   served by the runner for this sandbox alone (the caller is identified
//!   by where it stands), in a dir the sandbox sees read-only;
//! - the service's socket -> `127.0.0.1:$PORT` inside: bound by the runner
//!   in its own dir (never visible inside) and handed down as a descriptor
//!   (`--app-listener-fd`); the shim listens on it only once the service
//!   accepts connections, so a connection that succeeds means "healthy".
//!
//! It starts the service as its child, forwards SIGTERM/SIGINT to it and
//! exits with its status.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::layout::{INSIDE_IDENTITY, TOKEN_SOCKET};

/// The runner's token endpoint for this sandbox, as the shim sees it.
pub fn inside_token_socket() -> PathBuf {
    Path::new(INSIDE_IDENTITY).join(TOKEN_SOCKET)
}

/// Where the shim finds the runner and where it exposes the service.
#[derive(Debug)]
pub struct ShimPaths {
    pub token_socket: PathBuf,
    /// The service's socket, bound by the runner and not yet listening.
    pub app_listener: OwnedFd,
}

/// Why the shim cannot take the descriptor it was given as the service's
/// socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ListenerFdError {
    /// Standard input, output or error (or negative).
    #[error("--app-listener-fd {0}: not a descriptor the runner hands down")]
    NotHandedDown(RawFd),
    /// Not open, or not a stream socket.
    #[error("--app-listener-fd {0}: not an open stream socket")]
    NotAStreamSocket(RawFd),
}

impl ShimPaths {
    /// Takes descriptor `fd` as the service's socket: it must be an open
    /// stream socket (the runner's), not one of stdio.
    pub fn new(token_socket: PathBuf, fd: RawFd) -> Result<Self, ListenerFdError> {
        if fd < 3 {
            return Err(ListenerFdError::NotHandedDown(fd));
        }
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `kind`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 || kind != libc::SOCK_STREAM {
            return Err(ListenerFdError::NotAStreamSocket(fd));
        }
        // The service's own processes must not inherit it.
        // SAFETY: fcntl sets a flag of a descriptor of this process.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(ShimPaths {
            token_socket,
            // SAFETY: the descriptor is open (getsockopt succeeded) and
            // nothing else in this process owns it.
            app_listener: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

/// Runs the shim; returns the process exit code.
pub fn main(paths: ShimPaths, app_port: u16, token_port: u16, command: String) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-shim: {e}");
            return 70;
        }
    };
    rt.block_on(run(paths, app_port, token_port, command))
}

async fn run(paths: ShimPaths, app_port: u16, token_port: u16, command: String) -> i32 {
    let token_sock = paths.token_socket;
    let token = match TcpListener::bind(("127.0.0.1", token_port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sandbox-shim: token endpoint 127.0.0.1:{token_port}: {e}");
            return 70;
        }
    };
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = token.accept().await {
            let path = token_sock.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = UnixStream::connect(&path).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });

    let mut child = match tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {command}"))
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandbox-shim: could not start {command:?}: {e}");
            return 127;
        }
    };
    let pid = child.id();
    tokio::spawn(expose_when_ready(app_port, paths.app_listener));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    loop {
        tokio::select! {
            status = child.wait() => {
                return status.ok().and_then(|s| s.code()).unwrap_or(1);
            }
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => forward(pid, libc::SIGTERM),
            _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => forward(pid, libc::SIGINT),
        }
    }
}

fn forward(pid: Option<u32>, signal: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a process group id we created; no memory involved.
        unsafe {
            libc::kill(-(pid as i32), signal);
        }
    }
}

/// Waits until the service accepts connections on its port, then listens
/// on the runner's socket and forwards every connection to it.
async fn expose_when_ready(port: u16, socket: OwnedFd) {
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listener = match listen(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sandbox-shim: the service's socket: {e}");
            return;
        }
    };
    while let Ok((mut unix, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await {
                let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
            }
        });
    }
}

/// Listens on a bound socket, as a tokio listener.
fn listen(socket: OwnedFd) -> std::io::Result<UnixListener> {
    let socket = socket2::Socket::from(socket);
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(OwnedFd::from(
        socket,
    )))
}

/// The user and group a bubblewrap sandbox runs as, inside its own user
/// namespace (`nobody`): not root, so it holds no capabilities there. The
/// namespace maps it to the runner's user, so the sandbox can still write
/// its own app and run dirs.
pub const SANDBOX_UID: &str = "65534";

/// What a sandbox sees of the host's `/etc`: name resolution, users and
/// groups (no shadow files), TLS roots, the dynamic linker's cache, time
/// zone and the alternatives links Debian's commands go through.
pub const SANDBOX_ETC: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/debian_version",
    "/etc/locale.alias",
];

/// Who a bubblewrap sandbox runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxUser {
    /// `nobody` in its own user namespace, with no capabilities.
    Nobody,
    /// The runner's user, where this machine allows no user namespaces
    /// (the other namespaces still apply); said loudly.
    Runner,
    /// `nobody` in its own user namespace, but this bubblewrap (before 0.8)
    /// cannot forbid nested user namespaces, in which a sandbox holds
    /// capabilities over its own mounts and (cgroup v1) its cgroup's limit
    /// files; said loudly.
    NobodyNestable,
}

impl SandboxUser {
    /// The namespace and identity arguments of a bubblewrap sandbox.
    ///
    /// Nested user namespaces are forbidden (`--disable-userns`): inside
    /// one, the sandbox (host root outside, as the runner often is) would
    /// hold CAP_SYS_ADMIN over a mount namespace of its own, mount cgroupfs
    /// and rewrite its own memory, pids and cpu limits.
    fn args(self) -> &'static [&'static str] {
        match self {
            SandboxUser::Nobody => &[
                "--unshare-all",
                "--unshare-user",
                "--disable-userns",
                "--assert-userns-disabled",
                "--uid",
                SANDBOX_UID,
                "--gid",
                SANDBOX_UID,
                "--die-with-parent",
            ],
            SandboxUser::NobodyNestable => &[
                "--unshare-all",
                "--unshare-user",
                "--uid",
                SANDBOX_UID,
                "--gid",
                SANDBOX_UID,
                "--die-with-parent",
            ],
            SandboxUser::Runner => &["--unshare-all", "--die-with-parent"],
        }
    }
}

/// How bubblewrap can make sandboxes on this machine: as `nobody` in a user
/// namespace, else (no user namespaces) as the runner's user, else not at
/// all.
pub fn bwrap_support() -> Option<SandboxUser> {
    [
        SandboxUser::Nobody,
        SandboxUser::NobodyNestable,
        SandboxUser::Runner,
    ]
    .into_iter()
    .find(|user| bwrap_works(*user))
}

fn bwrap_works(user: SandboxUser) -> bool {
    bwrap_runs(user, &["--proc", "/proc", "--dev", "/dev"])
}

/// Whether this bubblewrap takes `--size` (bubblewrap 0.7 and later) for
/// the tmpfs it mounts, as `user`.
pub fn bwrap_takes_size(user: SandboxUser) -> bool {
    bwrap_runs(user, &["--size", "4096", "--tmpfs", "/tmp"])
}

/// Whether bubblewrap runs `true` as `user` over a read-only view of `/`
/// with `options`.
fn bwrap_runs(user: SandboxUser, options: &[&str]) -> bool {
    std::process::Command::new("bwrap")
        .args(user.args())
        .args(["--ro-bind", "/", "/"])
        .args(options)
        .arg("true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What of the host a bubblewrap sandbox sees.
#[derive(Debug, Clone, Copy)]
pub struct Mounts<'a> {
    /// The unpacked app's path: where the sandbox sees its app dir.
    pub app: &'a Path,
    /// What is bound there, writable: the capped view over the app
    /// ([`crate::scratch`]), or the app dir itself.
    pub writable: &'a Path,
    /// The runner's identity dir (token file and socket), bound read-only.
    pub identity: &'a Path,
    /// Where the sandbox's `/tmp` and `/dev/shm` come from.
    pub private: Private<'a>,
}

/// The sandbox's `/tmp`, `/var/tmp`, `/dev/shm` and `/run`, its only
/// writable places besides its app dir (`/` and `/dev` are read-only;
/// the runner's dirs under `/run/miren` are mounted over `/run`).
#[derive(Debug, Clone, Copy)]
pub enum Private<'a> {
    /// Dirs of its capped scratch tmpfs ([`crate::scratch::Layer`]): one
    /// cap for every byte and file the sandbox writes. `tmp` serves
    /// `/var/tmp` too.
    Scratch {
        tmp: &'a Path,
        shm: &'a Path,
        run: &'a Path,
    },
    /// Tmpfs of their own (the runner cannot mount), each capped at `size`
    /// bytes where this bubblewrap takes `--size`.
    Own { size: Option<u64> },
}

/// The bubblewrap command that runs `shim_args` as `user` (normally
/// [`SANDBOX_UID`] in its own user namespace) with its own pid, mount,
/// network (loopback only), uts and ipc namespaces, system dirs read-only,
/// a private `/tmp` and `/dev/shm` ([`Private`]), `/` and `/dev` read-only,
/// and from the host only this sandbox's app dir (its writable view, at the
/// app dir's own path) and identity dir (read-only).
///
/// Bubblewrap itself runs on the host with nothing in its environment but
/// `path` (where to find it): the sandbox's variables (`env`, the app's
/// among them) are given to it as `--setenv` after `--clearenv`, and so
/// reach only what runs inside. Set on bubblewrap's own process, a
/// `LD_PRELOAD` or `LD_LIBRARY_PATH` of the app's would load the app's
/// code into a host process running as the runner's user.
pub fn bwrap_command(
    user: SandboxUser,
    miren: &Path,
    mounts: &Mounts<'_>,
    path: &str,
    env: &[(String, String)],
    shim_args: &[String],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("bwrap");
    cmd.env_clear().env("PATH", path);
    cmd.arg("--clearenv");
    for (name, value) in env {
        cmd.arg("--setenv").arg(name).arg(value);
    }
    cmd.args(user.args()).args(["--hostname", "sandbox"]);
    for dir in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"] {
        cmd.args(["--ro-bind-try", dir, dir]);
    }
    // Only the parts of /etc programs need: the sandbox is host root to
    // the kernel's permission checks, so a whole /etc would give it
    // /etc/shadow, host keys and every other root-only file there.
    for path in SANDBOX_ETC {
        cmd.args(["--ro-bind-try", path, path]);
    }
    cmd.args(["--proc", "/proc", "--dev", "/dev"]);
    match mounts.private {
        Private::Scratch { tmp, shm, run } => {
            cmd.arg("--bind").arg(tmp).arg("/tmp");
            cmd.arg("--bind").arg(tmp).arg("/var/tmp");
            cmd.arg("--bind").arg(shm).arg("/dev/shm");
            cmd.arg("--bind").arg(run).arg("/run");
        }
        Private::Own { size } => {
            for dest in ["/tmp", "/var/tmp", "/dev/shm", "/run"] {
                if let Some(size) = size {
                    cmd.arg("--size").arg(size.max(4096).to_string());
                }
                cmd.args(["--tmpfs", dest]);
            }
        }
    }
    // The sandbox's user is the runner's user outside the namespace (often
    // root), and the kernel lets host root write root-owned /proc/sys files
    // without a capability: keep them read-only.
    cmd.args(["--ro-bind", "/proc/sys", "/proc/sys"]);
    cmd.args([
        "--ro-bind-try",
        "/proc/sysrq-trigger",
        "/proc/sysrq-trigger",
    ]);
    let miren = miren.display().to_string();
    cmd.args(["--ro-bind", &miren, "/run/miren/miren"]);
    let app = mounts.app.display().to_string();
    let writable = mounts.writable.display().to_string();
    let identity = mounts.identity.display().to_string();
    cmd.args(["--bind", &writable, &app, "--chdir", &app]);
    cmd.args(["--ro-bind", &identity, INSIDE_IDENTITY]);
    // Bubblewrap's root and /dev are tmpfs of their own, writable and
    // uncapped: read-only once everything is mounted on them (not
    // recursively, so the app dir, /tmp and /dev/shm stay writable; device
    // nodes still open for writing).
    cmd.args(["--remount-ro", "/dev", "--remount-ro", "/"]);
    cmd.arg("--")
        .arg("/run/miren/miren")
        .arg("sandbox-shim")
        .args(shim_args);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SandboxDirs;

    fn mounts(dirs: &SandboxDirs) -> Mounts<'_> {
        Mounts {
            app: &dirs.app,
            writable: &dirs.layer.view,
            identity: &dirs.identity,
            private: Private::Own {
                size: Some(64 << 20),
            },
        }
    }

    fn args(user: SandboxUser) -> Vec<String> {
        let dirs = SandboxDirs::new(Path::new("/var/lib/r"), "s1");
        let cmd = bwrap_command(
            user,
            Path::new("/usr/bin/miren"),
            &mounts(&dirs),
            "/usr/bin:/bin",
            &[],
            &["--".into(), "app".into()],
        );
        cmd.as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_apps_variables_are_set_inside_never_on_bubblewrap() {
        let env = [
            ("LD_PRELOAD".to_string(), "/srv/app/evil.so".to_string()),
            (
                "MIREN_IDENTITY_TOKEN_SECRET".to_string(),
                "s3cret".to_string(),
            ),
        ];
        let dirs = SandboxDirs::new(Path::new("/var/lib/r"), "s1");
        let cmd = bwrap_command(
            SandboxUser::Nobody,
            Path::new("/usr/bin/miren"),
            &mounts(&dirs),
            "/usr/bin:/bin",
            &env,
            &["--".into(), "app".into()],
        );
        // Bubblewrap's own process gets PATH and nothing else (the
        // environment is cleared: `get_envs` lists what is set on top).
        let own: Vec<(String, Option<String>)> = cmd
            .as_std()
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert_eq!(
            own,
            [("PATH".to_string(), Some("/usr/bin:/bin".to_string()))]
        );
        let a: Vec<String> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = a.join(" ");
        assert!(
            joined.starts_with(
                "--clearenv --setenv LD_PRELOAD /srv/app/evil.so --setenv MIREN_IDENTITY_TOKEN_SECRET s3cret "
            ),
            "{joined}"
        );
        // ... and before the command bubblewrap runs inside.
        let end_of_options = a.iter().position(|x| x == "--").expect("--");
        assert!(a.iter().position(|x| x == "--setenv").expect("setenv") < end_of_options);
    }

    #[test]
    fn only_an_open_stream_socket_past_stdio_is_taken_as_the_services_socket() {
        let token = PathBuf::from("/run/miren/identity/token.sock");
        assert_eq!(
            ShimPaths::new(token.clone(), 1).map(|_| ()),
            Err(ListenerFdError::NotHandedDown(1))
        );
        let file = tempfile::tempfile().expect("file");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert_eq!(
            ShimPaths::new(token.clone(), fd).map(|_| ()),
            Err(ListenerFdError::NotAStreamSocket(fd))
        );
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .expect("socket");
        let fd = std::os::fd::IntoRawFd::into_raw_fd(socket);
        let paths = ShimPaths::new(token, fd).expect("a stream socket is taken");
        // Not inherited by the service the shim starts.
        // SAFETY: fcntl reads a flag of a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        drop(paths);
    }

    #[test]
    fn sandboxes_run_as_nobody_when_user_namespaces_exist() {
        let a = args(SandboxUser::Nobody).join(" ");
        assert!(
            a.contains(
                "--unshare-user --disable-userns --assert-userns-disabled --uid 65534 --gid 65534"
            ),
            "{a}"
        );
        let a = args(SandboxUser::Runner).join(" ");
        assert!(!a.contains("--uid") && !a.contains("--unshare-user"), "{a}");
    }

    #[test]
    fn only_the_app_view_is_writable_the_identity_dir_read_only_and_logs_never_shared() {
        let a = args(SandboxUser::Nobody).join(" ");
        assert!(
            a.contains("--ro-bind /var/lib/r/sandboxes/s1/identity /run/miren/identity"),
            "{a}"
        );
        // The capped view, at the app dir's own path; nothing else of the
        // runner's disk is writable inside.
        assert!(
            a.contains(
                "--bind /var/lib/r/sandboxes/s1/view /var/lib/r/sandboxes/s1/app --chdir /var/lib/r/sandboxes/s1/app"
            ),
            "{a}"
        );
        assert!(!a.contains("/logs") && !a.contains("app.sock"), "{a}");
        assert!(
            !a.contains("--bind /var/lib/r/sandboxes/s1/identity"),
            "{a}"
        );
    }

    #[test]
    fn writes_go_only_to_the_app_view_tmp_and_shm_and_the_rest_is_read_only() {
        let dirs = SandboxDirs::new(Path::new("/var/lib/r"), "s1");
        let scratch = |private| {
            let cmd = bwrap_command(
                SandboxUser::Nobody,
                Path::new("/usr/bin/miren"),
                &Mounts {
                    private,
                    ..mounts(&dirs)
                },
                "/usr/bin:/bin",
                &[],
                &["--".into(), "app".into()],
            );
            cmd.as_std()
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let a = scratch(Private::Scratch {
            tmp: Path::new("/var/lib/r/sandboxes/s1/scratch/tmp"),
            shm: Path::new("/var/lib/r/sandboxes/s1/scratch/shm"),
            run: Path::new("/var/lib/r/sandboxes/s1/scratch/run"),
        });
        assert!(
            a.contains(
                "--bind /var/lib/r/sandboxes/s1/scratch/tmp /tmp --bind /var/lib/r/sandboxes/s1/scratch/tmp /var/tmp --bind /var/lib/r/sandboxes/s1/scratch/shm /dev/shm --bind /var/lib/r/sandboxes/s1/scratch/run /run"
            ),
            "{a}"
        );
        assert_eq!(a.matches("--bind ").count(), 5, "{a}");
        // The runner's dirs go over the sandbox's /run, after it.
        assert!(
            a.find("--bind /var/lib/r/sandboxes/s1/scratch/run /run")
                < a.find("/run/miren/identity"),
            "{a}"
        );
        assert!(!a.contains("--size") && !a.contains("--tmpfs"), "{a}");
        // Read-only last: after every mount made on them.
        assert!(
            a.ends_with("--remount-ro /dev --remount-ro / -- /run/miren/miren sandbox-shim -- app"),
            "{a}"
        );

        let a = scratch(Private::Own {
            size: Some(64 << 20),
        });
        assert!(
            a.contains(
                "--size 67108864 --tmpfs /tmp --size 67108864 --tmpfs /var/tmp --size 67108864 --tmpfs /dev/shm --size 67108864 --tmpfs /run"
            ),
            "{a}"
        );
        assert_eq!(a.matches("--bind ").count(), 1, "{a}");
        let a = scratch(Private::Own { size: None });
        assert!(
            a.contains("--tmpfs /tmp --tmpfs /var/tmp --tmpfs /dev/shm --tmpfs /run")
                && !a.contains("--size"),
            "{a}"
        );
    }

    #[test]
    fn no_root_only_file_of_etc_is_shared() {
        let a = args(SandboxUser::Nobody);
        assert!(!a.iter().any(|x| x == "/etc"), "{a:?}");
        for secret in [
            "/etc/shadow",
            "/etc/gshadow",
            "/etc/ssh",
            "/etc/ssl/private",
            "/etc/sudoers",
        ] {
            assert!(
                !a.iter().any(|x| x.starts_with(secret)),
                "{secret} in {a:?}"
            );
        }
        assert!(a.iter().any(|x| x == "/etc/ssl/certs"));
    }

    #[test]
    fn proc_sys_is_read_only_after_proc_is_mounted() {
        for user in [SandboxUser::Nobody, SandboxUser::Runner] {
            let a = args(user).join(" ");
            let proc = a.find("--proc /proc").expect("proc mounted");
            let sys = a
                .find("--ro-bind /proc/sys /proc/sys")
                .expect("sys read-only");
            assert!(proc < sys, "{a}");
        }
    }
}
