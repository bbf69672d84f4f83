//! RAID levels. Each level is pure address arithmetic behind one trait: it maps a range of
//! the array to *pieces*, each piece to one or more *copies* (member, offset). The core
//! reads one copy and writes all of them, so stripes (one copy) and mirrors (n copies)
//! share one execution path and a level never sees an I/O, a protocol or a buffer.
//! Parity levels (raid5/6) will add their own plan kind to this trait.

mod linear;
mod raid0;
mod raid1;
mod raid10;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use thiserror::Error;

pub use linear::Linear;
pub use raid0::Raid0;
pub use raid1::Raid1;
pub use raid10::Raid10;

/// Where one copy of a piece lives: a member index and an offset in that member's data
/// area (the core adds the metadata offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    pub member: usize,
    pub offset: u64,
}

/// A contiguous part of a request that lives contiguously on each of its copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Offset of this piece within the request.
    pub req_off: u64,
    pub len: u64,
    pub copies: SmallVec<[Copy; 4]>,
}

/// The pieces of one request. Inline up to four (every request that stays inside one
/// chunk, or crosses one boundary), so mapping an I/O allocates nothing.
pub type Pieces = SmallVec<[Piece; 4]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LevelKind {
    Linear,
    Raid0,
    Raid1,
    Raid10,
}

impl LevelKind {
    pub const ALL: [LevelKind; 4] = [
        LevelKind::Linear,
        LevelKind::Raid0,
        LevelKind::Raid1,
        LevelKind::Raid10,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LevelKind::Linear => "linear",
            LevelKind::Raid0 => "raid0",
            LevelKind::Raid1 => "raid1",
            LevelKind::Raid10 => "raid10",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        LevelKind::ALL.into_iter().find(|l| l.name() == s)
    }

    /// Stable number for the superblock.
    pub fn code(self) -> u32 {
        match self {
            LevelKind::Linear => 0,
            LevelKind::Raid0 => 1,
            LevelKind::Raid1 => 2,
            LevelKind::Raid10 => 3,
        }
    }

    pub fn from_code(c: u32) -> Option<Self> {
        LevelKind::ALL.into_iter().find(|l| l.code() == c)
    }

    /// Fewest members the level accepts.
    pub fn min_members(self) -> usize {
        match self {
            LevelKind::Linear => 1,
            LevelKind::Raid0 | LevelKind::Raid1 | LevelKind::Raid10 => 2,
        }
    }

    /// Whether the level uses a chunk size.
    pub fn uses_chunk(self) -> bool {
        matches!(self, LevelKind::Raid0 | LevelKind::Raid10)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LevelError {
    #[error("{level} needs at least {min} members, the layout names {got}")]
    TooFewMembers {
        level: &'static str,
        min: usize,
        got: usize,
    },
    #[error("chunk size {0} bytes is not a power of two of at least 4 KiB")]
    BadChunk(u64),
    #[error("member #{index} has {size} data bytes, less than one chunk of {chunk} bytes")]
    MemberTooSmall { index: usize, size: u64, chunk: u64 },
}

/// One RAID level's address arithmetic.
pub trait Level: Send + Sync {
    fn kind(&self) -> LevelKind;

    /// Bytes of array data.
    fn size(&self) -> u64;

    /// Append to `out` the pieces of `[offset, offset+len)`, in request order. The range
    /// lies inside `size()`.
    fn map(&self, offset: u64, len: u64, out: &mut Pieces);

    /// Whether every byte of the array still has a copy on a member not in `failed`.
    fn tolerates(&self, failed: &[bool]) -> bool;

    /// Bytes of each member's data area the layout uses (the rest is left unused).
    fn member_span(&self, member: usize) -> u64;
}

/// Build a level over members whose data areas have the given sizes.
pub fn build(kind: LevelKind, sizes: &[u64], chunk: u64) -> Result<Box<dyn Level>, LevelError> {
    if sizes.len() < kind.min_members() {
        return Err(LevelError::TooFewMembers {
            level: kind.name(),
            min: kind.min_members(),
            got: sizes.len(),
        });
    }
    if kind.uses_chunk() {
        if chunk < 4096 || !chunk.is_power_of_two() {
            return Err(LevelError::BadChunk(chunk));
        }
        if let Some((index, &size)) = sizes.iter().enumerate().find(|(_, &s)| s < chunk) {
            return Err(LevelError::MemberTooSmall { index, size, chunk });
        }
    }
    Ok(match kind {
        LevelKind::Linear => Box::new(Linear::new(sizes)),
        LevelKind::Raid0 => Box::new(Raid0::new(sizes, chunk)),
        LevelKind::Raid1 => Box::new(Raid1::new(sizes)),
        LevelKind::Raid10 => Box::new(Raid10::new(sizes, chunk)),
    })
}

/// A single-copy piece.
fn one(req_off: u64, len: u64, member: usize, offset: u64) -> Piece {
    let mut copies = SmallVec::new();
    copies.push(Copy { member, offset });
    Piece {
        req_off,
        len,
        copies,
    }
}

#[cfg(test)]
mod tests;
