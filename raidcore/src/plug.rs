//! Plugging: one doorbell for member I/Os started together.
//!
//! A frontend that starts many requests at once (the NBD server after one read from its
//! socket) holds a [`Plug`] while it polls them. A member that would enter the kernel
//! once per I/O (io_uring_enter, a socket write) queues the I/O instead and leaves its
//! [`Doorbell`] with the plug; when the plug is dropped each doorbell rings once and the
//! whole batch goes in one system call (and, for a virtio disk, one notification of the
//! device). Without a plug, members ring at once. Linux's block layer does the same with
//! `blk_start_plug`.
//!
//! The plug is per thread and covers what that thread starts while holding it: it is not
//! `Send`, so it can never be held across an `.await`.
//!
//! The other direction, per thread too: a member whose completions a thread can pick up
//! itself ([`Completions`], an io_uring) is [`watch`]ed by every thread that submits to
//! it, and a frontend about to poll its requests calls [`collect`] to have what is done
//! answered now rather than when the member's own waiter is woken.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::{Arc, Weak};

/// Whatever submits a member's queued I/Os.
pub trait Doorbell: Send + Sync {
    fn ring(self: Arc<Self>);
}

#[derive(Default)]
struct State {
    depth: usize,
    bells: Vec<Arc<dyn Doorbell>>,
}

thread_local! {
    static PLUG: RefCell<State> = RefCell::new(State::default());
}

/// Held while starting a batch of I/Os; rings the deferred doorbells when dropped.
/// Nested plugs ring when the outermost is dropped.
pub struct Plug {
    _not_send: PhantomData<*const ()>,
}

impl Plug {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        PLUG.with(|p| p.borrow_mut().depth += 1);
        Plug {
            _not_send: PhantomData,
        }
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        let mut bells = PLUG.with(|p| {
            let mut p = p.borrow_mut();
            p.depth -= 1;
            if p.depth > 0 {
                return Vec::new();
            }
            std::mem::take(&mut p.bells)
        });
        // Rung outside the borrow: a doorbell may start I/O of its own (it then finds
        // no plug and rings at once).
        for b in bells.drain(..) {
            b.ring();
        }
        // Give the (empty) vector back so its allocation is reused by the next plug.
        PLUG.with(|p| {
            let mut p = p.borrow_mut();
            if p.bells.capacity() < bells.capacity() {
                p.bells = bells;
            }
        });
    }
}

/// Whether the calling thread holds a plug: if so `bell` will ring when the plug goes
/// (once, however often it is deferred) and the caller must not ring it now. False: the
/// caller rings it itself.
pub fn defer<D: Doorbell + 'static>(bell: &Arc<D>) -> bool {
    PLUG.with(|p| {
        let mut p = p.borrow_mut();
        if p.depth == 0 {
            return false;
        }
        let ptr = Arc::as_ptr(bell) as *const ();
        if !p.bells.iter().any(|b| Arc::as_ptr(b) as *const () == ptr) {
            p.bells.push(bell.clone());
        }
        true
    })
}

/// A source of completions that any thread can hand out (an io_uring's completion queue):
/// what its own wake-up (a reaper task woken through an eventfd) would do, done now.
pub trait Completions: Send + Sync {
    /// Hand out what has completed; never blocks (skip when someone else is at it).
    fn collect(&self);
}

thread_local! {
    static SOURCES: RefCell<Vec<Weak<dyn Completions>>> = const { RefCell::new(Vec::new()) };
}

/// Note that the calling thread submits to `src`, so that [`collect`] on this thread
/// looks at it. Cheap when already noted (a scan of the few sources the thread uses).
pub fn watch<C: Completions + 'static>(src: &Arc<C>) {
    SOURCES.with(|s| {
        let mut s = s.borrow_mut();
        let ptr = Arc::as_ptr(src) as *const ();
        if s.iter().any(|w| w.as_ptr() as *const () == ptr) {
            return;
        }
        s.retain(|w| w.strong_count() > 0);
        let weak: Weak<dyn Completions> = Arc::downgrade(src) as _;
        s.push(weak);
    })
}

/// Collect the completions of every live source this thread submitted to. A frontend
/// calls it when it is about to look for finished requests: completions the kernel has
/// already posted (io_uring posts them in the submitting thread) are answered in this
/// pass instead of after a wake-up of the reaper, which on a VM is a cross-CPU wake-up
/// per batch and, at queue depth 32, a fifth of the daemon's CPU per read.
pub fn collect() {
    let n = SOURCES.with(|s| s.borrow().len());
    for i in 0..n {
        // Not under the borrow: collecting answers requests, whose wakers may run code
        // that submits (and so watches) again.
        let src = SOURCES.with(|s| s.borrow().get(i).and_then(Weak::upgrade));
        if let Some(src) = src {
            src.collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Doorbell for Count {
        fn ring(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn deferred_bells_ring_once_when_the_outermost_plug_goes() {
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        assert!(!defer(&a), "no plug: the caller rings");
        {
            let _outer = Plug::new();
            {
                let _inner = Plug::new();
                for _ in 0..5 {
                    assert!(defer(&a));
                }
                assert!(defer(&b));
            }
            assert_eq!(a.0.load(Ordering::SeqCst), 0, "still plugged by the outer");
        }
        assert_eq!(
            a.0.load(Ordering::SeqCst),
            1,
            "once, however often deferred"
        );
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        assert!(!defer(&a), "unplugged again");
    }

    #[derive(Default)]
    struct Source(AtomicUsize);
    impl Completions for Source {
        fn collect(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn collect_visits_each_watched_source_once_and_skips_dropped_ones() {
        let (a, b) = (Arc::new(Source::default()), Arc::new(Source::default()));
        collect();
        assert_eq!(a.0.load(Ordering::SeqCst), 0, "not watched yet");
        for _ in 0..3 {
            watch(&a);
        }
        watch(&b);
        collect();
        assert_eq!(
            a.0.load(Ordering::SeqCst),
            1,
            "watched three times, collected once"
        );
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        drop(b);
        collect();
        assert_eq!(a.0.load(Ordering::SeqCst), 2);
        // Another thread watched nothing: its collect touches no source.
        std::thread::spawn(collect).join().unwrap();
        assert_eq!(a.0.load(Ordering::SeqCst), 2);
        let c = Arc::new(Source::default());
        watch(&c);
        SOURCES.with(|s| assert_eq!(s.borrow().len(), 2, "the dropped source was pruned"));
    }
}
