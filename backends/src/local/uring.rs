//! The io_uring engine: one ring and one thread per member.
//!
//! Callers (tokio tasks) push a job onto a lock-free queue and await a oneshot. The ring
//! thread sleeps in `submit_and_wait`, so it wakes on a completion or on the "doorbell":
//! an eventfd it keeps a read armed on. Callers only ring the doorbell when the thread has
//! announced it is going to sleep (`sleeping`), which keeps the common busy case free of
//! system calls on the caller side.
//!
//! The no-lost-wakeup argument (Dekker style, both sides use a SeqCst fence):
//!   caller: push job; fence; if sleeping { ring }
//!   thread: sleeping = true; fence; if queue non-empty { don't sleep }
//! Either the caller sees `sleeping` and rings, or the thread sees the job.
//!
//! Buffers: a job's reply is sent only after its last CQE has been reaped, so the kernel
//! never touches a buffer after its owner was told the I/O is done. On close the thread
//! waits for every submitted job (and its own doorbell read) before it exits.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

use super::job::{Job, JobError, JobKind, JobResult, MAX_CHUNK};
use super::sys;

/// Submission queue size. Jobs in flight are capped one below it so the SQ always has
/// room for every resubmission plus the doorbell read, and the CQ (twice the SQ) can
/// never overflow.
const ENTRIES: u32 = 256;
const MAX_IN_FLIGHT: usize = ENTRIES as usize - 1;
/// user_data of the doorbell read; job slots use their index.
const DOORBELL: u64 = u64::MAX;

struct Pending {
    job: Job,
    reply: oneshot::Sender<JobResult>,
}

/// What callers and the ring thread share.
struct Shared {
    queue: SegQueue<Pending>,
    doorbell: OwnedFd,
    /// The ring thread is (about to be) blocked and needs the doorbell for new work.
    sleeping: AtomicBool,
    /// close() was called: no new jobs start; the thread exits once idle.
    stopping: AtomicBool,
    /// The thread has exited: whoever sees this drains the queue (see `push`).
    dead: AtomicBool,
}

impl Shared {
    fn push(&self, p: Pending) {
        self.queue.push(p);
        fence(Ordering::SeqCst);
        if self.dead.load(Ordering::Relaxed) {
            // The thread is gone and close() may already have drained the queue; the
            // fence pairs with close()'s, so one of us is sure to see this job.
            self.fail_queued();
        } else if self.sleeping.load(Ordering::Relaxed) {
            sys::eventfd_ring(self.doorbell.as_raw_fd());
        }
    }

    fn fail_queued(&self) {
        while let Some(p) = self.queue.pop() {
            let _ = p.reply.send(Err(JobError::Shutdown));
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Handle on a running ring thread. Dropping it stops the thread.
pub(crate) struct Uring {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
    /// Set up a ring for `file` and start its thread (named `uring:<name>`).
    pub fn start(file: Arc<File>, name: &str) -> std::io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        check_opcodes(&ring).map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            queue: SegQueue::new(),
            doorbell: sys::eventfd()?,
            sleeping: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        });
        let worker = RingThread::new(ring, file, Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name(format!("uring:{name}"))
            .spawn(move || worker.run())?;
        Ok(Uring {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Run one job on the ring and wait for its completion.
    pub async fn run(&self, job: Job) -> JobResult {
        if self.shared.stopping() {
            return Err(JobError::Shutdown);
        }
        let (reply, done) = oneshot::channel();
        self.shared.push(Pending { job, reply });
        // A dropped sender means the job was discarded unstarted at shutdown.
        done.await.unwrap_or(Err(JobError::Shutdown))
    }

    /// Stop the thread once its in-flight jobs are complete, and join it. Queued jobs
    /// that never started fail with Shutdown. Idempotent; concurrent callers wait for
    /// the first one to finish.
    pub fn stop(&self) {
        let mut guard = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        let Some(thread) = guard.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        sys::eventfd_ring(self.shared.doorbell.as_raw_fd());
        if thread.join().is_err() {
            tracing::error!("io_uring thread panicked");
        }
        self.shared.dead.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.shared.fail_queued();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A job the kernel is working on, and how much of it is done (short transfers are
/// resubmitted from there).
struct Slot {
    pending: Pending,
    done: u64,
}

enum Next {
    Finish(JobResult),
    Resubmit,
}

struct RingThread {
    ring: IoUring,
    fd: types::Fd,
    /// Keeps the descriptor open while jobs are in flight.
    _file: Arc<File>,
    shared: Arc<Shared>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Target of the armed doorbell read; boxed so its address is stable.
    bell_buf: Box<u64>,
    bell_armed: bool,
    /// Reused completion batch (user_data, result).
    cqes: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(ring: IoUring, file: Arc<File>, shared: Arc<Shared>) -> Self {
        RingThread {
            ring,
            fd: types::Fd(file.as_raw_fd()),
            _file: file,
            shared,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            bell_buf: Box::new(0),
            bell_armed: false,
            cqes: Vec::with_capacity(2 * ENTRIES as usize),
        }
    }

    fn run(mut self) {
        loop {
            self.reap();
            self.take_new();
            if self.shared.stopping() && self.in_flight == 0 {
                break;
            }
            self.arm_doorbell();
            self.wait();
        }
        self.disarm_doorbell();
    }

    /// Start queued jobs while there is room; once stopping, fail them instead.
    fn take_new(&mut self) {
        if self.shared.stopping() {
            self.shared.fail_queued();
            return;
        }
        while self.in_flight < MAX_IN_FLIGHT {
            let Some(pending) = self.shared.queue.pop() else {
                break;
            };
            self.start(pending);
        }
    }

    fn start(&mut self, pending: Pending) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.slots[idx] = Some(Slot { pending, done: 0 });
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
        let job = &slot.pending.job;
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
            // SAFETY: the entry's buffer (a job's IoBuf, or bell_buf) stays valid until
            // its CQE is reaped: callers keep IoBufs alive until we reply, and we reply
            // only after the CQE; bell_buf lives until the thread exits, after its read
            // completed (disarm_doorbell).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            let _ = self.ring.submit();
        }
        false
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            if user_data == DOORBELL {
                self.bell_armed = false;
            } else {
                self.complete(user_data as usize, res);
            }
        }
        cqes.clear();
        self.cqes = cqes;
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
        if let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) {
            self.in_flight -= 1;
            self.free.push(idx);
            let _ = slot.pending.reply.send(result);
        }
    }

    /// Keep a read armed on the doorbell while running (not once stopping: the last
    /// one must be collected before exit, see disarm_doorbell).
    fn arm_doorbell(&mut self) {
        if self.bell_armed || self.shared.stopping() {
            return;
        }
        let ptr = (&mut *self.bell_buf as *mut u64).cast::<u8>();
        let entry = opcode::Read::new(types::Fd(self.shared.doorbell.as_raw_fd()), ptr, 8)
            .build()
            .user_data(DOORBELL);
        self.bell_armed = self.push_sqe(&entry);
    }

    /// Submit what is queued and sleep until a completion (or a doorbell) arrives,
    /// unless new work slipped in while we were deciding to sleep.
    fn wait(&mut self) {
        let wants_doorbell = self.in_flight < MAX_IN_FLIGHT && !self.shared.stopping();
        if wants_doorbell {
            self.shared.sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if !self.shared.queue.is_empty() {
                self.shared.sleeping.store(false, Ordering::Relaxed);
                self.enter(0);
                return;
            }
        }
        self.enter(1);
        self.shared.sleeping.store(false, Ordering::Relaxed);
    }

    fn enter(&mut self, want: usize) {
        let Err(e) = self.ring.submit_and_wait(want) else {
            return;
        };
        match e.raw_os_error() {
            // Interrupted, or the CQ needs reaping first: the loop reaps and retries.
            Some(libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
            _ => {
                tracing::error!("io_uring_enter failed: {e}; retrying");
                // Not expected on a healthy ring; back off rather than spin.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Collect our own doorbell read so the kernel holds no pointer into this thread's
    /// memory when the ring is torn down.
    fn disarm_doorbell(&mut self) {
        if self.bell_armed {
            sys::eventfd_ring(self.shared.doorbell.as_raw_fd());
        }
        while self.bell_armed {
            self.enter(1);
            self.reap();
        }
    }
}

/// Account one CQE against its slot: finish on error, EOF or completion; resubmit the
/// remainder of a short transfer.
fn progress(slot: &mut Slot, res: i32) -> Next {
    let job = &mut slot.pending.job;
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

    fn slot(kind: JobKind, len: u64) -> (Slot, oneshot::Receiver<JobResult>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            kind,
            offset: 4096,
            len,
            buf: IoBuf::empty(),
        };
        (
            Slot {
                pending: Pending { job, reply },
                done: 0,
            },
            rx,
        )
    }

    #[test]
    fn short_transfers_are_resubmitted_until_complete() {
        let (mut s, _rx) = slot(JobKind::Read, 12288);
        assert!(matches!(progress(&mut s, 4096), Next::Resubmit));
        assert_eq!(s.done, 4096);
        assert!(matches!(progress(&mut s, 4096), Next::Resubmit));
        assert!(matches!(progress(&mut s, 4096), Next::Finish(Ok(()))));
        assert_eq!(s.done, 12288);
    }

    #[test]
    fn zero_bytes_is_eio_never_a_short_success() {
        for kind in [JobKind::Read, JobKind::Write { dsync: true }] {
            let (mut s, _rx) = slot(kind, 8192);
            assert!(matches!(progress(&mut s, 4096), Next::Resubmit));
            assert!(matches!(
                progress(&mut s, 0),
                Next::Finish(Err(JobError::Errno(libc::EIO)))
            ));
        }
    }

    #[test]
    fn negative_results_become_errnos() {
        let (mut s, _rx) = slot(JobKind::Write { dsync: false }, 4096);
        assert!(matches!(
            progress(&mut s, -libc::ENOSPC),
            Next::Finish(Err(JobError::Errno(libc::ENOSPC)))
        ));
        let (mut s, _rx) = slot(JobKind::Sync, 0);
        assert!(matches!(progress(&mut s, 0), Next::Finish(Ok(()))));
    }

    #[test]
    fn unsupported_zero_range_falls_back_to_punching_a_hole() {
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let (mut s, _rx) = slot(JobKind::Fallocate(zero), 4096);
        assert!(matches!(
            progress(&mut s, -libc::EOPNOTSUPP),
            Next::Resubmit
        ));
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(s.pending.job.kind, JobKind::Fallocate(punch));
        // Punching unsupported too: report it, do not loop.
        assert!(matches!(
            progress(&mut s, -libc::EOPNOTSUPP),
            Next::Finish(Err(JobError::Errno(libc::EOPNOTSUPP)))
        ));
    }
}
