//! Join tokens and the runner registry: who may join, which runners exist,
//! which are connected now, and how the coordinator talks to them.
//!
//! Durable records live in the store (`jointoken/<id>`, `runner/<id>`); which
//! runners are connected right now, and when each was last heard from, is
//! kept in memory. Redeeming a token and registering the runner is one store
//! transaction conditioned on the token record being unchanged, so a
//! one-time token can enroll exactly one runner even under a race.
//! Removing a runner deletes its record and closes its live connection; its
//! certificate is then refused at the next connection attempt because no
//! record backs it.
//!
//! The records are read from memory ([`RunnerRecords`], fed by a store
//! watch through [`Registry::follow`]), so that connecting, heartbeats and
//! renewals keep working while the store is unreachable; a runner the
//! index does not know yet is looked up in the store. When a record
//! disappears from the index, this coordinator closes that runner's live
//! connection with [`transport::close::CloseCode::RunnerRemoved`]: a
//! removal through any coordinator cuts the runner off from all of them.
//!
//! A connected runner is reached through [`Registry::send`]: a
//! [`RunnerCommand`] goes to the task that holds the runner's agent
//! capability (on its RPC worker, see `service::runner_session`), and the
//! answer comes back on a oneshot. Whether a new connection of a runner
//! replaces the one registered is the pure rule [`replacement`]: a
//! registered session that still counts as alive is first asked to answer
//! ([`RunnerCommand::Ping`], at most [`PROBE_PATIENCE`]), so a runner
//! restarted after a crash (SIGKILL, power loss: no goodbye, a connection
//! that has not timed out yet) takes its dead session's place at once,
//! while a second live process with the same identity is still refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use identity::join_token::{check_ttl, secret_hash, JoinRefusal, JoinToken, JoinTokenRecord};
use identity::ClusterAddress;
use schema::miren_capnp::{Isolation, RunnerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use transport::pki::{self, ClusterCa};

pub use crate::runner_records::RunnerRecord;
use crate::runner_records::RunnerRecords;
use crate::shutdown::Tasks;
use crate::store::{
    decode, encode, Condition, Op, Outcome, Revision, Store, StoreError, Txn, WatchBatch,
};

/// Runners heartbeat this often.
pub const HEARTBEAT_SECS: i64 = 5;
/// A runner not heard from for this long is down.
pub const DOWN_AFTER_SECS: i64 = 3 * HEARTBEAT_SECS;

/// A runner's refusal of a command, in its own words (a runner is a
/// separate program: what it says is shown, never branched on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RunnerRefusal(pub String);

/// Where a runner's answer to a command goes.
pub type Reply<T> = oneshot::Sender<Result<T, RunnerRefusal>>;

/// What the coordinator sends to a runner (to the task that owns its agent
/// capability).
pub enum RunnerCommand {
    /// Asks the runner to answer ([`Registry::connect`]'s probe); answered
    /// outside the queue of the other commands. A connection broken under
    /// the call drops the reply unanswered.
    Ping(Reply<()>),
    Start(SandboxSpec, Reply<()>),
    Stop(String, Reply<()>),
    Logs(String, u32, Reply<Vec<String>>),
}

/// What a sandbox may use, as `app.toml` asked for it; 0 = the runner's
/// default. Runners enforce them (cgroups) and refuse values over their
/// maximum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    pub memory_bytes: u64,
    /// Thousandths of a CPU.
    pub cpu_millis: u32,
    pub pids: u32,
}

/// Everything a runner needs to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub app: String,
    pub version: String,
    /// The service's name, command, port and environment.
    pub service: String,
    pub command: String,
    pub port: u16,
    pub env: Vec<(String, String)>,
    pub limits: ResourceLimits,
    pub artifact: String,
    pub issuer_url: String,
}

/// Why a command got no answer from its runner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("runner {0} is not connected")]
    NotConnected(String),
    #[error("runner {0} went away")]
    WentAway(String),
    #[error("runner {0} did not answer")]
    NoAnswer(String),
    /// The runner answered with a refusal.
    #[error(transparent)]
    Refused(RunnerRefusal),
}

/// How long a registered session that counts as alive has to answer
/// before a new connection of the same runner takes its place.
pub const PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// What asking a registered session to answer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// It answered: a live process holds that session.
    Answered,
    /// No answer within [`PROBE_PATIENCE`], or its connection broke: the
    /// process behind it is gone though its connection has not timed out.
    Silent,
}

/// What a new connection of a runner does to the one registered for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// None is registered: register the new one.
    Register,
    /// The registered one is closed, has not been heard from for
    /// [`DOWN_AFTER_SECS`] (a runner coming back after its link was cut),
    /// or did not answer the probe (a runner restarted after a crash):
    /// close it and register the new one.
    ReplaceStale,
    /// The registered one counts as alive: ask it to answer first.
    Probe,
    /// The registered one answered: refuse the new one (a second process
    /// with the same identity must not take the first one's place).
    Refuse,
}

/// The replacement rule, from what is known of the registered connection
/// (whether it is closed, when it was last heard from) and what probing
/// it found, if it was probed, at `now`.
pub fn replacement(registered: Option<(bool, i64)>, probe: Option<Probe>, now: i64) -> Replacement {
    match (registered, probe) {
        (None, _) => Replacement::Register,
        (Some((closed, last_seen)), _) if closed || now - last_seen > DOWN_AFTER_SECS => {
            Replacement::ReplaceStale
        }
        (Some(_), None) => Replacement::Probe,
        (Some(_), Some(Probe::Answered)) => Replacement::Refuse,
        (Some(_), Some(Probe::Silent)) => Replacement::ReplaceStale,
    }
}

/// What one attempt at registering a connection came to.
enum Registration {
    Registered(u64),
    /// Session `.0` is registered and counts as alive: probe it first.
    ProbeFirst(u64),
}

/// Registry failures, worded for the operator or runner that sees them.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Join(#[from] JoinRefusal),
    #[error("{0}")]
    Ttl(#[from] identity::join_token::JoinTokenTtlError),
    #[error("no runner or join code {0:?} (see `miren runner list` / `miren runner token list`)")]
    NotFound(String),
    #[error("{0:?} matches several runners ({1}); use the ID")]
    Ambiguous(String, String),
    #[error("runner {0} has been removed from the cluster; join it again with a new join code")]
    Removed(String),
    #[error("duplicate runner id: runner {0} is already connected")]
    AlreadyConnected(String),
    /// A runner name outside the rule.
    #[error("runner name {0:?} must be at most 63 of [A-Za-z0-9-_.]")]
    BadName(String),
    /// More than 32 labels.
    #[error("at most 32 labels")]
    TooManyLabels,
    /// A label outside the rule.
    #[error("label {key}={value} must be key=value with at most 63 of [A-Za-z0-9-_./] each")]
    BadLabel { key: String, value: String },
    /// The cluster address a join code would carry has no fingerprint.
    #[error("cluster address has no fingerprint")]
    NoFingerprint,
    /// The fresh join code id is taken.
    #[error("token id collision; try again")]
    IdCollision,
    /// The live-session table is unavailable (a poisoned lock).
    #[error("registry lock")]
    Unavailable,
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a runner last told us.
#[derive(Debug, Clone)]
pub struct LiveStatus {
    pub version: String,
    pub sandboxes: u32,
    /// As the runner reported it (`Unknown` before it did).
    pub isolation: Isolation,
    /// How the runner limits sandbox resources; empty when it cannot.
    pub limits: String,
}

impl Default for LiveStatus {
    fn default() -> LiveStatus {
        LiveStatus {
            version: String::new(),
            sandboxes: 0,
            isolation: Isolation::Unknown,
            limits: String::new(),
        }
    }
}

struct Live {
    conn: quinn::Connection,
    commands: mpsc::UnboundedSender<RunnerCommand>,
    session: u64,
    last_seen: i64,
    status: LiveStatus,
}

/// A runner as listed.
#[derive(Debug, Clone)]
pub struct RunnerView {
    pub record: RunnerRecord,
    pub connected: bool,
    pub last_seen_unix: i64,
    pub status: LiveStatus,
}

impl RunnerView {
    /// `Ready`, or `Down` (also when never connected since the
    /// coordinator started).
    pub fn status(&self) -> RunnerState {
        if self.connected {
            RunnerState::Ready
        } else {
            RunnerState::Down
        }
    }
}

/// Join tokens, runner records and live runner connections.
pub struct Registry {
    store: Arc<dyn Store>,
    /// The runner records, in memory.
    records: RunnerRecords,
    /// Lifetime of the runner certificates it issues.
    cert_validity: time::Duration,
    live: Mutex<HashMap<String, Live>>,
    /// Seen at least once since start, even if disconnected now.
    last_seen: Mutex<HashMap<String, (i64, LiveStatus)>>,
    next_session: std::sync::atomic::AtomicU64,
}

fn token_key(id: &str) -> String {
    format!("jointoken/{id}")
}

fn runner_key(id: &str) -> String {
    format!("runner/{id}")
}

fn valid_label(k: &str, v: &str) -> bool {
    let ok = |s: &str, max: usize| {
        s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    !k.is_empty() && ok(k, 63) && ok(v, 63)
}

/// Checks a runner name and labels from the outside.
pub fn check_name_and_labels(name: &str, labels: &[(String, String)]) -> Result<(), RegistryError> {
    if name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(RegistryError::BadName(name.to_string()));
    }
    if labels.len() > 32 {
        return Err(RegistryError::TooManyLabels);
    }
    for (k, v) in labels {
        if !valid_label(k, v) {
            return Err(RegistryError::BadLabel {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    Ok(())
}

impl Registry {
    /// A registry over `store`, with the records it holds now (when it
    /// can be read; [`Registry::follow`] loads them again and follows).
    pub fn new(store: Arc<dyn Store>, cert_validity: std::time::Duration) -> Self {
        let records = RunnerRecords::default();
        if let Err(e) = records.reload(&*store) {
            tracing::warn!("loading the runner records: {e}");
        }
        Registry {
            store,
            records,
            cert_validity: time::Duration::seconds(cert_validity.as_secs().max(60) as i64),
            live: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(HashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Creates a join token for `address` and stores its record.
    pub fn create_token(
        &self,
        address: &ClusterAddress,
        ttl_secs: u64,
        reusable: bool,
        name: &str,
        labels: Vec<(String, String)>,
        now: i64,
    ) -> Result<(String, JoinTokenRecord), RegistryError> {
        let ttl = check_ttl(ttl_secs, reusable)?;
        check_name_and_labels(name, &labels)?;
        self.forget_expired_tokens(now)?;
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let token = JoinToken::new(id.clone(), address.clone(), secret)
            .ok_or(RegistryError::NoFingerprint)?;
        let record = JoinTokenRecord {
            id: id.clone(),
            secret_sha256: secret_hash(&secret),
            created_unix: now,
            expires_unix: now + ttl as i64,
            reusable,
            uses: 0,
            revoked: false,
            name: name.to_string(),
            labels,
        };
        let outcome = self.store.commit(Txn {
            conditions: vec![Condition::Absent(token_key(&id))],
            ops: vec![Op::Put(token_key(&id), encode(&record))],
        })?;
        if outcome != Outcome::Applied {
            return Err(RegistryError::IdCollision);
        }
        Ok((token.encode(), record))
    }

    /// Forgets the join tokens that expired more than a week ago
    /// (`JoinTokenRecord::forgettable`); done when a token is made.
    fn forget_expired_tokens(&self, now: i64) -> Result<usize, RegistryError> {
        Ok(forget_expired_codes(&*self.store, "jointoken/", now)?)
    }

    /// All join tokens.
    pub fn tokens(&self) -> Result<Vec<JoinTokenRecord>, RegistryError> {
        self.store
            .scan("jointoken/")?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map_err(RegistryError::from))
            .collect()
    }

    /// Revokes a token so it enrolls nobody else.
    pub fn revoke_token(&self, id: &str) -> Result<(), RegistryError> {
        let key = token_key(id);
        let bytes = self
            .store
            .get(&key)?
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        let mut record: JoinTokenRecord = decode(&key, &bytes)?;
        record.revoked = true;
        match self.store.commit(Txn {
            conditions: vec![Condition::Equals(key.clone(), bytes)],
            ops: vec![Op::Put(key, encode(&record))],
        })? {
            Outcome::Applied => Ok(()),
            Outcome::ConditionFailed => self.revoke_token(id),
        }
    }

    /// Redeems a join token: checks it, issues a certificate for the key
    /// that signed `csr_der`, and records the runner, atomically.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &self,
        ca: &ClusterCa,
        token_id: &str,
        secret: &[u8],
        csr_der: &[u8],
        name: &str,
        labels: Vec<(String, String)>,
        now: i64,
    ) -> Result<(RunnerRecord, String), RegistryError> {
        if !identity::join_token::valid_id(token_id) {
            return Err(JoinRefusal::BadFormat.into());
        }
        let secret: [u8; 32] = secret.try_into().map_err(|_| JoinRefusal::BadFormat)?;
        check_name_and_labels(name, &labels)?;
        let key = token_key(token_id);
        for _attempt in 0..8 {
            let bytes = self.store.get(&key)?.ok_or(JoinRefusal::Unknown)?;
            let record: JoinTokenRecord = decode(&key, &bytes)?;
            let redeemed = record.redeem(&secret, now)?;
            let id = uuid::Uuid::new_v4().to_string();
            let cert_pem =
                ca.issue_client_for_csr(&format!("runner-{id}"), self.cert_validity, csr_der)?;
            let mut all_labels = record.labels.clone();
            for (k, v) in labels.iter() {
                all_labels.retain(|(ek, _)| ek != k);
                all_labels.push((k.clone(), v.clone()));
            }
            let runner = RunnerRecord {
                id: id.clone(),
                name: if name.is_empty() {
                    if record.name.is_empty() {
                        format!("runner-{}", &id[..8])
                    } else {
                        record.name.clone()
                    }
                } else {
                    name.to_string()
                },
                labels: all_labels,
                created_unix: now,
                cordoned: false,
                draining: false,
                cert_expires_unix: pki::not_after_unix(&cert_pem)?,
                joined_with: token_id.to_string(),
            };
            let committed = self.store.txn(Txn {
                conditions: vec![
                    Condition::Equals(key.clone(), bytes),
                    Condition::Absent(runner_key(&id)),
                ],
                ops: vec![
                    Op::Put(key.clone(), encode(&redeemed)),
                    Op::Put(runner_key(&id), encode(&runner)),
                ],
            })?;
            if committed.outcome == Outcome::Applied {
                (self.records).note(&id, committed.revision, Some(runner.clone()));
                return Ok((runner, cert_pem));
            }
            // Someone else redeemed concurrently: decide again on the new record.
        }
        Err(JoinRefusal::UsedOrRevoked.into())
    }

    /// The record of a runner, if it is still registered: from memory,
    /// or from the store for a runner the index does not know yet (it
    /// joined through another coordinator a moment ago). An error means
    /// the store could not say, never that the runner is gone.
    pub fn record(&self, id: &str) -> Result<Option<RunnerRecord>, RegistryError> {
        if let Some(r) = self.records.get(id) {
            return Ok(Some(r));
        }
        let key = runner_key(id);
        Ok(match self.store.get(&key)? {
            Some(bytes) => Some(decode(&key, &bytes)?),
            None => None,
        })
    }

    /// Loads the runner records and keeps them in step with the store
    /// until shutdown, cutting off the runners whose record goes.
    pub fn follow(self: &Arc<Self>, tasks: &Tasks) -> Result<(), StoreError> {
        let from = crate::watched::Watched::reload(&**self, &*self.store)?;
        crate::watched::follow(self.clone(), self.store.clone(), from, tasks);
        Ok(())
    }

    /// Closes the live connections of runners that are no longer
    /// registered, with the code that tells them so.
    fn cut_off(&self, gone: &[String]) {
        if gone.is_empty() {
            return;
        }
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        for id in gone {
            if let Some(l) = live.remove(id) {
                tracing::info!("runner {id} was removed: closing its connection");
                transport::close::close_runner_removed(&l.conn);
            }
        }
    }

    fn update_record(
        &self,
        id: &str,
        change: impl Fn(&mut RunnerRecord),
    ) -> Result<RunnerRecord, RegistryError> {
        let key = runner_key(id);
        loop {
            let bytes = self
                .store
                .get(&key)?
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
            let mut record: RunnerRecord = decode(&key, &bytes)?;
            change(&mut record);
            let committed = self.store.txn(Txn {
                conditions: vec![Condition::Equals(key.clone(), bytes)],
                ops: vec![Op::Put(key.clone(), encode(&record))],
            })?;
            if committed.outcome == Outcome::Applied {
                (self.records).note(id, committed.revision, Some(record.clone()));
                return Ok(record);
            }
        }
    }

    /// Registers the live connection of a runner (one at a time per id):
    /// a registered session that counts as alive is probed first
    /// ([`replacement`]), which may take up to [`PROBE_PATIENCE`].
    pub async fn connect(
        &self,
        id: &str,
        conn: quinn::Connection,
        commands: mpsc::UnboundedSender<RunnerCommand>,
        now: i64,
    ) -> Result<u64, RegistryError> {
        let probed = match self.register(id, &conn, &commands, now, None)? {
            Registration::Registered(session) => return Ok(session),
            Registration::ProbeFirst(session) => (session, self.probe(id).await),
        };
        match self.register(id, &conn, &commands, now, Some(probed))? {
            Registration::Registered(session) => Ok(session),
            // Another session took the place meanwhile: it is alive.
            Registration::ProbeFirst(_) => Err(RegistryError::AlreadyConnected(id.to_string())),
        }
    }

    /// One attempt at registering `conn`, with what probing session
    /// `probed.0` found (it counts only if that session is still the one
    /// registered).
    fn register(
        &self,
        id: &str,
        conn: &quinn::Connection,
        commands: &mpsc::UnboundedSender<RunnerCommand>,
        now: i64,
        probed: Option<(u64, Probe)>,
    ) -> Result<Registration, RegistryError> {
        if self.record(id)?.is_none() {
            return Err(RegistryError::Removed(id.to_string()));
        }
        let mut live = self.live.lock().map_err(|_| RegistryError::Unavailable)?;
        let existing = live.get(id);
        let registered = existing.map(|l| (l.conn.close_reason().is_some(), l.last_seen));
        let probe = probed
            .filter(|(session, _)| existing.is_some_and(|l| l.session == *session))
            .map(|(_, probe)| probe);
        match replacement(registered, probe, now) {
            Replacement::Register => {}
            Replacement::Probe => {
                return Ok(Registration::ProbeFirst(
                    existing.map(|l| l.session).unwrap_or_default(),
                ))
            }
            Replacement::Refuse => return Err(RegistryError::AlreadyConnected(id.to_string())),
            Replacement::ReplaceStale => {
                if let Some(existing) = existing {
                    let replaced = transport::close::CloseCode::Replaced;
                    transport::close::close(
                        &existing.conn,
                        replaced,
                        replaced.to_string().as_bytes(),
                    );
                }
            }
        }
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        live.insert(
            id.to_string(),
            Live {
                conn: conn.clone(),
                commands: commands.clone(),
                session,
                last_seen: now,
                status: LiveStatus::default(),
            },
        );
        Ok(Registration::Registered(session))
    }

    /// Asks the session registered for runner `id` to answer. Whichever
    /// session that is now, the finding counts only for the one `register`
    /// asked about.
    async fn probe(&self, id: &str) -> Probe {
        match self.send(id, RunnerCommand::Ping, PROBE_PATIENCE).await {
            // Any answer, a refusal included (a runner from before `ping`
            // says it has no such method).
            Ok(()) | Err(SendError::Refused(_)) => Probe::Answered,
            Err(SendError::NotConnected(_) | SendError::WentAway(_) | SendError::NoAnswer(_)) => {
                Probe::Silent
            }
        }
    }

    /// The live QUIC connection of a runner.
    pub fn connection(&self, id: &str) -> Option<quinn::Connection> {
        self.live
            .lock()
            .ok()?
            .get(id)
            .filter(|l| l.conn.close_reason().is_none())
            .map(|l| l.conn.clone())
    }

    /// The command channel of a connected runner.
    fn commands(&self, id: &str) -> Option<mpsc::UnboundedSender<RunnerCommand>> {
        self.live.lock().ok()?.get(id).map(|l| l.commands.clone())
    }

    /// Sends the command `make` builds to `runner` and waits for its
    /// answer, at most `patience`.
    pub async fn send<T>(
        &self,
        runner: &str,
        make: impl FnOnce(Reply<T>) -> RunnerCommand,
        patience: Duration,
    ) -> Result<T, SendError> {
        let not_connected = || SendError::NotConnected(runner.to_string());
        let tx = self.commands(runner).ok_or_else(not_connected)?;
        let (done, wait) = oneshot::channel();
        tx.send(make(done)).map_err(|_| not_connected())?;
        match tokio::time::timeout(patience, wait).await {
            Ok(Ok(answer)) => answer.map_err(SendError::Refused),
            Ok(Err(_)) => Err(SendError::WentAway(runner.to_string())),
            Err(_) => Err(SendError::NoAnswer(runner.to_string())),
        }
    }

    /// Forgets a live connection when its session ends.
    pub fn disconnect(&self, id: &str, session: u64) {
        if let Ok(mut live) = self.live.lock() {
            if live.get(id).is_some_and(|l| l.session == session) {
                if let Some(l) = live.remove(id) {
                    if let Ok(mut seen) = self.last_seen.lock() {
                        seen.insert(id.to_string(), (l.last_seen, l.status));
                    }
                }
            }
        }
    }

    /// Records a heartbeat; returns whether the runner is cordoned.
    pub fn heartbeat(
        &self,
        id: &str,
        session: u64,
        status: LiveStatus,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let Some(record) = self.record(id)? else {
            // Removed while this session was being registered (the watch's
            // cut-off found nothing to close yet): closed now, so that a
            // runner ignoring the error keeps nothing.
            self.cut_off(&[id.to_string()]);
            return Err(RegistryError::Removed(id.to_string()));
        };
        let mut live = self.live.lock().map_err(|_| RegistryError::Unavailable)?;
        match live.get_mut(id) {
            Some(l) if l.session == session => {
                l.last_seen = now;
                l.status = status;
            }
            _ => return Err(RegistryError::AlreadyConnected(id.to_string())),
        }
        Ok(record.cordoned)
    }

    /// Issues a renewed certificate for a registered runner.
    pub fn renew(&self, ca: &ClusterCa, id: &str, csr_der: &[u8]) -> Result<String, RegistryError> {
        if self.record(id)?.is_none() {
            self.cut_off(&[id.to_string()]);
            return Err(RegistryError::Removed(id.to_string()));
        }
        let cert_pem =
            ca.issue_client_for_csr(&format!("runner-{id}"), self.cert_validity, csr_der)?;
        let expires = pki::not_after_unix(&cert_pem)?;
        self.update_record(id, |r| r.cert_expires_unix = expires)?;
        Ok(cert_pem)
    }

    /// Every registered runner with its live state at `now`.
    pub fn list(&self, now: i64) -> Result<Vec<RunnerView>, RegistryError> {
        let live = self.live.lock().map_err(|_| RegistryError::Unavailable)?;
        let seen = self
            .last_seen
            .lock()
            .map_err(|_| RegistryError::Unavailable)?;
        let mut out = Vec::new();
        let mut records = self.records.all();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        for record in records {
            let view = match live.get(&record.id) {
                Some(l) => RunnerView {
                    connected: l.conn.close_reason().is_none()
                        && now - l.last_seen <= DOWN_AFTER_SECS,
                    last_seen_unix: l.last_seen,
                    status: l.status.clone(),
                    record,
                },
                None => {
                    let (last, status) = seen.get(&record.id).cloned().unwrap_or_default();
                    RunnerView {
                        connected: false,
                        last_seen_unix: last,
                        status,
                        record,
                    }
                }
            };
            out.push(view);
        }
        Ok(out)
    }

    /// Finds a runner by id, id prefix or name.
    pub fn resolve(&self, query: &str) -> Result<RunnerRecord, RegistryError> {
        if let Some(r) = self.record(query)? {
            return Ok(r);
        }
        let mut matches = Vec::new();
        for r in self.records.all() {
            if r.name == query || (query.len() >= 4 && r.id.starts_with(query)) {
                matches.push(r);
            }
        }
        matches.sort_by(|a, b| a.id.cmp(&b.id));
        match matches.len() {
            0 => Err(RegistryError::NotFound(query.to_string())),
            1 => Ok(matches.remove(0)),
            _ => Err(RegistryError::Ambiguous(
                query.to_string(),
                matches
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// Removes a runner: its record goes and its live connection is closed.
    pub fn remove(&self, query: &str) -> Result<RunnerRecord, RegistryError> {
        let record = self.resolve(query)?;
        let committed = self.store.txn(Txn {
            conditions: vec![],
            ops: vec![Op::Delete(runner_key(&record.id))],
        })?;
        (self.records).note(&record.id, committed.revision, None);
        self.cut_off(std::slice::from_ref(&record.id));
        Ok(record)
    }

    /// Cordons or uncordons a runner.
    /// Starts draining a runner: cordoned (no new sandboxes) and its
    /// sandboxes moved elsewhere by the reconcile loop.
    pub fn drain(&self, query: &str) -> Result<RunnerRecord, RegistryError> {
        let record = self.resolve(query)?;
        self.update_record(&record.id, |r| {
            r.cordoned = true;
            r.draining = true;
        })
    }

    pub fn set_cordon(&self, query: &str, cordoned: bool) -> Result<RunnerRecord, RegistryError> {
        let record = self.resolve(query)?;
        self.update_record(&record.id, |r| {
            r.cordoned = cordoned;
            if !cordoned {
                r.draining = false;
            }
        })
    }
}

impl crate::watched::Watched for Registry {
    const NAME: &'static str = "runner records";

    fn prefix(&self) -> &str {
        crate::runner_records::PREFIX
    }

    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let (from, gone) = self.records.reload(store)?;
        self.cut_off(&gone);
        Ok(from)
    }

    fn apply(&self, batch: &WatchBatch) {
        let gone = self.records.apply(batch);
        self.cut_off(&gone);
    }
}

/// Deletes the code records under `prefix` (runner join tokens,
/// coordinator codes) that [`JoinTokenRecord::forgettable`] at `now`, each
/// only if it is unchanged since read; returns how many went. Codes are
/// made by admins, so this bounds what the store keeps of them by what a
/// week of admins makes.
pub(crate) fn forget_expired_codes(
    store: &dyn Store,
    prefix: &str,
    now: i64,
) -> Result<usize, StoreError> {
    let mut forgotten = 0;
    for (key, bytes) in store.scan(prefix)? {
        let Ok(record) = decode::<JoinTokenRecord>(&key, &bytes) else {
            continue;
        };
        if !record.forgettable(now) {
            continue;
        }
        let outcome = store.commit(Txn {
            conditions: vec![Condition::Equals(key.clone(), bytes)],
            ops: vec![Op::Delete(key)],
        })?;
        if outcome == Outcome::Applied {
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_replaces_only_a_closed_silent_or_unanswering_one() {
        let now = 1_000;
        assert_eq!(replacement(None, None, now), Replacement::Register);
        // Alive by its heartbeats, not closed: asked to answer first.
        assert_eq!(
            replacement(Some((false, now - 1)), None, now),
            Replacement::Probe
        );
        assert_eq!(
            replacement(Some((false, now - DOWN_AFTER_SECS)), None, now),
            Replacement::Probe
        );
        // It answers: a live process holds it, the new one is refused.
        assert_eq!(
            replacement(Some((false, now - 1)), Some(Probe::Answered), now),
            Replacement::Refuse
        );
        // It does not (its process was killed): replaced.
        assert_eq!(
            replacement(Some((false, now - 1)), Some(Probe::Silent), now),
            Replacement::ReplaceStale
        );
        // Silent for longer than the down time, or closed: replaced
        // without asking.
        assert_eq!(
            replacement(Some((false, now - DOWN_AFTER_SECS - 1)), None, now),
            Replacement::ReplaceStale
        );
        assert_eq!(
            replacement(Some((true, now)), None, now),
            Replacement::ReplaceStale
        );
        assert_eq!(
            replacement(Some((true, now)), Some(Probe::Answered), now),
            Replacement::ReplaceStale
        );
    }
}
