//! The array's one queue. It bounds how many member I/Os are in flight at once; I/Os over
//! the bound wait, and an `OrderingPolicy` decides which waiter goes next when a slot
//! frees. fifo is the default; lifo exists for latency experiments; a deadline or
//! latency-aware policy implements the same trait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::io::Tag;

/// A queued I/O waiting for a dispatch slot.
pub struct Waiter {
    pub tag: Tag,
    wake: oneshot::Sender<()>,
}

/// Chooses the order in which waiting I/Os are dispatched.
pub trait OrderingPolicy: Send {
    fn name(&self) -> &'static str;
    fn push(&mut self, w: Waiter);
    fn pop(&mut self) -> Option<Waiter>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
pub struct Fifo(VecDeque<Waiter>);

impl OrderingPolicy for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }
    fn push(&mut self, w: Waiter) {
        self.0.push_back(w)
    }
    fn pop(&mut self) -> Option<Waiter> {
        self.0.pop_front()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Default)]
pub struct Lifo(Vec<Waiter>);

impl OrderingPolicy for Lifo {
    fn name(&self) -> &'static str {
        "lifo"
    }
    fn push(&mut self, w: Waiter) {
        self.0.push(w)
    }
    fn pop(&mut self) -> Option<Waiter> {
        self.0.pop()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Build a policy by name (layout files and the CLI name them).
pub fn policy_by_name(name: &str) -> Option<Box<dyn OrderingPolicy>> {
    match name {
        "fifo" => Some(Box::<Fifo>::default()),
        "lifo" => Some(Box::<Lifo>::default()),
        _ => None,
    }
}

pub const POLICY_NAMES: &[&str] = &["fifo", "lifo"];

/// Dispatch slots plus the waiting line.
///
/// While nobody waits, taking and freeing a slot is one atomic add on `taken` each; the
/// lock is for the waiting line only. (A mutex taken twice per I/O by both worker
/// threads moved its cache line between the cores four times per I/O.)
pub struct IoQueue {
    depth: usize,
    /// Slots held, counting those handed straight to a waiter.
    taken: AtomicUsize,
    /// How many wait in `waiting`; changed under its lock, read without it.
    waiters: AtomicUsize,
    waiting: Mutex<Box<dyn OrderingPolicy>>,
}

/// Holding a slot; dropping it frees the slot and wakes the next waiter.
pub struct Slot<'a> {
    queue: &'a IoQueue,
}

impl IoQueue {
    pub fn new(depth: usize, policy: Box<dyn OrderingPolicy>) -> Self {
        IoQueue {
            depth: depth.max(1),
            taken: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            waiting: Mutex::new(policy),
        }
    }

    pub fn policy_name(&self) -> &'static str {
        self.lock().name()
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn OrderingPolicy>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (in flight, waiting)
    pub fn load(&self) -> (usize, usize) {
        (
            self.taken.load(Ordering::SeqCst),
            self.waiters.load(Ordering::SeqCst),
        )
    }

    /// Wait for a dispatch slot for the I/O named by `tag`.
    pub async fn admit(&self, tag: Tag) -> Slot<'_> {
        // Nobody waits: take a free slot if there is one. With waiters, join the line so
        // the policy, not the race, decides who goes next.
        if self.waiters.load(Ordering::SeqCst) == 0 && self.try_take() {
            return Slot { queue: self };
        }
        let rx = {
            let mut waiting = self.lock();
            let (tx, rx) = oneshot::channel();
            waiting.push(Waiter { tag, wake: tx });
            self.waiters.fetch_add(1, Ordering::SeqCst);
            // A slot freed before we were counted was not handed to anyone: hand it now.
            self.grant(&mut waiting);
            rx
        };
        // The slot is handed over by `grant` (counted in `taken`), so no re-check is
        // needed. The sender is only dropped after sending.
        let mut wait = Waiting {
            queue: self,
            rx: Some(rx),
        };
        if let Some(rx) = wait.rx.as_mut() {
            let _ = rx.await;
        }
        wait.rx = None;
        Slot { queue: self }
    }

    /// Take a slot if one is free.
    fn try_take(&self) -> bool {
        let mut n = self.taken.load(Ordering::SeqCst);
        while n < self.depth {
            match self
                .taken
                .compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
        false
    }

    /// Hand free slots to waiters in the policy's order; skip waiters whose futures were
    /// dropped. Under the waiting line's lock.
    fn grant(&self, waiting: &mut Box<dyn OrderingPolicy>) {
        while !waiting.is_empty() && self.try_take() {
            let Some(w) = waiting.pop() else {
                self.taken.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if w.wake.send(()).is_err() {
                self.taken.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn release(&self) {
        // Free first, then look for waiters; a waiter counts itself first, then looks for
        // a free slot: whichever comes second sees the other (all SeqCst), so a waiter
        // is never left behind a free slot.
        self.taken.fetch_sub(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let mut waiting = self.lock();
            self.grant(&mut waiting);
        }
    }
}

/// An admit waiting in line. If it is dropped (its I/O cancelled) after a slot was
/// handed to it, the slot goes back; otherwise the queue would lose it for good.
struct Waiting<'a> {
    queue: &'a IoQueue,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            // Closing first means no slot can arrive after the check.
            rx.close();
            if rx.try_recv().is_ok() {
                self.queue.release();
            }
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.queue.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Class, Op, Proto};
    use std::sync::Arc;
    use std::time::Duration;

    fn tag(id: u64) -> Tag {
        Tag {
            id,
            class: Class::Local,
            member: 0,
            proto: Proto::Mem,
            op: Op::Read,
            offset: 0,
            len: 0,
            fua: false,
        }
    }

    async fn dispatch_order(policy: &str) -> Vec<u64> {
        let q = Arc::new(IoQueue::new(1, policy_by_name(policy).unwrap()));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = q.admit(tag(0)).await;
        let mut tasks = Vec::new();
        for id in 1..=4 {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _s = q.admit(tag(id)).await;
                order.lock().unwrap().push(id);
            }));
            // Let each waiter enqueue before the next, so arrival order is 1,2,3,4.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(q.load(), (1, 4));
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(q.load(), (0, 0));
        let v = order.lock().unwrap().clone();
        v
    }

    #[tokio::test]
    async fn fifo_dispatches_in_arrival_order() {
        assert_eq!(dispatch_order("fifo").await, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn lifo_dispatches_newest_first() {
        assert_eq!(dispatch_order("lifo").await, vec![4, 3, 2, 1]);
    }

    /// Many tasks on two threads through a queue of depth 2: never more than two hold a
    /// slot, and none is left waiting behind a free slot (all finish in time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_contention_the_depth_holds_and_no_waiter_is_lost() {
        let q = Arc::new(IoQueue::new(2, Box::<Fifo>::default()));
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (q, held) = (q.clone(), held.clone());
                tokio::spawn(async move {
                    for i in 0..2000 {
                        let _s = q.admit(tag(t * 10_000 + i)).await;
                        let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(now <= 2, "{now} slots held at depth 2");
                        if i % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                        held.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let all = futures::future::join_all(tasks);
        let done = tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("a waiter was left behind a free slot");
        for r in done {
            r.unwrap();
        }
        assert_eq!(q.load(), (0, 0));
    }

    /// A waiter handed a slot and then cancelled before it ran gives the slot back.
    #[tokio::test]
    async fn a_cancelled_waiter_returns_the_slot_it_was_handed() {
        let q = IoQueue::new(1, Box::<Fifo>::default());
        let first = q.admit(tag(1)).await;
        let mut second = Box::pin(q.admit(tag(2)));
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(q.load(), (1, 1));
        drop(first); // hands the slot to `second`, which has not run yet
        drop(second);
        assert_eq!(q.load(), (0, 0));
        let third = tokio::time::timeout(Duration::from_secs(5), q.admit(tag(3)))
            .await
            .expect("the slot handed to the cancelled waiter was lost");
        drop(third);
    }

    #[tokio::test]
    async fn below_depth_nothing_waits() {
        let q = IoQueue::new(3, Box::<Fifo>::default());
        let a = q.admit(tag(1)).await;
        let b = q.admit(tag(2)).await;
        assert_eq!(q.load(), (2, 0));
        drop((a, b));
        assert_eq!(q.load(), (0, 0));
    }
}
