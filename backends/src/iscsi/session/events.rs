//! The events the reader hands to one waiting command: a channel made for it. At most a
//! handful of events ever queue (R2Ts, then the completion), and one is made per command,
//! so it is one small allocation where a general channel would allocate a block of slots.

use std::sync::{Arc, Mutex};

use smallvec::SmallVec;
use tokio::sync::Notify;

use super::Event;

struct Slot {
    /// Queued events, and whether the sending side is gone.
    state: Mutex<(SmallVec<[Event; 2]>, bool)>,
    notify: Notify,
}

/// The reader's side; dropping it (the command left the task table) closes the channel.
pub(super) struct EventTx(Arc<Slot>);

/// The command's side.
pub(super) struct EventRx(Arc<Slot>);

pub(super) fn channel() -> (EventTx, EventRx) {
    let slot = Arc::new(Slot {
        state: Mutex::new((SmallVec::new(), false)),
        notify: Notify::new(),
    });
    (EventTx(slot.clone()), EventRx(slot))
}

impl Slot {
    fn with<R>(&self, f: impl FnOnce(&mut (SmallVec<[Event; 2]>, bool)) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl EventTx {
    pub(super) fn send(&self, ev: Event) {
        self.0.with(|s| s.0.push(ev));
        // A stored permit if nobody waits yet: the receiver checks the queue first.
        self.0.notify.notify_one();
    }
}

impl Drop for EventTx {
    fn drop(&mut self) {
        self.0.with(|s| s.1 = true);
        self.0.notify.notify_one();
    }
}

impl EventRx {
    /// The next event already queued, without waiting.
    pub(super) fn try_recv(&mut self) -> Option<Event> {
        self.0.with(|s| (!s.0.is_empty()).then(|| s.0.remove(0)))
    }

    /// The next event in order; None once the sender is gone and nothing is left.
    pub(super) async fn recv(&mut self) -> Option<Event> {
        loop {
            let next = self.0.with(|s| {
                if s.0.is_empty() {
                    (None, s.1)
                } else {
                    (Some(s.0.remove(0)), false)
                }
            });
            match next {
                (Some(ev), _) => return Some(ev),
                (None, true) => return None,
                (None, false) => self.0.notify.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_arrive_in_order_then_close() {
        let (tx, mut rx) = channel();
        tx.send(Event::Expired);
        tx.send(Event::Rejected("x".into()));
        assert!(matches!(rx.recv().await, Some(Event::Expired)));
        let waiter = tokio::spawn(async move {
            let a = rx.recv().await.is_some();
            let b = rx.recv().await.is_some();
            (a, b)
        });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiter.await.unwrap(), (true, false));
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_later_send() {
        let (tx, mut rx) = channel();
        let waiter = tokio::spawn(async move { rx.recv().await.is_some() });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        tx.send(Event::Expired);
        assert!(waiter.await.unwrap());
        drop(tx);
    }
}
