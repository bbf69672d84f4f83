//! Finding targets before any I/O: Query Config broadcasts (one target, or every target
//! on the interface for `uniblk scan`) and ATA IDENTIFY DEVICE for the size.
//!
//! These exchanges run on the socket directly, before the engine owns it; each sends,
//! re-sends on a short interval, and gives up at a deadline.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::error::AoeError;
use super::frame::{self, AtaArgs, Config, Header, Identity, Mac, Reply};
use super::socket::AoeSocket;

/// How often an unanswered discovery frame is sent again.
const RESEND: Duration = Duration::from_millis(200);
/// Control frames (discovery, identify) carry the high tag bit; data frames never do.
pub const CONTROL_TAG: u32 = 0x8000_0000;

static NEXT_CONTROL: AtomicU32 = AtomicU32::new(1);

/// A fresh control tag.
pub fn control_tag() -> u32 {
    CONTROL_TAG | (NEXT_CONTROL.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff)
}

/// A target that answered a Query Config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub mac: Mac,
    pub shelf: u16,
    pub slot: u8,
    pub config: Config,
}

/// Encode a Query Config to `shelf.slot` (or the wildcards) at the broadcast address.
pub fn config_query(src: Mac, shelf: u16, slot: u8, tag: u32) -> [u8; frame::CONFIG_LEN] {
    let mut f = [0u8; frame::CONFIG_LEN];
    frame::put_header(
        &mut f,
        &Header {
            dst: frame::BROADCAST,
            src,
            shelf,
            slot,
            command: frame::CMD_CONFIG,
            tag,
        },
    );
    frame::put_config_query(&mut f);
    f
}

/// A config reply to `tag`, decoded; None for any other frame.
pub fn config_reply(buf: &[u8], tag: u32) -> Option<Found> {
    let r = frame::parse_reply(buf).ok()?;
    if r.tag != tag || r.command != frame::CMD_CONFIG || r.error.is_some() {
        return None;
    }
    let config = frame::parse_config(buf).ok()?;
    Some(Found {
        mac: r.src,
        shelf: r.shelf,
        slot: r.slot,
        config,
    })
}

/// Every target that answers a wildcard Query Config within `wait`, one entry per
/// shelf.slot and MAC, sorted.
pub async fn scan(sock: &AoeSocket, wait: Duration) -> Result<Vec<Found>, AoeError> {
    let tag = control_tag();
    let query = config_query(sock.mac, frame::ANY_SHELF, frame::ANY_SLOT, tag);
    let mut found: Vec<Found> = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    let mut next_send = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            send(sock, &query)?;
            next_send = Instant::now() + RESEND;
        }
        let until = next_send.min(deadline);
        while let Some(n) = recv_until(sock, &mut buf, until).await? {
            if let Some(f) = config_reply(&buf[..n], tag) {
                if !found
                    .iter()
                    .any(|x| x.mac == f.mac && (x.shelf, x.slot) == (f.shelf, f.slot))
                {
                    found.push(f);
                }
            }
        }
    }
    found.sort_by_key(|f| (f.shelf, f.slot, f.mac.0));
    Ok(found)
}

/// The target `shelf.slot`, asked for by broadcast until it answers or `wait` passes.
pub async fn find(
    sock: &AoeSocket,
    shelf: u16,
    slot: u8,
    wait: Duration,
) -> Result<Found, AoeError> {
    let tag = control_tag();
    let query = config_query(sock.mac, shelf, slot, tag);
    let reply = exchange(sock, &query, wait, |buf| {
        config_reply(buf, tag).filter(|f| (f.shelf, f.slot) == (shelf, slot))
    })
    .await?;
    reply.ok_or_else(|| AoeError::NotFound {
        iface: sock.iface.clone(),
        shelf,
        slot,
        waited: wait,
    })
}

/// A control-path ATA command frame for `target`, with a fresh tag.
fn ata_frame(sock: &AoeSocket, target: &Found, args: AtaArgs) -> (u32, [u8; frame::ATA_LEN]) {
    let tag = control_tag();
    let mut f = [0u8; frame::ATA_LEN];
    frame::put_header(
        &mut f,
        &Header {
            dst: target.mac,
            src: sock.mac,
            shelf: target.shelf,
            slot: target.slot,
            command: frame::CMD_ATA,
            tag,
        },
    );
    args.put(&mut f);
    (tag, f)
}

/// ATA IDENTIFY DEVICE: the target's size and whether it speaks LBA48.
pub async fn identify(
    sock: &AoeSocket,
    target: &Found,
    wait: Duration,
) -> Result<Identity, AoeError> {
    let (tag, f) = ata_frame(sock, target, AtaArgs::identify());
    let fail = |why: String| AoeError::Target {
        iface: sock.iface.clone(),
        shelf: target.shelf,
        slot: target.slot,
        why,
    };
    let answer = exchange(sock, &f, wait, |buf| {
        let r: Reply = frame::parse_reply(buf).ok()?;
        if r.tag != tag || r.src != target.mac {
            return None;
        }
        Some(identify_reply(&r, buf))
    })
    .await?;
    match answer {
        None => Err(fail(format!(
            "no answer to ATA IDENTIFY DEVICE within {wait:?}"
        ))),
        Some(Err(why)) => Err(fail(why)),
        Some(Ok(id)) => Ok(id),
    }
}

fn identify_reply(r: &Reply, buf: &[u8]) -> Result<Identity, String> {
    if let Some(code) = r.error {
        return Err(format!(
            "IDENTIFY DEVICE refused: AoE error {code} ({})",
            frame::error_text(code)
        ));
    }
    let ata = frame::parse_ata(buf).map_err(|e| format!("IDENTIFY reply: {e}"))?;
    if ata.failed() {
        return Err(format!(
            "IDENTIFY DEVICE failed: ATA status {:#04x} error {:#04x}",
            ata.status, ata.error
        ));
    }
    let block = frame::ata_data(buf, frame::SECTOR).map_err(|e| format!("IDENTIFY reply: {e}"))?;
    frame::parse_identify(block).map_err(|e| format!("IDENTIFY data: {e}"))
}

/// Send `request` every [`RESEND`] until `accept` takes a received frame or `wait`
/// passes (Ok(None)).
async fn exchange<T>(
    sock: &AoeSocket,
    request: &[u8],
    wait: Duration,
    mut accept: impl FnMut(&[u8]) -> Option<T>,
) -> Result<Option<T>, AoeError> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        send(sock, request)?;
        let until = (Instant::now() + RESEND).min(deadline);
        while let Some(n) = recv_until(sock, &mut buf, until).await? {
            if let Some(t) = accept(&buf[..n]) {
                return Ok(Some(t));
            }
        }
    }
    Ok(None)
}

/// A send failure that is the link's state (down, no carrier) is retried by the caller's
/// loop; anything else is an error.
fn send(sock: &AoeSocket, frame: &[u8]) -> Result<(), AoeError> {
    match sock.send(frame, &[]) {
        Ok(()) => Ok(()),
        Err(e) if link_down(&e) || e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(error) => Err(AoeError::Socket {
            iface: sock.iface.clone(),
            op: "send",
            error,
        }),
    }
}

/// The errors a send gives while the interface is down.
pub fn link_down(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETDOWN | libc::ENXIO | libc::ENODEV | libc::ENOBUFS)
    )
}

/// The next frame before `until`, or None when the time is up.
async fn recv_until(
    sock: &AoeSocket,
    buf: &mut [u8],
    until: Instant,
) -> Result<Option<usize>, AoeError> {
    loop {
        match sock.try_recv(buf) {
            Ok(Some(0)) => continue,
            Ok(Some(n)) => return Ok(Some(n)),
            Ok(None) => {}
            Err(error) => {
                return Err(AoeError::Socket {
                    iface: sock.iface.clone(),
                    op: "recv",
                    error,
                })
            }
        }
        match tokio::time::timeout_at(until, sock.readable()).await {
            Err(_) => return Ok(None),
            Ok(Err(error)) => {
                return Err(AoeError::Socket {
                    iface: sock.iface.clone(),
                    op: "poll",
                    error,
                })
            }
            Ok(Ok(())) => {}
        }
    }
}

/// The flush command the target accepts: FLUSH CACHE EXT, else FLUSH CACHE (vblade
/// aborts the EXT form but answers the other), else None (no flush). What a flush is
/// worth is the target's business: vblade answers FLUSH CACHE without syncing anything
/// (its writes are pwrite(2)s into the target host's page cache; `vblade -s` opens the
/// file O_SYNC, `-d` O_DIRECT).
pub async fn flush_command(
    sock: &AoeSocket,
    target: &Found,
    wait: Duration,
) -> Result<Option<u8>, AoeError> {
    for cmd in [frame::ATA_FLUSH_EXT, frame::ATA_FLUSH] {
        let args = AtaArgs {
            command: cmd,
            ..AtaArgs::flush()
        };
        if ata_ok(sock, target, args, wait).await? {
            return Ok(Some(cmd));
        }
    }
    Ok(None)
}

/// One data-less ATA command: whether the target completed it without an error.
async fn ata_ok(
    sock: &AoeSocket,
    target: &Found,
    args: AtaArgs,
    wait: Duration,
) -> Result<bool, AoeError> {
    let (tag, f) = ata_frame(sock, target, args);
    let answer = exchange(sock, &f, wait, |buf| {
        let r = frame::parse_reply(buf).ok()?;
        if r.tag != tag || r.src != target.mac {
            return None;
        }
        let ata = frame::parse_ata(buf).ok()?;
        Some(r.error.is_none() && !ata.failed())
    })
    .await?;
    answer.ok_or_else(|| AoeError::Target {
        iface: sock.iface.clone(),
        shelf: target.shelf,
        slot: target.slot,
        why: format!(
            "no answer to ATA command {:#04x} within {wait:?}",
            args.command
        ),
    })
}
