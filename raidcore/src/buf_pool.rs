//! One fixed pool of 4 KiB-aligned data buffers, carved from a single anonymous mapping
//! at start-up. Buffers come in a few size classes; a request takes the smallest class that
//! fits. When a class is empty the caller waits (back-pressure): the hot path never
//! allocates a data buffer.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use std::sync::Mutex;

use memmap2::MmapMut;
use tokio::sync::Semaphore;

pub const ALIGN: usize = 4096;

/// Slack added to each class so a request of the class's nominal size still fits after
/// being widened to whole logical blocks at both ends (read-modify-write).
const SLACK: usize = 2 * ALIGN;

/// The largest request a frontend may send (the NBD protocol's customary 32 MiB).
pub const MAX_IO: usize = 32 << 20;

/// How many buffers of each nominal size the pool holds.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub classes: Vec<(usize, usize)>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        // 4 KiB..1 MiB classes serve the common case many at a time; the 32 MiB class
        // exists so the largest legal request never fails, and is kept small on purpose.
        PoolConfig {
            classes: vec![(4 << 10, 1024), (64 << 10, 256), (1 << 20, 64), (MAX_IO, 2)],
        }
    }
}

struct SizeClass {
    /// Usable bytes per buffer (nominal size + slack, rounded to ALIGN).
    cap: usize,
    /// Byte offset of this class's first buffer in the mapping.
    base: usize,
    /// Buffers in the class.
    count: usize,
    /// Free buffer indices, used as a stack: the buffer returned last is handed out
    /// first. A hot buffer is still in the caches and its pages are still mapped; handing
    /// them out in rotation would touch every buffer of the class, keep them all cold,
    /// and let the kernel's cold-page reclaim (DAMON here) take pages that the next
    /// request then faults back in, zeroing a huge page each time.
    free: Mutex<Vec<u32>>,
    permits: Semaphore,
}

struct PoolInner {
    map: MmapMut,
    classes: Vec<SizeClass>,
}

/// A cheap-to-clone handle on the pool.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    pub fn new(cfg: &PoolConfig) -> std::io::Result<Self> {
        let mut classes = Vec::new();
        let mut total = 0usize;
        let mut nominal: Vec<(usize, usize)> = cfg.classes.clone();
        nominal.sort();
        for (size, count) in nominal {
            let cap = (size + SLACK).div_ceil(ALIGN) * ALIGN;
            // Reversed, so the lowest buffers come out first.
            let free = Mutex::new((0..count as u32).rev().collect::<Vec<_>>());
            classes.push(SizeClass {
                cap,
                base: total,
                count,
                free,
                permits: Semaphore::new(count),
            });
            total += cap * count;
        }
        // Anonymous mappings are page aligned, so every buffer is ALIGN aligned; pages are
        // only backed by memory once touched.
        let map = MmapMut::map_anon(total.max(ALIGN))?;
        // Huge pages where allowed: fewer TLB misses when copying large buffers. Advice
        // only; ignoring a failure is fine.
        // SAFETY: advising our own fresh private mapping.
        unsafe {
            libc::madvise(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                libc::MADV_HUGEPAGE,
            )
        };
        Ok(BufPool {
            inner: Arc::new(PoolInner { map, classes }),
        })
    }

    /// The largest request a buffer of this pool can hold (including block padding).
    pub fn max_len(&self) -> usize {
        self.inner.classes.last().map(|c| c.cap).unwrap_or(0)
    }

    fn class_for(&self, len: usize) -> Option<usize> {
        self.inner.classes.iter().position(|c| c.cap >= len)
    }

    /// Which size class a buffer of `len` bytes comes from (an index into `usage()`).
    pub fn class_index(&self, len: usize) -> Option<usize> {
        self.class_for(len)
    }

    /// A buffer of at least `len` bytes, waiting while its class is exhausted.
    /// Returns None only when no class is large enough.
    pub async fn get(&self, len: usize) -> Option<PoolBuf> {
        let ci = self.class_for(len)?;
        let class = &self.inner.classes[ci];
        // The semaphore is never closed, so acquire only fails if it were.
        let permit = class.permits.acquire().await.ok()?;
        permit.forget();
        Some(self.take(ci, len))
    }

    /// A buffer without waiting, or None when its class is exhausted right now.
    pub fn try_get(&self, len: usize) -> Option<PoolBuf> {
        let ci = self.class_for(len)?;
        let permit = self.inner.classes[ci].permits.try_acquire().ok()?;
        permit.forget();
        Some(self.take(ci, len))
    }

    fn take(&self, ci: usize, len: usize) -> PoolBuf {
        let class = &self.inner.classes[ci];
        // A permit guarantees a free index: permits and indices are returned together.
        let idx = class
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("buffer pool: permit without a free buffer");
        let off = class.base + idx as usize * class.cap;
        // SAFETY: off..off+cap lies inside the mapping and this index is exclusively ours
        // until the PoolBuf is dropped.
        let ptr = unsafe { self.inner.map.as_ptr().add(off) as *mut u8 };
        PoolBuf {
            pool: self.clone(),
            class: ci as u8,
            idx,
            ptr,
            cap: class.cap,
            len,
        }
    }

    /// Free buffers per class as (capacity, free, total), for status and tests.
    pub fn usage(&self) -> Vec<(usize, usize, usize)> {
        self.inner
            .classes
            .iter()
            .map(|c| (c.cap, c.permits.available_permits(), c.count))
            .collect()
    }
}

/// An owned buffer from the pool; returned to it on drop.
pub struct PoolBuf {
    pool: BufPool,
    class: u8,
    idx: u32,
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

// SAFETY: a PoolBuf exclusively owns its region of the mapping.
unsafe impl Send for PoolBuf {}
unsafe impl Sync for PoolBuf {}

impl PoolBuf {
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the visible length (up to the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "PoolBuf::set_len past capacity");
        self.len = len;
    }
}

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is inside our exclusively owned region.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let class = &self.pool.inner.classes[self.class as usize];
        // The stack was sized for every index of the class: this push never grows it.
        class
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.idx);
        class.permits.add_permits(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn small() -> BufPool {
        BufPool::new(&PoolConfig {
            classes: vec![(4096, 2), (65536, 1)],
        })
        .unwrap()
    }

    #[tokio::test]
    async fn buffers_are_aligned_and_sized() {
        let pool = small();
        let a = pool.get(100).await.unwrap();
        let b = pool.get(5000).await.unwrap();
        assert_eq!(a.len(), 100);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(a.capacity() >= 4096 + SLACK);
        assert!(pool.get(10 << 20).await.is_none(), "no class fits 10 MiB");
    }

    #[tokio::test]
    async fn empty_class_makes_callers_wait_until_a_buffer_returns() {
        let pool = small();
        let a = pool.get(4096).await.unwrap();
        let _b = pool.get(4096).await.unwrap();
        assert!(pool.try_get(4096).is_none());
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.get(4096).await.map(|b| b.len()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "must wait while the class is empty");
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woke")
            .unwrap();
        assert_eq!(got, Some(4096));
    }

    #[tokio::test]
    async fn distinct_buffers_do_not_overlap() {
        let pool = small();
        let mut a = pool.get(4096).await.unwrap();
        let mut b = pool.get(4096).await.unwrap();
        a.fill(0xaa);
        b.fill(0xbb);
        assert!(a.iter().all(|&x| x == 0xaa));
        assert!(b.iter().all(|&x| x == 0xbb));
    }
}
