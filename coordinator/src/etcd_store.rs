//! The store on etcd v3, so that several coordinators can share one cluster
//! state (`miren server --etcd URL[,URL…]`).
//!
//! [`crate::store::Store`] is etcd's model already (one revision counter,
//! compare-then-ops transactions, ordered watches that end in "compacted,
//! re-list", leases), so this backend is a translation, not a scheme of its
//! own: every key lives under one prefix (`/miren/` by default), a
//! [`Condition`] is an etcd `Compare`, an [`Op`] a `RequestOp`, a page of
//! [`Store::range`] one limited range read, a watch one etcd watch.
//!
//! The trait is synchronous (redb's calls are), the etcd client is not: the
//! store owns a small runtime of its own that owns the client, each call is
//! a task on it, and the caller waits for the answer with a bound
//! ([`EtcdOptions::timeout`]), so a lost etcd turns into a clear error, never
//! a hang. Watches are forwarded by a task on that runtime into a channel
//! that the caller's runtime reads.
//!
//! Nothing big goes into etcd: a transaction larger than
//! [`MAX_TXN_BYTES`] (under etcd's default 1.5 MiB request limit) is
//! refused before it is sent.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, TxnOp, WatchOptions,
};
use futures::StreamExt;

use crate::store::{
    Committed, Condition, EventKind, KeyValue, LeaseId, Op, Outcome, RangePage, Revision, Store,
    StoreError, Txn, WatchBatch, WatchEvent, WatchStream, MAX_RANGE_LIMIT,
};

/// How many times a call goes round all members before it reports the
/// failure, and the pause after each round.
const FAILOVER_ROUNDS: usize = 3;
const FAILOVER_PAUSE: Duration = Duration::from_millis(200);

/// Which failures a call may try again on another member.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Reads: any failure to reach a member or get its answer.
    Read,
    /// Writes: only a failure to reach the member at all, when the request
    /// cannot have been applied.
    Write,
}

impl Retry {
    fn allows(self, e: &etcd_client::Error) -> bool {
        match self {
            Retry::Read => match e {
                etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
                etcd_client::Error::TransportError(_) => true,
                _ => false,
            },
            Retry::Write => never_connected(e),
        }
    }
}

/// Whether `e` is a failure to open a connection (refused, unreachable):
/// nothing was sent.
fn never_connected(e: &etcd_client::Error) -> bool {
    // etcd-client's error names no source: start from what it wraps.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    };
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            );
        }
        cause = c.source();
    }
    false
}

/// The prefix every key lives under unless `--etcd-prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "/miren/";
/// The largest transaction sent (keys and values together); etcd refuses
/// requests over 1.5 MiB by default.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;
/// How long a call waits for etcd unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many watch batches wait for a slow reader before the forwarder
/// waits too (etcd then holds them).
const WATCH_BUFFER: usize = 256;

/// TLS towards etcd: the CA that signed the members' certificates and, when
/// etcd asks for client certificates, ours.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    /// Client certificate and key (PEM).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Member URLs (`http://host:2379`, or `https://` with [`EtcdTls`]).
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// The bound on every call, connecting included.
    pub timeout: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` with the default prefix and timeout, no TLS.
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            tls: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// [`Store`] on etcd v3.
pub struct EtcdStore {
    /// One client per member: calls go to the current one and move to the
    /// next when it cannot be reached (like etcd's own client, which pins
    /// one endpoint and fails over).
    members: Arc<Vec<Client>>,
    current: Arc<AtomicUsize>,
    prefix: Vec<u8>,
    timeout: Duration,
    handle: tokio::runtime::Handle,
    /// Taken on drop: a runtime may not be dropped inside another one.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `work` on `handle` and waits (blocking this thread) at most
/// `timeout` for its answer.
fn run_on<T, F>(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
    what: &'static str,
    work: F,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let answer = match tokio::time::timeout(timeout, work).await {
            Ok(answer) => answer,
            Err(_) => Err(StoreError::EtcdTimeout {
                what,
                after: timeout,
            }),
        };
        let _ = tx.send(answer);
    });
    // On a worker of the multi-threaded runtime, tell it this thread
    // blocks, so that its other tasks (QUIC, the ingress, minting) move to
    // another thread: with etcd gone, every call blocks for `timeout`, and
    // the loops that keep retrying (watches, leases) would otherwise hold
    // every worker.
    let answer = crate::blocking::wait_here(|| rx.recv());
    answer.map_err(|_| StoreError::EtcdTimeout {
        what,
        after: timeout,
    })?
}

fn etcd(what: &'static str) -> impl Fn(etcd_client::Error) -> StoreError {
    move |source| StoreError::Etcd {
        what,
        source: Box::new(source),
    }
}

/// Whether etcd answered "not found" (a lease that expired or was revoked).
fn is_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound)
}

/// The first key after every key that starts with `prefix` (etcd's
/// `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from here on.
    vec![0]
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map(|h| h.revision().max(0) as Revision).unwrap_or(0)
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers. Must not be called from
    /// inside the store's own runtime (it is not made yet, so it cannot be).
    pub fn connect(opts: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::EtcdConfig(
                "no etcd endpoint given (--etcd http://HOST:2379[,…])".into(),
            ));
        }
        if opts.prefix.is_empty() {
            return Err(StoreError::EtcdConfig(
                "the etcd key prefix is empty; give one such as /miren/".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::EtcdConfig(format!("could not start the etcd client: {e}")))?;
        let handle = runtime.handle().clone();
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(opts.timeout)
            .with_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(10), opts.timeout);
        if let Some(tls) = &opts.tls {
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.client {
                config = config.identity(Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(config);
        }
        let endpoints = opts.endpoints.clone();
        let members = run_on(&handle, opts.timeout, "connect", async move {
            let mut members = Vec::new();
            for endpoint in endpoints {
                members.push(
                    Client::connect([endpoint], Some(connect.clone()))
                        .await
                        .map_err(etcd("connect"))?,
                );
            }
            Ok(members)
        })?;
        let store = EtcdStore {
            members: Arc::new(members),
            current: Arc::new(AtomicUsize::new(0)),
            prefix: opts.prefix.as_bytes().to_vec(),
            timeout: opts.timeout,
            handle,
            runtime: Some(runtime),
        };
        // Connecting is lazy: ask once so that a wrong address fails now.
        store.revision()?;
        Ok(store)
    }

    /// Runs `work` against the current member; when that member cannot be
    /// reached (and, for reads, when it is unavailable) moves on to the
    /// next one and tries again, a few rounds over all members at most.
    fn call<T, F, Fut>(&self, what: &'static str, retry: Retry, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (members, current) = (self.members.clone(), self.current.clone());
        run_on(&self.handle, self.timeout, what, async move {
            let n = members.len();
            let mut failures = 0;
            loop {
                let i = current.load(Ordering::Relaxed) % n;
                match work(members[i].clone()).await {
                    Err(StoreError::Etcd { source, .. })
                        if retry.allows(&source) && failures < FAILOVER_ROUNDS * n =>
                    {
                        failures += 1;
                        let _ = current.compare_exchange(
                            i,
                            (i + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        if failures % n == 0 {
                            tokio::time::sleep(FAILOVER_PAUSE).await;
                        }
                    }
                    answer => return answer,
                }
            }
        })
    }

    fn full(&self, key: &str) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// Our key of an etcd key under the prefix.
    fn ours(prefix: &[u8], key: &[u8]) -> Result<String, StoreError> {
        let rest = key.strip_prefix(prefix).unwrap_or(key);
        String::from_utf8(rest.to_vec()).map_err(|_| StoreError::Record {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: crate::store::RecordFault::KeyNotUtf8,
        })
    }

    fn key_value(prefix: &[u8], kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: Self::ours(prefix, kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision().max(0) as Revision,
            mod_revision: kv.mod_revision().max(0) as Revision,
            version: kv.version().max(0) as u64,
            lease: (kv.lease() > 0).then_some(kv.lease() as LeaseId),
        })
    }

    /// The leases of `txn` that etcd no longer knows, first one first.
    fn missing_lease(&self, leases: Vec<LeaseId>) -> Result<Option<LeaseId>, StoreError> {
        self.call("lease lookup", Retry::Read, move |mut client| {
            let leases = leases.clone();
            async move {
                for lease in leases {
                    let live = client
                        .lease_time_to_live(lease as i64, None)
                        .await
                        .map_err(etcd("lease lookup"))?;
                    if live.ttl() < 0 {
                        return Ok(Some(lease));
                    }
                }
                Ok(None)
            }
        })
    }
}

/// Builds etcd's compares and ops for `txn`, keys under `prefix`. etcd
/// refuses a transaction that writes one key twice; applying the ops in
/// order leaves each key as its last op says, so only that op is sent.
fn etcd_txn(prefix: &[u8], txn: &Txn) -> Result<(etcd_client::Txn, Vec<LeaseId>), StoreError> {
    let full = |k: &str| {
        let mut f = prefix.to_vec();
        f.extend_from_slice(k.as_bytes());
        f
    };
    let mut bytes = 0usize;
    let compares: Vec<Compare> = txn
        .conditions
        .iter()
        .map(|c| match c {
            Condition::Absent(k) => Compare::version(full(k), CompareOp::Equal, 0),
            Condition::Equals(k, v) => {
                bytes += v.len();
                Compare::value(full(k), CompareOp::Equal, v.clone())
            }
            Condition::ModRevision(k, r) => {
                Compare::mod_revision(full(k), CompareOp::Equal, *r as i64)
            }
        })
        .collect();
    let key_of = |op: &Op| match op {
        Op::Put(k, _) | Op::PutLeased(k, _, _) | Op::Delete(k) => k.clone(),
    };
    let mut leases = Vec::new();
    let mut ops = Vec::new();
    for (i, op) in txn.ops.iter().enumerate() {
        let key = key_of(op);
        if txn.ops[i + 1..].iter().any(|later| key_of(later) == key) {
            continue;
        }
        bytes += key.len() + prefix.len();
        ops.push(match op {
            Op::Put(k, v) => {
                bytes += v.len();
                TxnOp::put(full(k), v.clone(), None)
            }
            Op::PutLeased(k, v, lease) => {
                bytes += v.len();
                leases.push(*lease);
                TxnOp::put(
                    full(k),
                    v.clone(),
                    Some(PutOptions::new().with_lease(*lease as i64)),
                )
            }
            Op::Delete(k) => TxnOp::delete(full(k), None),
        });
    }
    if bytes > MAX_TXN_BYTES {
        return Err(StoreError::TooLarge {
            bytes,
            limit: MAX_TXN_BYTES,
        });
    }
    Ok((etcd_client::Txn::new().when(compares).and_then(ops), leases))
}

/// Turns one etcd watch response into our batches (one per revision, in
/// order), keys under `prefix` only.
fn batches(
    prefix: &[u8],
    resp: &etcd_client::WatchResponse,
) -> Result<Vec<WatchBatch>, StoreError> {
    let mut out: Vec<WatchBatch> = Vec::new();
    for event in resp.events() {
        let Some(kv) = event.kv() else { continue };
        let mut ours = EtcdStore::key_value(prefix, kv)?;
        let kind = match event.event_type() {
            EventType::Put => EventKind::Put,
            EventType::Delete => {
                ours.value.clear();
                EventKind::Delete
            }
        };
        let revision = ours.mod_revision;
        let event = WatchEvent { kind, kv: ours };
        match out.last_mut() {
            Some(b) if b.revision == revision => b.events.push(event),
            _ => out.push(WatchBatch {
                revision,
                events: vec![event],
            }),
        }
    }
    Ok(out)
}

impl Store for EtcdStore {
    fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let (full, prefix) = (self.full(key), self.prefix.clone());
        self.call("get", Retry::Read, move |mut client| {
            let (full, prefix) = (full.clone(), prefix.clone());
            async move {
                let resp = client.get(full, None).await.map_err(etcd("get"))?;
                resp.kvs()
                    .first()
                    .map(|kv| EtcdStore::key_value(&prefix, kv))
                    .transpose()
            }
        })
    }

    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        let start_of_prefix = self.full(prefix);
        let end = prefix_end(&start_of_prefix);
        let start = match after {
            Some(a) if a >= prefix => {
                let mut s = self.full(a);
                s.push(0);
                s
            }
            _ => start_of_prefix,
        };
        let limit = limit.clamp(1, MAX_RANGE_LIMIT) as i64;
        let ours = self.prefix.clone();
        self.call("range", Retry::Read, move |mut client| {
            let (start, end, ours) = (start.clone(), end.clone(), ours.clone());
            async move {
                let resp = client
                    .get(
                        start,
                        Some(GetOptions::new().with_range(end).with_limit(limit)),
                    )
                    .await
                    .map_err(etcd("range"))?;
                let kvs = resp
                    .kvs()
                    .iter()
                    .map(|kv| EtcdStore::key_value(&ours, kv))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(RangePage {
                    kvs,
                    more: resp.more(),
                    revision: revision_of(resp.header()),
                })
            }
        })
    }

    fn txn(&self, txn: Txn) -> Result<Committed, StoreError> {
        let (request, leases) = etcd_txn(&self.prefix, &txn)?;
        let answer = self.call("transaction", Retry::Write, move |mut client| {
            let request = request.clone();
            async move {
                match client.txn(request).await {
                    Ok(resp) => Ok(Ok(Committed {
                        outcome: if resp.succeeded() {
                            Outcome::Applied
                        } else {
                            Outcome::ConditionFailed
                        },
                        revision: revision_of(resp.header()),
                    })),
                    Err(e) if is_not_found(&e) => Ok(Err(e)),
                    Err(e) => Err(etcd("transaction")(e)),
                }
            }
        })?;
        match answer {
            Ok(committed) => Ok(committed),
            // etcd says "not found" for a put on a lease it does not know.
            Err(e) => match self.missing_lease(leases)? {
                Some(lease) => Err(StoreError::LeaseNotFound(lease)),
                None => Err(etcd("transaction")(e)),
            },
        }
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let key = self.prefix.clone();
        self.call("revision", Retry::Read, move |mut client| {
            let key = key.clone();
            async move {
                let resp = client
                    .get(key, Some(GetOptions::new().with_count_only()))
                    .await
                    .map_err(etcd("revision"))?;
                Ok(revision_of(resp.header()))
            }
        })
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let start = self.full(prefix);
        let end = prefix_end(&start);
        let ours = self.prefix.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WatchBatch, StoreError>>(WATCH_BUFFER);
        // Made and confirmed before returning, so that every change after
        // this call (from == 0) or from `from` on is seen.
        let mut stream = self.call("watch", Retry::Read, move |mut client| {
            let (start, end) = (start.clone(), end.clone());
            async move {
                // etcd confirms a watch from compacted history first and
                // cancels it in the next message: learn now whether that one
                // is coming, so that the caller hears of it from this call.
                let mut compacted = false;
                if from > 0 {
                    let head = client
                        .get(start.clone(), Some(GetOptions::new().with_count_only()))
                        .await
                        .map_err(etcd("watch"))?;
                    if from <= revision_of(head.header()) {
                        let at = GetOptions::new()
                            .with_count_only()
                            .with_revision(from as i64);
                        match client.get(start.clone(), Some(at)).await {
                            Ok(_) => {}
                            Err(etcd_client::Error::GRpcStatus(s))
                                if s.code() == tonic::Code::OutOfRange =>
                            {
                                compacted = true
                            }
                            Err(e) => return Err(etcd("watch")(e)),
                        }
                    }
                }
                let mut options = WatchOptions::new().with_range(end);
                if from > 0 {
                    options = options.with_start_revision(from as i64);
                }
                let mut stream = client
                    .watch(start, Some(options))
                    .await
                    .map_err(etcd("watch"))?;
                loop {
                    let Some(first) = stream.message().await.map_err(etcd("watch"))? else {
                        return Err(StoreError::EtcdWatchEnded);
                    };
                    if first.canceled() {
                        if first.compact_revision() > 0 {
                            return Err(StoreError::Compacted {
                                requested: from,
                                first_kept: first.compact_revision() as Revision,
                            });
                        }
                        return Err(StoreError::EtcdWatchEnded);
                    }
                    if first.created() && !compacted {
                        return Ok(stream);
                    }
                }
            }
        })?;
        let prefix = ours;
        self.handle.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = stream.message() => next,
                    () = tx.closed() => break,
                };
                let resp = match next {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        let _ = tx.send(Err(StoreError::EtcdWatchEnded)).await;
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(etcd("watch")(e))).await;
                        break;
                    }
                };
                if resp.canceled() {
                    let end = if resp.compact_revision() > 0 {
                        StoreError::Compacted {
                            requested: from,
                            first_kept: resp.compact_revision() as Revision,
                        }
                    } else {
                        StoreError::EtcdWatchEnded
                    };
                    let _ = tx.send(Err(end)).await;
                    break;
                }
                match batches(&prefix, &resp) {
                    Ok(list) => {
                        for batch in list {
                            if tx.send(Ok(batch)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
        });
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        self.call("lease grant", Retry::Write, move |mut client| async move {
            let resp = client
                .lease_grant(secs, None)
                .await
                .map_err(etcd("lease grant"))?;
            Ok(resp.id() as LeaseId)
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call(
            "lease keep-alive",
            Retry::Read,
            move |mut client| async move {
                let live = client
                    .lease_time_to_live(lease as i64, None)
                    .await
                    .map_err(etcd("lease keep-alive"))?;
                if live.ttl() < 0 {
                    return Err(StoreError::LeaseNotFound(lease));
                }
                match client.lease_keep_alive(lease as i64).await {
                    Ok(_) => Ok(()),
                    // Expired between the two calls.
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                        Err(StoreError::LeaseNotFound(lease))
                    }
                    Err(e) => Err(etcd("lease keep-alive")(e)),
                }
            },
        )
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call("lease revoke", Retry::Write, move |mut client| async move {
            match client.lease_revoke(lease as i64).await {
                Ok(_) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(etcd("lease revoke")(e)),
            }
        })
    }
}

/// The store key naming the cluster whose state a store holds.
pub const OWNER_KEY: &str = "cluster/ca-fingerprint";

/// Claims a shared store for the cluster whose CA has `fingerprint`, or
/// checks that it is that cluster's: two clusters writing one etcd prefix
/// would corrupt each other.
pub fn claim(store: &dyn Store, fingerprint: &str) -> Result<(), StoreError> {
    // Twice at most: the owner key may be removed between the two calls.
    for _ in 0..2 {
        let claim = Txn {
            conditions: vec![Condition::Absent(OWNER_KEY.into())],
            ops: vec![Op::Put(OWNER_KEY.into(), fingerprint.as_bytes().to_vec())],
        };
        if store.commit(claim)? == Outcome::Applied {
            return Ok(());
        }
        match store.get(OWNER_KEY)? {
            Some(owner) if owner == fingerprint.as_bytes() => return Ok(()),
            Some(owner) => {
                return Err(StoreError::OtherCluster {
                    owner: String::from_utf8_lossy(&owner).into_owned(),
                    ours: fingerprint.to_string(),
                })
            }
            None => {}
        }
    }
    Err(StoreError::OtherCluster {
        owner: "(changing)".into(),
        ours: fingerprint.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/miren/"), b"/miren0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn a_transaction_sends_each_key_once_as_its_last_op_leaves_it() {
        let txn = Txn {
            conditions: vec![Condition::ModRevision("a".into(), 3)],
            ops: vec![
                Op::Put("a".into(), b"1".to_vec()),
                Op::PutLeased("b".into(), b"2".to_vec(), 7),
                Op::Delete("a".into()),
            ],
        };
        let (_, leases) = etcd_txn(b"/p/", &txn).unwrap();
        assert_eq!(leases, vec![7]);
    }

    #[test]
    fn an_oversized_transaction_is_refused_before_it_is_sent() {
        let txn = Txn {
            conditions: vec![],
            ops: vec![Op::Put("big".into(), vec![0; MAX_TXN_BYTES + 1])],
        };
        assert!(matches!(
            etcd_txn(b"/p/", &txn),
            Err(StoreError::TooLarge { .. })
        ));
    }
}
