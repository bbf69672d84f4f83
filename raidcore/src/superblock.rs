//! The member superblock: 4 KiB at byte 4096 of every member, little-endian, stable from
//! the first release. Array data starts at `data_offset` (default 1 MiB). The write-intent
//! bitmap, when there is one, follows the superblock; its location and chunk size are
//! recorded here so resync can build on this layout without changing it.

use thiserror::Error;
use uuid::Uuid;

use crate::level::LevelKind;

pub const SB_OFFSET: u64 = 4096;
pub const SB_SIZE: usize = 4096;
pub const MAGIC: [u8; 8] = *b"UNIBLKSB";
pub const VERSION: u32 = 1;
pub const DEFAULT_DATA_OFFSET: u64 = 1 << 20;
const NAME_LEN: usize = 64;
const CSUM_AT: usize = SB_SIZE - 4;

/// Whether the array was shut down cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbState {
    Clean = 0,
    Active = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub array_uuid: Uuid,
    pub member_uuid: Uuid,
    pub array_name: String,
    pub level: LevelKind,
    /// This member's index in the array.
    pub role: u32,
    pub members: u32,
    pub chunk: u64,
    pub data_offset: u64,
    /// Bytes of this member's data area.
    pub data_size: u64,
    /// Bumped at every assembly and clean stop; the newest member wins on disagreement.
    pub events: u64,
    pub state: SbState,
    /// Byte offset of the write-intent bitmap (0: none yet).
    pub bitmap_offset: u64,
    pub bitmap_chunk: u64,
    pub created_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SbError {
    #[error("no uniblk superblock (blank member)")]
    Blank,
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("superblock version {0} is newer than this uniblk understands ({VERSION})")]
    Version(u32),
    #[error("superblock names unknown RAID level code {0}")]
    Level(u32),
    #[error("superblock field out of range: {0}")]
    Field(&'static str),
}

struct Cursor<'a> {
    b: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.b[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

fn get<const N: usize>(b: &[u8], at: &mut usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[*at..*at + N]);
    *at += N;
    out
}

impl Superblock {
    /// Serialise into a 4096-byte block (checksum last).
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= SB_SIZE);
        let out = &mut out[..SB_SIZE];
        out.fill(0);
        let mut name = [0u8; NAME_LEN];
        let n = self.array_name.len().min(NAME_LEN);
        name[..n].copy_from_slice(&self.array_name.as_bytes()[..n]);
        let mut c = Cursor { b: out, at: 0 };
        c.put(&MAGIC);
        c.put(&VERSION.to_le_bytes());
        c.put(&0u32.to_le_bytes()); // feature flags
        c.put(self.array_uuid.as_bytes());
        c.put(self.member_uuid.as_bytes());
        c.put(&name);
        c.put(&self.level.code().to_le_bytes());
        c.put(&self.role.to_le_bytes());
        c.put(&self.members.to_le_bytes());
        c.put(&(self.state as u32).to_le_bytes());
        for v in [
            self.chunk,
            self.data_offset,
            self.data_size,
            self.events,
            self.bitmap_offset,
            self.bitmap_chunk,
            self.created_unix,
        ] {
            c.put(&v.to_le_bytes());
        }
        let csum = crc32c::crc32c(&out[..CSUM_AT]);
        out[CSUM_AT..].copy_from_slice(&csum.to_le_bytes());
    }

    /// Parse a 4096-byte block. A block without the magic is `Blank`.
    pub fn decode(b: &[u8]) -> Result<Self, SbError> {
        if b.len() < SB_SIZE || b[..8] != MAGIC {
            return Err(SbError::Blank);
        }
        let stored = u32::from_le_bytes(b[CSUM_AT..SB_SIZE].try_into().unwrap());
        let computed = crc32c::crc32c(&b[..CSUM_AT]);
        if stored != computed {
            return Err(SbError::Checksum { stored, computed });
        }
        let mut at = 8;
        let u32_at = |at: &mut usize| u32::from_le_bytes(get::<4>(b, at));
        let u64_at = |at: &mut usize| u64::from_le_bytes(get::<8>(b, at));
        let version = u32_at(&mut at);
        if version > VERSION {
            return Err(SbError::Version(version));
        }
        let _features = u32_at(&mut at);
        let array_uuid = Uuid::from_bytes(get::<16>(b, &mut at));
        let member_uuid = Uuid::from_bytes(get::<16>(b, &mut at));
        let name = get::<NAME_LEN>(b, &mut at);
        let end = name.iter().position(|&x| x == 0).unwrap_or(NAME_LEN);
        let array_name = String::from_utf8_lossy(&name[..end]).into_owned();
        let level_code = u32_at(&mut at);
        let level = LevelKind::from_code(level_code).ok_or(SbError::Level(level_code))?;
        let role = u32_at(&mut at);
        let members = u32_at(&mut at);
        let state = match u32_at(&mut at) {
            0 => SbState::Clean,
            1 => SbState::Active,
            _ => return Err(SbError::Field("state")),
        };
        let sb = Superblock {
            array_uuid,
            member_uuid,
            array_name,
            level,
            role,
            members,
            state,
            chunk: u64_at(&mut at),
            data_offset: u64_at(&mut at),
            data_size: u64_at(&mut at),
            events: u64_at(&mut at),
            bitmap_offset: u64_at(&mut at),
            bitmap_chunk: u64_at(&mut at),
            created_unix: u64_at(&mut at),
        };
        if role >= members || members == 0 || members > 4096 {
            return Err(SbError::Field("role/members"));
        }
        if sb.data_offset < SB_OFFSET + SB_SIZE as u64 || !sb.data_offset.is_multiple_of(4096) {
            return Err(SbError::Field("data_offset"));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            array_uuid: Uuid::new_v4(),
            member_uuid: Uuid::new_v4(),
            array_name: "data0".into(),
            level: LevelKind::Raid10,
            role: 2,
            members: 4,
            chunk: 65536,
            data_offset: DEFAULT_DATA_OFFSET,
            data_size: 1 << 30,
            events: 7,
            state: SbState::Active,
            bitmap_offset: 0,
            bitmap_chunk: 0,
            created_unix: 1_700_000_000,
        }
    }

    #[test]
    fn round_trips() {
        let sb = sample();
        let mut b = vec![0u8; SB_SIZE];
        sb.encode(&mut b);
        assert_eq!(&b[..8], b"UNIBLKSB");
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
    }

    #[test]
    fn corruption_is_detected() {
        let mut b = vec![0u8; SB_SIZE];
        sample().encode(&mut b);
        b[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(SbError::Checksum { .. })
        ));
        assert_eq!(Superblock::decode(&[0u8; SB_SIZE]), Err(SbError::Blank));
    }

    #[test]
    fn nonsense_fields_are_refused_even_with_a_good_checksum() {
        let mut sb = sample();
        sb.role = 9;
        let mut b = vec![0u8; SB_SIZE];
        sb.encode(&mut b);
        assert!(matches!(Superblock::decode(&b), Err(SbError::Field(_))));
    }
}
