//! Member addresses: parse the text people write in layouts and on command lines, and
//! open the member it names.
//!
//! | form | member |
//! |---|---|
//! | `file:/path/img` | a regular file, O_DIRECT ([`crate::local`]) |
//! | `dev:/dev/nvme0n1` | a block device, O_DIRECT ([`crate::local`]) |
//! | `mem:SIZE`, `null:SIZE` | test/benchmark members ([`crate::mem`], [`crate::null`]) |
//! | `nbd://host[:port]/export`, `nbd+unix:///export?socket=/path` | NBD (libnbd URI form) |
//! | `iscsi://[user[%password]@]host[:port]/target-iqn/lun` | iSCSI (qemu/libiscsi form) |
//! | `aoe:IFACE/SHELF.SLOT` | ATA over Ethernet, e.g. `aoe:eth0/7.3` |
//!
//! NBD addresses open an [`crate::nbd::NbdMember`], iSCSI addresses an
//! [`crate::iscsi::IscsiMember`], AoE addresses an [`crate::aoe::AoeMember`] (on the
//! interface of the daemon's network namespace). An iSCSI member's address is shown
//! with its password replaced by `***`.
//! Local paths must be absolute: the daemon's working directory is nobody's business.
//! `file:` and `dev:` are hints: the type found on disk decides (see [`crate::local`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use raidcore::{Member, Proto};
use thiserror::Error;

use crate::local::{Engine, LocalMember};

const SCHEMES: &str = "file:, dev:, mem:, null:, nbd://, nbd+unix://, iscsi://, aoe:";

/// A parsed member address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberAddr {
    File(PathBuf),
    Dev(PathBuf),
    Mem(u64),
    Null(u64),
    /// `nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`: the URI as written.
    Nbd {
        uri: String,
    },
    /// `iscsi://`: the URL as written.
    Iscsi {
        url: String,
    },
    /// `aoe:IFACE/SHELF.SLOT`.
    Aoe {
        iface: String,
        shelf: u16,
        slot: u8,
    },
}

impl MemberAddr {
    /// The protocol this address speaks. `File` and `Dev` say what was written; the
    /// opened member's `info().proto` says what was found.
    pub fn proto(&self) -> Proto {
        match self {
            MemberAddr::File(_) => Proto::File,
            MemberAddr::Dev(_) => Proto::Blockdev,
            MemberAddr::Mem(_) => Proto::Mem,
            MemberAddr::Null(_) => Proto::Null,
            MemberAddr::Nbd { .. } => Proto::Nbd,
            MemberAddr::Iscsi { .. } => Proto::Iscsi,
            MemberAddr::Aoe { .. } => Proto::Aoe,
        }
    }
}

/// Why an address or a size does not parse. Every message names the text and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddrError {
    #[error("member address is empty; write one of {SCHEMES} (e.g. file:/var/lib/uniblk/a.img)")]
    Empty,
    #[error(
        "member '{addr}': no address scheme (use {SCHEMES}; for an image file write file:{addr})"
    )]
    NoScheme { addr: String },
    #[error("member '{addr}': unknown address scheme '{scheme}' (use {SCHEMES})")]
    UnknownScheme { addr: String, scheme: String },
    #[error("member '{addr}': the path must be absolute (e.g. {scheme}:/var/lib/uniblk/a.img)")]
    RelativePath { addr: String, scheme: &'static str },
    #[error("member '{addr}': {why}")]
    BadSize { addr: String, why: String },
    #[error("member '{addr}': malformed {proto} address; expected {form}")]
    Malformed {
        addr: String,
        proto: &'static str,
        form: &'static str,
    },
    #[error("'{text}' is not a size: {why} (write e.g. 64KiB, 512M, 1GiB or a byte count)")]
    Size { text: String, why: String },
}

impl AddrError {
    /// Every parse failure is an invalid argument.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// Why a member could not be opened. Every message names the member and the fix.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("member {addr}: cannot open: {error}; {hint}")]
    Open {
        addr: String,
        error: std::io::Error,
        hint: String,
    },
    #[error("member {addr} is {what}, not a regular file or block device; give an image file (file:/path) or a disk (dev:/dev/name)")]
    NotStorage { addr: String, what: &'static str },
    #[error("member {addr}: cannot read its {what}: {error}; check the device (dmesg) or fix the layout")]
    Query {
        addr: String,
        what: &'static str,
        error: std::io::Error,
    },
    #[error("member {addr} holds no complete {block_size}-byte block; grow it (e.g. truncate -s 1G {path}) or fix the layout")]
    Empty {
        addr: String,
        path: String,
        block_size: u32,
    },
    #[error("member {addr}: cannot start the io_uring engine: {error}; set UNIBLK_NO_IO_URING=1 to use the pread engine")]
    Engine { addr: String, error: std::io::Error },
    #[error("member {addr}: cannot allocate {size} bytes of memory: {error}; use a smaller size")]
    Memory {
        addr: String,
        size: u64,
        error: std::io::Error,
    },
    #[error("member {addr}: the open was abandoned ({reason}); retry")]
    Abandoned { addr: String, reason: String },
    /// A remote member's connection or handshake failed (the error names the server).
    #[error("member {addr}: {error}")]
    Remote {
        addr: String,
        error: crate::nbd::NbdError,
    },
    /// An iSCSI login or LUN check failed (the error names the target and the fix;
    /// `addr` has its password redacted).
    #[error("member {addr}: {error}")]
    Iscsi {
        addr: String,
        /// Boxed: iSCSI errors carry several names and would bloat every OpenError.
        error: Box<crate::iscsi::IscsiError>,
    },
    /// An AoE target could not be found or used, or the raw socket was refused (the
    /// error names the interface, the target and the fix).
    #[error("member {addr}: {error}")]
    Aoe {
        addr: String,
        error: crate::aoe::AoeError,
    },
}

impl OpenError {
    /// A failed open(2) or stat(2), with a hint chosen by errno.
    pub(crate) fn open(addr: &str, path: &Path, error: std::io::Error) -> Self {
        let path = path.display();
        let hint = match error.raw_os_error() {
            Some(libc::ENOENT) if addr.starts_with("dev:") => {
                "check the device name (lsblk) or fix the layout".to_string()
            }
            Some(libc::ENOENT) => {
                format!("create it (e.g. truncate -s 1G {path}) or fix the layout")
            }
            Some(libc::EACCES | libc::EPERM) => {
                format!("give ublkd read-write access to {path} (run it as root or fix the permissions)")
            }
            Some(libc::EINVAL) => format!(
                "the filesystem holding {path} does not support O_DIRECT; put it on ext4, xfs or btrfs"
            ),
            Some(libc::EBUSY) => {
                "it is in use (mounted or held exclusively by another program); release it first"
                    .to_string()
            }
            Some(libc::EROFS) => "it is read-only; members must be writable".to_string(),
            _ => "check the path or fix the layout".to_string(),
        };
        OpenError::Open {
            addr: addr.to_string(),
            error,
            hint,
        }
    }

    /// The errno a frontend or the management API reports for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::Open { error, .. }
            | OpenError::Query { error, .. }
            | OpenError::Engine { error, .. }
            | OpenError::Memory { error, .. } => error.raw_os_error().unwrap_or(libc::EIO),
            OpenError::NotStorage { .. } | OpenError::Empty { .. } => libc::EINVAL,
            OpenError::Abandoned { .. } => libc::EIO,
            OpenError::Remote { error, .. } => error.errno(),
            OpenError::Iscsi { error, .. } => error.errno(),
            OpenError::Aoe { error, .. } => error.errno(),
        }
    }
}

/// Parse a member address (surrounding whitespace ignored, scheme case-insensitive).
pub fn parse(s: &str) -> Result<MemberAddr, AddrError> {
    let addr = s.trim();
    if addr.is_empty() {
        return Err(AddrError::Empty);
    }
    let no_scheme = || AddrError::NoScheme {
        addr: addr.to_string(),
    };
    let (scheme, rest) = addr.split_once(':').ok_or_else(no_scheme)?;
    // "/x/a:b.img" has a colon but no scheme.
    if scheme.is_empty() || scheme.contains('/') {
        return Err(no_scheme());
    }
    match scheme.to_ascii_lowercase().as_str() {
        "file" => local_path(addr, rest, "file").map(MemberAddr::File),
        "dev" => local_path(addr, rest, "dev").map(MemberAddr::Dev),
        "mem" => member_size(addr, rest).map(MemberAddr::Mem),
        "null" => member_size(addr, rest).map(MemberAddr::Null),
        "nbd" | "nbds" => remote(addr, rest, "nbd", NBD_FORM)
            .and_then(|uri| check_nbd(uri, NBD_FORM))
            .map(|uri| MemberAddr::Nbd { uri }),
        "nbd+unix" | "nbds+unix" => parse_nbd_unix(addr, rest),
        "iscsi" => parse_iscsi(addr, rest),
        "aoe" => parse_aoe(addr, rest),
        _ => Err(AddrError::UnknownScheme {
            addr: addr.to_string(),
            scheme: scheme.to_string(),
        }),
    }
}

const NBD_FORM: &str = "nbd://host[:port]/export";
const NBD_UNIX_FORM: &str = "nbd+unix:///export?socket=/path/to.sock";
const ISCSI_FORM: &str = "iscsi://[user[%password]@]host[:port]/target-iqn/lun";
const AOE_FORM: &str = "aoe:IFACE/SHELF.SLOT, e.g. aoe:eth0/7.3";

/// `file:/p`, `dev:/p`, and the URL spelling `file:///p`.
fn local_path(addr: &str, rest: &str, scheme: &'static str) -> Result<PathBuf, AddrError> {
    let path = match rest.strip_prefix("//") {
        Some(p) if p.starts_with('/') => p,
        // file://host/p names a host; a local member has none.
        Some(_) => return Err(relative(addr, scheme)),
        None => rest,
    };
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(relative(addr, scheme))
    }
}

fn relative(addr: &str, scheme: &'static str) -> AddrError {
    AddrError::RelativePath {
        addr: addr.to_string(),
        scheme,
    }
}

/// mem:/null: sizes: whole 512-byte blocks (the block size those members use).
fn member_size(addr: &str, rest: &str) -> Result<u64, AddrError> {
    let bad = |why: String| AddrError::BadSize {
        addr: addr.to_string(),
        why,
    };
    let size = parse_size(rest).map_err(|e| bad(e.to_string()))?;
    if size == 0 || !size.is_multiple_of(512) {
        return Err(bad(format!(
            "size {size} must be a non-zero multiple of 512 bytes (e.g. mem:1GiB)"
        )));
    }
    Ok(size)
}

/// The common shape of URL-style remote addresses: `scheme://...` with something after.
fn remote(
    addr: &str,
    rest: &str,
    proto: &'static str,
    form: &'static str,
) -> Result<String, AddrError> {
    match rest.strip_prefix("//") {
        Some(after) if !after.is_empty() => Ok(addr.to_string()),
        _ => Err(AddrError::Malformed {
            addr: addr.to_string(),
            proto,
            form,
        }),
    }
}

fn parse_nbd_unix(addr: &str, rest: &str) -> Result<MemberAddr, AddrError> {
    let uri = remote(addr, rest, "nbd", NBD_UNIX_FORM)?;
    let query = rest.split_once('?').map_or("", |(_, q)| q);
    if !query
        .split('&')
        .any(|kv| kv.len() > "socket=".len() && kv.starts_with("socket="))
    {
        return Err(AddrError::Malformed {
            addr: addr.to_string(),
            proto: "nbd",
            form: NBD_UNIX_FORM,
        });
    }
    check_nbd(uri, NBD_UNIX_FORM).map(|uri| MemberAddr::Nbd { uri })
}

/// The NBD client's own URI parser has the last word (ports, IPv6 brackets, %-escapes);
/// TLS URIs parse here and are refused at open, with their own message.
fn check_nbd(uri: String, form: &'static str) -> Result<String, AddrError> {
    match crate::nbd::NbdUri::parse(&uri) {
        Err(crate::nbd::NbdError::BadUri { .. }) => Err(AddrError::Malformed {
            addr: uri,
            proto: "nbd",
            form,
        }),
        _ => Ok(uri),
    }
}

/// iscsi://[auth@]host[:port]/target/lun: a host, a target and a numeric LUN.
fn parse_iscsi(addr: &str, rest: &str) -> Result<MemberAddr, AddrError> {
    let url = remote(addr, rest, "iscsi", ISCSI_FORM)?;
    let malformed = || AddrError::Malformed {
        addr: addr.to_string(),
        proto: "iscsi",
        form: ISCSI_FORM,
    };
    let after = rest.trim_start_matches('/');
    let (authority, path) = after.split_once('/').ok_or_else(malformed)?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (target, lun) = path.rsplit_once('/').ok_or_else(malformed)?;
    if host.is_empty() || target.is_empty() || lun.parse::<u16>().is_err() {
        return Err(malformed());
    }
    Ok(MemberAddr::Iscsi { url })
}

/// aoe:IFACE/SHELF.SLOT; shelf 0xffff and slot 0xff are AoE broadcast values, not targets.
fn parse_aoe(addr: &str, rest: &str) -> Result<MemberAddr, AddrError> {
    let malformed = || AddrError::Malformed {
        addr: addr.to_string(),
        proto: "aoe",
        form: AOE_FORM,
    };
    let (iface, target) = rest.split_once('/').ok_or_else(malformed)?;
    let (shelf, slot) = target.split_once('.').ok_or_else(malformed)?;
    let shelf: u16 = shelf.parse().map_err(|_| malformed())?;
    let slot: u8 = slot.parse().map_err(|_| malformed())?;
    let iface_ok = !iface.is_empty() && iface.len() < 16 && !iface.contains(char::is_whitespace);
    if !iface_ok || shelf == u16::MAX || slot == u8::MAX {
        return Err(malformed());
    }
    Ok(MemberAddr::Aoe {
        iface: iface.to_string(),
        shelf,
        slot,
    })
}

/// `host[:port]` or `[v6]:port` of a URL-style address; `default_port` when none is
/// given. The error says what is wrong, for the caller to wrap with the address.
pub(crate) fn host_port(hp: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = hp.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
        (h, after.strip_prefix(':'))
    } else {
        match hp.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hp, None),
        }
    };
    if host.is_empty() {
        return Err("it names no host".into());
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{p}' is not a port number"))?,
    };
    Ok((host.to_string(), port))
}

/// Parse a size: a byte count with an optional unit K/KiB, M/MiB, G/GiB, T/TiB (or B),
/// case-insensitive, powers of 1024, optionally separated by spaces: `64KiB`, `512M`,
/// `1 GiB`, `1073741824`. Decimal units (KB, GB) are refused rather than guessed.
pub fn parse_size(s: &str) -> Result<u64, AddrError> {
    let text = s.trim();
    let err = |why: String| AddrError::Size {
        text: s.to_string(),
        why,
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(err("it does not start with a number".into()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| err("the number is too large".into()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        u @ ("kb" | "mb" | "gb" | "tb") => {
            return Err(err(format!(
                "'{u}' is ambiguous; sizes are powers of 1024, write {}iB",
                u[..1].to_ascii_uppercase()
            )))
        }
        u => {
            return Err(err(format!(
                "unknown unit '{u}' (use K, KiB, M, MiB, G, GiB, T or TiB)"
            )))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("it does not fit in 64 bits".into()))
}

/// Settings for remote members of any protocol (the layout's `remote` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// How long one request may take, retries after reconnects included.
    pub timeout: std::time::Duration,
    /// Connections per member where the server allows several.
    pub connections: usize,
    /// CHAP for iSCSI members (the layout's `remote.iscsi` table).
    pub iscsi: crate::iscsi::IscsiAuth,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        let nbd = crate::nbd::NbdOptions::default();
        RemoteOptions {
            timeout: nbd.timeout,
            connections: nbd.connections,
            iscsi: crate::iscsi::IscsiAuth::default(),
        }
    }
}

/// Open the member `addr` names. `text` is the address as the user wrote it; it becomes
/// the member's `info().address` and appears in every error.
pub async fn open(addr: &MemberAddr, text: &str) -> Result<Arc<dyn Member>, OpenError> {
    open_with(addr, text, &RemoteOptions::default()).await
}

/// `open`, with settings for remote members.
pub async fn open_with(
    addr: &MemberAddr,
    text: &str,
    remote: &RemoteOptions,
) -> Result<Arc<dyn Member>, OpenError> {
    let text = text.trim();
    match addr {
        MemberAddr::File(path) | MemberAddr::Dev(path) => open_local(text, path).await,
        MemberAddr::Mem(size) => match crate::mem::MemMember::try_new(text, *size) {
            Ok(m) => Ok(Arc::new(m)),
            Err(error) => Err(OpenError::Memory {
                addr: text.to_string(),
                size: *size,
                error,
            }),
        },
        MemberAddr::Null(size) => Ok(Arc::new(crate::null::NullMember::new(text, *size))),
        MemberAddr::Nbd { .. } => {
            let opts = crate::nbd::NbdOptions {
                timeout: remote.timeout,
                connections: remote.connections.max(1),
                ..crate::nbd::NbdOptions::default()
            };
            match crate::nbd::NbdMember::open(text, opts).await {
                Ok(m) => Ok(Arc::new(m)),
                Err(error) => Err(OpenError::Remote {
                    addr: text.to_string(),
                    error,
                }),
            }
        }
        MemberAddr::Iscsi { .. } => open_iscsi(text, remote).await,
        MemberAddr::Aoe { iface, shelf, slot } => {
            let opts = crate::aoe::AoeOptions {
                timeout: remote.timeout,
                ..crate::aoe::AoeOptions::default()
            };
            match crate::aoe::AoeMember::open(text, iface, *shelf, *slot, opts).await {
                Ok(m) => Ok(Arc::new(m)),
                Err(error) => Err(OpenError::Aoe {
                    addr: text.to_string(),
                    error,
                }),
            }
        }
    }
}

async fn open_iscsi(text: &str, remote: &RemoteOptions) -> Result<Arc<dyn Member>, OpenError> {
    let fail = |error| OpenError::Iscsi {
        addr: crate::iscsi::redact_text(text),
        error: Box::new(error),
    };
    let mut opts = crate::iscsi::IscsiOptions {
        timeout: remote.timeout,
        ..crate::iscsi::IscsiOptions::default()
    };
    let auth = &remote.iscsi;
    opts.login.chap = auth
        .chap
        .as_ref()
        .map(|c| c.resolve())
        .transpose()
        .map_err(fail)?;
    opts.login.mutual = auth
        .mutual
        .as_ref()
        .map(|c| c.resolve())
        .transpose()
        .map_err(fail)?;
    match crate::iscsi::IscsiMember::open(text, opts).await {
        Ok(m) => Ok(Arc::new(m)),
        Err(error) => Err(fail(error)),
    }
}

/// Opening blocks (open, stat, a probe read, thread start): keep it off the runtime
/// threads when there is a runtime.
async fn open_local(text: &str, path: &Path) -> Result<Arc<dyn Member>, OpenError> {
    let (addr, path) = (text.to_string(), path.to_path_buf());
    let work = move || LocalMember::open_as(&addr, &path, Engine::Auto);
    let member = match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt
            .spawn_blocking(work)
            .await
            .map_err(|e| OpenError::Abandoned {
                addr: text.to_string(),
                reason: e.to_string(),
            })??,
        Err(_) => work()?,
    };
    Ok(Arc::new(member))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let good = [
            ("512", 512),
            ("0", 0),
            ("4096B", 4096),
            ("64KiB", 64 << 10),
            ("64k", 64 << 10),
            ("512M", 512 << 20),
            ("512mib", 512 << 20),
            ("1GiB", 1 << 30),
            ("1g", 1 << 30),
            (" 4 MiB ", 4 << 20),
            ("2T", 2 << 40),
            ("2TiB", 2 << 40),
            ("1073741824", 1 << 30),
        ];
        for (text, want) in good {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        let bad = [
            "",
            "KiB",
            "1.5G",
            "-1",
            "12XB",
            "1GB",
            "1 kb",
            "99999999999999T",
            "184467440737095516160",
            "1 G i B",
            "0x10",
        ];
        for text in bad {
            let e = parse_size(text).expect_err(text);
            assert!(e.to_string().contains("is not a size"), "{text}: {e}");
        }
        assert!(parse_size("1GB")
            .unwrap_err()
            .to_string()
            .contains("write GiB"));
    }

    #[test]
    fn addresses() {
        let p = |s: &str| PathBuf::from(s);
        let good = [
            ("file:/x/a.img", MemberAddr::File(p("/x/a.img"))),
            ("  FILE:/x/a.img\n", MemberAddr::File(p("/x/a.img"))),
            ("file:///x/a.img", MemberAddr::File(p("/x/a.img"))),
            ("file:/x/a:b.img", MemberAddr::File(p("/x/a:b.img"))),
            ("dev:/dev/nvme0n1", MemberAddr::Dev(p("/dev/nvme0n1"))),
            ("mem:1GiB", MemberAddr::Mem(1 << 30)),
            ("mem:512M", MemberAddr::Mem(512 << 20)),
            ("mem:1073741824", MemberAddr::Mem(1 << 30)),
            ("null:64MiB", MemberAddr::Null(64 << 20)),
            (
                "nbd://10.0.0.2/disk",
                MemberAddr::Nbd {
                    uri: "nbd://10.0.0.2/disk".into(),
                },
            ),
            (
                "nbd://h:10809/e",
                MemberAddr::Nbd {
                    uri: "nbd://h:10809/e".into(),
                },
            ),
            (
                "nbds://h/e",
                MemberAddr::Nbd {
                    uri: "nbds://h/e".into(),
                },
            ),
            (
                "nbd+unix:///e?socket=/run/s.sock",
                MemberAddr::Nbd {
                    uri: "nbd+unix:///e?socket=/run/s.sock".into(),
                },
            ),
            (
                "iscsi://u%p@h:3260/iqn.2003-01.org.x:t/0",
                MemberAddr::Iscsi {
                    url: "iscsi://u%p@h:3260/iqn.2003-01.org.x:t/0".into(),
                },
            ),
            (
                "aoe:eth0/7.3",
                MemberAddr::Aoe {
                    iface: "eth0".into(),
                    shelf: 7,
                    slot: 3,
                },
            ),
        ];
        for (text, want) in good {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_addresses_name_the_text_and_the_fix() {
        let bad = [
            ("", "is empty"),
            ("   ", "is empty"),
            ("/x/a.img", "no address scheme"),
            ("/x/a:b.img", "no address scheme"),
            ("a.img", "no address scheme"),
            ("foo:bar", "member 'foo:bar': unknown address scheme 'foo' (use file:, dev:, mem:, null:, nbd://, nbd+unix://, iscsi://, aoe:)"),
            (":x", "no address scheme"),
            ("file:", "must be absolute"),
            ("file:a.img", "must be absolute"),
            ("file://host/a.img", "must be absolute"),
            ("dev:sda", "must be absolute"),
            ("mem:", "is not a size"),
            ("mem:0", "non-zero multiple of 512"),
            ("mem:1000", "non-zero multiple of 512"),
            ("mem:1GB", "write GiB"),
            ("null:lots", "is not a size"),
            ("nbd:host", "expected nbd://host[:port]/export"),
            ("nbd://", "expected nbd://"),
            ("nbd://h:port/e", "expected nbd://"),
            ("nbd://h:0/e", "expected nbd://"),
            ("nbd://[::1/e", "expected nbd://"),
            ("nbd://h/%zz", "expected nbd://"),
            ("nbd+unix:///e", "socket="),
            ("nbd+unix:///e?socket=", "socket="),
            ("iscsi://h/iqn.x", "expected iscsi://"),
            ("iscsi:///iqn.x/0", "expected iscsi://"),
            ("iscsi://h/iqn.x/lun", "expected iscsi://"),
            ("aoe:eth0", "expected aoe:IFACE"),
            ("aoe:eth0/7", "expected aoe:IFACE"),
            ("aoe:/7.3", "expected aoe:IFACE"),
            ("aoe:eth0/65535.1", "expected aoe:IFACE"),
            ("aoe:eth0/1.255", "expected aoe:IFACE"),
            ("aoe:eth0/1.x", "expected aoe:IFACE"),
        ];
        for (text, want) in bad {
            let e = parse(text).expect_err(text);
            let msg = e.to_string();
            assert!(msg.contains(want), "{text:?}: {msg}");
            assert_eq!(e.errno(), libc::EINVAL);
            if !text.trim().is_empty() {
                assert!(
                    msg.contains(text.trim()),
                    "{text:?}: message must name it: {msg}"
                );
            }
        }
    }

    /// Without root: the raw socket is refused and the message says CAP_NET_RAW. As
    /// root: there is no such interface. Either way the member is named.
    #[tokio::test]
    async fn aoe_member_on_a_missing_interface_says_so() {
        let text = "aoe:nosuchif0/1.2";
        let e = open(&parse(text).unwrap(), text).await.err().unwrap();
        let msg = e.to_string();
        assert!(msg.starts_with("member aoe:nosuchif0/1.2: AoE"), "{msg}");
        assert!(
            msg.contains("no network interface 'nosuchif0'") || msg.contains("CAP_NET_RAW"),
            "{msg}"
        );
        assert!(matches!(e.errno(), libc::ENODEV | libc::EPERM), "{msg}");
    }

    #[tokio::test]
    async fn nbd_member_with_no_server_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let text = format!("nbd://127.0.0.1:{port}/x");
        let e = open(&parse(&text).unwrap(), &text).await.err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("member {text}: cannot connect: Connection refused; is the server running?")
        );
        assert_eq!(e.errno(), libc::ECONNREFUSED);
        let text = "nbd+unix:///x?socket=/nonexistent-uniblk/s.sock";
        let e = open(&parse(text).unwrap(), text).await.err().unwrap();
        assert!(
            e.to_string()
                .contains("nothing listens at /nonexistent-uniblk/s.sock"),
            "{e}"
        );
        let text = "nbds://127.0.0.1/x";
        let e = open(&parse(text).unwrap(), text).await.err().unwrap();
        assert!(e.to_string().contains("TLS"), "{e}");
    }

    #[tokio::test]
    async fn iscsi_member_with_no_target_says_so_without_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let text = format!("iscsi://u%hunter2secret@127.0.0.1:{port}/iqn.2026-11.x:t/1");
        let e = open(&parse(&text).unwrap(), &text).await.err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("member iscsi://u%***@127.0.0.1:{port}/iqn.2026-11.x:t/1: cannot connect to iSCSI portal 127.0.0.1:{port}: Connection refused; is the iSCSI target (tgtd) running?")
        );
        assert_eq!(e.errno(), libc::ECONNREFUSED);
    }

    #[tokio::test]
    async fn missing_file_says_how_to_create_it() {
        let text = "file:/nonexistent-uniblk/a.img";
        let e = open(&parse(text).unwrap(), text).await.err().unwrap();
        assert_eq!(
            e.to_string(),
            "member file:/nonexistent-uniblk/a.img: cannot open: No such file or directory (os error 2); \
             create it (e.g. truncate -s 1G /nonexistent-uniblk/a.img) or fix the layout"
        );
        assert_eq!(e.errno(), libc::ENOENT);
        let text = "dev:/dev/nonexistent-uniblk";
        let e = open(&parse(text).unwrap(), text).await.err().unwrap();
        assert!(e.to_string().contains("lsblk"), "{e}");
    }

    #[tokio::test]
    async fn directories_and_char_devices_are_refused() {
        for (text, what) in [
            ("file:/tmp", "is a directory"),
            ("dev:/dev/null", "is a character device"),
        ] {
            let e = open(&parse(text).unwrap(), text).await.err().expect(text);
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[tokio::test]
    async fn mem_and_null_open_with_their_size() {
        for text in ["mem:1MiB", "null:64MiB"] {
            let m = open(&parse(text).unwrap(), text).await.unwrap();
            assert_eq!(m.info().address, text);
            assert_eq!(
                m.info().size,
                parse_size(&text[text.find(':').unwrap() + 1..]).unwrap()
            );
        }
    }
}
