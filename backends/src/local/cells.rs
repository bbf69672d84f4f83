//! Where a ring job's result waits for its caller: one cell per ring slot, made once and
//! reused, so a job costs no allocation (a `tokio::sync::oneshot` per job allocated its
//! shared state every time).
//!
//! A cell is taken by `run` before its job is submitted and given back by whichever side
//! finishes last: the caller once it has the result, or the ring when the caller's future
//! was dropped first. The caller's in-flight permit is released only after its cell is
//! back, so cells in use never outnumber permits and a permit always finds a free cell.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::Poll;

use crossbeam_queue::ArrayQueue;
use futures::task::AtomicWaker;
use tokio::sync::OwnedSemaphorePermit;

use super::job::JobResult;

/// Free, or done with (between the caller taking the result and the cell's return).
const IDLE: u8 = 0;
/// Its job is in the ring; the caller waits.
const RUNNING: u8 = 1;
/// The result is in; the caller has not taken it yet.
const DONE: u8 = 2;
/// The caller's future was dropped while the job ran: the ring gives the cell back.
const ABANDONED: u8 = 3;

#[derive(Default)]
struct Cell {
    state: AtomicU8,
    result: Mutex<Option<JobResult>>,
    waker: AtomicWaker,
    /// An abandoning caller's permit, released by the ring once the cell is back.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

pub(crate) struct Cells {
    cells: Box<[Cell]>,
    free: ArrayQueue<usize>,
}

impl Cells {
    pub fn new(count: usize) -> Self {
        let free = ArrayQueue::new(count);
        for i in 0..count {
            let _ = free.push(i);
        }
        Cells {
            cells: (0..count).map(|_| Cell::default()).collect(),
            free,
        }
    }

    /// A cell for a job about to be submitted; None only if more jobs run than there
    /// are cells, which the permits rule out.
    pub fn take(&self) -> Option<usize> {
        let i = self.free.pop()?;
        self.cells[i].state.store(RUNNING, Ordering::Relaxed);
        Some(i)
    }

    /// The job in cell `i` is complete: hand its result to the caller, or give the cell
    /// back if the caller is gone.
    pub fn finish(&self, i: usize, result: JobResult) {
        let cell = &self.cells[i];
        *lock(&cell.result) = Some(result);
        match cell
            .state
            .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => cell.waker.wake(),
            Err(_) => {
                // Abandoned: nobody wants the result.
                lock(&cell.result).take();
                let permit = lock(&cell.permit).take();
                self.give_back(i);
                drop(permit);
            }
        }
    }

    /// Wait for the result of the job in cell `i`; `permit` is released after the cell
    /// is back, even if this future is dropped first (or never polled: the claim is made
    /// here, not at the first poll).
    pub fn wait(
        &self,
        i: usize,
        permit: OwnedSemaphorePermit,
    ) -> impl std::future::Future<Output = JobResult> + '_ {
        let mut waiting = Waiting {
            cells: self,
            i,
            permit: Some(permit),
        };
        poll_fn(move |cx| {
            let cell = &self.cells[i];
            // Often done already (the NBD server reaps the CQ before it polls): no waker.
            if cell.state.load(Ordering::Acquire) != DONE {
                // Register, then look again, so a finish between the looks finds it.
                cell.waker.register(cx.waker());
                if cell.state.load(Ordering::Acquire) != DONE {
                    return Poll::Pending;
                }
            }
            Poll::Ready(waiting.take())
        })
    }

    fn give_back(&self, i: usize) {
        // A waker left here would be woken by the next job's finish: a spurious poll of
        // a task that has moved on (and a thread hand-off when it sleeps elsewhere).
        self.cells[i].waker.take();
        self.cells[i].state.store(IDLE, Ordering::Relaxed);
        // Never full: a cell goes back only after it was taken.
        let _ = self.free.push(i);
    }
}

/// A caller's claim on its cell, so that dropping the future leaves the cell to the ring.
struct Waiting<'a> {
    cells: &'a Cells,
    i: usize,
    /// Some until the result is taken or the claim handed to the ring.
    permit: Option<OwnedSemaphorePermit>,
}

impl Waiting<'_> {
    /// The result of a DONE cell; gives the cell back, then releases the permit.
    fn take(&mut self) -> JobResult {
        let cell = &self.cells.cells[self.i];
        let result = lock(&cell.result).take();
        self.cells.give_back(self.i);
        self.permit = None;
        // A DONE cell always holds its result: finish stores it before the state.
        result.unwrap_or(Err(super::job::JobError::Shutdown))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let cell = &self.cells.cells[self.i];
        // Leave the permit where the ring's finish will find it, then step away.
        *lock(&cell.permit) = Some(permit);
        if cell
            .state
            .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Already done: the result is ours to discard and the cell ours to give back.
            let permit = lock(&cell.permit).take();
            lock(&cell.result).take();
            self.cells.give_back(self.i);
            drop(permit);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn permit(s: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        s.clone().try_acquire_owned().expect("a permit")
    }

    #[tokio::test]
    async fn the_caller_gets_the_result_and_the_cell_comes_back_before_the_permit() {
        let cells = Cells::new(2);
        let sem = Arc::new(Semaphore::new(2));
        let i = cells.take().unwrap();
        // Finished before the caller waits (a submission that failed at once).
        cells.finish(i, Err(super::super::job::JobError::Errno(libc::EIO)));
        let r = cells.wait(i, permit(&sem)).await;
        assert!(matches!(
            r,
            Err(super::super::job::JobError::Errno(libc::EIO))
        ));
        assert_eq!(cells.free.len(), 2);
        assert_eq!(sem.available_permits(), 2);
        // Finished while the caller waits.
        let i = cells.take().unwrap();
        let p = permit(&sem);
        let (r, ()) = tokio::join!(cells.wait(i, p), async {
            tokio::task::yield_now().await;
            cells.finish(i, Ok(()));
        });
        assert!(r.is_ok());
        assert_eq!((cells.free.len(), sem.available_permits()), (2, 2));
    }

    #[tokio::test]
    async fn a_dropped_caller_leaves_cell_and_permit_to_the_finish() {
        let cells = Cells::new(1);
        let sem = Arc::new(Semaphore::new(1));
        let i = cells.take().unwrap();
        {
            let fut = cells.wait(i, permit(&sem));
            let mut fut = std::pin::pin!(fut);
            // Polled once (waker registered), then dropped with the job still running.
            assert!(futures::poll!(fut.as_mut()).is_pending());
        }
        assert_eq!(cells.free.len(), 0, "the job still runs in this cell");
        assert_eq!(sem.available_permits(), 0, "its permit still counts it");
        cells.finish(i, Ok(()));
        assert_eq!((cells.free.len(), sem.available_permits()), (1, 1));
        // Dropped after the finish, before looking: the caller cleans up.
        let i = cells.take().unwrap();
        cells.finish(i, Ok(()));
        drop(cells.wait(i, permit(&sem)));
        assert_eq!((cells.free.len(), sem.available_permits()), (1, 1));
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl futures::task::ArcWake for Count {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_cell_never_wakes_the_task_that_used_it_before() {
        let cells = Cells::new(1);
        let sem = Arc::new(Semaphore::new(1));
        let count = Arc::new(Count(Default::default()));
        let waker = futures::task::waker(count.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        // Done before the first poll, then abandoned after a poll: either way the cell
        // goes back with no waker of ours in it.
        for abandon in [false, true] {
            let i = cells.take().unwrap();
            if !abandon {
                cells.finish(i, Ok(()));
            }
            {
                let fut = cells.wait(i, permit(&sem));
                let mut fut = std::pin::pin!(fut);
                assert_eq!(fut.as_mut().poll(&mut cx).is_ready(), !abandon);
            }
            if abandon {
                cells.finish(i, Ok(()));
            }
            // The next job in the same cell, finished with nobody waiting yet.
            let j = cells.take().unwrap();
            assert_eq!(j, i);
            cells.finish(j, Ok(()));
            assert_eq!(count.0.load(Ordering::Relaxed), 0, "abandon: {abandon}");
            drop(cells.wait(j, permit(&sem)));
        }
    }

    #[test]
    fn racing_finish_and_drop_never_lose_a_cell_or_a_permit() {
        let cells = Arc::new(Cells::new(4));
        let sem = Arc::new(Semaphore::new(4));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        for round in 0..2000 {
            let i = cells.take().unwrap();
            let p = permit(&sem);
            let c = cells.clone();
            let finisher = std::thread::spawn(move || c.finish(i, Ok(())));
            let c = cells.clone();
            rt.block_on(async move {
                let fut = c.wait(i, p);
                let mut fut = std::pin::pin!(fut);
                // Either wait it out or drop it mid-flight, alternately.
                if round % 2 == 0 {
                    let _ = fut.await;
                } else {
                    let _ = futures::poll!(fut.as_mut());
                }
            });
            finisher.join().unwrap();
            assert_eq!(cells.free.len(), 4, "round {round}");
            assert_eq!(sem.available_permits(), 4, "round {round}");
        }
    }
}
