//! The AoE request engine: one task per member owns the socket and every frame in
//! flight. Requests arrive on a channel; each is cut into frames of at most the target's
//! sectors per frame, which go out while the window (the target's buffer count) has
//! room. Every frame has a tag naming its window slot and a sequence number; a reply
//! completes the frame whose tag it carries, its data is copied straight into the
//! request's buffer, and anything else (late, duplicate, another target's, malformed)
//! is counted and dropped. Unanswered frames are sent again after an adaptive timeout
//! (see [`super::rtt`]) until the request's deadline, when it fails: Timeout if the
//! frames went out, Disconnected if the link refused them.
//!
//! A request completes only after none of its frames is in the window any more, so no
//! reply can write into its buffer after the caller got the result (the IoBuf contract).
//!
//! While the target seems gone (re-sends piling up, the link down), the engine asks for
//! it with a Query Config broadcast every [`REDISCOVER_EVERY`]; the answer updates its
//! MAC address, window and frame size, so a target restarted elsewhere is found again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raidcore::{IoBuf, IoError, IoResult};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::discover::{self, CONTROL_TAG};
use super::frame::{self, AtaArgs, Header, Mac, SECTOR};
use super::rtt::{self, Rtt};
use super::socket::AoeSocket;

/// Window slots: the tag's low 16 bits index them. The target's buffer count is capped
/// here (vblade says 16; a bigger window only queues frames in the target's socket).
pub const MAX_WINDOW: usize = 256;
const REDISCOVER_EVERY: Duration = Duration::from_millis(500);
/// A frame re-sent this many times makes the target look gone.
const LOST_AFTER_RETRIES: u32 = 3;
/// Frames drained per readiness before the window is refilled.
const REFILL_EVERY: usize = 32;
/// Frames taken per wake-up at most, before the task yields.
const DRAIN_LIMIT: usize = 1024;

/// The target as the engine addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub mac: Mac,
    pub shelf: u16,
    pub slot: u8,
    /// Frames in flight at most.
    pub window: usize,
    pub sectors_per_frame: u8,
}

/// What a request does. Flush carries the ATA command the target accepted at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush(u8),
}

/// One member I/O for the engine, in sectors.
pub struct Request {
    pub kind: Kind,
    pub lba: u64,
    pub sectors: u64,
    pub buf: IoBuf,
    pub deadline: Instant,
    pub done: oneshot::Sender<IoResult>,
}

/// Counters for status and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_sent: AtomicU64,
    pub retransmits: AtomicU64,
    /// Replies to no frame in flight: late (after a re-send was answered) or duplicate.
    pub late_replies: AtomicU64,
    /// Frames that failed validation.
    pub bad_frames: AtomicU64,
    /// Config replies for our shelf.slot from another MAC while ours answers (ignored).
    pub foreign_configs: AtomicU64,
    pub send_errors: AtomicU64,
    /// Times the target answered a rediscovery after seeming gone.
    pub rediscovered: AtomicU64,
    pub srtt_us: AtomicU64,
    pub rto_us: AtomicU64,
    /// The most frames ever in flight at once (the window's high-water mark).
    pub max_in_flight: AtomicU64,
}

/// A snapshot of [`Stats`] and the target, for `uniblk status` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct AoeStatus {
    pub mac: String,
    pub window: usize,
    pub sectors_per_frame: u8,
    pub frames_sent: u64,
    pub retransmits: u64,
    pub late_replies: u64,
    pub bad_frames: u64,
    pub foreign_configs: u64,
    pub send_errors: u64,
    pub rediscovered: u64,
    pub srtt_us: u64,
    pub rto_us: u64,
    pub max_in_flight: u64,
}

/// What the member keeps of its engine.
pub struct Handle {
    tx: mpsc::UnboundedSender<Request>,
    pub stats: Arc<Stats>,
    pub target: Arc<Mutex<Target>>,
    close: Arc<tokio::sync::Notify>,
}

impl Handle {
    /// Queue a request; None if the engine has stopped.
    pub fn submit(&self, r: Request) -> Result<(), Request> {
        self.tx.send(r).map_err(|e| e.0)
    }

    /// Fail everything queued and in flight with Shutdown and stop the task.
    pub fn close(&self) {
        self.close.notify_one();
    }

    pub fn status(&self) -> AoeStatus {
        let t = *self.target.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AoeStatus {
            mac: t.mac.to_string(),
            window: t.window,
            sectors_per_frame: t.sectors_per_frame,
            frames_sent: get(&s.frames_sent),
            retransmits: get(&s.retransmits),
            late_replies: get(&s.late_replies),
            bad_frames: get(&s.bad_frames),
            foreign_configs: get(&s.foreign_configs),
            send_errors: get(&s.send_errors),
            rediscovered: get(&s.rediscovered),
            srtt_us: get(&s.srtt_us),
            rto_us: get(&s.rto_us),
            max_in_flight: get(&s.max_in_flight),
        }
    }
}

/// Start the engine task for `target` on `sock`. `name` (the member address) appears in
/// every error.
pub fn start(sock: AoeSocket, target: Target, name: &str) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Stats::default());
    let shared_target = Arc::new(Mutex::new(target));
    let close = Arc::new(tokio::sync::Notify::new());
    let engine = Engine {
        sock: Arc::new(sock),
        target,
        shared_target: shared_target.clone(),
        name: name.to_string(),
        slots: (0..MAX_WINDOW).map(|_| None).collect(),
        used: 0,
        free: (0..MAX_WINDOW as u16).rev().collect(),
        seq: 0,
        reqs: Vec::new(),
        free_reqs: Vec::new(),
        issue: VecDeque::new(),
        rtt: Rtt::default(),
        lost_since: None,
        next_query: Instant::now(),
        last_send_error: None,
        stats: stats.clone(),
    };
    tokio::spawn(engine.run(rx, close.clone()));
    Handle {
        tx,
        stats,
        target: shared_target,
        close,
    }
}

/// A request being served.
struct Active {
    kind: Kind,
    lba: u64,
    sectors: u64,
    buf: IoBuf,
    deadline: Instant,
    done: Option<oneshot::Sender<IoResult>>,
    /// Sectors handed to frames so far.
    issued: u64,
    /// Whether every frame has been handed out (a flush has one frame and no sectors).
    all_issued: bool,
    /// Its frames in the window.
    outstanding: usize,
    retransmits: u32,
}

/// A frame in the window.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    req: usize,
    tag: u32,
    lba: u64,
    count: u8,
    /// Byte offset of its data within the request's buffer.
    off: usize,
    sent: Instant,
    due: Instant,
    rto: Duration,
    retries: u32,
}

struct Engine {
    sock: Arc<AoeSocket>,
    target: Target,
    shared_target: Arc<Mutex<Target>>,
    name: String,
    slots: Vec<Option<InFlight>>,
    /// Slots below this index have been used; the free list hands out the lowest ones
    /// first, so scans of the window stop here (about the window size, not 256).
    used: usize,
    free: Vec<u16>,
    seq: u16,
    reqs: Vec<Option<Active>>,
    free_reqs: Vec<usize>,
    /// Requests with frames still to hand out, oldest first.
    issue: VecDeque<usize>,
    rtt: Rtt,
    lost_since: Option<Instant>,
    next_query: Instant,
    last_send_error: Option<String>,
    stats: Arc<Stats>,
}

impl Engine {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Request>,
        close: Arc<tokio::sync::Notify>,
    ) {
        let sock = self.sock.clone();
        let mut buf = vec![0u8; 65536];
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        // The last drain stopped at its limit: the socket's readiness was used up, so
        // drain again after yielding instead of waiting for it.
        let mut more = false;
        loop {
            sleep.as_mut().reset(self.next_wake());
            tokio::select! {
                biased;
                _ = close.notified() => break,
                _ = tokio::task::yield_now(), if more => more = self.drain(&mut buf),
                r = sock.readable() => match r {
                    Ok(()) => more = self.drain(&mut buf),
                    Err(e) => {
                        tracing::error!(member = %self.name, error = %e, "AoE socket failed");
                        break;
                    }
                },
                m = rx.recv() => match m {
                    Some(r) => {
                        self.admit(r);
                        while let Ok(r) = rx.try_recv() {
                            self.admit(r);
                        }
                    }
                    None => break,
                },
                _ = &mut sleep => self.on_timer(Instant::now()),
            }
            // The select is biased towards the socket, which under load is ready again
            // at once: take new requests and due timers here too, or they would wait for
            // the window to drain.
            while let Ok(r) = rx.try_recv() {
                self.admit(r);
            }
            let now = Instant::now();
            if self.next_wake() <= now {
                self.on_timer(now);
            }
            self.fill();
        }
        self.shutdown(&mut rx);
    }

    /// Fail every request with Shutdown: nothing of them stays in the window.
    fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Request>) {
        rx.close();
        while let Ok(r) = rx.try_recv() {
            let _ = r.done.send(Err(IoError::Shutdown));
        }
        for i in 0..self.reqs.len() {
            if self.reqs[i].is_some() {
                self.finish(i, Err(IoError::Shutdown));
            }
        }
    }

    fn admit(&mut self, r: Request) {
        if matches!(r.kind, Kind::Read | Kind::Write) && r.sectors == 0 {
            let _ = r.done.send(Ok(()));
            return;
        }
        let a = Active {
            kind: r.kind,
            lba: r.lba,
            sectors: r.sectors,
            buf: r.buf,
            deadline: r.deadline,
            done: Some(r.done),
            issued: 0,
            all_issued: false,
            outstanding: 0,
            retransmits: 0,
        };
        let i = match self.free_reqs.pop() {
            Some(i) => {
                self.reqs[i] = Some(a);
                i
            }
            None => {
                self.reqs.push(Some(a));
                self.reqs.len() - 1
            }
        };
        self.issue.push_back(i);
    }

    /// Hand out frames while the window has room.
    fn fill(&mut self) {
        let spf = u64::from(self.target.sectors_per_frame.max(1));
        while self.in_flight() < self.target.window {
            let Some(&req) = self.issue.front() else {
                return;
            };
            let Some(slot) = self.free.pop() else {
                return;
            };
            let a = self.reqs[req].as_mut().expect("issue holds live requests");
            let count = (a.sectors - a.issued).min(spf);
            let f = InFlight {
                req,
                tag: u32::from(self.seq & 0x7fff) << 16 | u32::from(slot),
                lba: a.lba + a.issued,
                count: count as u8,
                off: (a.issued as usize) * SECTOR,
                sent: Instant::now(),
                due: Instant::now(),
                rto: self.rtt.rto(),
                retries: 0,
            };
            self.seq = self.seq.wrapping_add(1);
            a.issued += count;
            a.outstanding += 1;
            if a.issued == a.sectors {
                a.all_issued = true;
                self.issue.pop_front();
            }
            self.slots[usize::from(slot)] = Some(f);
            self.used = self.used.max(usize::from(slot) + 1);
            self.stats
                .max_in_flight
                .fetch_max(self.in_flight() as u64, Ordering::Relaxed);
            self.transmit(usize::from(slot));
        }
    }

    fn in_flight(&self) -> usize {
        MAX_WINDOW - self.free.len()
    }

    /// Send (or re-send) the frame in `slot`, arming its timer.
    fn transmit(&mut self, slot: usize) {
        let Some(f) = self.slots[slot].as_mut() else {
            return;
        };
        let now = Instant::now();
        f.sent = now;
        f.due = now + f.rto;
        let f = *f;
        let a = self.reqs[f.req]
            .as_mut()
            .expect("frames belong to live requests");
        let args = match a.kind {
            Kind::Read => AtaArgs::read(f.lba, f.count),
            Kind::Write => AtaArgs::write(f.lba, f.count),
            Kind::Flush(cmd) => AtaArgs {
                command: cmd,
                ..AtaArgs::flush()
            },
        };
        let mut head = [0u8; frame::ATA_LEN];
        frame::put_header(
            &mut head,
            &Header {
                dst: self.target.mac,
                src: self.sock.mac,
                shelf: self.target.shelf,
                slot: self.target.slot,
                command: frame::CMD_ATA,
                tag: f.tag,
            },
        );
        args.put(&mut head);
        let data: &[u8] = if a.kind == Kind::Write {
            // SAFETY: the request's buffer stays valid until it completes (IoBuf
            // contract), and the frame lies inside it (sectors * 512 == buf.len()).
            unsafe { &a.buf.as_slice()[f.off..f.off + args.data_len()] }
        } else {
            &[]
        };
        self.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        match self.sock.send(&head, data) {
            Ok(()) => self.last_send_error = None,
            // The kernel queue is full: the timer sends it again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                if self.last_send_error.is_none() {
                    tracing::warn!(member = %self.name, iface = %self.sock.iface, error = %e, "AoE frames cannot be sent");
                }
                self.last_send_error = Some(e.to_string());
                self.seems_lost(now);
            }
        }
    }

    fn seems_lost(&mut self, now: Instant) {
        if self.lost_since.is_none() {
            self.lost_since = Some(now);
            self.next_query = now;
        }
    }

    /// Receive until the socket is empty, refilling the window as replies free it.
    /// Returns true when it stopped at [`DRAIN_LIMIT`] frames with more perhaps waiting:
    /// a flood from the wire must not keep the task from yielding.
    fn drain(&mut self, buf: &mut [u8]) -> bool {
        for n in 1..=DRAIN_LIMIT {
            match self.sock.try_recv(buf) {
                Ok(Some(len)) => self.on_frame(&buf[..len]),
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(member = %self.name, error = %e, "AoE receive failed");
                    return false;
                }
            }
            if n.is_multiple_of(REFILL_EVERY) {
                self.fill();
            }
        }
        true
    }

    fn on_frame(&mut self, buf: &[u8]) {
        let r = match frame::parse_reply(buf) {
            Ok(r) => r,
            // Requests of other initiators arrive too; only count what claims to answer.
            Err(frame::BadFrame::NotResponse) => return,
            Err(_) => {
                self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if (r.shelf, r.slot) != (self.target.shelf, self.target.slot) {
            return; // another target on the same interface
        }
        // Any config reply for our target is news about it: ours to a rediscovery
        // query, another initiator's, or the announcement vblade broadcasts at start.
        if r.command == frame::CMD_CONFIG {
            self.on_config(&r, buf);
            return;
        }
        if r.tag & CONTROL_TAG != 0 {
            return; // an answer to some other socket's discovery
        }
        let slot = (r.tag & 0xffff) as usize;
        let current = self.slots.get(slot).copied().flatten();
        let Some(f) = current.filter(|f| f.tag == r.tag && r.src == self.target.mac) else {
            self.stats.late_replies.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if r.command != frame::CMD_ATA {
            self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let result = self.accept(&f, &r, buf);
        if matches!(result, Err(None)) {
            // Malformed: leave the frame in flight, the re-send may come back whole.
            self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if f.retries == 0 {
            self.rtt.sample(f.sent.elapsed());
            self.publish_rtt();
        }
        self.answers_again(r.src);
        self.last_send_error = None;
        self.release(slot);
        let a = self.reqs[f.req]
            .as_mut()
            .expect("frames belong to live requests");
        a.outstanding -= 1;
        match result {
            Err(Some(e)) => self.fail(f.req, e),
            _ if a.all_issued && a.outstanding == 0 => self.finish(f.req, Ok(())),
            _ => {}
        }
    }

    /// Check a reply to frame `f` and copy read data into place. Err(None): malformed
    /// (dropped); Err(Some(e)): the target reported a failure.
    fn accept(&self, f: &InFlight, r: &frame::Reply, buf: &[u8]) -> Result<(), Option<IoError>> {
        let a = self.reqs[f.req]
            .as_ref()
            .expect("frames belong to live requests");
        if let Some(code) = r.error {
            return Err(Some(IoError::Errno(
                format!(
                    "{}: AoE error {code} ({})",
                    self.name,
                    frame::error_text(code)
                ),
                frame::error_errno(code),
            )));
        }
        let ata = frame::parse_ata(buf).map_err(|_| None)?;
        if ata.failed() {
            return Err(Some(IoError::Io(format!(
                "{}: {} of {} sectors at LBA {} failed on the target: ATA status {:#04x} error {:#04x}",
                self.name,
                kind_name(a.kind),
                f.count,
                f.lba,
                ata.status,
                ata.error
            ))));
        }
        if a.kind == Kind::Read {
            let len = usize::from(f.count) * SECTOR;
            let data = frame::ata_data(buf, len).map_err(|e| {
                Some(IoError::Io(format!(
                    "{}: a read reply carried {e} (the target's MTU differs from ours?)",
                    self.name
                )))
            })?;
            // SAFETY: the buffer stays valid until the request completes (IoBuf contract)
            // and the frame's range lies inside it.
            let dst = unsafe { &mut a.buf.as_mut_slice()[f.off..f.off + len] };
            dst.copy_from_slice(data);
        }
        Ok(())
    }

    fn release(&mut self, slot: usize) {
        if self.slots[slot].take().is_some() {
            self.free.push(slot as u16);
        }
    }

    fn publish_rtt(&self) {
        let srtt = self.rtt.srtt().unwrap_or_default().as_micros() as u64;
        self.stats.srtt_us.store(srtt, Ordering::Relaxed);
        self.stats
            .rto_us
            .store(self.rtt.rto().as_micros() as u64, Ordering::Relaxed);
    }

    /// The target answered after seeming gone: count and log it once.
    fn answers_again(&mut self, mac: Mac) {
        if self.lost_since.take().is_some() {
            self.stats.rediscovered.fetch_add(1, Ordering::Relaxed);
            tracing::info!(member = %self.name, %mac, "AoE target answers again");
        }
    }

    /// A config reply: take the target's (possibly new) address and limits. Another MAC
    /// claiming our shelf.slot is believed only while the target seems gone: a stray or
    /// misconfigured announcement must not take a working target's traffic away.
    fn on_config(&mut self, r: &frame::Reply, buf: &[u8]) {
        let Some(found) = discover::config_reply(buf, r.tag) else {
            self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if found.mac != self.target.mac && self.lost_since.is_none() {
            self.stats.foreign_configs.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut t = self.target;
        t.mac = found.mac;
        t.window = usize::from(found.config.buffers).clamp(1, MAX_WINDOW);
        t.sectors_per_frame = found
            .config
            .max_sectors
            .min(frame::sectors_for_mtu(self.sock.mtu))
            .max(1);
        if self.lost_since.is_some() {
            // Everything in flight goes out again now, to wherever the target is.
            let now = Instant::now();
            for f in self.slots[..self.used].iter_mut().flatten() {
                f.due = now;
            }
        }
        self.answers_again(found.mac);
        self.target = t;
        *self.shared_target.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let frames = self.slots[..self.used].iter().flatten().map(|f| f.due);
        let deadlines = self.reqs.iter().flatten().map(|a| a.deadline);
        let query = self.lost_since.map(|_| self.next_query);
        frames.chain(deadlines).chain(query).min().unwrap_or(far)
    }

    fn on_timer(&mut self, now: Instant) {
        for i in 0..self.reqs.len() {
            if self.reqs[i].as_ref().is_some_and(|a| a.deadline <= now) {
                let e = self.deadline_error(i);
                self.fail(i, e);
                // Unanswered to the end: keep asking for the target (Query Config) until
                // it answers, even once no request is left to send (its member is faulty,
                // and a stray late reply may have cleared an earlier "lost").
                self.seems_lost(now);
            }
        }
        for slot in 0..self.used {
            let Some(f) = self.slots[slot].as_mut() else {
                continue;
            };
            if f.due > now {
                continue;
            }
            f.retries += 1;
            f.rto = rtt::backoff(f.rto);
            let (req, retries) = (f.req, f.retries);
            if let Some(a) = self.reqs[req].as_mut() {
                a.retransmits += 1;
            }
            self.stats.retransmits.fetch_add(1, Ordering::Relaxed);
            if retries >= LOST_AFTER_RETRIES {
                self.seems_lost(now);
            }
            self.transmit(slot);
        }
        if self.lost_since.is_some() && self.next_query <= now {
            let q = discover::config_query(
                self.sock.mac,
                self.target.shelf,
                self.target.slot,
                discover::control_tag(),
            );
            let _ = self.sock.send(&q, &[]);
            self.next_query = now + REDISCOVER_EVERY;
        }
    }

    fn deadline_error(&self, req: usize) -> IoError {
        let a = self.reqs[req].as_ref().expect("live request");
        let what = format!(
            "{}: {} of {} bytes at offset {}",
            self.name,
            kind_name(a.kind),
            a.sectors * SECTOR as u64,
            a.lba * SECTOR as u64
        );
        // The link refusing frames now explains every request's silence, also of those
        // whose frames never left the queue.
        match &self.last_send_error {
            Some(e) => IoError::Disconnected(format!(
                "{what} could not be sent: the link on {} refuses frames ({e})",
                self.sock.iface
            )),
            _ => IoError::Timeout(format!(
                "{what} got no reply in time (sent again {} times; is the target up?)",
                a.retransmits
            )),
        }
    }

    /// Take every frame of request `req` out of the window and the issue queue, then
    /// complete it with `e`.
    fn fail(&mut self, req: usize, e: IoError) {
        self.finish(req, Err(e));
    }

    fn finish(&mut self, req: usize, result: IoResult) {
        let Some((outstanding, all_issued)) = self.reqs[req]
            .as_ref()
            .map(|a| (a.outstanding, a.all_issued))
        else {
            return;
        };
        // A request that succeeded has neither (and finishing is on the hot path).
        if outstanding > 0 {
            for slot in 0..self.used {
                if self.slots[slot].is_some_and(|f| f.req == req) {
                    self.release(slot);
                }
            }
        }
        if !all_issued {
            self.issue.retain(|&r| r != req);
        }
        if let Some(mut a) = self.reqs[req].take() {
            if let Some(done) = a.done.take() {
                let _ = done.send(result);
            }
            self.free_reqs.push(req);
        }
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Read => "READ",
        Kind::Write => "WRITE",
        Kind::Flush(_) => "FLUSH",
    }
}
