//! The fallback engine: each job runs as blocking system calls on tokio's blocking pool
//! (pread/pwritev2/fdatasync/fallocate/ioctl). Also used by the io_uring engine for the
//! block-device ioctls io_uring cannot issue.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::job::{Job, JobError, JobResult};
use super::sys;

/// Run `job` on the blocking pool and wait for it. Without a tokio runtime (a caller
/// polling with another executor) the job runs inline rather than panicking.
pub(crate) async fn run(file: &Arc<File>, job: Job) -> JobResult {
    let file = Arc::clone(file);
    let work = move || sys::run_blocking(file.as_raw_fd(), job).map_err(JobError::Errno);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => match rt.spawn_blocking(work).await {
            Ok(r) => r,
            // Cancelled: the runtime is shutting down and the job never started.
            Err(e) if e.is_cancelled() => Err(JobError::Shutdown),
            Err(_) => Err(JobError::Errno(libc::EIO)),
        },
        Err(_) => work(),
    }
}
