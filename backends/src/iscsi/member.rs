//! [`IscsiMember`]: an iSCSI LUN as an array member.
//!
//! A supervisor task keeps one session logged in: it pings the target with NOP-Out
//! (the member's heartbeat), and when the connection dies it logs in again with capped
//! exponential backoff, reinstating the session under the same ISID. A request runs on
//! the current session; when that session dies under it, it is sent again on the next
//! one (READ, WRITE, SYNCHRONIZE CACHE, UNMAP and WRITE SAME of a fixed range are
//! idempotent) for as long as its deadline allows. Past the deadline it fails with
//! [`IoError::Timeout`] when the target had it and did not answer, and
//! [`IoError::Disconnected`] when there was no session to send it on: the core marks the
//! member faulty on either, as for NBD members.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raidcore::{
    Caps, Class, IoBuf, IoError, IoFuture, IoResult, Member, MemberInfo, MemberIo, Op, Proto,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::login::{self, Chap, LoginOptions, Peer, SessionType};
use super::lun::{self, LunInfo};
use super::scsi::{self, Cdb};
use super::session::{Command, Completion, Outcome, Session};
use super::{IscsiError, IscsiUrl};

/// READ/WRITE larger than this are split: big enough for full bursts, small enough
/// that one command does not hold the connection for long.
const MAX_REQUEST: u64 = 4 << 20;
/// UNMAP / WRITE SAME ranges beyond this many blocks are split when the LUN sets no
/// lower limit.
const MAX_NO_DATA_BLOCKS: u64 = 1 << 22;
const BACKOFF_START: Duration = Duration::from_millis(50);

/// Tunables of an iSCSI member.
#[derive(Debug, Clone)]
pub struct IscsiOptions {
    /// How long one request may take, re-sends after reconnects included.
    pub timeout: Duration,
    pub login: LoginOptions,
    /// How often the supervisor pings the target with NOP-Out.
    pub heartbeat: Duration,
    pub reconnect_backoff_max: Duration,
}

impl Default for IscsiOptions {
    fn default() -> Self {
        IscsiOptions {
            timeout: Duration::from_secs(30),
            login: LoginOptions::default(),
            heartbeat: Duration::from_secs(5),
            reconnect_backoff_max: Duration::from_secs(5),
        }
    }
}

/// A snapshot of an iSCSI member's session, for `uniblk status` and tests. Holds no
/// secret.
#[derive(Debug, Clone, Serialize)]
pub struct IscsiStatus {
    pub connected: bool,
    pub target: String,
    pub portal: String,
    pub alias: Option<String>,
    pub reconnects: u64,
    pub header_digest: bool,
    pub data_digest: bool,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_burst: u32,
    pub first_burst: u32,
    pub max_send_segment: u32,
    pub heartbeats: u64,
    /// Commands sent on the current session, and those in flight on it now.
    pub commands: u64,
    pub in_flight: usize,
    /// Timed-out commands on the current session settled by ABORT TASK without a
    /// reconnect (aborted, or finished by the target before the abort reached them).
    pub aborts: u64,
    pub last_error: Option<String>,
}

struct Shared {
    url: IscsiUrl,
    opts: IscsiOptions,
    lun: LunInfo,
    size: u64,
    block_size: u32,
    /// The address as shown everywhere (password redacted).
    address: String,
    session: Mutex<Option<Arc<Session>>>,
    changed: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    reconnects: AtomicU64,
    heartbeats: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// One block of zeroes: the Data-Out of WRITE SAME.
    zero_block: Box<[u8]>,
}

/// An iSCSI LUN serving as an array member.
pub struct IscsiMember {
    info: MemberInfo,
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl IscsiMember {
    /// Log in to the LUN `address` names and start the session's supervisor. CHAP
    /// credentials come from `opts.login` or else from the URL's `user%secret@`.
    pub async fn open(address: &str, mut opts: IscsiOptions) -> Result<Self, IscsiError> {
        let url = IscsiUrl::parse(address)?;
        if opts.login.chap.is_none() {
            opts.login.chap = url_chap(&url)?;
        }
        let session = log_in(&url, &opts.login).await?;
        let deadline = Instant::now() + opts.timeout;
        let lun = match lun::probe(&session, deadline).await {
            Ok(l) => l,
            Err(why) => {
                session
                    .logout(Instant::now() + Duration::from_secs(2))
                    .await;
                return Err(lun_error(&url, why));
            }
        };
        let block_size = lun.capacity.block_size;
        let size = lun.capacity.bytes();
        let address = url.redacted();
        let info = member_info(&address, size, block_size, &lun);
        tracing::info!(
            member = %address, size, block_size, unmap = lun.unmap, write_same = lun.write_same,
            digests = ?session.neg.digests, max_burst = session.neg.max_burst,
            immediate_data = session.neg.immediate_data, initial_r2t = session.neg.initial_r2t,
            "iSCSI member open"
        );
        let shared = Arc::new(Shared {
            url,
            opts,
            lun,
            size,
            block_size,
            address,
            session: Mutex::new(Some(session.clone())),
            changed: watch::channel(0).0,
            closed: watch::channel(false).0,
            reconnects: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            last_error: Mutex::new(None),
            zero_block: vec![0u8; block_size as usize].into_boxed_slice(),
        });
        tokio::spawn(shared.clone().supervise(session));
        Ok(IscsiMember {
            info,
            shared,
            closed: AtomicBool::new(false),
        })
    }

    pub fn lun(&self) -> &LunInfo {
        &self.shared.lun
    }

    pub fn connected(&self) -> bool {
        self.shared.current().is_some()
    }

    pub fn status(&self) -> IscsiStatus {
        let s = &self.shared;
        let cur = s.current();
        let neg = cur.as_ref().map(|c| c.neg);
        IscsiStatus {
            connected: cur.is_some(),
            target: s.url.target.clone(),
            portal: s.url.portal(),
            alias: cur.as_ref().and_then(|c| c.alias.clone()),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            header_digest: neg.is_some_and(|n| n.digests.header),
            data_digest: neg.is_some_and(|n| n.digests.data),
            immediate_data: neg.is_some_and(|n| n.immediate_data),
            initial_r2t: neg.is_some_and(|n| n.initial_r2t),
            max_burst: neg.map_or(0, |n| n.max_burst),
            first_burst: neg.map_or(0, |n| n.first_burst),
            max_send_segment: neg.map_or(0, |n| n.max_send_segment),
            heartbeats: s.heartbeats.load(Ordering::Relaxed),
            commands: cur.as_ref().map_or(0, |c| c.commands()),
            in_flight: cur.as_ref().map_or(0, |c| c.in_flight()),
            aborts: cur.as_ref().map_or(0, |c| c.aborts()),
            last_error: s.last_error(),
        }
    }

    /// One NOP-Out round trip on the current session.
    pub async fn ping(&self) -> Result<Duration, IoError> {
        let start = Instant::now();
        let deadline = start + self.shared.opts.timeout;
        let s = self
            .shared
            .wait_session(deadline)
            .await
            .ok_or_else(|| self.shared.no_session("NOP-Out"))?;
        s.ping(deadline)
            .await
            .map_err(|why| IoError::Timeout(format!("{}: NOP-Out: {why}", self.shared.address)))?;
        Ok(start.elapsed())
    }

    async fn perform(&self, io: MemberIo) -> IoResult {
        if self.closed.load(Ordering::Acquire) {
            return Err(IoError::Shutdown);
        }
        raidcore::check_request(&self.info, &io)?;
        let deadline = Instant::now() + self.shared.opts.timeout;
        let t = io.tag;
        let caps = self.info.caps;
        let bs = u64::from(self.shared.block_size);
        match t.op {
            Op::Read | Op::Write => {
                let step = MAX_REQUEST / bs * bs;
                let part = |at: u64| {
                    let n = step.min(t.len - at);
                    let (lba, blocks) = ((t.offset + at) / bs, (n / bs) as u32);
                    let buf = sub(io.buf, at, n);
                    let cmd = match t.op {
                        Op::Read => Command {
                            cdb: scsi::read16(lba, blocks),
                            data_in: Some(buf),
                            data_out: None,
                        },
                        _ => Command {
                            cdb: scsi::write16(lba, blocks, t.fua && caps.fua),
                            data_in: None,
                            data_out: Some(buf),
                        },
                    };
                    self.shared.run(cmd, deadline, t.offset + at, n)
                };
                if t.len <= step {
                    return part(0).await;
                }
                join_parts((0..t.len).step_by(step as usize).map(part).collect()).await
            }
            Op::Flush if !caps.flush => Ok(()),
            Op::Flush => {
                let cmd = Command::none(scsi::sync_cache16());
                self.shared.run(cmd, deadline, 0, 0).await
            }
            Op::Trim if !caps.discard => Ok(()),
            Op::Trim => self.unmap(t.offset, t.len, deadline).await,
            Op::WriteZeroes if !caps.write_zeroes => Err(IoError::NotSupported(format!(
                "{}: the LUN does not support WRITE SAME(16)",
                self.info.address
            ))),
            Op::WriteZeroes => {
                // With the UNMAP bit the range still reads back as the zero block (SBC);
                // the member tag carries no "keep allocated" flag to honour.
                let unmap = self.shared.lun.write_same_unmap;
                self.write_same(t.offset, t.len, unmap, deadline).await
            }
        }
    }

    /// Block ranges of at most `max` blocks covering `[offset, offset+len)`.
    fn ranges(&self, offset: u64, len: u64, max: u64) -> Vec<(u64, u32)> {
        let bs = u64::from(self.shared.block_size);
        let (first, count) = (offset / bs, len / bs);
        let max = max.clamp(1, u64::from(u32::MAX));
        (0..count)
            .step_by(max as usize)
            .map(|k| (first + k, max.min(count - k) as u32))
            .collect()
    }

    async fn unmap(&self, offset: u64, len: u64, deadline: Instant) -> IoResult {
        let limit = match self.shared.lun.limits.max_unmap_blocks {
            0 => MAX_NO_DATA_BLOCKS,
            n => u64::from(n).min(MAX_NO_DATA_BLOCKS),
        };
        let bs = u64::from(self.shared.block_size);
        for (lba, blocks) in self.ranges(offset, len, limit) {
            let mut list = scsi::unmap_list(lba, blocks);
            let cmd = Command {
                cdb: scsi::unmap(list.len() as u16),
                data_in: None,
                data_out: Some(IoBuf::from_slice(&mut list)),
            };
            self.shared
                .run(cmd, deadline, lba * bs, u64::from(blocks) * bs)
                .await?;
        }
        Ok(())
    }

    async fn write_same(&self, offset: u64, len: u64, unmap: bool, deadline: Instant) -> IoResult {
        let limit = match self.shared.lun.limits.max_write_same_blocks {
            0 => MAX_NO_DATA_BLOCKS,
            n => n.min(MAX_NO_DATA_BLOCKS),
        };
        let bs = u64::from(self.shared.block_size);
        let zero = &self.shared.zero_block;
        for (lba, blocks) in self.ranges(offset, len, limit) {
            // SAFETY: the target only reads a Data-Out buffer; the block lives as long
            // as the member.
            let buf = unsafe { IoBuf::from_raw(zero.as_ptr() as *mut u8, zero.len()) };
            let cmd = Command {
                cdb: scsi::write_same16(lba, blocks, unmap),
                data_in: None,
                data_out: Some(buf),
            };
            self.shared
                .run(cmd, deadline, lba * bs, u64::from(blocks) * bs)
                .await?;
        }
        Ok(())
    }
}

impl Member for IscsiMember {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn session(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.status()).ok()
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        raidcore::io_future_boxed(self.perform(io))
    }

    /// Log out (bounded) and stop the supervisor. Idempotent.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Take the session before telling the supervisor, which drops its hold on it.
        let session = self
            .shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.shared.closed.send_replace(true);
        if let Some(s) = session {
            // Sent at once, so it leaves even if the process exits right after; the
            // target then answers and closes the connection.
            let sent = s.logout_now();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        let limit = Instant::now() + Duration::from_secs(2);
                        if sent {
                            let _ = tokio::time::timeout_at(limit, s.closed()).await;
                            s.kill("logged out");
                        } else {
                            s.logout(limit).await;
                        }
                    });
                }
                Err(_) => s.kill("member closed"),
            }
        }
        tracing::info!(member = %self.shared.address, "iSCSI member closed");
    }
}

impl Drop for IscsiMember {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Session>> {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|s| !s.is_dead())
    }

    fn set(&self, s: Option<Arc<Session>>) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.changed.send_modify(|g| *g += 1);
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }

    /// The session's life: heartbeat while it is up; when it dies, log in again with
    /// backoff; until the member closes.
    async fn supervise(self: Arc<Self>, first: Arc<Session>) {
        let mut session = first;
        loop {
            let why = self.watch(&session).await;
            self.set(None);
            if self.is_closed() {
                return;
            }
            tracing::warn!(member = %self.address, reason = %why, "iSCSI connection lost; logging in again");
            self.note_error(why);
            match self.relogin().await {
                Some(s) => session = s,
                None => return,
            }
        }
    }

    /// Ping every heartbeat until the session dies (or the member closes); returns why.
    async fn watch(&self, s: &Arc<Session>) -> String {
        let mut closed = self.closed.subscribe();
        loop {
            tokio::select! {
                _ = closed.wait_for(|c| *c) => return "member closed".into(),
                _ = s.closed() => return s.death().unwrap_or_default(),
                _ = tokio::time::sleep(self.opts.heartbeat) => {}
            }
            let limit = self.opts.timeout.min(Duration::from_secs(10));
            match s.ping(Instant::now() + limit).await {
                Ok(()) => {
                    self.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    s.kill(&format!("heartbeat failed: {why}"));
                }
            }
        }
    }

    /// Log in until it works (Some) or the member closes (None).
    async fn relogin(&self) -> Option<Arc<Session>> {
        let mut closed = self.closed.subscribe();
        let mut delay = BACKOFF_START.min(self.opts.reconnect_backoff_max);
        loop {
            let attempt = tokio::select! {
                _ = closed.wait_for(|c| *c) => return None,
                r = self.login_checked() => r,
            };
            match attempt {
                Ok(s) => {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(member = %self.address, "iSCSI session re-established");
                    self.set(Some(s.clone()));
                    return Some(s);
                }
                Err(e) => {
                    tracing::debug!(member = %self.address, error = %e, ?delay, "iSCSI re-login failed");
                    self.note_error(e);
                }
            }
            tokio::select! {
                _ = closed.wait_for(|c| *c) => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.opts.reconnect_backoff_max);
        }
    }

    /// A new session whose LUN still has our geometry.
    async fn login_checked(&self) -> Result<Arc<Session>, String> {
        let s = log_in(&self.url, &self.opts.login)
            .await
            .map_err(|e| e.to_string())?;
        let mut cap = [0u8; 32];
        let deadline = Instant::now() + self.opts.login.connect_timeout;
        let (c, n) = lun::control(&s, scsi::read_capacity16(), &mut cap, deadline).await?;
        let now = scsi::Capacity::parse(&cap[..n]);
        let fits = c.status == scsi::STATUS_GOOD
            && now.is_some_and(|k| k.block_size == self.block_size && k.bytes() >= self.size);
        if !fits {
            s.kill("the LUN changed");
            return Err(format!(
                "the LUN changed: now {now:?}, was {} bytes of {}-byte blocks",
                self.size, self.block_size
            ));
        }
        Ok(s)
    }

    /// The current session, waiting for one until `deadline`.
    async fn wait_session(&self, deadline: Instant) -> Option<Arc<Session>> {
        // The common case first: a session is up.
        if let Some(s) = self.current().filter(|_| !self.is_closed()) {
            return Some(s);
        }
        let mut changed = self.changed.subscribe();
        loop {
            if self.is_closed() {
                return None;
            }
            if let Some(s) = self.current() {
                return Some(s);
            }
            let wait = tokio::time::timeout_at(deadline, changed.changed()).await;
            if !matches!(wait, Ok(Ok(()))) {
                return None;
            }
        }
    }

    /// One command to GOOD status: re-sent on the next session when its session dies,
    /// and again on unit attentions and busy targets, until the deadline.
    async fn run(&self, cmd: Command, deadline: Instant, offset: u64, len: u64) -> IoResult {
        let mut attentions = 0;
        let mut busy_wait = Duration::from_millis(1);
        loop {
            let Some(s) = self.wait_session(deadline).await else {
                return Err(self.no_session(scsi::command_name(&cmd.cdb)));
            };
            match s.execute(&cmd, deadline).await {
                Outcome::Done(c) if c.status == scsi::STATUS_GOOD => {
                    return self.check_residual(&cmd, &c, offset, len)
                }
                Outcome::Done(c) if lun::retryable(&c) && attentions < lun::MAX_ATTENTIONS => {
                    attentions += 1;
                    if c.sense.is_none() {
                        // BUSY / TASK SET FULL: give the target a moment.
                        tokio::time::sleep(busy_wait).await;
                        busy_wait = (busy_wait * 2).min(Duration::from_millis(100));
                    }
                }
                Outcome::Done(c) => return Err(self.scsi_error(&cmd.cdb, &c, offset, len)),
                Outcome::TimedOut => return Err(self.timed_out(&cmd.cdb, offset, len)),
                Outcome::Failed(why) => {
                    return Err(IoError::Io(format!(
                        "{}: {} of {len} bytes at offset {offset}: {why}",
                        self.address,
                        scsi::command_name(&cmd.cdb)
                    )))
                }
                Outcome::Lost(why) => {
                    tracing::debug!(member = %self.address, cmd = scsi::command_name(&cmd.cdb), offset, reason = %why, "re-sending an iSCSI command after its connection died");
                }
            }
        }
    }

    /// GOOD status with data missing is still a failure for a block read or write.
    /// (Not for UNMAP and WRITE SAME: tgtd reports their parameter data as residual.)
    fn check_residual(&self, cmd: &Command, c: &Completion, offset: u64, len: u64) -> IoResult {
        let rw = matches!(cmd.cdb[0], scsi::OP_READ_16 | scsi::OP_WRITE_16);
        if c.residual != 0 && rw {
            return Err(IoError::Io(format!(
                "{}: {} of {len} bytes at offset {offset} left {} bytes untransferred",
                self.address,
                scsi::command_name(&cmd.cdb),
                c.residual
            )));
        }
        Ok(())
    }

    fn scsi_error(&self, cdb: &Cdb, c: &Completion, offset: u64, len: u64) -> IoError {
        let name = scsi::command_name(cdb);
        let (why, errno) = match c.sense {
            Some(s) => (s.describe(), s.errno()),
            None => (format!("status {}", scsi::status_name(c.status)), libc::EIO),
        };
        let text = format!(
            "{}: {name} of {len} bytes at offset {offset}: {why}",
            self.address
        );
        IoError::from_errno(&text, errno)
    }

    fn no_session(&self, what: &str) -> IoError {
        if self.is_closed() {
            return IoError::Shutdown;
        }
        let last = self.last_error().unwrap_or_else(|| "none recorded".into());
        IoError::Disconnected(format!(
            "{}: no session with the target for {what} within {:?} (last error: {last})",
            self.address, self.opts.timeout
        ))
    }

    fn timed_out(&self, cdb: &Cdb, offset: u64, len: u64) -> IoError {
        IoError::Timeout(format!(
            "{}: {} of {len} bytes at offset {offset} got no answer within {:?}",
            self.address,
            scsi::command_name(cdb),
            self.opts.timeout
        ))
    }
}

/// Every part runs to its end (none is dropped midway: the reader may be filling its
/// buffer), then the first error wins.
async fn join_parts<F: std::future::Future<Output = IoResult>>(mut parts: Vec<F>) -> IoResult {
    if parts.len() == 1 {
        return parts.remove(0).await;
    }
    futures::future::join_all(parts).await.into_iter().collect()
}

/// Connect, log in and start a session.
async fn log_in(url: &IscsiUrl, opts: &LoginOptions) -> Result<Arc<Session>, IscsiError> {
    let l = login::connect_and_login(url, opts, SessionType::Normal).await?;
    Session::start(l, Peer::of(url), url.lun).map_err(|e| IscsiError::Connect {
        portal: url.portal(),
        reason: e.to_string(),
        hint: "the system is out of file descriptors?".into(),
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })
}

/// `user%secret@` from the URL; a user without a secret is a mistake worth naming.
pub fn url_chap(url: &IscsiUrl) -> Result<Option<Chap>, IscsiError> {
    match (&url.user, &url.password) {
        (None, _) => Ok(None),
        (Some(u), Some(p)) => Ok(Some(Chap {
            user: u.clone(),
            secret: p.clone(),
        })),
        (Some(u), None) => Err(IscsiError::Secret(format!(
            "{} names CHAP user '{u}' but no secret; write user%secret@ or give the secret in the layout",
            url.redacted()
        ))),
    }
}

fn lun_error(url: &IscsiUrl, why: String) -> IscsiError {
    IscsiError::Lun {
        target: url.target.clone(),
        portal: url.portal(),
        lun: url.lun,
        why,
    }
}

/// The part `[at, at+len)` of `buf`.
fn sub(buf: IoBuf, at: u64, len: u64) -> IoBuf {
    // SAFETY: validate() checked buf.len() == the request length, and the split keeps
    // at + len inside it; the issuer keeps the whole buffer alive (IoBuf contract).
    unsafe { IoBuf::from_raw(buf.as_ptr().add(at as usize), len as usize) }
}

fn member_info(address: &str, size: u64, block_size: u32, lun: &LunInfo) -> MemberInfo {
    MemberInfo {
        address: address.to_string(),
        class: Class::Remote,
        proto: Proto::Iscsi,
        size,
        block_size,
        caps: Caps {
            // SYNCHRONIZE CACHE and the FUA bit of WRITE(16) are part of SBC for disks.
            flush: true,
            fua: true,
            discard: lun.unmap,
            write_zeroes: lun.write_same,
        },
        engine: "iscsi",
    }
}
