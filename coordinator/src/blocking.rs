//! Store calls made from async code. A store call blocks its thread (with
//! etcd unreachable, for the store's whole bound), so on a worker of the
//! coordinator's multi-threaded runtime the worker first hands its other
//! tasks (QUIC, the ingress, minting) to another thread
//! (`tokio::task::block_in_place`). Anywhere else (an RPC worker's
//! single-threaded runtime, a `LocalSet`, the thread in `block_on`, the
//! blocking pool) the call simply blocks: there `block_in_place` would
//! panic or is pointless. Which threads are the runtime's own is marked at
//! their start ([`mark_runtime_thread`], given to the runtime builder's
//! `on_thread_start`), because tokio does not say whether a thread may
//! block in place. The RPC workers (one single-threaded runtime per core,
//! many sessions each) cannot block in place: their handlers that may reach
//! the store hand the call to the blocking pool ([`off_thread`]), so that one
//! anonymous join or one runner's report of an unknown sandbox waiting on an
//! unreachable etcd never stalls every session on that worker.

use std::cell::Cell;

thread_local! {
    static RUNTIME_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as one of the coordinator's multi-threaded
/// runtime (for `tokio::runtime::Builder::on_thread_start`).
pub fn mark_runtime_thread() {
    RUNTIME_THREAD.with(|t| t.set(true));
}

/// Runs the blocking `call`, telling the runtime first when this thread is
/// one of its workers.
pub fn wait_here<T>(call: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let marked = RUNTIME_THREAD.with(Cell::get);
    match Handle::try_current() {
        Ok(h) if marked && h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// The store call did not finish: its thread panicked.
#[derive(Debug, thiserror::Error)]
#[error("a store call on the blocking pool failed: {0}")]
pub struct OffThreadError(#[from] tokio::task::JoinError);

/// Runs the blocking `call` on the blocking pool and waits for it without
/// holding this thread (for RPC handlers on the workers' runtimes).
pub async fn off_thread<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffThreadError> {
    Ok(tokio::task::spawn_blocking(call).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_in_place_on_marked_workers_and_plainly_elsewhere() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(mark_runtime_thread)
            .enable_all()
            .build()
            .unwrap();
        // On a worker: in place (a panic here would fail the test).
        let on_worker = rt.block_on(async { tokio::spawn(async { wait_here(|| 1) }).await });
        assert_eq!(on_worker.unwrap(), 1);
        // In a LocalSet on the thread in block_on, where block_in_place
        // panics: a plain call.
        let local = rt.block_on(async {
            tokio::task::LocalSet::new()
                .run_until(async { wait_here(|| 2) })
                .await
        });
        assert_eq!(local, 2);
        // On the blocking pool.
        let pooled = rt.block_on(async { tokio::task::spawn_blocking(|| wait_here(|| 3)).await });
        assert_eq!(pooled.unwrap(), 3);
    }
}
