//! Local members: a regular file (`file:/path`) or a block device (`dev:/dev/xxx`),
//! opened O_RDWR | O_DIRECT | O_CLOEXEC.
//!
//! Two engines run the I/O: io_uring (one ring per member, completions through the
//! runtime's reactor, see `uring`) and a pread/pwrite fallback on tokio's blocking pool
//! (see `pread`). [`Engine::Auto`] is the
//! process-wide choice made once, at the first open, and logged: io_uring unless
//! `UNIBLK_NO_IO_URING=1` is set or the kernel lacks it.
//!
//! The scheme in the address is a hint, not a promise: the type found on disk decides.
//! A regular file named as `dev:` is served as a file, and a block device named as
//! `file:` as a block device (so discard and zeroing use the right system calls); either
//! way `info().address` keeps the text the user wrote.

mod cells;
mod job;
mod pread;
mod sys;
mod uring;

pub use uring::set_reaper_runtime;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use raidcore::{
    Caps, Class, IoError, IoFuture, IoResult, Member, MemberInfo, MemberIo, Op, Proto, Tag,
};

use crate::addr::OpenError;
use job::{Job, JobError, JobKind, JobResult};
use sys::BlkIoctl;

/// Which engine serves a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The process-wide start-up choice (see [`default_engine`]).
    Auto,
    /// io_uring; opening fails if the kernel does not offer it.
    IoUring,
    /// Blocking pread/pwrite on tokio's blocking pool.
    Pread,
}

/// The engine [`Engine::Auto`] resolves to. Decided once per process, on first use, and
/// logged with the reason.
pub fn default_engine() -> Engine {
    static CHOICE: OnceLock<Engine> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let (engine, why) = choose_engine();
        tracing::info!(
            "local members use the {} engine: {why}",
            engine_name(engine)
        );
        engine
    })
}

fn choose_engine() -> (Engine, String) {
    if std::env::var_os("UNIBLK_NO_IO_URING").is_some_and(|v| v == "1") {
        return (Engine::Pread, "UNIBLK_NO_IO_URING=1 is set".into());
    }
    match uring::probe() {
        Ok(()) => (Engine::IoUring, "io_uring is available".into()),
        Err(why) => (Engine::Pread, format!("io_uring is unavailable ({why})")),
    }
}

fn engine_name(engine: Engine) -> &'static str {
    match engine {
        Engine::IoUring => "io_uring",
        _ => "pread",
    }
}

enum Runner {
    Uring(uring::Uring),
    Pread,
}

/// A local file or block device serving as an array member.
pub struct LocalMember {
    info: MemberInfo,
    file: Arc<File>,
    runner: Runner,
    closed: AtomicBool,
}

/// What the open found on disk.
struct Found {
    file: File,
    proto: Proto,
    size: u64,
    block_size: u32,
}

impl LocalMember {
    /// Open `path` with the start-up engine; the address is `file:` or `dev:` + path,
    /// by the type found. Blocking (open, stat, a probe read): call it off the runtime
    /// threads, e.g. via `spawn_blocking`, as [`crate::addr::open`] does.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(path, Engine::Auto)
    }

    /// As [`open`](Self::open), with an explicit engine.
    pub fn open_with(path: impl AsRef<Path>, engine: Engine) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let scheme = match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => "dev",
            _ => "file",
        };
        Self::open_as(&format!("{scheme}:{}", path.display()), path, engine)
    }

    /// Open `path`, reporting `address` (the text the user wrote) in `info()` and in
    /// every error.
    pub fn open_as(address: &str, path: &Path, engine: Engine) -> Result<Self, OpenError> {
        let found = open_storage(address, path)?;
        let file = Arc::new(found.file);
        let (runner, name) = start_engine(address, path, &file, engine)?;
        let info = MemberInfo {
            address: address.to_string(),
            class: Class::Local,
            proto: found.proto,
            size: found.size,
            block_size: found.block_size,
            caps: Caps {
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true,
            },
            engine: name,
        };
        Ok(LocalMember {
            info,
            file,
            runner,
            closed: AtomicBool::new(false),
        })
    }

    async fn perform(&self, io: MemberIo) -> IoResult {
        if self.closed.load(Ordering::Acquire) {
            return Err(IoError::Shutdown);
        }
        self.validate(&io)?;
        let Some(job) = self.job_for(&io) else {
            return Ok(());
        };
        self.run(job).await.map_err(|e| self.error(&io.tag, e))?;
        // fallocate/ioctl have no FUA flag: make the result durable explicitly.
        if io.tag.fua && matches!(io.tag.op, Op::Trim | Op::WriteZeroes) {
            self.run(Job::sync())
                .await
                .map_err(|e| self.error(&io.tag, e))?;
        }
        Ok(())
    }

    /// O_DIRECT would fail (or, on some filesystems, silently bounce) misaligned I/O.
    /// The core guarantees alignment and range, so a violation is a bug upstream: loud
    /// in debug builds, an error in release ones, never handed to the kernel.
    fn validate(&self, io: &MemberIo) -> IoResult {
        let t = &io.tag;
        if t.op == Op::Flush {
            return Ok(());
        }
        let data = matches!(t.op, Op::Read | Op::Write);
        let bs = u64::from(self.info.block_size);
        let buf_ok = !data || (io.buf.as_ptr() as usize as u64).is_multiple_of(bs);
        let aligned = t.offset.is_multiple_of(bs) && t.len.is_multiple_of(bs) && buf_ok;
        // Unit tests feed misaligned I/O on purpose (see tests.rs).
        debug_assert!(
            aligned || cfg!(test),
            "misaligned I/O reached {}: {t:?}",
            self.info.address
        );
        if !aligned {
            return Err(IoError::Invalid(format!(
                "{}: {:?} at {} length {} (buffer {:p}) is not aligned to its {bs}-byte blocks",
                self.info.address,
                t.op,
                t.offset,
                t.len,
                io.buf.as_ptr()
            )));
        }
        if data && (io.buf.len() as u64) < t.len {
            return Err(IoError::Invalid(format!(
                "{}: {:?} at {} length {} with a buffer of only {} bytes",
                self.info.address,
                t.op,
                t.offset,
                t.len,
                io.buf.len()
            )));
        }
        match t.offset.checked_add(t.len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset: t.offset,
                len: t.len,
                size: self.info.size,
            }),
        }
    }

    /// The job for a validated I/O; None when there is nothing to do (zero length).
    fn job_for(&self, io: &MemberIo) -> Option<Job> {
        let t = &io.tag;
        let blockdev = self.info.proto == Proto::Blockdev;
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let kind = match t.op {
            Op::Flush => return Some(Job::sync()),
            _ if t.len == 0 => return None,
            Op::Read => JobKind::Read,
            Op::Write => JobKind::Write { dsync: t.fua },
            Op::Trim if blockdev => JobKind::Blk(BlkIoctl::Discard),
            Op::Trim => JobKind::Fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep),
            Op::WriteZeroes if blockdev => JobKind::Blk(BlkIoctl::ZeroOut),
            Op::WriteZeroes => JobKind::Fallocate(libc::FALLOC_FL_ZERO_RANGE | keep),
        };
        Some(Job {
            kind,
            offset: t.offset,
            len: t.len,
            buf: io.buf,
        })
    }

    async fn run(&self, job: Job) -> JobResult {
        match &self.runner {
            // io_uring has no discard/zero-out ioctl; those go to the blocking pool.
            Runner::Uring(ring) if !matches!(job.kind, JobKind::Blk(_)) => ring.run(job).await,
            _ => pread::run(&self.file, job).await,
        }
    }

    fn error(&self, t: &Tag, e: JobError) -> IoError {
        match e {
            JobError::Shutdown => IoError::Shutdown,
            JobError::Errno(errno) => IoError::from_errno(
                &format!("{}: {:?} at {}", self.info.address, t.op, t.offset),
                errno,
            ),
        }
    }
}

impl Member for LocalMember {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        raidcore::io_future(self.perform(io))
    }

    /// Stop the ring (waiting for its in-flight I/O to complete). Idempotent;
    /// also done on drop. Later submissions fail with `IoError::Shutdown`.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Runner::Uring(ring) = &self.runner {
            ring.stop();
        }
    }
}

impl Drop for LocalMember {
    fn drop(&mut self) {
        self.close();
    }
}

/// Open the path O_DIRECT and learn its type, size and block size.
fn open_storage(address: &str, path: &Path) -> Result<Found, OpenError> {
    let open_err = |error: std::io::Error| OpenError::open(address, path, error);
    // Stat first so a directory or a FIFO gets a clear error instead of whatever
    // open(O_DIRECT) happens to say about it.
    let ft = std::fs::metadata(path).map_err(open_err)?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(OpenError::NotStorage {
            addr: address.to_string(),
            what: describe_type(&ft),
        });
    }
    // std adds O_CLOEXEC itself.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(open_err)?;
    let (proto, raw_size, block_size) = measure(address, &file)?;
    // A trailing partial block cannot be addressed with O_DIRECT; leave it out.
    let size = raw_size - raw_size % u64::from(block_size);
    if size == 0 {
        return Err(OpenError::Empty {
            addr: address.to_string(),
            path: path.display().to_string(),
            block_size,
        });
    }
    Ok(Found {
        file,
        proto,
        size,
        block_size,
    })
}

/// Type, size in bytes and logical block size of an open file or device. The type is
/// taken from the descriptor: the path may have been replaced since it was checked.
fn measure(address: &str, file: &File) -> Result<(Proto, u64, u32), OpenError> {
    let query_err = |what: &'static str| {
        move |error: std::io::Error| OpenError::Query {
            addr: address.to_string(),
            what,
            error,
        }
    };
    let meta = file.metadata().map_err(query_err("type"))?;
    let (proto, size, block_size) = if meta.file_type().is_block_device() {
        let size = sys::blockdev_size(file).map_err(query_err("size"))?;
        let bs = sys::blockdev_block_size(file).map_err(query_err("logical block size"))?;
        (Proto::Blockdev, size, bs)
    } else {
        let bs = sys::probe_file_block_size(file).map_err(query_err("direct I/O block size"))?;
        (Proto::File, meta.len(), bs)
    };
    check_block_size(address, block_size)?;
    Ok((proto, size, block_size))
}

/// Block sizes are powers of two from 512 to 64 KiB; anything else is a broken device
/// and would make every alignment check meaningless.
fn check_block_size(address: &str, block_size: u32) -> Result<(), OpenError> {
    if block_size.is_power_of_two() && (512..=65536).contains(&block_size) {
        return Ok(());
    }
    Err(OpenError::Query {
        addr: address.to_string(),
        what: "logical block size",
        error: std::io::Error::other(format!("implausible value {block_size}")),
    })
}

fn describe_type(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Start the requested engine. Auto falls back to pread when this member's ring cannot
/// be set up (e.g. memlock limits on older kernels) even though the start-up probe
/// succeeded; an explicit IoUring request fails instead.
fn start_engine(
    address: &str,
    path: &Path,
    file: &Arc<File>,
    engine: Engine,
) -> Result<(Runner, &'static str), OpenError> {
    let resolved = match engine {
        Engine::Auto => default_engine(),
        e => e,
    };
    if resolved == Engine::Pread {
        return Ok((Runner::Pread, "pread"));
    }
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    match uring::Uring::start(Arc::clone(file), &name) {
        Ok(ring) => Ok((Runner::Uring(ring), "io_uring")),
        Err(error) if engine == Engine::Auto => {
            tracing::warn!("{address}: io_uring set-up failed ({error}); using the pread engine");
            Ok((Runner::Pread, "pread"))
        }
        Err(error) => Err(OpenError::Engine {
            addr: address.to_string(),
            error,
        }),
    }
}
