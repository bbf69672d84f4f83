//! The requests that flow through the stack: `FrontIo` from a frontend, `MemberIo` to a
//! member, and the `Tag` every member I/O carries. Dispatch, metrics and tracing read the
//! tag; nothing downstream re-derives where an I/O goes.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Read,
    Write,
    Flush,
    /// Discard: the range may read back as anything afterwards (we never promise zeroes).
    Trim,
    /// The range must read back as zeroes afterwards.
    WriteZeroes,
}

/// Request modifiers, as frontends receive them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Force unit access: durable before the reply.
    pub fua: bool,
    /// For WriteZeroes: the range must stay allocated (no hole punching).
    pub no_hole: bool,
    /// For WriteZeroes: fail with EOPNOTSUPP rather than writing zeroes slowly.
    pub fast_zero: bool,
}

/// A request from a frontend, in array address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontIo {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub flags: Flags,
}

impl FrontIo {
    /// A request without FUA, NO_HOLE or FAST_ZERO.
    pub fn new(op: Op, offset: u64, len: u64) -> Self {
        FrontIo {
            op,
            offset,
            len,
            flags: Flags::default(),
        }
    }
}

/// Local members are on this machine; remote ones across a network. Scheduling and
/// metrics treat the two classes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Local,
    Remote,
}

/// The protocol a member speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    File,
    Blockdev,
    Mem,
    Null,
    Nbd,
    Iscsi,
    Aoe,
}

impl Proto {
    pub fn class(self) -> Class {
        match self {
            Proto::File | Proto::Blockdev | Proto::Mem | Proto::Null => Class::Local,
            Proto::Nbd | Proto::Iscsi | Proto::Aoe => Class::Remote,
        }
    }
}

/// Index of a member within its array.
pub type MemberId = u16;

/// The identity of one member I/O. Offsets are in member address space (the raw device,
/// metadata area included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub id: u64,
    pub class: Class,
    pub member: MemberId,
    pub proto: Proto,
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
}

static NEXT_TAG_ID: AtomicU64 = AtomicU64::new(1);

/// Ids a thread takes from NEXT_TAG_ID at a time.
const TAG_ID_BLOCK: u64 = 1 << 16;

/// A fresh, process-unique tag id; ids increase within a thread, not across threads.
/// Each thread takes a block of ids at a time: one shared counter bumped by every I/O on
/// both worker threads moved its cache line between the cores on every I/O.
pub fn next_tag_id() -> u64 {
    thread_local! {
        static BLOCK: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    BLOCK.with(|b| {
        let (mut next, mut end) = b.get();
        if next == end {
            next = NEXT_TAG_ID.fetch_add(TAG_ID_BLOCK, Ordering::Relaxed);
            end = next + TAG_ID_BLOCK;
        }
        b.set((next + 1, end));
        next
    })
}

/// A borrowed data buffer handed to a member. It points into a pool buffer that the
/// issuer keeps alive until the member's future completes: member futures are always
/// driven to completion (frontends spawn each request; nothing cancels a member I/O
/// mid-flight), which is what makes handing the raw pointer to io_uring sound.
#[derive(Debug, Clone, Copy)]
pub struct IoBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoBuf is a view of a pool buffer owned by the request that issued it; the
// issuer guarantees exclusive use for the I/O's duration (see the type's docs).
unsafe impl Send for IoBuf {}
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// An empty buffer, for ops that carry no data.
    pub const fn empty() -> Self {
        IoBuf {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay valid and unaliased until the I/O using it completes.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        IoBuf { ptr, len }
    }

    pub fn from_slice(s: &mut [u8]) -> Self {
        IoBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// # Safety
    /// The issuer's guarantee (see the type's docs) must hold.
    pub unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// # Safety
    /// The issuer's guarantee (see the type's docs) must hold.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

/// One I/O to one member: its tag and, for reads and writes, its data.
#[derive(Debug, Clone, Copy)]
pub struct MemberIo {
    pub tag: Tag,
    pub buf: IoBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_ids_are_unique_across_threads_and_rise_within_one() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let ids: Vec<u64> = (0..TAG_ID_BLOCK + 10).map(|_| next_tag_id()).collect();
                    assert!(
                        ids.windows(2).all(|w| w[0] < w[1]),
                        "ids rise within a thread"
                    );
                    ids
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "no id was handed out twice");
        assert!(!all.contains(&0), "0 is never an id");
    }
}
