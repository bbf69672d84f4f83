//! raid0: chunks striped across members. With members of different sizes it follows md:
//! the first zone stripes across every member up to the smallest one's size, the next
//! zone across the members that are larger, and so on, so no space is wasted.

use super::{one, Level, LevelKind, Pieces};

struct Zone {
    /// Array offset where the zone starts.
    start: u64,
    /// Offset in each of its members' data areas where the zone starts.
    dev_start: u64,
    /// Members striped in this zone, in layout order.
    members: Vec<usize>,
    /// Bytes of array data in the zone.
    len: u64,
}

pub struct Raid0 {
    chunk: u64,
    zones: Vec<Zone>,
    spans: Vec<u64>,
}

impl Raid0 {
    pub fn new(sizes: &[u64], chunk: u64) -> Self {
        let spans: Vec<u64> = sizes.iter().map(|s| s / chunk * chunk).collect();
        let mut levels: Vec<u64> = spans.clone();
        levels.sort_unstable();
        levels.dedup();
        let (mut zones, mut start, mut prev) = (Vec::new(), 0u64, 0u64);
        for lvl in levels {
            let members: Vec<usize> = (0..spans.len()).filter(|&i| spans[i] >= lvl).collect();
            let len = (lvl - prev) * members.len() as u64;
            if len > 0 {
                zones.push(Zone {
                    start,
                    dev_start: prev,
                    members,
                    len,
                });
            }
            start += len;
            prev = lvl;
        }
        Raid0 {
            chunk,
            zones,
            spans,
        }
    }
}

impl Level for Raid0 {
    fn kind(&self) -> LevelKind {
        LevelKind::Raid0
    }

    fn size(&self) -> u64 {
        self.zones.last().map(|z| z.start + z.len).unwrap_or(0)
    }

    fn map(&self, offset: u64, len: u64, out: &mut Pieces) {
        let (mut off, end) = (offset, offset + len);
        while off < end {
            let z = &self.zones[self.zones.partition_point(|z| z.start <= off) - 1];
            let zoff = off - z.start;
            let (chunk_no, within) = (zoff / self.chunk, zoff % self.chunk);
            let n = z.members.len() as u64;
            let member = z.members[(chunk_no % n) as usize];
            let dev_off = z.dev_start + (chunk_no / n) * self.chunk + within;
            let take = (self.chunk - within).min(end - off);
            out.push(one(off - offset, take, member, dev_off));
            off += take;
        }
    }

    fn tolerates(&self, failed: &[bool]) -> bool {
        !failed.iter().any(|&f| f)
    }

    fn member_span(&self, member: usize) -> u64 {
        self.spans[member]
    }
}
