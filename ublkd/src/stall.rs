//! A writer that gives up on a peer that stops reading.
//!
//! Replies hold pool buffers until they are on the wire. A client that keeps a connection
//! open but never reads would hold its buffers for ever, and other clients would wait for
//! them; TCP keepalive does not help, the peer is alive. [`StallWriter`] fails a write
//! with `TimedOut` once the socket has accepted no byte for the stall limit, so the
//! connection's replies are dropped and their buffers return to the pool. A slow reader
//! that makes any progress is never cut off.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::Sleep;

pub struct StallWriter<W> {
    inner: W,
    limit: Duration,
    /// One timer per connection, re-armed (not re-allocated) each time the inner writer
    /// blocks.
    deadline: Pin<Box<Sleep>>,
    /// Whether the inner writer is blocked now; cleared by any progress.
    armed: bool,
}

impl<W> StallWriter<W> {
    pub fn new(inner: W, limit: Duration) -> Self {
        StallWriter {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    /// The inner writer's answer, with the stall timer kept in step with it.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let limit = self.limit;
        if !self.armed {
            self.armed = true;
            self.deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + limit);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_peer_that_never_reads_times_out_and_a_slow_one_does_not() {
        // A 4 KiB pipe that nobody reads: the second write blocks and must time out.
        let (a, _b) = tokio::io::duplex(4096);
        let mut w = StallWriter::new(a, Duration::from_millis(200));
        let t0 = std::time::Instant::now();
        let e = w.write_all(&[0u8; 64 << 10]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(200));

        // A reader that drains 4 KiB every 50 ms: slower than the writer, never stalled
        // for 200 ms, so 64 KiB arrive whole.
        let (a, mut b) = tokio::io::duplex(4096);
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                match b.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let mut w = StallWriter::new(a, Duration::from_millis(200));
        w.write_all(&[7u8; 64 << 10]).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), 64 << 10);
        assert!(got.iter().all(|&x| x == 7));
    }
}
