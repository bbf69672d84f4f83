//! raid1: every member holds the whole array (n-way mirror). The array is as large as the
//! smallest member, as in md. Which copy serves a read is the core's choice.

use smallvec::SmallVec;

use super::{Copy, Level, LevelKind, Piece, Pieces};

pub struct Raid1 {
    members: usize,
    size: u64,
}

impl Raid1 {
    pub fn new(sizes: &[u64]) -> Self {
        Raid1 {
            members: sizes.len(),
            size: sizes.iter().copied().min().unwrap_or(0),
        }
    }
}

impl Level for Raid1 {
    fn kind(&self) -> LevelKind {
        LevelKind::Raid1
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Pieces) {
        let copies: SmallVec<[Copy; 4]> = (0..self.members)
            .map(|member| Copy { member, offset })
            .collect();
        out.push(Piece {
            req_off: 0,
            len,
            copies,
        });
    }

    fn tolerates(&self, failed: &[bool]) -> bool {
        failed.iter().any(|&f| !f)
    }

    fn member_span(&self, _member: usize) -> u64 {
        self.size
    }
}
