//! The array's one queue. It bounds how many member I/Os are in flight at once; I/Os over
//! the bound wait, and an `OrderingPolicy` decides which waiter goes next when a slot
//! frees. fifo is the default; lifo exists for latency experiments; a deadline or
//! latency-aware policy implements the same trait.

use std::collections::VecDeque;
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

struct QueueState {
    in_flight: usize,
    waiting: Box<dyn OrderingPolicy>,
}

/// Dispatch slots plus the waiting line.
pub struct IoQueue {
    depth: usize,
    state: Mutex<QueueState>,
}

/// Holding a slot; dropping it frees the slot and wakes the next waiter.
pub struct Slot<'a> {
    queue: &'a IoQueue,
}

impl IoQueue {
    pub fn new(depth: usize, policy: Box<dyn OrderingPolicy>) -> Self {
        IoQueue {
            depth: depth.max(1),
            state: Mutex::new(QueueState {
                in_flight: 0,
                waiting: policy,
            }),
        }
    }

    pub fn policy_name(&self) -> &'static str {
        self.lock().waiting.name()
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (in flight, waiting)
    pub fn load(&self) -> (usize, usize) {
        let st = self.lock();
        (st.in_flight, st.waiting.len())
    }

    /// Wait for a dispatch slot for the I/O named by `tag`.
    pub async fn admit(&self, tag: Tag) -> Slot<'_> {
        let rx = {
            let mut st = self.lock();
            if st.in_flight < self.depth && st.waiting.is_empty() {
                st.in_flight += 1;
                return Slot { queue: self };
            }
            let (tx, rx) = oneshot::channel();
            st.waiting.push(Waiter { tag, wake: tx });
            rx
        };
        // The slot is handed over by the releaser (in_flight stays counted), so no
        // re-check is needed. The sender is only dropped after sending.
        let _ = rx.await;
        Slot { queue: self }
    }

    fn release(&self) {
        let mut st = self.lock();
        // Hand the slot straight to the next waiter the policy picks; skip waiters whose
        // futures were dropped.
        while let Some(w) = st.waiting.pop() {
            if w.wake.send(()).is_ok() {
                return;
            }
        }
        st.in_flight -= 1;
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
