//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment, opcodes and flags, text
//! key=value data segments, padding to 4 bytes, and CRC32C header/data digests.
//!
//! Only the fields this initiator reads or writes have accessors; everything else in a
//! BHS stays zero. Integers are big-endian on the wire; digests are the CRC32C value in
//! little-endian byte order (what Linux's and libiscsi's initiators and tgtd send).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const BHS_LEN: usize = 48;
/// A data segment's length field has 24 bits.
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;
/// The "reserved" task tag and target transfer tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_TMF_REQ: u8 = 0x02;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT_REQ: u8 = 0x06;
// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RSP: u8 = 0x21;
pub const OP_TMF_RSP: u8 = 0x22;
pub const OP_LOGIN_RSP: u8 = 0x23;
pub const OP_TEXT_RSP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RSP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

/// Byte 0: delivered for immediate processing (no CmdSN advance).
pub const IMMEDIATE: u8 = 0x40;
/// Byte 1 flags.
pub const F_FINAL: u8 = 0x80;
pub const F_CONTINUE: u8 = 0x40;
pub const F_READ: u8 = 0x40;
pub const F_WRITE: u8 = 0x20;
pub const ATTR_SIMPLE: u8 = 0x01;
/// Data-In: the status is in this PDU.
pub const F_STATUS: u8 = 0x01;
/// Data-In / SCSI Response: residual underflow / overflow.
pub const F_UNDERFLOW: u8 = 0x02;
pub const F_OVERFLOW: u8 = 0x04;
/// Login: transit to the next stage.
pub const F_TRANSIT: u8 = 0x80;

/// The name of an opcode, for messages.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        OP_NOP_OUT => "NOP-Out",
        OP_SCSI_CMD => "SCSI Command",
        OP_LOGIN_REQ => "Login Request",
        OP_TEXT_REQ => "Text Request",
        OP_DATA_OUT => "Data-Out",
        OP_LOGOUT_REQ => "Logout Request",
        OP_NOP_IN => "NOP-In",
        OP_SCSI_RSP => "SCSI Response",
        OP_TMF_REQ => "Task Management Request",
        OP_TMF_RSP => "Task Management Response",
        OP_LOGIN_RSP => "Login Response",
        OP_TEXT_RSP => "Text Response",
        OP_DATA_IN => "Data-In",
        OP_LOGOUT_RSP => "Logout Response",
        OP_R2T => "R2T",
        OP_ASYNC => "Asynchronous Message",
        OP_REJECT => "Reject",
        _ => "unknown PDU",
    }
}

/// A Basic Header Segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs({} flags {:#04x} itt {:#x} data {})",
            opcode_name(self.opcode()),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

impl Bhs {
    pub fn new(opcode: u8) -> Self {
        let mut b = Bhs([0; BHS_LEN]);
        b.0[0] = opcode & 0x3f;
        b
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    pub fn set_immediate(&mut self) {
        self.0[0] |= IMMEDIATE;
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }

    pub fn byte(&self, i: usize) -> u8 {
        self.0[i]
    }

    pub fn set_byte(&mut self, i: usize, v: u8) {
        self.0[i] = v;
    }

    /// TotalAHSLength, in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    pub fn set_data_len(&mut self, n: u32) {
        debug_assert!(n <= MAX_DATA_SEGMENT);
        let b = n.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..]);
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.0[at..at + 4].try_into().unwrap_or([0; 4]))
    }

    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }

    /// Bytes 8..16: a LUN in SAM's single-level form.
    pub fn set_lun(&mut self, lun: u16) {
        self.0[8..16].copy_from_slice(&encode_lun(lun));
    }

    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v)
    }

    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }

    /// StatSN in target PDUs (bytes 24..28).
    pub fn stat_sn(&self) -> u32 {
        self.u32_at(24)
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.u32_at(28)
    }

    pub fn max_cmd_sn(&self) -> u32 {
        self.u32_at(32)
    }
}

/// SAM-5 single-level LUN: peripheral addressing below 256, flat space above.
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        b[1] = lun as u8;
    }
    b
}

/// Decode the first level of a REPORT LUNS entry (peripheral or flat addressing).
pub fn decode_lun(b: &[u8; 8]) -> Option<u16> {
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u16::from(b[1])),
        1 => Some((u16::from(b[0] & 0x3f) << 8) | u16::from(b[1])),
        _ => None,
    }
}

/// Serial number arithmetic (RFC 1982, 32 bits): a < b.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// a <= b in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Bytes of padding after a data segment of `n` bytes.
pub fn pad_len(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// The CRC32C digest of `parts` taken as one byte string, in wire byte order.
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let crc = parts.iter().fold(0u32, |c, p| crc32c::crc32c_append(c, p));
    crc.to_le_bytes()
}

/// Which digests a connection carries, as negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Why a PDU could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The peer broke the protocol (the text says how).
    Protocol(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "the target closed the connection")
            }
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Protocol(why) => write!(f, "protocol violation: {why}"),
        }
    }
}

/// Read one BHS (skipping any AHS, which nothing we use carries) and check its header
/// digest. The data segment is left for the caller, who knows where it should go.
pub async fn read_bhs<R: AsyncRead + Unpin>(r: &mut R, d: Digests) -> Result<Bhs, ReadError> {
    let mut b = Bhs([0; BHS_LEN]);
    r.read_exact(&mut b.0).await?;
    let mut ahs = [0u8; 4 * 255];
    let ahs = &mut ahs[..b.ahs_len()];
    r.read_exact(ahs).await?;
    if d.header {
        let mut got = [0u8; 4];
        r.read_exact(&mut got).await?;
        if got != digest(&[&b.0, ahs]) {
            return Err(ReadError::Protocol(format!(
                "header digest mismatch on a {}",
                opcode_name(b.opcode())
            )));
        }
    }
    Ok(b)
}

/// Read a data segment of `len` bytes into `into` (exactly `len` long), then its padding
/// and, when negotiated, its data digest.
pub async fn read_data_into<R: AsyncRead + Unpin>(
    r: &mut R,
    into: &mut [u8],
    d: Digests,
) -> Result<(), ReadError> {
    r.read_exact(into).await?;
    let mut tail = [0u8; 8];
    let pad = pad_len(into.len());
    r.read_exact(&mut tail[..pad]).await?;
    if d.data && !into.is_empty() {
        let mut got = [0u8; 4];
        r.read_exact(&mut got).await?;
        if got != digest(&[into, &tail[..pad]]) {
            return Err(ReadError::Protocol("data digest mismatch".into()));
        }
    }
    Ok(())
}

/// Read a data segment of `len` bytes into a new vector, refusing more than `max`.
pub async fn read_data<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
    max: u32,
    d: Digests,
) -> Result<Vec<u8>, ReadError> {
    if len > max {
        return Err(ReadError::Protocol(format!(
            "a {len}-byte data segment exceeds the {max} bytes we accept"
        )));
    }
    let mut v = vec![0u8; len as usize];
    read_data_into(r, &mut v, d).await?;
    Ok(v)
}

/// Read and drop a data segment (a reply nobody waits for any more).
pub async fn skip_data<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
    d: Digests,
) -> Result<(), ReadError> {
    let mut left = len as usize + pad_len(len as usize) + if d.data && len > 0 { 4 } else { 0 };
    let mut scratch = [0u8; 4096];
    while left > 0 {
        let n = left.min(scratch.len());
        r.read_exact(&mut scratch[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// The bytes that go on the wire for one PDU whose data is `data` (one or more slices
/// taken as one segment): header [+ digest], then the caller writes data, then
/// [`trailer`].
pub fn header_bytes(b: &Bhs, d: Digests) -> ([u8; BHS_LEN + 4], usize) {
    let mut out = [0u8; BHS_LEN + 4];
    out[..BHS_LEN].copy_from_slice(&b.0);
    if d.header {
        out[BHS_LEN..].copy_from_slice(&digest(&[&b.0]));
        (out, BHS_LEN + 4)
    } else {
        (out, BHS_LEN)
    }
}

/// Padding and data digest after a data segment.
pub fn trailer(data: &[u8], d: Digests) -> ([u8; 8], usize) {
    let mut out = [0u8; 8];
    let pad = pad_len(data.len());
    let mut n = pad;
    if d.data && !data.is_empty() {
        out[pad..pad + 4].copy_from_slice(&digest(&[data, &[0u8; 4][..pad]]));
        n += 4;
    }
    (out, n)
}

/// A whole PDU as bytes (header, data, padding, digests): for login, text and control
/// PDUs, whose data is small.
pub fn encode(b: &Bhs, data: &[u8], d: Digests) -> Vec<u8> {
    let mut bhs = *b;
    bhs.set_data_len(data.len() as u32);
    let (h, hn) = header_bytes(&bhs, d);
    let (t, tn) = trailer(data, d);
    let mut v = Vec::with_capacity(hn + data.len() + tn);
    v.extend_from_slice(&h[..hn]);
    v.extend_from_slice(data);
    v.extend_from_slice(&t[..tn]);
    v
}

/// Text keys (RFC 7143 §6): `key=value` pairs, each ending in NUL.
pub fn encode_text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// Parse text keys; malformed entries (no '=', not UTF-8) are an error naming them.
pub fn decode_text(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in data.split(|&c| c == 0).filter(|s| !s.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| "a text key is not UTF-8".to_string())?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("text item '{}' has no '='", s.escape_debug()))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bhs_fields_round_trip() {
        let mut b = Bhs::new(OP_SCSI_CMD);
        b.set_immediate();
        b.set_flags(F_FINAL | F_READ | ATTR_SIMPLE);
        b.set_data_len(0x12_3456);
        b.set_lun(3);
        b.set_itt(0xdead_beef);
        b.set_u32(24, 7);
        assert_eq!(b.opcode(), OP_SCSI_CMD);
        assert_eq!(b.0[0], 0x41);
        assert_eq!(b.flags(), 0xc1);
        assert_eq!(b.data_len(), 0x12_3456);
        assert_eq!(&b.0[5..8], &[0x12, 0x34, 0x56]);
        assert_eq!(&b.0[8..10], &[0, 3]);
        assert_eq!(b.itt(), 0xdead_beef);
        assert_eq!(b.stat_sn(), 7);
    }

    #[test]
    fn luns_encode_both_address_methods() {
        assert_eq!(encode_lun(1), [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(300), [0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
        for lun in [0, 1, 255, 256, 300, 16383] {
            assert_eq!(decode_lun(&encode_lun(lun)), Some(lun));
        }
        assert_eq!(decode_lun(&[0x80, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 2));
        assert!(sn_lt(u32::MAX, 0));
        assert!(sn_lt(u32::MAX - 5, 3));
        assert!(!sn_lt(3, u32::MAX - 5));
        assert!(sn_le(5, 5));
    }

    #[test]
    fn padding() {
        assert_eq!(pad_len(0), 0);
        assert_eq!(pad_len(1), 3);
        assert_eq!(pad_len(4), 0);
        assert_eq!(pad_len(6), 2);
    }

    #[test]
    fn crc32c_check_value_and_byte_order() {
        // RFC 3720 appendix B.4: 32 bytes of zeroes give 0x8a9136aa.
        assert_eq!(
            u32::from_le_bytes(digest(&[&[0u8; 32]])),
            0x8a91_36aa,
            "CRC32C of 32 zero bytes"
        );
        assert_eq!(digest(&[&[1, 2], &[3]]), digest(&[&[1, 2, 3]]));
    }

    #[test]
    fn text_round_trip_and_errors() {
        let t = encode_text(&[("InitiatorName", "iqn.x"), ("AuthMethod", "CHAP,None")]);
        assert_eq!(t, b"InitiatorName=iqn.x\0AuthMethod=CHAP,None\0");
        let back = decode_text(&t).unwrap();
        assert_eq!(back[1], ("AuthMethod".into(), "CHAP,None".into()));
        assert!(decode_text(b"novalue\0").unwrap_err().contains("no '='"));
        assert!(decode_text(b"a=\xff\0").is_err());
    }

    #[tokio::test]
    async fn encoded_pdus_read_back_with_digests() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut b = Bhs::new(OP_TEXT_REQ);
        b.set_itt(9);
        let wire = encode(&b, b"SendTargets=All\0", d);
        assert_eq!(wire.len(), 48 + 4 + 16 + 4);
        let mut r = &wire[..];
        let got = read_bhs(&mut r, d).await.unwrap();
        assert_eq!(got.itt(), 9);
        let data = read_data(&mut r, got.data_len(), 1024, d).await.unwrap();
        assert_eq!(data, b"SendTargets=All\0");
        assert!(r.is_empty());

        // A flipped bit in the header or the data is caught.
        let mut bad = wire.clone();
        bad[17] ^= 1;
        let e = read_bhs(&mut &bad[..], d).await.unwrap_err();
        assert!(e.to_string().contains("header digest"), "{e}");
        let mut bad = wire.clone();
        bad[60] ^= 1;
        let mut r = &bad[..];
        let h = read_bhs(&mut r, d).await.unwrap();
        let e = read_data(&mut r, h.data_len(), 1024, d).await.unwrap_err();
        assert!(e.to_string().contains("data digest"), "{e}");
    }

    #[tokio::test]
    async fn oversized_segments_are_refused() {
        let mut r = &[0u8; 0][..];
        let e = read_data(&mut r, 1 << 20, 8192, Digests::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    #[tokio::test]
    async fn unpadded_odd_segment_reads_padding() {
        let b = Bhs::new(OP_NOP_IN);
        let wire = encode(&b, b"abcde", Digests::default());
        assert_eq!(wire.len(), 48 + 8);
        let mut r = &wire[..];
        let h = read_bhs(&mut r, Digests::default()).await.unwrap();
        skip_data(&mut r, h.data_len(), Digests::default())
            .await
            .unwrap();
        assert!(r.is_empty());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any byte stream reads as PDUs or fails with an error; never a panic, and
        /// never more than the bound is allocated for a segment.
        #[test]
        fn reading_arbitrary_bytes_never_panics(
            d in proptest::collection::vec(any::<u8>(), 0..400),
            header in any::<bool>(),
            data in any::<bool>(),
        ) {
            let dg = Digests { header, data };
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = &d[..];
                while let Ok(h) = read_bhs(&mut r, dg).await {
                    if read_data(&mut r, h.data_len(), 256, dg).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
}
