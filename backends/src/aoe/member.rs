//! `aoe:IFACE/SHELF.SLOT`: an AoE target as an array member.
//!
//! Opening finds the target with a Query Config broadcast, sizes it with IDENTIFY
//! DEVICE (LBA48 required), learns which flush command it takes, and starts the engine.
//! Each I/O has a deadline of `timeout`; past it the engine fails it with
//! [`IoError::Timeout`] (frames went out, no answer) or [`IoError::Disconnected`] (the
//! link refused them), and the core marks the member faulty. The engine keeps looking
//! for a target that went away, so after the target or the link comes back the member
//! serves I/O again (an operator's `member readd` puts it back in the array).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use raidcore::{Caps, Class, IoError, IoFuture, IoResult, Member, MemberInfo, MemberIo, Op, Proto};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::discover::{self, Found};
use super::engine::{self, AoeStatus, Handle, Kind, Request, Target, MAX_WINDOW};
use super::error::AoeError;
use super::frame::{self, SECTOR};
use super::socket::AoeSocket;

/// Tunables of an AoE member.
#[derive(Debug, Clone, Copy)]
pub struct AoeOptions {
    /// How long one request may take, re-sends included.
    pub timeout: Duration,
    /// How long open waits for the target's answers.
    pub discover_timeout: Duration,
}

impl Default for AoeOptions {
    fn default() -> Self {
        AoeOptions {
            timeout: Duration::from_secs(30),
            discover_timeout: Duration::from_secs(3),
        }
    }
}

/// An AoE target serving as an array member.
pub struct AoeMember {
    info: MemberInfo,
    handle: Handle,
    opts: AoeOptions,
    flush: Option<u8>,
    closed: AtomicBool,
}

impl AoeMember {
    /// Find target `shelf.slot` on `iface` and start serving it. Must run in a tokio
    /// runtime, on a thread in the network namespace that holds `iface`.
    pub async fn open(
        address: &str,
        iface: &str,
        shelf: u16,
        slot: u8,
        opts: AoeOptions,
    ) -> Result<Self, AoeError> {
        let sock = AoeSocket::open(iface)?;
        let mtu_sectors = frame::sectors_for_mtu(sock.mtu);
        if mtu_sectors == 0 {
            return Err(AoeError::MtuTooSmall {
                iface: iface.to_string(),
                mtu: sock.mtu,
            });
        }
        let found = discover::find(&sock, shelf, slot, opts.discover_timeout).await?;
        let id = discover::identify(&sock, &found, opts.discover_timeout).await?;
        let refuse = |why: String| AoeError::Target {
            iface: iface.to_string(),
            shelf,
            slot,
            why,
        };
        if !id.lba48 {
            return Err(refuse(
                "it does not offer LBA48 addressing, which uniblk needs".into(),
            ));
        }
        if id.sectors == 0 {
            return Err(refuse("it reports no sectors".into()));
        }
        let flush = discover::flush_command(&sock, &found, opts.discover_timeout).await?;
        let target = target_of(&found, mtu_sectors);
        tracing::info!(
            member = address, mac = %found.mac, sectors = id.sectors, window = target.window,
            sectors_per_frame = target.sectors_per_frame, mtu = sock.mtu, ?flush,
            "AoE member open"
        );
        let handle = engine::start(sock, target, address);
        Ok(AoeMember {
            info: member_info(address, id.sectors * SECTOR as u64, flush.is_some()),
            handle,
            opts,
            flush,
            closed: AtomicBool::new(false),
        })
    }

    pub fn status(&self) -> AoeStatus {
        self.handle.status()
    }

    async fn perform(&self, io: MemberIo) -> IoResult {
        if self.closed.load(Ordering::Acquire) {
            return Err(IoError::Shutdown);
        }
        raidcore::check_request(&self.info, &io)?;
        let t = io.tag;
        let kind = match t.op {
            Op::Read => Kind::Read,
            Op::Write => Kind::Write,
            Op::Flush => match self.flush {
                Some(cmd) => Kind::Flush(cmd),
                None => return Ok(()),
            },
            // No discard in AoE's ATA subset; the core skips it (caps say so).
            Op::Trim => return Ok(()),
            Op::WriteZeroes => {
                return Err(IoError::NotSupported(format!(
                    "{}: AoE has no WRITE ZEROES",
                    self.info.address
                )))
            }
        };
        let (done, result) = oneshot::channel();
        let req = Request {
            kind,
            lba: t.offset / SECTOR as u64,
            sectors: t.len / SECTOR as u64,
            buf: io.buf,
            deadline: Instant::now() + self.opts.timeout,
            done,
        };
        if self.handle.submit(req).is_err() {
            return Err(IoError::Shutdown);
        }
        // The engine answers every request it took, also when it stops (Shutdown).
        result.await.unwrap_or(Err(IoError::Shutdown))
    }
}

impl Member for AoeMember {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn session(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.status()).ok()
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        raidcore::io_future(self.perform(io))
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.handle.close();
            tracing::info!(member = %self.info.address, "AoE member closed");
        }
    }
}

impl Drop for AoeMember {
    fn drop(&mut self) {
        self.close();
    }
}

/// Every target answering on `iface` within `wait`, for `uniblk scan`, with its size
/// (from IDENTIFY; None when it did not answer that).
pub async fn scan(iface: &str, wait: Duration) -> Result<Vec<(Found, Option<u64>)>, AoeError> {
    let sock = AoeSocket::open(iface)?;
    let found = discover::scan(&sock, wait).await?;
    let mut out = Vec::with_capacity(found.len());
    for f in found {
        let size = discover::identify(&sock, &f, wait)
            .await
            .ok()
            .map(|id| id.sectors * SECTOR as u64);
        out.push((f, size));
    }
    Ok(out)
}

fn target_of(found: &Found, mtu_sectors: u8) -> Target {
    Target {
        mac: found.mac,
        shelf: found.shelf,
        slot: found.slot,
        window: usize::from(found.config.buffers).clamp(1, MAX_WINDOW),
        sectors_per_frame: found.config.max_sectors.min(mtu_sectors).max(1),
    }
}

fn member_info(address: &str, size: u64, flush: bool) -> MemberInfo {
    MemberInfo {
        address: address.trim().to_string(),
        class: Class::Remote,
        proto: Proto::Aoe,
        size,
        block_size: SECTOR as u32,
        caps: Caps {
            flush,
            fua: false,
            discard: false,
            write_zeroes: false,
        },
        engine: "aoe",
    }
}
