//! AoE frames (revision 1, the r11 specification): the Ethernet header, the common AoE
//! header, and the argument blocks of the two commands an initiator needs, ATA (0) and
//! Query Config (1). Encoding writes into a caller's buffer (no allocation per frame);
//! decoding checks every length and field it reads, so a malformed frame from the wire is
//! an error value, never a panic.
//!
//! Frames under Ethernet's 60-byte minimum are accepted: veth does not pad, and vblade's
//! Query Config reply is 37 bytes.

use std::fmt;

/// The AoE EtherType.
pub const ETHERTYPE: u16 = 0x88A2;
/// Ethernet header: destination, source, EtherType.
pub const ETH_LEN: usize = 14;
/// Ethernet + AoE common header (ver/flags, error, major, minor, command, tag).
pub const HEADER_LEN: usize = ETH_LEN + 10;
/// Header + ATA arguments; sector data follows.
pub const ATA_LEN: usize = HEADER_LEN + 12;
/// Header + Query Config arguments; the config string follows.
pub const CONFIG_LEN: usize = HEADER_LEN + 8;
pub const SECTOR: usize = 512;
pub const BROADCAST: Mac = Mac([0xff; 6]);
/// The wildcard shelf and slot of a broadcast query.
pub const ANY_SHELF: u16 = 0xffff;
pub const ANY_SLOT: u8 = 0xff;

/// The protocol version in the high nibble of byte 14.
const VERSION: u8 = 1;
const FLAG_RESPONSE: u8 = 0x08;
const FLAG_ERROR: u8 = 0x04;

pub const CMD_ATA: u8 = 0;
pub const CMD_CONFIG: u8 = 1;

/// ATA argument flags.
const AFLAG_EXTENDED: u8 = 0x40;
const AFLAG_WRITE: u8 = 0x01;

/// ATA commands.
pub const ATA_READ_EXT: u8 = 0x24;
pub const ATA_WRITE_EXT: u8 = 0x34;
pub const ATA_FLUSH_EXT: u8 = 0xEA;
pub const ATA_FLUSH: u8 = 0xE7;
pub const ATA_IDENTIFY: u8 = 0xEC;
/// ATA status bits: error, device fault.
const ATA_ERR: u8 = 0x01;
const ATA_DF: u8 = 0x20;

/// The largest LBA an LBA48 command can address.
pub const MAX_LBA48: u64 = (1 << 48) - 1;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The fields of the common header a frame is addressed and matched by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub dst: Mac,
    pub src: Mac,
    pub shelf: u16,
    pub slot: u8,
    pub command: u8,
    pub tag: u32,
}

/// A decoded response header: who answered, to what, and whether it is an AoE error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub src: Mac,
    pub shelf: u16,
    pub slot: u8,
    pub command: u8,
    pub tag: u32,
    /// The AoE error code when the error flag is set.
    pub error: Option<u8>,
}

/// Why a received frame was not taken. Each is counted and the frame dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    Short {
        len: usize,
        need: usize,
    },
    NotAoe(u16),
    Version(u8),
    /// A request (ours or another initiator's), not a response.
    NotResponse,
    /// An ATA reply with less sector data than the request asked for.
    ShortData {
        have: usize,
        need: usize,
    },
}

impl fmt::Display for BadFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadFrame::Short { len, need } => write!(f, "{len}-byte frame, need {need}"),
            BadFrame::NotAoe(t) => write!(f, "EtherType {t:#06x} is not AoE"),
            BadFrame::Version(v) => write!(f, "AoE version {v}, only 1 is spoken"),
            BadFrame::NotResponse => write!(f, "not a response"),
            BadFrame::ShortData { have, need } => {
                write!(f, "{have} bytes of sector data, need {need}")
            }
        }
    }
}

fn need(frame: &[u8], len: usize) -> Result<(), BadFrame> {
    if frame.len() < len {
        return Err(BadFrame::Short {
            len: frame.len(),
            need: len,
        });
    }
    Ok(())
}

/// Write the Ethernet and AoE headers of a request into `out[..HEADER_LEN]`.
pub fn put_header(out: &mut [u8], h: &Header) {
    out[0..6].copy_from_slice(&h.dst.0);
    out[6..12].copy_from_slice(&h.src.0);
    out[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    out[14] = VERSION << 4;
    out[15] = 0;
    out[16..18].copy_from_slice(&h.shelf.to_be_bytes());
    out[18] = h.slot;
    out[19] = h.command;
    out[20..24].copy_from_slice(&h.tag.to_be_bytes());
}

/// Decode the headers of a received frame; only well-formed AoE v1 responses pass.
pub fn parse_reply(frame: &[u8]) -> Result<Reply, BadFrame> {
    need(frame, HEADER_LEN)?;
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETHERTYPE {
        return Err(BadFrame::NotAoe(ethertype));
    }
    let (ver, flags) = (frame[14] >> 4, frame[14] & 0x0f);
    if ver != VERSION {
        return Err(BadFrame::Version(ver));
    }
    if flags & FLAG_RESPONSE == 0 {
        return Err(BadFrame::NotResponse);
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    Ok(Reply {
        src: Mac(src),
        shelf: u16::from_be_bytes([frame[16], frame[17]]),
        slot: frame[18],
        command: frame[19],
        tag: u32::from_be_bytes([frame[20], frame[21], frame[22], frame[23]]),
        error: (flags & FLAG_ERROR != 0).then_some(frame[15]),
    })
}

/// What an AoE error code means, for messages.
pub fn error_text(code: u8) -> &'static str {
    match code {
        1 => "unrecognized command code",
        2 => "bad argument parameter",
        3 => "device unavailable",
        4 => "config string present",
        5 => "unsupported version",
        6 => "target is reserved",
        _ => "unknown AoE error",
    }
}

/// The errno an AoE error code maps to.
pub fn error_errno(code: u8) -> i32 {
    match code {
        1 => libc::EOPNOTSUPP,
        2 => libc::EINVAL,
        3 => libc::ENODEV,
        6 => libc::EBUSY,
        _ => libc::EIO,
    }
}

/// The argument block of an ATA request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtaArgs {
    pub command: u8,
    pub lba: u64,
    pub sectors: u8,
    /// Sector data follows the arguments (a write).
    pub write: bool,
    /// LBA48 (the EXT commands).
    pub extended: bool,
}

impl AtaArgs {
    pub fn read(lba: u64, sectors: u8) -> Self {
        Self::ext(ATA_READ_EXT, lba, sectors, false)
    }

    pub fn write(lba: u64, sectors: u8) -> Self {
        Self::ext(ATA_WRITE_EXT, lba, sectors, true)
    }

    pub fn flush() -> Self {
        Self::ext(ATA_FLUSH_EXT, 0, 0, false)
    }

    pub fn identify() -> Self {
        AtaArgs {
            command: ATA_IDENTIFY,
            lba: 0,
            sectors: 1,
            write: false,
            extended: false,
        }
    }

    fn ext(command: u8, lba: u64, sectors: u8, write: bool) -> Self {
        AtaArgs {
            command,
            lba,
            sectors,
            write,
            extended: true,
        }
    }

    /// Bytes of sector data the request carries (writes) or expects back (reads).
    pub fn data_len(&self) -> usize {
        usize::from(self.sectors) * SECTOR
    }

    /// Write the arguments into `out[HEADER_LEN..ATA_LEN]`.
    pub fn put(&self, out: &mut [u8]) {
        let a = &mut out[HEADER_LEN..ATA_LEN];
        a[0] = (if self.extended { AFLAG_EXTENDED } else { 0 })
            | (if self.write { AFLAG_WRITE } else { 0 });
        a[1] = 0; // features
        a[2] = self.sectors;
        a[3] = self.command;
        let lba = self.lba.to_le_bytes();
        a[4..10].copy_from_slice(&lba[..6]);
        a[10] = 0;
        a[11] = 0;
    }
}

/// The ATA part of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtaReply {
    pub status: u8,
    pub error: u8,
}

impl AtaReply {
    /// The device reported an error or a fault for the command.
    pub fn failed(&self) -> bool {
        self.status & (ATA_ERR | ATA_DF) != 0
    }
}

/// The ATA arguments of a reply; its sector data (if any) starts at `ATA_LEN`.
pub fn parse_ata(frame: &[u8]) -> Result<AtaReply, BadFrame> {
    need(frame, ATA_LEN)?;
    Ok(AtaReply {
        error: frame[HEADER_LEN + 1],
        status: frame[HEADER_LEN + 3],
    })
}

/// The sector data of an ATA read reply, checked to hold `len` bytes.
pub fn ata_data(frame: &[u8], len: usize) -> Result<&[u8], BadFrame> {
    let have = frame.len().saturating_sub(ATA_LEN);
    if have < len {
        return Err(BadFrame::ShortData { have, need: len });
    }
    Ok(&frame[ATA_LEN..ATA_LEN + len])
}

/// A Query Config request asks for the configuration (ccmd 0: read) of a target.
pub fn put_config_query(out: &mut [u8]) {
    out[HEADER_LEN..CONFIG_LEN].fill(0);
}

/// What a target says about itself in its Query Config reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Requests the target can hold at once: the initiator's window.
    pub buffers: u16,
    pub firmware: u16,
    /// The most sectors one ATA request may carry (0 is read as 2, per the spec).
    pub max_sectors: u8,
    pub aoe_version: u8,
    pub config: Vec<u8>,
}

pub fn parse_config(frame: &[u8]) -> Result<Config, BadFrame> {
    need(frame, CONFIG_LEN)?;
    let a = &frame[HEADER_LEN..CONFIG_LEN];
    let len = usize::from(u16::from_be_bytes([a[6], a[7]]));
    // The config string is whatever of its announced length arrived (at most 1024).
    let end = (CONFIG_LEN + len.min(1024)).min(frame.len());
    Ok(Config {
        buffers: u16::from_be_bytes([a[0], a[1]]),
        firmware: u16::from_be_bytes([a[2], a[3]]),
        max_sectors: if a[4] == 0 { 2 } else { a[4] },
        aoe_version: a[5] >> 4,
        config: frame[CONFIG_LEN..end].to_vec(),
    })
}

/// What IDENTIFY DEVICE tells an initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Addressable sectors (LBA48 count when supported, else the LBA28 count).
    pub sectors: u64,
    pub lba48: bool,
}

/// Decode the 512-byte IDENTIFY DEVICE block (little-endian 16-bit words).
pub fn parse_identify(block: &[u8]) -> Result<Identity, BadFrame> {
    if block.len() < SECTOR {
        return Err(BadFrame::ShortData {
            have: block.len(),
            need: SECTOR,
        });
    }
    let word = |i: usize| u16::from_le_bytes([block[2 * i], block[2 * i + 1]]);
    // Word 83 bit 10: the 48-bit address feature set; bits 15:14 must read 01 for the
    // word to be valid at all.
    let w83 = word(83);
    let lba48 = w83 & 0xc000 == 0x4000 && w83 & (1 << 10) != 0;
    let sectors = if lba48 {
        (0..4).fold(0u64, |acc, k| acc | u64::from(word(100 + k)) << (16 * k))
    } else {
        u64::from(word(60)) | u64::from(word(61)) << 16
    };
    Ok(Identity { sectors, lba48 })
}

/// Sectors per ATA frame an MTU allows. The MTU excludes the Ethernet header; the AoE
/// header (10 bytes) and the ATA arguments (12) count against it: 1500 -> 2, 9000 -> 17.
pub fn sectors_for_mtu(mtu: usize) -> u8 {
    let room = mtu.saturating_sub(ATA_LEN - ETH_LEN) / SECTOR;
    room.min(255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([2, 0, 0, 0, 0, 1]);
    const T: Mac = Mac([2, 0, 0, 0, 0, 2]);

    fn reply_frame(command: u8, tag: u32, flags: u8, extra: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HEADER_LEN];
        put_header(
            &mut f,
            &Header {
                dst: A,
                src: T,
                shelf: 7,
                slot: 3,
                command,
                tag,
            },
        );
        f[14] |= flags;
        f.extend_from_slice(extra);
        f
    }

    #[test]
    fn header_round_trip_and_layout() {
        let mut f = [0u8; ATA_LEN];
        put_header(
            &mut f,
            &Header {
                dst: T,
                src: A,
                shelf: 0x0107,
                slot: 3,
                command: CMD_ATA,
                tag: 0xdead_beef,
            },
        );
        assert_eq!(&f[12..14], &[0x88, 0xa2]);
        assert_eq!(f[14], 0x10, "version 1, no flags");
        assert_eq!(&f[16..20], &[0x01, 0x07, 3, 0]);
        assert_eq!(&f[20..24], &[0xde, 0xad, 0xbe, 0xef]);
        // Our own request is not a response.
        assert_eq!(parse_reply(&f), Err(BadFrame::NotResponse));
        f[14] |= FLAG_RESPONSE;
        let r = parse_reply(&f).unwrap();
        assert_eq!(
            (r.src, r.shelf, r.slot, r.tag, r.error),
            (A, 0x0107, 3, 0xdead_beef, None)
        );
    }

    #[test]
    fn error_flag_decodes_to_code_and_errno() {
        let mut f = reply_frame(CMD_ATA, 1, FLAG_RESPONSE | FLAG_ERROR, &[0; 12]);
        f[15] = 3;
        let r = parse_reply(&f).unwrap();
        assert_eq!(r.error, Some(3));
        assert_eq!(error_text(3), "device unavailable");
        assert_eq!(error_errno(3), libc::ENODEV);
        assert_eq!(error_errno(1), libc::EOPNOTSUPP);
        assert_eq!(error_errno(99), libc::EIO);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for len in 0..HEADER_LEN {
            assert!(matches!(
                parse_reply(&vec![0xff; len]),
                Err(BadFrame::Short { .. })
            ));
        }
        let mut f = reply_frame(CMD_ATA, 1, FLAG_RESPONSE, &[]);
        f[12] = 0x08;
        assert!(matches!(parse_reply(&f), Err(BadFrame::NotAoe(_))));
        let mut f = reply_frame(CMD_ATA, 1, FLAG_RESPONSE, &[]);
        f[14] = 0x28;
        assert_eq!(parse_reply(&f), Err(BadFrame::Version(2)));
        // Header only: no ATA arguments, no config arguments.
        let f = reply_frame(CMD_ATA, 1, FLAG_RESPONSE, &[]);
        assert!(parse_ata(&f).is_err());
        assert!(parse_config(&f).is_err());
        assert!(parse_identify(&[0; 100]).is_err());
        // A read reply with one sector of data when two were asked for.
        let f = reply_frame(CMD_ATA, 1, FLAG_RESPONSE, &[0; 12 + 512]);
        assert_eq!(
            ata_data(&f, 1024),
            Err(BadFrame::ShortData {
                have: 512,
                need: 1024
            })
        );
        assert_eq!(ata_data(&f, 512).unwrap().len(), 512);
    }

    #[test]
    fn ata_args_encode_lba48_little_endian() {
        let mut f = [0u8; ATA_LEN];
        AtaArgs::write(0x0000_1234_5678_9abc, 17).put(&mut f);
        let a = &f[HEADER_LEN..];
        assert_eq!(a[0], 0x41, "extended + write");
        assert_eq!(a[2], 17);
        assert_eq!(a[3], ATA_WRITE_EXT);
        assert_eq!(&a[4..10], &[0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12]);
        AtaArgs::read(5, 2).put(&mut f);
        assert_eq!((f[HEADER_LEN], f[HEADER_LEN + 3]), (0x40, ATA_READ_EXT));
        AtaArgs::identify().put(&mut f);
        assert_eq!((f[HEADER_LEN], f[HEADER_LEN + 3]), (0, ATA_IDENTIFY));
        assert_eq!(AtaArgs::flush().data_len(), 0);
    }

    #[test]
    fn ata_status_error_bits() {
        let mut f = reply_frame(CMD_ATA, 1, FLAG_RESPONSE, &[0; 12]);
        f[HEADER_LEN + 3] = 0x40;
        assert!(!parse_ata(&f).unwrap().failed());
        f[HEADER_LEN + 3] = 0x51;
        f[HEADER_LEN + 1] = 0x04;
        let r = parse_ata(&f).unwrap();
        assert!(r.failed());
        assert_eq!(r.error, 0x04);
    }

    #[test]
    fn short_config_reply_like_vblades_37_bytes_is_accepted() {
        // vblade's reply: 32 bytes of headers and arguments plus a 5-byte config string
        // region, unpadded.
        let mut args = [0u8; 8];
        args[0..2].copy_from_slice(&16u16.to_be_bytes());
        args[2..4].copy_from_slice(&0x4019u16.to_be_bytes());
        args[4] = 17;
        args[5] = 0x10;
        args[7] = 5;
        let mut extra = args.to_vec();
        extra.extend_from_slice(b"hello");
        let f = reply_frame(CMD_CONFIG, 9, FLAG_RESPONSE, &extra);
        assert_eq!(f.len(), 37);
        let c = parse_config(&f).unwrap();
        assert_eq!((c.buffers, c.firmware, c.max_sectors), (16, 0x4019, 17));
        assert_eq!(c.aoe_version, 1);
        assert_eq!(c.config, b"hello");
        // A string longer than what arrived is cut at the frame's end.
        let mut f2 = f.clone();
        f2[CONFIG_LEN - 1] = 200;
        assert_eq!(parse_config(&f2).unwrap().config, b"hello");
        // Sector count 0 means 2.
        let mut f3 = f;
        f3[HEADER_LEN + 4] = 0;
        assert_eq!(parse_config(&f3).unwrap().max_sectors, 2);
    }

    #[test]
    fn identify_reads_lba48_or_lba28_count() {
        let mut id = [0u8; 512];
        let mut put = |w: usize, v: u16| id[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
        put(60, 0x5678);
        put(61, 0x0123);
        let got = parse_identify(&id).unwrap();
        assert_eq!(
            got,
            Identity {
                sectors: 0x0123_5678,
                lba48: false
            }
        );
        let mut put = |w: usize, v: u16| id[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
        put(83, 0x4000 | 1 << 10);
        put(100, 0x0000);
        put(101, 0x0002);
        put(102, 0x0001);
        let got = parse_identify(&id).unwrap();
        assert_eq!(
            got,
            Identity {
                sectors: 0x0001_0002_0000,
                lba48: true
            }
        );
    }

    #[test]
    fn sectors_per_frame_follow_the_mtu() {
        assert_eq!(sectors_for_mtu(1500), 2);
        assert_eq!(sectors_for_mtu(9000), 17);
        assert_eq!(sectors_for_mtu(100), 0);
        assert_eq!(sectors_for_mtu(1 << 20), 255);
    }

    /// Every prefix of valid replies, and random bytes behind a valid header: every
    /// parser returns a value or an error, never panics or reads past the frame.
    #[test]
    fn truncated_and_random_frames_never_panic() {
        let mut ata = reply_frame(CMD_ATA, 5, FLAG_RESPONSE, &[0; 12 + 2 * SECTOR]);
        ata[HEADER_LEN + 3] = 0x40;
        let config = reply_frame(
            CMD_CONFIG,
            6,
            FLAG_RESPONSE,
            &[0, 16, 0x40, 0x19, 17, 0x10, 0, 9],
        );
        let parse_all = |f: &[u8]| {
            let _ = parse_reply(f);
            let _ = parse_ata(f);
            let _ = ata_data(f, 2 * SECTOR);
            let _ = parse_config(f);
            let _ = parse_identify(f);
        };
        for whole in [&ata, &config] {
            for len in 0..=whole.len() {
                parse_all(&whole[..len]);
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 700) as usize;
            let mut f = ata.clone();
            f.truncate(len);
            for (i, b) in f.iter_mut().enumerate().skip(14) {
                *b = (x >> (i % 56)) as u8;
            }
            parse_all(&f);
        }
    }
}
