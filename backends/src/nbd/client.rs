//! The NBD client connection: URIs, connecting, the fixed-newstyle handshake, and one
//! connection's transmission phase (many requests in flight, replies routed by handle).
//!
//! [`crate::nbd::member`] builds an array member from several of these connections and
//! adds what spans them: timeouts, reconnects, retries, request splitting.
//!
//! Buffers: a READ's data goes from the socket straight into the caller's [`IoBuf`]. The
//! reader task only writes into that buffer while holding the connection's request table
//! lock and while the request is still registered and not abandoned, and it never awaits
//! while holding the lock (it uses non-blocking `try_read` after `readable()`). A caller
//! that stops waiting (timeout, or its future dropped) marks its request abandoned under
//! the same lock, so once it returns the reader can no longer touch the buffer: a late
//! reply's data is read and thrown away.

use std::collections::HashMap;
#[cfg(test)]
use std::future::Future;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use raidcore::{IoBuf, IoError, IoResult};
use socket2::SockRef;
use thiserror::Error;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;

use super::wire::{self, ChunkHeader, Info, OptionHeader, OptionReply, Request, SimpleReply};

/// Option reply payloads larger than this end the handshake: the largest legitimate one
/// (an export name and description in NBD_REP_SERVER) is far smaller.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// At most this many exports are read from NBD_OPT_LIST.
const MAX_EXPORTS: usize = 10_000;
/// Requests larger than this are split even when the server allows more: the spec's
/// default maximum, and what every server accepts.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The receive buffer for reply headers and small payloads.
const RX_BUF: usize = 256 << 10;
/// Payload still to come beyond this is read straight into the caller's buffer.
const DIRECT_MIN: usize = 16 << 10;
/// Non-data structured chunks (errors, holes, NONE) larger than this are a violation.
const MAX_SMALL_CHUNK: u32 = 64 << 10;
/// Abandoned requests whose replies never came; beyond this the connection is dropped.
const MAX_ZOMBIES: usize = 4096;

// ---- URIs ---------------------------------------------------------------------------

/// Where an NBD export lives: libnbd's URI forms `nbd://host[:port]/export` and
/// `nbd+unix:///export?socket=/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// The export name ("" is the server's default export).
    pub export: String,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl NbdUri {
    /// Parse a URI. `nbds://` parses to an error: TLS is not supported yet.
    pub fn parse(text: &str) -> Result<Self, NbdError> {
        let text = text.trim();
        let bad = |why: &str| NbdError::BadUri {
            uri: text.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad("it has no scheme"))?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => {
                return Err(NbdError::TlsUri {
                    uri: text.to_string(),
                })
            }
            _ => return Err(bad("the scheme must be nbd:// or nbd+unix://")),
        };
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = main.split_once('/').unwrap_or((main, ""));
        let export =
            percent_decode(path).ok_or_else(|| bad("the export name has a bad %-escape"))?;
        let transport = if unix {
            unix_transport(authority, query).map_err(bad)?
        } else {
            tcp_transport(authority).map_err(|w| bad(&w))?
        };
        Ok(NbdUri {
            transport,
            export,
            text: text.to_string(),
        })
    }

    /// The URI as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The server part, for messages: `nbd://host:port` or `unix:/path`.
    pub fn server(&self) -> String {
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => format!("nbd://[{host}]:{port}"),
            Transport::Tcp { host, port } => format!("nbd://{host}:{port}"),
            Transport::Unix { path } => format!("unix:{}", path.display()),
        }
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn unix_transport(authority: &str, query: &str) -> Result<Transport, &'static str> {
    if !authority.is_empty() {
        return Err("nbd+unix:// takes no host (write nbd+unix:///export?socket=/path)");
    }
    let socket = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .ok_or("it names no socket (add ?socket=/path)")?;
    let path = percent_decode(socket).ok_or("the socket path has a bad %-escape")?;
    if path.is_empty() {
        return Err("the socket path is empty");
    }
    Ok(Transport::Unix {
        path: PathBuf::from(path),
    })
}

fn tcp_transport(authority: &str) -> Result<Transport, String> {
    // user@ is for TLS PSK in libnbd; without TLS it means nothing.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = crate::addr::host_port(hostport, wire::DEFAULT_PORT)?;
    Ok(Transport::Tcp { host, port })
}

/// Decode %XX escapes; None for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---- Errors -------------------------------------------------------------------------

/// Why a connection or handshake failed. Each message names the server and what to do.
#[derive(Debug, Error)]
pub enum NbdError {
    #[error("'{uri}' is not an NBD URI: {why}; write nbd://host[:port]/export or nbd+unix:///export?socket=/path")]
    BadUri { uri: String, why: String },
    #[error("'{uri}': NBD over TLS (nbds://) is not supported yet; serve the export without TLS on a trusted network or a unix socket")]
    TlsUri { uri: String },
    #[error("cannot connect: {reason}; {hint}")]
    Connect {
        reason: String,
        hint: String,
        errno: i32,
    },
    #[error("server at {server} did not finish the NBD handshake within {timeout:?}; is it an NBD server, and is it overloaded?")]
    HandshakeTimeout { server: String, timeout: Duration },
    #[error("server at {server} has no export '{export}' ({listing})")]
    NoExport {
        server: String,
        export: String,
        listing: String,
    },
    #[error("server at {server} requires TLS; uniblk's NBD client does not speak TLS yet: let the server accept plain connections (trusted network or unix socket)")]
    TlsRequired { server: String },
    #[error("server at {server} refused {what}: {reply}")]
    Refused {
        server: String,
        what: String,
        reply: String,
    },
    #[error("server at {server} broke the NBD handshake: {why}")]
    Protocol { server: String, why: String },
    #[error("server at {server} closed the connection during {during}{hint}")]
    Closed {
        server: String,
        during: &'static str,
        hint: &'static str,
    },
    #[error("export '{export}' on {server} is read-only; an array member must be writable")]
    ReadOnly { server: String, export: String },
    #[error(
        "export '{export}' on {server} holds {size} bytes, not one whole {block_size}-byte block"
    )]
    TooSmall {
        server: String,
        export: String,
        size: u64,
        block_size: u32,
    },
    #[error("connection to {server} failed during {during}: {error}")]
    Io {
        server: String,
        during: &'static str,
        error: io::Error,
    },
}

impl NbdError {
    /// The errno the management API reports for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::BadUri { .. } | NbdError::TooSmall { .. } => libc::EINVAL,
            NbdError::TlsUri { .. } | NbdError::TlsRequired { .. } => libc::EOPNOTSUPP,
            NbdError::Connect { errno, .. } => *errno,
            NbdError::HandshakeTimeout { .. } => libc::ETIMEDOUT,
            NbdError::NoExport { .. } => libc::ENOENT,
            NbdError::Refused { .. } => libc::EACCES,
            NbdError::Protocol { .. } => libc::EPROTO,
            NbdError::Closed { .. } => libc::ECONNRESET,
            NbdError::ReadOnly { .. } => libc::EROFS,
            NbdError::Io { error, .. } => error.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// An OS error's text without Rust's " (os error N)" suffix.
fn os_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---- Sockets ------------------------------------------------------------------------

/// One connected socket. Every operation takes `&self`: the reader task and the writers
/// share it (tokio allows concurrent read and write readiness on one stream).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
        }
    }

    fn try_read(&self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(b),
            Stream::Unix(s) => s.try_read(b),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.writable().await,
            Stream::Unix(s) => s.writable().await,
        }
    }

    fn try_write_vectored(&self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write_vectored(b),
            Stream::Unix(s) => s.try_write_vectored(b),
        }
    }

    /// Both directions, so a reader blocked on it wakes with EOF. Errors mean it is
    /// already gone.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => SockRef::from(s).shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => SockRef::from(s).shutdown(std::net::Shutdown::Both),
        };
    }

    async fn read_exact(&self, b: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < b.len() {
            self.readable().await?;
            match self.try_read(&mut b[done..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write `head` then `body`, in as few system calls as the socket allows.
    async fn write_all(&self, head: &[u8], body: &[u8]) -> io::Result<()> {
        let total = head.len() + body.len();
        let mut done = 0;
        while done < total {
            self.writable().await?;
            let slices = if done < head.len() {
                [IoSlice::new(&head[done..]), IoSlice::new(body)]
            } else {
                [IoSlice::new(&body[done - head.len()..]), IoSlice::new(&[])]
            };
            match self.try_write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// How to connect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Bounds the TCP connect, and separately the handshake.
    pub connect_timeout: Duration,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel
    /// drops the connection (a dead peer is noticed even mid-transfer).
    pub user_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            user_timeout: Duration::from_secs(30),
        }
    }
}

/// Open the socket a URI names, with NBD's TCP options (no Nagle, keepalive, user
/// timeout).
pub async fn connect_stream(uri: &NbdUri, opts: &ConnectOptions) -> Result<Stream, NbdError> {
    let attempt = async {
        match &uri.transport {
            Transport::Tcp { host, port } => connect_tcp(host, *port, opts).await,
            Transport::Unix { path } => UnixStream::connect(path)
                .await
                .map(Stream::Unix)
                .map_err(|e| connect_error(&e, Some(path))),
        }
    };
    match tokio::time::timeout(opts.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(NbdError::Connect {
            reason: format!("no answer within {:?}", opts.connect_timeout),
            hint: "check the address and the network (a firewall dropping packets?)".into(),
            errno: libc::ETIMEDOUT,
        }),
    }
}

async fn connect_tcp(host: &str, port: u16, opts: &ConnectOptions) -> Result<Stream, NbdError> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| NbdError::Connect {
            reason: format!("cannot resolve '{host}': {}", os_reason(&e)),
            hint: "check the host name".into(),
            errno: libc::EHOSTUNREACH,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => {
                crate::tcp::tune(&s, opts.user_timeout, "NBD");
                return Ok(Stream::Tcp(s));
            }
            Err(e) => last = e,
        }
    }
    Err(connect_error(&last, None))
}

fn connect_error(e: &io::Error, path: Option<&PathBuf>) -> NbdError {
    let hint = match (e.kind(), path) {
        (io::ErrorKind::ConnectionRefused, _) => "is the server running?".to_string(),
        (io::ErrorKind::NotFound, Some(p)) => {
            format!("nothing listens at {}; is the server running?", p.display())
        }
        (io::ErrorKind::PermissionDenied, Some(p)) => {
            format!("ublkd needs write permission on {}", p.display())
        }
        (io::ErrorKind::TimedOut, _) => "check the address and the network".to_string(),
        _ => "check the address and that the server is running".to_string(),
    };
    NbdError::Connect {
        reason: os_reason(e),
        hint,
        errno: e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
    }
}

// ---- Handshake ----------------------------------------------------------------------

/// What the handshake agreed for one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (wire::FLAG_*).
    pub tflags: u16,
    /// Block size constraints (the spec's defaults when the server sent none).
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
    /// Whether the server agreed to structured replies.
    pub structured: bool,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.tflags & flag != 0
    }
}

/// Connect and negotiate the URI's export.
pub async fn open_export(
    uri: &NbdUri,
    opts: &ConnectOptions,
) -> Result<(Stream, ExportInfo), NbdError> {
    let stream = connect_stream(uri, opts).await?;
    let server = uri.server();
    let hs = Handshake {
        s: &stream,
        server: &server,
    };
    let info = match tokio::time::timeout(opts.connect_timeout, hs.negotiate(&uri.export)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(NbdError::HandshakeTimeout {
                server,
                timeout: opts.connect_timeout,
            })
        }
    };
    Ok((stream, info))
}

/// One export as NBD_OPT_LIST and NBD_OPT_INFO describe it: name, description, size (None
/// when the server would not say).
pub type ExportListing = (String, String, Option<u64>);

/// List a server's exports, with their sizes. Takes a URI (`nbd://host[:port]`, any
/// export in it is ignored, or `nbd+unix:///?socket=/path`) or a bare `host[:port]`.
pub async fn list_exports(uri_or_hostport: &str) -> Result<Vec<ExportListing>, NbdError> {
    let text = uri_or_hostport.trim();
    let uri = if text.contains("://") {
        NbdUri::parse(text)?
    } else {
        NbdUri::parse(&format!("nbd://{text}"))?
    };
    let opts = ConnectOptions::default();
    let stream = connect_stream(&uri, &opts).await?;
    let server = uri.server();
    let hs = Handshake {
        s: &stream,
        server: &server,
    };
    let listing = tokio::time::timeout(opts.connect_timeout, hs.listing()).await;
    stream.shutdown();
    let mut listing = listing.map_err(|_| NbdError::HandshakeTimeout {
        server: server.clone(),
        timeout: opts.connect_timeout,
    })??;
    for (name, _, size) in listing.iter_mut().filter(|e| e.2 == Some(0)) {
        *size = size_via_go(&uri, name, &opts).await;
    }
    Ok(listing)
}

/// Some servers (nbd-server 3.2x) report size 0 to NBD_OPT_INFO and compute the size
/// only for NBD_OPT_GO: ask that way, on a connection of its own, and leave politely.
async fn size_via_go(uri: &NbdUri, export: &str, opts: &ConnectOptions) -> Option<u64> {
    let mut one = uri.clone();
    one.export = export.to_string();
    let (stream, info) = open_export(&one, opts).await.ok()?;
    let disc = Request {
        flags: 0,
        typ: wire::CMD_DISC,
        handle: 0,
        offset: 0,
        len: 0,
    };
    let _ = stream.write_all(&disc.encode(), &[]).await;
    stream.shutdown();
    Some(info.size)
}

/// What NBD_OPT_GO (or NBD_OPT_INFO) answered.
enum GoReply {
    Info(ExportInfo),
    /// The server lacks the option: fall back to NBD_OPT_EXPORT_NAME.
    Unsupported,
    Unknown(String),
    Refused(u32, String),
}

struct Handshake<'a> {
    s: &'a Stream,
    server: &'a str,
}

impl Handshake<'_> {
    fn io_error(&self, during: &'static str, e: io::Error) -> NbdError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return NbdError::Closed {
                server: self.server.to_string(),
                during,
                hint: "",
            };
        }
        NbdError::Io {
            server: self.server.to_string(),
            during,
            error: e,
        }
    }

    fn protocol(&self, why: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            server: self.server.to_string(),
            why: why.into(),
        }
    }

    async fn negotiate(&self, export: &str) -> Result<ExportInfo, NbdError> {
        let no_zeroes = self.greet().await?;
        let structured = self.structured_replies().await?;
        let mut info = match self.go(wire::OPT_GO, export).await? {
            GoReply::Info(info) => info,
            GoReply::Unsupported => self.export_name(export, no_zeroes).await?,
            GoReply::Unknown(msg) => return Err(self.no_export(export, &msg).await),
            GoReply::Refused(typ, msg) => return Err(self.refused_go(export, typ, msg)),
        };
        info.structured = structured;
        Ok(info)
    }

    /// Read the greeting, send our flags; returns whether NO_ZEROES was agreed.
    async fn greet(&self) -> Result<bool, NbdError> {
        let mut g = [0u8; wire::GREETING_LEN];
        self.s
            .read_exact(&mut g)
            .await
            .map_err(|e| self.io_error("the greeting", e))?;
        let greeting = wire::Greeting::decode(&g).map_err(|_| {
            self.protocol(
                "it did not greet with NBDMAGIC/IHAVEOPT (not an NBD server, or an oldstyle one)",
            )
        })?;
        if greeting.flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("it does not offer fixed newstyle negotiation"));
        }
        let no_zeroes = greeting.flags & wire::FLAG_NO_ZEROES != 0;
        let mut cflags = wire::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= wire::FLAG_C_NO_ZEROES;
        }
        self.s
            .write_all(&cflags.to_be_bytes(), &[])
            .await
            .map_err(|e| self.io_error("the greeting", e))?;
        Ok(no_zeroes)
    }

    async fn send_option(&self, option: u32, payload: &[u8]) -> Result<(), NbdError> {
        let h = OptionHeader {
            option,
            len: payload.len() as u32,
        };
        self.s
            .write_all(&h.encode(), payload)
            .await
            .map_err(|e| self.io_error("option negotiation", e))
    }

    /// One option reply and its payload; it must answer `option`.
    async fn reply(&self, option: u32) -> Result<(OptionReply, Vec<u8>), NbdError> {
        let mut h = [0u8; wire::OPTION_REPLY_LEN];
        self.s
            .read_exact(&mut h)
            .await
            .map_err(|e| self.io_error("option negotiation", e))?;
        let r = OptionReply::decode(&h).map_err(|e| self.protocol(e.to_string()))?;
        if r.option != option {
            return Err(self.protocol(format!(
                "it answered option {} when asked option {option}",
                r.option
            )));
        }
        if r.len > MAX_OPTION_REPLY {
            return Err(self.protocol(format!("an option reply of {} bytes", r.len)));
        }
        let mut p = vec![0u8; r.len as usize];
        self.s
            .read_exact(&mut p)
            .await
            .map_err(|e| self.io_error("option negotiation", e))?;
        Ok((r, p))
    }

    /// Ask for structured replies. A refusal is fine (simple replies), except that a
    /// server demanding TLS says so here first.
    async fn structured_replies(&self) -> Result<bool, NbdError> {
        self.send_option(wire::OPT_STRUCTURED_REPLY, &[]).await?;
        let (r, _) = self.reply(wire::OPT_STRUCTURED_REPLY).await?;
        match r.typ {
            wire::REP_ACK => Ok(true),
            wire::REP_ERR_TLS_REQD => Err(NbdError::TlsRequired {
                server: self.server.to_string(),
            }),
            _ => Ok(false),
        }
    }

    /// NBD_OPT_GO or NBD_OPT_INFO for `export`, asking for block size constraints.
    async fn go(&self, option: u32, export: &str) -> Result<GoReply, NbdError> {
        let payload = wire::encode_info_request(export.as_bytes(), &[wire::INFO_BLOCK_SIZE]);
        self.send_option(option, &payload).await?;
        let mut export_info = None;
        let mut sizes = None;
        loop {
            let (r, p) = self.reply(option).await?;
            match r.typ {
                wire::REP_INFO => match wire::decode_info(&p) {
                    Some(Info::Export { size, tflags }) => export_info = Some((size, tflags)),
                    Some(Info::BlockSize {
                        min,
                        preferred,
                        max,
                    }) => sizes = Some(self.block_sizes(min, preferred, max)?),
                    // Names, descriptions and unknown types are ignored, as the spec asks.
                    _ => {}
                },
                wire::REP_ACK => break,
                wire::REP_ERR_UNSUP => return Ok(GoReply::Unsupported),
                wire::REP_ERR_UNKNOWN => return Ok(GoReply::Unknown(message(&p))),
                wire::REP_ERR_TLS_REQD => {
                    return Err(NbdError::TlsRequired {
                        server: self.server.to_string(),
                    })
                }
                t if r.is_error() => return Ok(GoReply::Refused(t, message(&p))),
                t => return Err(self.protocol(format!("{} in answer to GO", wire::rep_name(t)))),
            }
        }
        let (size, tflags) =
            export_info.ok_or_else(|| self.protocol("GO succeeded without NBD_INFO_EXPORT"))?;
        let (min, pref, max) = sizes.unwrap_or((1, 4096, MAX_REQUEST));
        Ok(GoReply::Info(ExportInfo {
            size,
            tflags,
            min_block: min,
            pref_block: pref,
            max_block: max,
            structured: false,
        }))
    }

    /// Check the server's block size constraints (spec: minimum a power of two up to
    /// 64 KiB, preferred a power of two at least the minimum, maximum a multiple of the
    /// minimum or 0xffffffff).
    fn block_sizes(&self, min: u32, pref: u32, max: u32) -> Result<(u32, u32, u32), NbdError> {
        let valid = min.is_power_of_two()
            && min <= 64 << 10
            && pref.is_power_of_two()
            && pref >= min
            && max >= min;
        if !valid {
            return Err(self.protocol(format!(
                "impossible block size constraints: minimum {min}, preferred {pref}, maximum {max}"
            )));
        }
        Ok((min, pref, max))
    }

    /// The old way in, for servers without NBD_OPT_GO. An unknown export closes the
    /// connection: the option has no error reply.
    async fn export_name(&self, export: &str, no_zeroes: bool) -> Result<ExportInfo, NbdError> {
        self.send_option(wire::OPT_EXPORT_NAME, export.as_bytes())
            .await?;
        let mut b = vec![
            0u8;
            if no_zeroes {
                10
            } else {
                10 + wire::EXPORT_NAME_ZEROES
            }
        ];
        self.s.read_exact(&mut b).await.map_err(|e| match self.io_error("EXPORT_NAME", e) {
            NbdError::Closed { server, .. } => NbdError::Closed {
                server,
                during: "EXPORT_NAME",
                hint: " (a server without NBD_OPT_GO does that for an export it does not have; check the export name)",
            },
            other => other,
        })?;
        Ok(ExportInfo {
            size: u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()),
            tflags: u16::from_be_bytes([b[8], b[9]]),
            min_block: 1,
            pref_block: 4096,
            max_block: MAX_REQUEST,
            structured: false,
        })
    }

    /// The error for an unknown export, listing what the server does have.
    async fn no_export(&self, export: &str, msg: &str) -> NbdError {
        let listing = match self.list().await {
            Ok(Ok(list)) if list.is_empty() => "it lists no exports".to_string(),
            Ok(Ok(list)) => {
                let names: Vec<String> = list
                    .iter()
                    .map(|(n, _)| {
                        if n.is_empty() {
                            "(default)".into()
                        } else {
                            n.clone()
                        }
                    })
                    .collect();
                format!("its exports: {}", names.join(", "))
            }
            Ok(Err(why)) => format!("it does not list its exports: {why}"),
            Err(e) => format!("listing its exports failed: {e}"),
        };
        self.abort().await;
        let listing = if msg.is_empty() {
            listing
        } else {
            format!("{listing}; it said: {msg}")
        };
        NbdError::NoExport {
            server: self.server.to_string(),
            export: export.to_string(),
            listing,
        }
    }

    fn refused_go(&self, export: &str, typ: u32, msg: String) -> NbdError {
        let reply = if msg.is_empty() {
            wire::rep_name(typ).to_string()
        } else {
            format!("{} ({msg})", wire::rep_name(typ))
        };
        NbdError::Refused {
            server: self.server.to_string(),
            what: format!("export '{export}'"),
            reply,
        }
    }

    /// NBD_OPT_LIST: Ok(Err(why)) when the server refuses to list.
    async fn list(&self) -> Result<Result<Vec<(String, String)>, String>, NbdError> {
        self.send_option(wire::OPT_LIST, &[]).await?;
        let mut out = Vec::new();
        loop {
            let (r, p) = self.reply(wire::OPT_LIST).await?;
            match r.typ {
                wire::REP_SERVER => {
                    let entry = wire::decode_rep_server(&p)
                        .ok_or_else(|| self.protocol("a malformed NBD_REP_SERVER"))?;
                    if out.len() < MAX_EXPORTS {
                        out.push(entry);
                    }
                }
                wire::REP_ACK => return Ok(Ok(out)),
                t if r.is_error() => {
                    let m = message(&p);
                    return Ok(Err(if m.is_empty() {
                        wire::rep_name(t).to_string()
                    } else {
                        format!("{} ({m})", wire::rep_name(t))
                    }));
                }
                t => return Err(self.protocol(format!("{} in answer to LIST", wire::rep_name(t)))),
            }
        }
    }

    /// Every export with its size (NBD_OPT_INFO per export), then NBD_OPT_ABORT.
    async fn listing(&self) -> Result<Vec<ExportListing>, NbdError> {
        self.greet().await?;
        let list = self.list().await?.map_err(|reply| NbdError::Refused {
            server: self.server.to_string(),
            what: "to list its exports".into(),
            reply,
        })?;
        let mut out = Vec::with_capacity(list.len());
        for (name, desc) in list {
            let size = match self.go(wire::OPT_INFO, &name).await? {
                GoReply::Info(i) => Some(i.size),
                _ => None,
            };
            out.push((name, desc, size));
        }
        self.abort().await;
        Ok(out)
    }

    /// Best effort: we are leaving anyway.
    async fn abort(&self) {
        let _ = self.send_option(wire::OPT_ABORT, &[]).await;
    }
}

/// An option error's payload is a human-readable message (possibly empty).
fn message(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    wire::truncate_str(s.trim(), wire::MAX_STRING_LEN).to_string()
}

// ---- Transmission -------------------------------------------------------------------

/// One command to send. For READ, `buf` receives `len` bytes; for WRITE it holds them;
/// other commands carry no data (`buf` is ignored).
#[derive(Debug, Clone, Copy)]
pub struct Cmd {
    pub typ: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    pub buf: IoBuf,
}

/// How a request ended on one connection.
#[derive(Debug)]
pub enum Outcome {
    /// The server answered (or the reply was malformed, which is an error answer).
    Done(IoResult),
    /// The connection died first; the request may be sent again on another one.
    Lost(String),
}

/// A request waiting for its reply.
struct Pending {
    typ: u16,
    offset: u64,
    len: u32,
    /// The READ destination; None once abandoned (the reader then discards the data).
    buf: Option<IoBuf>,
    abandoned: bool,
    /// Byte ranges of a structured READ reply received so far (relative, sorted).
    got: Vec<(u64, u64)>,
    covered: u64,
    error: Option<IoError>,
    tx: Option<oneshot::Sender<Outcome>>,
}

impl Pending {
    /// Record a received range; false when it overlaps one already received.
    fn claim(&mut self, start: u64, len: u64) -> bool {
        let end = start + len;
        let at = self.got.partition_point(|&(s, _)| s < start);
        let clash_before = at > 0 && self.got[at - 1].1 > start;
        let clash_after = at < self.got.len() && self.got[at].0 < end;
        if clash_before || clash_after {
            return false;
        }
        self.got.insert(at, (start, end));
        self.covered += len;
        true
    }
}

#[derive(Default)]
struct Table {
    map: HashMap<u64, Pending>,
    zombies: usize,
    dead: bool,
}

/// What the reader knows of a request while parsing its reply.
#[derive(Debug, Clone, Copy)]
struct ReqView {
    typ: u16,
    offset: u64,
    len: u32,
}

/// Bodies up to this size are copied into the connection's send queue, so that requests
/// from many callers leave together in one system call (at queue depth 32 a 4 KiB random
/// write load otherwise pays one send per request). Larger bodies are written straight
/// from the caller's buffer: the copy would cost more than the call it saves.
const COALESCE_BODY: usize = 16 << 10;

/// Requests waiting to be written, and whether some caller holds the writer role.
#[derive(Default)]
struct OutQueue {
    bytes: Vec<u8>,
    /// The previous batch's allocation, kept for the next one.
    spare: Vec<u8>,
    /// A caller is writing to the socket: it writes whatever is queued before it lets go.
    busy: bool,
}

/// One connection in transmission phase. Requests are sent by their callers: the first
/// caller to find the socket idle takes the writer role and writes every request queued
/// meanwhile (flat combining); [`Conn::run_reader`] must run on a task of its own to
/// receive the replies.
pub struct Conn {
    stream: Stream,
    info: ExportInfo,
    /// The member's URI, for error messages.
    label: String,
    out: Mutex<OutQueue>,
    /// Signalled when the writer role is released (or the connection dies).
    idle: tokio::sync::Notify,
    table: Mutex<Table>,
    next_handle: AtomicU64,
    dead: AtomicBool,
    in_flight: AtomicUsize,
    sent: AtomicU64,
}

impl Conn {
    pub fn new(stream: Stream, info: ExportInfo, label: &str) -> Self {
        Conn {
            stream,
            info,
            label: label.to_string(),
            out: Mutex::new(OutQueue::default()),
            idle: tokio::sync::Notify::new(),
            table: Mutex::new(Table::default()),
            next_handle: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
        }
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// A writer holds the socket (or a batch waits for a plug to go): a request queued
    /// now goes out in that same write.
    pub fn is_writing(&self) -> bool {
        self.out().busy
    }

    /// Requests waiting for a reply now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent over this connection's life.
    pub fn requests(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn out(&self) -> MutexGuard<'_, OutQueue> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop the connection now: no new requests, the reader wakes and fails the rest.
    pub fn kill(&self) {
        self.lock().dead = true;
        self.dead.store(true, Ordering::Release);
        self.stream.shutdown();
        // Callers waiting for the writer role find the connection dead and give up.
        self.idle.notify_waiters();
    }

    /// Say goodbye (NBD_CMD_DISC, when no request is being written) and drop the
    /// connection. Does not wait.
    pub fn disconnect(&self) {
        let out = self.out();
        if !out.busy {
            let disc = Request {
                flags: 0,
                typ: wire::CMD_DISC,
                handle: 0,
                offset: 0,
                len: 0,
            };
            let b = disc.encode();
            let _ = self.stream.try_write_vectored(&[IoSlice::new(&b)]);
        }
        drop(out);
        self.kill();
    }

    /// Send one request and wait for its reply. Dropping the future abandons the request
    /// safely (see the module docs); a request cut off while being written kills the
    /// connection, since the stream is then out of step.
    pub async fn request(self: &Arc<Self>, cmd: Cmd) -> Outcome {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.lock();
            // Checked under the lock the reader drains under, so no request is stranded.
            if t.dead {
                return Outcome::Lost("the connection is closed".into());
            }
            t.map.insert(handle, pending(&cmd, tx));
        }
        let mut guard = InFlight::new(self, handle);
        self.send(&cmd, handle, &mut guard).await;
        let out = rx
            .await
            .unwrap_or_else(|_| Outcome::Lost("the connection closed".into()));
        guard.finished = true;
        out
    }

    /// Write the request: queued for the current writer when it is small, else written by
    /// this caller once it holds the writer role. On failure the connection is killed, and
    /// the reader's drain answers the request `Lost`.
    async fn send(self: &Arc<Self>, cmd: &Cmd, handle: u64, guard: &mut InFlight<'_>) {
        let header = Request {
            flags: cmd.flags,
            typ: cmd.typ,
            handle,
            offset: cmd.offset,
            len: cmd.len,
        }
        .encode();
        let body: &[u8] = if cmd.typ == wire::CMD_WRITE {
            // SAFETY: the caller keeps the buffer alive and unchanged until this request
            // completes (raidcore IoBuf contract); we only read it, before returning.
            unsafe { cmd.buf.as_slice() }
        } else {
            &[]
        };
        if body.len() <= COALESCE_BODY {
            match self.enqueue(&header, body, guard) {
                Queued::Dead => self.kill(),
                Queued::ForTheWriter => {}
                // Under a plug, the whole batch is written once the plug goes (ring).
                Queued::MustWrite if raidcore::plug::defer(self) => {}
                Queued::MustWrite => self.write_queued(None).await,
            }
            return;
        }
        if !self.take_writer_role().await {
            self.kill();
            return;
        }
        guard.sent = true;
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.write_queued(Some((&header, body))).await
    }

    /// Queue a small request; the caller becomes the writer when no one else is.
    fn enqueue(&self, header: &[u8], body: &[u8], guard: &mut InFlight<'_>) -> Queued {
        let mut out = self.out();
        if self.is_dead() {
            return Queued::Dead;
        }
        out.bytes.extend_from_slice(header);
        out.bytes.extend_from_slice(body);
        // Queued means sent: the writer writes it, or the connection dies.
        guard.sent = true;
        self.sent.fetch_add(1, Ordering::Relaxed);
        if out.busy {
            return Queued::ForTheWriter;
        }
        out.busy = true;
        Queued::MustWrite
    }

    /// Wait until no one is writing and take the role; false once the connection is dead.
    async fn take_writer_role(&self) -> bool {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a release in between is not missed.
            idle.as_mut().enable();
            {
                let mut out = self.out();
                if self.is_dead() {
                    return false;
                }
                if !out.busy {
                    out.busy = true;
                    return true;
                }
            }
            idle.await;
        }
    }

    /// As the writer: write `own` (a large request, straight from its buffer) and every
    /// queued request, until the queue is empty; then let go of the role.
    async fn write_queued(&self, mut own: Option<(&[u8], &[u8])>) {
        let mut role = WriterRole(Some(self));
        loop {
            let batch = {
                let mut out = self.out();
                if out.bytes.is_empty() && own.is_none() {
                    // Let go under the same lock that saw the queue empty: a request
                    // queued after this finds the role free and writes itself.
                    out.busy = false;
                    break;
                }
                let spare = std::mem::take(&mut out.spare);
                std::mem::replace(&mut out.bytes, spare)
            };
            let mut res = Ok(());
            if !batch.is_empty() {
                res = self.stream.write_all(&batch, &[]).await;
            }
            if let (Ok(()), Some((head, body))) = (&res, own.take()) {
                res = self.stream.write_all(head, body).await;
            }
            if let Err(e) = res {
                tracing::debug!(member = %self.label, error = %e, "NBD send failed");
                return; // `role` kills the connection and lets go
            }
            let mut batch = batch;
            batch.clear();
            self.out().spare = batch;
        }
        role.0 = None;
        self.idle.notify_one();
    }

    /// As the writer (the role taken by a request deferred under a plug): write what is
    /// queued without waiting. Whatever the socket does not take now is written by a
    /// task, which then lets go of the role.
    fn write_queued_now(self: Arc<Self>) {
        loop {
            let batch = {
                let mut out = self.out();
                if out.bytes.is_empty() {
                    out.busy = false;
                    drop(out);
                    self.idle.notify_one();
                    return;
                }
                let spare = std::mem::take(&mut out.spare);
                std::mem::replace(&mut out.bytes, spare)
            };
            let written = match self.stream.try_write_vectored(&[IoSlice::new(&batch)]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    tracing::debug!(member = %self.label, error = %e, "NBD send failed");
                    self.kill();
                    self.abandon_writer_role();
                    return;
                }
            };
            if written < batch.len() {
                // Put the rest back in front of anything queued since, in order.
                let mut out = self.out();
                let mut rest = batch[written..].to_vec();
                rest.extend_from_slice(&out.bytes);
                out.bytes = rest;
                drop(out);
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move { self.write_queued(None).await });
                    }
                    Err(_) => {
                        self.kill();
                        self.abandon_writer_role();
                    }
                }
                return;
            }
            let mut batch = batch;
            batch.clear();
            self.out().spare = batch;
        }
    }

    /// After a failed or cancelled write, on a connection already killed: what is still
    /// queued is dropped (the reader answers those requests `Lost`) and the role is free.
    fn abandon_writer_role(&self) {
        let mut out = self.out();
        out.busy = false;
        out.bytes.clear();
        drop(out);
        self.idle.notify_one();
    }

    /// Receive replies until the connection dies; then fail every request still waiting
    /// (`Lost` when the connection broke, an error when the server broke the protocol).
    /// Returns why it ended.
    pub async fn run_reader(&self) -> String {
        let mut r = Reader {
            conn: self,
            rx: RxBuf::new(RX_BUF),
        };
        let end = r.run().await;
        let (reason, violation) = match end {
            ReadEnd::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                ("the server closed the connection".to_string(), false)
            }
            ReadEnd::Io(e) => (format!("connection error: {}", os_reason(&e)), false),
            ReadEnd::Protocol(why) => (format!("protocol violation: {why}"), true),
        };
        self.kill();
        self.fail_all(&reason, violation);
        reason
    }

    fn fail_all(&self, reason: &str, violation: bool) {
        let mut t = self.lock();
        t.dead = true;
        t.zombies = 0;
        for (_, p) in t.map.drain() {
            let Some(tx) = p.tx else { continue };
            let out = if violation {
                Outcome::Done(Err(IoError::Io(format!("{}: {reason}", self.label))))
            } else {
                Outcome::Lost(reason.to_string())
            };
            let _ = tx.send(out);
        }
    }

    fn view(&self, handle: u64) -> Option<ReqView> {
        self.lock().map.get(&handle).map(|p| ReqView {
            typ: p.typ,
            offset: p.offset,
            len: p.len,
        })
    }

    fn set_error(&self, handle: u64, e: IoError) {
        if let Some(p) = self.lock().map.get_mut(&handle) {
            p.error.get_or_insert(e);
        }
    }

    fn claim(&self, handle: u64, start: u64, len: u64) -> bool {
        self.lock()
            .map
            .get_mut(&handle)
            .is_some_and(|p| p.claim(start, len))
    }

    /// Run `f` on `[at, at+len)` of the request's buffer, under the table lock; `f` gets
    /// None when the request was abandoned (or the range does not fit, which validation
    /// rules out).
    fn with_dest<R>(
        &self,
        handle: u64,
        at: usize,
        len: usize,
        f: impl FnOnce(Option<&mut [u8]>) -> R,
    ) -> R {
        let t = self.lock();
        let Some(buf) = t.map.get(&handle).and_then(|p| p.buf) else {
            return f(None);
        };
        let end = at.saturating_add(len);
        // SAFETY: a registered, non-abandoned request's buffer is alive and reserved for
        // this I/O (raidcore IoBuf contract); abandoning takes the lock we hold (`t`), so
        // the caller cannot leave while we write. `get_mut` keeps us inside it.
        let dest = unsafe { buf.as_mut_slice() }.get_mut(at..end);
        let r = f(dest);
        drop(t);
        r
    }

    /// The reply is complete: hand the result to the waiting caller.
    fn finish(&self, handle: u64) {
        let mut t = self.lock();
        let Some(p) = t.map.remove(&handle) else {
            return;
        };
        if p.abandoned {
            t.zombies = t.zombies.saturating_sub(1);
            return;
        }
        let result = match p.error {
            Some(e) => Err(e),
            None if p.typ == wire::CMD_READ && p.covered != u64::from(p.len) => {
                Err(IoError::Io(format!(
                    "{}: the server's reply to READ at offset {} covered {} of {} bytes",
                    self.label, p.offset, p.covered, p.len
                )))
            }
            None => Ok(()),
        };
        if let Some(tx) = p.tx {
            let _ = tx.send(Outcome::Done(result));
        }
    }

    /// The IoError for an error the server reported.
    fn server_error(&self, req: &ReqView, nbd_error: u32, msg: &str) -> IoError {
        let what = format!(
            "{}: the server failed {} of {} bytes at offset {}{}{}",
            self.label,
            wire::cmd_name(req.typ),
            req.len,
            req.offset,
            if msg.is_empty() { "" } else { ": " },
            msg
        );
        IoError::from_errno(&what, wire::nbd_to_errno(nbd_error))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stream.shutdown();
    }
}

fn pending(cmd: &Cmd, tx: oneshot::Sender<Outcome>) -> Pending {
    Pending {
        typ: cmd.typ,
        offset: cmd.offset,
        len: cmd.len,
        buf: (cmd.typ == wire::CMD_READ).then_some(cmd.buf),
        abandoned: false,
        got: Vec::new(),
        covered: 0,
        error: None,
        tx: Some(tx),
    }
}

/// Tracks one request of a caller; on drop before the reply, abandons it so the reader
/// never touches its buffer again.
struct InFlight<'a> {
    conn: &'a Conn,
    handle: u64,
    sent: bool,
    finished: bool,
}

impl<'a> InFlight<'a> {
    fn new(conn: &'a Conn, handle: u64) -> Self {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            conn,
            handle,
            sent: false,
            finished: false,
        }
    }
}

/// The plug's doorbell: requests queued under the plug go out in one write.
impl raidcore::plug::Doorbell for Conn {
    fn ring(self: Arc<Self>) {
        self.write_queued_now();
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.finished {
            return;
        }
        let mut t = self.conn.lock();
        if !self.sent {
            t.map.remove(&self.handle);
            return;
        }
        // Sent: its reply may still come and must be parsed (a simple READ reply's length
        // is known only from the request), so it stays as a zombie.
        let Some(p) = t.map.get_mut(&self.handle) else {
            return;
        };
        p.buf = None;
        p.tx = None;
        p.abandoned = true;
        t.zombies += 1;
        if t.zombies > MAX_ZOMBIES {
            drop(t);
            tracing::warn!(member = %self.conn.label, "too many unanswered NBD requests; dropping the connection");
            self.conn.kill();
        }
    }
}

/// Kills the connection if a write is cut off midway (its future dropped).
enum Queued {
    Dead,
    /// Another caller holds the writer role and will write it.
    ForTheWriter,
    /// This caller took the writer role.
    MustWrite,
}

/// Held by the caller in the writer role. Dropped while armed (its future cancelled
/// mid-write, or a write failed), the stream may be out of step and other callers'
/// requests may be unwritten: the connection is killed (the reader answers every request
/// `Lost`, so each is re-sent elsewhere) and the role is let go.
struct WriterRole<'a>(Option<&'a Conn>);

impl Drop for WriterRole<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.kill();
            c.abandon_writer_role();
        }
    }
}

// ---- Receiving ----------------------------------------------------------------------

/// Why the reader stopped.
enum ReadEnd {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for ReadEnd {
    fn from(e: io::Error) -> Self {
        ReadEnd::Io(e)
    }
}

/// Received bytes not yet parsed.
struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RxBuf {
    fn new(cap: usize) -> Self {
        RxBuf {
            buf: vec![0u8; cap].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    fn peek(&self, n: usize) -> &[u8] {
        &self.buf[self.start..self.start + n]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Read whatever the socket has (at least one byte).
    async fn fill_some(&mut self, s: &Stream) -> io::Result<()> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            s.readable().await?;
            match s.try_read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Make `n` (at most the capacity) bytes available.
    async fn need(&mut self, s: &Stream, n: usize) -> io::Result<()> {
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.available() < n {
            self.fill_some(s).await?;
        }
        Ok(())
    }

    async fn take_vec(&mut self, s: &Stream, n: usize) -> io::Result<Vec<u8>> {
        self.need(s, n).await?;
        let v = self.peek(n).to_vec();
        self.consume(n);
        Ok(v)
    }
}

struct Reader<'a> {
    conn: &'a Conn,
    rx: RxBuf,
}

impl Reader<'_> {
    async fn run(&mut self) -> ReadEnd {
        loop {
            if let Err(end) = self.one().await {
                return end;
            }
        }
    }

    /// Parse one reply (simple) or one chunk (structured).
    async fn one(&mut self) -> Result<(), ReadEnd> {
        let s = &self.conn.stream;
        self.rx.need(s, 4).await?;
        let magic = u32::from_be_bytes(self.rx.peek(4).try_into().unwrap_or_default());
        match magic {
            wire::SIMPLE_REPLY_MAGIC => {
                self.rx.need(s, wire::SIMPLE_REPLY_LEN).await?;
                let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
                h.copy_from_slice(self.rx.peek(wire::SIMPLE_REPLY_LEN));
                self.rx.consume(wire::SIMPLE_REPLY_LEN);
                let r = SimpleReply::decode(&h).map_err(|e| ReadEnd::Protocol(e.to_string()))?;
                self.simple(r).await
            }
            wire::STRUCTURED_REPLY_MAGIC if self.conn.info.structured => {
                self.rx.need(s, wire::CHUNK_HEADER_LEN).await?;
                let mut h = [0u8; wire::CHUNK_HEADER_LEN];
                h.copy_from_slice(self.rx.peek(wire::CHUNK_HEADER_LEN));
                self.rx.consume(wire::CHUNK_HEADER_LEN);
                let c = ChunkHeader::decode(&h).map_err(|e| ReadEnd::Protocol(e.to_string()))?;
                self.chunk(c).await
            }
            wire::STRUCTURED_REPLY_MAGIC => Err(ReadEnd::Protocol(
                "a structured reply, which was not negotiated".into(),
            )),
            m => Err(ReadEnd::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }

    fn request(&self, handle: u64) -> Result<ReqView, ReadEnd> {
        self.conn.view(handle).ok_or_else(|| {
            ReadEnd::Protocol(format!(
                "a reply for handle {handle:#x}, which no request has"
            ))
        })
    }

    async fn simple(&mut self, r: SimpleReply) -> Result<(), ReadEnd> {
        let req = self.request(r.handle)?;
        if r.error != 0 {
            let e = self.conn.server_error(&req, r.error, "");
            self.conn.set_error(r.handle, e);
        } else if req.typ == wire::CMD_READ {
            // Simple READ replies carry no length: it is the request's.
            self.data(r.handle, 0, req.len as usize).await?;
            self.conn.claim(r.handle, 0, u64::from(req.len));
        }
        self.conn.finish(r.handle);
        Ok(())
    }

    async fn chunk(&mut self, c: ChunkHeader) -> Result<(), ReadEnd> {
        let req = self.request(c.handle)?;
        match c.typ {
            wire::REPLY_TYPE_NONE if c.len == 0 && c.is_done() => {}
            wire::REPLY_TYPE_OFFSET_DATA => self.offset_data(&c, &req).await?,
            wire::REPLY_TYPE_OFFSET_HOLE => self.offset_hole(&c, &req).await?,
            t if c.is_error() => self.error_chunk(&c, &req, t).await?,
            t => {
                return Err(ReadEnd::Protocol(format!(
                    "an unexpected reply chunk (type {t}, {} bytes) to {}",
                    c.len,
                    wire::cmd_name(req.typ)
                )))
            }
        }
        if c.is_done() {
            self.conn.finish(c.handle);
        }
        Ok(())
    }

    /// Check that `[offset, offset+len)` lies inside the READ request and was not sent
    /// before; returns its start relative to the request.
    fn place(&self, handle: u64, req: &ReqView, offset: u64, len: u64) -> Result<u64, ReadEnd> {
        let rel = offset.checked_sub(req.offset);
        let fits = rel.is_some_and(|r| r.checked_add(len).is_some_and(|e| e <= u64::from(req.len)));
        match rel {
            Some(rel) if fits && len > 0 && req.typ == wire::CMD_READ => {
                if self.conn.claim(handle, rel, len) {
                    Ok(rel)
                } else {
                    Err(ReadEnd::Protocol(format!(
                        "READ reply chunks overlap at offset {offset}"
                    )))
                }
            }
            _ => Err(ReadEnd::Protocol(format!(
                "a reply chunk for [{offset}, +{len}) to {} of [{}, +{})",
                wire::cmd_name(req.typ),
                req.offset,
                req.len
            ))),
        }
    }

    async fn offset_data(&mut self, c: &ChunkHeader, req: &ReqView) -> Result<(), ReadEnd> {
        if c.len < 9 || u64::from(c.len) > 8 + u64::from(req.len) {
            return Err(ReadEnd::Protocol(format!(
                "an OFFSET_DATA chunk of {} bytes for a {}-byte request",
                c.len, req.len
            )));
        }
        let head = self.rx.take_vec(&self.conn.stream, 8).await?;
        let offset = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
        let len = u64::from(c.len - 8);
        let rel = self.place(c.handle, req, offset, len)?;
        self.data(c.handle, rel as usize, len as usize).await
    }

    async fn offset_hole(&mut self, c: &ChunkHeader, req: &ReqView) -> Result<(), ReadEnd> {
        if c.len != 12 {
            return Err(ReadEnd::Protocol(format!(
                "an OFFSET_HOLE chunk of {} bytes",
                c.len
            )));
        }
        let p = self.rx.take_vec(&self.conn.stream, 12).await?;
        let offset = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
        let len = u64::from(u32::from_be_bytes(p[8..12].try_into().unwrap_or_default()));
        let rel = self.place(c.handle, req, offset, len)?;
        self.conn
            .with_dest(c.handle, rel as usize, len as usize, |d| {
                if let Some(d) = d {
                    d.fill(0);
                }
            });
        Ok(())
    }

    async fn error_chunk(&mut self, c: &ChunkHeader, req: &ReqView, t: u16) -> Result<(), ReadEnd> {
        if c.len < 6 || c.len > MAX_SMALL_CHUNK {
            return Err(ReadEnd::Protocol(format!(
                "an error chunk of {} bytes",
                c.len
            )));
        }
        let p = self.rx.take_vec(&self.conn.stream, c.len as usize).await?;
        let (error, msg) = wire::decode_error_payload(&p)
            .ok_or_else(|| ReadEnd::Protocol("an error chunk whose message overruns it".into()))?;
        let mut e = self.conn.server_error(req, error, &msg);
        if t != wire::REPLY_TYPE_ERROR && t != wire::REPLY_TYPE_ERROR_OFFSET {
            // Unknown error types still fail the request, as the spec asks.
            e = IoError::Io(format!("{e} (error chunk type {t:#x})"));
        }
        self.conn.set_error(c.handle, e);
        Ok(())
    }

    /// Move `len` payload bytes into the request's buffer at `at`: what is buffered is
    /// copied, the rest read from the socket straight into the buffer. An abandoned
    /// request's bytes are read and dropped.
    async fn data(&mut self, handle: u64, at: usize, len: usize) -> Result<(), ReadEnd> {
        let conn = self.conn;
        let mut done = 0;
        while done < len {
            let want = len - done;
            if self.rx.available() > 0 {
                let n = want.min(self.rx.available());
                let src = self.rx.peek(n);
                conn.with_dest(handle, at + done, n, |d| {
                    if let Some(d) = d {
                        d.copy_from_slice(src);
                    }
                });
                self.rx.consume(n);
                done += n;
            } else if want >= DIRECT_MIN {
                conn.stream.readable().await?;
                let r = conn.with_dest(handle, at + done, want, |d| {
                    d.map(|d| conn.stream.try_read(d))
                });
                match r {
                    Some(Ok(0)) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                    Some(Ok(n)) => done += n,
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => self.rx.fill_some(&conn.stream).await?,
                }
            } else {
                self.rx.fill_some(&conn.stream).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Protocol corner cases no real server produces on demand: a scripted peer on a
    //! socketpair lies, reorders and stalls; the client must answer with errors, never a
    //! panic, a hang or a write outside the caller's buffer.

    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn info(structured: bool) -> ExportInfo {
        ExportInfo {
            size: 1 << 20,
            tflags: wire::FLAG_HAS_FLAGS,
            min_block: 1,
            pref_block: 4096,
            max_block: MAX_REQUEST,
            structured,
        }
    }

    /// A connection whose reader runs, and the server's end of it.
    fn conn(structured: bool) -> (Arc<Conn>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let c = Arc::new(Conn::new(Stream::Unix(a), info(structured), "nbd://fake/t"));
        let r = c.clone();
        tokio::spawn(async move { r.run_reader().await });
        (c, b)
    }

    async fn request(s: &mut UnixStream) -> Request {
        let mut b = [0u8; wire::REQUEST_LEN];
        s.read_exact(&mut b).await.unwrap();
        let r = Request::decode(&b).unwrap();
        if r.typ == wire::CMD_WRITE {
            let mut p = vec![0u8; r.len as usize];
            s.read_exact(&mut p).await.unwrap();
        }
        r
    }

    fn chunk(flags: u16, typ: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let h = ChunkHeader {
            flags,
            typ,
            handle,
            len: payload.len() as u32,
        };
        [&h.encode()[..], payload].concat()
    }

    fn data(handle: u64, offset: u64, bytes: &[u8], done: bool) -> Vec<u8> {
        let p = [&offset.to_be_bytes()[..], bytes].concat();
        let flags = if done { wire::REPLY_FLAG_DONE } else { 0 };
        chunk(flags, wire::REPLY_TYPE_OFFSET_DATA, handle, &p)
    }

    fn read_cmd(offset: u64, buf: &mut [u8]) -> Cmd {
        Cmd {
            typ: wire::CMD_READ,
            flags: 0,
            offset,
            len: buf.len() as u32,
            buf: IoBuf::from_slice(buf),
        }
    }

    /// Writes started together under a plug go out as one batch when it is dropped.
    /// Here the batch (200 x 16 KiB) is far more than the socket takes at once, so the
    /// doorbell's write stops part way and a task writes the rest: every request must
    /// still reach the server whole, once, in the order the requests were made.
    #[tokio::test]
    async fn a_plugged_batch_larger_than_the_socket_arrives_whole_and_in_order() {
        const N: usize = 200;
        const LEN: usize = 16 << 10;
        let (c, mut s) = conn(false);
        let mut data: Vec<Vec<u8>> = (0..N).map(|i| vec![i as u8; LEN]).collect();
        let mut reqs: Vec<_> = data
            .iter_mut()
            .enumerate()
            .map(|(i, d)| {
                let cmd = Cmd {
                    typ: wire::CMD_WRITE,
                    flags: 0,
                    offset: (i * LEN) as u64,
                    len: LEN as u32,
                    buf: IoBuf::from_slice(d),
                };
                Box::pin(c.request(cmd))
            })
            .collect();
        {
            let _plug = raidcore::plug::Plug::new();
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            for r in &mut reqs {
                assert!(r.as_mut().poll(&mut cx).is_pending());
            }
        }
        let server = async move {
            for i in 0..N {
                let mut b = [0u8; wire::REQUEST_LEN];
                s.read_exact(&mut b).await.unwrap();
                let r = Request::decode(&b).unwrap();
                assert_eq!(r.offset, (i * LEN) as u64, "request {i} in order");
                let mut p = vec![0u8; r.len as usize];
                s.read_exact(&mut p).await.unwrap();
                assert!(p.iter().all(|&x| x == i as u8), "payload of request {i}");
                let reply = SimpleReply {
                    error: 0,
                    handle: r.handle,
                };
                s.write_all(&reply.encode()).await.unwrap();
            }
            s
        };
        let both = async { tokio::join!(futures::future::join_all(reqs), server) };
        let (outs, _s) = tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .expect("every request answered");
        for o in outs {
            assert!(matches!(o, Outcome::Done(Ok(()))), "{o:?}");
        }
    }

    /// Read 8 bytes at 100 into the middle of a guarded buffer while `script` answers.
    async fn guarded_read<F, Fut>(structured: bool, script: F) -> (Outcome, Vec<u8>)
    where
        F: FnOnce(UnixStream, Request) -> Fut,
        Fut: Future<Output = UnixStream>,
    {
        let (c, mut s) = conn(structured);
        let mut buf = vec![0xaau8; 24];
        let server = async move {
            let r = request(&mut s).await;
            script(s, r).await
        };
        let (out, _s) = tokio::join!(c.request(read_cmd(100, &mut buf[8..16])), server);
        (out, buf)
    }

    fn guards_intact(buf: &[u8]) -> bool {
        buf[..8].iter().chain(&buf[16..]).all(|&b| b == 0xaa)
    }

    #[tokio::test]
    async fn structured_read_in_pieces_any_order_with_a_hole() {
        let (out, buf) = guarded_read(true, |mut s, r| async move {
            let mut reply = data(r.handle, 104, &[5, 6, 7, 8], false);
            reply.extend(chunk(
                0,
                wire::REPLY_TYPE_OFFSET_HOLE,
                r.handle,
                &[&100u64.to_be_bytes()[..], &2u32.to_be_bytes()[..]].concat(),
            ));
            reply.extend(data(r.handle, 102, &[3, 4], false));
            reply.extend(chunk(
                wire::REPLY_FLAG_DONE,
                wire::REPLY_TYPE_NONE,
                r.handle,
                &[],
            ));
            s.write_all(&reply).await.unwrap();
            s
        })
        .await;
        assert!(matches!(out, Outcome::Done(Ok(()))), "{out:?}");
        assert_eq!(&buf[8..16], &[0, 0, 3, 4, 5, 6, 7, 8]);
        assert!(guards_intact(&buf));
    }

    #[tokio::test]
    async fn lying_offsets_fail_the_request_and_never_write_outside() {
        let lies: [(u64, usize); 4] = [(96, 8), (104, 8), (108, 8), (u64::MAX - 2, 4)];
        for (offset, n) in lies {
            let (out, buf) = guarded_read(true, move |mut s, r| async move {
                s.write_all(&data(r.handle, offset, &vec![0x55; n], true))
                    .await
                    .unwrap();
                s
            })
            .await;
            match out {
                Outcome::Done(Err(IoError::Io(m))) => assert!(m.contains("protocol"), "{m}"),
                other => panic!("offset {offset}: {other:?}"),
            }
            assert!(guards_intact(&buf), "offset {offset}: {buf:?}");
        }
    }

    #[tokio::test]
    async fn overlapping_or_short_replies_are_errors() {
        let (out, _) = guarded_read(true, |mut s, r| async move {
            let mut reply = data(r.handle, 100, &[1; 6], false);
            reply.extend(data(r.handle, 104, &[2; 4], true));
            s.write_all(&reply).await.unwrap();
            s
        })
        .await;
        assert!(matches!(out, Outcome::Done(Err(_))), "overlap: {out:?}");
        let (out, _) = guarded_read(true, |mut s, r| async move {
            s.write_all(&data(r.handle, 100, &[1; 4], true))
                .await
                .unwrap();
            s
        })
        .await;
        match out {
            Outcome::Done(Err(e)) => assert!(e.to_string().contains("covered 4 of 8"), "{e}"),
            other => panic!("short: {other:?}"),
        }
    }

    #[tokio::test]
    async fn error_chunks_and_simple_errors_map_to_errno() {
        let (out, _) = guarded_read(true, |mut s, r| async move {
            let p = wire::encode_error_payload(wire::NBD_ENOSPC, "disk full");
            s.write_all(&chunk(
                wire::REPLY_FLAG_DONE,
                wire::REPLY_TYPE_ERROR,
                r.handle,
                &p,
            ))
            .await
            .unwrap();
            s
        })
        .await;
        match out {
            Outcome::Done(Err(e @ IoError::NoSpace(_))) => {
                assert!(e.to_string().contains("disk full"))
            }
            other => panic!("{other:?}"),
        }
        let (out, _) = guarded_read(false, |mut s, r| async move {
            let reply = SimpleReply {
                error: wire::NBD_EIO,
                handle: r.handle,
            };
            s.write_all(&reply.encode()).await.unwrap();
            s
        })
        .await;
        assert!(matches!(out, Outcome::Done(Err(IoError::Io(_)))), "{out:?}");
    }

    #[tokio::test]
    async fn simple_read_reply_takes_its_length_from_the_request() {
        let (out, buf) = guarded_read(false, |mut s, r| async move {
            let h = SimpleReply {
                error: 0,
                handle: r.handle,
            };
            s.write_all(&[&h.encode()[..], &[9u8; 8][..]].concat())
                .await
                .unwrap();
            s
        })
        .await;
        assert!(matches!(out, Outcome::Done(Ok(()))), "{out:?}");
        assert_eq!(&buf[8..16], &[9; 8]);
        assert!(guards_intact(&buf));
    }

    #[tokio::test]
    async fn replies_to_unknown_handles_or_huge_chunks_drop_the_connection() {
        let bad: [fn(u64) -> Vec<u8>; 3] = [
            |h| data(h + 7, 100, &[1; 8], true),
            |h| {
                let c = ChunkHeader {
                    flags: 0,
                    typ: wire::REPLY_TYPE_OFFSET_DATA,
                    handle: h,
                    len: u32::MAX,
                };
                c.encode().to_vec()
            },
            |_| b"garbage!garbage!garbage!".to_vec(),
        ];
        for make in bad {
            let (c, mut s) = conn(true);
            let mut buf = [0u8; 8];
            let server = async {
                let r = request(&mut s).await;
                s.write_all(&make(r.handle)).await.unwrap();
            };
            let (out, ()) = tokio::join!(c.request(read_cmd(100, &mut buf)), server);
            assert!(matches!(out, Outcome::Done(Err(IoError::Io(_)))), "{out:?}");
            assert!(c.is_dead());
            let mut again = [0u8; 8];
            let out = c.request(read_cmd(0, &mut again)).await;
            assert!(matches!(out, Outcome::Lost(_)), "{out:?}");
        }
    }

    #[tokio::test]
    async fn an_abandoned_read_is_never_written_and_the_connection_goes_on() {
        let (c, mut s) = conn(false);
        let mut buf = vec![0xaau8; 64 << 10];
        let first =
            tokio::time::timeout(Duration::from_millis(50), c.request(read_cmd(0, &mut buf))).await;
        assert!(first.is_err(), "nothing answered yet");
        let r = request(&mut s).await;
        // The late reply: a simple reply and 64 KiB of data nobody waits for.
        let h = SimpleReply {
            error: 0,
            handle: r.handle,
        };
        s.write_all(&[&h.encode()[..], &vec![1u8; 64 << 10][..]].concat())
            .await
            .unwrap();
        let mut small = [0u8; 4];
        let server = async {
            let r = request(&mut s).await;
            let h = SimpleReply {
                error: 0,
                handle: r.handle,
            };
            s.write_all(&[&h.encode()[..], &[7u8; 4][..]].concat())
                .await
                .unwrap();
        };
        let (out, ()) = tokio::join!(c.request(read_cmd(0, &mut small)), server);
        assert!(matches!(out, Outcome::Done(Ok(()))), "{out:?}");
        assert_eq!(small, [7; 4]);
        assert!(
            buf.iter().all(|&b| b == 0xaa),
            "the abandoned buffer was written"
        );
    }

    #[tokio::test]
    async fn a_closed_connection_loses_its_requests_for_a_retry() {
        let (c, mut s) = conn(true);
        let mut buf = [0u8; 8];
        let server = async {
            request(&mut s).await;
            drop(s);
        };
        let (out, ()) = tokio::join!(c.request(read_cmd(0, &mut buf)), server);
        match out {
            Outcome::Lost(why) => assert!(why.contains("closed"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A scripted handshake: the greeting, then each option in turn gets its replies from
    /// `script` (EXPORT_NAME gets the raw bytes of its one entry). Bounded in time.
    async fn fake_handshake(
        flags: u16,
        export: &str,
        script: Vec<Vec<(u32, Vec<u8>)>>,
    ) -> Result<ExportInfo, NbdError> {
        let (a, mut b) = UnixStream::pair().unwrap();
        let server = async move {
            b.write_all(&wire::Greeting { flags }.encode())
                .await
                .unwrap();
            let mut cflags = [0u8; 4];
            if b.read_exact(&mut cflags).await.is_err() {
                return;
            }
            for replies in script {
                let mut h = [0u8; wire::OPTION_HEADER_LEN];
                if b.read_exact(&mut h).await.is_err() {
                    return;
                }
                let h = OptionHeader::decode(&h).unwrap();
                let mut p = vec![0u8; h.len as usize];
                if b.read_exact(&mut p).await.is_err() {
                    return;
                }
                for (typ, payload) in replies {
                    if h.option == wire::OPT_EXPORT_NAME {
                        b.write_all(&payload).await.unwrap();
                        continue;
                    }
                    let r = OptionReply {
                        option: h.option,
                        typ,
                        len: payload.len() as u32,
                    };
                    b.write_all(&[&r.encode()[..], &payload[..]].concat())
                        .await
                        .unwrap();
                }
            }
        };
        // The client owns its end, so the peer sees EOF once the client gives up.
        let client = async move {
            let stream = Stream::Unix(a);
            let hs = Handshake {
                s: &stream,
                server: "unix:/fake",
            };
            hs.negotiate(export).await
        };
        let both = async { tokio::join!(client, server).0 };
        tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the handshake hung")
    }

    #[tokio::test]
    async fn servers_without_go_get_export_name() {
        let flags = wire::FLAG_FIXED_NEWSTYLE;
        let reply = wire::encode_export_name_reply(
            1 << 20,
            wire::FLAG_HAS_FLAGS | wire::FLAG_SEND_FLUSH,
            true,
        );
        let script = vec![
            vec![(wire::REP_ERR_UNSUP, vec![])],
            vec![(wire::REP_ERR_UNSUP, b"no GO here".to_vec())],
            vec![(0, reply)],
        ];
        let info = fake_handshake(flags, "x", script).await.unwrap();
        assert_eq!(info.size, 1 << 20);
        assert!(!info.structured && info.has(wire::FLAG_SEND_FLUSH));
        assert_eq!(info.max_block, MAX_REQUEST);
    }

    #[tokio::test]
    async fn handshake_refusals_are_named() {
        let flags = wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES;
        let tls = fake_handshake(flags, "x", vec![vec![(wire::REP_ERR_TLS_REQD, vec![])]]).await;
        assert!(matches!(tls, Err(NbdError::TlsRequired { .. })), "{tls:?}");
        let unknown = vec![
            vec![(wire::REP_ACK, vec![])],
            vec![(wire::REP_ERR_UNKNOWN, b"no such export".to_vec())],
            vec![
                (wire::REP_SERVER, wire::encode_rep_server("a", "")),
                (wire::REP_ACK, vec![]),
            ],
        ];
        let e = fake_handshake(flags, "x", unknown).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "server at unix:/fake has no export 'x' (its exports: a; it said: no such export)"
        );
        let bad_sizes = vec![
            vec![(wire::REP_ACK, vec![])],
            vec![(
                wire::REP_INFO,
                wire::encode_info_block_size(3, 4096, 1 << 20).to_vec(),
            )],
        ];
        let e = fake_handshake(flags, "x", bad_sizes).await.unwrap_err();
        assert!(e.to_string().contains("impossible block size"), "{e}");
        let e = fake_handshake(0, "x", vec![]).await.unwrap_err();
        assert!(e.to_string().contains("fixed newstyle"), "{e}");
    }

    #[test]
    fn uris_parse_like_libnbd() {
        let tcp = |h: &str, p| Transport::Tcp {
            host: h.into(),
            port: p,
        };
        for (text, transport, export) in [
            ("nbd://h/disk", tcp("h", 10809), "disk"),
            ("nbd://h:1234/", tcp("h", 1234), ""),
            ("nbd://h", tcp("h", 10809), ""),
            ("NBD://[::1]:99/a%20b", tcp("::1", 99), "a b"),
            ("nbd://u@h/x/y", tcp("h", 10809), "x/y"),
        ] {
            let u = NbdUri::parse(text).unwrap();
            assert_eq!(
                (u.transport, u.export.as_str()),
                (transport, export),
                "{text}"
            );
        }
        let u = NbdUri::parse("nbd+unix:///e?socket=/run/a%2cb.sock").unwrap();
        assert_eq!(
            u.transport,
            Transport::Unix {
                path: "/run/a,b.sock".into()
            }
        );
        assert_eq!(u.server(), "unix:/run/a,b.sock");
        assert_eq!(
            NbdUri::parse("nbd://[::1]/x").unwrap().server(),
            "nbd://[::1]:10809"
        );
        for bad in [
            "nbd:/h",
            "http://h/x",
            "nbd://:1/x",
            "nbd://h:99999/x",
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "nbd://h/%4",
        ] {
            assert!(
                matches!(NbdUri::parse(bad), Err(NbdError::BadUri { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            NbdUri::parse("nbds://h/x"),
            Err(NbdError::TlsUri { .. })
        ));
    }
}
