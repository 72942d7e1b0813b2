//! The threads workload tokens are signed on: one per core, taking
//! signatures one at a time from one queue in arrival order.
//!
//! Why not tokio's blocking pool: it starts a thread for every task that
//! finds none idle, so the signatures of two runner calls in flight ran on
//! up to eight threads over two cores, preempting each other; and a call's
//! tokens had to be split in fixed shares per task, which leaves a core idle
//! while the longer share finishes. Here every signature of every call is
//! one job in one queue and a core is idle only when the queue is empty;
//! the caller is woken once, when the last of its jobs is done.
//!
//! A job that panics is answered `None` (its thread goes on); jobs left in
//! the queue when the pool is dropped are never run and answered `None`.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The queue and the threads' wake-up.
#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// The pool was dropped: threads leave, jobs are not run.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Jobs run outside the lock and panics are caught: a poisoned lock
        // still holds a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One call's jobs: where their results go, and who is woken at the end.
struct Batch<R> {
    results: Mutex<Vec<Option<R>>>,
    left: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

/// A fixed set of signing threads; they leave when it is dropped.
pub struct SigningPool {
    shared: Arc<Shared>,
    threads: usize,
}

impl SigningPool {
    /// Starts `threads` threads (at least one) named `miren-sign`.
    pub fn start(threads: usize) -> std::io::Result<SigningPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared::default());
        for _ in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("miren-sign".into())
                .spawn(move || work(&shared))?;
        }
        Ok(SigningPool { shared, threads })
    }

    /// One thread per core.
    pub fn per_core() -> std::io::Result<SigningPool> {
        SigningPool::start(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Runs `job` on every item on the pool's threads; the results in
    /// `items`' order, `None` for one whose job panicked or never ran.
    pub async fn run_all<T, R, F>(&self, items: Vec<T>, job: F) -> Vec<Option<R>>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(T) -> R + Send + Sync + 'static,
    {
        let n = items.len();
        if n == 0 {
            return Vec::new();
        }
        let (tx, rx) = oneshot::channel();
        let batch = Arc::new(Batch {
            results: Mutex::new((0..n).map(|_| None).collect()),
            left: AtomicUsize::new(n),
            done: Mutex::new(Some(tx)),
        });
        let job = Arc::new(job);
        {
            let mut queue = self.shared.lock();
            for (i, item) in items.into_iter().enumerate() {
                let (batch, job) = (batch.clone(), job.clone());
                queue.jobs.push_back(Box::new(move || {
                    let result = catch_unwind(AssertUnwindSafe(|| job(item))).ok();
                    if let Some(slot) = batch
                        .results
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(i)
                    {
                        *slot = result;
                    }
                    if batch.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let tx = (batch.done.lock())
                            .unwrap_or_else(PoisonError::into_inner)
                            .take();
                        if let Some(tx) = tx {
                            let _ = tx.send(());
                        }
                    }
                }));
            }
        }
        if n >= self.threads {
            self.shared.ready.notify_all();
        } else {
            for _ in 0..n {
                self.shared.ready.notify_one();
            }
        }
        // An error: the pool was dropped with our jobs still queued; what
        // did run is in the results, the rest stays `None`.
        let _ = rx.await;
        let mut results = batch.results.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *results)
    }
}

impl Drop for SigningPool {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.closed = true;
        // Dropping the jobs drops their batches' senders: waiting callers
        // are answered.
        queue.jobs.clear();
        drop(queue);
        self.shared.ready.notify_all();
    }
}

/// One thread's loop: the next job, until the pool is dropped.
fn work(shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.lock();
            loop {
                if queue.closed {
                    return;
                }
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn results_come_back_in_order_from_every_thread() {
        let pool = SigningPool::start(3).expect("threads");
        let rt = runtime();
        let items: Vec<u64> = (0..100).collect();
        let out = rt.block_on(pool.run_all(items, |i| {
            // Uneven work, so jobs finish out of order.
            std::thread::sleep(std::time::Duration::from_micros((i % 7) * 50));
            (i * 2, std::thread::current().name().map(str::to_string))
        }));
        assert_eq!(out.len(), 100);
        for (i, r) in out.iter().enumerate() {
            let (v, name) = r.as_ref().expect("every job ran");
            assert_eq!(*v, i as u64 * 2);
            assert_eq!(name.as_deref(), Some("miren-sign"));
        }
        assert!(rt
            .block_on(pool.run_all(Vec::<u8>::new(), |_| 0))
            .is_empty());
    }

    #[test]
    fn a_panicking_job_is_answered_none_and_the_pool_goes_on() {
        let pool = SigningPool::start(1).expect("threads");
        let rt = runtime();
        let out = rt.block_on(pool.run_all(vec![1, 2, 3], |i| {
            if i == 2 {
                panic!("job 2 fails");
            }
            i
        }));
        assert_eq!(out, vec![Some(1), None, Some(3)]);
        // The one thread survived its job's panic.
        assert_eq!(rt.block_on(pool.run_all(vec![7], |i| i)), vec![Some(7)]);
    }

    #[test]
    fn calls_at_once_share_the_threads() {
        let pool = Arc::new(SigningPool::start(2).expect("threads"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let calls: Vec<_> = (0..8u64)
            .map(|c| {
                let pool = pool.clone();
                rt.spawn(async move {
                    let items: Vec<u64> = (0..10).map(|i| c * 100 + i).collect();
                    pool.run_all(items, |x| x + 1).await
                })
            })
            .collect();
        for (c, call) in calls.into_iter().enumerate() {
            let out = rt.block_on(call).expect("call");
            let want: Vec<Option<u64>> = (0..10).map(|i| Some(c as u64 * 100 + i + 1)).collect();
            assert_eq!(out, want);
        }
    }
}
