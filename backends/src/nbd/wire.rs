//! The NBD wire format: every constant of the protocol (NetworkBlockDevice/nbd
//! `doc/proto.md`) and encode/decode of the fixed-size messages, over byte arrays and over
//! tokio streams. Everything on the wire is big-endian.
//!
//! Names follow the spec with the `NBD_` prefix dropped (`NBD_CMD_READ` is `CMD_READ`),
//! except the error values, which keep it (`NBD_EIO`) so they never shadow libc's.

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

// ---- Magics -------------------------------------------------------------------------

/// 'NBDMAGIC': the first 8 bytes a server sends (also called INIT_PASSWD).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// 'IHAVEOPT': second word of the newstyle greeting, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Oldstyle negotiation's second word (`cliserv_magic`); recognised, never served.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The IANA port for newstyle NBD.
pub const DEFAULT_PORT: u16 = 10809;

// ---- Message sizes ------------------------------------------------------------------

/// NBDMAGIC + IHAVEOPT + 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// Reserved zeroes after the NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES was agreed.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Strings (export names, messages, context names) MUST NOT be longer than this.
pub const MAX_STRING_LEN: usize = 4096;

// ---- Handshake flags (server, 16 bits) and client flags (32 bits) ---------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (16 bits) ---------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Must stay clear unless structured replies were negotiated.
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Must stay clear unless FLAG_SEND_WRITE_ZEROES is set.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Option types -------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
/// Withdrawn; listed so it is recognised as known-but-unsupported.
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// 64-bit headers (newer spec revisions); uniblk answers REP_ERR_UNSUP for now.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- Option reply types -------------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---- Info types (NBD_OPT_INFO / NBD_OPT_GO) ------------------------------------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Commands and command flags -----------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- Structured replies -------------------------------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error chunk types have bit 15 set.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---- Metadata contexts --------------------------------------------------------------

pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---- Error values -------------------------------------------------------------------

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The NBD error value for a Linux errno. The spec allows only its own small set; it asks
/// for EDQUOT and EFBIG to be reported as ENOSPC, and everything unknown becomes EIO.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        // ENOTSUP and EOPNOTSUPP are the same number on Linux but not everywhere.
        e if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// The errno for an NBD error value received from a server. Unknown values are treated as
/// EINVAL, as the spec asks of clients.
pub fn nbd_to_errno(error: u32) -> i32 {
    match error {
        NBD_EPERM => libc::EPERM,
        NBD_EIO => libc::EIO,
        NBD_ENOMEM => libc::ENOMEM,
        NBD_EINVAL => libc::EINVAL,
        NBD_ENOSPC => libc::ENOSPC,
        NBD_EOVERFLOW => libc::EOVERFLOW,
        NBD_ENOTSUP => libc::EOPNOTSUPP,
        NBD_ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

// ---- Errors -------------------------------------------------------------------------

#[derive(Debug, Error)]
pub enum WireError {
    #[error("bad {what} magic {got:#x} (peer does not speak NBD, or the stream is out of step)")]
    BadMagic { what: &'static str, got: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

// ---- Byte helpers -------------------------------------------------------------------

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_magic(what: &'static str, expected: u64, got: u64) -> Result<(), WireError> {
    if got == expected {
        Ok(())
    } else {
        Err(WireError::BadMagic { what, got })
    }
}

/// Implements `read_from`/`write_to` for a fixed-size message with `encode`/`decode`.
macro_rules! stream_io {
    ($ty:ty, $len:expr) => {
        impl $ty {
            pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, WireError> {
                let mut b = [0u8; $len];
                r.read_exact(&mut b).await?;
                Self::decode(&b)
            }

            pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
                w.write_all(&self.encode()).await
            }
        }
    };
}

// ---- Handshake ----------------------------------------------------------------------

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub flags: u16,
}

impl Greeting {
    pub fn encode(&self) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..18].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    /// Fails on an oldstyle server (CLISERV_MAGIC second word) as on any other mismatch.
    pub fn decode(b: &[u8; GREETING_LEN]) -> Result<Self, WireError> {
        check_magic("greeting", NBDMAGIC, be64(b, 0))?;
        check_magic("newstyle greeting", IHAVEOPT, be64(b, 8))?;
        Ok(Greeting { flags: be16(b, 16) })
    }
}
stream_io!(Greeting, GREETING_LEN);

/// What the server sends after NBD_OPT_EXPORT_NAME: size, transmission flags, and 124
/// zeroes unless NO_ZEROES was agreed. Returns the bytes to send.
pub fn encode_export_name_reply(size: u64, tflags: u16, zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + EXPORT_NAME_ZEROES);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&tflags.to_be_bytes());
    if zeroes {
        b.resize(10 + EXPORT_NAME_ZEROES, 0);
    }
    b
}

/// An option request header (its payload of `len` bytes follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, WireError> {
        check_magic("option", IHAVEOPT, be64(b, 0))?;
        Ok(OptionHeader {
            option: be32(b, 8),
            len: be32(b, 12),
        })
    }
}
stream_io!(OptionHeader, OPTION_HEADER_LEN);

/// An option reply header (its payload of `len` bytes follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub typ: u32,
    pub len: u32,
}

impl OptionReply {
    pub fn encode(&self) -> [u8; OPTION_REPLY_LEN] {
        let mut b = [0u8; OPTION_REPLY_LEN];
        b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.typ.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; OPTION_REPLY_LEN]) -> Result<Self, WireError> {
        check_magic("option reply", OPT_REPLY_MAGIC, be64(b, 0))?;
        Ok(OptionReply {
            option: be32(b, 8),
            typ: be32(b, 12),
            len: be32(b, 16),
        })
    }

    pub fn is_error(&self) -> bool {
        self.typ & REP_FLAG_ERROR != 0
    }
}
stream_io!(OptionReply, OPTION_REPLY_LEN);

/// NBD_INFO_EXPORT payload: type, size, transmission flags (12 bytes).
pub fn encode_info_export(size: u64, tflags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&tflags.to_be_bytes());
    b
}

/// NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum (14 bytes).
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// NBD_INFO_NAME / NBD_INFO_DESCRIPTION payload: type then the string.
pub fn encode_info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// NBD_REP_SERVER payload: name length, name, then a human-readable description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// NBD_REP_META_CONTEXT payload: context id then its name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

// ---- Handshake, client side ----------------------------------------------------------

/// NBD_OPT_INFO / NBD_OPT_GO request payload: name length, name, count of information
/// requests, the requested NBD_INFO_* types.
pub fn encode_info_request(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// One NBD_REP_INFO payload, decoded. Types a client does not know, and known types of
/// the wrong length, come back as `Other` so the caller decides (the spec asks clients to
/// ignore unknown information types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, tflags: u16 },
    BlockSize { min: u32, preferred: u32, max: u32 },
    Name(String),
    Description(String),
    Other(u16),
}

pub fn decode_info(p: &[u8]) -> Option<Info> {
    if p.len() < 2 {
        return None;
    }
    let text = || String::from_utf8_lossy(&p[2..]).into_owned();
    Some(match (be16(p, 0), p.len()) {
        (INFO_EXPORT, 12) => Info::Export {
            size: be64(p, 2),
            tflags: be16(p, 10),
        },
        (INFO_BLOCK_SIZE, 14) => Info::BlockSize {
            min: be32(p, 2),
            preferred: be32(p, 6),
            max: be32(p, 10),
        },
        (INFO_NAME, _) => Info::Name(text()),
        (INFO_DESCRIPTION, _) => Info::Description(text()),
        (t, _) => Info::Other(t),
    })
}

/// NBD_REP_SERVER payload: (name, description). None when the name length does not fit.
pub fn decode_rep_server(p: &[u8]) -> Option<(String, String)> {
    if p.len() < 4 {
        return None;
    }
    let nlen = be32(p, 0) as usize;
    let name = p.get(4..4usize.checked_add(nlen)?)?;
    let desc = &p[4 + nlen..];
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(desc).into_owned(),
    ))
}

/// The spec's name for an option reply type, for messages.
pub fn rep_name(typ: u32) -> &'static str {
    match typ {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "an unknown reply",
    }
}

/// The spec's name for a command, for messages.
pub fn cmd_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        CMD_RESIZE => "RESIZE",
        _ => "an unknown command",
    }
}

// ---- Transmission -------------------------------------------------------------------

/// A request header (a WRITE's `len` bytes of payload follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, WireError> {
        check_magic("request", REQUEST_MAGIC as u64, be32(b, 0) as u64)?;
        Ok(Request {
            flags: be16(b, 4),
            typ: be16(b, 6),
            handle: be64(b, 8),
            offset: be64(b, 16),
            len: be32(b, 24),
        })
    }
}
stream_io!(Request, REQUEST_LEN);

/// A simple reply header (a successful simple READ reply's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, WireError> {
        check_magic("simple reply", SIMPLE_REPLY_MAGIC as u64, be32(b, 0) as u64)?;
        Ok(SimpleReply {
            error: be32(b, 4),
            handle: be64(b, 8),
        })
    }
}
stream_io!(SimpleReply, SIMPLE_REPLY_LEN);

/// A structured reply chunk header (its payload of `len` bytes follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; CHUNK_HEADER_LEN]) -> Result<Self, WireError> {
        check_magic(
            "structured reply",
            STRUCTURED_REPLY_MAGIC as u64,
            be32(b, 0) as u64,
        )?;
        Ok(ChunkHeader {
            flags: be16(b, 4),
            typ: be16(b, 6),
            handle: be64(b, 8),
            len: be32(b, 16),
        })
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    pub fn is_error(&self) -> bool {
        self.typ & REPLY_TYPE_FLAG_ERROR != 0
    }
}
stream_io!(ChunkHeader, CHUNK_HEADER_LEN);

/// Either reply kind, told apart by the magic: what a client reads first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, WireError> {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        r.read_exact(&mut b[..SIMPLE_REPLY_LEN]).await?;
        match be32(&b, 0) {
            SIMPLE_REPLY_MAGIC => {
                let s: &[u8; SIMPLE_REPLY_LEN] = b[..SIMPLE_REPLY_LEN].try_into().expect("16");
                Ok(ReplyHeader::Simple(SimpleReply::decode(s)?))
            }
            STRUCTURED_REPLY_MAGIC => {
                r.read_exact(&mut b[SIMPLE_REPLY_LEN..]).await?;
                Ok(ReplyHeader::Chunk(ChunkHeader::decode(&b)?))
            }
            got => Err(WireError::BadMagic {
                what: "reply",
                got: got as u64,
            }),
        }
    }
}

/// NBD_REPLY_TYPE_ERROR payload: error, message length, message. The message is cut to
/// the spec's string limit (at a character boundary).
pub fn encode_error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = truncate_str(message, MAX_STRING_LEN);
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// Decode an error chunk's payload (either error type): (error, message). None when the
/// message length does not fit the payload.
pub fn decode_error_payload(p: &[u8]) -> Option<(u32, String)> {
    if p.len() < 6 {
        return None;
    }
    let error = be32(p, 0);
    let mlen = be16(p, 4) as usize;
    let msg = p.get(6..6 + mlen)?;
    Some((error, String::from_utf8_lossy(msg).into_owned()))
}

/// NBD_REPLY_TYPE_BLOCK_STATUS payload: context id then (length, flags) descriptors.
pub fn encode_block_status_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 8 * extents.len());
    b.extend_from_slice(&context.to_be_bytes());
    for &(len, flags) in extents {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
    }
    b
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_matches_the_spec_layout() {
        let r = Request {
            flags: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            typ: CMD_WRITE_ZEROES,
            handle: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            len: 0xdead_beef,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 3]);
        assert_eq!(&b[6..8], &[0, 6]);
        assert_eq!(&b[24..28], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Request::decode(&b).unwrap(), r);
    }

    #[test]
    fn bad_request_magic_is_rejected() {
        let mut b = Request {
            flags: 0,
            typ: CMD_READ,
            handle: 1,
            offset: 0,
            len: 512,
        }
        .encode();
        b[0] ^= 0xff;
        match Request::decode(&b) {
            Err(WireError::BadMagic {
                what: "request", ..
            }) => {}
            other => panic!("expected a bad magic, got {other:?}"),
        }
    }

    #[test]
    fn replies_round_trip() {
        let s = SimpleReply {
            error: NBD_ENOSPC,
            handle: 77,
        };
        assert_eq!(SimpleReply::decode(&s.encode()).unwrap(), s);
        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            typ: REPLY_TYPE_ERROR,
            handle: 9,
            len: 12,
        };
        let cb = c.encode();
        assert_eq!(&cb[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        let d = ChunkHeader::decode(&cb).unwrap();
        assert_eq!(d, c);
        assert!(d.is_done() && d.is_error());
    }

    #[test]
    fn options_round_trip() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 42,
        };
        assert_eq!(&h.encode()[0..8], b"IHAVEOPT");
        assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
        let r = OptionReply {
            option: OPT_LIST,
            typ: REP_ERR_UNKNOWN,
            len: 3,
        };
        let d = OptionReply::decode(&r.encode()).unwrap();
        assert_eq!(d, r);
        assert!(d.is_error());
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        let g = Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        assert_eq!(&g.encode()[0..8], b"NBDMAGIC");
        assert_eq!(Greeting::decode(&g.encode()).unwrap(), g);
    }

    #[test]
    fn oldstyle_greeting_is_refused() {
        let mut b = Greeting { flags: 0 }.encode();
        b[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
        assert!(Greeting::decode(&b).is_err());
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        assert_eq!(
            encode_export_name_reply(1 << 20, FLAG_HAS_FLAGS, true).len(),
            134
        );
        let short = encode_export_name_reply(1 << 20, FLAG_HAS_FLAGS, false);
        assert_eq!(short, [0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1]);
    }

    #[test]
    fn info_payloads_have_the_spec_lengths() {
        assert_eq!(encode_info_export(5, 1).len(), 12);
        assert_eq!(
            encode_info_block_size(1, 4096, 1 << 25)[6..10],
            4096u32.to_be_bytes()
        );
        assert_eq!(encode_info_string(INFO_NAME, "d0"), [0, 1, b'd', b'0']);
        assert_eq!(encode_rep_server("ab", "x"), [0, 0, 0, 2, b'a', b'b', b'x']);
        assert_eq!(
            encode_block_status_payload(1, &[(4096, 0)]),
            [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn error_payload_round_trips_and_is_bounded() {
        let p = encode_error_payload(NBD_EINVAL, "bad offset");
        assert_eq!(
            decode_error_payload(&p),
            Some((NBD_EINVAL, "bad offset".into()))
        );
        let long = "é".repeat(3000); // 6000 bytes, 2 per char
        let p = encode_error_payload(NBD_EIO, &long);
        let (_, m) = decode_error_payload(&p).unwrap();
        assert!(m.len() <= MAX_STRING_LEN && m.chars().all(|c| c == 'é'));
        assert_eq!(decode_error_payload(&[0, 0, 0, 5, 0, 9, b'x']), None);
    }

    #[test]
    fn client_side_handshake_payloads_round_trip() {
        let go = encode_info_request(b"disk", &[INFO_BLOCK_SIZE]);
        assert_eq!(go, [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 1, 0, 3]);
        assert_eq!(
            decode_info(&encode_info_export(1 << 20, FLAG_HAS_FLAGS)),
            Some(Info::Export {
                size: 1 << 20,
                tflags: FLAG_HAS_FLAGS
            })
        );
        assert_eq!(
            decode_info(&encode_info_block_size(512, 4096, 1 << 25)),
            Some(Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 1 << 25
            })
        );
        assert_eq!(
            decode_info(&encode_info_string(INFO_NAME, "d")),
            Some(Info::Name("d".into()))
        );
        // A known type with the wrong length is not trusted.
        assert_eq!(decode_info(&[0, 0, 1]), Some(Info::Other(INFO_EXPORT)));
        assert_eq!(decode_info(&[0]), None);
        assert_eq!(
            decode_rep_server(&encode_rep_server("a", "desc")),
            Some(("a".into(), "desc".into()))
        );
        assert_eq!(decode_rep_server(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(rep_name(REP_ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
        assert_eq!(cmd_name(CMD_WRITE_ZEROES), "WRITE_ZEROES");
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_to_nbd(libc::EPERM), 1);
        assert_eq!(errno_to_nbd(libc::EIO), 5);
        assert_eq!(errno_to_nbd(libc::ENOMEM), 12);
        assert_eq!(errno_to_nbd(libc::EINVAL), 22);
        assert_eq!(errno_to_nbd(libc::ENOSPC), 28);
        assert_eq!(errno_to_nbd(libc::EDQUOT), 28);
        assert_eq!(errno_to_nbd(libc::EFBIG), 28);
        assert_eq!(errno_to_nbd(libc::EOVERFLOW), 75);
        assert_eq!(errno_to_nbd(libc::ENOTSUP), 95);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), 95);
        assert_eq!(errno_to_nbd(libc::ESHUTDOWN), 108);
        assert_eq!(errno_to_nbd(libc::ENOENT), NBD_EIO);
        assert_eq!(errno_to_nbd(0), NBD_EIO);
        assert_eq!(nbd_to_errno(NBD_ENOTSUP), libc::EOPNOTSUPP);
        assert_eq!(nbd_to_errno(12345), libc::EINVAL);
        for e in [1, 5, 12, 22, 28, 75, 95, 108] {
            assert_eq!(errno_to_nbd(nbd_to_errno(e)), e);
        }
    }

    #[tokio::test]
    async fn stream_io_round_trips() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let req = Request {
            flags: 0,
            typ: CMD_READ,
            handle: 5,
            offset: 4096,
            len: 512,
        };
        req.write_to(&mut a).await.unwrap();
        SimpleReply {
            error: 0,
            handle: 5,
        }
        .write_to(&mut a)
        .await
        .unwrap();
        let chunk = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            typ: REPLY_TYPE_NONE,
            handle: 6,
            len: 0,
        };
        chunk.write_to(&mut a).await.unwrap();
        assert_eq!(Request::read_from(&mut b).await.unwrap(), req);
        assert_eq!(
            ReplyHeader::read_from(&mut b).await.unwrap(),
            ReplyHeader::Simple(SimpleReply {
                error: 0,
                handle: 5
            })
        );
        assert_eq!(
            ReplyHeader::read_from(&mut b).await.unwrap(),
            ReplyHeader::Chunk(chunk)
        );
        drop(a);
        assert!(matches!(
            Request::read_from(&mut b).await,
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
    }
}
