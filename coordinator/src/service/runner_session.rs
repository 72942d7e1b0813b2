//! `RunnerSession`: a joined runner's link. The runner fetches artifacts,
//! asks for its sandboxes' workload tokens, reports sandbox states,
//! heartbeats and renews its certificate through it (a runner holds one
//! with every coordinator); tokens, reports and heartbeats are decided from
//! watch-fed memory, so they keep working while the store cannot answer; the coordinator's
//! commands go the other way through the runner's `RunnerAgent`
//! capability, sent by [`pump`] (registered with the runner registry,
//! `crate::runners::Registry::send`).

use std::sync::Arc;

use capnp::capability::Rc;
use schema::miren_capnp::{runner_agent, runner_session};
use tokio::sync::mpsc;
use transport::clock::now_unix;

use super::wire::{app_err, mint_err, registry_err, token_request, write_spec};
use crate::apps::SandboxReport;
use crate::minting::{RunnerTokenRequest, MAX_TOKENS_PER_CALL};
use crate::runners::{LiveStatus, RunnerCommand};
use crate::state::State;

/// A connected runner's session; dropped when its connection ends.
pub struct RunnerSessionService {
    state: Arc<State>,
    id: String,
    session: u64,
    /// Tokens this session asked for that are not answered yet (the
    /// session's calls all run on this RPC worker's thread).
    tokens_pending: std::cell::Cell<usize>,
}

/// Most tokens one runner session may have asked for and not been answered:
/// a runner sends at most 2 calls of 32 (`runner::mint_calls`), so only a
/// runaway or compromised runner meets it; without it one could queue
/// 256 calls of 64 signatures and hold every other runner's tokens behind
/// seconds of signing.
pub const MAX_TOKENS_PENDING: usize = 256;

/// Counts a call's tokens as pending while it lives.
struct Pending<'a> {
    count: &'a std::cell::Cell<usize>,
    n: usize,
}

impl<'a> Pending<'a> {
    fn take(count: &'a std::cell::Cell<usize>, n: usize) -> Result<Pending<'a>, capnp::Error> {
        if count.get() + n > MAX_TOKENS_PENDING {
            return Err(capnp::Error::overloaded(format!(
                "this runner has {} tokens asked for and not answered (at most \
                 {MAX_TOKENS_PENDING}); ask again when they are",
                count.get()
            )));
        }
        count.set(count.get() + n);
        Ok(Pending { count, n })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.count.set(self.count.get().saturating_sub(self.n));
    }
}

impl RunnerSessionService {
    /// Registers runner `id`'s connection and starts the task that sends it
    /// commands through `agent` (on this RPC worker's thread, where the
    /// agent capability lives).
    pub async fn connect(
        state: Arc<State>,
        id: &str,
        conn: &quinn::Connection,
        agent: runner_agent::Client,
    ) -> Result<RunnerSessionService, capnp::Error> {
        let (tx, rx) = mpsc::unbounded_channel::<RunnerCommand>();
        let session = (state.registry)
            .connect(id, conn.clone(), tx, now_unix())
            .await
            .map_err(|e| {
                // Removed between its handshake and this call: told by the
                // close code at once, not left to reconnect and learn it.
                if matches!(e, crate::runners::RegistryError::Removed(_)) {
                    transport::close::close_runner_removed(conn);
                }
                registry_err(e)
            })?;
        tokio::task::spawn_local(state.tasks.track("runner commands", pump(agent, rx)));
        // What it reported on earlier sessions no longer counts.
        state.apps.reports().session_started(id, session);
        Ok(RunnerSessionService {
            state,
            id: id.to_string(),
            session,
            tokens_pending: std::cell::Cell::new(0),
        })
    }
}

/// Sends the commands from the (Send) scheduler to the runner through its
/// agent capability, until the session ends (its registration, which holds
/// the sender, goes with it). It outlives the start of a shutdown on
/// purpose: rollouts cut by it still stop their sandboxes through it, and
/// the connection closes right after (see `crate::server`).
///
/// Starts, stops and log reads go one at a time, in order; a ping is sent
/// as soon as it arrives, never behind them: a start waiting for its
/// artifact or a stop waiting for a process to exit must not make a live
/// runner look silent to [`crate::runners::Registry::connect`]'s probe.
pub async fn pump(agent: runner_agent::Client, mut rx: mpsc::UnboundedReceiver<RunnerCommand>) {
    let (in_order, mut queued) = mpsc::unbounded_channel::<RunnerCommand>();
    let dispatch = async {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                RunnerCommand::Ping(done) => {
                    tokio::task::spawn_local(ping(agent.clone(), done));
                }
                other => {
                    // The receiver lives as long as this function.
                    let _ = in_order.send(other);
                }
            }
        }
        // The session is over: what is queued still goes, then the end.
        drop(in_order);
    };
    let run = async {
        while let Some(cmd) = queued.recv().await {
            run_command(&agent, cmd).await;
        }
    };
    futures::join!(dispatch, run);
}

/// Asks the runner to answer, for a probe: any answer, a refusal
/// included, goes back; a connection broken under the call drops `done`
/// unanswered.
async fn ping(agent: runner_agent::Client, done: crate::runners::Reply<()>) {
    match agent.ping_request().send().promise.await {
        Err(e) if e.kind == capnp::ErrorKind::Disconnected => {}
        answer => {
            let _ = done.send(answer.map(|_| ()).map_err(refusal));
        }
    }
}

/// A runner's refusal, in its own words.
fn refusal(e: capnp::Error) -> crate::runners::RunnerRefusal {
    crate::runners::RunnerRefusal(transport::rpc::remote_message(&e))
}

/// Sends one command and hands its answer back.
async fn run_command(agent: &runner_agent::Client, cmd: RunnerCommand) {
    match cmd {
        RunnerCommand::Ping(done) => ping(agent.clone(), done).await,
        RunnerCommand::Start(spec, done) => {
            let mut req = agent.start_sandbox_request();
            write_spec(&spec, req.get().init_spec());
            let r = req.send().promise.await.map(|_| ());
            let _ = done.send(r.map_err(refusal));
        }
        RunnerCommand::Stop(id, done) => {
            let mut req = agent.stop_sandbox_request();
            req.get().set_id(&id);
            let r = req.send().promise.await.map(|_| ());
            let _ = done.send(r.map_err(refusal));
        }
        RunnerCommand::Logs(id, lines, done) => {
            let mut req = agent.logs_request();
            req.get().set_id(&id);
            req.get().set_lines(lines);
            let result = async {
                let reply = req.send().promise.await?;
                let mut out = Vec::new();
                for l in reply.get()?.get_lines()? {
                    out.push(l?.to_string()?);
                }
                Ok::<_, capnp::Error>(out)
            }
            .await;
            let _ = done.send(result.map_err(refusal));
        }
    }
}

impl Drop for RunnerSessionService {
    fn drop(&mut self) {
        self.state.registry.disconnect(&self.id, self.session);
        (self.state.apps.reports()).session_ended(&self.id, self.session, now_unix());
        self.state.apps.waker().notify_one();
    }
}

impl runner_session::Server for RunnerSessionService {
    async fn fetch_artifact(
        self: Rc<Self>,
        params: runner_session::FetchArtifactParams,
        mut results: runner_session::FetchArtifactResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (apps, runner) = (self.state.apps.clone(), self.id.clone());
        let (sha, offset, length) = (
            p.get_sha256()?.to_str()?.to_string(),
            p.get_offset(),
            p.get_length(),
        );
        // Off the RPC thread: the first read of an artifact this
        // coordinator has no file of rebuilds it from the shared store.
        let read = (self.state.rt)
            .spawn_blocking(move || apps.read_artifact(&runner, &sha, offset, length));
        let (data, size) = super::wire::joined(read).await?.map_err(app_err)?;
        let mut r = results.get();
        r.set_data(&data);
        r.set_size(size);
        Ok(())
    }

    async fn issue_workload_token(
        self: Rc<Self>,
        params: runner_session::IssueWorkloadTokenParams,
        mut results: runner_session::IssueWorkloadTokenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let sandbox_id = p.get_sandbox_id()?.to_str()?;
        let (audiences, ttl) = token_request(p.get_audiences()?, p.get_ttl_secs())?;
        let _pending = Pending::take(&self.tokens_pending, 1)?;
        // The app is decided from our records (`crate::minting`).
        let token = (self.state.minting)
            .for_runner(&self.id, sandbox_id, audiences, ttl)
            .await
            .map_err(mint_err)?;
        results.get().set_token(&token);
        Ok(())
    }

    async fn issue_workload_tokens(
        self: Rc<Self>,
        params: runner_session::IssueWorkloadTokensParams,
        mut results: runner_session::IssueWorkloadTokensResults,
    ) -> Result<(), capnp::Error> {
        let list = params.get()?.get_requests()?;
        if list.len() as usize > MAX_TOKENS_PER_CALL {
            return Err(super::wire::failed(format!(
                "at most {MAX_TOKENS_PER_CALL} tokens per issueWorkloadTokens call, got {}",
                list.len()
            )));
        }
        let _pending = Pending::take(&self.tokens_pending, list.len() as usize)?;
        let mut requests = Vec::with_capacity(list.len() as usize);
        for r in list {
            let (audiences, ttl) = token_request(r.get_audiences()?, r.get_ttl_secs())?;
            requests.push(RunnerTokenRequest {
                sandbox_id: r.get_sandbox_id()?.to_str()?.to_string(),
                audiences,
                ttl,
            });
        }
        // Each app is decided from our records (`crate::minting`).
        let minted = self.state.minting.for_runner_many(&self.id, requests).await;
        let mut out = results.get().init_results(minted.len() as u32);
        for (i, m) in minted.into_iter().enumerate() {
            let mut r = out.reborrow().get(i as u32);
            match m {
                Ok(token) => r.set_token(&token),
                Err(e) => r.set_refused(e.to_string()),
            }
        }
        Ok(())
    }

    async fn report_sandbox(
        self: Rc<Self>,
        params: runner_session::ReportSandboxParams,
        _: runner_session::ReportSandboxResults,
    ) -> Result<(), capnp::Error> {
        let r = params.get()?.get_report()?;
        let report = SandboxReport {
            state: r.get_state()?.into(),
            restarts: r.get_restarts(),
            address: r.get_address()?.to_string()?,
            last_log: r.get_last_log()?.to_string()?,
            last_exit: r.get_last_exit()?.to_string()?,
        };
        let id = r.get_id()?.to_str()?;
        let now = now_unix();
        // From memory when the sandbox index places the sandbox on this
        // runner, so that reports keep coming while the store cannot
        // answer; else `Apps::report` decides from the store.
        match self.state.sandboxes.get(id) {
            Some(placed) if placed.runner == self.id => {
                let reports = self.state.apps.reports();
                reports.report(&self.id, self.session, id, report, now);
                self.state.apps.waker().notify_one();
                Ok(())
            }
            // Off this thread: a store that cannot answer holds this call
            // for its bound, never the RPC worker's other sessions.
            _ => {
                let (state, runner, session, id) = (
                    self.state.clone(),
                    self.id.clone(),
                    self.session,
                    id.to_string(),
                );
                crate::blocking::off_thread(move || {
                    (state.apps).report(&runner, session, &id, report, now)
                })
                .await
                .map_err(|e| capnp::Error::failed(e.to_string()))?
                .map_err(app_err)
            }
        }
    }

    async fn heartbeat(
        self: Rc<Self>,
        params: runner_session::HeartbeatParams,
        mut results: runner_session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_status()?;
        let status = LiveStatus {
            version: s.get_version()?.to_string()?,
            sandboxes: s.get_sandboxes(),
            isolation: s.get_isolation()?,
            limits: s.get_limits()?.to_string()?,
        };
        let mut running = std::collections::BTreeSet::new();
        if s.has_running() {
            for id in s.get_running()? {
                running.insert(id?.to_string()?);
            }
        }
        let now = now_unix();
        let cordoned = self
            .state
            .registry
            .heartbeat(&self.id, self.session, status, now)
            .map_err(registry_err)?;
        // The loop runs every second anyway; a heartbeat wakes it only when
        // the runner's set changed.
        if (self.state.apps.reports()).inventory(&self.id, self.session, running, now) {
            self.state.apps.waker().notify_one();
        }
        results.get().set_cordoned(cordoned);
        Ok(())
    }

    async fn renew(
        self: Rc<Self>,
        params: runner_session::RenewParams,
        mut results: runner_session::RenewResults,
    ) -> Result<(), capnp::Error> {
        let csr = params.get()?.get_csr_der()?;
        let cert = self
            .state
            .registry
            .renew(&self.state.cluster.ca, &self.id, csr)
            .map_err(registry_err)?;
        results.get().set_cert_pem(&cert);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runners::{ResourceLimits, SandboxSpec};
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// A runner whose starts never finish (an artifact that never comes)
    /// but that answers pings.
    struct StuckStarts;

    impl runner_agent::Server for StuckStarts {
        async fn start_sandbox(
            self: Rc<Self>,
            _: runner_agent::StartSandboxParams,
            _: runner_agent::StartSandboxResults,
        ) -> Result<(), capnp::Error> {
            std::future::pending::<()>().await;
            Ok(())
        }

        async fn ping(
            self: Rc<Self>,
            _: runner_agent::PingParams,
            _: runner_agent::PingResults,
        ) -> Result<(), capnp::Error> {
            Ok(())
        }
    }

    fn spec(id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            app: "web".into(),
            version: "v1".into(),
            service: "web".into(),
            command: "true".into(),
            port: 8080,
            env: Vec::new(),
            limits: ResourceLimits::default(),
            artifact: "0".repeat(64),
            issuer_url: "https://issuer.test".into(),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_ping_is_answered_while_starts_wait_and_commands_keep_their_order() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let agent: runner_agent::Client = capnp_rpc::new_client(StuckStarts);
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::task::spawn_local(pump(agent, rx));
                let (first, mut first_answer) = oneshot::channel();
                tx.send(RunnerCommand::Start(spec("s1"), first)).unwrap();
                let (second, mut second_answer) = oneshot::channel();
                tx.send(RunnerCommand::Start(spec("s2"), second)).unwrap();
                let (ping, ping_answer) = oneshot::channel();
                tx.send(RunnerCommand::Ping(ping)).unwrap();
                // The bound is only how long the test waits: queued behind
                // the stuck start, the ping would never be answered.
                let answer = tokio::time::timeout(Duration::from_secs(10), ping_answer)
                    .await
                    .expect("the ping waited behind a start")
                    .expect("the ping was answered");
                assert!(answer.is_ok(), "{answer:?}");
                // The starts are still one at a time: the first waits, the
                // second was not even sent.
                assert!(first_answer.try_recv().is_err());
                assert!(second_answer.try_recv().is_err());
            })
            .await;
    }

    #[test]
    fn a_session_is_refused_tokens_past_its_pending_bound_until_answers_come_back() {
        let count = std::cell::Cell::new(0);
        let first = Pending::take(&count, 200).expect("within the bound");
        let second = Pending::take(&count, MAX_TOKENS_PENDING - 200).expect("up to the bound");
        let refused = Pending::take(&count, 1).err().expect("past the bound");
        assert_eq!(refused.kind, capnp::ErrorKind::Overloaded);
        assert_eq!(count.get(), MAX_TOKENS_PENDING, "a refusal takes nothing");
        drop(first);
        assert_eq!(count.get(), MAX_TOKENS_PENDING - 200);
        let third = Pending::take(&count, 200).expect("room again once answered");
        drop((second, third));
        assert_eq!(count.get(), 0);
    }
}
