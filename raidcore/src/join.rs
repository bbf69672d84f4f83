//! Await a few futures together without allocating: `futures::future::join_all` boxes
//! its futures and collects into a Vec, two allocations for every mirrored write.
//!
//! The futures live inside the join, so the join is `N` times the size of one of them,
//! and every caller's future grows by that much: a frontend moves its request's future
//! into place once per request, so its size is paid in bytes copied on every I/O. Keep
//! `N` to what the common case needs, and box joins on paths that are not hot.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use futures::future::MaybeDone;
use smallvec::SmallVec;

/// Run every future to completion, concurrently, and return their outputs in order.
/// Up to `N` futures (and outputs) live inline; more spill to the heap once.
pub async fn join_all<const N: usize, F, I>(futures: I) -> SmallVec<[F::Output; N]>
where
    F: Future,
    I: IntoIterator<Item = F>,
{
    let list: SmallVec<[MaybeDone<F>; N]> = futures.into_iter().map(MaybeDone::Future).collect();
    let mut list = pin!(list);
    poll_fn(|cx| {
        let mut done = true;
        for f in elements(list.as_mut()) {
            done &= f.poll(cx).is_ready();
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    elements(list)
        .map(|f| f.take_output().expect("each output is taken once"))
        .collect()
}

/// Pinned access to each element of a pinned list.
fn elements<const N: usize, T>(
    list: Pin<&mut SmallVec<[T; N]>>,
) -> impl Iterator<Item = Pin<&mut T>> {
    // SAFETY: the list is pinned and never grows, shrinks or reorders after it was
    // pinned, so every element stays where it was first polled until the list drops it
    // in place: structural pinning of its elements.
    unsafe { list.get_unchecked_mut() }
        .iter_mut()
        .map(|f| unsafe { Pin::new_unchecked(f) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Completes after `n` polls, waking itself each time, and says its index.
    struct After {
        n: usize,
        index: usize,
        polls: &'static AtomicUsize,
    }

    impl Future for After {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<usize> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.n == 0 {
                return Poll::Ready(self.index);
            }
            self.n -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn outputs_come_in_order_and_finished_futures_are_not_polled_again() {
        static POLLS: AtomicUsize = AtomicUsize::new(0);
        const INLINE: usize = 4;
        for count in [0, 1, 2, INLINE, INLINE + 3] {
            POLLS.store(0, Ordering::Relaxed);
            // Future i needs i extra polls: the last one keeps the join pending longest.
            let futs = (0..count).map(|i| After {
                n: i,
                index: i,
                polls: &POLLS,
            });
            let out = futures::executor::block_on(join_all::<INLINE, _, _>(futs));
            assert_eq!(out.to_vec(), (0..count).collect::<Vec<_>>());
            // Future i is polled i + 1 times, never after it finished.
            let expected: usize = (0..count).map(|i| i + 1).sum();
            assert_eq!(POLLS.load(Ordering::Relaxed), expected, "{count} futures");
        }
    }
}
