//! raid10, md's "near 2" layout: each chunk is written twice, to consecutive positions of
//! the chunk grid laid row by row across the members. Works with an odd member count too
//! (copies then wrap to the next row). The array holds (members x smallest / 2) bytes,
//! rounded to whole chunks.

use smallvec::SmallVec;

use super::{Copy, Level, LevelKind, Piece, Pieces};

const COPIES: u64 = 2;

pub struct Raid10 {
    chunk: u64,
    members: u64,
    /// Chunks of array data.
    chunks: u64,
    span: u64,
}

impl Raid10 {
    pub fn new(sizes: &[u64], chunk: u64) -> Self {
        let rows = sizes.iter().copied().min().unwrap_or(0) / chunk;
        let members = sizes.len() as u64;
        Raid10 {
            chunk,
            members,
            chunks: rows * members / COPIES,
            span: rows * chunk,
        }
    }

    /// The member and member offset of grid position `pos`.
    fn place(&self, pos: u64) -> (usize, u64) {
        (
            (pos % self.members) as usize,
            (pos / self.members) * self.chunk,
        )
    }
}

impl Level for Raid10 {
    fn kind(&self) -> LevelKind {
        LevelKind::Raid10
    }

    fn size(&self) -> u64 {
        self.chunks * self.chunk
    }

    fn map(&self, offset: u64, len: u64, out: &mut Pieces) {
        let (mut off, end) = (offset, offset + len);
        while off < end {
            let (chunk_no, within) = (off / self.chunk, off % self.chunk);
            let take = (self.chunk - within).min(end - off);
            let copies: SmallVec<[Copy; 4]> = (0..COPIES)
                .map(|c| {
                    let (member, base) = self.place(chunk_no * COPIES + c);
                    Copy {
                        member,
                        offset: base + within,
                    }
                })
                .collect();
            out.push(Piece {
                req_off: off - offset,
                len: take,
                copies,
            });
            off += take;
        }
    }

    fn tolerates(&self, failed: &[bool]) -> bool {
        // The placement repeats every `members` chunks, so checking one period suffices.
        (0..self.members.min(self.chunks))
            .all(|k| (0..COPIES).any(|c| !failed[self.place(k * COPIES + c).0]))
    }

    fn member_span(&self, _member: usize) -> u64 {
        self.span
    }
}
