//! SCSI for block members (SPC-4, SBC-3): the CDBs we send, sense data decoded into an
//! errno and a readable reason, and the parsers for INQUIRY, VPD and READ CAPACITY data.

pub type Cdb = [u8; 16];

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_BUSY: u8 = 0x08;
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;
pub const STATUS_TASK_ABORTED: u8 = 0x40;

pub const OP_TEST_UNIT_READY: u8 = 0x00;
pub const OP_INQUIRY: u8 = 0x12;
pub const OP_UNMAP: u8 = 0x42;
pub const OP_READ_16: u8 = 0x88;
pub const OP_WRITE_16: u8 = 0x8a;
pub const OP_SYNC_CACHE_16: u8 = 0x91;
pub const OP_WRITE_SAME_16: u8 = 0x93;
pub const OP_SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const OP_REPORT_LUNS: u8 = 0xa0;
pub const OP_MAINTENANCE_IN: u8 = 0xa3;

pub const VPD_SUPPORTED: u8 = 0x00;
pub const VPD_BLOCK_LIMITS: u8 = 0xb0;
pub const VPD_LB_PROVISIONING: u8 = 0xb2;

/// The name of a CDB's command, for messages.
pub fn command_name(cdb: &Cdb) -> &'static str {
    match cdb[0] {
        OP_TEST_UNIT_READY => "TEST UNIT READY",
        OP_INQUIRY => "INQUIRY",
        OP_UNMAP => "UNMAP",
        OP_READ_16 => "READ(16)",
        OP_WRITE_16 => "WRITE(16)",
        OP_SYNC_CACHE_16 => "SYNCHRONIZE CACHE(16)",
        OP_WRITE_SAME_16 => "WRITE SAME(16)",
        OP_SERVICE_ACTION_IN_16 => "READ CAPACITY(16)",
        OP_REPORT_LUNS => "REPORT LUNS",
        OP_MAINTENANCE_IN => "REPORT SUPPORTED OPERATION CODES",
        _ => "SCSI command",
    }
}

fn lba_len(op: u8, flags: u8, lba: u64, blocks: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// WRITE(16) byte 1: force unit access.
const FUA: u8 = 0x08;
/// WRITE SAME(16) byte 1: the target may unmap the range.
const UNMAP_BIT: u8 = 0x08;

pub fn read16(lba: u64, blocks: u32) -> Cdb {
    lba_len(OP_READ_16, 0, lba, blocks)
}

pub fn write16(lba: u64, blocks: u32, fua: bool) -> Cdb {
    lba_len(OP_WRITE_16, if fua { FUA } else { 0 }, lba, blocks)
}

/// Flush the whole LUN's volatile cache (LBA 0, 0 blocks = to the end).
pub fn sync_cache16() -> Cdb {
    lba_len(OP_SYNC_CACHE_16, 0, 0, 0)
}

/// WRITE SAME(16) of the one block in the Data-Out buffer; `unmap` lets the target
/// deallocate the range instead (it must then still read back as that block).
pub fn write_same16(lba: u64, blocks: u32, unmap: bool) -> Cdb {
    lba_len(
        OP_WRITE_SAME_16,
        if unmap { UNMAP_BIT } else { 0 },
        lba,
        blocks,
    )
}

/// UNMAP with a parameter list of `list_len` bytes (see [`unmap_list`]).
pub fn unmap(list_len: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = OP_UNMAP;
    c[7..9].copy_from_slice(&list_len.to_be_bytes());
    c
}

/// The UNMAP parameter list for one range.
pub fn unmap_list(lba: u64, blocks: u32) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0..2].copy_from_slice(&22u16.to_be_bytes());
    p[2..4].copy_from_slice(&16u16.to_be_bytes());
    p[8..16].copy_from_slice(&lba.to_be_bytes());
    p[16..20].copy_from_slice(&blocks.to_be_bytes());
    p
}

pub fn test_unit_ready() -> Cdb {
    [0u8; 16]
}

/// INQUIRY: the standard data (`page` None) or one VPD page.
pub fn inquiry(page: Option<u8>, alloc: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = OP_INQUIRY;
    if let Some(p) = page {
        c[1] = 1;
        c[2] = p;
    }
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

pub fn read_capacity16() -> Cdb {
    let mut c = [0u8; 16];
    c[0] = OP_SERVICE_ACTION_IN_16;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&32u32.to_be_bytes());
    c
}

pub fn report_luns(alloc: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = OP_REPORT_LUNS;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// REPORT SUPPORTED OPERATION CODES for one opcode without service action.
pub fn report_opcode(op: u8) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = OP_MAINTENANCE_IN;
    c[1] = 0x0c;
    c[2] = 1;
    c[3] = op;
    c[6..10].copy_from_slice(&64u32.to_be_bytes());
    c
}

/// Whether a one-command REPORT SUPPORTED OPERATION CODES reply says "supported".
pub fn opcode_supported(data: &[u8]) -> bool {
    data.len() >= 2 && matches!(data[1] & 7, 3 | 5)
}

/// Decoded sense data: the key and additional sense code that say what went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

pub const KEY_NOT_READY: u8 = 0x2;
pub const KEY_MEDIUM_ERROR: u8 = 0x3;
pub const KEY_HARDWARE_ERROR: u8 = 0x4;
pub const KEY_ILLEGAL_REQUEST: u8 = 0x5;
pub const KEY_UNIT_ATTENTION: u8 = 0x6;
pub const KEY_DATA_PROTECT: u8 = 0x7;
pub const KEY_ABORTED_COMMAND: u8 = 0xb;

impl Sense {
    /// Fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data.
    pub fn parse(s: &[u8]) -> Option<Sense> {
        match s.first()? & 0x7f {
            0x70 | 0x71 if s.len() >= 14 => Some(Sense {
                key: s[2] & 0xf,
                asc: s[12],
                ascq: s[13],
            }),
            0x70 | 0x71 if s.len() >= 3 => Some(Sense {
                key: s[2] & 0xf,
                asc: 0,
                ascq: 0,
            }),
            0x72 | 0x73 if s.len() >= 4 => Some(Sense {
                key: s[1] & 0xf,
                asc: s[2],
                ascq: s[3],
            }),
            _ => None,
        }
    }

    pub fn key_name(&self) -> &'static str {
        match self.key {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            KEY_NOT_READY => "NOT READY",
            KEY_MEDIUM_ERROR => "MEDIUM ERROR",
            KEY_HARDWARE_ERROR => "HARDWARE ERROR",
            KEY_ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            KEY_UNIT_ATTENTION => "UNIT ATTENTION",
            KEY_DATA_PROTECT => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            KEY_ABORTED_COMMAND => "ABORTED COMMAND",
            0xd => "VOLUME OVERFLOW",
            0xe => "MISCOMPARE",
            _ => "sense key",
        }
    }

    /// What the additional sense code means, for the common ones.
    pub fn asc_text(&self) -> Option<&'static str> {
        Some(match (self.asc, self.ascq) {
            (0x04, _) => "logical unit not ready",
            (0x0c, 0x00) => "write error",
            (0x11, 0x00) => "unrecovered read error",
            (0x11, _) => "read error",
            (0x1a, 0x00) => "parameter list length error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, _) => "invalid field in parameter list",
            (0x27, 0x07) => "space allocation failed (thin pool full)",
            (0x27, _) => "write protected",
            (0x28, 0x00) => "medium may have changed",
            (0x29, _) => "power on, reset or bus device reset occurred",
            (0x2a, _) => "parameters changed",
            (0x3a, _) => "medium not present",
            (0x3f, 0x0e) => "reported LUNs data has changed",
            (0x44, _) => "internal target failure",
            (0x47, _) => "SCSI parity error",
            _ => return None,
        })
    }

    /// A readable reason: `MEDIUM ERROR: unrecovered read error (03/11/00)`.
    pub fn describe(&self) -> String {
        let code = format!("{:02x}/{:02x}/{:02x}", self.key, self.asc, self.ascq);
        match self.asc_text() {
            Some(t) => format!("{}: {t} ({code})", self.key_name()),
            None => format!("{} ({code})", self.key_name()),
        }
    }

    /// The errno a frontend reports for this failure.
    pub fn errno(&self) -> i32 {
        match (self.key, self.asc, self.ascq) {
            (KEY_ILLEGAL_REQUEST, 0x20, _) => libc::EOPNOTSUPP,
            (KEY_ILLEGAL_REQUEST, 0x21, _) => libc::EINVAL,
            (KEY_ILLEGAL_REQUEST, 0x25, _) => libc::ENXIO,
            (KEY_ILLEGAL_REQUEST, _, _) => libc::EINVAL,
            (KEY_DATA_PROTECT, 0x27, 0x07) => libc::ENOSPC,
            (KEY_DATA_PROTECT, _, _) => libc::EROFS,
            (KEY_NOT_READY, 0x3a, _) => libc::ENOMEDIUM,
            (KEY_NOT_READY, _, _) => libc::EAGAIN,
            _ => libc::EIO,
        }
    }

    /// Worth sending again as is: a unit attention (reset, parameters changed) or an
    /// aborted command says nothing about the data; "becoming ready" passes.
    pub fn retryable(&self) -> bool {
        matches!(self.key, KEY_UNIT_ATTENTION | KEY_ABORTED_COMMAND)
            || (self.key == KEY_NOT_READY && self.asc == 0x04 && self.ascq == 0x01)
    }
}

/// The name of a SCSI status byte.
pub fn status_name(s: u8) -> &'static str {
    match s {
        STATUS_GOOD => "GOOD",
        STATUS_CHECK_CONDITION => "CHECK CONDITION",
        STATUS_BUSY => "BUSY",
        STATUS_RESERVATION_CONFLICT => "RESERVATION CONFLICT",
        STATUS_TASK_SET_FULL => "TASK SET FULL",
        STATUS_TASK_ABORTED => "TASK ABORTED",
        _ => "unknown status",
    }
}

/// READ CAPACITY(16) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub blocks: u64,
    pub block_size: u32,
    /// Logical block provisioning enabled (thin): UNMAP may work.
    pub lbpme: bool,
}

impl Capacity {
    pub fn parse(d: &[u8]) -> Option<Capacity> {
        if d.len() < 32 {
            return None;
        }
        let last = u64::from_be_bytes(d[0..8].try_into().ok()?);
        let block_size = u32::from_be_bytes(d[8..12].try_into().ok()?);
        if block_size == 0 || !block_size.is_power_of_two() || last == u64::MAX {
            return None;
        }
        Some(Capacity {
            blocks: last + 1,
            block_size,
            lbpme: d[14] & 0x80 != 0,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }
}

/// Standard INQUIRY data: device type and identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    pub device_type: u8,
    pub vendor: String,
    pub product: String,
}

impl Inquiry {
    pub fn parse(d: &[u8]) -> Option<Inquiry> {
        if d.len() < 32 {
            return None;
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        Some(Inquiry {
            device_type: d[0] & 0x1f,
            vendor: text(&d[8..16]),
            product: text(&d[16..32]),
        })
    }
}

/// The page codes a Supported VPD Pages page lists.
pub fn vpd_pages(d: &[u8]) -> Vec<u8> {
    if d.len() < 4 {
        return Vec::new();
    }
    let n = usize::from(u16::from_be_bytes([d[2], d[3]]));
    d[4..].iter().take(n).copied().collect()
}

/// What the Block Limits VPD page says (0 = no limit reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transfer_blocks: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub max_write_same_blocks: u64,
}

impl BlockLimits {
    pub fn parse(d: &[u8]) -> BlockLimits {
        let u32_at = |at: usize| {
            d.get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let max_write_same_blocks = d
            .get(36..44)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes);
        BlockLimits {
            max_transfer_blocks: u32_at(8),
            max_unmap_blocks: u32_at(20),
            max_unmap_descriptors: u32_at(24),
            max_write_same_blocks,
        }
    }
}

/// From the Logical Block Provisioning VPD page: UNMAP supported (LBPU), WRITE SAME(16)
/// with UNMAP supported (LBPWS).
pub fn lb_provisioning(d: &[u8]) -> (bool, bool) {
    match d.get(5) {
        Some(b) => (b & 0x80 != 0, b & 0x40 != 0),
        None => (false, false),
    }
}

/// The LUNs a REPORT LUNS reply lists (entries we cannot decode are skipped).
pub fn report_luns_list(d: &[u8]) -> Vec<u16> {
    if d.len() < 8 {
        return Vec::new();
    }
    let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize / 8;
    d[8..]
        .chunks_exact(8)
        .take(n)
        .filter_map(|e| super::pdu::decode_lun(e.try_into().ok()?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_cdbs() {
        let c = read16(0x0102_0304_0506_0708, 0x10);
        assert_eq!(c[0], 0x88);
        assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&c[10..14], &[0, 0, 0, 0x10]);
        assert_eq!(write16(1, 1, true)[1], 0x08);
        assert_eq!(write16(1, 1, false)[1], 0);
        assert_eq!(command_name(&sync_cache16()), "SYNCHRONIZE CACHE(16)");
    }

    #[test]
    fn unmap_parameter_list() {
        let p = unmap_list(0x1000, 8);
        assert_eq!(&p[0..4], &[0, 22, 0, 16]);
        assert_eq!(&p[8..16], &0x1000u64.to_be_bytes());
        assert_eq!(&p[16..20], &[0, 0, 0, 8]);
        assert_eq!(&unmap(24)[7..9], &[0, 24]);
    }

    #[test]
    fn sense_fixed_and_descriptor() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x03;
        fixed[12] = 0x11;
        let s = Sense::parse(&fixed).unwrap();
        assert_eq!(
            s.describe(),
            "MEDIUM ERROR: unrecovered read error (03/11/00)"
        );
        assert_eq!(s.errno(), libc::EIO);
        assert!(!s.retryable());
        let desc = [0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0];
        let s = Sense::parse(&desc).unwrap();
        assert_eq!(s.key, KEY_UNIT_ATTENTION);
        assert!(s.retryable());
        let s = Sense::parse(&[0x70, 0, 0x05, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0]).unwrap();
        assert_eq!(s.errno(), libc::EOPNOTSUPP);
        assert_eq!(Sense::parse(&[0x70]), None);
        assert_eq!(Sense::parse(&[]), None);
        assert_eq!(Sense::parse(&[0x10, 0, 0, 0]), None);
    }

    #[test]
    fn capacity_and_vpd() {
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&2047u64.to_be_bytes());
        d[8..12].copy_from_slice(&4096u32.to_be_bytes());
        d[14] = 0x80;
        let c = Capacity::parse(&d).unwrap();
        assert_eq!((c.blocks, c.block_size, c.lbpme), (2048, 4096, true));
        assert_eq!(c.bytes(), 8 << 20);
        d[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(Capacity::parse(&d), None);
        assert_eq!(Capacity::parse(&d[..8]), None);
        assert_eq!(
            vpd_pages(&[0, 0, 0, 3, 0, 0xb0, 0xb2, 0xff]),
            vec![0, 0xb0, 0xb2]
        );
        assert_eq!(vpd_pages(&[0, 0, 0, 9, 0]), vec![0]);
        let mut b2 = [0u8; 8];
        b2[5] = 0xc0;
        assert_eq!(lb_provisioning(&b2), (true, true));
        let mut b0 = [0u8; 64];
        b0[20..24].copy_from_slice(&8192u32.to_be_bytes());
        assert_eq!(BlockLimits::parse(&b0).max_unmap_blocks, 8192);
        assert_eq!(BlockLimits::parse(&b0[..10]).max_unmap_blocks, 0);
    }

    #[test]
    fn report_luns_parses_and_bounds() {
        let mut d = vec![0, 0, 0, 16, 0, 0, 0, 0];
        d.extend_from_slice(&super::super::pdu::encode_lun(0));
        d.extend_from_slice(&super::super::pdu::encode_lun(1));
        assert_eq!(report_luns_list(&d), vec![0, 1]);
        d[3] = 200; // claims more than it holds
        assert_eq!(report_luns_list(&d), vec![0, 1]);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a target sends, the parsers answer or decline; they never panic.
        #[test]
        fn parsers_never_panic(d in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Sense::parse(&d).map(|s| (s.describe(), s.errno(), s.retryable()));
            let _ = Capacity::parse(&d).map(|c| c.bytes());
            let _ = Inquiry::parse(&d);
            let _ = vpd_pages(&d);
            let _ = BlockLimits::parse(&d);
            let _ = lb_provisioning(&d);
            let _ = report_luns_list(&d);
            let _ = opcode_supported(&d);
            let _ = super::super::pdu::decode_text(&d);
        }
    }
}
