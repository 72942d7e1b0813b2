//! The runner's live sessions, one per coordinator, and the rule for
//! calling "any coordinator".
//!
//! A runner holds a session with every coordinator it knows (see
//! [`crate::agent`]); what needs only one coordinator (a workload token, an
//! artifact chunk, a certificate renewal) goes to one live session: the
//! one that last answered such a call first (after others were passed over
//! for a lost connection or silence, not for a refusal), then the others in
//! the order they were attached. A call whose connection is lost, or that gets no
//! answer within its attempt's patience while another session remains, is
//! tried at once on the next session; a refusal (the coordinator answered
//! no) is final, unless the call says another coordinator may answer
//! otherwise ([`OnRefusal::TryNext`]: an artifact may be held by the
//! coordinator it was uploaded to only). What every coordinator needs (sandbox reports) goes to
//! [`Sessions::all`].

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use crate::call::CallError;

/// The live sessions, by coordinator endpoint, in attach order.
pub struct Sessions<S> {
    inner: RefCell<Inner<S>>,
}

struct Inner<S> {
    live: Vec<(String, S)>,
    /// The endpoint whose session last answered a one-coordinator call.
    preferred: Option<String>,
}

impl<S> Default for Sessions<S> {
    fn default() -> Self {
        Sessions {
            inner: RefCell::new(Inner {
                live: Vec::new(),
                preferred: None,
            }),
        }
    }
}

/// How long one-coordinator calls wait, and whether a refusal ends them.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// For one session's answer while another session could be tried.
    pub attempt: Duration,
    /// For the call in all.
    pub total: Duration,
    pub on_refusal: OnRefusal,
}

/// What a coordinator's refusal does to a one-coordinator call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefusal {
    /// It is the answer (every coordinator decides alike: a token).
    Final,
    /// The next session is tried (what one coordinator lacks another may
    /// have: an artifact).
    TryNext,
}

impl<S: Clone> Sessions<S> {
    /// Adds (or replaces) the session with `endpoint`.
    pub fn attach(&self, endpoint: &str, session: S) {
        let mut inner = self.inner.borrow_mut();
        inner.live.retain(|(e, _)| e != endpoint);
        inner.live.push((endpoint.to_string(), session));
    }

    /// Removes the session with `endpoint`.
    pub fn detach(&self, endpoint: &str) {
        let mut inner = self.inner.borrow_mut();
        inner.live.retain(|(e, _)| e != endpoint);
        if inner.preferred.as_deref() == Some(endpoint) {
            inner.preferred = None;
        }
    }

    /// Whether a session with `endpoint` is live.
    pub fn has(&self, endpoint: &str) -> bool {
        self.inner.borrow().live.iter().any(|(e, _)| e == endpoint)
    }

    /// How many sessions are live.
    pub fn count(&self) -> usize {
        self.inner.borrow().live.len()
    }

    /// Every live session.
    pub fn all(&self) -> Vec<S> {
        self.inner
            .borrow()
            .live
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// The live sessions in the order a one-coordinator call tries them.
    pub fn in_order(&self) -> Vec<(String, S)> {
        let inner = self.inner.borrow();
        let mut out = inner.live.clone();
        if let Some(p) = &inner.preferred {
            if let Some(i) = out.iter().position(|(e, _)| e == p) {
                let first = out.remove(i);
                out.insert(0, first);
            }
        }
        out
    }

    /// The endpoint one-coordinator calls go to first now.
    pub fn first(&self) -> Option<String> {
        self.in_order().into_iter().next().map(|(e, _)| e)
    }

    /// Notes that `endpoint` answered; returns whether that changes where
    /// calls go first.
    fn answered(&self, endpoint: &str) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.preferred.as_deref() == Some(endpoint) {
            return false;
        }
        inner.preferred = Some(endpoint.to_string());
        true
    }

    /// Runs `call` on one live session: see the module doc. `call` gets the
    /// session; its `Err(CallError::Rpc { kind: Disconnected, .. })` or no
    /// answer in time moves on to the next session.
    pub async fn call_any<T, F, Fut>(&self, patience: Patience, call: F) -> Result<T, CallError>
    where
        F: Fn(S) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let candidates = self.in_order();
        if candidates.is_empty() {
            return Err(CallError::Unreachable);
        }
        let deadline = tokio::time::Instant::now() + patience.total;
        let mut last = CallError::Unreachable;
        // A session passed over for a refusal is still healthy: the one
        // that answered next does not take its place as the first.
        let mut refused_before = false;
        let count = candidates.len();
        for (i, (endpoint, session)) in candidates.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let wait = if i + 1 < count {
                patience.attempt.min(left)
            } else {
                left
            };
            match tokio::time::timeout(wait, call(session)).await {
                Ok(Ok(v)) => {
                    if !refused_before && self.answered(&endpoint) {
                        tracing::info!("calls that need one coordinator go to {endpoint}");
                    }
                    return Ok(v);
                }
                Ok(Err(e)) if !lost(&e) && patience.on_refusal == OnRefusal::Final => {
                    return Err(e)
                }
                Ok(Err(e)) => {
                    refused_before |= !lost(&e);
                    last = e;
                }
                Err(_) => last = CallError::NoAnswer,
            }
            tracing::info!("{endpoint}: {last}; trying another coordinator");
        }
        Err(last)
    }
}

/// Whether a call failed because its connection went (not because the
/// coordinator refused).
fn lost(e: &CallError) -> bool {
    match e {
        CallError::Unreachable | CallError::NoAnswer => true,
        CallError::Rpc { kind, .. } => *kind == capnp::ErrorKind::Disconnected,
        CallError::ShuttingDown => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patience() -> Patience {
        Patience {
            attempt: Duration::from_millis(50),
            total: Duration::from_secs(5),
            on_refusal: OnRefusal::Final,
        }
    }

    fn disconnected() -> CallError {
        CallError::from(capnp::Error::disconnected("connection lost".into()))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lost_or_silent_session_is_skipped_and_the_one_that_answers_goes_first() {
        let s: Sessions<u32> = Sessions::default();
        assert_eq!(
            s.call_any(patience(), |n| async move { Ok(n) }).await,
            Err(CallError::Unreachable)
        );
        s.attach("a", 1);
        s.attach("b", 2);
        s.attach("c", 3);
        assert_eq!(s.first().as_deref(), Some("a"));
        // "a" has lost its connection, "b" does not answer: "c" answers
        // and is tried first from then on.
        let got = s
            .call_any(patience(), |n| async move {
                match n {
                    1 => Err(disconnected()),
                    2 => std::future::pending().await,
                    n => Ok(n),
                }
            })
            .await;
        assert_eq!(got, Ok(3));
        assert_eq!(s.first().as_deref(), Some("c"));
        // A refusal is the coordinator's answer: not tried elsewhere.
        let refused = CallError::from(capnp::Error::failed("not your sandbox".into()));
        let r = refused.clone();
        assert_eq!(
            s.call_any(patience(), |_| {
                let r = r.clone();
                async move { Err::<u32, _>(r) }
            })
            .await,
            Err(refused.clone())
        );
        // Unless another coordinator may answer otherwise.
        let try_next = Patience {
            on_refusal: OnRefusal::TryNext,
            ..patience()
        };
        let r = refused.clone();
        let got = s
            .call_any(try_next, |n| {
                let r = r.clone();
                async move {
                    match n {
                        3 => Err(r),
                        n => Ok(n),
                    }
                }
            })
            .await;
        assert_eq!(got, Ok(1));
        assert_eq!(
            s.first().as_deref(),
            Some("c"),
            "a refusal moves no preference"
        );
        // A detached session is neither called nor first.
        s.detach("c");
        assert_eq!(s.first().as_deref(), Some("a"));
        s.detach("a");
        s.attach("a", 1);
        assert_eq!(s.all(), [2, 1]);
        assert!(!s.has("c") && s.has("b"));
        // The last session left gets the whole patience.
        s.detach("a");
        assert_eq!(s.first().as_deref(), Some("b"));
        let slow = s
            .call_any(patience(), |n| async move {
                tokio::time::sleep(Duration::from_millis(120)).await;
                Ok(n)
            })
            .await;
        assert_eq!(slow, Ok(2));
    }
}
