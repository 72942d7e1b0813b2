//! The minting proxy's side of the wire: token misses from every sandbox's
//! endpoint go to one coordinator in `issueWorkloadTokens` calls.
//!
//! Why calls carry several tokens: a token's trip through the runner's
//! thread, QUIC, the coordinator's RPC thread and its signing pool costs
//! thread wake-ups and packets on both sides that weigh about as much as
//! the work around its signature. So at most [`CALLS_IN_FLIGHT`] calls are
//! out at once, and the misses that queue meanwhile leave together in the
//! next call (at most [`MAX_PER_CALL`]). A lone miss leaves at once, so the
//! latency of a quiet sandbox is one round trip as before; under load a
//! call carries what arrived during the previous one (group commit).
//!
//! Each token in a call is decided and refused on its own by the
//! coordinator; a call the coordinator does not know (`Unimplemented`, one
//! older than this runner) is made again as one `issueWorkloadToken` per
//! token. Which coordinator: the one that last answered (see
//! [`Sessions::call_any`]); its stdout line "Runner mints through …" tells
//! operators and the failover tests where minting goes.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use schema::miren_capnp::{runner_session, token_result};
use tokio::sync::{mpsc, Semaphore};

use crate::call::CallError;
use crate::sessions::{Patience, Sessions};
use crate::tokens::{MintRequest, TokenKey};

/// Calls out at once: two keep a coordinator's cores busy while the next
/// call's misses gather (one would leave them idle for each round trip).
pub const CALLS_IN_FLIGHT: usize = 2;
/// Most tokens in one call (the coordinator takes at most 64).
pub const MAX_PER_CALL: usize = 32;

/// Sends the misses arriving on `rx` through `sessions` (each session's
/// `RunnerSession` given by `client`) until `rx` closes, waiting at most
/// `patience` per call.
pub async fn mint_through_coordinators<S, C>(
    sessions: Rc<Sessions<S>>,
    mut rx: mpsc::UnboundedReceiver<MintRequest>,
    client: C,
    patience: Patience,
) where
    S: Clone + 'static,
    C: Fn(&S) -> runner_session::Client + Clone + 'static,
{
    let told: Rc<RefCell<Option<String>>> = Rc::default();
    let slots = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_PER_CALL {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (sessions, told, client) = (sessions.clone(), told.clone(), client.clone());
        tokio::task::spawn_local(async move {
            let (keys, answers): (Vec<TokenKey>, Vec<_>) = batch.into_iter().unzip();
            let result = sessions
                .call_any(patience, |s| mint_many(client(&s), &keys))
                .await;
            drop(slot);
            if result.is_ok() {
                let first = sessions.first();
                if first.is_some() && *told.borrow() != first {
                    if let Some(endpoint) = &first {
                        println!("Runner mints through {endpoint}");
                    }
                    *told.borrow_mut() = first;
                }
            }
            match result {
                Ok(tokens) => {
                    for (answer, token) in answers.into_iter().zip(tokens) {
                        let _ = answer.send(token);
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// One call for `keys`; a result per key, in order (a reply with another
/// count of results is refused as a whole).
async fn mint_many(
    session: runner_session::Client,
    keys: &[TokenKey],
) -> Result<Vec<Result<String, CallError>>, CallError> {
    let mut req = session.issue_workload_tokens_request();
    {
        let mut list = req.get().init_requests(keys.len() as u32);
        for (i, key) in keys.iter().enumerate() {
            let mut r = list.reborrow().get(i as u32);
            r.set_sandbox_id(&key.sandbox);
            r.set_ttl_secs(key.ttl);
            let mut auds = r.init_audiences(key.audiences.len() as u32);
            for (j, a) in key.audiences.iter().enumerate() {
                auds.set(j as u32, a);
            }
        }
    }
    let reply = match req.send().promise.await {
        Ok(reply) => reply,
        Err(e) if e.kind == capnp::ErrorKind::Unimplemented => {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                out.push(mint_one(session.clone(), key).await);
            }
            return Ok(out);
        }
        Err(e) => return Err(e.into()),
    };
    let results = reply.get()?.get_results()?;
    if results.len() as usize != keys.len() {
        return Err(CallError::Rpc {
            kind: capnp::ErrorKind::Failed,
            message: format!(
                "the coordinator answered {} tokens for {} asked",
                results.len(),
                keys.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(keys.len());
    for r in results {
        out.push(match r.which().map_err(capnp::Error::from)? {
            token_result::Which::Token(t) => Ok(t?.to_string().map_err(capnp::Error::from)?),
            token_result::Which::Refused(why) => Err(CallError::Rpc {
                kind: capnp::ErrorKind::Failed,
                message: why?.to_string().map_err(capnp::Error::from)?,
            }),
        });
    }
    Ok(out)
}

/// One `issueWorkloadToken` call (a coordinator without
/// `issueWorkloadTokens`).
async fn mint_one(session: runner_session::Client, key: &TokenKey) -> Result<String, CallError> {
    let mut req = session.issue_workload_token_request();
    {
        let mut p = req.get();
        p.set_sandbox_id(&key.sandbox);
        p.set_ttl_secs(key.ttl);
        let mut list = p.init_audiences(key.audiences.len() as u32);
        for (i, a) in key.audiences.iter().enumerate() {
            list.set(i as u32, a);
        }
    }
    let reply = req.send().promise.await?;
    Ok(reply
        .get()?
        .get_token()?
        .to_string()
        .map_err(capnp::Error::from)?)
}
