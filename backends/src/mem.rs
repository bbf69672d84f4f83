//! `mem:SIZE`: a member held in anonymous memory, for tests and benchmarks. Pages are only
//! backed once written; trimmed ranges are handed back to the kernel. Volatile: nothing
//! survives the process, so flush and FUA have nothing to do.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::MmapMut;
use raidcore::{Caps, IoBuf, IoError, IoFuture, IoResult, Member, MemberInfo, MemberIo, Op, Proto};

/// Concurrent I/Os lock the 1 MiB regions they touch, so overlapping requests never race on
/// the same bytes while disjoint ones run in parallel.
const REGION: u64 = 1 << 20;

pub struct MemMember {
    info: MemberInfo,
    map: MmapMut,
    regions: Vec<RwLock<()>>,
}

impl MemMember {
    pub fn new(address: &str, size: u64) -> Self {
        Self::try_new(address, size).expect("anonymous mapping for mem member")
    }

    pub fn try_new(address: &str, size: u64) -> std::io::Result<Self> {
        let map = MmapMut::map_anon(size.max(4096) as usize)?;
        // Huge pages where the kernel allows them: copies in and out of a large mapping
        // otherwise spend much of their time on TLB misses. Advice only; failure is fine.
        // SAFETY: advising our own fresh private mapping.
        unsafe {
            libc::madvise(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                libc::MADV_HUGEPAGE,
            )
        };
        let regions = (0..size.div_ceil(REGION).max(1))
            .map(|_| RwLock::new(()))
            .collect();
        Ok(MemMember {
            info: MemberInfo {
                address: address.to_string(),
                class: Proto::Mem.class(),
                proto: Proto::Mem,
                size,
                block_size: 512,
                caps: Caps {
                    flush: false,
                    fua: false,
                    discard: true,
                    write_zeroes: true,
                },
                engine: "memory",
            },
            map,
            regions,
        })
    }

    fn region_range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let first = (off / REGION) as usize;
        let last = ((off + len.max(1) - 1) / REGION) as usize;
        first..last + 1
    }

    fn read_locks(&self, off: u64, len: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        self.region_range(off, len)
            .map(|i| self.regions[i].read().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    fn write_locks(&self, off: u64, len: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        self.region_range(off, len)
            .map(|i| self.regions[i].write().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    fn ptr(&self, off: u64) -> *mut u8 {
        // SAFETY: callers check off + len <= size, inside the mapping.
        unsafe { (self.map.as_ptr() as *mut u8).add(off as usize) }
    }

    fn check(&self, io: &MemberIo) -> IoResult {
        let t = &io.tag;
        match t.offset.checked_add(t.len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset: t.offset,
                len: t.len,
                size: self.info.size,
            }),
        }
    }

    fn execute(&self, io: MemberIo) -> IoResult {
        let t = io.tag;
        if t.op != Op::Flush {
            self.check(&io)?;
        }
        if matches!(t.op, Op::Read | Op::Write) && io.buf.as_ptr() == self.ptr(t.offset) {
            // Our own bytes, lent to the frontend (see lend): a write is already in
            // place and a read already where the frontend sends it from.
            return Ok(());
        }
        match t.op {
            Op::Read => {
                let _g = self.read_locks(t.offset, t.len);
                // SAFETY: range checked; the region locks exclude concurrent writers; the
                // buffer is the issuer's (see IoBuf).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ptr(t.offset),
                        io.buf.as_ptr(),
                        t.len as usize,
                    )
                };
            }
            Op::Write => {
                let _g = self.write_locks(t.offset, t.len);
                // SAFETY: as for reads, with exclusive region locks.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        io.buf.as_ptr(),
                        self.ptr(t.offset),
                        t.len as usize,
                    )
                };
            }
            Op::Trim | Op::WriteZeroes => {
                let _g = self.write_locks(t.offset, t.len);
                self.zero(t.offset, t.len);
            }
            Op::Flush => {}
        }
        Ok(())
    }

    /// Zero a range: whole pages go back to the kernel (they read as zeroes afterwards),
    /// partial pages are cleared by hand.
    fn zero(&self, off: u64, len: u64) {
        let page = 4096u64;
        let (start, end) = (off.div_ceil(page) * page, (off + len) / page * page);
        if start < end {
            // SAFETY: a page-aligned range inside our private anonymous mapping; MADV_DONTNEED
            // on such a mapping makes it read back as zeroes.
            let rc = unsafe {
                libc::madvise(
                    self.ptr(start) as *mut libc::c_void,
                    (end - start) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                self.clear(off, start - off);
                self.clear(end, off + len - end);
                return;
            }
        }
        self.clear(off, len);
    }

    fn clear(&self, off: u64, len: u64) {
        // SAFETY: range inside the mapping, under the caller's write locks.
        unsafe { std::ptr::write_bytes(self.ptr(off), 0, len as usize) };
    }
}

impl Member for MemMember {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        // Memory copies are fast enough to do inline; no task hop.
        let r = self.execute(io);
        raidcore::io_future(std::future::ready(r))
    }

    /// A frontend receiving a write straight into the mapping saves the copy from its
    /// buffer, the largest cost of a large write to memory after the socket's own copy.
    fn lend(&self, offset: u64, len: u64) -> Option<IoBuf> {
        let end = offset.checked_add(len)?;
        if end > self.info.size {
            return None;
        }
        // SAFETY: inside the mapping, which lives as long as we do; callers keep us
        // alive while they hold the bytes (see Member::lend).
        Some(unsafe { IoBuf::from_raw(self.ptr(offset), len as usize) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raidcore::io::{next_tag_id, IoBuf, Tag};

    fn io(op: Op, offset: u64, buf: &mut [u8]) -> MemberIo {
        MemberIo {
            tag: Tag {
                id: next_tag_id(),
                class: raidcore::Class::Local,
                member: 0,
                proto: Proto::Mem,
                op,
                offset,
                len: buf.len() as u64,
                fua: false,
            },
            buf: IoBuf::from_slice(buf),
        }
    }

    #[tokio::test]
    async fn writes_read_back_and_zeroes_clear() {
        let m = MemMember::new("mem:8MiB", 8 << 20);
        let mut w: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        m.submit(io(Op::Write, 512, &mut w)).await.unwrap();
        let mut r = vec![0u8; 3 << 20];
        m.submit(io(Op::Read, 512, &mut r)).await.unwrap();
        assert_eq!(r, w);
        let mut z = vec![0u8; 2 << 20];
        let mut zio = io(Op::WriteZeroes, 1000, &mut z);
        zio.buf = IoBuf::empty();
        m.submit(zio).await.unwrap();
        m.submit(io(Op::Read, 512, &mut r)).await.unwrap();
        assert!(r[..488].iter().zip(&w[..488]).all(|(a, b)| a == b));
        assert!(r[488..488 + (2 << 20)].iter().all(|&b| b == 0));
        assert_eq!(r[488 + (2 << 20)..], w[488 + (2 << 20)..]);
    }

    #[tokio::test]
    async fn out_of_range_is_an_error() {
        let m = MemMember::new("mem:1MiB", 1 << 20);
        let mut b = vec![0u8; 4096];
        assert!(m
            .submit(io(Op::Read, (1 << 20) - 512, &mut b))
            .await
            .is_err());
    }
}
