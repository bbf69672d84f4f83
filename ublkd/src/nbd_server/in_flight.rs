//! A connection's requests in flight, run inside the connection's own task.
//!
//! Spawning a task per request cost an allocation, a trip through the scheduler and, on
//! a multi-threaded runtime, often a wake-up of another CPU, for every request. Here each
//! request's future lives in a slot whose box is kept and reused (no allocation once the
//! slots exist), and each slot has its own waker: waking it marks the slot ready and
//! wakes the connection task, which then polls only the slots that were woken. A member
//! that completes at once (memory, null) finishes in the same poll that started it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Slots woken since the owner last looked, one bit each, and the owner's waker.
struct Ready {
    words: Vec<AtomicU64>,
    owner: AtomicWaker,
}

impl Ready {
    fn mark(&self, index: usize) {
        self.words[index / 64].fetch_or(1 << (index % 64), Ordering::Release);
    }
}

/// The waker of one slot.
struct SlotWake {
    index: usize,
    ready: Arc<Ready>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.mark(self.index);
        self.ready.owner.wake();
    }
}

struct Slot<F> {
    fut: Pin<Box<Option<F>>>,
    waker: Waker,
}

/// Up to `capacity` futures of one type, polled by their owner.
///
/// Dropping this drops any future still running; callers whose futures must run to
/// completion (member I/O into pool buffers) wait until `is_empty()` first.
pub struct InFlight<F> {
    slots: Vec<Slot<F>>,
    free: Vec<usize>,
    ready: Arc<Ready>,
    capacity: usize,
}

impl<F: Future> InFlight<F> {
    pub fn new(capacity: usize) -> Self {
        InFlight {
            slots: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            ready: Arc::new(Ready {
                words: (0..capacity.div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                owner: AtomicWaker::new(),
            }),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start the future `make` returns; it is first polled by the next `poll`. The caller
    /// keeps within capacity. The future is built straight into its slot: a request's future
    /// is kilobytes (every await of the array inline), and building it elsewhere and
    /// moving it in copied all of it for every request.
    #[inline]
    pub fn push_with(&mut self, make: impl FnOnce() -> F) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                assert!(self.slots.len() < self.capacity, "InFlight over capacity");
                let index = self.slots.len();
                let waker = Waker::from(Arc::new(SlotWake {
                    index,
                    ready: self.ready.clone(),
                }));
                self.slots.push(Slot {
                    fut: Box::pin(None),
                    waker,
                });
                index
            }
        };
        // A free slot's future was dropped when it finished (`poll_slot`), so this writes
        // into an empty box, reused, and nothing is dropped first.
        self.slots[index].fut.as_mut().set(Some(make()));
        self.ready.mark(index);
    }

    /// Poll every woken future; hand each result to `done`. Returns how many finished.
    /// The task polling this is woken when any running future is.
    pub fn poll(&mut self, cx: &mut Context<'_>, mut done: impl FnMut(F::Output)) -> usize {
        // Register before taking the bits: a wake after the swap finds the new waker.
        self.ready.owner.register(cx.waker());
        let mut finished = 0;
        for w in 0..self.ready.words.len() {
            let mut bits = self.ready.words[w].swap(0, Ordering::Acquire);
            while bits != 0 {
                let index = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(out) = self.poll_slot(index) {
                    done(out);
                    finished += 1;
                }
            }
        }
        finished
    }

    fn poll_slot(&mut self, index: usize) -> Option<F::Output> {
        let slot = self.slots.get_mut(index)?;
        let fut = slot.fut.as_mut().as_pin_mut()?;
        let mut cx = Context::from_waker(&slot.waker);
        match fut.poll(&mut cx) {
            Poll::Ready(out) => {
                slot.fut.as_mut().set(None);
                self.free.push(index);
                Some(out)
            }
            Poll::Pending => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that is pending until its flag is set, then yields its value.
    struct Gate {
        open: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
        value: usize,
    }

    impl Future for Gate {
        type Output = usize;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            if self.open.load(Ordering::Acquire) {
                return Poll::Ready(self.value);
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_woken_slots_finish_and_slots_are_reused() {
        let owner = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(owner.clone());
        let mut cx = Context::from_waker(&waker);
        let mut set: InFlight<Gate> = InFlight::new(2);
        let gates: Vec<_> = (0..2)
            .map(|i| {
                let g = Gate {
                    open: Default::default(),
                    waker: Default::default(),
                    value: i,
                };
                (g.open.clone(), g.waker.clone(), g)
            })
            .collect();
        let mut handles = Vec::new();
        for (open, w, g) in gates {
            handles.push((open, w));
            set.push_with(|| g);
        }
        assert_eq!(set.len(), 2);
        let mut out = Vec::new();
        assert_eq!(set.poll(&mut cx, |v| out.push(v)), 0, "nothing is open yet");
        // Open the second gate and wake it through its slot's waker.
        handles[1].0.store(true, Ordering::Release);
        handles[1].1.lock().unwrap().take().unwrap().wake();
        assert_eq!(owner.0.load(Ordering::SeqCst), 1, "the owner was woken");
        assert_eq!(set.poll(&mut cx, |v| out.push(v)), 1);
        assert_eq!(out, [1]);
        assert_eq!(set.len(), 1);
        // The freed slot takes a new future; the first gate, never woken, stays put.
        handles[0].0.store(true, Ordering::Release);
        let g = Gate {
            open: Arc::new(true.into()),
            waker: Default::default(),
            value: 7,
        };
        set.push_with(|| g);
        assert_eq!(set.poll(&mut cx, |v| out.push(v)), 1);
        assert_eq!(out, [1, 7], "only the pushed slot was polled");
        handles[0].1.lock().unwrap().take().unwrap().wake();
        assert_eq!(set.poll(&mut cx, |v| out.push(v)), 1);
        assert_eq!(out, [1, 7, 0]);
        assert!(set.is_empty());
    }
}
