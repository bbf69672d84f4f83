//! An array: a RAID level over members, behind one queue. This is the one execution path
//! every frontend request takes: range checks, widening to whole blocks (read-modify-write
//! at unaligned edges), mapping through the level, choosing which copy to read, writing
//! every copy, marking members faulty, and the flush and FUA rules.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::Mutex as AsyncMutex;
use uuid::Uuid;

use crate::buf_pool::{BufPool, PoolBuf};
use crate::error::{IoError, IoResult};
use crate::io::{next_tag_id, Class, Flags, FrontIo, IoBuf, MemberIo, Op, Tag};
use crate::join::join_all;
use crate::level::{Copy, Level, Piece, Pieces};
use crate::member::{FaultReason, Member, MemberSlot, MemberState};
use crate::queue::IoQueue;
use crate::superblock::{SbState, Superblock, SB_OFFSET, SB_SIZE};

/// Locks serialising read-modify-write of the same edge block (hashed).
const RMW_LOCKS: usize = 64;

/// How the array is doing as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArrayState {
    /// Every member healthy.
    Optimal,
    /// Some members faulty, every byte still has a copy.
    Degraded,
    /// Some data has no healthy copy left.
    Failed,
}

/// A frontend's data buffer for one request. It covers the request widened to whole
/// logical blocks, with the request's bytes at `data()`; the padding lets the array do
/// read-modify-write in place, with no second buffer.
pub struct FrontBuf {
    store: Store,
    /// The request's offset in the array: a lent buffer is the member's bytes for it, so
    /// submitting the buffer for another offset would copy member bytes onto others.
    offset: u64,
    pad: usize,
    len: usize,
}

/// Where a front buffer's bytes live.
enum Store {
    /// A pool buffer: the usual case.
    Pool(PoolBuf),
    /// The member's own bytes for the request's range (see [`Member::lend`]): the
    /// frontend receives a write straight into the member and sends a read straight from
    /// it. The Arc keeps the member, and so the memory, alive while the buffer exists.
    Lent {
        bytes: IoBuf,
        _member: Arc<dyn Member>,
    },
}

impl FrontBuf {
    pub fn data(&self) -> &[u8] {
        &self.whole()[self.pad..self.pad + self.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        let (p, l) = (self.pad, self.len);
        &mut self.whole_mut()[p..p + l]
    }

    /// Whether the bytes are the member's own (no pool buffer, no copy).
    pub fn is_lent(&self) -> bool {
        matches!(self.store, Store::Lent { .. })
    }

    fn whole(&self) -> &[u8] {
        match &self.store {
            Store::Pool(b) => b,
            // SAFETY: a lent range stays mapped while `_member` lives (Member::lend).
            Store::Lent { bytes, .. } => unsafe { bytes.as_slice() },
        }
    }

    fn whole_mut(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Pool(b) => b,
            // SAFETY: as in whole(); this buffer is the request's only handle on them.
            Store::Lent { bytes, .. } => unsafe { bytes.as_mut_slice() },
        }
    }
}

pub struct Array {
    pub name: String,
    pub uuid: Uuid,
    pub(crate) level: Box<dyn Level>,
    pub(crate) members: Vec<MemberSlot>,
    data_offset: u64,
    block_size: u32,
    queue: IoQueue,
    pub(crate) pool: BufPool,
    /// Edge blocks of read-modify-write cycles come from here, not from `pool`: a cycle
    /// already holds a front buffer, and if front buffers could exhaust the class its edge
    /// block needs, every cycle would wait for another for ever. A cycle holds an edge
    /// buffer only under one of the `rmw_locks`, one at a time, so with one buffer per
    /// lock an edge block never waits.
    edge_pool: BufPool,
    closed: AtomicBool,
    rmw_locks: Vec<AsyncMutex<()>>,
    pub(crate) superblocks: AsyncMutex<Vec<Superblock>>,
    /// Front writes hold it shared; a rebuild holds it exclusively while it copies a
    /// stretch, so a copy never interleaves with a write to the same range.
    pub(crate) resync_gate: tokio::sync::RwLock<()>,
    /// One rebuild at a time per array.
    pub(crate) rebuilding: AtomicBool,
    /// Every member lends its bytes (see [`Member::lend`]): requests that map to one copy
    /// on one member may use them instead of a pool buffer.
    lends: bool,
}

impl Array {
    /// Put an array together. `members[i]` must be the level's member `i`; the caller
    /// (assembly) has checked sizes and metadata. Fails only when the read-modify-write
    /// buffers cannot be mapped.
    pub fn new(
        name: String,
        uuid: Uuid,
        level: Box<dyn Level>,
        members: Vec<MemberSlot>,
        queue: IoQueue,
        pool: BufPool,
        superblocks: Vec<Superblock>,
    ) -> std::io::Result<Self> {
        // Every member of one array shares the data offset it was initialised with.
        let data_offset = superblocks
            .first()
            .map(|s| s.data_offset)
            .unwrap_or(crate::superblock::DEFAULT_DATA_OFFSET);
        let block_size = members
            .iter()
            .map(|m| m.member().info().block_size)
            .max()
            .unwrap_or(512)
            .max(512);
        // A member that lends at all lends its first data block.
        let lends = !members.is_empty()
            && members.iter().all(|m| {
                m.member()
                    .lend(data_offset, u64::from(block_size))
                    .is_some()
            });
        let edge_pool = BufPool::new(&crate::buf_pool::PoolConfig {
            classes: vec![(crate::buf_pool::ALIGN, RMW_LOCKS)],
        })?;
        Ok(Array {
            name,
            uuid,
            level,
            members,
            data_offset,
            block_size,
            queue,
            pool,
            edge_pool,
            closed: AtomicBool::new(false),
            rmw_locks: (0..RMW_LOCKS).map(|_| AsyncMutex::new(())).collect(),
            superblocks: AsyncMutex::new(superblocks),
            resync_gate: tokio::sync::RwLock::new(()),
            rebuilding: AtomicBool::new(false),
            lends,
        })
    }

    pub fn size(&self) -> u64 {
        self.level.size()
    }

    /// The largest logical block size of any member: the array's natural alignment.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn level(&self) -> &dyn Level {
        &*self.level
    }

    pub fn members(&self) -> &[MemberSlot] {
        &self.members
    }

    pub fn queue(&self) -> &IoQueue {
        &self.queue
    }

    pub fn pool(&self) -> &BufPool {
        &self.pool
    }

    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The largest request a frontend may send.
    pub fn max_io(&self) -> u64 {
        (self.pool.max_len() - 2 * self.block_size as usize) as u64
    }

    /// What every member can do is what the array can promise.
    pub fn caps(&self) -> crate::member::Caps {
        // Flush and FUA are emulated per member where missing, discard is advisory and
        // write-zeroes is emulated by writing zeroes, so the array offers all four.
        crate::member::Caps {
            flush: true,
            fua: true,
            discard: true,
            write_zeroes: true,
        }
    }

    /// Whether write-zeroes is fast on every member (NBD_CMD_FLAG_FAST_ZERO).
    pub fn fast_zero(&self) -> bool {
        self.members
            .iter()
            .all(|m| m.member().info().caps.write_zeroes)
    }

    pub fn state(&self) -> ArrayState {
        let failed: Vec<bool> = self.members.iter().map(|m| !m.is_healthy()).collect();
        if !failed.iter().any(|&f| f) {
            ArrayState::Optimal
        } else if self.level.tolerates(&failed) {
            ArrayState::Degraded
        } else {
            ArrayState::Failed
        }
    }

    /// A buffer for a read or write of `[offset, offset+len)`. Waits while the pool is
    /// exhausted. Fails only for a length over `max_io()`.
    pub async fn buffer(&self, offset: u64, len: u64) -> IoResult<FrontBuf> {
        if len > self.max_io() {
            return Err(IoError::Invalid(format!(
                "request of {len} bytes exceeds the maximum of {} bytes",
                self.max_io()
            )));
        }
        if let Some(b) = self.lent(offset, len) {
            return Ok(b);
        }
        let span = self.buffer_len(offset, len);
        let bs = self.block_size as u64;
        let start = offset / bs * bs;
        let buf = self
            .pool
            .get(span)
            .await
            .ok_or_else(|| IoError::Invalid(format!("no buffer class holds {span} bytes")))?;
        Ok(FrontBuf {
            store: Store::Pool(buf),
            offset,
            pad: (offset - start) as usize,
            len: len as usize,
        })
    }

    /// `buffer()` without waiting: None when the pool's class for it is exhausted right
    /// now (the caller then waits with `buffer()`).
    pub fn try_buffer(&self, offset: u64, len: u64) -> Option<IoResult<FrontBuf>> {
        if len > self.max_io() {
            return Some(Err(IoError::Invalid(format!(
                "request of {len} bytes exceeds the maximum of {} bytes",
                self.max_io()
            ))));
        }
        if let Some(b) = self.lent(offset, len) {
            return Some(Ok(b));
        }
        let span = self.buffer_len(offset, len);
        if self.pool.class_index(span).is_none() {
            return Some(Err(IoError::Invalid(format!(
                "no buffer class holds {span} bytes"
            ))));
        }
        let buf = self.pool.try_get(span)?;
        let bs = self.block_size as u64;
        Some(Ok(FrontBuf {
            store: Store::Pool(buf),
            offset,
            pad: (offset % bs) as usize,
            len: len as usize,
        }))
    }

    /// The member's own bytes as the buffer of `[offset, offset+len)`, when the array's
    /// members lend them and the request is whole blocks that map to one copy on one
    /// healthy member (linear, raid0 within a chunk; never a mirror, whose every copy must
    /// be written). Submitting with such a buffer hands the member its own bytes, which it
    /// leaves in place; if the member was replaced meanwhile, the new one copies them like
    /// any buffer.
    fn lent(&self, offset: u64, len: u64) -> Option<FrontBuf> {
        let bs = u64::from(self.block_size);
        let whole = len > 0 && offset.is_multiple_of(bs) && len.is_multiple_of(bs);
        if !self.lends || !whole || offset.checked_add(len)? > self.size() {
            return None;
        }
        let pieces = self.map(offset, len);
        let [piece] = pieces.as_slice() else {
            return None;
        };
        let [c] = piece.copies.as_slice() else {
            return None;
        };
        let slot = &self.members[c.member];
        if !slot.is_healthy() {
            return None;
        }
        let member = slot.member();
        let bytes = member.lend(self.data_offset + c.offset, len)?;
        Some(FrontBuf {
            store: Store::Lent {
                bytes,
                _member: member,
            },
            offset,
            pad: 0,
            len: len as usize,
        })
    }

    /// How many bytes `buffer(offset, len)` takes from the pool: the request widened to
    /// whole blocks.
    pub fn buffer_len(&self, offset: u64, len: u64) -> usize {
        let bs = self.block_size as u64;
        let start = offset / bs * bs;
        let end = (offset + len).div_ceil(bs) * bs;
        (end - start).max(bs) as usize
    }

    /// Execute one frontend request. Read and Write need the buffer from `buffer()` for the
    /// same offset and length.
    pub async fn submit(&self, io: FrontIo, buf: Option<&mut FrontBuf>) -> IoResult {
        if self.closed.load(Ordering::Acquire) {
            return Err(IoError::Shutdown);
        }
        if io.op == Op::Flush {
            return self.flush().await;
        }
        self.check_range(io.offset, io.len)?;
        if io.len == 0 {
            return Ok(());
        }
        match io.op {
            Op::Read | Op::Write => {
                let buf =
                    buf.ok_or_else(|| IoError::Invalid("read/write without buffer".into()))?;
                if buf.len as u64 != io.len || buf.offset != io.offset {
                    return Err(IoError::Invalid("buffer does not match the request".into()));
                }
                if io.op == Op::Read {
                    self.read_span(io.offset, buf).await
                } else {
                    self.write_span(io.offset, buf, io.flags.fua).await
                }
            }
            Op::Trim => self.trim(io.offset, io.len).await,
            Op::WriteZeroes => self.write_zeroes(io.offset, io.len, io.flags).await,
            Op::Flush => unreachable!("handled above"),
        }
    }

    /// Read or write straight in the caller's buffer: no pool buffer, no copy. For
    /// frontends whose requests are always whole blocks (ublk: the device's logical block
    /// is the array's). The range and the buffer must be aligned to `block_size()`, and
    /// `buf` must stay valid and untouched until this returns (see IoBuf); anything else
    /// is refused with Invalid, and the caller uses `buffer()` + `submit()` instead.
    pub async fn submit_in_place(&self, io: FrontIo, buf: IoBuf) -> IoResult {
        if self.is_closed() {
            return Err(IoError::Shutdown);
        }
        self.check_range(io.offset, io.len)?;
        if io.len > self.max_io() {
            return Err(IoError::Invalid(format!(
                "request of {} bytes exceeds the maximum of {} bytes",
                io.len,
                self.max_io()
            )));
        }
        let bs = self.block_size as u64;
        let aligned = io.offset.is_multiple_of(bs)
            && io.len.is_multiple_of(bs)
            && (buf.as_ptr() as u64).is_multiple_of(bs)
            && buf.len() as u64 == io.len;
        if !aligned {
            return Err(IoError::Invalid(
                "in-place I/O needs whole, aligned blocks".into(),
            ));
        }
        if io.len == 0 {
            return Ok(());
        }
        match io.op {
            Op::Read => self.read_aligned(io.offset, buf).await,
            Op::Write => {
                self.write_aligned(io.offset, buf, Op::Write, io.flags.fua)
                    .await
            }
            _ => Err(IoError::Invalid(
                "in-place I/O is for reads and writes".into(),
            )),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> IoResult {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IoError::OutOfRange { offset, len, size }),
        }
    }

    /// Read the whole block-aligned span of `buf`, then the frontend uses `data()`.
    async fn read_span(&self, offset: u64, buf: &mut FrontBuf) -> IoResult {
        let bs = self.block_size as u64;
        let start = offset / bs * bs;
        let span = ((offset + buf.len as u64).div_ceil(bs) * bs - start) as usize;
        let iobuf = IoBuf::from_slice(&mut buf.whole_mut()[..span]);
        self.read_aligned(start, iobuf).await
    }

    /// Fill the unaligned edges of `buf` from disk (under the edge locks), then write the
    /// whole span.
    async fn write_span(&self, offset: u64, buf: &mut FrontBuf, fua: bool) -> IoResult {
        let bs = self.block_size as u64;
        let start = offset / bs * bs;
        let data_end = offset + buf.len as u64;
        let end = data_end.div_ceil(bs) * bs;
        let span = (end - start) as usize;
        let head = offset != start;
        let tail = data_end != end;
        let _locks = self.lock_edges(start, end, head, tail).await;
        if head {
            let blk = self.edge_block(start).await?;
            let pad = buf.pad;
            buf.whole_mut()[..pad].copy_from_slice(&blk[..pad]);
        }
        if tail {
            let last = end - bs;
            let blk = self.edge_block(last).await?;
            let from = (data_end - last) as usize;
            let at = (last - start) as usize;
            buf.whole_mut()[at + from..span].copy_from_slice(&blk[from..bs as usize]);
        }
        let iobuf = IoBuf::from_slice(&mut buf.whole_mut()[..span]);
        self.write_aligned(start, iobuf, Op::Write, fua).await
    }

    /// Read one block into an edge buffer. Called only under the block's RMW lock.
    async fn edge_block(&self, at: u64) -> IoResult<PoolBuf> {
        let bs = self.block_size as usize;
        let mut blk = self
            .edge_pool
            .get(bs)
            .await
            .ok_or_else(|| IoError::Invalid("no buffer for an edge block".into()))?;
        self.read_aligned(at, IoBuf::from_slice(&mut blk[..bs]))
            .await?;
        Ok(blk)
    }

    /// Serialise read-modify-write cycles that touch the same edge blocks, so two
    /// unaligned writes into one block cannot lose each other's bytes.
    async fn lock_edges(
        &self,
        start: u64,
        end: u64,
        head: bool,
        tail: bool,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let bs = self.block_size as u64;
        let mut slots: smallvec::SmallVec<[usize; 2]> = smallvec::SmallVec::new();
        if head {
            slots.push(((start / bs) % RMW_LOCKS as u64) as usize);
        }
        if tail {
            slots.push((((end - bs) / bs) % RMW_LOCKS as u64) as usize);
        }
        slots.sort_unstable();
        slots.dedup();
        let mut guards = Vec::with_capacity(slots.len());
        for s in slots {
            guards.push(self.rmw_locks[s].lock().await);
        }
        guards
    }

    pub(crate) fn map(&self, offset: u64, len: u64) -> Pieces {
        let mut pieces = Pieces::new();
        self.level.map(offset, len, &mut pieces);
        pieces
    }

    async fn read_aligned(&self, offset: u64, buf: IoBuf) -> IoResult {
        let pieces = self.map(offset, buf.len() as u64);
        if pieces.len() == 1 {
            return self.read_piece(&pieces[0], buf).await;
        }
        // Boxed: inline, four pieces' futures would make every read's future four times
        // larger (see join.rs), and a request that crosses chunks is the rarer one.
        let all = join_all::<4, _, _>(pieces.iter().map(|p| self.read_piece(p, sub(buf, p))));
        Box::pin(all).await.into_iter().collect()
    }

    /// Read a piece from its best healthy copy, falling back to the others.
    pub(crate) async fn read_piece(&self, piece: &Piece, buf: IoBuf) -> IoResult {
        // Prefer local members, then the least busy; each key is worked out once, from
        // the slot (no member() lock and reference count per comparison), and only when
        // there is a choice (summing a counter's shards is not free).
        let redundant = piece.copies.len() > 1;
        let mut order: smallvec::SmallVec<[((bool, u64), Copy); 4]> = piece
            .copies
            .iter()
            .filter(|c| self.members[c.member].is_healthy())
            .map(|&c| {
                let m = &self.members[c.member];
                let key = if redundant {
                    (m.is_remote(), m.stats.in_flight.get())
                } else {
                    (false, 0)
                };
                (key, c)
            })
            .collect();
        // Stable: among equals the piece's own order stands.
        order.sort_by_key(|&(key, _)| key);
        let mut last = None;
        for (_, c) in order {
            match self.member_io(c, Op::Read, buf, false).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if redundant {
                        // Boxed: a fault writes superblocks, a large future for a rare
                        // path that every read's future would otherwise make room for.
                        Box::pin(self.fault(c.member, FaultReason::from_error(&e))).await;
                    }
                    last = Some(e);
                }
            }
        }
        // Built only here: formatting it up front cost every read an allocation.
        Err(last.unwrap_or_else(|| {
            IoError::Io(format!(
                "array {}: no healthy copy of offset range",
                self.name
            ))
        }))
    }

    async fn write_aligned(&self, offset: u64, buf: IoBuf, op: Op, fua: bool) -> IoResult {
        // Held for the whole write: a rebuild copying this range waits for it, and it waits
        // for a copy in progress (see rebuild.rs).
        let _gate = self.resync_gate.read().await;
        let pieces = self.map(offset, buf.len() as u64);
        self.write_pieces(&pieces, |p| sub(buf, p), op, fua).await
    }

    /// Write every piece with its buffer: one directly, several through a boxed join
    /// (as in read_aligned).
    async fn write_pieces(
        &self,
        pieces: &Pieces,
        buf: impl Fn(&Piece) -> IoBuf,
        op: Op,
        fua: bool,
    ) -> IoResult {
        if pieces.len() == 1 {
            return self.write_piece(&pieces[0], buf(&pieces[0]), op, fua).await;
        }
        let all = join_all::<4, _, _>(pieces.iter().map(|p| self.write_piece(p, buf(p), op, fua)));
        Box::pin(all).await.into_iter().collect()
    }

    /// Write a piece to every copy that takes writes (healthy or rebuilding). It succeeds
    /// when at least one healthy copy took it; copies that failed are marked faulty so
    /// they are never read stale.
    async fn write_piece(&self, piece: &Piece, buf: IoBuf, op: Op, fua: bool) -> IoResult {
        let targets: smallvec::SmallVec<[Copy; 4]> = piece
            .copies
            .iter()
            .copied()
            .filter(|c| self.members[c.member].takes_writes())
            .collect();
        if !targets.iter().any(|c| self.members[c.member].is_healthy()) {
            return Err(IoError::Io(format!(
                "array {}: no healthy copy to write",
                self.name
            )));
        }
        if targets.len() == 1 {
            return self.member_io(targets[0], op, buf, fua).await;
        }
        // Two inline: a two-way mirror is the common case; more copies spill once.
        let results =
            join_all::<2, _, _>(targets.iter().map(|&c| self.member_io(c, op, buf, fua))).await;
        let healthy_ok = targets
            .iter()
            .zip(&results)
            .any(|(c, r)| r.is_ok() && self.members[c.member].is_healthy());
        if !healthy_ok {
            let first = results.into_iter().find(|r| r.is_err());
            return first.unwrap_or_else(|| {
                Err(IoError::Io(format!(
                    "array {}: no healthy copy took the write",
                    self.name
                )))
            });
        }
        for (c, r) in targets.iter().zip(results) {
            if let Err(e) = r {
                Box::pin(self.fault(c.member, FaultReason::from_error(&e))).await;
            }
        }
        Ok(())
    }

    /// Discard: advisory, so only whole blocks are passed down; edges are left alone.
    async fn trim(&self, offset: u64, len: u64) -> IoResult {
        let bs = self.block_size as u64;
        let start = offset.div_ceil(bs) * bs;
        let end = (offset + len) / bs * bs;
        if end <= start {
            return Ok(());
        }
        let pieces = self.map(start, end - start);
        self.write_pieces(&pieces, |p| empty_of(p.len), Op::Trim, false)
            .await
    }

    /// Zero a range: whole blocks through the members' write-zeroes, unaligned edges by
    /// read-modify-write.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: Flags) -> IoResult {
        if flags.fast_zero && !self.fast_zero() {
            return Err(IoError::NotSupported("fast zeroing on every member".into()));
        }
        let bs = self.block_size as u64;
        let end = offset + len;
        let (in_start, in_end) = (offset.div_ceil(bs) * bs, end / bs * bs);
        if in_start >= in_end {
            // Entirely inside one or two blocks: write real zeroes through RMW.
            return self.zero_edge(offset, len, flags.fua).await;
        }
        if offset < in_start {
            self.zero_edge(offset, in_start - offset, flags.fua).await?;
        }
        if in_end < end {
            self.zero_edge(in_end, end - in_end, flags.fua).await?;
        }
        let pieces = self.map(in_start, in_end - in_start);
        self.write_pieces(&pieces, |p| empty_of(p.len), Op::WriteZeroes, flags.fua)
            .await
    }

    async fn zero_edge(&self, offset: u64, len: u64, fua: bool) -> IoResult {
        let mut b = self.buffer(offset, len).await?;
        b.data_mut().fill(0);
        self.write_span(offset, &mut b, fua).await
    }

    /// Make every acknowledged write durable on every healthy member. Members that fail
    /// the flush are marked faulty when the array can spare them; otherwise the flush
    /// fails.
    pub async fn flush(&self) -> IoResult {
        let live: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_healthy())
            .collect();
        // Boxed: a flush already allocates (`live`), and every request's future would
        // otherwise carry room for four members' I/O in flight (see join.rs).
        let results = Box::pin(join_all::<4, _, _>(live.iter().map(|&i| {
            self.member_io(
                Copy {
                    member: i,
                    offset: 0,
                },
                Op::Flush,
                IoBuf::empty(),
                false,
            )
        })))
        .await;
        let mut failed: Vec<bool> = self.members.iter().map(|m| !m.is_healthy()).collect();
        let mut first_err = None;
        for (&i, r) in live.iter().zip(results) {
            if let Err(e) = r {
                failed[i] = true;
                first_err.get_or_insert((i, e));
            }
        }
        let Some((_, err)) = first_err else {
            return Ok(());
        };
        if !self.level.tolerates(&failed) {
            return Err(err);
        }
        for (i, f) in failed.iter().enumerate() {
            if *f {
                self.fault(i, FaultReason::IoError(format!("flush failed: {err}")))
                    .await;
            }
        }
        Ok(())
    }

    /// Mark a member faulty and record it: the healthy members' event counters move
    /// ahead, so the faulty one is known stale at the next assembly even after a crash.
    pub(crate) async fn fault(&self, member: usize, reason: FaultReason) {
        let slot = &self.members[member];
        if slot.fail(reason.clone()) {
            tracing::error!(
                array = %self.name,
                member = %slot.member().info().address,
                ?reason,
                state = ?self.state(),
                "member marked faulty"
            );
            if let Err(e) = self.write_superblocks(SbState::Active).await {
                tracing::error!(array = %self.name, error = %e, "recording the fault failed");
            }
        }
    }

    /// Probe every remote member in service once by reading its superblock: the round
    /// trip is recorded, and the superblock must still name this array and this member. A
    /// server that came back with a blank or different disk (same address, other data)
    /// would otherwise serve zeroes as if they were the array's data. A member that does
    /// not answer, or answers as someone else, is taken out of service when the array can
    /// spare it. No timeout wraps the read here: dropping a member future mid-flight is
    /// never allowed (see IoBuf); each member bounds its requests with its own deadline.
    pub async fn probe_members(&self) {
        for (i, slot) in self.members.iter().enumerate() {
            let m = slot.member();
            if m.info().class != Class::Remote || !slot.takes_writes() {
                continue;
            }
            let start = std::time::Instant::now();
            let verdict = match read_superblock_block(&self.pool, &*m).await {
                Ok(block) => {
                    let rtt = start.elapsed().as_micros().max(1) as u64;
                    slot.stats.last_probe_us.store(rtt, Ordering::Relaxed);
                    self.check_identity(i, &block).await
                }
                Err(e) => Err(FaultReason::from_error(&e)),
            };
            if let Err(reason) = verdict {
                slot.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(array = %self.name, member = %m.info().address, ?reason, "health probe failed");
                let mut failed: Vec<bool> = self.members.iter().map(|m| !m.is_healthy()).collect();
                failed[i] = true;
                if self.level.tolerates(&failed) {
                    self.fault(i, reason).await;
                }
            }
        }
    }

    /// Whether a superblock block read from member `i` still identifies it as ours.
    async fn check_identity(&self, i: usize, block: &[u8]) -> Result<(), FaultReason> {
        let expected = self.superblocks.lock().await[i].member_uuid;
        match Superblock::decode(block) {
            Ok(sb) if sb.array_uuid == self.uuid && sb.member_uuid == expected => Ok(()),
            Ok(sb) => Err(FaultReason::IdentityLost(format!(
                "it now carries array '{}' member {}",
                sb.array_name, sb.member_uuid
            ))),
            Err(e) => Err(FaultReason::IdentityLost(e.to_string())),
        }
    }

    /// Mark a member faulty on an operator's request.
    pub async fn fail_member(&self, member: usize) -> bool {
        if member >= self.members.len() || !self.members[member].takes_writes() {
            return false;
        }
        self.fault(member, FaultReason::Operator).await;
        true
    }

    /// Write every healthy member's superblock with the next event count and `state`.
    pub async fn write_superblocks(&self, state: SbState) -> IoResult {
        let mut sbs = self.superblocks.lock().await;
        let events = sbs.iter().map(|s| s.events).max().unwrap_or(0) + 1;
        let mut first_err = None;
        for (i, sb) in sbs.iter_mut().enumerate() {
            if !self.members[i].is_healthy() {
                continue;
            }
            sb.events = events;
            sb.state = state;
            if let Err(e) = write_superblock(&self.pool, &*self.members[i].member(), sb).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The superblocks as last written, for status.
    pub async fn superblocks(&self) -> Vec<Superblock> {
        self.superblocks.lock().await.clone()
    }

    /// One I/O to one member, through the queue, with capability emulation.
    pub(crate) async fn member_io(&self, c: Copy, op: Op, buf: IoBuf, fua: bool) -> IoResult {
        // Taken once for the whole I/O, without a lock or a shared reference count.
        let member = self.members[c.member].current();
        let m = &*member;
        let caps = m.info().caps;
        match op {
            Op::Flush if !caps.flush => return Ok(()),
            Op::Trim if !caps.discard => return Ok(()),
            Op::WriteZeroes if !caps.write_zeroes => {
                // Boxed: emulated zeroing is rare and its future large.
                return Box::pin(self.zero_by_writing(m, c, buf.len() as u64, fua)).await;
            }
            _ => {}
        }
        self.dispatch_fua(m, c, op, buf, fua).await
    }

    /// Dispatch, then flush if FUA was asked of a member that has no native FUA.
    async fn dispatch_fua(
        &self,
        m: &dyn Member,
        c: Copy,
        op: Op,
        buf: IoBuf,
        fua: bool,
    ) -> IoResult {
        let caps = m.info().caps;
        self.dispatch(m, c, op, buf, fua && caps.fua).await?;
        if fua && !caps.fua && caps.flush {
            self.dispatch(m, c, Op::Flush, IoBuf::empty(), false)
                .await?;
        }
        Ok(())
    }

    /// Emulate write-zeroes with ordinary writes of a zeroed pool buffer.
    async fn zero_by_writing(&self, m: &dyn Member, c: Copy, len: u64, fua: bool) -> IoResult {
        let step = len.min(1 << 20) as usize;
        let mut zeroes = self
            .pool
            .get(step)
            .await
            .ok_or_else(|| IoError::Invalid("no buffer for zeroing".into()))?;
        zeroes.fill(0);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step as u64) as usize;
            let at = Copy {
                member: c.member,
                offset: c.offset + done,
            };
            self.dispatch_fua(m, at, Op::Write, IoBuf::from_slice(&mut zeroes[..n]), fua)
                .await?;
            done += n as u64;
        }
        Ok(())
    }

    /// Tag the I/O, wait for a queue slot, submit, count.
    async fn dispatch(&self, m: &dyn Member, c: Copy, op: Op, buf: IoBuf, fua: bool) -> IoResult {
        let slot = &self.members[c.member];
        let info = m.info();
        let len = buf.len() as u64;
        let tag = Tag {
            id: next_tag_id(),
            class: info.class,
            member: c.member as u16,
            proto: info.proto,
            op,
            offset: if op == Op::Flush {
                0
            } else {
                self.data_offset + c.offset
            },
            len: if op == Op::Flush { 0 } else { len },
            fua,
        };
        let data = match op {
            Op::Read | Op::Write => buf,
            _ => IoBuf::empty(),
        };
        let _slot = self.queue.admit(tag).await;
        slot.stats.in_flight.add(1);
        let r = m.submit(MemberIo { tag, buf: data }).await;
        slot.stats.in_flight.sub(1);
        match &r {
            Ok(()) => {
                slot.stats.completed.add(1);
                let counter = match op {
                    Op::Read => Some(&slot.stats.bytes_read),
                    Op::Write => Some(&slot.stats.bytes_written),
                    _ => None,
                };
                if let Some(ctr) = counter {
                    ctr.add(tag.len);
                }
            }
            Err(e) => {
                slot.stats.errors.add(1);
                tracing::warn!(member = %info.address, ?tag, error = %e, "member I/O failed");
            }
        }
        r
    }

    /// Stop accepting requests, flush every member and close them. Requests already
    /// running finish first (the frontends drain before calling this).
    pub async fn shutdown(&self) -> IoResult {
        let r = self.flush().await;
        self.closed.store(true, Ordering::Release);
        let r = r.and(self.write_superblocks(SbState::Clean).await);
        for m in &self.members {
            m.member().close();
        }
        r
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Member states, for status.
    pub fn member_states(&self) -> Vec<MemberState> {
        self.members.iter().map(|m| m.state()).collect()
    }
}

/// The part of `buf` a piece covers.
pub(crate) fn sub(buf: IoBuf, p: &Piece) -> IoBuf {
    debug_assert!(p.req_off + p.len <= buf.len() as u64);
    // SAFETY: the piece lies inside the request's buffer, which the request keeps alive.
    unsafe { IoBuf::from_raw(buf.as_ptr().add(p.req_off as usize), p.len as usize) }
}

/// A data-less buffer that still carries a length (trim and write-zeroes).
fn empty_of(len: u64) -> IoBuf {
    // SAFETY: never dereferenced: the dispatcher hands members an empty buffer for these
    // ops and only reads the length.
    unsafe { IoBuf::from_raw(std::ptr::NonNull::dangling().as_ptr(), len as usize) }
}

/// Shared handle used by frontends.
pub type ArrayRef = Arc<Array>;

/// Read a member's superblock block (raw; decode with `Superblock::decode`).
pub async fn read_superblock_block(pool: &BufPool, m: &dyn Member) -> IoResult<PoolBuf> {
    let mut b = pool
        .get(SB_SIZE)
        .await
        .ok_or_else(|| IoError::Invalid("no buffer for a superblock".into()))?;
    meta_io(m, Op::Read, IoBuf::from_slice(&mut b[..SB_SIZE])).await?;
    Ok(b)
}

/// Write a member's superblock and make it durable.
pub async fn write_superblock(pool: &BufPool, m: &dyn Member, sb: &Superblock) -> IoResult {
    let mut b = pool
        .get(SB_SIZE)
        .await
        .ok_or_else(|| IoError::Invalid("no buffer for a superblock".into()))?;
    sb.encode(&mut b[..SB_SIZE]);
    meta_io(m, Op::Write, IoBuf::from_slice(&mut b[..SB_SIZE])).await?;
    if m.info().caps.flush {
        meta_io(m, Op::Flush, IoBuf::empty()).await?;
    }
    Ok(())
}

/// Metadata I/O goes straight to the member, outside the array's queue.
async fn meta_io(m: &dyn Member, op: Op, buf: IoBuf) -> IoResult {
    let info = m.info();
    let tag = Tag {
        id: next_tag_id(),
        class: info.class,
        member: 0,
        proto: info.proto,
        op,
        offset: if op == Op::Flush { 0 } else { SB_OFFSET },
        len: buf.len() as u64,
        fua: false,
    };
    m.submit(MemberIo { tag, buf }).await
}
