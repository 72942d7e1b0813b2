//! The audit trail: one JSON line per security decision, under
//! `<data dir>/audit/audit.log`.
//!
//! Operators of an identity system must be able to answer "who got a token
//! for what, who was refused and why, who changed what" after the fact, so
//! every decision (tokens minted or refused, CI logins, joins, runner
//! removal and cordon, signing keys, bindings, routes, route OIDC sessions,
//! changing admin RPCs) is written here with a time, an actor and a result.
//!
//! **A line never holds a token, a secret or a cookie.** The event types
//! below have no field that takes a credential: identifiers (`jti`, kid,
//! binding and runner ids) and claim values only, every free-text value
//! goes through [`Text`] (length-capped, control characters replaced, and
//! any word that looks like a JWT or a join code replaced by `[redacted]`
//! in case an upstream error message quoted one).
//!
//! Writes never block a caller for long: [`AuditLog::record`] hands the
//! line to a bounded channel read by one writer thread, which writes what
//! arrived within [`GATHER`] of a batch's first line with one `write`; when
//! the channel is full the line is dropped and counted
//! (`miren_audit_dropped_lines_total`).
//! The file rotates at [`MAX_FILE_BYTES`] and [`KEPT_FILES`] files are kept
//! (`audit.log`, `audit.log.1` … `audit.log.4`), so the trail is bounded.
//! Each line carries `seq`, strictly increasing across the files (assigned
//! by the writer: at least the event's time in nanoseconds), which
//! `miren audit -f` uses as its cursor.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Size at which `audit.log` rotates.
pub const MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Files kept: `audit.log` and `audit.log.1` … `audit.log.{KEPT_FILES-1}`.
pub const KEPT_FILES: usize = 5;
/// Lines waiting for the writer before new ones are dropped.
pub const CHANNEL_LINES: usize = 8192;
/// How long the writer gathers lines after the first of a batch: a line
/// reaches the file at most this much later than without batching.
pub const GATHER: Duration = Duration::from_millis(2);
/// Buffer of the writer: a batch of lines goes out in one `write`.
const WRITE_BUFFER: usize = 64 * 1024;
/// Longest free-text value kept in a line (characters).
pub const MAX_TEXT_CHARS: usize = 256;
/// The most lines one `readAudit` call returns.
pub const MAX_READ_LINES: usize = 5000;

/// Free text from outside (claims, error messages) as a line may hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(String);

/// Whether a word looks like a credential: a JWT (`eyJ…`, base64url of
/// `{"`), a runner or coordinator join code (`mren_…`, `mrenc_…`) or a
/// deploy key (`miren_key_…`).
fn looks_secret(word: &str) -> bool {
    word.contains("eyJ")
        || word.contains(identity::join_token::PREFIX)
        || word.contains(identity::join_token::COORDINATOR_PREFIX)
        || word.contains(identity::deploy_key::PREFIX)
}

impl Text {
    /// Caps `s` at [`MAX_TEXT_CHARS`] characters, replaces control
    /// characters by `?`, and redacts credential-shaped words.
    pub fn new(s: &str) -> Text {
        let mut out = String::new();
        for (i, word) in s.split(' ').enumerate() {
            if i > 0 {
                out.push(' ');
            }
            if looks_secret(word) {
                out.push_str("[redacted]");
            } else {
                out.push_str(word);
            }
        }
        let mut capped: String = out
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(MAX_TEXT_CHARS)
            .collect();
        if out.chars().count() > MAX_TEXT_CHARS {
            capped.push('…');
        }
        Text(capped)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text::new(s)
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Self {
        Text::new(s)
    }
}

/// Who made the decision happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A holder of an admin certificate (its common name).
    Admin(String),
    /// A joined runner (its id).
    Runner(String),
    /// A CI pipeline, by the binding its token matched.
    Ci(String),
    /// A holder of a deploy key (its id).
    DeployKey(String),
    /// A peer that has proven nothing (a CI login before it matched, a
    /// runner joining, a browser at a protected route).
    Anonymous,
    /// The coordinator itself (key rotation).
    Coordinator,
}

impl Serialize for Actor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = match self {
            Actor::Admin(n) => format!("admin:{}", Text::new(n).as_str()),
            Actor::Runner(id) => format!("runner:{}", Text::new(id).as_str()),
            Actor::Ci(b) => format!("ci:{}", Text::new(b).as_str()),
            Actor::DeployKey(id) => format!("key:{}", Text::new(id).as_str()),
            Actor::Anonymous => "anonymous".into(),
            Actor::Coordinator => "coordinator".into(),
        };
        s.serialize_str(&text)
    }
}

/// How a decision went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Refused,
    Error,
}

/// What was decided. No variant has a field that takes a token, a secret
/// or a cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action")]
pub enum Event {
    /// A workload token was minted (for a runner's sandbox, or by an admin).
    #[serde(rename = "token.minted")]
    TokenMinted {
        app: Text,
        sub: Text,
        aud: Vec<Text>,
        jti: Text,
        exp: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        runner: Option<Text>,
    },
    /// A workload token was refused.
    #[serde(rename = "token.refused")]
    TokenRefused {
        #[serde(skip_serializing_if = "Option::is_none")]
        sandbox: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        runner: Option<Text>,
        reason: Text,
    },
    /// A CI pipeline's token was presented for an app. `issuer`, `subject`
    /// and `repository` are the token's claims (read before verification
    /// when refused).
    #[serde(rename = "ci.login")]
    CiLogin {
        app: Text,
        issuer: Text,
        subject: Text,
        #[serde(skip_serializing_if = "Option::is_none")]
        repository: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        binding: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        jti: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Text>,
    },
    /// A join code was redeemed (a runner enrolled) or refused.
    #[serde(rename = "runner.join")]
    Join {
        #[serde(skip_serializing_if = "Option::is_none")]
        runner: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<Text>,
        /// The join code's id (its public half).
        #[serde(skip_serializing_if = "Option::is_none")]
        join_code: Option<Text>,
        remote: Text,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Text>,
    },
    /// A coordinator code was spent (the cluster key handed to a joining
    /// coordinator) or refused.
    #[serde(rename = "coordinator.join")]
    CoordinatorJoin {
        /// The code's id (its public half).
        join_code: Text,
        remote: Text,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Text>,
    },
    #[serde(rename = "runner.removed")]
    RunnerRemoved { runner: Text, name: Text },
    #[serde(rename = "runner.cordoned")]
    RunnerCordoned {
        runner: Text,
        name: Text,
        cordoned: bool,
    },
    #[serde(rename = "key.created")]
    KeyCreated { kid: Text, activates: i64 },
    #[serde(rename = "key.activated")]
    KeyActivated { kid: Text },
    #[serde(rename = "key.retired")]
    KeyRetired {
        kid: Text,
        #[serde(skip_serializing_if = "Option::is_none")]
        unpublished_at: Option<i64>,
    },
    /// The token endpoint issued an access token, or refused to.
    #[serde(rename = "oauth.token")]
    OAuthToken {
        grant: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        app: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        jti: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Text>,
    },
    #[serde(rename = "deploykey.created")]
    DeployKeyCreated {
        key: Text,
        app: Text,
        expires_at: i64,
    },
    #[serde(rename = "deploykey.rotated")]
    DeployKeyRotated {
        key: Text,
        app: Text,
        overlap_until: i64,
    },
    #[serde(rename = "deploykey.revoked")]
    DeployKeyRevoked { key: Text, app: Text },
    #[serde(rename = "binding.added")]
    BindingAdded {
        binding: Text,
        app: Text,
        issuer: Text,
        subject: Text,
    },
    #[serde(rename = "binding.removed")]
    BindingRemoved { binding: Text },
    /// A binding pinned an immutable id learned from the token it
    /// accepted (a GitHub binding's first login).
    #[serde(rename = "binding.pinned")]
    BindingPinned {
        binding: Text,
        app: Text,
        claim: Text,
        value: Text,
    },
    #[serde(rename = "route.set")]
    RouteSet { host: Text, app: Text },
    #[serde(rename = "route.removed")]
    RouteRemoved { host: Text },
    #[serde(rename = "route.oidc.enabled")]
    RouteOidcEnabled {
        host: Text,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider: Option<Text>,
    },
    #[serde(rename = "route.oidc.disabled")]
    RouteOidcDisabled { host: Text },
    #[serde(rename = "route.oidc.provider_removed")]
    OidcProviderRemoved { provider: Text },
    /// A browser signed in at a protected route (or was refused).
    #[serde(rename = "routeoidc.login")]
    RouteOidcLogin {
        host: Text,
        provider: Text,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Text>,
    },
    #[serde(rename = "routeoidc.logout")]
    RouteOidcLogout { host: Text, provider: Text },
    /// A session's refresh was refused (the user must sign in again).
    #[serde(rename = "routeoidc.refresh")]
    RouteOidcRefresh {
        host: Text,
        provider: Text,
        reason: Text,
    },
    /// Lines about a peer that has proven nothing that were left out over
    /// its budget (`crate::audit_budget`): `count` lines of `event` from
    /// `source` since the last one written.
    #[serde(rename = "audit.suppressed")]
    AuditSuppressed {
        source: Text,
        event: &'static str,
        count: u64,
    },
    /// An RPC that changes something or hands out a credential, by an
    /// admin (or by CI on its app).
    #[serde(rename = "rpc")]
    Rpc {
        interface: &'static str,
        method: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        app: Option<Text>,
    },
}

/// One line as written.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    pub seq: u64,
    pub time: String,
    pub actor: &'a Actor,
    #[serde(flatten)]
    pub event: &'a Event,
    pub result: Outcome,
}

/// A decision waiting for the writer.
struct Pending {
    at_nanos: u128,
    actor: Actor,
    event: Event,
    outcome: Outcome,
}

/// Counters of the trail (registered with the coordinator's metrics).
#[derive(Debug, Clone, Default)]
pub struct AuditCounters {
    pub written: Counter,
    pub dropped: Counter,
}

/// The writing end of the trail. Cheap to share (`Arc`).
pub struct AuditLog {
    tx: Option<SyncSender<Pending>>,
    dir: Option<PathBuf>,
    counters: AuditCounters,
    /// The writer thread, joined when the trail is dropped so that the
    /// lines of a batch it is still gathering reach the file.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Without a sender the writer writes what it holds and ends.
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of Unix milliseconds.
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix milliseconds of a time written by [`rfc3339_millis`] (also
/// without the fraction); `None` for anything else.
pub fn parse_rfc3339_millis(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, clock) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, mo, day) = (
        d.next()?.parse::<i64>().ok()?,
        d.next()?.parse::<u32>().ok()?,
        d.next()?.parse::<u32>().ok()?,
    );
    let (hms, frac) = match clock.split_once('.') {
        Some((a, b)) => (a, b),
        None => (clock, "0"),
    };
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    Some(((days_from_civil(y, mo, day) * 86_400) + h * 3600 + mi * 60 + sec) * 1000 + ms)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Whether appending `line_len` bytes to a file of `size` bytes must rotate
/// it first (never for an empty file: one line longer than the limit still
/// gets written).
pub fn needs_rotation(size: u64, line_len: u64, max: u64) -> bool {
    size > 0 && size + line_len > max
}

/// The path of `audit.log` (`n` = 0) or of its `n`th older file.
pub fn file_path(dir: &Path, n: usize) -> PathBuf {
    if n == 0 {
        dir.join("audit.log")
    } else {
        dir.join(format!("audit.log.{n}"))
    }
}

/// Shifts `audit.log.{i}` to `.{i+1}` (the oldest is removed) and
/// `audit.log` to `audit.log.1`.
pub fn rotate(dir: &Path, kept: usize) -> std::io::Result<()> {
    if kept <= 1 {
        return std::fs::remove_file(file_path(dir, 0)).or_else(ignore_missing);
    }
    std::fs::remove_file(file_path(dir, kept - 1)).or_else(ignore_missing)?;
    for i in (0..kept - 1).rev() {
        match std::fs::rename(file_path(dir, i), file_path(dir, i + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        // The audit dir is ours, but a planted link must not redirect the
        // trail.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The `seq` of the last line of `path` (0 when none).
fn last_seq(path: &Path) -> u64 {
    let Ok(mut f) = File::open(path) else {
        return 0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return 0;
    }
    let mut tail = String::new();
    if f.take(64 * 1024).read_to_string(&mut tail).is_err() {
        return 0;
    }
    tail.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["seq"].as_u64())
        .unwrap_or(0)
}

struct Writer {
    dir: PathBuf,
    file: Option<BufWriter<File>>,
    /// Lines in `file`'s buffer, counted written once they are flushed.
    buffered: u64,
    size: u64,
    seq: u64,
    max_bytes: u64,
    kept: usize,
    written: Counter,
    dropped: Counter,
}

impl Writer {
    fn write(&mut self, p: Pending) {
        self.seq = (self.seq + 1).max(u64::try_from(p.at_nanos).unwrap_or(u64::MAX));
        let line = Line {
            seq: self.seq,
            time: rfc3339_millis((p.at_nanos / 1_000_000) as i64),
            actor: &p.actor,
            event: &p.event,
            result: p.outcome,
        };
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            self.dropped.inc();
            return;
        };
        bytes.push(b'\n');
        if needs_rotation(self.size, bytes.len() as u64, self.max_bytes) {
            self.flush();
            self.file = None;
            if let Err(e) = rotate(&self.dir, self.kept) {
                tracing::error!("rotating the audit trail in {}: {e}", self.dir.display());
            }
            self.size = 0;
        }
        if self.file.is_none() {
            match open_append(&file_path(&self.dir, 0)) {
                Ok(f) => {
                    self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    self.file = Some(BufWriter::with_capacity(WRITE_BUFFER, f));
                }
                Err(e) => {
                    tracing::error!("opening the audit trail in {}: {e}", self.dir.display());
                    self.dropped.inc();
                    return;
                }
            }
        }
        let Some(f) = self.file.as_mut() else { return };
        match f.write_all(&bytes) {
            Ok(()) => {
                self.size += bytes.len() as u64;
                self.buffered += 1;
            }
            Err(e) => {
                tracing::error!("writing the audit trail: {e}");
                self.dropped.inc_by(self.buffered + 1);
                self.buffered = 0;
                self.file = None;
            }
        }
    }

    /// Writes the buffered lines out: counted written, or dropped if the
    /// write fails (the file is opened again for the next line).
    fn flush(&mut self) {
        let Some(f) = self.file.as_mut() else { return };
        match f.flush() {
            Ok(()) => {
                self.written.inc_by(self.buffered);
            }
            Err(e) => {
                tracing::error!("writing the audit trail: {e}");
                self.dropped.inc_by(self.buffered);
                self.file = None;
            }
        }
        self.buffered = 0;
    }

    /// Writes what arrives in batches: after the first line of a batch the
    /// writer waits [`GATHER`] for the lines recorded meanwhile, writes them
    /// with one `write`, and only then waits on the channel again. A busy
    /// minting path thus neither pays a write per line nor wakes this thread
    /// per line (a sender wakes it only while it waits on the channel).
    fn run(mut self, rx: Receiver<Pending>) {
        while let Ok(p) = rx.recv() {
            self.write(p);
            std::thread::sleep(GATHER);
            while let Ok(p) = rx.try_recv() {
                self.write(p);
            }
            self.flush();
        }
    }
}

impl AuditLog {
    /// Opens (creating, 0700) `dir` and starts the writer thread.
    pub fn open(dir: &Path, counters: AuditCounters) -> std::io::Result<AuditLog> {
        Self::open_with(dir, counters, MAX_FILE_BYTES, KEPT_FILES, CHANNEL_LINES)
    }

    /// [`AuditLog::open`] with other bounds (tests).
    pub fn open_with(
        dir: &Path,
        counters: AuditCounters,
        max_bytes: u64,
        kept: usize,
        channel: usize,
    ) -> std::io::Result<AuditLog> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(channel);
        let writer = Writer {
            dir: dir.to_path_buf(),
            file: None,
            buffered: 0,
            size: 0,
            seq: last_seq(&file_path(dir, 0)),
            max_bytes,
            kept,
            written: counters.written.clone(),
            dropped: counters.dropped.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("miren-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            tx: Some(tx),
            dir: Some(dir.to_path_buf()),
            counters,
            writer: Some(writer),
        })
    }

    /// A trail that records nothing (benchmarks with `--no-observe`, unit
    /// tests).
    pub fn disabled() -> AuditLog {
        AuditLog {
            tx: None,
            dir: None,
            counters: AuditCounters::default(),
            writer: None,
        }
    }

    /// Where the files are (`None` when disabled).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Queues one line; never blocks. A full queue drops the line and
    /// counts it.
    pub fn record(&self, actor: Actor, event: Event, outcome: Outcome) {
        let Some(tx) = &self.tx else { return };
        let p = Pending {
            at_nanos: now_nanos(),
            actor,
            event,
            outcome,
        };
        match tx.try_send(p) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.inc();
            }
        }
    }
}

/// Which lines `miren audit` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Lines at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// Lines after this `seq` (the follow cursor; 0 = from the start).
    pub after_seq: u64,
    /// Lines whose `app` is this.
    pub app: Option<String>,
    /// Lines whose action is one of these, or under one (`token` matches
    /// `token.minted`); empty = all.
    pub actions: Vec<String>,
    /// At most this many lines (capped by [`MAX_READ_LINES`]).
    pub limit: usize,
}

impl Query {
    /// Whether a parsed line is asked for.
    pub fn matches(&self, line: &serde_json::Value) -> bool {
        let seq = line["seq"].as_u64().unwrap_or(0);
        if seq <= self.after_seq {
            return false;
        }
        if let Some(since) = self.since_ms {
            match line["time"].as_str().and_then(parse_rfc3339_millis) {
                Some(t) if t >= since => {}
                _ => return false,
            }
        }
        if let Some(app) = &self.app {
            if line["app"].as_str() != Some(app.as_str()) {
                return false;
            }
        }
        if !self.actions.is_empty() {
            let action = line["action"].as_str().unwrap_or("");
            if !self.actions.iter().any(|a| {
                action == a
                    || (action.starts_with(a.as_str())
                        && action.as_bytes().get(a.len()) == Some(&b'.'))
            }) {
                return false;
            }
        }
        true
    }
}

/// What one read returns: lines (oldest first), the `seq` of the last one
/// (or the query's cursor), and whether more matched than the limit.
#[derive(Debug, Default)]
pub struct Page {
    pub lines: Vec<String>,
    pub last_seq: u64,
    pub more: bool,
}

/// Reads the trail in `dir`, oldest file first.
pub fn read(dir: &Path, q: &Query) -> std::io::Result<Page> {
    let limit = q.limit.clamp(1, MAX_READ_LINES);
    let mut page = Page {
        last_seq: q.after_seq,
        ..Page::default()
    };
    for n in (0..KEPT_FILES).rev() {
        let f = match File::open(file_path(dir, n)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if !q.matches(&v) {
                continue;
            }
            if page.lines.len() == limit {
                page.more = true;
                return Ok(page);
            }
            page.last_seq = v["seq"].as_u64().unwrap_or(page.last_seq);
            page.lines.push(line);
        }
    }
    Ok(page)
}

/// The claims of a CI token worth auditing, read without verifying it:
/// on a refusal they are what the token claimed, on an acceptance what
/// was verified. Never the token itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CiTokenFields {
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub jti: Option<String>,
}

impl CiTokenFields {
    /// Reads `iss`, `sub`, `repository` and `jti` from a JWT's payload
    /// through `identity::peek_claims`, the one unverified read (empty
    /// when it is not a readable JWT).
    pub fn peek(token: &str) -> CiTokenFields {
        let Ok(claims) = identity::peek_claims(token.trim()) else {
            return CiTokenFields::default();
        };
        let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
        CiTokenFields {
            issuer: s("iss").unwrap_or_default(),
            subject: s("sub").unwrap_or_default(),
            repository: s("repository"),
            jti: s("jti"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(actor: Actor, event: Event, outcome: Outcome) -> serde_json::Value {
        let l = Line {
            seq: 7,
            time: rfc3339_millis(1_700_000_000_123),
            actor: &actor,
            event: &event,
            result: outcome,
        };
        serde_json::to_value(&l).unwrap()
    }

    #[test]
    fn a_minted_token_line_has_its_identifiers_and_no_token() {
        let v = line_of(
            Actor::Runner("r1".into()),
            Event::TokenMinted {
                app: "web".into(),
                sub: "app:web:sandbox:web-1".into(),
                aud: vec!["sts.amazonaws.com".into()],
                jti: "5f0c".into(),
                exp: 1_700_003_600,
                runner: Some("r1".into()),
            },
            Outcome::Ok,
        );
        assert_eq!(
            v,
            serde_json::json!({
                "seq": 7, "time": "2023-11-14T22:13:20.123Z", "actor": "runner:r1",
                "action": "token.minted", "app": "web", "sub": "app:web:sandbox:web-1",
                "aud": ["sts.amazonaws.com"], "jti": "5f0c", "exp": 1_700_003_600i64,
                "runner": "r1", "result": "ok",
            })
        );
    }

    #[test]
    fn a_refused_ci_login_names_issuer_subject_repository_and_why() {
        let v = line_of(
            Actor::Anonymous,
            Event::CiLogin {
                app: "web".into(),
                issuer: "https://token.actions.githubusercontent.com".into(),
                subject: "repo:acme/web:ref:refs/heads/main".into(),
                repository: Some("acme/web".into()),
                binding: None,
                jti: Some("j-1".into()),
                reason: Some("no_binding: OIDC token did not match any CI binding".into()),
            },
            Outcome::Refused,
        );
        assert_eq!(v["action"], "ci.login");
        assert_eq!(v["actor"], "anonymous");
        assert_eq!(v["result"], "refused");
        assert_eq!(v["repository"], "acme/web");
        assert!(v.get("binding").is_none());
        assert!(v["reason"].as_str().unwrap().starts_with("no_binding"));
    }

    #[test]
    fn credential_shaped_words_never_reach_a_line() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
        let t = Text::new(&format!(
            "provider said: bad token {jwt} (code mren_abc.def)"
        ));
        assert!(!t.as_str().contains("eyJ"), "{t:?}");
        assert!(!t.as_str().contains("mren_"), "{t:?}");
        assert!(t
            .as_str()
            .starts_with("provider said: bad token [redacted]"));
        // Coordinator codes and deploy keys too.
        let t = Text::new("pasted mrenc_abc.def and miren_key_x.y here");
        assert_eq!(t.as_str(), "pasted [redacted] and [redacted] here", "{t:?}");
        // Control characters cannot forge a second line; length is capped.
        let t = Text::new(&format!("a\nb\u{1b}[31m{}", "x".repeat(1000)));
        assert!(!t.as_str().contains('\n') && !t.as_str().contains('\u{1b}'));
        assert_eq!(t.as_str().chars().count(), MAX_TEXT_CHARS + 1);
        // Actors go through the same rule.
        let v = serde_json::to_value(Actor::Admin(jwt.into())).unwrap();
        assert_eq!(v, "admin:[redacted]");
    }

    #[test]
    fn times_round_trip() {
        for ms in [0i64, 1_700_000_000_123, 951_782_400_000, 4_102_444_799_999] {
            let s = rfc3339_millis(ms);
            assert_eq!(parse_rfc3339_millis(&s), Some(ms), "{s}");
        }
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            parse_rfc3339_millis("2024-01-02T03:04:05Z"),
            Some(1_704_164_645_000)
        );
        for bad in [
            "",
            "2024-01-02",
            "2024-13-02T00:00:00Z",
            "2024-01-02T00:00:00+01:00",
        ] {
            assert_eq!(parse_rfc3339_millis(bad), None, "{bad}");
        }
    }

    #[test]
    fn queries_filter_by_time_app_action_and_cursor() {
        let l = |seq: u64, ms: i64, action: &str, app: Option<&str>| {
            let mut v =
                serde_json::json!({"seq": seq, "time": rfc3339_millis(ms), "action": action});
            if let Some(a) = app {
                v["app"] = a.into();
            }
            v
        };
        let q = Query {
            since_ms: Some(1000),
            app: Some("web".into()),
            actions: vec!["token".into(), "ci.login".into()],
            ..Query::default()
        };
        assert!(q.matches(&l(1, 1000, "token.minted", Some("web"))));
        assert!(q.matches(&l(1, 2000, "ci.login", Some("web"))));
        assert!(!q.matches(&l(1, 999, "token.minted", Some("web"))));
        assert!(!q.matches(&l(1, 2000, "token.minted", Some("api"))));
        assert!(!q.matches(&l(1, 2000, "tokenx.minted", Some("web"))));
        assert!(!q.matches(&l(1, 2000, "route.set", Some("web"))));
        let q = Query {
            after_seq: 5,
            ..Query::default()
        };
        assert!(!q.matches(&l(5, 0, "x", None)));
        assert!(q.matches(&l(6, 0, "x", None)));
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        assert!(!needs_rotation(0, 100, 10));
        assert!(!needs_rotation(5, 5, 10));
        assert!(needs_rotation(6, 5, 10));
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with(dir.path(), AuditCounters::default(), 400, 3, 1024).unwrap();
        for i in 0..40 {
            log.record(
                Actor::Coordinator,
                Event::KeyActivated {
                    kid: format!("kid-{i}").as_str().into(),
                },
                Outcome::Ok,
            );
        }
        // Lines are written by the writer thread: wait for the last.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let all = read(
                dir.path(),
                &Query {
                    limit: 1000,
                    ..Query::default()
                },
            )
            .unwrap();
            if all.lines.last().is_some_and(|l| l.contains("kid-39")) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "lines not written");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.log", "audit.log.1", "audit.log.2"]);
        for n in 0..3 {
            assert!(std::fs::metadata(file_path(dir.path(), n)).unwrap().len() <= 400);
        }
        // Oldest first, seq strictly increasing across files.
        let page = read(
            dir.path(),
            &Query {
                limit: 1000,
                ..Query::default()
            },
        )
        .unwrap();
        let seqs: Vec<u64> = page
            .lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert!(page.lines.len() < 40, "older lines were rotated away");
        // A page stops at the limit and says there is more.
        let first = read(
            dir.path(),
            &Query {
                limit: 2,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(first.lines.len(), 2);
        assert!(first.more);
        let next = read(
            dir.path(),
            &Query {
                after_seq: first.last_seq,
                limit: 1000,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(next.lines.len(), page.lines.len() - 2);
        // The file is private.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file_path(dir.path(), 0))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn every_recorded_line_is_in_the_file_once_the_trail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let counters = AuditCounters::default();
        let log = AuditLog::open(dir.path(), counters.clone()).unwrap();
        for i in 0..50 {
            log.record(
                Actor::Coordinator,
                Event::KeyActivated {
                    kid: format!("kid-{i}").as_str().into(),
                },
                Outcome::Ok,
            );
        }
        // No waiting: dropping the trail waits for the batch in hand.
        drop(log);
        let page = read(
            dir.path(),
            &Query {
                limit: 1000,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(page.lines.len(), 50);
        assert!(page.lines[49].contains("kid-49"));
        assert_eq!((counters.written.get(), counters.dropped.get()), (50, 0));
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // No writer can keep up with a queue of one while we hold it busy:
        // fill it faster than the thread drains and see drops counted.
        let dir = tempfile::tempdir().unwrap();
        let counters = AuditCounters::default();
        let log = AuditLog::open_with(dir.path(), counters.clone(), MAX_FILE_BYTES, 2, 1).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            log.record(
                Actor::Coordinator,
                Event::KeyActivated { kid: "k".into() },
                Outcome::Ok,
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(counters.dropped.get() > 0);
    }

    #[test]
    fn ci_token_fields_are_read_without_the_token() {
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let token = format!(
            "{}.{}.sig",
            b64(serde_json::json!({"alg": "RS256"})),
            b64(
                serde_json::json!({"iss": "https://i", "sub": "repo:a/b:ref:x", "repository": "a/b", "jti": "j"})
            )
        );
        let f = CiTokenFields::peek(&token);
        assert_eq!(f.issuer, "https://i");
        assert_eq!(f.subject, "repo:a/b:ref:x");
        assert_eq!(f.repository.as_deref(), Some("a/b"));
        assert_eq!(f.jti.as_deref(), Some("j"));
        assert_eq!(CiTokenFields::peek("garbage"), CiTokenFields::default());
    }
}
