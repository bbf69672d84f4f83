//! The transmission phase of one NBD connection, run as one task.
//!
//! The task reads requests as they arrive (many per system call), starts each one in a
//! slot of its [`InFlight`] set, queues replies in completion order and writes them many
//! per `writev` ([`Replies`]). Nothing is spawned and nothing crosses a channel per
//! request: a request whose member answers at once (memory, null) is read, executed and
//! answered in one pass of the task, and one that waits wakes only this task.
//!
//! Limits, so one client cannot take what others need: at most [`MAX_IN_FLIGHT`]
//! requests between being read and their reply being written (the task stops reading
//! while it is reached), and at most 1/[`SHARE_DIVISOR`] of each pool class's buffers
//! (a READ or WRITE waits, and reading pauses, while its class's share is used up).
//! Requests are never abandoned: member futures run to completion (raidcore `IoBuf`),
//! so after a write error or a forced close the ones still running move to a task of
//! their own that polls them to the end, dropping their replies.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use backends::nbd::wire::{self, Request};
use raidcore::{ArrayRef, Flags, FrontBuf, FrontIo, IoError, IoResult, Op};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::runtime::Handle;
use tokio::sync::watch;

use super::in_flight::InFlight;
use super::replies::{Body, Replies, Reply};
use super::{flagged, BoxRead, BoxWrite};

/// Requests between being read and their reply being written, per connection.
pub const MAX_IN_FLIGHT: usize = 256;
/// One connection holds at most 1/SHARE_DIVISOR of each pool class's buffers, so a client
/// that stops reading its replies (they keep their buffers until written) cannot starve
/// the other clients on its own.
pub const SHARE_DIVISOR: usize = 4;
/// A refused WRITE's payload up to this size is read and discarded so the connection stays
/// in step; beyond it the client is disconnected.
const MAX_WRITE_SKIP: u32 = 64 << 20;
const INPUT_BUF: usize = 64 << 10;
/// A WRITE payload with at least this much still to come is read straight into its pool
/// buffer; smaller remainders go through the input buffer with the requests behind them.
const DIRECT_PAYLOAD: usize = 32 << 10;
/// Passes of the task loop before it yields to the runtime's other tasks.
const ROUNDS: usize = 64;
/// Requests at least this large run as tasks of their own: their data copies (a memory
/// member's memcpy, a large RMW) then proceed on another core while this task moves
/// other replies, and the cost of a spawn is small beside the copy.
const SPAWN_LEN: u32 = 128 << 10;

/// What the connection runs with, fixed at the end of negotiation.
pub struct Session {
    pub array: ArrayRef,
    pub peer: String,
    pub structured: bool,
    pub base_alloc: bool,
}

/// What a request holds until its reply leaves the queue: its in-flight place always,
/// and, for READ and WRITE, its share of the pool class (the class index).
type Token = Option<usize>;

/// A finished request.
struct Finished {
    handle: u64,
    body: Body,
    token: Token,
}

/// Serve requests until DISC, EOF, a protocol violation, a dead socket or shutdown
/// (`stop`: finish what is in flight and write its replies; `force`: drop the replies).
/// `pending` holds bytes already read past the negotiation.
pub async fn run(
    s: Session,
    r: BoxRead,
    w: BoxWrite,
    pending: &[u8],
    mut stop: watch::Receiver<bool>,
    mut force: watch::Receiver<bool>,
    big: Handle,
) -> io::Result<()> {
    let mut conn = Conn::new(s, r, w, pending, move |a, q, b, t| start(&big, a, q, b, t));
    let mut stop = std::pin::pin!(flagged(&mut stop));
    let mut force = std::pin::pin!(flagged(&mut force));
    std::future::poll_fn(|cx| {
        if conn.reading && stop.as_mut().poll(cx).is_ready() {
            conn.stop_reading();
        }
        if conn.writing && force.as_mut().poll(cx).is_ready() {
            conn.stop_writing();
        }
        conn.poll(cx)
    })
    .await;
    if conn.writing {
        let _ = conn.w.shutdown().await;
    } else if !conn.in_flight.is_empty() {
        // The socket is done for; the requests still running finish on their own, and
        // the connection (its socket, its place in the server's count) ends now.
        let mut rest = std::mem::replace(&mut conn.in_flight, InFlight::new(0));
        tokio::spawn(std::future::poll_fn(move |cx| {
            rest.poll(cx, drop);
            if rest.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
    }
    match conn.error {
        Some(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e),
        _ => Ok(()),
    }
}

/// The request stream's position between requests.
enum Incoming {
    /// Between requests.
    Header,
    /// A READ or WRITE waiting for this connection's share of its pool class.
    Share(Request, usize),
    /// A WRITE waiting for a pool buffer (the pool is exhausted).
    Buffer(Request, Token, BufferWait),
    /// A WRITE's payload arriving into its buffer.
    Payload {
        q: Request,
        token: Token,
        buf: FrontBuf,
        filled: usize,
    },
    /// A refused WRITE's payload being read and dropped, then its refusal sent.
    Skip {
        q: Request,
        token: Token,
        refusal: Refusal,
        left: u64,
    },
}

type BufferWait = Pin<Box<dyn Future<Output = IoResult<FrontBuf>> + Send>>;

/// Bytes read from the socket and not yet parsed.
struct Input {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Input {
    fn new(pending: &[u8]) -> Self {
        let mut buf = vec![0u8; INPUT_BUF.max(pending.len())].into_boxed_slice();
        buf[..pending.len()].copy_from_slice(pending);
        Input {
            buf,
            start: 0,
            end: pending.len(),
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Read more from the socket. Ready(Ok(0)) is end of stream.
    fn poll_fill(&mut self, r: &mut BoxRead, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.len() - self.end < wire::REQUEST_LEN + 4096 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        match Pin::new(r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Requests counted against the connection's limits.
struct Held {
    outstanding: usize,
    /// Per pool class: (buffers held, the most this connection may hold).
    shares: Vec<(usize, usize)>,
}

impl Held {
    fn release(&mut self, t: Token) {
        self.outstanding -= 1;
        if let Some(c) = t {
            self.shares[c].0 -= 1;
        }
    }
}

/// How a connection starts a request (in `run`, a closure over [`start`] and the handle
/// large requests go to). A generic rather than a fn pointer: the call is then direct and
/// inlined, so the request's future is built straight into its in-flight slot instead of
/// on the stack and copied there.
trait Start<F>: Fn(ArrayRef, Request, Option<FrontBuf>, Token) -> F {}
impl<F, S: Fn(ArrayRef, Request, Option<FrontBuf>, Token) -> F> Start<F> for S {}

struct Conn<F, S> {
    array: ArrayRef,
    peer: String,
    structured: bool,
    base_alloc: bool,
    size: u64,
    max_len: u64,
    r: BoxRead,
    w: BoxWrite,
    input: Input,
    incoming: Incoming,
    in_flight: InFlight<F>,
    start: S,
    replies: Replies<Token>,
    held: Held,
    /// Still taking requests.
    reading: bool,
    /// Still writing replies (false once the socket failed or shutdown forced it).
    writing: bool,
    /// What ended reading, when it was an error.
    error: Option<io::Error>,
}

impl<F: Future<Output = Finished>, S: Start<F>> Conn<F, S> {
    fn new(s: Session, r: BoxRead, w: BoxWrite, pending: &[u8], start: S) -> Self {
        let shares = s
            .array
            .pool()
            .usage()
            .iter()
            .map(|&(_, _, total)| (0, (total / SHARE_DIVISOR).max(1)))
            .collect();
        Conn {
            size: s.array.size(),
            max_len: super::block_sizes(&s.array).2 as u64,
            array: s.array,
            peer: s.peer,
            structured: s.structured,
            base_alloc: s.base_alloc,
            r,
            w,
            input: Input::new(pending),
            incoming: Incoming::Header,
            in_flight: InFlight::new(MAX_IN_FLIGHT),
            start,
            replies: Replies::new(MAX_IN_FLIGHT),
            held: Held {
                outstanding: 0,
                shares,
            },
            reading: true,
            writing: true,
            error: None,
        }
    }

    /// Run until nothing can move, or until the connection is done (Ready).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..ROUNDS {
            let mut progress = self.poll_completions(cx);
            progress |= self.poll_output(cx);
            progress |= self.poll_input(cx);
            if self.finished() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let the runtime's other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Done reading, and every reply written, or no more replies to write (requests
    /// still in flight then finish without the connection, see `run`).
    fn finished(&self) -> bool {
        !self.reading && (!self.writing || (self.in_flight.is_empty() && self.replies.is_empty()))
    }

    fn poll_completions(&mut self, cx: &mut Context<'_>) -> bool {
        let (replies, held) = (&mut self.replies, &mut self.held);
        let (writing, structured) = (self.writing, self.structured);
        // Requests started in this pass reach their members' queues; the plug then
        // submits each member's share in one go.
        let _plug = raidcore::plug::Plug::new();
        // Completions already posted by io_uring members are answered in this pass.
        raidcore::plug::collect();
        let n = self.in_flight.poll(cx, |f| {
            if writing {
                replies.push(Reply::encode(f.handle, f.body, structured, f.token));
            } else {
                held.release(f.token);
            }
        });
        n > 0
    }

    fn poll_output(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while self.writing && !self.replies.is_empty() {
            let held = &mut self.held;
            match self
                .replies
                .poll_write(Pin::new(&mut self.w), cx, |t| held.release(t))
            {
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "NBD reply write failed; dropping further replies");
                    self.stop_writing();
                    return true;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    /// The peer is gone (or shutdown forced it): drop queued and future replies, take no
    /// more requests. Requests in flight still run to completion.
    fn stop_writing(&mut self) {
        self.writing = false;
        let held = &mut self.held;
        self.replies.discard(|t| held.release(t));
        self.stop_reading();
    }

    /// Take no more requests; a request half read is dropped unanswered (nothing of it
    /// was executed).
    fn stop_reading(&mut self) {
        self.reading = false;
        let token = match std::mem::replace(&mut self.incoming, Incoming::Header) {
            Incoming::Header => return,
            Incoming::Share(..) => None,
            Incoming::Buffer(_, t, _)
            | Incoming::Payload { token: t, .. }
            | Incoming::Skip { token: t, .. } => t,
        };
        self.held.release(token);
    }

    fn end_of_stream(&mut self, r: io::Result<usize>) {
        if let Err(e) = r {
            self.error = Some(e);
        }
        self.stop_reading();
    }

    /// Parse and start requests until the socket has nothing more or a limit is reached.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while self.reading {
            let step = match std::mem::replace(&mut self.incoming, Incoming::Header) {
                Incoming::Header => self.step_header(cx),
                Incoming::Share(q, class) => self.step_share(q, class),
                Incoming::Buffer(q, token, wait) => self.step_buffer(cx, q, token, wait),
                Incoming::Payload {
                    q,
                    token,
                    buf,
                    filled,
                } => self.step_payload(cx, q, token, buf, filled),
                Incoming::Skip {
                    q,
                    token,
                    refusal,
                    left,
                } => self.step_skip(cx, q, token, refusal, left),
            };
            match step {
                Step::Moved => progress = true,
                Step::Blocked => return progress,
            }
        }
        progress
    }

    fn step_header(&mut self, cx: &mut Context<'_>) -> Step {
        // Full: a reply must be written before another request is taken.
        if self.held.outstanding >= MAX_IN_FLIGHT {
            return Step::Blocked;
        }
        if self.input.avail().len() < wire::REQUEST_LEN {
            return self.fill(cx);
        }
        let hb: &[u8; wire::REQUEST_LEN] = self.input.avail()[..wire::REQUEST_LEN]
            .try_into()
            .expect("length checked");
        let decoded = Request::decode(hb);
        self.input.consume(wire::REQUEST_LEN);
        let Ok(q) = decoded else {
            tracing::warn!(peer = %self.peer, "NBD request with bad magic; disconnecting");
            self.stop_reading();
            return Step::Moved;
        };
        if q.typ == wire::CMD_DISC {
            self.stop_reading();
            return Step::Moved;
        }
        self.held.outstanding += 1;
        self.begin(q);
        Step::Moved
    }

    /// Read more input; the state stays as it was (Header).
    fn fill(&mut self, cx: &mut Context<'_>) -> Step {
        let r = self.input.poll_fill(&mut self.r, cx);
        self.after_read(r, false)
    }

    /// What a read from the socket means for the stream: end of stream ends reading (an
    /// error when it cuts a request short), an error ends it with that error.
    fn after_read(&mut self, r: Poll<io::Result<usize>>, mid_request: bool) -> Step {
        match r {
            Poll::Ready(Ok(0)) if mid_request => {
                self.end_of_stream(Err(io::ErrorKind::UnexpectedEof.into()));
                Step::Moved
            }
            Poll::Ready(Ok(0)) => {
                self.end_of_stream(Ok(0));
                Step::Moved
            }
            Poll::Ready(Ok(_)) => Step::Moved,
            Poll::Ready(Err(e)) => {
                self.end_of_stream(Err(e));
                Step::Moved
            }
            Poll::Pending => Step::Blocked,
        }
    }

    /// A new request, counted in `outstanding`: refuse it, answer it, or start it.
    fn begin(&mut self, q: Request) {
        let checked = self.validate(&q);
        if matches!(q.typ, wire::CMD_READ | wire::CMD_WRITE) {
            match checked {
                Ok(()) => {
                    let span = self.array.buffer_len(q.offset, q.len as u64);
                    match self.array.pool().class_index(span) {
                        Some(class) => self.incoming = Incoming::Share(q, class),
                        // No class holds it: buffer() refuses it with a clear error.
                        None => self.after_share(q, None),
                    }
                }
                Err(refusal) if q.typ == wire::CMD_WRITE => self.skip_write(q, None, refusal),
                Err(refusal) => self.refuse(&q, refusal, None),
            }
            return;
        }
        match checked {
            Err(refusal) => self.refuse(&q, refusal, None),
            // CACHE is advisory; the range was checked, there is nothing to warm.
            Ok(()) if q.typ == wire::CMD_CACHE => self.reply(q.handle, Body::Ok, None),
            Ok(()) if q.typ == wire::CMD_BLOCK_STATUS => {
                let body = Body::Extent {
                    len: q.len,
                    flags: 0,
                };
                self.reply(q.handle, body, None)
            }
            Ok(()) => self.launch(q, None, None),
        }
    }

    fn step_share(&mut self, q: Request, class: usize) -> Step {
        let (held, limit) = self.held.shares[class];
        if held >= limit {
            self.incoming = Incoming::Share(q, class);
            return Step::Blocked;
        }
        self.held.shares[class].0 += 1;
        self.after_share(q, Some(class));
        Step::Moved
    }

    /// A READ starts now (it takes its buffer inside); a WRITE needs its buffer first.
    fn after_share(&mut self, q: Request, token: Token) {
        if q.typ == wire::CMD_READ {
            return self.launch(q, None, token);
        }
        match self.array.try_buffer(q.offset, q.len as u64) {
            Some(Ok(buf)) => {
                self.incoming = Incoming::Payload {
                    q,
                    token,
                    buf,
                    filled: 0,
                }
            }
            Some(Err(e)) => self.skip_write(q, token, Refusal::from_io(&e)),
            None => {
                let a = self.array.clone();
                let (offset, len) = (q.offset, q.len as u64);
                let wait: BufferWait = Box::pin(async move { a.buffer(offset, len).await });
                self.incoming = Incoming::Buffer(q, token, wait);
            }
        }
    }

    fn step_buffer(
        &mut self,
        cx: &mut Context<'_>,
        q: Request,
        token: Token,
        mut wait: BufferWait,
    ) -> Step {
        match wait.as_mut().poll(cx) {
            Poll::Ready(Ok(buf)) => {
                self.incoming = Incoming::Payload {
                    q,
                    token,
                    buf,
                    filled: 0,
                };
                Step::Moved
            }
            Poll::Ready(Err(e)) => {
                self.skip_write(q, token, Refusal::from_io(&e));
                Step::Moved
            }
            Poll::Pending => {
                self.incoming = Incoming::Buffer(q, token, wait);
                Step::Blocked
            }
        }
    }

    fn step_payload(
        &mut self,
        cx: &mut Context<'_>,
        q: Request,
        token: Token,
        mut buf: FrontBuf,
        mut filled: usize,
    ) -> Step {
        let want = buf.data().len();
        let have = self.input.avail();
        let n = have.len().min(want - filled);
        buf.data_mut()[filled..filled + n].copy_from_slice(&have[..n]);
        self.input.consume(n);
        filled += n;
        if filled == want {
            // A client vanishing before this leaves nothing acknowledged: the buffer
            // is dropped with the connection (a buffer lent by a memory member keeps
            // what arrived, as a disk keeps part of a write cut short).
            self.launch(q, Some(buf), token);
            return Step::Moved;
        }
        let direct = want - filled >= DIRECT_PAYLOAD;
        let read = if direct {
            let mut rb = ReadBuf::new(&mut buf.data_mut()[filled..]);
            match Pin::new(&mut self.r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        } else {
            self.input.poll_fill(&mut self.r, cx)
        };
        if let Poll::Ready(Ok(got)) = read {
            if direct {
                filled += got;
            }
        }
        self.incoming = Incoming::Payload {
            q,
            token,
            buf,
            filled,
        };
        self.after_read(read, true)
    }

    /// Refuse a WRITE after reading past its payload, or disconnect if it is too long.
    fn skip_write(&mut self, q: Request, token: Token, refusal: Refusal) {
        if q.len > MAX_WRITE_SKIP {
            tracing::warn!(peer = %self.peer, len = q.len, "NBD write refused and too long to skip; disconnecting");
            self.held.release(token);
            self.stop_reading();
            return;
        }
        let left = q.len as u64;
        self.incoming = Incoming::Skip {
            q,
            token,
            refusal,
            left,
        };
    }

    fn step_skip(
        &mut self,
        cx: &mut Context<'_>,
        q: Request,
        token: Token,
        refusal: Refusal,
        mut left: u64,
    ) -> Step {
        let n = (self.input.avail().len() as u64).min(left);
        self.input.consume(n as usize);
        left -= n;
        if left == 0 {
            self.refuse(&q, refusal, token);
            return Step::Moved;
        }
        let filled = self.input.poll_fill(&mut self.r, cx);
        self.incoming = Incoming::Skip {
            q,
            token,
            refusal,
            left,
        };
        self.after_read(filled, true)
    }

    fn launch(&mut self, q: Request, buf: Option<FrontBuf>, token: Token) {
        let (start, array) = (&self.start, self.array.clone());
        self.in_flight.push_with(|| start(array, q, buf, token));
    }

    fn refuse(&mut self, q: &Request, e: Refusal, token: Token) {
        tracing::debug!(peer = %self.peer, cmd = q.typ, offset = q.offset, len = q.len, error = e.error, msg = %e.msg, "NBD request refused");
        self.reply(q.handle, e.into_body(), token);
    }

    fn reply(&mut self, handle: u64, body: Body, token: Token) {
        if self.writing {
            let r = Reply::encode(handle, body, self.structured, token);
            self.replies.push(r);
        } else {
            self.held.release(token);
        }
    }

    /// Check a request against the spec's rules before anything runs.
    fn validate(&self, q: &Request) -> Result<(), Refusal> {
        use wire::*;
        let allowed = match q.typ {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            t => return Err(Refusal::einval(format!("unknown command {t}"))),
        };
        if q.flags & !allowed != 0 {
            let msg = format!("flags {:#x} are not valid for command {}", q.flags, q.typ);
            return Err(Refusal::einval(msg));
        }
        if q.typ == CMD_FLUSH {
            return Ok(());
        }
        let len = q.len as u64;
        if matches!(q.typ, CMD_READ | CMD_WRITE | CMD_CACHE) && len > self.max_len {
            let msg = format!(
                "length {len} exceeds the maximum block size {}",
                self.max_len
            );
            return Err(Refusal::einval(msg));
        }
        let past_end = match q.offset.checked_add(len) {
            Some(end) => end > self.size,
            None => true,
        };
        if past_end {
            // The spec: ENOSPC for writes past the end, EINVAL for everything else.
            let error = match q.typ {
                CMD_WRITE | CMD_WRITE_ZEROES => NBD_ENOSPC,
                _ => NBD_EINVAL,
            };
            let msg = format!(
                "range {}+{len} is past the end of the export ({} bytes)",
                q.offset, self.size
            );
            return Err(Refusal { error, msg });
        }
        if q.typ == CMD_BLOCK_STATUS {
            if !self.base_alloc {
                let msg = "BLOCK_STATUS needs structured replies and base:allocation selected";
                return Err(Refusal::einval(msg.into()));
            }
            if len == 0 {
                return Err(Refusal::einval("BLOCK_STATUS of length 0".into()));
            }
        }
        Ok(())
    }
}

enum Step {
    /// Something happened: look again.
    Moved,
    /// Waiting for the socket, a reply to be written, or a buffer.
    Blocked,
}

// ---- Executing one request ----------------------------------------------------------

/// Run one validated request: large ones in a task of their own on `big` (the daemon's
/// runtime, so that their copies run beside the connection's thread; see [`SPAWN_LEN`]),
/// the rest right here in the connection's task.
fn start(
    big: &Handle,
    array: ArrayRef,
    q: Request,
    buf: Option<FrontBuf>,
    token: Token,
) -> impl Future<Output = Finished> {
    // Cloned only for large requests: a handle is a reference count shared by every
    // connection thread.
    let big = (q.len >= SPAWN_LEN).then(|| big.clone());
    async move {
        let Some(big) = big else {
            return execute(array, q, buf, token).await;
        };
        let handle = q.handle;
        match big.spawn(execute(array, q, buf, token)).await {
            Ok(f) => f,
            // A panic in the request's task: an error for this request only.
            Err(e) => Finished {
                handle,
                body: Refusal {
                    error: wire::NBD_EIO,
                    msg: format!("request failed: {e}"),
                }
                .into_body(),
                token,
            },
        }
    }
}

/// Run one validated request to completion.
async fn execute(array: ArrayRef, q: Request, buf: Option<FrontBuf>, token: Token) -> Finished {
    let body = match q.typ {
        wire::CMD_READ => read(&array, &q).await,
        wire::CMD_WRITE => match buf {
            Some(mut b) => status(submit(&array, &q, Op::Write, Some(&mut b)).await),
            None => Refusal::einval("write without payload".into()).into_body(),
        },
        wire::CMD_FLUSH => status(submit(&array, &q, Op::Flush, None).await),
        wire::CMD_TRIM => status(trim(&array, &q).await),
        wire::CMD_WRITE_ZEROES => status(submit(&array, &q, Op::WriteZeroes, None).await),
        t => Refusal::einval(format!("unknown command {t}")).into_body(),
    };
    Finished {
        handle: q.handle,
        body,
        token,
    }
}

async fn submit(
    array: &ArrayRef,
    q: &Request,
    op: Op,
    buf: Option<&mut FrontBuf>,
) -> Result<(), IoError> {
    let (offset, len) = if op == Op::Flush {
        (0, 0)
    } else {
        (q.offset, q.len as u64)
    };
    let flags = Flags {
        fua: q.flags & wire::CMD_FLAG_FUA != 0,
        no_hole: q.flags & wire::CMD_FLAG_NO_HOLE != 0,
        fast_zero: q.flags & wire::CMD_FLAG_FAST_ZERO != 0,
    };
    let io = FrontIo {
        op,
        offset,
        len,
        flags,
    };
    array.submit(io, buf).await
}

async fn read(array: &ArrayRef, q: &Request) -> Body {
    let mut buf = match array.buffer(q.offset, q.len as u64).await {
        Ok(b) => b,
        Err(e) => return Refusal::from_io(&e).into_body(),
    };
    match submit(array, q, Op::Read, Some(&mut buf)).await {
        Ok(()) if q.len == 0 => Body::Done,
        Ok(()) => Body::Data {
            offset: q.offset,
            buf,
        },
        Err(e) => Refusal::from_io(&e).into_body(),
    }
}

/// The array treats trim as advisory and ignores FUA on it; a client asking for FUA gets a
/// flush so whatever was discarded is durable before the reply.
async fn trim(array: &ArrayRef, q: &Request) -> Result<(), IoError> {
    submit(array, q, Op::Trim, None).await?;
    if q.flags & wire::CMD_FLAG_FUA != 0 {
        submit(array, q, Op::Flush, None).await?;
    }
    Ok(())
}

/// A request answered with an error.
struct Refusal {
    error: u32,
    msg: String,
}

impl Refusal {
    fn einval(msg: String) -> Self {
        Refusal {
            error: wire::NBD_EINVAL,
            msg,
        }
    }

    fn from_io(e: &IoError) -> Self {
        Refusal {
            error: wire::errno_to_nbd(e.errno()),
            msg: e.to_string(),
        }
    }

    fn into_body(self) -> Body {
        Body::Err {
            error: self.error,
            msg: self.msg,
        }
    }
}

fn status(r: Result<(), IoError>) -> Body {
    match r {
        Ok(()) => Body::Ok,
        Err(e) => Refusal::from_io(&e).into_body(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F>(_: fn(&Handle, ArrayRef, Request, Option<FrontBuf>, Token) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each request's future is moved into its in-flight slot, all of its bytes copied
    /// per request: at 19.9 KB (joins inlined four deep) that copy was 12% of the daemon's
    /// CPU. Box rare paths in raidcore (see raidcore/src/join.rs) rather than raise this.
    #[test]
    fn a_request_future_stays_small() {
        let size = future_size(start);
        assert!(size <= 4096, "request future is {size} bytes");
    }
}
