//! One ublk request: decoding the kernel's I/O descriptor into a `FrontIo`, and running
//! it against the array on the tokio runtime.
//!
//! Data path (plain copy mode, the only one the 6.12 driver offers us here): the kernel
//! copies a write's pages into the tag's ublk I/O buffer before handing us the request,
//! and copies a read's data out of it when we commit. Members then read and write that
//! buffer directly (`Array::submit_in_place`; ublk requests are whole, aligned blocks and
//! the tag buffer is page aligned), so there is no copy in user space. Only a request that
//! is somehow not aligned goes through a pool buffer with one copy. Kernels with
//! UBLK_F_AUTO_BUF_REG (6.15+) could skip the kernel's copy too; left for later.

use std::sync::Arc;

use libublk::helpers::IoBuf;
use libublk::sys;
use raidcore::{Array, Flags, FrontIo, IoError, Op};

/// Decode a descriptor. `buf_len` is the tag's I/O buffer size. Err is a positive errno.
pub fn decode(iod: &sys::ublksrv_io_desc, buf_len: usize) -> Result<FrontIo, i32> {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write,
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Trim,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(libc::EOPNOTSUPP),
    };
    let flags = Flags {
        fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
        no_hole: iod.op_flags & sys::UBLK_IO_F_NOUNMAP != 0,
        fast_zero: false,
    };
    // FLUSH first: it has no range, and checking one would fail every flush.
    if op == Op::Flush {
        return Ok(FrontIo {
            op,
            offset: 0,
            len: 0,
            flags,
        });
    }
    let offset = iod.start_sector.checked_mul(512).ok_or(libc::EINVAL)?;
    let len = u64::from(iod.nr_sectors) * 512;
    if matches!(op, Op::Read | Op::Write) && len > buf_len as u64 {
        return Err(libc::EINVAL);
    }
    // The array checks the range against its size.
    Ok(FrontIo {
        op,
        offset,
        len,
        flags,
    })
}

/// A tag's ublk I/O buffer, lent to the tokio task serving the tag's current request.
///
/// Sound because of how a tag is served: the kernel touches the buffer only while it owns
/// the tag (before it hands us the request, and after we commit), and the tag's task on
/// the queue thread waits for this request's result before it commits or touches the
/// buffer again. So while the tokio task runs, it is the buffer's only user. The `Arc`
/// keeps the memory alive even if the queue thread goes away first.
pub struct TagBuf(pub Arc<IoBuf<u8>>);

impl TagBuf {
    /// Copy the request's data out (writes). `dst.len()` must not exceed the buffer.
    fn copy_to(&self, dst: &mut [u8]) {
        let n = dst.len().min(self.0.len());
        // SAFETY: see the type: we are the buffer's only user; the kernel filled its first
        // `len` bytes before handing the request over; n is within the allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr(), dst.as_mut_ptr(), n) }
    }

    /// Copy read data in, for the kernel to pick up at commit.
    fn copy_from(&self, src: &[u8]) {
        let n = src.len().min(self.0.len());
        // SAFETY: see the type: exclusive use for this request; n is within the
        // allocation, which does not overlap the pool buffer `src` points into.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.as_mut_ptr(), n) }
    }
}

/// Run one request against the array. Returns what ublk expects: the byte count for
/// reads and writes (a short count would make the kernel resubmit the rest), 0 for the
/// rest, a negative errno on failure.
pub async fn execute(array: &Array, io: FrontIo, data: &TagBuf) -> i32 {
    let r = match io.op {
        Op::Read => read(array, io, data).await,
        Op::Write => write(array, io, data).await,
        _ => array.submit(io, None).await,
    };
    match r {
        Ok(()) if matches!(io.op, Op::Read | Op::Write) => io.len as i32,
        Ok(()) => 0,
        Err(e) => {
            tracing::debug!(array = %array.name, ?io, error = %e, "ublk request failed");
            -e.block_errno()
        }
    }
}

/// The tag buffer as the array's view of the request's data, when it can be used in place.
fn in_place(array: &Array, io: &FrontIo, data: &TagBuf) -> Option<raidcore::IoBuf> {
    let bs = array.block_size() as u64;
    let fits = io.len <= data.0.len() as u64
        && io.offset.is_multiple_of(bs)
        && io.len.is_multiple_of(bs)
        && (data.0.as_ptr() as u64).is_multiple_of(bs);
    // SAFETY: see TagBuf: exclusive use of the buffer for this request, which the array
    // I/O (driven to completion before we commit) does not outlive.
    fits.then(|| unsafe { raidcore::IoBuf::from_raw(data.0.as_mut_ptr(), io.len as usize) })
}

async fn read(array: &Array, io: FrontIo, data: &TagBuf) -> Result<(), IoError> {
    if let Some(buf) = in_place(array, &io, data) {
        return array.submit_in_place(io, buf).await;
    }
    let mut fb = array.buffer(io.offset, io.len).await?;
    array.submit(io, Some(&mut fb)).await?;
    data.copy_from(fb.data());
    Ok(())
}

async fn write(array: &Array, io: FrontIo, data: &TagBuf) -> Result<(), IoError> {
    if let Some(buf) = in_place(array, &io, data) {
        return array.submit_in_place(io, buf).await;
    }
    let mut fb = array.buffer(io.offset, io.len).await?;
    data.copy_to(fb.data_mut());
    array.submit(io, Some(&mut fb)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iod(op: u32, flags: u32, sector: u64, sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    #[test]
    fn ops_and_flags_decode() {
        let r = decode(&iod(sys::UBLK_IO_OP_READ, 0, 8, 8), 1 << 20).unwrap();
        assert_eq!((r.op, r.offset, r.len), (Op::Read, 4096, 4096));
        let w = decode(&iod(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 0, 1), 4096).unwrap();
        assert!(w.flags.fua);
        let z = decode(
            &iod(
                sys::UBLK_IO_OP_WRITE_ZEROES,
                sys::UBLK_IO_F_NOUNMAP,
                0,
                1 << 20,
            ),
            4096,
        )
        .unwrap();
        assert_eq!(z.op, Op::WriteZeroes);
        assert!(z.flags.no_hole);
        assert_eq!(z.len, 512 << 20, "zeroing carries no data: no buffer limit");
        let d = decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 0, 8), 4096).unwrap();
        assert_eq!(d.op, Op::Trim);
    }

    #[test]
    fn flush_is_decoded_before_any_range_check() {
        // Garbage in the range fields of a flush must not fail it.
        let f = decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, u32::MAX), 0).unwrap();
        assert_eq!((f.op, f.offset, f.len), (Op::Flush, 0, 0));
    }

    #[test]
    fn bad_descriptors_get_errnos() {
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_ZONE_APPEND, 0, 0, 1), 4096),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_READ, 0, u64::MAX / 2, 1), 4096),
            Err(libc::EINVAL)
        );
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_WRITE, 0, 0, 16), 4096),
            Err(libc::EINVAL),
            "larger than the tag buffer"
        );
    }
}
