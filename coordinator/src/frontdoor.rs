//! The front door: how many QUIC connections the coordinator holds, from
//! where, what a peer may do before it has proven a role, and how often an
//! address may try to join.
//!
//! Anyone can reach the cluster's UDP port, and before its handshake a
//! connection is only a source address. So every connection attempt is
//! counted against a total and against its source ([`Admission`]) and
//! refused early (quinn `Incoming::refuse`, one packet, no TLS work) over
//! either cap. A source address is only a claim until the peer has answered
//! us, so once a source (or the whole endpoint) holds half its share, an
//! attempt from an address not yet validated is answered with a QUIC Retry
//! first: a spoofed address cannot then take more than half of a real
//! host's share. A peer without an admin or runner certificate is
//! *unproven* until it proves a role (a CI login); unproven connections
//! have a cap of their own, below the total, so they can never crowd out
//! runners and operators, and a lifetime of [`UNPROVEN_LIFETIME`]. A
//! connection stops counting against its source once its peer has proven
//! a role: the per-source cap is about unauthenticated load, and a NAT may
//! hide any number of runners. `join` is rate-limited per source
//! ([`JoinLimiter`]).
//!
//! The rules ([`Admission`], [`JoinLimiter`]) are pure and take `now`;
//! [`FrontDoor`] and [`Ticket`] wire them to the accept loop, and
//! [`Proof`] to an RPC session.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::rpc::{Limits, RpcLimits};

/// Connections held at once, counted from the first packet to the close.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections one source (an IPv4 address, an IPv6 /64) may hold while
/// handshaking or unproven: a NAT in front of CI runners holds one per
/// pipeline logging in; runners and operators stop counting once their
/// certificate is checked.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Connections whose peer has not proven a role once its handshake is
/// done (anonymous or an unknown certificate, before a CI login).
pub const MAX_UNPROVEN_CONNECTIONS: usize = 3072;
/// Connections in their handshake (at most [`HANDSHAKE_TIMEOUT`] each),
/// whoever they turn out to be. With the unproven ones they leave an
/// eighth of the total to peers with a certificate: runners and operators
/// connecting while unproven peers hold their whole share get through
/// their handshake, and then need no unproven slot.
pub const MAX_HANDSHAKING: usize = 512;
/// Connections logged in with one credential (a deploy key, the CI tokens
/// of one binding) at once: a deploy needs one, a busy pipeline a few.
/// App logins count against their source too, but one credential used
/// from many addresses could otherwise fill the total that runners and
/// operators need.
pub const MAX_CONNECTIONS_PER_CREDENTIAL: usize = 32;
/// How long a QUIC handshake may take (a TLS 1.3 handshake on loopback
/// takes milliseconds; across the world, a few round trips). Every packet
/// restarts QUIC's idle timer, so without this a peer that kept sending
/// without finishing held its place for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unproven connection may stay open. Such a peer needs
/// seconds: `info`, a `join`, or a CI login after fetching its token.
pub const UNPROVEN_LIFETIME: Duration = Duration::from_secs(60);
/// How long a connection whose RPC session ended stays open for the peer
/// to read the last reply and close it itself.
pub const LINGER: Duration = Duration::from_secs(2);
/// Join attempts one source may make at once: a rack of runners behind one
/// NAT joining together.
pub const JOIN_BURST: u32 = 20;
/// ... and then one every this long.
pub const JOIN_INTERVAL: Duration = Duration::from_secs(3);
/// Sources whose join buckets are remembered; past that, full buckets are
/// forgotten first (they equal an absent one), then the one nearest full.
pub const MAX_JOIN_SOURCES: usize = 4096;
/// Largest `Cluster.ping` payload echoed.
pub const MAX_PING_BYTES: usize = 1024;

/// What connections are counted by: an IPv4 address (IPv4-mapped IPv6
/// included), or the /64 prefix of an IPv6 address, the share one host
/// usually gets.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Caps of an [`Admission`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub total: usize,
    pub per_source: usize,
    pub unproven: usize,
    pub handshaking: usize,
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        ConnectionCaps {
            total: MAX_CONNECTIONS,
            per_source: MAX_CONNECTIONS_PER_SOURCE,
            unproven: MAX_UNPROVEN_CONNECTIONS,
            handshaking: MAX_HANDSHAKING,
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go on with the handshake; the connection is counted until released.
    Accept,
    /// Ask the peer to prove its address first (QUIC Retry).
    Retry,
    /// Refuse at once.
    Refuse(Refusal),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the coordinator holds its maximum of {0} connections")]
    Full(usize),
    #[error("this address holds its maximum of {0} connections")]
    SourceFull(usize),
    #[error("the coordinator holds its maximum of {0} connections without a proven role")]
    UnprovenFull(usize),
    #[error("the coordinator holds its maximum of {0} connections in their handshake")]
    HandshakesFull(usize),
    #[error("this credential holds its maximum of {0} logged-in connections; close some first")]
    CredentialFull(usize),
}

/// Connection counts, total, per source and unproven.
#[derive(Debug, Default)]
pub struct Admission {
    caps: ConnectionCaps,
    total: usize,
    unproven: usize,
    handshaking: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(caps: ConnectionCaps) -> Self {
        Admission {
            caps,
            ..Admission::default()
        }
    }

    /// Decides on an attempt from `source`, whose address the peer has
    /// proven (`validated`, after a Retry) or not.
    pub fn admit(&mut self, source: IpAddr, validated: bool) -> Admit {
        let key = source_key(source);
        let held = self.per_source.get(&key).copied().unwrap_or(0);
        if self.total >= self.caps.total {
            return Admit::Refuse(Refusal::Full(self.caps.total));
        }
        if held >= self.caps.per_source {
            return Admit::Refuse(Refusal::SourceFull(self.caps.per_source));
        }
        // Handshakes count from the first packet, under a cap of their own
        // (counted nowhere but in the total, handshakes held open filled it
        // past the unproven cap).
        if self.handshaking >= self.caps.handshaking {
            return Admit::Refuse(Refusal::HandshakesFull(self.caps.handshaking));
        }
        if !validated && (held * 2 >= self.caps.per_source || self.total * 2 >= self.caps.total) {
            return Admit::Retry;
        }
        self.total += 1;
        self.handshaking += 1;
        *self.per_source.entry(key).or_default() += 1;
        Admit::Accept
    }

    /// A handshake ended.
    pub fn close_handshake(&mut self) {
        self.handshaking = self.handshaking.saturating_sub(1);
    }

    /// Counts a connection whose handshake is done as unproven, if there
    /// is room.
    pub fn open_unproven(&mut self) -> Result<(), Refusal> {
        if self.unproven >= self.caps.unproven {
            return Err(Refusal::UnprovenFull(self.caps.unproven));
        }
        self.unproven += 1;
        Ok(())
    }

    /// An unproven connection proved a role or closed.
    pub fn close_unproven(&mut self) {
        self.unproven = self.unproven.saturating_sub(1);
    }

    /// A connection from `source` stops counting against it (its peer
    /// proved a role, or it closed).
    pub fn leave_source(&mut self, source: IpAddr) {
        let key = source_key(source);
        if let Some(n) = self.per_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&key);
            }
        }
    }

    /// An accepted connection closed.
    pub fn release(&mut self) {
        self.total = self.total.saturating_sub(1);
    }

    /// Connections held: total, unproven.
    pub fn counts(&self) -> (usize, usize) {
        (self.total, self.unproven)
    }

    /// Connections in their handshake.
    pub fn handshaking(&self) -> usize {
        self.handshaking
    }
}

/// A token bucket: `burst` at once, then one per `interval`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(&self, now: Instant, burst: u32, interval: Duration) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / interval.as_secs_f64();
        (self.tokens + gained).min(f64::from(burst))
    }
}

/// Attempts per key (a source address, a client id), as token buckets:
/// `burst` at once, then one per `interval`, for at most `max_keys` keys.
#[derive(Debug)]
pub struct RateLimiter<K> {
    burst: u32,
    interval: Duration,
    max_sources: usize,
    buckets: HashMap<K, Bucket>,
}

/// Join attempts per source.
pub type JoinLimiter = RateLimiter<IpAddr>;

impl Default for RateLimiter<IpAddr> {
    fn default() -> Self {
        RateLimiter::new(JOIN_BURST, JOIN_INTERVAL, MAX_JOIN_SOURCES)
    }
}

impl RateLimiter<IpAddr> {
    /// Takes one attempt for `source` (counted by [`source_key`]) at `now`,
    /// or says how long until the next one is allowed (whole seconds, at
    /// least one).
    pub fn attempt(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        self.take(source_key(source), now)
    }
}

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(burst: u32, interval: Duration, max_sources: usize) -> Self {
        RateLimiter {
            burst: burst.max(1),
            interval: interval.max(Duration::from_millis(1)),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one attempt for `key` at `now`, or says how long until the
    /// next one is allowed (whole seconds, at least one).
    pub fn take(&mut self, key: K, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_sources {
            self.make_room(now);
        }
        let (burst, interval) = (self.burst, self.interval);
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: f64::from(burst),
            at: now,
        });
        let tokens = bucket.refilled(now, burst, interval);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            return Ok(());
        }
        *bucket = Bucket { tokens, at: now };
        let wait = (1.0 - tokens) * interval.as_secs_f64();
        Err(Duration::from_secs((wait.ceil() as u64).max(1)))
    }

    /// Whether `key` could take an attempt at `now`, without taking it.
    pub fn would_allow(&self, key: &K, now: Instant) -> bool {
        self.buckets
            .get(key)
            .is_none_or(|b| b.refilled(now, self.burst, self.interval) >= 1.0)
    }

    fn make_room(&mut self, now: Instant) {
        let (burst, interval) = (self.burst, self.interval);
        self.buckets
            .retain(|_, b| b.refilled(now, burst, interval) < f64::from(burst));
        if self.buckets.len() >= self.max_sources {
            // Forgetting a bucket refills it: forget the one nearest full.
            let fullest = self
                .buckets
                .iter()
                .max_by(|(_, a), (_, b)| {
                    a.refilled(now, burst, interval)
                        .total_cmp(&b.refilled(now, burst, interval))
                })
                .map(|(k, _)| k.clone());
            if let Some(key) = fullest {
                self.buckets.remove(&key);
            }
        }
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// What an operator may tune (`miren server --max-connections-per-address
/// --join-burst --join-interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontDoorOptions {
    pub caps: ConnectionCaps,
    pub join_burst: u32,
    pub join_interval: Duration,
}

impl Default for FrontDoorOptions {
    fn default() -> Self {
        FrontDoorOptions {
            caps: ConnectionCaps::default(),
            join_burst: JOIN_BURST,
            join_interval: JOIN_INTERVAL,
        }
    }
}

/// The front door's shared state.
#[derive(Debug, Default)]
pub struct FrontDoor {
    admission: Mutex<Admission>,
    joins: Mutex<JoinLimiter>,
    /// Logged-in connections per credential (`client_id`).
    app_logins: Mutex<HashMap<String, usize>>,
}

impl FrontDoor {
    pub fn new(opts: FrontDoorOptions) -> Self {
        FrontDoor {
            admission: Mutex::new(Admission::new(opts.caps)),
            joins: Mutex::new(JoinLimiter::new(
                opts.join_burst,
                opts.join_interval,
                MAX_JOIN_SOURCES,
            )),
            app_logins: Mutex::new(HashMap::new()),
        }
    }

    /// Decides on a connection attempt; an accepted one is counted until
    /// its [`Ticket`] is dropped.
    pub fn admit(self: &Arc<Self>, source: IpAddr, validated: bool) -> (Admit, Option<Ticket>) {
        let decision = match self.admission.lock() {
            Ok(mut a) => a.admit(source, validated),
            Err(_) => Admit::Refuse(Refusal::Full(0)),
        };
        let ticket = (decision == Admit::Accept).then(|| Ticket {
            door: self.clone(),
            source,
            handshaking: true,
            unproven: false,
            per_source: true,
            credential: None,
        });
        (decision, ticket)
    }

    /// Takes one join attempt for `source` now.
    pub fn join_attempt(&self, source: IpAddr) -> Result<(), Duration> {
        match self.joins.lock() {
            Ok(mut j) => j.attempt(source, Instant::now()),
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// Connections held: total, unproven.
    pub fn counts(&self) -> (usize, usize) {
        self.admission.lock().map(|a| a.counts()).unwrap_or((0, 0))
    }
}

/// One counted connection; dropping it releases its counts.
#[derive(Debug)]
pub struct Ticket {
    door: Arc<FrontDoor>,
    source: IpAddr,
    handshaking: bool,
    unproven: bool,
    /// Still counted against its source.
    per_source: bool,
    /// The credential it logged in with first, counted against it.
    credential: Option<String>,
}

impl Ticket {
    /// Its handshake is done: the peer holds a certificate of the cluster
    /// (`certificate`, it proves its role next) or counts as unproven from
    /// now, if there is room.
    pub fn handshaken(&mut self, certificate: bool) -> Result<(), Refusal> {
        let mut a = self
            .door
            .admission
            .lock()
            .map_err(|_| Refusal::UnprovenFull(0))?;
        if std::mem::take(&mut self.handshaking) {
            a.close_handshake();
        }
        if !certificate && !self.unproven {
            a.open_unproven()?;
            self.unproven = true;
        }
        Ok(())
    }

    /// This connection's peer logged in to an app with `credential`: it
    /// counts against that credential (the first it logged in with), if
    /// there is room, and no longer as unproven, but still against its
    /// source (anyone with a credential for any app may open such
    /// connections).
    ///
    /// `spent`: the login consumed a one-time credential (a CI token, for
    /// `ciLogin`): counted, never refused, since refusing it now would
    /// burn the token for nothing, and each one is a pipeline run.
    pub fn app_proven(&mut self, credential: &str, spent: bool) -> Result<(), Refusal> {
        if self.credential.is_none() {
            let mut logins = self
                .door
                .app_logins
                .lock()
                .map_err(|_| Refusal::CredentialFull(0))?;
            let held = logins.get(credential).copied().unwrap_or(0);
            if held >= MAX_CONNECTIONS_PER_CREDENTIAL && !spent {
                return Err(Refusal::CredentialFull(MAX_CONNECTIONS_PER_CREDENTIAL));
            }
            logins.insert(credential.to_string(), held + 1);
            self.credential = Some(credential.to_string());
        }
        let handshaking = std::mem::take(&mut self.handshaking);
        let unproven = std::mem::take(&mut self.unproven);
        if let Ok(mut a) = self.door.admission.lock() {
            if handshaking {
                a.close_handshake();
            }
            if unproven {
                a.close_unproven();
            }
        }
        Ok(())
    }

    /// This connection's peer proved a certificate role: it counts only in
    /// the total.
    pub fn proven(&mut self) {
        let handshaking = std::mem::take(&mut self.handshaking);
        let unproven = std::mem::take(&mut self.unproven);
        let per_source = std::mem::take(&mut self.per_source);
        if let Ok(mut a) = self.door.admission.lock() {
            if handshaking {
                a.close_handshake();
            }
            if unproven {
                a.close_unproven();
            }
            if per_source {
                a.leave_source(self.source);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(credential) = self.credential.take() {
            if let Ok(mut logins) = self.door.app_logins.lock() {
                if let Some(n) = logins.get_mut(&credential) {
                    *n -= 1;
                    if *n == 0 {
                        logins.remove(&credential);
                    }
                }
            }
        }
        if let Ok(mut a) = self.door.admission.lock() {
            if self.handshaking {
                a.close_handshake();
            }
            if self.unproven {
                a.close_unproven();
            }
            if self.per_source {
                a.leave_source(self.source);
            }
            a.release();
        }
    }
}

/// What a session does when its peer proves a role: the RPC limits and the
/// QUIC windows of a proven peer, and the connection stops counting as
/// unproven. Lives on the session's thread.
#[derive(Clone)]
pub struct Proof {
    inner: Rc<ProofInner>,
}

struct ProofInner {
    limits: Limits,
    conn: quinn::Connection,
    ticket: std::cell::RefCell<Option<Ticket>>,
    proven: Cell<Option<Role>>,
}

/// What a peer proved, which decides the room its connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An access token for one app (a deploy key's, a CI login's): the
    /// room a deploy needs ([`RpcLimits::APP`]), still counted against its
    /// source.
    App,
    /// A certificate of the cluster's (admin, runner): the room a runner's
    /// traffic needs ([`RpcLimits::PROVEN`]), and not counted against its
    /// source (a NAT may hide any number of runners).
    Certificate,
}

impl Proof {
    /// A session that has proven nothing yet, holding its connection's
    /// ticket (released when the last clone goes).
    pub fn new(limits: Limits, conn: quinn::Connection, ticket: Option<Ticket>) -> Self {
        Proof {
            inner: Rc::new(ProofInner {
                limits,
                conn,
                ticket: std::cell::RefCell::new(ticket),
                proven: Cell::new(None),
            }),
        }
    }

    /// The peer holds a certificate of the cluster's.
    pub fn prove_certificate(&self) {
        let i = &self.inner;
        if i.proven.replace(Some(Role::Certificate)) == Some(Role::Certificate) {
            return;
        }
        i.limits.set(RpcLimits::PROVEN);
        transport::endpoint::open_windows(&i.conn);
        if let Some(t) = i.ticket.borrow_mut().as_mut() {
            t.proven();
        }
    }

    /// The peer logged in to an app with `credential` (an access token's
    /// `client_id`; `spent`: with a one-time CI token, see
    /// [`Ticket::app_proven`]). Refused when a reusable credential holds
    /// its maximum of connections; a certificate's room is never narrowed
    /// by it.
    pub fn prove_app(&self, credential: &str, spent: bool) -> Result<(), Refusal> {
        let i = &self.inner;
        if i.proven.get() == Some(Role::Certificate) {
            return Ok(());
        }
        if let Some(t) = i.ticket.borrow_mut().as_mut() {
            t.app_proven(credential, spent)?;
        }
        if i.proven.replace(Some(Role::App)).is_none() {
            i.limits.set(RpcLimits::APP);
            transport::endpoint::open_app_windows(&i.conn);
        }
        Ok(())
    }

    /// Whether the peer has proven a role.
    pub fn is_proven(&self) -> bool {
        self.inner.proven.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn caps(total: usize, per_source: usize) -> ConnectionCaps {
        ConnectionCaps {
            total,
            per_source,
            unproven: total,
            handshaking: total,
        }
    }

    fn options(caps: ConnectionCaps) -> FrontDoorOptions {
        FrontDoorOptions {
            caps,
            ..FrontDoorOptions::default()
        }
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        assert_eq!(source_key(ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(source_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn one_source_gets_its_share_and_others_still_get_in() {
        let mut a = Admission::new(caps(100, 4));
        let flood = ip("192.0.2.1");
        for _ in 0..4 {
            assert_eq!(a.admit(flood, true), Admit::Accept);
        }
        assert_eq!(a.admit(flood, true), Admit::Refuse(Refusal::SourceFull(4)));
        assert_eq!(a.admit(ip("192.0.2.2"), true), Admit::Accept);
        a.leave_source(flood);
        a.close_handshake();
        a.release();
        assert_eq!(a.admit(flood, true), Admit::Accept);
        assert_eq!(a.counts(), (5, 0));
        assert_eq!(a.handshaking(), 5);
    }

    #[test]
    fn the_total_is_a_hard_cap() {
        let mut a = Admission::new(caps(3, 10));
        for i in 1..=3 {
            assert_eq!(a.admit(ip(&format!("192.0.2.{i}")), true), Admit::Accept);
        }
        assert_eq!(
            a.admit(ip("192.0.2.9"), true),
            Admit::Refuse(Refusal::Full(3))
        );
        a.leave_source(ip("192.0.2.1"));
        a.close_handshake();
        a.release();
        assert_eq!(a.admit(ip("192.0.2.9"), true), Admit::Accept);
    }

    #[test]
    fn unvalidated_addresses_are_retried_once_a_source_holds_half_its_share() {
        let mut a = Admission::new(caps(100, 4));
        let src = ip("192.0.2.1");
        // A quiet source: no extra round trip.
        assert_eq!(a.admit(src, false), Admit::Accept);
        assert_eq!(a.admit(src, false), Admit::Accept);
        // Half its share held: prove the address first.
        assert_eq!(a.admit(src, false), Admit::Retry);
        assert_eq!(a.admit(src, true), Admit::Accept);
        assert_eq!(a.counts(), (3, 0));
        // The whole endpoint half full: every new address is retried.
        let mut a = Admission::new(caps(4, 4));
        a.admit(ip("192.0.2.1"), true);
        a.admit(ip("192.0.2.2"), true);
        assert_eq!(a.admit(ip("192.0.2.3"), false), Admit::Retry);
    }

    #[test]
    fn handshakes_and_unproven_peers_have_caps_of_their_own_and_certificates_pass_both() {
        let door = Arc::new(FrontDoor::new(options(ConnectionCaps {
            total: 10,
            per_source: 10,
            unproven: 2,
            handshaking: 2,
        })));
        let src = ip("192.0.2.1");
        let admit = || {
            let (d, t) = door.admit(src, true);
            assert_eq!(d, Admit::Accept);
            t.expect("ticket")
        };
        // Two handshakes in progress: a third is refused before any TLS work.
        let (mut a, mut b) = (admit(), admit());
        assert_eq!(door.admission.lock().unwrap().handshaking(), 2);
        assert_eq!(
            door.admit(src, true).0,
            Admit::Refuse(Refusal::HandshakesFull(2))
        );
        // Both finish without a certificate: unproven, and the unproven cap
        // is full.
        a.handshaken(false).expect("room");
        b.handshaken(false).expect("room");
        assert_eq!(door.counts(), (2, 2));
        let mut c = admit();
        assert_eq!(c.handshaken(false), Err(Refusal::UnprovenFull(2)));
        drop(c);
        // A runner or an operator still gets through: its handshake has
        // room, and with a certificate it needs no unproven slot.
        let mut runner = admit();
        runner
            .handshaken(true)
            .expect("a certificate needs no unproven slot");
        runner.proven();
        assert_eq!(door.counts(), (3, 2));
        assert_eq!(door.admission.lock().unwrap().handshaking(), 0);
        drop((a, b, runner));
        assert_eq!(door.counts(), (0, 0));
    }

    #[test]
    fn a_proven_peer_stops_counting_against_its_source() {
        let door = Arc::new(FrontDoor::new(options(caps(100, 2))));
        let nat = ip("192.0.2.1");
        let mut runners = Vec::new();
        for _ in 0..10 {
            let (d, t) = door.admit(nat, true);
            assert_eq!(d, Admit::Accept);
            let mut t = t.expect("ticket");
            t.proven();
            runners.push(t);
        }
        assert_eq!(door.counts(), (10, 0));
        let (_, a) = door.admit(nat, true);
        let (_, b) = door.admit(nat, true);
        let (c, _) = door.admit(nat, true);
        assert!(a.is_some() && b.is_some());
        assert_eq!(c, Admit::Refuse(Refusal::SourceFull(2)));
        drop(runners);
        assert_eq!(door.counts(), (2, 0));
    }

    #[test]
    fn a_peer_logged_in_to_an_app_still_counts_against_its_source() {
        let door = Arc::new(FrontDoor::new(options(caps(100, 2))));
        let src = ip("192.0.2.1");
        let mut held = Vec::new();
        for _ in 0..2 {
            let (d, t) = door.admit(src, true);
            assert_eq!(d, Admit::Accept);
            let mut t = t.expect("ticket");
            t.handshaken(false).expect("room");
            t.app_proven("deploykey:k1", false).expect("room");
            held.push(t);
        }
        // No longer unproven, but its address's share is used up.
        assert_eq!(door.counts(), (2, 0));
        assert_eq!(
            door.admit(src, true).0,
            Admit::Refuse(Refusal::SourceFull(2))
        );
        drop(held);
        assert_eq!(door.counts(), (0, 0));
        assert_eq!(door.admit(src, true).0, Admit::Accept);
    }

    #[test]
    fn one_credential_holds_a_bounded_number_of_logged_in_connections() {
        let door = Arc::new(FrontDoor::new(options(caps(1000, 1000))));
        let login = |i: usize, credential: &str| {
            let (d, t) = door.admit(ip(&format!("192.0.2.{}", i % 250 + 1)), true);
            assert_eq!(d, Admit::Accept);
            let mut t = t.expect("ticket");
            t.handshaken(false).expect("room");
            t.app_proven(credential, false).map(|()| t)
        };
        // From many addresses, one deploy key gets its share and no more.
        let held: Vec<Ticket> = (0..MAX_CONNECTIONS_PER_CREDENTIAL)
            .map(|i| login(i, "deploykey:k1").expect("room"))
            .collect();
        assert_eq!(
            login(99, "deploykey:k1").err(),
            Some(Refusal::CredentialFull(MAX_CONNECTIONS_PER_CREDENTIAL))
        );
        // Another credential is not affected, and a connection closing
        // gives its place back.
        let other = login(100, "ci:b1").expect("another credential");
        // A login that spent a one-time CI token is counted, not refused.
        let (_, t) = door.admit(ip("192.0.2.200"), true);
        let mut spent = t.expect("ticket");
        spent.handshaken(false).expect("room");
        assert!(spent.app_proven("deploykey:k1", true).is_ok());
        drop(spent);
        drop(held);
        assert!(login(101, "deploykey:k1").is_ok());
        assert!(door
            .app_logins
            .lock()
            .unwrap()
            .get("deploykey:k1")
            .is_none());
        drop(other);
        assert!(door.app_logins.lock().unwrap().is_empty());
    }

    #[test]
    fn tickets_release_what_they_counted() {
        let door = Arc::new(FrontDoor::new(options(caps(10, 10))));
        let (d, t) = door.admit(ip("192.0.2.1"), true);
        assert_eq!(d, Admit::Accept);
        let mut t = t.expect("ticket");
        t.handshaken(false).expect("room");
        assert_eq!(door.counts(), (1, 1));
        t.proven();
        assert_eq!(door.counts(), (1, 0));
        drop(t);
        assert_eq!(door.counts(), (0, 0));
        let (_, t) = door.admit(ip("192.0.2.1"), true);
        drop(t.expect("ticket"));
        assert_eq!(door.counts(), (0, 0));
        let (d, t) = door.admit(ip("192.0.2.1"), false);
        assert!(d == Admit::Accept && t.is_some());
    }

    #[test]
    fn joins_get_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut j = JoinLimiter::new(3, Duration::from_secs(3), 100);
        let src = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(j.attempt(src, t0), Ok(()));
        }
        assert_eq!(j.attempt(src, t0), Err(Duration::from_secs(3)));
        // Another source is not affected.
        assert_eq!(j.attempt(ip("192.0.2.2"), t0), Ok(()));
        // One token after one interval, not before.
        assert_eq!(
            j.attempt(src, t0 + Duration::from_secs(2)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(j.attempt(src, t0 + Duration::from_secs(3)), Ok(()));
        assert!(j.attempt(src, t0 + Duration::from_secs(3)).is_err());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(j.attempt(src, later), Ok(()));
        }
        assert!(j.attempt(src, later).is_err());
    }

    #[test]
    fn join_buckets_stay_bounded_and_forget_full_ones_first() {
        let t0 = Instant::now();
        let mut j = JoinLimiter::new(2, Duration::from_secs(10), 3);
        let busy = ip("192.0.2.1");
        j.attempt(busy, t0).unwrap();
        j.attempt(busy, t0).unwrap();
        assert!(j.attempt(busy, t0).is_err());
        j.attempt(ip("192.0.2.2"), t0).unwrap();
        j.attempt(ip("192.0.2.3"), t0).unwrap();
        assert_eq!(j.len(), 3);
        // Full: the drained bucket of `busy` is kept, one nearer full goes.
        let t1 = t0 + Duration::from_secs(1);
        j.attempt(ip("192.0.2.4"), t1).unwrap();
        assert_eq!(j.len(), 3);
        assert!(j.attempt(busy, t1).is_err());
        // Long after, all are full again and forgotten together.
        let t2 = t0 + Duration::from_secs(3600);
        j.attempt(ip("192.0.2.5"), t2).unwrap();
        assert_eq!(j.len(), 1);
    }
}
