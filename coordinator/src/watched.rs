//! Following the store from memory: the one loop that keeps an in-memory
//! index in step with the store's change stream.
//!
//! DESIGN.md's rule is that hot reads come from memory, fed by watches,
//! never by re-reading the store per request. Every such index does the
//! same thing: load once, watch from just after the load's revision, apply
//! each batch in order, and load again when the watch says its history is
//! gone (or the stream ends with an error, as an etcd member restart does).
//! That loop lives here once; an index only says how to load and how to
//! apply ([`Watched`]).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::shutdown::Tasks;
use crate::store::{Revision, Store, StoreError, WatchBatch};

/// How long a failed load waits before it is tried again.
const RELOAD_PAUSE: Duration = Duration::from_secs(1);

/// An in-memory index of some of the store's keys.
pub trait Watched: Send + Sync + 'static {
    /// What the index is called in logs.
    const NAME: &'static str;
    /// The prefix watched ("" for every key).
    fn prefix(&self) -> &str;
    /// Reads every record again; returns the revision after which changes
    /// are to be applied.
    fn reload(&self, store: &dyn Store) -> Result<Revision, StoreError>;
    /// Applies one revision's changes, in order.
    fn apply(&self, batch: &WatchBatch);
}

/// Follows the store from `from` (the revision `reload` returned) until
/// shutdown.
pub fn follow<W: Watched>(index: Arc<W>, store: Arc<dyn Store>, from: Revision, tasks: &Tasks) {
    let t = tasks.clone();
    tasks.spawn(W::NAME, async move {
        let mut from = from;
        loop {
            // Store calls block (etcd's wait up to their bound while etcd is
            // away): off the async workers, which serve the ingress.
            let watched = {
                let (index, store) = (index.clone(), store.clone());
                tokio::task::spawn_blocking(move || store.watch(index.prefix(), from + 1)).await
            };
            let stream = match watched {
                Ok(Ok(s)) => Some(s),
                Ok(Err(StoreError::Compacted { .. })) => None,
                Ok(Err(e)) => {
                    tracing::warn!("{}: watching the store: {e}", W::NAME);
                    None
                }
                Err(e) => {
                    tracing::warn!("{}: watching the store: {e}", W::NAME);
                    None
                }
            };
            if let Some(mut stream) = stream {
                loop {
                    let batch = tokio::select! {
                        _ = t.stopping() => return,
                        b = stream.next() => b,
                    };
                    match batch {
                        Some(Ok(b)) => {
                            index.apply(&b);
                            from = b.revision;
                        }
                        Some(Err(e)) => {
                            tracing::info!("{}: {e}; loading again", W::NAME);
                            break;
                        }
                        None => return,
                    }
                }
            }
            if t.is_stopping() {
                return;
            }
            let reloaded = {
                let (index, store) = (index.clone(), store.clone());
                tokio::task::spawn_blocking(move || index.reload(&*store)).await
            };
            match reloaded {
                Ok(Ok(r)) => from = r,
                Ok(Err(e)) => {
                    tracing::warn!("{}: loading: {e}", W::NAME);
                    tokio::select! {
                        _ = t.stopping() => return,
                        _ = tokio::time::sleep(RELOAD_PAUSE) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!("{}: loading: {e}", W::NAME);
                    tokio::select! {
                        _ = t.stopping() => return,
                        _ = tokio::time::sleep(RELOAD_PAUSE) => {}
                    }
                }
            }
        }
    });
}
