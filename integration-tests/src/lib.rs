//! Helpers for driving the real `miren` binary from tests: start a server as
//! its own process, wait until it prints its address, run CLI commands with a
//! chosen environment, stop the server with a real signal.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod etcd;

/// Path of the `miren` binary built alongside the tests (`MIREN_BIN`
/// overrides it).
pub fn miren_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIREN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/miren
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir of the test executable");
    let bin = dir.join("miren");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build -p cli`), or run ./scripts/test.sh which does",
        bin.display()
    );
    bin
}

/// The result of one CLI invocation.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `miren args…` with `MIREN_CONFIG=config` and the extra env vars;
/// `MIREN_CLUSTER` is removed unless given.
pub fn miren(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(miren_bin());
    cmd.args(args)
        .env("MIREN_CONFIG", config)
        .env_remove("MIREN_CLUSTER")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running miren").into()
}

/// `miren auth ci add -a APP binding…` against the cluster of `config`:
/// binds CI pipelines (the issuer, subject and conditions in `binding`) to
/// `app`.
pub fn ci_add(config: &Path, app: &str, binding: &[&str]) -> Run {
    let mut args = vec!["auth", "ci", "add", "-a", app];
    args.extend_from_slice(binding);
    miren(config, &args, &[])
}

/// A `miren server` process.
pub struct Server {
    child: Child,
    pub address: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub stdout: Vec<String>,
    stderr_path: PathBuf,
}

/// How long a server, or a test's peer ([`spawn_ready`]), may take to say
/// it is ready.
const STARTUP: Duration = Duration::from_secs(60);

impl Server {
    /// Starts `miren server --data-dir DATA --listen LISTEN` plus `extra`
    /// args, with `MIREN_CONFIG=config`, and waits for its address.
    pub fn start(data_dir: &Path, config: &Path, listen: &str, extra: &[&str]) -> Server {
        match Self::try_start(data_dir, config, listen, extra) {
            Ok(s) => s,
            Err(msg) => panic!("server did not start: {msg}"),
        }
    }

    /// Starts `miren server` on `127.0.0.1:0` with its data in `dir/coord`,
    /// the admin's config at `dir/admin.yaml` and `extra` args, trusting the
    /// loopback `issuer` (`--oidc-allow-loopback-issuers --oidc-ca-file` its
    /// CA): where the CI journeys start.
    pub fn start_trusting(dir: &Path, issuer: &PythonIssuer, extra: &[&str]) -> Server {
        let ca = issuer.ca.to_str().expect("utf-8 path");
        let mut args = extra.to_vec();
        args.extend(["--oidc-allow-loopback-issuers", "--oidc-ca-file", ca]);
        Server::start(
            &dir.join("coord"),
            &dir.join("admin.yaml"),
            "127.0.0.1:0",
            &args,
        )
    }

    /// Like [`Server::start`], with `env` in the server's environment (as a
    /// systemd unit's `EnvironmentFile` gives it).
    pub fn start_env(
        data_dir: &Path,
        config: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        match Self::try_start_env(data_dir, config, listen, extra, env) {
            Ok(s) => s,
            Err(msg) => panic!("server did not start: {msg}"),
        }
    }

    /// Like [`Server::start`], returning the server's error output when it
    /// exits instead of becoming ready.
    pub fn try_start(
        data_dir: &Path,
        config: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Result<Server, String> {
        Self::try_start_env(data_dir, config, listen, extra, &[])
    }

    fn try_start_env(
        data_dir: &Path,
        config: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let stderr_path = config.with_extension(format!("stderr-{}", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(miren_bin());
        cmd.arg("server")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .envs(env.iter().copied())
            .env("MIREN_CONFIG", config)
            .env_remove("MIREN_CLUSTER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let mut address = None;
        let deadline = std::time::Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("Cluster address: ") {
                        address = Some(a.to_string());
                    }
                    // The last line of the ready banner.
                    let done = line.contains("export MIREN_CLUSTER=");
                    lines.push(line);
                    if let (true, Some(address)) = (done, address.clone()) {
                        // Keep draining stdout so the server never blocks on it.
                        std::thread::spawn(move || for _ in rx {});
                        return Ok(Server {
                            child,
                            address,
                            data_dir: data_dir.to_path_buf(),
                            config: config.to_path_buf(),
                            stdout: lines,
                            stderr_path,
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    return Err(format!("stdout: {lines:?}\nstderr: {err}"));
                }
            }
        }
    }

    /// The server's process id (for reading `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port` part of the address.
    pub fn host_port(&self) -> &str {
        self.address.split(';').next().unwrap_or_default()
    }

    /// The issuer URL the server printed.
    pub fn issuer_url(&self) -> String {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix("Issuer URL: "))
            .expect("the server printed no issuer URL")
            .to_string()
    }

    /// The cluster CA certificate (PEM file) its HTTPS listener chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.crt")
    }

    /// The address (`host:port`) the server printed after `prefix`, such as
    /// `"HTTP ingress: http://"`.
    pub fn printed_address(&self, prefix: &str) -> String {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("the server printed no {prefix:?} line"))
            .to_string()
    }

    /// Sends SIGTERM and waits; returns whether it exited successfully, and
    /// its error output.
    pub fn stop(mut self) -> (bool, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    break None;
                }
            }
        };
        let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        (status.is_some_and(|s| s.success()), err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temporary directory for one test.
pub fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("miren-it-")
        .tempdir()
        .expect("temp dir")
}

/// A `miren runner` process with its output captured to files.
pub struct RunnerProc {
    child: Child,
    pub data_dir: PathBuf,
    out_path: PathBuf,
}

impl RunnerProc {
    /// Starts `miren runner --data-dir DIR [--join CODE] extra…`.
    pub fn start(data_dir: &Path, join: Option<&str>, extra: &[&str]) -> RunnerProc {
        Self::start_with(Command::new(miren_bin()), data_dir, join, extra)
    }

    /// Like [`RunnerProc::start`] with a prepared command (e.g. `ip netns exec NS miren`).
    pub fn start_with(
        mut cmd: Command,
        data_dir: &Path,
        join: Option<&str>,
        extra: &[&str],
    ) -> RunnerProc {
        let out_path = data_dir.with_extension("log");
        let out = std::fs::File::create(&out_path).expect("runner log");
        let err = out.try_clone().expect("runner log");
        cmd.arg("runner").arg("--data-dir").arg(data_dir);
        if let Some(code) = join {
            cmd.arg("--join").arg(code);
        }
        cmd.args(extra)
            .env_remove("MIREN_CLUSTER")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("starting miren runner");
        RunnerProc {
            child,
            data_dir: data_dir.to_path_buf(),
            out_path,
        }
    }

    /// Starts a runner joining with `code` (`--isolation none` and the
    /// like in `extra`) and waits until the cluster of `config` lists a
    /// runner `ready`.
    pub fn start_ready(config: &Path, data_dir: &Path, code: &str, extra: &[&str]) -> RunnerProc {
        let runner = RunnerProc::start(data_dir, Some(code), extra);
        assert!(
            wait_for(Duration::from_secs(30), || runners(config)
                .iter()
                .any(|r| r["status"] == "ready")),
            "runner never became ready: {}",
            runner.output()
        );
        runner
    }

    /// The runner's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the runner printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    /// Waits for the process to exit on its own; returns (success, output).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(bool, String)> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status.success(), self.output()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The coordinator it last said it mints through (`Runner mints through
    /// HOST:PORT`; it says so whenever that changes).
    pub fn mints_through(&self) -> Option<String> {
        self.output()
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Runner mints through "))
            .map(|s| s.trim().to_string())
    }

    /// The runner id it saved when it joined.
    pub fn runner_id(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.data_dir.join("runner.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["runner_id"].as_str().map(str::to_string)
    }
}

impl Drop for RunnerProc {
    /// SIGTERM first, SIGKILL after 5 s: a runner stopped so stops its
    /// sandboxes whole (cgroup), while a SIGKILLed one takes only each
    /// plain-process sandbox's first process with it, and what that forked
    /// (an nginx master's workers) would outlive the test.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it is true or `limit` passes.
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The repository's root (for fixtures and the example app).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the repository")
        .to_path_buf()
}

/// `miren app status -a APP -o json` as JSON.
pub fn app_status(config: &Path, app: &str) -> serde_json::Value {
    let run = miren(config, &["app", "status", "-a", app, "-o", "json"], &[]);
    assert!(run.ok, "{run:?}");
    serde_json::from_str(&run.stdout).expect("app status -o json")
}

/// `miren runner list -o json` as JSON.
pub fn runners(config: &Path) -> Vec<serde_json::Value> {
    let run = miren(config, &["runner", "list", "-o", "json"], &[]);
    if !run.ok {
        return vec![];
    }
    serde_json::from_str::<serde_json::Value>(&run.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Status of runner `id` in `runner list`, if listed.
pub fn runner_status(config: &Path, id: &str) -> Option<String> {
    runners(config)
        .into_iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["status"].as_str().map(str::to_string))
}

/// A plain HTTP/1.0 GET to `addr` (host:port); returns (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_get_host(addr, addr, path)
}

/// Like [`http_get`] with a chosen `Host` header (and any extra header lines).
pub fn http_get_host(addr: &str, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n"),
    )
}

/// [`http_get_host`] with `extra` headers, as HTTP/1.1 ending the
/// connection with its answer (`Connection: close`, unless `extra` says
/// what `Connection` is, then it must say `close` too).
pub fn http_get_with(
    addr: &str,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut headers: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        headers.push_str("Connection: close\r\n");
    }
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n"),
    )
}

/// Sends `head` (a request without a body) on a new connection and reads
/// to its end; the status and body.
fn http_request(addr: &str, head: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Verifies `token` with PyJWT against the issuer's discovery document and
/// JWKS (fetched over HTTPS trusting `ca`); returns (accepted, report).
pub fn outside_verify(
    issuer: &str,
    ca: &Path,
    audience: &str,
    token: &str,
) -> (bool, serde_json::Value) {
    outside_verify_at(issuer, None, ca, audience, token)
}

/// [`outside_verify`] with the discovery document and JWKS fetched from
/// one coordinator (`https://host:port`) of several sharing the issuer.
pub fn outside_verify_at(
    issuer: &str,
    at: Option<&str>,
    ca: &Path,
    audience: &str,
    token: &str,
) -> (bool, serde_json::Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/verify_jwt.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(issuer)
        .arg(ca)
        .arg(audience)
        .arg(token)
        .args(at)
        .output()
        .expect("python3 must be installed (./scripts/test.sh installs what the tests need)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'jwt'"),
        "PyJWT is missing: run ./scripts/test.sh, which installs it"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("verifier printed no report ({e}): {stdout}\n{stderr}"));
    (out.status.success(), report)
}

/// Spawns `cmd` with its stdout piped and its error output written to
/// `log`, and waits up to [`STARTUP`] for it to print a line `READY <port>`;
/// returns the child (its stdout kept drained) and the port. Panics naming
/// the command and the log, with what the log holds, when it exits or stays
/// silent instead.
pub fn spawn_ready(cmd: &mut Command, log: &Path) -> (Child, u16) {
    let file =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd:?}: {e} (./scripts/test.sh installs what the tests need)")
        });
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    // Reads every line, so the process never blocks on its stdout; the
    // channel closes when it exits.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(port) = line.strip_prefix("READY ") {
                let _ = tx.send(port.trim().parse::<u16>().ok());
            }
        }
    });
    let why = match rx.recv_timeout(STARTUP) {
        Ok(Some(port)) => return (child, port),
        Ok(None) => "printed READY without a port".to_string(),
        Err(mpsc::RecvTimeoutError::Timeout) => format!("printed no `READY <port>` in {STARTUP:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // It has exited (or at least closed its stdout): never hang here.
            let _ = child.kill();
            match child.wait() {
                Ok(status) => format!("exited ({status}) before printing `READY <port>`"),
                Err(e) => format!("closed its stdout before printing `READY <port>` ({e})"),
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let err = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{cmd:?} {why}; its error output, {}:\n{err}", log.display())
}

/// The GitHub-shaped test issuer, `python/oidc_issuer.py DIR BEARER`: HTTPS
/// on loopback with its own CA (`DIR/ca.pem`), minting ID tokens at
/// `/token` for requests that carry the bearer; also `/jwks`, `/rotate` and
/// `/fetches`.
pub struct PythonIssuer {
    child: Child,
    pub port: u16,
    /// The CA its certificate chains to, `DIR/ca.pem`.
    pub ca: PathBuf,
    bearer: String,
}

impl PythonIssuer {
    /// Starts the issuer in `dir` (its error output goes to
    /// `dir/oidc-issuer.log`); `/token` wants `Authorization: bearer
    /// <bearer>`.
    pub fn start(dir: &Path, bearer: &str) -> PythonIssuer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/oidc_issuer.py");
        let (child, port) = spawn_ready(
            Command::new("python3").arg(script).arg(dir).arg(bearer),
            &dir.join("oidc-issuer.log"),
        );
        PythonIssuer {
            child,
            port,
            ca: dir.join("ca.pem"),
            bearer: bearer.to_string(),
        }
    }

    /// The issuer, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// One token from `/token?query`, as `ACTIONS_ID_TOKEN_REQUEST_URL`
    /// gives it to a job.
    pub fn token(&self, query: &str) -> anyhow::Result<String> {
        let mut tokens = self.tokens(query, 1)?;
        tokens
            .pop()
            .ok_or_else(|| anyhow::anyhow!("the issuer gave no token"))
    }

    /// `count` tokens from `/token?query`, each with its own `jti` (a CI
    /// token is accepted once).
    pub fn tokens(&self, query: &str, count: usize) -> anyhow::Result<Vec<String>> {
        const FETCH: &str = "import json,ssl,sys,urllib.request\n\
            r=urllib.request.Request(sys.argv[1],headers={'Authorization':'bearer '+sys.argv[3]})\n\
            c=ssl.create_default_context(cafile=sys.argv[2])\n\
            print('\\n'.join(json.load(urllib.request.urlopen(r,context=c,timeout=600))['values']))";
        let sep = if query.is_empty() { "" } else { "&" };
        let out = Command::new("python3")
            .args(["-c", FETCH])
            .arg(format!("{}/token?{query}{sep}count={count}", self.url()))
            .arg(&self.ca)
            .arg(&self.bearer)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| anyhow::anyhow!("running python3 to fetch a token: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tokens: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
        if !out.status.success()
            || tokens.len() != count
            || tokens.iter().any(|t| t.split('.').count() != 3)
        {
            anyhow::bail!(
                "fetching {count} tokens failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(tokens)
    }
}

impl PythonIssuer {
    /// Runs the CLI the way a GitHub Actions job would: no config, only
    /// `MIREN_CLUSTER=cluster`, `MIREN_APP=app` and the Actions variables
    /// pointing at this issuer's `/token?query`; returns (success, stdout,
    /// stderr).
    pub fn ci_miren(
        &self,
        home: &Path,
        cluster: &str,
        app: &str,
        query: &str,
        args: &[&str],
    ) -> (bool, String, String) {
        let out = Command::new(miren_bin())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("MIREN_CONFIG", home.join("none.yaml"))
            .env("MIREN_CLUSTER", cluster)
            .env("MIREN_APP", app)
            .env("GITHUB_ACTIONS", "true")
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("{}/token?{query}", self.url()),
            )
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", &self.bearer)
            .env("SSL_CERT_FILE", &self.ca)
            .output()
            .expect("running miren");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for PythonIssuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, written
/// as `ca.pem`, `tls.pem` and `tls.key` in a directory: what a test's own
/// HTTPS peers (OpenID providers) serve, and what the coordinator is told
/// to trust (`--oidc-ca-file`).
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    pub fn generate(dir: &Path) -> TestTls {
        let ca = transport::pki::ClusterCa::generate("test provider CA").expect("test CA");
        let ca = transport::pki::ClusterCa::load(&ca.cert_pem, &ca.key_pem).expect("load CA");
        let leaf = ca
            .issue_server(&["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server certificate");
        let tls = TestTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("tls.pem"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&tls.ca, ca.cert_pem()).expect("write ca.pem");
        std::fs::write(&tls.cert, &leaf.cert_pem).expect("write tls.pem");
        std::fs::write(&tls.key, &leaf.key_pem).expect("write tls.key");
        tls
    }
}

/// `integration-tests/node`, where `npm ci` (run by `scripts/test.sh`)
/// installs the Node peers; panics with the fix when it has not run.
pub fn node_fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
    assert!(
        dir.join("node_modules/oidc-provider").is_dir(),
        "{}/node_modules is missing: run ./scripts/test.sh, or `npm ci --prefix {}`",
        dir.display(),
        dir.display()
    );
    dir
}

/// Runs `python/oauth_client.py` (Authlib, a standard OAuth client) with
/// `args`; returns whether it got a token, and the token response or the
/// `{"error", "error_description"}` it was refused with.
pub fn authlib(args: &[&str]) -> (bool, serde_json::Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/oauth_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("python3 must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'authlib'"),
        "Authlib is missing: run ./scripts/test.sh, which installs it"
    );
    let v = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("oauth_client.py printed no JSON ({e}): {stdout}\n{stderr}"));
    (out.status.success(), v)
}

/// Runs `node/token_exchange.mjs` (openid-client: discovery, then an RFC
/// 8693 exchange of `subject_token` for `scope`, naming `audience` if
/// given), trusting the cluster CA `ca`; returns whether it got a token,
/// and what it printed.
pub fn openid_client_exchange(
    issuer: &str,
    ca: &Path,
    subject_token: &str,
    scope: &str,
    audience: Option<&str>,
) -> (bool, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
    assert!(
        dir.join("node_modules/openid-client").is_dir(),
        "openid-client is missing: run ./scripts/test.sh, or `npm ci --prefix {}`",
        dir.display()
    );
    let out = Command::new("node")
        .arg(dir.join("token_exchange.mjs"))
        .args([issuer, subject_token, scope])
        .args(audience)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .stdin(Stdio::null())
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "token_exchange.mjs printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

/// A real OpenID provider: `oidc-provider` from npm, run by
/// `node/oidc_provider.mjs` over HTTPS on loopback with its development
/// login form, and one confidential client.
pub struct NodeOidcProvider {
    child: Child,
    /// The issuer, `https://127.0.0.1:<port>`.
    pub url: String,
}

impl NodeOidcProvider {
    /// Starts the provider with `tls`, registering `client_id` /
    /// `client_secret` with `redirect_uris`; ID tokens live
    /// `id_token_ttl_secs`.
    pub fn start(
        dir: &Path,
        tls: &TestTls,
        client_id: &str,
        client_secret: &str,
        redirect_uris: &[String],
        id_token_ttl_secs: u64,
    ) -> NodeOidcProvider {
        let node = node_fixtures();
        let config = dir.join("oidc-provider.json");
        let json = serde_json::json!({
            "tls_cert": tls.cert, "tls_key": tls.key,
            "client_id": client_id, "client_secret": client_secret,
            "redirect_uris": redirect_uris, "id_token_ttl": id_token_ttl_secs,
        });
        std::fs::write(&config, json.to_string()).expect("write provider config");
        let (child, port) = spawn_ready(
            Command::new("node")
                .arg(node.join("oidc_provider.mjs"))
                .arg(&config)
                .current_dir(&node),
            &dir.join("oidc-provider.log"),
        );
        NodeOidcProvider {
            child,
            url: format!("https://127.0.0.1:{port}"),
        }
    }
}

impl Drop for NodeOidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one response head (up to the blank line) and then its body by
/// Content-Length; returns (status, head, body).
pub fn read_response(s: &mut std::net::TcpStream) -> std::io::Result<(u16, String, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed after {:?} of a response head",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// A coordinator with one runner (`--isolation none`) and the probe app
/// (`fixtures/probe-app`: `/headers` answers the request headers as JSON,
/// `/echo-upgrade` switches protocols and echoes, `POST /echo-body` reads
/// its body)
/// deployed under a name: what the ingress journeys start from.
pub struct ProbeCluster {
    pub server: Server,
    pub runner: RunnerProc,
    pub config: PathBuf,
}

impl ProbeCluster {
    /// Starts `miren server` with `server_args` (which should turn on an
    /// ingress), joins a runner and deploys the probe app as `app`.
    pub fn start(dir: &Path, server_args: &[&str], app: &str) -> ProbeCluster {
        let config = dir.join("client.yaml");
        let server = Server::start(&dir.join("coord"), &config, "127.0.0.1:0", server_args);
        let code = miren(&config, &["runner", "token", "create"], &[]);
        assert!(code.ok, "{code:?}");
        let runner = RunnerProc::start_ready(
            &config,
            &dir.join("runner"),
            code.stdout.trim(),
            &["--isolation", "none"],
        );
        let cluster = ProbeCluster {
            server,
            runner,
            config,
        };
        cluster.deploy_probe(app);
        cluster
    }

    /// Deploys the probe app (again) as `app`.
    pub fn deploy_probe(&self, app: &str) {
        let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app");
        let deploy = miren(
            &self.config,
            &[
                "deploy",
                "--dir",
                probe.to_str().expect("utf-8 path"),
                "-a",
                app,
            ],
            &[],
        );
        assert!(deploy.ok, "{deploy:?}");
    }
}

impl Server {
    /// Everything the server wrote to its error output so far.
    pub fn error_output(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Kills the server with SIGKILL (no chance to clean up, as a crash or
    /// the OOM killer would) and waits for it; returns its error output.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.error_output()
    }
}

impl RunnerProc {
    /// Kills the runner with SIGKILL and waits for it; returns its output.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output()
    }
}

/// Like [`miren`], but gives up after `limit`: the process is killed and
/// the run reported failed, with `timed out after …` in its error output.
pub fn miren_within(config: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let mut cli = CliProc::spawn(config, args, env);
    match cli.wait(limit) {
        Some(run) => run,
        None => {
            cli.kill();
            let mut run = cli.finished();
            run.ok = false;
            run.stderr.push_str(&format!(
                "\n[test] `miren {}` timed out after {limit:?}",
                args.join(" ")
            ));
            run
        }
    }
}

/// A `miren` CLI process left running (a deploy followed while the test
/// does other things); its output goes to temporary files that can be read
/// while it runs.
pub struct CliProc {
    child: Child,
    out: tempfile::NamedTempFile,
    err: tempfile::NamedTempFile,
    status: Option<std::process::ExitStatus>,
}

impl CliProc {
    /// Starts `miren args…` like [`miren`] does, without waiting.
    pub fn spawn(config: &Path, args: &[&str], env: &[(&str, &str)]) -> CliProc {
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let err = tempfile::NamedTempFile::new().expect("temp file");
        let mut cmd = Command::new(miren_bin());
        cmd.args(args)
            .env("MIREN_CONFIG", config)
            .env_remove("MIREN_CLUSTER")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.reopen().expect("reopen"))
            .stderr(err.reopen().expect("reopen"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("running miren");
        CliProc {
            child,
            out,
            err,
            status: None,
        }
    }

    /// What it printed on its standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.out.path()).unwrap_or_default()
    }

    /// What it printed on its error output so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.err.path()).unwrap_or_default()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    /// Waits up to `limit` for it to exit; `None` while it still runs.
    pub fn wait(&mut self, limit: Duration) -> Option<Run> {
        if wait_for(limit, || self.exited()) {
            Some(self.finished())
        } else {
            None
        }
    }

    /// Its outcome so far (`ok` only once it has exited successfully).
    pub fn finished(&mut self) -> Run {
        self.exited();
        Run {
            ok: self.status.is_some_and(|s| s.success()),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// SIGKILL, then waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        if let Ok(s) = self.child.wait() {
            self.status.get_or_insert(s);
        }
    }
}

impl Drop for CliProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that is free for both TCP and UDP right now: for a
/// process that must find the same address again after a restart (the
/// QUIC listener and the HTTPS listener share one port number).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free for both TCP and UDP")
}

/// A process of a sandbox, found on this machine by its environment.
#[derive(Debug, Clone)]
pub struct AppProcess {
    pub pid: u32,
    /// `MIREN_SANDBOX_ID`.
    pub sandbox: String,
    /// `MIREN_VERSION`.
    pub version: String,
    /// Every variable of its environment the test set in app.toml
    /// (`CONVERGE_*`), e.g. which deploy it came from.
    pub tags: Vec<(String, String)>,
    /// Its working directory (with `--isolation none`, inside its runner's
    /// data dir).
    pub cwd: PathBuf,
}

/// Every live process on this machine whose environment says it belongs to
/// a sandbox of `app` (`MIREN_APP=app` and a `MIREN_SANDBOX_ID`), whatever
/// runner started it and whether or not any runner still knows it.
pub fn app_processes(app: &str) -> Vec<AppProcess> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A zombie's environment reads empty: only live processes count.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let mut mine = false;
        let mut sandbox = None;
        let mut version = String::new();
        let mut tags = Vec::new();
        for var in environ.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            let Some((k, v)) = var.split_once('=') else {
                continue;
            };
            match k {
                "MIREN_APP" => mine = v == app,
                "MIREN_SANDBOX_ID" => sandbox = Some(v.to_string()),
                "MIREN_VERSION" => version = v.to_string(),
                k if k.starts_with("CONVERGE_") => tags.push((k.to_string(), v.to_string())),
                _ => {}
            }
        }
        if let (true, Some(sandbox)) = (mine, sandbox) {
            found.push(AppProcess {
                pid,
                sandbox,
                version,
                tags,
                cwd: std::fs::read_link(entry.path().join("cwd")).unwrap_or_default(),
            });
        }
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// The distinct sandboxes of `app` that have a live process here.
pub fn running_sandboxes(app: &str) -> std::collections::BTreeSet<String> {
    app_processes(app).into_iter().map(|p| p.sandbox).collect()
}

/// A copy of the probe app (`fixtures/probe-app`) in `parent/name-src`
/// with its own `.miren/app.toml`: `instances` sandboxes of service `web`,
/// `CONVERGE_CONTENT=content` in their environment (what tells one deploy
/// from another, also on `/proc`), and `start_delay_secs` of sleep before
/// it listens (a rollout that takes a while to become healthy). The probe
/// answers 200 on `/headers`.
pub fn probe_app(
    parent: &Path,
    name: &str,
    instances: u32,
    content: &str,
    start_delay_secs: u32,
) -> PathBuf {
    let dir = parent.join(format!("{name}-src-{content}"));
    std::fs::create_dir_all(dir.join(".miren")).expect("app dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app/probe.py");
    std::fs::copy(fixture, dir.join("probe.py")).expect("copy the probe");
    // One process either way (no `sh` left sleeping as a child), so the
    // process count of a sandbox is its python.
    let command = if start_delay_secs == 0 {
        "python3 probe.py".to_string()
    } else {
        format!(
            "python3 -c \"import runpy, time; time.sleep({start_delay_secs}); runpy.run_path('probe.py', run_name='__main__')\""
        )
    };
    let toml = format!(
        "name = \"{name}\"\n[services.web]\ncommand = '''{command}'''\ninstances = {instances}\n[services.web.env]\nCONVERGE_CONTENT = \"{content}\"\n"
    );
    std::fs::write(dir.join(".miren/app.toml"), toml).expect("app.toml");
    dir
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A coordinator and `n` runners on fixed loopback addresses, so that any
/// of them can be killed and started again on its data dir and be found
/// where it was: the fault journeys of issue 15.
///
/// The coordinator listens on a fixed QUIC (and HTTPS) port and serves
/// the HTTP ingress on a fixed port; runner `i` (`--isolation none`,
/// named `r<i>`) keeps its data in `<dir>/r<i>`.
pub struct Cluster {
    // Dropped last: the processes go first.
    dir: tempfile::TempDir,
    pub cfg: PathBuf,
    pub coord_data: PathBuf,
    /// The coordinator's QUIC address, `127.0.0.1:PORT`.
    pub listen: String,
    /// The HTTP ingress, `127.0.0.1:PORT`.
    pub ingress: String,
    server_args: Vec<String>,
    server: Option<Server>,
    runners: Vec<Option<RunnerProc>>,
    runner_ids: Vec<String>,
    /// Error output of coordinators killed earlier, for failure reports.
    earlier: Vec<String>,
}

/// How long the fixture waits for a runner to (re)connect.
const RUNNER_READY: Duration = Duration::from_secs(60);

impl Cluster {
    /// Starts `miren server` with `server_args` (besides the data dir, the
    /// fixed listen and `--http-listen` addresses) and `runners` runners
    /// joined with one reusable code, and waits until all are `ready`.
    pub fn start(runners: usize, server_args: &[&str]) -> Cluster {
        let dir = temp();
        let listen = format!("127.0.0.1:{}", free_port());
        let ingress = format!("127.0.0.1:{}", free_port());
        let mut c = Cluster {
            cfg: dir.path().join("client.yaml"),
            coord_data: dir.path().join("coord"),
            dir,
            listen,
            ingress,
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            server: None,
            runners: Vec::new(),
            runner_ids: Vec::new(),
            earlier: Vec::new(),
        };
        c.start_coordinator();
        let code = c.miren(&["runner", "token", "create", "--reusable"]);
        assert!(code.ok, "{code:?}");
        let code = code.stdout.trim().to_string();
        for i in 0..runners {
            let name = format!("r{i}");
            let r = RunnerProc::start(
                &c.runner_data(i),
                Some(&code),
                &["--name", &name, "--isolation", "none"],
            );
            assert!(
                wait_for(RUNNER_READY, || r.runner_id().is_some()),
                "runner {i} did not join: {}",
                r.output()
            );
            c.runner_ids.push(r.runner_id().expect("joined"));
            c.runners.push(Some(r));
        }
        assert!(
            c.wait_runners_ready(&(0..runners).collect::<Vec<_>>()),
            "runners did not become ready: {:?}\n{}",
            c.runner_list(),
            c.logs()
        );
        c
    }

    /// The test's temporary directory (app sources can go there).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `miren args…` against this cluster, for at most 2 minutes.
    pub fn miren(&self, args: &[&str]) -> Run {
        miren_within(&self.cfg, args, &[], Duration::from_secs(120))
    }

    /// The running coordinator.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("the coordinator is running")
    }

    /// Starts the coordinator on its data dir and fixed addresses.
    pub fn start_coordinator(&mut self) {
        assert!(self.server.is_none(), "the coordinator is already running");
        let mut args: Vec<&str> = vec!["--http-listen", &self.ingress];
        args.extend(self.server_args.iter().map(String::as_str));
        let server = Server::start(&self.coord_data, &self.cfg, &self.listen, &args);
        self.server = Some(server);
    }

    /// SIGKILLs the coordinator and waits until it is gone.
    pub fn kill_coordinator(&mut self) {
        if let Some(s) = self.server.take() {
            self.earlier.push(s.kill());
        }
    }

    /// SIGKILLs the coordinator and starts it again at once on the same
    /// data dir and addresses; returns the Unix second at which the new one
    /// began to start (no report it shows can be older than that and still
    /// come from it).
    pub fn restart_coordinator_sigkill(&mut self) -> i64 {
        self.kill_coordinator();
        let restarted = now_unix();
        self.start_coordinator();
        restarted
    }

    /// The data dir of runner `i`.
    pub fn runner_data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("r{i}"))
    }

    /// The id runner `i` was given when it joined.
    pub fn runner_id(&self, i: usize) -> &str {
        &self.runner_ids[i]
    }

    /// Which runner's data dir `path` lies in.
    pub fn runner_of_path(&self, path: &Path) -> Option<usize> {
        (0..self.runner_ids.len()).find(|i| path.starts_with(self.runner_data(*i)))
    }

    /// Which runner (index) has id `id`.
    pub fn runner_index(&self, id: &str) -> Option<usize> {
        self.runner_ids.iter().position(|r| r == id)
    }

    /// SIGKILLs runner `i` and waits until it is gone.
    pub fn kill_runner(&mut self, i: usize) {
        if let Some(r) = self.runners[i].take() {
            let out = r.kill();
            // Keep what it said: the next start writes a fresh log.
            let _ = std::fs::write(
                self.runner_data(i)
                    .with_extension(format!("log.{}", now_unix())),
                out,
            );
        }
    }

    /// Starts runner `i` again on its data dir (no join code: it has its
    /// identity).
    pub fn start_runner(&mut self, i: usize) {
        assert!(self.runners[i].is_none(), "runner {i} is running");
        self.runners[i] = Some(RunnerProc::start(
            &self.runner_data(i),
            None,
            &["--isolation", "none"],
        ));
    }

    /// The runner process `i`, while it runs.
    pub fn runner(&mut self, i: usize) -> Option<&mut RunnerProc> {
        self.runners[i].as_mut()
    }

    /// Waits until every runner in `which` is `ready` in `runner list`, on
    /// a session of its current process.
    pub fn wait_runners_ready(&self, which: &[usize]) -> bool {
        wait_for(RUNNER_READY, || {
            let list = runners(&self.cfg);
            which.iter().all(|i| {
                // On a session of the process running now: a runner killed
                // with SIGKILL is shown ready on its dead session until its
                // restart replaces it (after the dead one failed to answer
                // the coordinator's probe) or it has been silent 15 s.
                let connected = self.runners[*i]
                    .as_ref()
                    .is_some_and(|r| r.output().contains(" connected to "));
                connected
                    && list
                        .iter()
                        .any(|r| r["id"] == self.runner_ids[*i].as_str() && r["status"] == "ready")
            })
        })
    }

    /// `miren deploy --dir DIR -a APP`, waiting for it (at most 3 minutes).
    pub fn deploy(&self, app: &str, dir: &Path) -> Run {
        miren_within(
            &self.cfg,
            &[
                "deploy",
                "--dir",
                dir.to_str().expect("utf-8 path"),
                "-a",
                app,
            ],
            &[],
            Duration::from_secs(180),
        )
    }

    /// `miren deploy --dir DIR -a APP`, left running.
    pub fn spawn_deploy(&self, app: &str, dir: &Path) -> CliProc {
        CliProc::spawn(
            &self.cfg,
            &[
                "deploy",
                "--dir",
                dir.to_str().expect("utf-8 path"),
                "-a",
                app,
            ],
            &[],
        )
    }

    /// `miren app status -a APP -o json`: the JSON, or the error output.
    pub fn status(&self, app: &str) -> Result<serde_json::Value, String> {
        let run = self.miren(&["app", "status", "-a", app, "-o", "json"]);
        if !run.ok {
            return Err(run.stderr);
        }
        serde_json::from_str(&run.stdout).map_err(|e| format!("{e}: {}", run.stdout))
    }

    /// `miren runner list -o json`.
    pub fn runner_list(&self) -> Vec<serde_json::Value> {
        runners(&self.cfg)
    }

    /// GET `path` with `Host: host` through the HTTP ingress.
    pub fn ingress_get(&self, host: &str, path: &str) -> std::io::Result<(u16, String)> {
        http_get_host(&self.ingress, host, path)
    }

    /// The tail of every log: killed and running coordinators, runners.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (n, e) in self.earlier.iter().enumerate() {
            out.push_str(&format!("--- killed coordinator #{n}:\n{}\n", tail(e, 15)));
        }
        if let Some(s) = &self.server {
            out.push_str(&format!(
                "--- coordinator:\n{}\n",
                tail(&s.error_output(), 25)
            ));
        }
        for (i, r) in self.runners.iter().enumerate() {
            match r {
                Some(r) => out.push_str(&format!("--- runner r{i}:\n{}\n", tail(&r.output(), 15))),
                None => out.push_str(&format!("--- runner r{i}: not running\n")),
            }
        }
        out
    }

    /// What a failed assertion about `app` should show: its status, its
    /// processes on this machine (with the runner whose data dir they run
    /// in), the runners, and the logs' tails.
    pub fn describe(&self, app: &str) -> String {
        let status = match self.status(app) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(e) => format!("(app status failed: {})", e.trim()),
        };
        let procs: Vec<String> = app_processes(app)
            .iter()
            .map(|p| {
                format!(
                    "pid {} sandbox {} version {} {:?} on {}",
                    p.pid,
                    p.sandbox,
                    p.version,
                    p.tags,
                    self.runner_of_path(&p.cwd)
                        .map(|i| format!("r{i} ({})", self.runner_ids[i]))
                        .unwrap_or_else(|| p.cwd.display().to_string())
                )
            })
            .collect();
        let runners: Vec<String> = self
            .runner_list()
            .iter()
            .map(|r| {
                format!(
                    "{} {} status={} cordoned={} sandboxes={}",
                    r["id"], r["name"], r["status"], r["cordoned"], r["sandboxes"]
                )
            })
            .collect();
        format!(
            "\n=== app status -a {app} -o json:\n{status}\n=== processes of {app} here:\n{}\n=== runner list:\n{}\n=== logs:\n{}",
            procs.join("\n"),
            runners.join("\n"),
            self.logs()
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Runners first: their sandboxes die with them.
        for r in self.runners.iter_mut() {
            r.take();
        }
        self.server.take();
    }
}

/// Seconds since the epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
