//! Thin, blocking wrappers over the system calls a local member needs: block-device
//! ioctls, the O_DIRECT block-size probe, and the whole-job blocking path used by the
//! pread engine (and by both engines for device discard/zero-out, which io_uring lacks).
//! Every function returns a raw errno on failure; the caller adds the context.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use super::job::{Job, JobKind, MAX_CHUNK};

// Block-layer ioctls from <linux/fs.h>; libc only carries BLKSSZGET.
nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sszget, libc::BLKSSZGET, libc::c_int);
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blk_zeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// The two block-range ioctls a job can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlkIoctl {
    Discard,
    ZeroOut,
}

pub(crate) type Errno = i32;

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Size in bytes of the block device behind `file`.
pub(crate) fn blockdev_size(file: &File) -> std::io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    unsafe { blk_getsize64(file.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Logical block size of the block device behind `file`.
pub(crate) fn blockdev_block_size(file: &File) -> std::io::Result<u32> {
    let mut bs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    unsafe { blk_sszget(file.as_raw_fd(), &mut bs) }?;
    u32::try_from(bs).map_err(|_| std::io::Error::other(format!("negative block size {bs}")))
}

/// The smallest O_DIRECT unit a regular file accepts: 512 unless a 512-byte direct read
/// is refused (EINVAL), as on filesystems over 4Kn disks; then 4096. The buffer is a
/// page-aligned anonymous mapping so only the length/offset alignment is being tested.
pub(crate) fn probe_file_block_size(file: &File) -> std::io::Result<u32> {
    let mut buf = memmap2::MmapMut::map_anon(4096)?;
    // SAFETY: buf is a live, writable 4096-byte mapping; we read at most 512 bytes.
    let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), 512, 0) };
    if n >= 0 {
        return Ok(512);
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EINVAL) => Ok(4096),
        e => Err(e),
    }
}

/// Run a whole job with blocking system calls, completing short transfers.
pub(crate) fn run_blocking(fd: RawFd, job: Job) -> Result<(), Errno> {
    match job.kind {
        JobKind::Read => transfer(fd, job, false),
        JobKind::Write { dsync } => transfer(fd, job, dsync),
        JobKind::Sync => retry_eintr(|| unsafe { libc::fdatasync(fd) }),
        JobKind::Fallocate(mode) => fallocate(fd, mode, job.offset, job.len),
        JobKind::Blk(req) => blk_range(fd, req, job.offset, job.len),
    }
}

/// pread/pwritev2 in a loop until the whole range is done; 0 bytes moved is EIO (a read
/// past end of file, or a write that makes no progress), never a silent short success.
fn transfer(fd: RawFd, job: Job, dsync: bool) -> Result<(), Errno> {
    let mut done = 0u64;
    while done < job.len {
        let chunk = (job.len - done).min(MAX_CHUNK) as usize;
        let off = off_t(job.offset + done)?;
        // SAFETY: the issuer keeps buf..buf+len valid and exclusive until the job
        // completes (raidcore::IoBuf contract); done + chunk <= len.
        let ptr = unsafe { job.buf.as_ptr().add(done as usize) };
        let n = match job.kind {
            JobKind::Read => unsafe { libc::pread(fd, ptr.cast(), chunk, off) },
            _ => pwrite(fd, ptr, chunk, off, dsync),
        };
        match n {
            0 => return Err(libc::EIO),
            n if n > 0 => done += n as u64,
            _ => match last_errno() {
                libc::EINTR => continue,
                e => return Err(e),
            },
        }
    }
    Ok(())
}

fn pwrite(fd: RawFd, ptr: *mut u8, len: usize, off: libc::off_t, dsync: bool) -> isize {
    let iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: iov describes memory the issuer keeps valid (see transfer).
    unsafe { libc::pwritev2(fd, &iov, 1, off, flags) }
}

/// fallocate, turning an unsupported ZERO_RANGE into PUNCH_HOLE: both make the range
/// read back as zeroes, which is what WriteZeroes promises.
fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    let (off, len) = (off_t(offset)?, off_t(len)?);
    match retry_eintr(|| unsafe { libc::fallocate(fd, mode, off, len) }) {
        Err(libc::EOPNOTSUPP) if mode & libc::FALLOC_FL_ZERO_RANGE != 0 => {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            retry_eintr(|| unsafe { libc::fallocate(fd, punch, off, len) })
        }
        r => r,
    }
}

fn blk_range(fd: RawFd, req: BlkIoctl, offset: u64, len: u64) -> Result<(), Errno> {
    let range = [offset, len];
    // SAFETY: both ioctls read a [u64; 2] through the pointer, which is valid.
    let r = unsafe {
        match req {
            BlkIoctl::Discard => blk_discard(fd, &range),
            BlkIoctl::ZeroOut => blk_zeroout(fd, &range),
        }
    };
    r.map(drop).map_err(|e| e as Errno)
}

fn retry_eintr(mut f: impl FnMut() -> libc::c_int) -> Result<(), Errno> {
    loop {
        if f() >= 0 {
            return Ok(());
        }
        match last_errno() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

fn off_t(v: u64) -> Result<libc::off_t, Errno> {
    libc::off_t::try_from(v).map_err(|_| libc::EINVAL)
}

/// Add one to an eventfd's counter. Cannot block in practice (the counter would have to
/// reach 2^64-2) and can only fail on a bad descriptor, which the owner of `fd` rules
/// out, so the result is not checked.
pub(crate) fn eventfd_ring(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// A non-blocking eventfd, for the reactor to watch.
pub(crate) fn eventfd_nonblocking() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a valid descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Read (and so reset) a non-blocking eventfd's counter: true if it was non-zero.
pub(crate) fn eventfd_take(fd: RawFd) -> bool {
    let mut n: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64.
    let r = unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
    r == 8
}
