//! The coordinator's network thread: one single-threaded runtime on which
//! the QUIC endpoint and every connection's driver run, together with the
//! ingress listeners, their connections and the HTTP connections to
//! sandboxes over runner streams.
//!
//! A proxied request passes the client connection's task, the task of its
//! connection to the sandbox, the runner connection's QUIC driver and the
//! endpoint's receive driver, and back the same way. On the multi-threaded
//! runtime each of these hand-offs could wake another worker (a futex wake
//! and a context switch each; measured: a third of the ingress's CPU went
//! to switching and waking). On one thread they are queue pushes. The
//! price is that the ingress and QUIC together use one core: nothing
//! blocking may run here (route OIDC's gate, which reads the store, runs
//! on the multi-threaded runtime, see [`crate::ingress`]); RPC sessions keep
//! their pinned workers and signatures the blocking pool.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long the thread's remaining tasks (drivers of closed connections)
/// get to end once the coordinator is done with it.
const WIND_DOWN: Duration = Duration::from_millis(200);

/// The running network thread; stopped when dropped.
pub struct NetThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NetThread {
    /// Starts the thread (`miren-net`) and its runtime.
    pub fn start() -> io::Result<NetThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("miren-net".into())
            .spawn(move || {
                rt.block_on(async {
                    // Either a stop or the coordinator dropped the sender.
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(WIND_DOWN);
            })?;
        Ok(NetThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where to spawn what runs on the network thread.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Joined only from outside a runtime (a coordinator dropped by a
        // test's plain thread); from inside one the thread ends by itself.
        if Handle::try_current().is_err() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_named_thread_and_drop_stops_it() {
        let net = NetThread::start().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        net.handle().spawn(async move {
            let name = std::thread::current().name().map(str::to_string);
            let _ = tx.send(name);
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(name.as_deref(), Some("miren-net"));
        let handle = net.handle().clone();
        drop(net);
        // The runtime is gone: a task spawned now never runs.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(handle.spawn(async move {
            let _ = tx.send(());
        }));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }
}
