//! Counters that every I/O bumps, split per thread.
//!
//! One atomic that both worker threads add to moves its cache line between the cores on
//! every I/O; with a shard per thread each add stays in its own core's cache, and the
//! rare reader (status, read balancing) sums the shards.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards per counter; threads beyond this share one (still correct, just contended).
const SHARDS: usize = 8;

/// One shard on a cache line (and its neighbour, which x86 prefetches in pairs) of its own.
#[derive(Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A count that many threads add to and few read.
#[derive(Default)]
pub struct Counter {
    shards: [Shard; SHARDS],
}

impl Counter {
    pub fn add(&self, n: u64) {
        self.shards[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// Take back an earlier `add`, possibly made on another thread: that shard alone may
    /// wrap below zero, the sum does not.
    pub fn sub(&self, n: u64) {
        self.shards[shard()].0.fetch_sub(n, Ordering::Relaxed);
    }

    /// The sum. Shards are read one after another while others add, so a gauge
    /// (add then sub) can read briefly below zero; that reads as 0.
    pub fn get(&self) -> u64 {
        let sum = self
            .shards
            .iter()
            .fold(0u64, |a, s| a.wrapping_add(s.0.load(Ordering::Relaxed)));
        (sum as i64).max(0) as u64
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// This thread's shard, handed out round-robin on first use.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn adds_from_many_threads_sum_and_a_sub_elsewhere_takes_one_back() {
        let c = Arc::new(Counter::default());
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 2000 * (SHARDS as u64 + 3));
        // A sub on a thread that never added: its shard wraps, the sum is right.
        let c2 = c.clone();
        std::thread::spawn(move || c2.sub(5)).join().unwrap();
        assert_eq!(c.get(), 2000 * (SHARDS as u64 + 3) - 5);
    }

    #[test]
    fn a_sub_seen_before_its_add_reads_as_zero() {
        let c = Counter::default();
        c.sub(1);
        assert_eq!(c.get(), 0);
        c.add(1);
        assert_eq!(c.get(), 0);
        c.add(3);
        assert_eq!(c.get(), 3);
    }
}
