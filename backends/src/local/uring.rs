//! The io_uring engine: one ring per member, no thread of its own.
//!
//! Callers submit: a tokio task locks the ring, queues its SQE and enters the kernel once
//! (for O_DIRECT the block layer gets the bio right there). Completions come back through
//! an eventfd registered with the ring and watched by the runtime's reactor: a reaper task
//! per member drains the CQ and answers each caller through its slot's reusable cell
//! (cells.rs). A request therefore costs
//! one wake-up (the reactor seeing the eventfd) instead of the two thread hand-offs of a
//! ring thread (doorbell to the thread, completion back to the runtime), which at queue
//! depth 1 were most of a 4 KiB read's latency.
//!
//! A busy frontend does not wait for that wake-up: every submitting thread `watch`es the
//! ring (raidcore::plug) and the NBD server `collect`s before it polls its requests, so
//! completions already in the CQ (the kernel posts them in the submitting thread, on its
//! way back from a system call) are answered in the same pass. Same-run A/B, raid1 of
//! two files, 4k randread QD32x2: 6.1 instead of 7.9 us of daemon CPU per read.
//!
//! The reaper is spawned on the runtime of the first caller (or on the one named by
//! [`set_reaper_runtime`]: the daemon's own, as its NBD connections run on threads of
//! their own) and again whenever the previous one is gone (its runtime shut down).
//! Outside any tokio runtime a job runs as blocking system calls instead.
//!
//! Buffers: a job's reply is sent only after its last CQE has been reaped, so the kernel
//! never touches a buffer after its owner was told the I/O is done. Stopping waits for
//! every submitted job; the ring is closed only with nothing in flight.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Semaphore;

use super::cells::Cells;
use super::job::{Job, JobError, JobKind, JobResult, MAX_CHUNK};
use super::sys;

/// Submission queue size; jobs in flight are capped below it (a semaphore), so a push
/// never finds the SQ full and the CQ (twice the SQ) never overflows.
const ENTRIES: u32 = 256;
const MAX_IN_FLIGHT: usize = ENTRIES as usize - 1;

/// A job the kernel is working on, and how much of it is done (short transfers are
/// resubmitted from there). Its index in `Ring::slots` is its cell's.
struct Slot {
    job: Job,
    done: u64,
}

enum Next {
    Finish(JobResult),
    Resubmit,
}

/// The ring and its jobs, under one lock: io_uring's SQ has a single producer.
struct Ring {
    ring: IoUring,
    fd: types::Fd,
    /// One per cell; Some while the job is in the kernel.
    slots: Vec<Option<Slot>>,
    /// The same cells as `Inner::cells`: the ring fills them, callers empty them.
    cells: Arc<Cells>,
    in_flight: usize,
    /// Reused completion batch (user_data, result).
    cqes: Vec<(u64, i32)>,
}

struct Inner {
    ring: Mutex<Ring>,
    /// Results on their way to callers, outside the ring lock.
    cells: Arc<Cells>,
    slots: Arc<Semaphore>,
    /// Registered with the ring: counts completions; the reaper waits on it.
    completions: OwnedFd,
    /// Keeps the descriptor open while jobs are in flight.
    file: Arc<File>,
    stopping: AtomicBool,
    reaper_alive: AtomicBool,
    name: String,
}

/// Handle on a member's ring. Dropping it stops it.
pub(crate) struct Uring {
    inner: Arc<Inner>,
}

/// Whether this kernel offers io_uring with every opcode the engine uses.
pub(crate) fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    check_opcodes(&ring)
}

fn check_opcodes(ring: &IoUring) -> Result<(), String> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe io_uring opcodes: {e}"))?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ];
    match needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some((_, name)) => Err(format!("the kernel lacks IORING_OP_{name}")),
        None => Ok(()),
    }
}

impl Uring {
    /// Set up a ring for `file` (`name` labels its log lines).
    pub fn start(file: Arc<File>, name: &str) -> std::io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        check_opcodes(&ring).map_err(std::io::Error::other)?;
        let completions = sys::eventfd_nonblocking()?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        let fd = types::Fd(file.as_raw_fd());
        let cells = Arc::new(Cells::new(MAX_IN_FLIGHT));
        Ok(Uring {
            inner: Arc::new(Inner {
                ring: Mutex::new(Ring {
                    ring,
                    fd,
                    slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
                    cells: cells.clone(),
                    in_flight: 0,
                    cqes: Vec::with_capacity(2 * ENTRIES as usize),
                }),
                cells,
                slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                completions,
                file,
                stopping: AtomicBool::new(false),
                reaper_alive: AtomicBool::new(false),
                name: name.to_string(),
            }),
        })
    }

    /// Run one job on the ring and wait for its completion.
    pub async fn run(&self, job: Job) -> JobResult {
        let inner = &self.inner;
        if inner.stopping() {
            return Err(JobError::Shutdown);
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No reactor to hear completions on: do it the blocking way.
            return sys::run_blocking(inner.file.as_raw_fd(), job).map_err(JobError::Errno);
        };
        inner.ensure_reaper(&rt);
        let Ok(permit) = inner.slots.clone().acquire_owned().await else {
            return Err(JobError::Shutdown);
        };
        let cell = {
            let mut ring = inner.lock();
            // Checked under the lock stop() drains under, so no job slips in after.
            if inner.stopping() {
                return Err(JobError::Shutdown);
            }
            // Cells in use never outnumber permits (cells.rs), so one is free.
            let Some(cell) = inner.cells.take() else {
                return Err(JobError::Errno(libc::EAGAIN));
            };
            ring.start(cell, job);
            // Under a plug the SQE waits for the batch (see Inner::ring); else in now.
            if !raidcore::plug::defer(inner) {
                ring.enter(0);
            }
            cell
        };
        // Here, not before the permit's await: the job may have moved to another thread,
        // and the one that submits is the one whose collect() should look at the ring.
        raidcore::plug::watch(inner);
        inner.cells.wait(cell, permit).await
    }

    /// Refuse new jobs and wait (blocking) until every submitted one is complete.
    /// Idempotent.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.slots.close();
        self.inner.drain();
        // Wake the reaper so it sees there is nothing left and ends.
        sys::eventfd_ring(self.inner.completions.as_raw_fd());
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The plug's doorbell: one io_uring_enter for every SQE queued under it.
impl raidcore::plug::Doorbell for Inner {
    fn ring(self: Arc<Self>) {
        let mut ring = self.lock();
        if !ring.ring.submission().is_empty() {
            ring.enter(0);
        }
    }
}

/// Reaping from a frontend's thread: skipped while another holds the ring (the reaper or
/// a submitter, who will see the completions anyway), so a frontend never waits here.
impl raidcore::plug::Completions for Inner {
    fn collect(&self) {
        if let Ok(mut ring) = self.ring.try_lock() {
            ring.reap();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Start a reaper on `rt` (or the process's reaper runtime, if one was named) unless
    /// one is running.
    fn ensure_reaper(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        if self.reaper_alive.load(Ordering::Acquire) {
            return;
        }
        if self.reaper_alive.swap(true, Ordering::AcqRel) {
            return;
        }
        let rt = REAPER_RUNTIME.get().unwrap_or(rt);
        let _enter = rt.enter();
        let watched = EventFd(self.completions.as_raw_fd());
        // SAFETY: the descriptor is `completions`, owned by `Inner`, which the reaper keeps
        // alive (Reaper::inner) for longer than the AsyncFd (dropped first, see Reaper).
        match unsafe { AsyncFd::register_with_interest(watched, Interest::READABLE) } {
            Ok(fd) => {
                let reaper = Reaper {
                    fd,
                    inner: Arc::clone(self),
                };
                rt.spawn(reaper.run());
            }
            Err(e) => {
                let e = e.into_parts().1;
                // Not expected (epoll refusing an eventfd); jobs would never complete.
                tracing::error!(member = %self.name, "cannot watch io_uring completions: {e}");
                self.reaper_alive.store(false, Ordering::Release);
            }
        }
    }

    /// Block until nothing is in flight (stop, and the last drop).
    fn drain(&self) {
        loop {
            let mut ring = self.lock();
            ring.reap();
            if ring.in_flight == 0 {
                return;
            }
            drop(ring);
            // The reaper may be busy or gone (runtime shut down): poll the CQ here.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

static REAPER_RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Run every member's reaper on `rt` rather than on the runtime of its first caller (the
/// daemon names its own multi-threaded runtime; frontends may run on threads of their
/// own). Takes effect for reapers started after it; only the first call counts.
pub fn set_reaper_runtime(rt: tokio::runtime::Handle) {
    let _ = REAPER_RUNTIME.set(rt);
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The kernel must hold no pointer into a caller's buffer when the ring closes.
        self.drain();
    }
}

/// The registered eventfd as the reactor sees it (owned by `Inner`).
struct EventFd(RawFd);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The task that answers completions. Fields drop in order: the AsyncFd before the
/// `Inner` that owns its descriptor.
struct Reaper {
    fd: AsyncFd<EventFd>,
    inner: Arc<Inner>,
}

impl Reaper {
    /// Drain completions whenever the eventfd says there are some; end once stopped and
    /// idle. Marks itself gone (Drop) when it ends or is dropped with its runtime.
    async fn run(self) {
        let inner = &self.inner;
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return;
            };
            // Reset the counter before draining, so a completion posted after the drain
            // makes it readable again; clear_ready keeps readiness that arrived since
            // `readable` returned, so no completion is missed.
            sys::eventfd_take(inner.completions.as_raw_fd());
            ready.clear_ready();
            let idle = {
                let mut ring = inner.lock();
                ring.reap();
                ring.in_flight == 0
            };
            if idle && inner.stopping() {
                return;
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.inner.reaper_alive.store(false, Ordering::Release);
    }
}

impl Ring {
    /// Submit `job` in the slot of the cell its caller took.
    fn start(&mut self, idx: usize, job: Job) {
        self.slots[idx] = Some(Slot { job, done: 0 });
        self.in_flight += 1;
        self.submit_slot(idx);
    }

    /// Queue the (remaining part of the) slot's job; fail the job if it cannot be.
    fn submit_slot(&mut self, idx: usize) {
        let entry = match self.slots.get(idx) {
            Some(Some(slot)) => self.entry(idx, slot),
            _ => return,
        };
        let result = match entry {
            Some(e) if self.push_sqe(&e) => return,
            Some(_) => Err(JobError::Errno(libc::EAGAIN)),
            // Block ioctls never reach the ring (the member runs them blocking).
            None => Err(JobError::Errno(libc::EINVAL)),
        };
        self.finish(idx, result);
    }

    fn entry(&self, idx: usize, slot: &Slot) -> Option<squeue::Entry> {
        let job = &slot.job;
        let len = (job.len - slot.done).min(MAX_CHUNK) as u32;
        let off = job.offset + slot.done;
        // done <= len <= buf.len(), so this stays inside the caller's buffer.
        let ptr = job.buf.as_ptr().wrapping_add(slot.done as usize);
        let entry = match job.kind {
            JobKind::Read => opcode::Read::new(self.fd, ptr, len).offset(off).build(),
            JobKind::Write { dsync } => opcode::Write::new(self.fd, ptr, len)
                .offset(off)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            JobKind::Sync => opcode::Fsync::new(self.fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            JobKind::Fallocate(mode) => opcode::Fallocate::new(self.fd, job.len)
                .offset(job.offset)
                .mode(mode)
                .build(),
            JobKind::Blk(_) => return None,
        };
        Some(entry.user_data(idx as u64))
    }

    /// Push one SQE, flushing the SQ to the kernel once if it is full.
    fn push_sqe(&mut self, entry: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: the entry's buffer (a job's IoBuf) stays valid until its CQE is
            // reaped: callers keep IoBufs alive until we reply, and we reply only after
            // the CQE; the ring is closed only with nothing in flight (Inner::drop).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            self.enter(0);
        }
        false
    }

    /// Hand queued SQEs to the kernel (and, with `want`, wait for that many CQEs).
    fn enter(&mut self, want: usize) {
        let Err(e) = self.ring.submit_and_wait(want) else {
            return;
        };
        match e.raw_os_error() {
            // Interrupted, or the kernel is short of memory or needs the CQ reaped: the
            // SQEs stay queued and go with the next enter (the reaper enters after every
            // drain that resubmits, and every new job enters).
            Some(libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
            _ => tracing::error!("io_uring_enter failed: {e}"),
        }
    }

    /// Answer every completed job; resubmit the rest of short transfers.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            self.complete(user_data as usize, res);
        }
        let resubmitted = !cqes.is_empty() && !self.ring.submission().is_empty();
        cqes.clear();
        self.cqes = cqes;
        if resubmitted {
            self.enter(0);
        }
    }

    fn complete(&mut self, idx: usize, res: i32) {
        let Some(Some(slot)) = self.slots.get_mut(idx) else {
            tracing::warn!(idx, res, "io_uring completion for an unknown slot");
            return;
        };
        match progress(slot, res) {
            Next::Finish(result) => self.finish(idx, result),
            Next::Resubmit => self.submit_slot(idx),
        }
    }

    fn finish(&mut self, idx: usize, result: JobResult) {
        if self.slots.get_mut(idx).and_then(Option::take).is_some() {
            self.in_flight -= 1;
            self.cells.finish(idx, result);
        }
    }
}

/// Account one CQE against its slot: finish on error, EOF or completion; resubmit the
/// remainder of a short transfer.
fn progress(slot: &mut Slot, res: i32) -> Next {
    let job = &mut slot.job;
    if res < 0 {
        return match job.kind {
            // Some filesystems lack ZERO_RANGE; a punched hole reads back as zeroes too.
            JobKind::Fallocate(mode)
                if -res == libc::EOPNOTSUPP && mode & libc::FALLOC_FL_ZERO_RANGE != 0 =>
            {
                job.kind =
                    JobKind::Fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
                Next::Resubmit
            }
            _ => Next::Finish(Err(JobError::Errno(-res))),
        };
    }
    match job.kind {
        JobKind::Read | JobKind::Write { .. } => {
            if res == 0 {
                // Past end of file (read) or no progress (write): never a short success.
                return Next::Finish(Err(JobError::Errno(libc::EIO)));
            }
            slot.done += res as u64;
            if slot.done < job.len {
                Next::Resubmit
            } else {
                Next::Finish(Ok(()))
            }
        }
        _ => Next::Finish(Ok(())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raidcore::IoBuf;

    fn slot(kind: JobKind, len: u64) -> Slot {
        let job = Job {
            kind,
            offset: 4096,
            len,
            buf: IoBuf::empty(),
        };
        Slot { job, done: 0 }
    }

    #[test]
    fn short_transfers_are_resubmitted_until_complete() {
        let mut s = slot(JobKind::Read, 12288);
        assert!(matches!(progress(&mut s, 4096), Next::Resubmit));
        assert_eq!(s.done, 4096);
        assert!(matches!(progress(&mut s, 4096), Next::Resubmit));
        assert!(matches!(progress(&mut s, 4096), Next::Finish(Ok(()))));
        assert_eq!(s.done, 12288);
    }

    #[test]
    fn zero_bytes_is_eio_never_a_short_success() {
        for kind in [JobKind::Read, JobKind::Write { dsync: true }] {
            let mut s = slot(kind, 8192);
            assert!(matches!(progress(&mut s, 4096), Next::Resubmit));
            assert!(matches!(
                progress(&mut s, 0),
                Next::Finish(Err(JobError::Errno(libc::EIO)))
            ));
        }
    }

    #[test]
    fn negative_results_become_errnos() {
        let mut s = slot(JobKind::Write { dsync: false }, 4096);
        assert!(matches!(
            progress(&mut s, -libc::ENOSPC),
            Next::Finish(Err(JobError::Errno(libc::ENOSPC)))
        ));
        let mut s = slot(JobKind::Sync, 0);
        assert!(matches!(progress(&mut s, 0), Next::Finish(Ok(()))));
    }

    #[test]
    fn unsupported_zero_range_falls_back_to_punching_a_hole() {
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let mut s = slot(JobKind::Fallocate(zero), 4096);
        assert!(matches!(
            progress(&mut s, -libc::EOPNOTSUPP),
            Next::Resubmit
        ));
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(s.job.kind, JobKind::Fallocate(punch));
        // Punching unsupported too: report it, do not loop.
        assert!(matches!(
            progress(&mut s, -libc::EOPNOTSUPP),
            Next::Finish(Err(JobError::Errno(libc::EOPNOTSUPP)))
        ));
    }
}
