//! Replies waiting for the socket, written many at a time with vectored writes.
//!
//! A reply is its header bytes plus, for a READ, the request's pool buffer: the data goes
//! from that buffer to the socket with no copy in between. Each write takes as many
//! queued replies as fit in one `writev`, so a batch of completions costs one system call
//! and one socket lock instead of one per reply.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use backends::nbd::wire::{self, ChunkHeader, SimpleReply};
use raidcore::FrontBuf;
use tokio::io::AsyncWrite;

/// Slices per `writev`: two per reply (header, data).
const MAX_IOV: usize = 128;
/// The id `base:allocation` gets from NBD_OPT_SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What a finished request sends back.
pub enum Body {
    /// Success without data: a simple reply (allowed for everything but READ).
    Ok,
    /// Success of a zero-length READ: a NONE chunk when structured.
    Done,
    /// READ data, in the request's pool buffer.
    Data {
        offset: u64,
        buf: FrontBuf,
    },
    Err {
        error: u32,
        msg: String,
    },
    /// One `base:allocation` extent.
    Extent {
        len: u32,
        flags: u32,
    },
}

/// What a reply carries after its header.
enum Tail {
    None,
    Buf(FrontBuf),
    Bytes(Vec<u8>),
}

/// One encoded reply. `token` is the caller's, handed back when the reply leaves the
/// queue (written or dropped), to release what the request held.
pub struct Reply<T> {
    head: [u8; 32],
    head_len: u8,
    tail: Tail,
    pub token: T,
}

impl<T> Reply<T> {
    pub fn encode(handle: u64, body: Body, structured: bool, token: T) -> Self {
        let mut r = Reply {
            head: [0; 32],
            head_len: 0,
            tail: Tail::None,
            token,
        };
        let chunk = |typ, len| {
            ChunkHeader {
                flags: wire::REPLY_FLAG_DONE,
                typ,
                handle,
                len,
            }
            .encode()
        };
        match body {
            Body::Ok => r.put(&SimpleReply { error: 0, handle }.encode()),
            Body::Done if structured => r.put(&chunk(wire::REPLY_TYPE_NONE, 0)),
            Body::Done => r.put(&SimpleReply { error: 0, handle }.encode()),
            Body::Data { offset, buf } => {
                if structured {
                    // One chunk flagged DONE: all data is in hand, so no later error is
                    // possible, and it satisfies DF.
                    let len = 8 + buf.data().len() as u32;
                    r.put(&chunk(wire::REPLY_TYPE_OFFSET_DATA, len));
                    r.put(&offset.to_be_bytes());
                } else {
                    r.put(&SimpleReply { error: 0, handle }.encode());
                }
                r.tail = Tail::Buf(buf);
            }
            Body::Err { error, msg } if structured => {
                let p = wire::encode_error_payload(error, &msg);
                r.put(&chunk(wire::REPLY_TYPE_ERROR, p.len() as u32));
                r.tail = Tail::Bytes(p);
            }
            Body::Err { error, .. } => r.put(&SimpleReply { error, handle }.encode()),
            Body::Extent { len, flags } => {
                let p = wire::encode_block_status_payload(BASE_ALLOCATION_ID, &[(len, flags)]);
                r.put(&chunk(wire::REPLY_TYPE_BLOCK_STATUS, p.len() as u32));
                r.tail = Tail::Bytes(p);
            }
        }
        r
    }

    fn put(&mut self, b: &[u8]) {
        let at = self.head_len as usize;
        self.head[at..at + b.len()].copy_from_slice(b);
        self.head_len += b.len() as u8;
    }

    fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }

    fn tail(&self) -> &[u8] {
        match &self.tail {
            Tail::None => &[],
            Tail::Buf(b) => b.data(),
            Tail::Bytes(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.head().len() + self.tail().len()
    }
}

/// Replies in the order they finished, and how much of the first is already written.
pub struct Replies<T> {
    queue: VecDeque<Reply<T>>,
    sent: usize,
}

impl<T> Replies<T> {
    pub fn new(capacity: usize) -> Self {
        Replies {
            queue: VecDeque::with_capacity(capacity),
            sent: 0,
        }
    }

    pub fn push(&mut self, r: Reply<T>) {
        self.queue.push_back(r);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Drop every queued reply (the peer is gone), handing back their tokens.
    pub fn discard(&mut self, mut release: impl FnMut(T)) {
        self.sent = 0;
        for r in self.queue.drain(..) {
            release(r.token);
        }
    }

    /// One vectored write of as many queued replies as fit. Ready(Ok(n)): n bytes went
    /// out and every reply now fully written was handed to `release`.
    pub fn poll_write<W: AsyncWrite + ?Sized>(
        &mut self,
        w: Pin<&mut W>,
        cx: &mut Context<'_>,
        mut release: impl FnMut(T),
    ) -> Poll<io::Result<usize>> {
        let n = {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut used = 0;
            let mut skip = self.sent;
            'fill: for r in &self.queue {
                for part in [r.head(), r.tail()] {
                    if used == MAX_IOV {
                        break 'fill;
                    }
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    iov[used] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    used += 1;
                }
            }
            if used == 0 {
                return Poll::Ready(Ok(0));
            }
            match w.poll_write_vectored(cx, &iov[..used]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                other => return other,
            }
        };
        let mut left = self.sent + n;
        while let Some(front) = self.queue.front() {
            let len = front.len();
            if left < len {
                break;
            }
            left -= len;
            let done = self.queue.pop_front().expect("front exists");
            release(done.token);
        }
        self.sent = left;
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call, recording everything.
    struct Trickle {
        got: Vec<u8>,
        limit: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn partial_writes_resume_where_they_stopped_and_release_in_order() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut q = Replies::new(8);
        let mut expect = Vec::new();
        for h in 0..5u64 {
            let body = Body::Err {
                error: wire::NBD_EIO,
                msg: format!("reply {h}"),
            };
            let r = Reply::encode(h, body, true, h);
            expect.extend_from_slice(r.head());
            expect.extend_from_slice(r.tail());
            q.push(r);
        }
        let mut w = Trickle {
            got: Vec::new(),
            limit: 7,
        };
        let mut released = Vec::new();
        for _ in 0..1000 {
            if q.is_empty() {
                break;
            }
            match q.poll_write(Pin::new(&mut w), &mut cx, |t| released.push(t)) {
                Poll::Ready(Ok(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(q.is_empty());
        assert_eq!(w.got, expect, "bytes on the wire in order, none twice");
        assert_eq!(released, [0, 1, 2, 3, 4]);
    }
}
