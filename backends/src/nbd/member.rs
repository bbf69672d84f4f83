//! `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`: an NBD export as an
//! array member.
//!
//! One member holds a fixed number of connection slots (several when the server
//! advertises CAN_MULTI_CONN, else one). Each slot has a supervisor task that connects,
//! runs the connection's reader until the connection dies, and reconnects with capped
//! exponential backoff. A request picks the least-loaded live connection; when its
//! connection dies under it, it is sent again on another (NBD reads and writes are
//! idempotent) for as long as its deadline allows. Past the deadline it fails:
//! [`IoError::Timeout`] when the server had it and did not answer, and
//! [`IoError::Disconnected`] when there was no connection to send it on. The core marks
//! the member faulty on either; this module only reports truthfully.
//!
//! Known limit: a server that loses its cache with the connection (a crash) loses writes
//! it acknowledged but never flushed, as with any crash; a flush re-sent on a new
//! connection of a server without multi-conn does not cover them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raidcore::{
    Caps, Class, IoBuf, IoError, IoFuture, IoResult, Member, MemberInfo, MemberIo, Op, Proto,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{self, Cmd, Conn, ConnectOptions, ExportInfo, NbdError, NbdUri, Outcome};
use super::wire;

/// Write-zeroes and trim carry no payload; they are split only to keep lengths in 32 bits
/// and each request's server-side work bounded.
const MAX_NO_DATA_REQUEST: u64 = 1 << 30;
/// The first reconnect waits this long; each failure doubles it up to the maximum.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// A connection with this many requests in flight takes no more joiners: deep queues
/// spread over the connections.
const JOIN_MAX: usize = 128;

/// Tunables of an NBD member.
#[derive(Debug, Clone, Copy)]
pub struct NbdOptions {
    /// How long one request may take, re-sends after reconnects included.
    pub timeout: Duration,
    /// Connections to open when the server allows several (CAN_MULTI_CONN).
    pub connections: usize,
    /// The longest wait between reconnect attempts.
    pub reconnect_backoff_max: Duration,
    /// Bounds one TCP connect, and separately one handshake.
    pub connect_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            timeout: Duration::from_secs(30),
            connections: 2,
            reconnect_backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl NbdOptions {
    fn connect(&self) -> ConnectOptions {
        ConnectOptions {
            connect_timeout: self.connect_timeout,
            user_timeout: self.timeout,
        }
    }
}

/// A snapshot of an NBD member's connections, for `uniblk status` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct NbdStatus {
    /// Connections up now.
    pub connected: usize,
    /// Connection slots (1 unless the server allows multi-conn).
    pub connections: usize,
    pub structured_replies: bool,
    pub multi_conn: bool,
    /// Successful reconnects since open.
    pub reconnects: u64,
    /// Requests sent on each slot since open (all its connections together).
    pub requests_per_connection: Vec<u64>,
    /// The largest request sent; bigger ones are split.
    pub max_request: u32,
    /// Why the last connection ended or the last connect failed.
    pub last_error: Option<String>,
}

/// One connection slot: the live connection, if any, and what it has carried.
#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Arc<Conn>>>,
    /// Requests sent by earlier connections of this slot.
    past_requests: AtomicU64,
}

impl Slot {
    fn get(&self) -> Option<Arc<Conn>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, c: Option<Arc<Conn>>) -> Option<Arc<Conn>> {
        std::mem::replace(&mut *self.conn.lock().unwrap_or_else(|e| e.into_inner()), c)
    }
}

/// What the member's tasks share.
struct Shared {
    uri: NbdUri,
    opts: NbdOptions,
    /// The member's geometry, fixed at open; reconnects must still fit it.
    size: u64,
    block_size: u32,
    slots: Vec<Slot>,
    /// Bumped whenever a connection comes or goes; requests waiting for one watch it.
    changed: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Round-robin start for picking among equally loaded connections.
    next: AtomicUsize,
}

/// An NBD export serving as an array member.
pub struct NbdMember {
    info: MemberInfo,
    shared: Arc<Shared>,
    /// From the first handshake.
    export: ExportInfo,
    max_request: u32,
    closed: AtomicBool,
}

impl NbdMember {
    /// Connect to the export `address` names (an `nbd://` or `nbd+unix://` URI) and start
    /// its connections. The address becomes `info().address`.
    pub async fn open(address: &str, opts: NbdOptions) -> Result<Self, NbdError> {
        let uri = NbdUri::parse(address)?;
        let (stream, export) = client::open_export(&uri, &opts.connect()).await?;
        let block_size = export.min_block.max(512);
        check_export(&uri, &export, block_size)?;
        let size = export.size / u64::from(block_size) * u64::from(block_size);
        let count = if export.has(wire::FLAG_CAN_MULTI_CONN) {
            opts.connections.max(1)
        } else {
            1
        };
        let max_request = max_request(&export, block_size);
        let shared = Arc::new(Shared {
            uri: uri.clone(),
            opts,
            size,
            block_size,
            slots: (0..count).map(|_| Slot::default()).collect(),
            changed: watch::channel(0).0,
            closed: watch::channel(false).0,
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
            next: AtomicUsize::new(0),
        });
        let first = Arc::new(Conn::new(stream, export, uri.as_str()));
        shared.install(0, first.clone());
        tokio::spawn(shared.clone().supervise(0, Some(first)));
        shared.open_extra_connections().await;
        tracing::info!(
            member = %uri, size, block_size, connections = count,
            structured = export.structured, max_request, "NBD member open"
        );
        Ok(NbdMember {
            info: member_info(address, size, block_size, &export),
            shared,
            export,
            max_request,
            closed: AtomicBool::new(false),
        })
    }

    pub fn uri(&self) -> &NbdUri {
        &self.shared.uri
    }

    /// Whether at least one connection is up.
    pub fn connected(&self) -> bool {
        self.shared.live().next().is_some()
    }

    /// Health check: a READ of one block at offset 0, which any server must answer.
    /// Returns the round-trip time (re-sends after a reconnect included).
    pub async fn probe(&self) -> Result<std::time::Duration, IoError> {
        let mut block = vec![0u8; self.shared.block_size as usize];
        let cmd = Cmd {
            typ: wire::CMD_READ,
            flags: 0,
            offset: 0,
            len: self.shared.block_size,
            buf: IoBuf::from_slice(&mut block),
        };
        let start = Instant::now();
        self.shared
            .run(cmd, start + self.shared.opts.timeout)
            .await?;
        Ok(start.elapsed())
    }

    pub fn status(&self) -> NbdStatus {
        let s = &self.shared;
        NbdStatus {
            connected: s.live().count(),
            connections: s.slots.len(),
            structured_replies: self.export.structured,
            multi_conn: self.export.has(wire::FLAG_CAN_MULTI_CONN),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            requests_per_connection: s.slots.iter().map(Slot::requests).collect(),
            max_request: self.max_request,
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    async fn perform(&self, io: MemberIo) -> IoResult {
        if self.closed.load(Ordering::Acquire) {
            return Err(IoError::Shutdown);
        }
        raidcore::check_request(&self.info, &io)?;
        let deadline = Instant::now() + self.shared.opts.timeout;
        let t = io.tag;
        let caps = self.info.caps;
        let (typ, step) = match t.op {
            Op::Read => (wire::CMD_READ, u64::from(self.max_request)),
            Op::Write => (wire::CMD_WRITE, u64::from(self.max_request)),
            // The core skips flush and trim a member lacks; a direct caller gets the same.
            Op::Flush if !caps.flush => return Ok(()),
            Op::Flush => return self.shared.run(flush_cmd(), deadline).await,
            Op::Trim if !caps.discard => return Ok(()),
            Op::Trim => (wire::CMD_TRIM, self.no_data_step()),
            Op::WriteZeroes if !caps.write_zeroes => {
                return Err(IoError::NotSupported(format!(
                    "{}: the server does not offer WRITE_ZEROES",
                    self.info.address
                )))
            }
            Op::WriteZeroes => (wire::CMD_WRITE_ZEROES, self.no_data_step()),
        };
        let flags = if t.fua && caps.fua && t.op != Op::Read {
            wire::CMD_FLAG_FUA
        } else {
            0
        };
        self.split(typ, flags, t.offset, t.len, io.buf, step, deadline)
            .await
    }

    fn no_data_step(&self) -> u64 {
        let bs = u64::from(self.shared.block_size);
        MAX_NO_DATA_REQUEST / bs * bs
    }

    /// Send `[offset, offset+len)` as requests of at most `step` bytes, concurrently.
    #[allow(clippy::too_many_arguments)]
    async fn split(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u64,
        buf: IoBuf,
        step: u64,
        deadline: Instant,
    ) -> IoResult {
        let data = typ == wire::CMD_READ || typ == wire::CMD_WRITE;
        let cmds = (0..len).step_by(step as usize).map(|at| {
            let n = step.min(len - at);
            Cmd {
                typ,
                flags,
                offset: offset + at,
                len: n as u32,
                buf: if data {
                    sub(buf, at, n)
                } else {
                    IoBuf::empty()
                },
            }
        });
        let mut runs: Vec<_> = cmds.map(|c| self.shared.run(c, deadline)).collect();
        if runs.len() == 1 {
            return runs.remove(0).await;
        }
        // Every part runs to its end (none is dropped midway), then the first error wins.
        futures::future::join_all(runs).await.into_iter().collect()
    }
}

impl Member for NbdMember {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn session(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.status()).ok()
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        raidcore::io_future_boxed(self.perform(io))
    }

    /// NBD_CMD_DISC on each connection, stop the supervisors. Idempotent.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.closed.send_replace(true);
        for slot in &self.shared.slots {
            if let Some(c) = slot.get() {
                c.disconnect();
            }
        }
        tracing::info!(member = %self.shared.uri, "NBD member closed");
    }
}

impl Drop for NbdMember {
    fn drop(&mut self) {
        self.close();
    }
}

impl Slot {
    fn requests(&self) -> u64 {
        self.past_requests.load(Ordering::Relaxed) + self.get().map_or(0, |c| c.requests())
    }
}

impl Shared {
    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn live(&self) -> impl Iterator<Item = Arc<Conn>> + '_ {
        self.slots
            .iter()
            .filter_map(Slot::get)
            .filter(|c| !c.is_dead())
    }

    fn install(&self, i: usize, c: Arc<Conn>) {
        self.slots[i].set(Some(c));
        self.changed.send_modify(|g| *g += 1);
    }

    fn remove(&self, i: usize) {
        if let Some(old) = self.slots[i].set(None) {
            self.slots[i]
                .past_requests
                .fetch_add(old.requests(), Ordering::Relaxed);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    fn note_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }

    /// Connect the other slots at open, so the member starts at full width; a slot that
    /// fails is left to its supervisor's reconnect loop.
    async fn open_extra_connections(self: &Arc<Self>) {
        let attempts = (1..self.slots.len()).map(|i| {
            let me = self.clone();
            async move { (i, me.connect_once().await) }
        });
        for (i, r) in futures::future::join_all(attempts).await {
            let first = match r {
                Ok(c) => {
                    self.install(i, c.clone());
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(member = %self.uri, slot = i, error = %e, "extra NBD connection failed; retrying in the background");
                    self.note_error(e);
                    None
                }
            };
            tokio::spawn(self.clone().supervise(i, first));
        }
    }

    /// One connect + handshake that must still fit the member's geometry.
    async fn connect_once(&self) -> Result<Arc<Conn>, String> {
        let (stream, info) = client::open_export(&self.uri, &self.opts.connect())
            .await
            .map_err(|e| e.to_string())?;
        if info.size < self.size || info.min_block > self.block_size {
            return Err(format!(
                "the export changed: now {} bytes with {}-byte blocks, was {} bytes with {}-byte blocks",
                info.size, info.min_block, self.size, self.block_size
            ));
        }
        if info.has(wire::FLAG_READ_ONLY) {
            return Err("the export is now read-only".into());
        }
        Ok(Arc::new(Conn::new(stream, info, self.uri.as_str())))
    }

    /// A slot's life: run the connection's reader; when it dies, reconnect with backoff;
    /// until the member closes.
    async fn supervise(self: Arc<Self>, i: usize, mut conn: Option<Arc<Conn>>) {
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => match self.reconnect(i).await {
                    Some(c) => c,
                    None => return,
                },
            };
            let why = c.run_reader().await;
            self.remove(i);
            if self.is_closed() {
                return;
            }
            tracing::warn!(member = %self.uri, slot = i, reason = %why, "NBD connection lost; reconnecting");
            self.note_error(why);
        }
    }

    /// Connect until it works (Some) or the member closes (None).
    async fn reconnect(&self, i: usize) -> Option<Arc<Conn>> {
        let mut closed = self.closed.subscribe();
        let mut delay = BACKOFF_START.min(self.opts.reconnect_backoff_max);
        loop {
            let attempt = tokio::select! {
                _ = closed.wait_for(|c| *c) => return None,
                r = self.connect_once() => r,
            };
            match attempt {
                Ok(c) => {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(member = %self.uri, slot = i, "NBD connection re-established");
                    self.install(i, c.clone());
                    return Some(c);
                }
                Err(e) => {
                    tracing::debug!(member = %self.uri, slot = i, error = %e, ?delay, "NBD reconnect failed");
                    self.note_error(e);
                }
            }
            tokio::select! {
                _ = closed.wait_for(|c| *c) => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.opts.reconnect_backoff_max);
        }
    }

    /// The connection for a request (see `least_loaded`), waiting for one to come up
    /// until `deadline`. None: closed or no connection in time.
    async fn pick(&self, deadline: Instant) -> Option<Arc<Conn>> {
        // The common case, with no watch subscription per request.
        if !self.is_closed() {
            if let Some(c) = self.least_loaded() {
                return Some(c);
            }
        }
        // Subscribed before the loop looks again, so a connection that comes up between
        // that look and the wait is not missed.
        let mut changed = self.changed.subscribe();
        loop {
            if self.is_closed() {
                return None;
            }
            if let Some(c) = self.least_loaded() {
                return Some(c);
            }
            let wait = tokio::time::timeout_at(deadline, changed.changed()).await;
            if !matches!(wait, Ok(Ok(()))) {
                return None;
            }
        }
    }

    /// The connection a request joins: one whose writer is about to send (a batch
    /// forming under a plug, or a write in progress), so a batch of requests costs one
    /// write and one wake-up of the server and of our reader; else the least loaded.
    /// Batches thus alternate between connections.
    fn least_loaded(&self) -> Option<Arc<Conn>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<Arc<Conn>> = None;
        for c in (0..n).filter_map(|k| self.slots[(start + k) % n].get()) {
            if c.is_dead() {
                continue;
            }
            if c.in_flight() < JOIN_MAX && c.is_writing() {
                return Some(c);
            }
            if best.as_ref().is_none_or(|b| c.in_flight() < b.in_flight()) {
                best = Some(c);
            }
        }
        best
    }

    /// One request to completion: re-sent on another connection when its connection
    /// dies, until the deadline.
    async fn run(&self, cmd: Cmd, deadline: Instant) -> IoResult {
        loop {
            let Some(conn) = self.pick(deadline).await else {
                return Err(self.no_connection(&cmd));
            };
            match tokio::time::timeout_at(deadline, conn.request(cmd)).await {
                Err(_) => return Err(self.timed_out(&cmd)),
                Ok(Outcome::Done(r)) => return r,
                Ok(Outcome::Lost(why)) => {
                    tracing::debug!(member = %self.uri, cmd = wire::cmd_name(cmd.typ), offset = cmd.offset, reason = %why, "re-sending an NBD request after its connection died");
                }
            }
        }
    }

    fn no_connection(&self, cmd: &Cmd) -> IoError {
        if self.is_closed() {
            return IoError::Shutdown;
        }
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "none recorded".into());
        IoError::Disconnected(format!(
            "{}: no connection to the server for {} of {} bytes at offset {} within {:?} (last error: {last})",
            self.uri,
            wire::cmd_name(cmd.typ),
            cmd.len,
            cmd.offset,
            self.opts.timeout
        ))
    }

    fn timed_out(&self, cmd: &Cmd) -> IoError {
        IoError::Timeout(format!(
            "{}: {} of {} bytes at offset {} got no reply within {:?}",
            self.uri,
            wire::cmd_name(cmd.typ),
            cmd.len,
            cmd.offset,
            self.opts.timeout
        ))
    }
}

fn flush_cmd() -> Cmd {
    Cmd {
        typ: wire::CMD_FLUSH,
        flags: 0,
        offset: 0,
        len: 0,
        buf: IoBuf::empty(),
    }
}

/// The part `[at, at+len)` of `buf`.
fn sub(buf: IoBuf, at: u64, len: u64) -> IoBuf {
    // SAFETY: validate() checked buf.len() == the request length, and the split keeps
    // at + len inside it; the issuer keeps the whole buffer alive (IoBuf contract).
    unsafe { IoBuf::from_raw(buf.as_ptr().add(at as usize), len as usize) }
}

/// The export must be writable, hold at least one block and take requests of one block.
fn check_export(uri: &NbdUri, e: &ExportInfo, block_size: u32) -> Result<(), NbdError> {
    if e.has(wire::FLAG_READ_ONLY) {
        return Err(NbdError::ReadOnly {
            server: uri.server(),
            export: uri.export.clone(),
        });
    }
    if e.max_block < block_size {
        return Err(NbdError::Protocol {
            server: uri.server(),
            why: format!(
                "its largest request ({} bytes) is smaller than one {block_size}-byte block",
                e.max_block
            ),
        });
    }
    if e.size < u64::from(block_size) {
        return Err(NbdError::TooSmall {
            server: uri.server(),
            export: uri.export.clone(),
            size: e.size,
            block_size,
        });
    }
    Ok(())
}

/// The largest READ/WRITE to send: the server's maximum, capped at the spec's default
/// maximum, in whole blocks.
fn max_request(e: &ExportInfo, block_size: u32) -> u32 {
    let max = e.max_block.min(client::MAX_REQUEST);
    (max / block_size * block_size).max(block_size)
}

fn member_info(address: &str, size: u64, block_size: u32, e: &ExportInfo) -> MemberInfo {
    MemberInfo {
        address: address.trim().to_string(),
        class: Class::Remote,
        proto: Proto::Nbd,
        size,
        block_size,
        caps: Caps {
            flush: e.has(wire::FLAG_SEND_FLUSH),
            fua: e.has(wire::FLAG_SEND_FUA),
            discard: e.has(wire::FLAG_SEND_TRIM),
            write_zeroes: e.has(wire::FLAG_SEND_WRITE_ZEROES),
        },
        engine: "nbd",
    }
}
