//! A member I/O reduced to what an engine executes: one system-call-shaped job. Both
//! engines (io_uring and pread) take the same `Job`, so the choice of engine changes how a
//! job runs, never what it does.

use raidcore::IoBuf;

use super::sys::{BlkIoctl, Errno};

/// The most bytes handed to one read/write call. io_uring lengths are 32-bit; a larger
/// request is simply run as consecutive chunks, like a short transfer. A multiple of
/// every block size, so chunk boundaries stay O_DIRECT aligned.
pub(crate) const MAX_CHUNK: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    Read,
    /// `dsync` = RWF_DSYNC: the write is durable when it completes (FUA).
    Write {
        dsync: bool,
    },
    /// fdatasync.
    Sync,
    /// fallocate with this mode (punch hole / zero range), regular files only.
    Fallocate(i32),
    /// Block-range ioctl, block devices only; always run blocking.
    Blk(BlkIoctl),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub kind: JobKind,
    pub offset: u64,
    pub len: u64,
    /// Data for Read/Write; empty otherwise.
    pub buf: IoBuf,
}

impl Job {
    pub fn sync() -> Self {
        Job {
            kind: JobKind::Sync,
            offset: 0,
            len: 0,
            buf: IoBuf::empty(),
        }
    }
}

/// Why a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobError {
    /// The system call (or CQE) reported this errno.
    Errno(Errno),
    /// The member was closed before the job ran.
    Shutdown,
}

pub(crate) type JobResult = Result<(), JobError>;
