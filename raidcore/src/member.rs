//! The `Member` trait every protocol implements, and what the core keeps about each
//! member of an array: its health, its fault reason and its counters.

use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use serde::Serialize;

use crate::counter::Counter;
use crate::error::IoResult;
use crate::io::{Class, IoBuf, MemberIo, Op, Proto};

/// The bytes a member's I/O future may take inline (see `IoFuture`): room for the local
/// and AoE members' (392 and under 256 bytes today). Every move of an `IoFuture` copies
/// all of them, so this stays small and the network members' larger futures are boxed.
pub const IO_FUTURE_BYTES: usize = 512;

/// A member I/O in flight: a type-erased future stored inline, not boxed, so the trait
/// stays object safe without a heap allocation per I/O (data buffers come from the pool).
/// Make one with `io_future`.
pub type IoFuture<'a> = stackfuture::StackFuture<'a, IoResult, IO_FUTURE_BYTES>;

/// Wrap a member's I/O future. It must fit in `IO_FUTURE_BYTES`: a larger one fails to
/// compile, naming its size, rather than silently costing an allocation per I/O.
pub fn io_future<'a, F>(f: F) -> IoFuture<'a>
where
    F: Future<Output = IoResult> + Send + 'a,
{
    IoFuture::from(f)
}

/// Wrap a member's I/O future that is too large for `io_future`, at the cost of one heap
/// allocation per I/O: for members whose I/O is a network round trip, where it is noise.
pub fn io_future_boxed<'a, F>(f: F) -> IoFuture<'a>
where
    F: Future<Output = IoResult> + Send + 'a,
{
    IoFuture::from(Box::pin(f))
}

/// What a member can do beyond read and write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Caps {
    pub flush: bool,
    pub fua: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// The fixed facts about a member, known once it is open.
#[derive(Debug, Clone, Serialize)]
pub struct MemberInfo {
    /// The address it was opened from, e.g. `file:/var/lib/uniblk/a.img`.
    pub address: String,
    pub class: Class,
    pub proto: Proto,
    /// Usable bytes, metadata area included.
    pub size: u64,
    /// Logical block size: requests must be aligned to it.
    pub block_size: u32,
    pub caps: Caps,
    /// Which I/O engine serves it (e.g. "io_uring", "pread"), for status.
    pub engine: &'static str,
}

/// One storage element. Offsets and lengths in a `MemberIo` are aligned to
/// `info().block_size`, lie inside `info().size`, and the op is one the caps allow; the
/// core guarantees that before calling `submit`.
pub trait Member: Send + Sync + 'static {
    fn info(&self) -> &MemberInfo;

    /// Perform one I/O. The returned future is always polled to completion.
    fn submit(&self, io: MemberIo) -> IoFuture<'_>;

    /// Release resources (flush is done by the core before this). Idempotent.
    fn close(&self) {}

    /// For members whose storage is this process's own memory (`mem:`): the bytes of
    /// `[offset, offset+len)` (whole blocks, inside `info().size`), lent to a frontend so
    /// it receives a write straight into them or sends a read straight from them, with no
    /// copy. The array then submits the read or write as usual with these very bytes as
    /// its buffer, and `submit` must see that they are its own and leave them be. The
    /// bytes must stay mapped while the member lives. What a frontend receives into a
    /// lent range is visible to readers before the write completes, as on a disk being
    /// written; overlapping requests in flight together have no defined outcome anyway.
    /// None (the default): the member has no such bytes, requests get pool buffers.
    fn lend(&self, _offset: u64, _len: u64) -> Option<IoBuf> {
        None
    }

    /// What the member's protocol knows of its connection, for `uniblk status`: session
    /// state, negotiated parameters and protocol counters, as a JSON object. Never a
    /// secret. None (the default) for members with nothing beyond the common counters.
    fn session(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The checks every remote member makes before an I/O goes on the wire, where a bad
/// request would become a protocol error or a write outside the caller's buffer: the
/// range lies inside `info.size`, offset and length are whole `info.block_size` blocks,
/// and a read or write carries a buffer of exactly its length. Flush is always fine.
pub fn check_request(info: &MemberInfo, io: &MemberIo) -> IoResult {
    let t = &io.tag;
    if t.op == Op::Flush {
        return Ok(());
    }
    let size = info.size;
    if t.offset.checked_add(t.len).is_none_or(|end| end > size) {
        return Err(crate::error::IoError::OutOfRange {
            offset: t.offset,
            len: t.len,
            size,
        });
    }
    let bs = u64::from(info.block_size);
    if !t.offset.is_multiple_of(bs) || !t.len.is_multiple_of(bs) {
        return Err(crate::error::IoError::Invalid(format!(
            "{}: offset {} length {} not aligned to its {bs}-byte blocks",
            info.address, t.offset, t.len
        )));
    }
    if matches!(t.op, Op::Read | Op::Write) && io.buf.len() as u64 != t.len {
        return Err(crate::error::IoError::Invalid(format!(
            "{}: a {}-byte buffer for a {}-byte request",
            info.address,
            io.buf.len(),
            t.len
        )));
    }
    Ok(())
}

/// Why a member is out of service. An enum, not a string, so policy can match on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum FaultReason {
    /// An I/O returned an error (the error's text).
    IoError(String),
    Timeout,
    Disconnected,
    TooSmall,
    /// It missed writes while out of service (older event count than its peers).
    Stale,
    /// Its storage no longer carries its superblock (a server that came back with a blank
    /// or different disk): what it holds is not this array's data.
    IdentityLost(String),
    /// An operator said so.
    Operator,
    /// An operator took it out of the array (`member remove`); its slot awaits `member add`.
    Removed,
}

impl FaultReason {
    /// The reason a failed I/O gives for taking its member out of service.
    pub fn from_error(e: &crate::error::IoError) -> Self {
        use crate::error::IoError;
        match e {
            IoError::Timeout(_) => FaultReason::Timeout,
            IoError::Disconnected(_) => FaultReason::Disconnected,
            other => FaultReason::IoError(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MemberState {
    Healthy,
    Faulty(FaultReason),
    /// Being refilled from its mirrors: it takes every write but serves no read until the
    /// copy completes.
    Rebuilding,
}

/// Counters the core keeps per member; read by status and by read balancing.
/// The per-I/O ones are sharded per thread (see counter.rs).
#[derive(Debug, Default)]
pub struct MemberStats {
    pub in_flight: Counter,
    pub completed: Counter,
    pub errors: Counter,
    pub bytes_read: Counter,
    pub bytes_written: Counter,
    /// Round trip of the last successful health probe, in microseconds (0: never probed).
    pub last_probe_us: AtomicU64,
    pub probes_failed: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub in_flight: u64,
    pub completed: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub last_probe_us: u64,
    pub probes_failed: u64,
}

impl MemberStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            in_flight: self.in_flight.get(),
            completed: self.completed.get(),
            errors: self.errors.get(),
            bytes_read: self.bytes_read.get(),
            bytes_written: self.bytes_written.get(),
            last_probe_us: self.last_probe_us.load(Ordering::Relaxed),
            probes_failed: self.probes_failed.load(Ordering::Relaxed),
        }
    }
}

/// How far a rebuild has come, in bytes of array address space.
#[derive(Debug, Default)]
pub struct RebuildProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// A member as the array holds it. The member itself can be swapped (`member add` into a
/// removed slot); an I/O holds it with `current()` for its span, anything longer with
/// `member()`.
pub struct MemberSlot {
    /// Doubly wrapped because ArcSwap holds a thin pointer.
    member: ArcSwap<Arc<dyn Member>>,
    pub stats: MemberStats,
    pub rebuild: RebuildProgress,
    state: Mutex<MemberState>,
    /// `state` in brief (HEALTHY, REBUILDING or FAULTY), written under its lock and read
    /// without one: every I/O asks whether a copy serves reads or takes writes, and a
    /// lock taken by both worker threads costs each of them the cache line's round trip.
    health: AtomicU8,
    /// The member's class is not Local: kept here for read balancing, which asks on
    /// every read (see `health`); follows `replace`.
    remote: AtomicBool,
}

/// A slot's member held for one I/O (see `MemberSlot::current`).
pub struct MemberRef(arc_swap::Guard<Arc<Arc<dyn Member>>>);

impl Deref for MemberRef {
    type Target = dyn Member;
    fn deref(&self) -> &(dyn Member + 'static) {
        &***self.0
    }
}

const HEALTHY: u8 = 0;
const REBUILDING: u8 = 1;
const FAULTY: u8 = 2;

fn health_of(s: &MemberState) -> u8 {
    match s {
        MemberState::Healthy => HEALTHY,
        MemberState::Rebuilding => REBUILDING,
        MemberState::Faulty(_) => FAULTY,
    }
}

impl MemberSlot {
    pub fn new(member: Arc<dyn Member>) -> Self {
        MemberSlot {
            stats: MemberStats::default(),
            rebuild: RebuildProgress::default(),
            state: Mutex::new(MemberState::Healthy),
            health: AtomicU8::new(HEALTHY),
            remote: AtomicBool::new(member.info().class != Class::Local),
            member: ArcSwap::from_pointee(member),
        }
    }

    /// The member, for as long as the caller likes (a reference count on it).
    pub fn member(&self) -> Arc<dyn Member> {
        Arc::clone(&self.member.load())
    }

    /// The member for the span of one I/O. Taken by every I/O: unlike `member()` it
    /// usually writes nothing another thread reads (no lock word, no reference count, both
    /// of which moved a cache line between the cores on every I/O); a replaced member
    /// lives until the last such reference to it is gone.
    pub fn current(&self) -> MemberRef {
        MemberRef(self.member.load())
    }

    /// Put a new member in this slot; returns the old one. I/Os already running on the
    /// old one finish on it.
    pub fn replace(&self, m: Arc<dyn Member>) -> Arc<dyn Member> {
        self.remote
            .store(m.info().class != Class::Local, Ordering::Relaxed);
        let old = self.member.swap(Arc::new(m));
        Arc::clone(&old)
    }

    /// The member in this slot is not a local one.
    pub fn is_remote(&self) -> bool {
        self.remote.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> MemberState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_state(&self, s: MemberState) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.health.store(health_of(&s), Ordering::Release);
        *st = s;
    }

    /// Serves reads and counts as a copy of the data.
    pub fn is_healthy(&self) -> bool {
        self.health.load(Ordering::Acquire) == HEALTHY
    }

    /// Receives writes: healthy, or being rebuilt.
    pub fn takes_writes(&self) -> bool {
        self.health.load(Ordering::Acquire) != FAULTY
    }

    /// Mark faulty; returns true if this call took it out of service.
    pub fn fail(&self, reason: FaultReason) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*st, MemberState::Healthy | MemberState::Rebuilding) {
            *st = MemberState::Faulty(reason);
            self.health.store(FAULTY, Ordering::Release);
            true
        } else {
            false
        }
    }
}
