//! How results cross from the tokio runtime back to a ublk queue thread.
//!
//! A queue thread sleeps in `io_uring_enter` on its own ring, so a waker called from a
//! tokio worker cannot rouse it. Each queue therefore has a *doorbell*: an eventfd with a
//! poll request kept armed on the queue's ring. A tokio task that finished a request
//! pushes `(tag, result)` onto a lock-free queue and rings the bell (one eventfd write,
//! skipped when the bell is already ringing); the poll completes, the ring wakes, the
//! queue thread drains every result and re-arms the poll. No busy polling, and one
//! wake-up can carry many completions.
//!
//! The queue-thread side also keeps one [`Slots`] entry per tag, which the tag's task
//! awaits until the drained result arrives.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};

use crossbeam_queue::SegQueue;

/// The thread-safe half: tokio tasks ring it, the queue thread drains it.
pub struct Doorbell {
    fd: OwnedFd,
    done: SegQueue<(u16, i32)>,
    /// Set by the first ring after a drain; later rings skip the eventfd write.
    rung: AtomicBool,
}

impl Doorbell {
    pub fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new descriptor we
        // own exclusively.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Doorbell {
            fd,
            done: SegQueue::new(),
            rung: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Hand a tag's result to the queue thread (any thread).
    pub fn ring(&self, tag: u16, result: i32) {
        self.done.push((tag, result));
        // SeqCst pairs with `drain`: either the drain that clears the flag sees this push,
        // or this swap sees the cleared flag and writes the eventfd again.
        if !self.rung.swap(true, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live stack buffer to our own eventfd.
            let n = unsafe { libc::write(self.fd(), one.as_ptr().cast(), one.len()) };
            if n != 8 {
                // Only possible if the counter were about to overflow, which a counter
                // reset on every drain cannot reach.
                tracing::error!(error = %io::Error::last_os_error(), "ublk doorbell write failed");
            }
        }
    }

    /// Reset the eventfd and hand every pending result to `f` (queue thread).
    pub fn drain(&self, mut f: impl FnMut(u16, i32)) {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live stack buffer from our own eventfd;
        // EAGAIN (nothing to read) is fine.
        let _ = unsafe { libc::read(self.fd(), counter.as_mut_ptr().cast(), counter.len()) };
        self.rung.store(false, Ordering::SeqCst);
        while let Some((tag, res)) = self.done.pop() {
            f(tag, res);
        }
    }
}

#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

/// Per-tag mailboxes on the queue thread (not thread-safe on purpose: only the queue
/// thread touches them).
pub struct Slots {
    slots: RefCell<Vec<Slot>>,
}

impl Slots {
    pub fn new(depth: usize) -> Slots {
        Slots {
            slots: RefCell::new((0..depth).map(|_| Slot::default()).collect()),
        }
    }

    /// Deliver `result` to the task waiting on `tag`.
    pub fn complete(&self, tag: u16, result: i32) {
        let waker = {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(tag as usize) else {
                tracing::error!(
                    tag,
                    "ublk doorbell: result for a tag this queue does not have"
                );
                return;
            };
            slot.result = Some(result);
            slot.waker.take()
        };
        // Woken outside the borrow: the executor may poll the task right away.
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Wait for `tag`'s result.
    pub fn wait(&self, tag: u16) -> impl Future<Output = i32> + '_ {
        std::future::poll_fn(move |cx| {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(tag as usize) else {
                return Poll::Ready(-libc::EINVAL);
            };
            match slot.result.take() {
                Some(r) => Poll::Ready(r),
                None => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, no timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn rings_once_carries_many_and_rearms_after_drain() {
        let bell = Arc::new(Doorbell::new().unwrap());
        assert!(!readable(bell.fd()));
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let b = bell.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        b.ring(t * 100 + i, i32::from(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(readable(bell.fd()));
        let mut got = Vec::new();
        bell.drain(|tag, r| got.push((tag, r)));
        assert_eq!(got.len(), 400);
        assert!(!readable(bell.fd()), "drain resets the eventfd");
        bell.ring(7, -5);
        assert!(
            readable(bell.fd()),
            "the first ring after a drain writes again"
        );
        let mut got = Vec::new();
        bell.drain(|tag, r| got.push((tag, r)));
        assert_eq!(got, vec![(7, -5)]);
    }

    #[test]
    fn slots_deliver_results_to_waiters() {
        let slots = Slots::new(4);
        slots.complete(2, 4096);
        let r = futures::executor::block_on(slots.wait(2));
        assert_eq!(r, 4096);
        slots.complete(9, 1); // unknown tag: logged, ignored
        assert_eq!(futures::executor::block_on(slots.wait(9)), -libc::EINVAL);
    }
}
