//! A listener that holds at most a few connections, each for a bounded time.
//!
//! A sandbox reaches its token endpoint through a socket; every connection
//! it keeps open is a descriptor of the runner, shared by all sandboxes on
//! it. Without a bound, one sandbox holding a thousand connections would
//! leave the runner unable to accept ingress streams or open files for the
//! others. So each endpoint accepts at most [`MAX_CONNECTIONS`] at once (the
//! next waits in the kernel's backlog until one closes) and closes any
//! connection [`MAX_CONNECTION_LIFE`] after it was accepted: a token request
//! takes well under that (minting times out after 5 s), and a client's
//! keep-alive simply reconnects.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections one endpoint serves at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long one connection may stay open.
pub const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(30);

/// `inner`, accepting only while fewer than `max` of its connections are
/// open, each closed `life` after it was accepted.
pub struct Bounded<L> {
    inner: L,
    slots: Arc<Semaphore>,
    life: Duration,
}

impl<L> Bounded<L> {
    pub fn new(inner: L, max: usize, life: Duration) -> Self {
        Bounded {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            life,
        }
    }
}

/// One accepted connection, holding its slot until dropped.
pub struct BoundedIo<T> {
    io: T,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl<T> BoundedIo<T> {
    /// Past its life: every further read or write fails.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "token endpoint connection lived too long",
    )
}

use std::future::Future as _;

impl<T: AsyncRead + Unpin> AsyncRead for BoundedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BoundedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<L> axum::serve::Listener for Bounded<L>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
{
    type Io = BoundedIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquiring cannot fail; should
        // it, wait on the next accept rather than exceed the bound.
        let slot = loop {
            match self.slots.clone().acquire_owned().await {
                Ok(slot) => break slot,
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        let (io, addr) = self.inner.accept().await;
        (
            BoundedIo {
                io,
                deadline: Box::pin(tokio::time::sleep(self.life)),
                _slot: slot,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn holds_at_most_max_connections_and_frees_a_slot_on_close() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut bounded = Bounded::new(tcp, 2, Duration::from_secs(60));
        let _c: Vec<_> = futures_connect(addr, 3).await;
        let (a, _) = bounded.accept().await;
        let (_b, _) = bounded.accept().await;
        // The third waits for a slot.
        let third = tokio::time::timeout(Duration::from_millis(200), bounded.accept()).await;
        assert!(third.is_err(), "a third connection was accepted");
        drop(a);
        let third = tokio::time::timeout(Duration::from_secs(5), bounded.accept()).await;
        assert!(third.is_ok(), "the freed slot was not reused");
    }

    async fn futures_connect(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        v
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_past_its_life_fails() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut bounded = Bounded::new(tcp, 2, Duration::from_secs(30));
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut io, _) = bounded.accept().await;
        client.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        io.read_exact(&mut one).await.expect("read within its life");
        tokio::time::advance(Duration::from_secs(31)).await;
        let err = io.read(&mut one).await.expect_err("read past its life");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
