//! `null:SIZE`: reads return zeroes, writes are discarded. The protocol ceiling for
//! benchmarks: it measures everything but storage.

use raidcore::{Caps, IoError, IoFuture, Member, MemberInfo, MemberIo, Op, Proto};

pub struct NullMember {
    info: MemberInfo,
}

impl NullMember {
    pub fn new(address: &str, size: u64) -> Self {
        NullMember {
            info: MemberInfo {
                address: address.to_string(),
                class: Proto::Null.class(),
                proto: Proto::Null,
                size,
                block_size: 512,
                caps: Caps {
                    flush: false,
                    fua: false,
                    discard: true,
                    write_zeroes: true,
                },
                engine: "null",
            },
        }
    }
}

impl Member for NullMember {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        let t = io.tag;
        let r = if t.op != Op::Flush
            && t.offset
                .checked_add(t.len)
                .is_none_or(|e| e > self.info.size)
        {
            Err(IoError::OutOfRange {
                offset: t.offset,
                len: t.len,
                size: self.info.size,
            })
        } else {
            if t.op == Op::Read {
                // SAFETY: the issuer owns the buffer for the I/O's duration (see IoBuf).
                unsafe { io.buf.as_mut_slice().fill(0) };
            }
            Ok(())
        };
        raidcore::io_future(std::future::ready(r))
    }
}
