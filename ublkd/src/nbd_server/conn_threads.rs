//! Connection threads: each NBD connection lives on one thread of its own choosing for
//! its whole life, in a single-threaded tokio runtime, with its socket registered there.
//!
//! Why not the daemon's work-stealing runtime: a connection is one task (its requests run
//! inside it, see `in_flight.rs`), so stealing cannot split it, only move it, and wake
//! the other worker to do so (futex, condvar parking in perf). One worker instead of two
//! cut the daemon's CPU per 4k read by about a fifth but holds the daemon to one core.
//! Here each connection keeps one thread, and connections are dealt round-robin over as
//! many threads as there are CPUs.
//! Large requests, whose copies are worth running in parallel, still go to the daemon's
//! runtime (see `transmission::start`).
//!
//! `UNIBLK_NBD_THREADS=N` sets the number of threads; `0` serves connections on the
//! daemon's runtime as before.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The threads' runtimes, in the order connections are dealt to them.
pub struct ConnThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl ConnThreads {
    /// The process's connection threads, started on first use. None when configured off
    /// or when no thread could be started (connections then stay on the caller's runtime).
    pub fn get() -> Option<&'static ConnThreads> {
        static THREADS: OnceLock<Option<ConnThreads>> = OnceLock::new();
        THREADS.get_or_init(|| Self::start(thread_count())).as_ref()
    }

    fn start(n: usize) -> Option<ConnThreads> {
        let handles: Vec<Handle> = (0..n).filter_map(start_thread).collect();
        if handles.is_empty() {
            return None;
        }
        tracing::info!(
            threads = handles.len(),
            "NBD connections run on their own threads"
        );
        Some(ConnThreads {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Run `fut` on the next thread.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        drop(self.handles[i].spawn(fut));
    }
}

fn thread_count() -> usize {
    match std::env::var("UNIBLK_NBD_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => n.min(256),
            Err(_) => {
                tracing::warn!(value = %v, "UNIBLK_NBD_THREADS is not a number of threads; using one per CPU");
                cpus()
            }
        },
        Err(_) => cpus(),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Start thread `i` and return its runtime's handle.
fn start_thread(i: usize) -> Option<Handle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{i}"))
        .spawn(move || {
            crate::daemon::mark_io_flusher();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!("cannot start NBD connection thread {i}: {e}");
                    return;
                }
            };
            let _ = tx.send(rt.handle().clone());
            // Serve whatever is spawned here for as long as the process lives.
            rt.block_on(std::future::pending::<()>());
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start NBD connection thread {i}: {e}");
        return None;
    }
    rx.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work is dealt round-robin, and each piece runs on a connection thread, not on the
    /// caller's.
    #[test]
    fn connections_are_dealt_round_robin_to_their_own_threads() {
        let threads = ConnThreads::start(2).expect("two connection threads");
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            threads.spawn(async move {
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send(name);
            });
        }
        let wait = std::time::Duration::from_secs(10);
        let mut names: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(wait).expect("spawned work ran"))
            .collect();
        // The two threads answer in either order; each had two.
        names.sort();
        let want = ["nbd-conn-0", "nbd-conn-0", "nbd-conn-1", "nbd-conn-1"];
        assert_eq!(names, want.map(|n| Some(n.to_string())));
    }
}
