//! Workload tokens: whose a token is, and signing it.
//!
//! **Where a workload token's app is decided**: here. A runner asks for a
//! token of sandbox `<id>` ([`Minting::for_runner`]); the app (and org) come
//! from the coordinator's own `sandbox/<id>` record, never from what the
//! runner says, and the runner must be the one that record places the
//! sandbox on ([`runner_subject`], pure). The record is read from the
//! watch-fed [`SandboxIndex`] (tokens keep coming while the store is
//! unreachable); when the index does not place the sandbox on the asking
//! runner, the store decides (the placement may be younger than the
//! watch's lag). An operator may mint a token for
//! any subject ([`Minting::sign`], `miren identity token`). Either way
//! the claims are `identity::WorkloadClaims` with this cluster's issuer and
//! id, signed by the key ring's active key, on the signing pool
//! ([`crate::signing_pool`]: an RPC worker's thread is one connection's;
//! signatures should use every core). A runner sends the misses that
//! queued during its earlier calls together ([`Minting::for_runner_many`],
//! `issueWorkloadTokens`): each is decided on its own and signed as its own
//! job of the pool, and the call is answered once, which saves the thread
//! hand-offs and packets per token that cost about as much CPU as the work
//! around the signature.
//! Every refusal is counted and audited with a fixed reason
//! ([`MintRefusal`]).

use std::sync::Arc;
use std::time::Instant;

use identity::{Subject, SubjectError, WorkloadClaims};

use crate::apps::{AppError, Apps, SandboxRecord};
use crate::audit::Actor;
use crate::issuer::{Issuer, KEYS_UNAVAILABLE};
use crate::observe::{MintRefusal, Observe};
use crate::sandbox_index::SandboxIndex;
use crate::signing_pool::SigningPool;

/// Why no token was minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Refused for `reason` (counted and audited).
    #[error("{cause}")]
    Refused {
        reason: MintRefusal,
        #[source]
        cause: MintCause,
    },
    /// A sandbox record whose app or id cannot be written in a subject.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The signing task did not finish (it panicked or the runtime is
    /// stopping).
    #[error("the signing task did not finish")]
    TaskLost,
}

/// What a refused mint ran into.
#[derive(Debug, thiserror::Error)]
pub enum MintCause {
    /// The sandbox record could not be read, or is not the runner's
    /// (`AppError::NotYourSandbox`).
    #[error(transparent)]
    Apps(#[from] AppError),
    /// The store read of the sandbox record did not finish.
    #[error(transparent)]
    OffThread(#[from] crate::blocking::OffThreadError),
    /// Audiences, ttl or subject were not acceptable.
    #[error(transparent)]
    Claims(#[from] identity::ClaimsError),
    /// A thread panicked holding the key ring's lock.
    #[error("{KEYS_UNAVAILABLE}")]
    KeysUnavailable,
    /// No key signs now.
    #[error(transparent)]
    Keys(#[from] crate::keyring::KeyRingError),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] identity::MintError),
}

/// Why a runner's request names no subject it may have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerRefusal {
    /// No record of the sandbox, or the record places it on another runner.
    NotHosted,
    /// The record's values do not make a subject.
    Subject(SubjectError),
}

/// The subject of a token `runner` asks for, from our `record` of the
/// sandbox (absent: no such sandbox): the record's app and sandbox id, and
/// only when the record places the sandbox on that runner. The org is
/// empty (apps have none yet), so it is omitted from the subject.
pub fn runner_subject(
    runner: &str,
    record: Option<&SandboxRecord>,
) -> Result<Subject, RunnerRefusal> {
    match record {
        Some(s) if s.runner == runner => {
            Subject::new("", &s.app, &s.id).map_err(RunnerRefusal::Subject)
        }
        _ => Err(RunnerRefusal::NotHosted),
    }
}

/// One token a runner asks for in an `issueWorkloadTokens` call.
#[derive(Debug, Clone)]
pub struct RunnerTokenRequest {
    pub sandbox_id: String,
    pub audiences: Vec<String>,
    pub ttl: Option<u64>,
}

/// Most tokens one `issueWorkloadTokens` call may ask for.
pub const MAX_TOKENS_PER_CALL: usize = 64;

/// What one signature needs once the subject is decided.
type SignJob = (Subject, Vec<String>, Option<u64>);

/// Mints workload tokens for runners and operators.
pub struct Minting {
    issuer: Arc<Issuer>,
    apps: Arc<Apps>,
    /// Sandbox placements in memory.
    sandboxes: Arc<SandboxIndex>,
    cluster_id: String,
    observe: Arc<Observe>,
    /// The threads signatures run on.
    signing: SigningPool,
}

impl Minting {
    pub fn new(
        issuer: Arc<Issuer>,
        apps: Arc<Apps>,
        sandboxes: Arc<SandboxIndex>,
        cluster_id: String,
        observe: Arc<Observe>,
        signing: SigningPool,
    ) -> Minting {
        Minting {
            issuer,
            apps,
            sandboxes,
            cluster_id,
            observe,
            signing,
        }
    }

    /// A token for sandbox `sandbox_id`, asked by `runner`: its subject is
    /// decided by [`runner_subject`] from our record.
    pub async fn for_runner(
        self: &Arc<Self>,
        runner: &str,
        sandbox_id: &str,
        audiences: Vec<String>,
        ttl: Option<u64>,
    ) -> Result<String, MintError> {
        let request = RunnerTokenRequest {
            sandbox_id: sandbox_id.to_string(),
            audiences,
            ttl,
        };
        let mut minted = self.for_runner_many(runner, vec![request]).await;
        minted.pop().unwrap_or(Err(MintError::TaskLost))
    }

    /// Tokens for several of `runner`'s sandboxes at once (one
    /// `issueWorkloadTokens` call), each decided as by
    /// [`Minting::for_runner`] and refused on its own; results in request
    /// order, all at once: a token's hand-offs between threads cost about as
    /// much CPU as the work around its signature.
    pub async fn for_runner_many(
        self: &Arc<Self>,
        runner: &str,
        requests: Vec<RunnerTokenRequest>,
    ) -> Vec<Result<String, MintError>> {
        let actor = Actor::Runner(runner.to_string());
        // Each request's refusal, or `None` where it goes to be signed.
        let mut refusals = Vec::with_capacity(requests.len());
        let mut jobs: Vec<SignJob> = Vec::with_capacity(requests.len());
        for r in requests {
            match self.runner_subject(&actor, runner, &r.sandbox_id).await {
                Ok(subject) => {
                    jobs.push((subject, r.audiences, r.ttl));
                    refusals.push(None);
                }
                Err(e) => refusals.push(Some(e)),
            }
        }
        let mut signed = self.sign_many(actor, jobs).await.into_iter();
        refusals
            .into_iter()
            .map(|refused| match refused {
                None => signed.next().unwrap_or(Err(MintError::TaskLost)),
                Some(e) => Err(e),
            })
            .collect()
    }

    /// The subject of `runner`'s token for `sandbox_id`. Whatever app the
    /// runner might believe in, the record decides: from memory when it
    /// places the sandbox on this runner, else from the store.
    async fn runner_subject(
        &self,
        actor: &Actor,
        runner: &str,
        sandbox_id: &str,
    ) -> Result<Subject, MintError> {
        let refused = |reason: MintRefusal, cause: MintCause| {
            let e = MintError::Refused { reason, cause };
            (self.observe).token_refused(actor, Some(sandbox_id), reason, e)
        };
        let record = match self.sandboxes.get(sandbox_id) {
            Some(r) if r.runner == runner => Some(SandboxRecord::clone(&r)),
            // Off this thread: a store that cannot answer holds the caller
            // for its bound, never the RPC worker's other sessions.
            _ => {
                let (apps, id) = (self.apps.clone(), sandbox_id.to_string());
                match crate::blocking::off_thread(move || apps.sandbox(&id)).await {
                    Ok(found) => found.map_err(|e| refused(MintRefusal::Internal, e.into()))?,
                    Err(e) => return Err(refused(MintRefusal::Internal, e.into())),
                }
            }
        };
        match runner_subject(runner, record.as_ref()) {
            Ok(subject) => Ok(subject),
            Err(RunnerRefusal::NotHosted) => {
                let cause = AppError::NotYourSandbox.into();
                Err(refused(MintRefusal::NotHosted, cause))
            }
            Err(RunnerRefusal::Subject(e)) => Err(e.into()),
        }
    }

    /// A token for `subject`, asked by `actor`: any subject for an operator
    /// (`Admin.mintWorkloadToken`). Mints on the signing pool: one
    /// connection's RPC session is pinned to one thread, but its RSA
    /// signatures should use every core.
    pub async fn sign(
        self: &Arc<Self>,
        actor: Actor,
        subject: Subject,
        audiences: Vec<String>,
        ttl: Option<u64>,
    ) -> Result<String, MintError> {
        let mut signed = self.sign_many(actor, vec![(subject, audiences, ttl)]).await;
        signed.pop().unwrap_or(Err(MintError::TaskLost))
    }

    /// Signs `jobs` on the signing pool, each its own job in the pool's
    /// queue; results in `jobs`' order.
    async fn sign_many(
        self: &Arc<Self>,
        actor: Actor,
        jobs: Vec<SignJob>,
    ) -> Vec<Result<String, MintError>> {
        let me = self.clone();
        let signed = (self.signing)
            .run_all(jobs, move |(subject, audiences, ttl)| {
                let now = transport::clock::now_unix();
                me.mint(&actor, &subject, &audiences, ttl, now)
            })
            .await;
        signed
            .into_iter()
            .map(|s| s.unwrap_or(Err(MintError::TaskLost)))
            .collect()
    }

    /// Mints a workload token for `subject` at `now`, asked by `actor`.
    pub fn mint(
        &self,
        actor: &Actor,
        subject: &Subject,
        audiences: &[String],
        ttl: Option<u64>,
        now: i64,
    ) -> Result<String, MintError> {
        let started = Instant::now();
        let refused = |reason: MintRefusal, cause: MintCause| {
            let sandbox = Some(subject.sandbox.as_str());
            let e = MintError::Refused { reason, cause };
            self.observe.token_refused(actor, sandbox, reason, e)
        };
        let claims = WorkloadClaims::new(
            self.issuer.url.as_str(),
            &self.cluster_id,
            subject,
            audiences,
            ttl,
            now,
            uuid::Uuid::new_v4().to_string(),
        )
        .map_err(|e| refused(MintRefusal::BadRequest, e.into()))?;
        let minter = self
            .issuer
            .keys
            .read()
            .map_err(|_| refused(MintRefusal::NoActiveKey, MintCause::KeysUnavailable))?
            .active(now)
            .map_err(|e| refused(MintRefusal::NoActiveKey, e.into()))?;
        let token = minter
            .mint(&claims)
            .map_err(|e| refused(MintRefusal::Internal, e.into()))?;
        self.observe.token_minted(actor, &claims, started);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::KeyRing;
    use crate::shutdown::Tasks;
    use crate::store::{encode, Op, RedbStore, Store, Txn};

    fn sandbox(runner: &str) -> SandboxRecord {
        SandboxRecord {
            id: "web-a".into(),
            app: "web".into(),
            version: "v1".into(),
            service: "web".into(),
            runner: runner.into(),
            artifact: "0".repeat(64),
            created_unix: 0,
            retire_at: None,
            replaces: None,
        }
    }

    #[test]
    fn the_record_decides_the_app_and_the_runner_must_host_the_sandbox() {
        let rec = sandbox("runner-1");
        let subject = runner_subject("runner-1", Some(&rec)).expect("hosted");
        assert_eq!(
            (subject.app.as_str(), subject.sandbox.as_str()),
            ("web", "web-a")
        );
        assert_eq!(subject.to_string(), "app:web:sandbox:web-a");
        assert_eq!(
            runner_subject("runner-2", Some(&rec)),
            Err(RunnerRefusal::NotHosted)
        );
        assert_eq!(
            runner_subject("runner-1", None),
            Err(RunnerRefusal::NotHosted)
        );
        let mut odd = sandbox("runner-1");
        odd.app = "a:b".into();
        assert!(matches!(
            runner_subject("runner-1", Some(&odd)),
            Err(RunnerRefusal::Subject(_))
        ));
    }

    #[test]
    fn a_runner_gets_tokens_only_for_sandboxes_it_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tasks = Tasks::new(rt.handle().clone());
        let apps = Arc::new(Apps::new(store.clone(), dir.path(), tasks).unwrap());
        let now = transport::clock::now_unix();
        KeyRing::init(&dir.path().join("keys"), now).unwrap();
        let issuer = Arc::new(Issuer {
            url: identity::IssuerUrl::parse("https://cluster.test").unwrap(),
            history: crate::issuer::IssuerHistory::default()
                .with_current("https://cluster.test", now),
            keys: std::sync::RwLock::new(KeyRing::load(&dir.path().join("keys"), now).unwrap()),
            jwks_max_age_secs: 300,
            shared: None,
        });
        let observe = Arc::new(Observe::disabled());
        let minting = Arc::new(Minting::new(
            issuer.clone(),
            apps,
            Arc::new(SandboxIndex::default()),
            "cluster-1".into(),
            observe,
            SigningPool::start(2).unwrap(),
        ));
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(
                    "sandbox/web-a".into(),
                    encode(&sandbox("runner-1")),
                )],
            })
            .unwrap();
        let mint = |runner: &str, sandbox: &str| {
            rt.block_on(minting.for_runner(runner, sandbox, vec!["aud".into()], None))
        };
        let token = mint("runner-1", "web-a").expect("hosted");
        let verified = issuer
            .verifier("aud", now)
            .unwrap()
            .verify(&token, now)
            .expect("our own token verifies");
        assert_eq!(verified.claims["app"], "web");
        assert_eq!(verified.claims["sub"], "app:web:sandbox:web-a");
        assert_eq!(verified.claims["cluster_id"], "cluster-1");
        let refused = mint("runner-2", "web-a").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "not authorized to issue a token for this sandbox"
        );
        assert!(matches!(
            mint("runner-1", "nope"),
            Err(MintError::Refused {
                reason: MintRefusal::NotHosted,
                ..
            })
        ));

        // Several at once: each decided on its own, answers in request
        // order, each token for its own request's audience.
        let ask = |sandbox: &str, aud: &str, ttl: Option<u64>| RunnerTokenRequest {
            sandbox_id: sandbox.into(),
            audiences: vec![aud.into()],
            ttl,
        };
        let mut requests: Vec<RunnerTokenRequest> = (0..9)
            .map(|i| ask("web-a", &format!("aud-{i}"), None))
            .collect();
        requests.insert(3, ask("nope", "aud-x", None));
        requests.insert(6, ask("web-a", "aud-y", Some(1_000_000)));
        let minted = rt.block_on(minting.for_runner_many("runner-1", requests));
        assert_eq!(minted.len(), 11);
        assert!(matches!(
            minted[3],
            Err(MintError::Refused {
                reason: MintRefusal::NotHosted,
                ..
            })
        ));
        let ok: Vec<&String> = minted.iter().filter_map(|m| m.as_ref().ok()).collect();
        assert_eq!(ok.len(), 10, "{minted:?}");
        for (i, token) in ok.iter().enumerate() {
            let aud = if i == 5 {
                "aud-y".to_string()
            } else {
                format!("aud-{}", i - usize::from(i > 5))
            };
            let verified = issuer
                .verifier(&aud, now)
                .unwrap()
                .verify(token, now)
                .unwrap_or_else(|e| panic!("token {i} is for {aud}: {e}"));
            assert_eq!(verified.claims["sub"], "app:web:sandbox:web-a");
        }
        // A runner that hosts none of them gets a refusal for each.
        let others = rt.block_on(minting.for_runner_many(
            "runner-2",
            vec![ask("web-a", "a", None), ask("web-a", "b", None)],
        ));
        assert!(others.iter().all(|m| matches!(
            m,
            Err(MintError::Refused {
                reason: MintRefusal::NotHosted,
                ..
            })
        )));
    }
}
