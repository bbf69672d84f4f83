//! linear: members concatenated in layout order, each contributing its whole data area.

use super::{one, Level, LevelKind, Pieces};

pub struct Linear {
    /// Array offset at which each member starts, plus the total at the end.
    starts: Vec<u64>,
}

impl Linear {
    pub fn new(sizes: &[u64]) -> Self {
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut at = 0;
        for &s in sizes {
            starts.push(at);
            at += s;
        }
        starts.push(at);
        Linear { starts }
    }
}

impl Level for Linear {
    fn kind(&self) -> LevelKind {
        LevelKind::Linear
    }

    fn size(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    fn map(&self, offset: u64, len: u64, out: &mut Pieces) {
        let (mut off, end) = (offset, offset + len);
        while off < end {
            // The member whose range holds `off`: the last start <= off.
            let m = self.starts.partition_point(|&s| s <= off) - 1;
            let take = end.min(self.starts[m + 1]) - off;
            out.push(one(off - offset, take, m, off - self.starts[m]));
            off += take;
        }
    }

    fn tolerates(&self, failed: &[bool]) -> bool {
        !failed.iter().any(|&f| f)
    }

    fn member_span(&self, member: usize) -> u64 {
        self.starts[member + 1] - self.starts[member]
    }
}
