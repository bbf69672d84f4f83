//! One logged-in iSCSI connection in the full-feature phase: many SCSI commands in
//! flight, each with its own Initiator Task Tag, sent in CmdSN order within the window
//! the target grants (ExpCmdSN..MaxCmdSN), answered by Data-In / SCSI Response PDUs that
//! a single reader task routes by tag, with R2T-driven Data-Out for writes.
//!
//! Sending: small PDUs (commands without data or with up to 16 KiB of it, NOP-Outs) are
//! encoded into one send queue under a lock that also hands out CmdSNs, so the wire order
//! is the CmdSN order; whoever finds the queue idle writes it out, picking up what others
//! queue meanwhile (commands that arrive together leave in one write). Larger PDUs take
//! the socket, write what was queued before them, then their data from the caller's
//! buffer.
//!
//! Buffers: a READ's Data-In goes from the socket straight into the caller's [`IoBuf`]
//! (through a small read-ahead buffer for headers). The reader may write into a
//! command's buffer for as long as the command is in the task table. A caller leaves
//! [`Session::execute`] only once the reader completed its command (and so is done with
//! the buffer) or the reader task has ended.
//!
//! A command past its deadline is aborted (Task Management: ABORT TASK). The target
//! answers only once it has sent everything it will send for the task, and the reader,
//! handling that answer, drops the task from the table before it reads anything else:
//! from then on nothing writes into the task's buffer, the caller returns, and the
//! connection and every other command on it carry on. Only when the target does not
//! answer the abort in time does the caller shut the socket down and wait for the reader
//! to end (the connection is then lost, its other commands re-sent on a new one).

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use raidcore::IoBuf;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;

use events::EventTx;
use tokio::time::Instant;

mod events;
mod reader;

use super::login::{LoggedIn, Negotiated, Peer, OUR_MAX_RECV};
use super::pdu::{self, Bhs, Digests, RESERVED_TAG};
use super::scsi::{Cdb, Sense};

/// Read-ahead for PDU headers and small segments; larger Data-In segments bypass it.
const READ_AHEAD: usize = 64 << 10;
/// SCSI Response data (sense) beyond this is a protocol violation.
const MAX_RESPONSE_DATA: u32 = OUR_MAX_RECV;

/// PDUs with more data than this are written straight from the caller's buffer; smaller
/// ones are copied into the send queue and leave with their neighbours.
const INLINE_MAX: u32 = 16 << 10;

/// How often deadlines of commands in flight are checked: how late a timeout may fire.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest a timed-out command waits for its ABORT TASK to be answered before the
/// connection is reset instead; a command given less time than this to run waits only
/// as long again (a member that times out quickly should fail over quickly).
const ABORT_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Task Management function ABORT TASK, and the answers that mean the task is gone.
const TMF_ABORT_TASK: u8 = 1;
const TMF_FUNCTION_COMPLETE: u8 = 0;
const TMF_NO_SUCH_TASK: u8 = 1;

/// Why a command could not be sent.
enum SendError {
    /// The deadline passed while the target's window stayed closed.
    Late,
    /// The connection is gone (why).
    Dead(String),
}

impl From<String> for SendError {
    fn from(why: String) -> Self {
        SendError::Dead(why)
    }
}

/// One SCSI command to run.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    pub cdb: Cdb,
    /// Data the target sends us (READ, INQUIRY...): its length is the expected transfer.
    pub data_in: Option<IoBuf>,
    /// Data we send (WRITE, UNMAP parameter list...).
    pub data_out: Option<IoBuf>,
}

impl Command {
    pub fn none(cdb: Cdb) -> Self {
        Command {
            cdb,
            data_in: None,
            data_out: None,
        }
    }

    fn expected_len(&self) -> u32 {
        let n = self.data_in.map_or(0, |b| b.len()) + self.data_out.map_or(0, |b| b.len());
        n as u32
    }
}

/// How a command ended, as the target reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub sense: Option<Sense>,
    /// Bytes the target did not transfer (underflow) or could not (overflow, negative).
    pub residual: i64,
}

/// What [`Session::execute`] gives back.
#[derive(Debug)]
pub enum Outcome {
    Done(Completion),
    /// The connection died before the command completed: it may be sent again on a new
    /// session (the text says why the connection died).
    Lost(String),
    /// The deadline passed; the connection was shut down to get the buffer back.
    TimedOut,
    /// The target rejected the PDU or sent something that makes no sense for it.
    Failed(String),
}

enum Event {
    /// Send `len` bytes from `offset` of the command's data, under transfer tag `ttt`.
    R2t {
        ttt: u32,
        offset: u32,
        len: u32,
    },
    Done(Completion),
    Rejected(String),
    /// The sweeper found the command past its deadline.
    Expired,
}

struct Pending {
    /// Checked by the sweeper (one timer per session, not one per command).
    deadline: Instant,
    /// How long past the deadline an abort may take before the sweeper resets the
    /// connection (zero for PDUs that are not aborted: pings, logouts, aborts).
    grace: std::time::Duration,
    /// Whether the sweeper has told the caller its deadline passed.
    expired: bool,
    data_in: Option<IoBuf>,
    /// Data-In bytes received so far (in order: DataPDUInOrder=Yes).
    received: u64,
    /// The CmdSN the command was sent with (what an ABORT TASK refers to).
    cmd_sn: u32,
    /// For an ABORT TASK request: the task tag it aborts.
    aborts: Option<u32>,
    events: EventTx,
}

impl Pending {
    fn new(deadline: Instant, data_in: Option<IoBuf>, events: EventTx) -> Self {
        Pending {
            deadline,
            grace: std::time::Duration::ZERO,
            expired: false,
            data_in,
            received: 0,
            cmd_sn: 0,
            aborts: None,
            events,
        }
    }
}

/// Sequence numbers the reader learns from the target.
struct Window {
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
}

/// The socket's sending side, held by whoever writes: the flusher of the queue, or a
/// sender of a large PDU straight from its buffer.
struct Writer {
    w: OwnedWriteHalf,
}

/// Small PDUs waiting to be written, in CmdSN order. Whoever queues into an idle queue
/// becomes its flusher and writes everything queued (its own and what others add
/// meanwhile) in as few writes as it can; the others return at once. `flushing` is only
/// cleared under the lock after the queue was seen empty, so nothing queued is stranded.
struct Tx {
    buf: Vec<u8>,
    flushing: bool,
    /// The CmdSN the next non-immediate command takes.
    cmd_sn: u32,
}

/// The plug's doorbell: commands queued under the plug go out in one write; what the
/// socket does not take at once, a task writes.
impl raidcore::plug::Doorbell for Session {
    fn ring(self: Arc<Self>) {
        if self.flush_now() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // A failed write has killed the session: its commands end Lost.
                    let _ = self.flush().await;
                });
            }
            Err(_) => {
                self.lock_tx().flushing = false;
                self.kill("no runtime to finish sending on");
            }
        }
    }
}

/// A logged-in connection.
pub struct Session {
    peer: Peer,
    lun: u16,
    pub neg: Negotiated,
    pub alias: Option<String>,
    writer: tokio::sync::Mutex<Writer>,
    tx: Mutex<Tx>,
    /// A duplicate of the socket, only to shut it down from anywhere.
    killer: socket2::Socket,
    table: Mutex<HashMap<u32, Pending>>,
    window: watch::Sender<Window>,
    exp_stat_sn: AtomicU32,
    next_itt: AtomicU32,
    /// Why the connection ended (None while it is up).
    dead: watch::Sender<Option<String>>,
    /// Set once the reader task has ended and dropped every command.
    reader_done: watch::Sender<bool>,
    commands: AtomicU64,
    /// Timed-out commands settled by ABORT TASK, the connection staying up: aborted, or
    /// finished by the target before the abort reached them.
    aborts: AtomicU64,
    me: Weak<Session>,
}

impl Session {
    /// Take over a logged-in connection and start its reader task.
    pub fn start(l: LoggedIn, peer: Peer, lun: u16) -> std::io::Result<Arc<Session>> {
        let killer = socket2::SockRef::from(&l.stream).try_clone()?;
        let (r, w) = l.stream.into_split();
        let s = Arc::new_cyclic(|me| Session {
            me: me.clone(),
            peer,
            lun,
            neg: l.neg,
            alias: l.alias,
            writer: tokio::sync::Mutex::new(Writer { w }),
            tx: Mutex::new(Tx {
                buf: Vec::with_capacity(64 << 10),
                flushing: false,
                cmd_sn: l.neg.cmd_sn,
            }),
            killer,
            table: Mutex::new(HashMap::new()),
            window: watch::channel(Window {
                exp_cmd_sn: l.neg.cmd_sn,
                max_cmd_sn: l.neg.max_cmd_sn,
            })
            .0,
            exp_stat_sn: AtomicU32::new(l.neg.exp_stat_sn),
            next_itt: AtomicU32::new(1),
            dead: watch::channel(None).0,
            reader_done: watch::channel(false).0,
            commands: AtomicU64::new(0),
            aborts: AtomicU64::new(0),
        });
        tokio::spawn(s.clone().reader(BufReader::with_capacity(READ_AHEAD, r)));
        tokio::spawn(Session::sweep(Arc::downgrade(&s)));
        Ok(s)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.borrow().is_some()
    }

    /// Why the connection ended, once it has.
    pub fn death(&self) -> Option<String> {
        self.dead.borrow().clone()
    }

    /// Commands in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock_table().len()
    }

    /// Commands sent since login.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    /// Timed-out commands settled by ABORT TASK since login (the connection kept).
    pub fn aborts(&self) -> u64 {
        self.aborts.load(Ordering::Relaxed)
    }

    /// Wait until the reader has ended (the connection is gone and no buffer is in use).
    pub async fn closed(&self) {
        let mut rx = self.reader_done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// End the connection: shut the socket down so the reader ends and every waiter
    /// learns it. The first reason given is the one kept.
    pub fn kill(&self, why: &str) {
        self.dead.send_if_modified(|d| {
            if d.is_none() {
                *d = Some(why.to_string());
                true
            } else {
                false
            }
        });
        let _ = self.killer.shutdown(std::net::Shutdown::Both);
    }

    fn lock_table(&self) -> MutexGuard<'_, HashMap<u32, Pending>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_itt(&self) -> u32 {
        loop {
            let t = self.next_itt.fetch_add(1, Ordering::Relaxed);
            if t != RESERVED_TAG && !self.lock_table().contains_key(&t) {
                return t;
            }
        }
    }

    /// Run one command until the target completes it, the connection dies or the
    /// deadline passes (then the command is aborted). Never returns while the reader may
    /// still touch `cmd`'s buffers.
    pub async fn execute(&self, cmd: &Command, deadline: Instant) -> Outcome {
        let itt = self.new_itt();
        let (tx, mut rx) = events::channel();
        let r = self.execute_inner(cmd, itt, tx, &mut rx, deadline).await;
        if matches!(r, Outcome::Done(_)) {
            return r;
        }
        if matches!(r, Outcome::TimedOut) {
            // Out of the task table, the reader is done with the task (it completed, or
            // was never sent); in it, the target still has it: ask it to let go.
            let sent = self.lock_table().contains_key(&itt);
            if !sent || self.abort(itt).await {
                if sent {
                    self.aborts.fetch_add(1, Ordering::Relaxed);
                }
                // The task may have completed just before the abort reached the target.
                while let Some(ev) = rx.try_recv() {
                    if let Event::Done(c) = ev {
                        return Outcome::Done(c);
                    }
                }
                return Outcome::TimedOut;
            }
        }
        // Whatever went wrong, the reader must be finished with our buffer first.
        if matches!(r, Outcome::TimedOut) {
            self.kill(&format!(
                "{} got no answer in time, nor did its abort",
                super::scsi::command_name(&cmd.cdb)
            ));
        } else {
            self.kill("a command failed on this connection");
        }
        self.closed().await;
        r
    }

    async fn execute_inner(
        &self,
        cmd: &Command,
        itt: u32,
        tx: EventTx,
        rx: &mut events::EventRx,
        deadline: Instant,
    ) -> Outcome {
        // No timer here: once registered, the sweeper enforces the deadline.
        match self.send_command(cmd, itt, tx, deadline).await {
            Err(SendError::Late) => return Outcome::TimedOut,
            // The sweeper ends the connection of a command past its deadline.
            Err(SendError::Dead(_)) if Instant::now() >= deadline => return Outcome::TimedOut,
            Err(SendError::Dead(why)) => return Outcome::Lost(why),
            Ok(()) => {}
        }
        loop {
            let Some(ev) = rx.recv().await else {
                return Outcome::Lost(self.death().unwrap_or_default());
            };
            match ev {
                Event::Done(c) => return Outcome::Done(c),
                Event::Rejected(why) => return Outcome::Failed(why),
                Event::Expired => return Outcome::TimedOut,
                Event::R2t { ttt, offset, len } => {
                    let Some(out) = cmd.data_out else {
                        return Outcome::Failed("an R2T for a command with no data to send".into());
                    };
                    if let Err(why) = self.send_data_out(itt, ttt, out, offset, len).await {
                        if Instant::now() >= deadline {
                            return Outcome::TimedOut;
                        }
                        return Outcome::Lost(why);
                    }
                }
            }
        }
    }

    /// ABORT TASK for task `itt`, waiting for the answer as long as the task's grace.
    /// True once the target said the task is gone (aborted, or already finished) and the
    /// reader has dropped it: nothing will touch its buffers any more.
    async fn abort(&self, itt: u32) -> bool {
        let (ref_cmd_sn, grace) = match self.lock_table().get(&itt) {
            Some(p) => (p.cmd_sn, p.grace),
            // Completed meanwhile.
            None => return true,
        };
        let deadline = Instant::now() + grace;
        let (tmf, mut answer) = self.expect_answer(deadline);
        if let Some(p) = self.lock_table().get_mut(&tmf) {
            p.aborts = Some(itt);
        }
        let mut b = Bhs::new(pdu::OP_TMF_REQ);
        b.set_immediate();
        b.set_flags(pdu::F_FINAL | TMF_ABORT_TASK);
        b.set_lun(self.lun);
        b.set_itt(tmf);
        b.set_u32(20, itt);
        b.set_u32(32, ref_cmd_sn);
        let answered = match self.send_immediate(b).await {
            Err(_) => None,
            Ok(()) => match tokio::time::timeout_at(deadline, answer.recv()).await {
                Ok(Some(Event::Done(c))) => Some(c.status),
                _ => None,
            },
        };
        self.lock_table().remove(&tmf);
        match answered {
            Some(TMF_FUNCTION_COMPLETE | TMF_NO_SUCH_TASK) => {
                // The reader removed the task when it read the answer.
                !self.lock_table().contains_key(&itt)
            }
            Some(other) => {
                tracing::debug!(target_iqn = %self.peer.target, response = other, "the target refused ABORT TASK");
                false
            }
            None => false,
        }
    }

    /// Wait for room in the command window, register the command and send it (with
    /// immediate and unsolicited data as negotiated), all in CmdSN order: small ones
    /// through the send queue, large ones straight from their buffer.
    async fn send_command(
        &self,
        cmd: &Command,
        itt: u32,
        events: EventTx,
        deadline: Instant,
    ) -> Result<(), SendError> {
        let (immediate, unsolicited) = self.unsolicited(cmd);
        let mut b = Bhs::new(pdu::OP_SCSI_CMD);
        let mut flags = pdu::ATTR_SIMPLE;
        if cmd.data_in.is_some() {
            flags |= pdu::F_READ;
        }
        if cmd.data_out.is_some() {
            flags |= pdu::F_WRITE;
        }
        if unsolicited == immediate {
            flags |= pdu::F_FINAL;
        }
        b.set_flags(flags);
        b.set_lun(self.lun);
        b.set_itt(itt);
        b.set_u32(20, cmd.expected_len());
        b.0[32..48].copy_from_slice(&cmd.cdb);
        let out = cmd.data_out.unwrap_or(IoBuf::empty());
        // SAFETY: the issuer keeps the buffer alive until execute returns (IoBuf rules).
        let data = unsafe { out.as_slice() };
        let mut pending = Pending::new(deadline, cmd.data_in, events);
        pending.grace = deadline
            .saturating_duration_since(Instant::now())
            .min(ABORT_WAIT_MAX);
        let first = &data[..immediate as usize];
        if immediate <= INLINE_MAX && unsolicited == immediate {
            return self.queue_command(b, first, itt, pending, deadline).await;
        }
        // Large: hold the wire, take a CmdSN, write what is queued before it, then ours.
        let mut pending = Some(pending);
        let (mut w, queued) = loop {
            let w = self.writer.lock().await;
            match self.take_cmd_sn(&mut b, itt, &mut pending)? {
                Some(queued) => break (w, queued),
                None => {
                    drop(w);
                    self.wait_window(deadline).await?;
                }
            }
        };
        let d = self.neg.digests;
        self.write_raw(&mut w.w, &queued).await?;
        self.write_pdu(&mut w.w, &mut b, first, d).await?;
        if unsolicited > immediate {
            // InitialR2T=No: the rest of the first burst goes out without waiting.
            let rest = unsolicited - immediate;
            self.write_data_out(&mut w.w, itt, RESERVED_TAG, data, immediate, rest)
                .await?;
        }
        Ok(())
    }

    /// Queue a small command once the window has room; flush if the queue was idle.
    async fn queue_command(
        &self,
        mut b: Bhs,
        data: &[u8],
        itt: u32,
        pending: Pending,
        deadline: Instant,
    ) -> Result<(), SendError> {
        let mut pending = Some(pending);
        loop {
            let lead = {
                let mut tx = self.lock_tx();
                if let Some(why) = self.death() {
                    return Err(SendError::Dead(why));
                }
                if !pdu::sn_le(tx.cmd_sn, self.window.borrow().max_cmd_sn) {
                    None
                } else {
                    b.set_u32(24, tx.cmd_sn);
                    b.set_u32(28, self.exp_stat_sn.load(Ordering::Acquire));
                    if let Some(mut p) = pending.take() {
                        p.cmd_sn = tx.cmd_sn;
                        self.lock_table().insert(itt, p);
                    }
                    tx.cmd_sn = tx.cmd_sn.wrapping_add(1);
                    self.commands.fetch_add(1, Ordering::Relaxed);
                    push_pdu(&mut tx.buf, &mut b, data, self.neg.digests);
                    Some(!std::mem::replace(&mut tx.flushing, true))
                }
            };
            match lead {
                // Under a plug, the queue is written once the plug goes (Doorbell below).
                Some(true)
                    if self
                        .me
                        .upgrade()
                        .is_some_and(|me| raidcore::plug::defer(&me)) =>
                {
                    return Ok(())
                }
                Some(true) => return Ok(self.flush().await?),
                Some(false) => return Ok(()),
                None => self.wait_window(deadline).await?,
            }
        }
    }

    /// Under the queue lock: if the window has room, give `b` the next CmdSN, register
    /// the command and hand back what was queued before it (to be written first).
    fn take_cmd_sn(
        &self,
        b: &mut Bhs,
        itt: u32,
        pending: &mut Option<Pending>,
    ) -> Result<Option<Vec<u8>>, SendError> {
        let mut tx = self.lock_tx();
        if let Some(why) = self.death() {
            return Err(SendError::Dead(why));
        }
        if !pdu::sn_le(tx.cmd_sn, self.window.borrow().max_cmd_sn) {
            return Ok(None);
        }
        b.set_u32(24, tx.cmd_sn);
        b.set_u32(28, self.exp_stat_sn.load(Ordering::Acquire));
        if let Some(mut p) = pending.take() {
            p.cmd_sn = tx.cmd_sn;
            self.lock_table().insert(itt, p);
        }
        tx.cmd_sn = tx.cmd_sn.wrapping_add(1);
        self.commands.fetch_add(1, Ordering::Relaxed);
        Ok(Some(std::mem::take(&mut tx.buf)))
    }

    /// Write out the queue until it is empty, then give up the flusher role.
    async fn flush(&self) -> Result<(), String> {
        let mut w = self.writer.lock().await;
        let mut local = Vec::new();
        loop {
            {
                let mut tx = self.lock_tx();
                if tx.buf.is_empty() {
                    tx.flushing = false;
                    if tx.buf.capacity() < local.capacity() {
                        // Keep the larger allocation for next time.
                        tx.buf = local;
                    }
                    return Ok(());
                }
                std::mem::swap(&mut tx.buf, &mut local);
            }
            let r = self.write_raw(&mut w.w, &local).await;
            local.clear();
            if let Err(e) = r {
                self.lock_tx().flushing = false;
                return Err(e);
            }
        }
    }

    /// As the flusher (a command deferred under a plug): write the queue without
    /// waiting. False when the socket (or the writer lock) is busy: the flusher role is
    /// still held, for `flush` to finish the job.
    fn flush_now(&self) -> bool {
        let Ok(w) = self.writer.try_lock() else {
            return false;
        };
        loop {
            let local = {
                let mut tx = self.lock_tx();
                if tx.buf.is_empty() {
                    tx.flushing = false;
                    return true;
                }
                std::mem::take(&mut tx.buf)
            };
            let written = match w.w.try_write(&local) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    self.lock_tx().flushing = false;
                    self.kill(&format!("cannot send to the target: {e}"));
                    return true;
                }
            };
            let mut tx = self.lock_tx();
            if written < local.len() {
                // Back in front of whatever was queued since, in CmdSN order.
                let mut rest = local[written..].to_vec();
                rest.extend_from_slice(&tx.buf);
                tx.buf = rest;
                return false;
            }
            if tx.buf.is_empty() && tx.buf.capacity() < local.capacity() {
                let mut local = local;
                local.clear();
                tx.buf = local;
            }
        }
    }

    fn lock_tx(&self) -> MutexGuard<'_, Tx> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until the target's window moves (or the connection dies), until `deadline`.
    async fn wait_window(&self, deadline: Instant) -> Result<(), SendError> {
        let mut win = self.window.subscribe();
        let mut dead = self.dead.subscribe();
        let max = self.window.borrow().max_cmd_sn;
        let cmd_sn = self.lock_tx().cmd_sn;
        if pdu::sn_le(cmd_sn, max) {
            return Ok(());
        }
        let wait = async {
            tokio::select! {
                _ = win.changed() => {}
                _ = dead.changed() => {}
            }
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(()) => Ok(()),
            Err(_) => Err(SendError::Late),
        }
    }

    /// (bytes sent as immediate data, bytes sent without an R2T in all).
    fn unsolicited(&self, cmd: &Command) -> (u32, u32) {
        let Some(out) = cmd.data_out else {
            return (0, 0);
        };
        let len = out.len() as u32;
        let n = &self.neg;
        let burst = len.min(n.first_burst);
        let immediate = if n.immediate_data {
            burst.min(n.max_send_segment)
        } else {
            0
        };
        let unsolicited = if n.initial_r2t { immediate } else { burst };
        (immediate, unsolicited)
    }

    async fn send_data_out(
        &self,
        itt: u32,
        ttt: u32,
        out: IoBuf,
        offset: u32,
        len: u32,
    ) -> Result<(), String> {
        if u64::from(offset) + u64::from(len) > out.len() as u64 {
            self.kill("R2T beyond the command's data");
            return Err(format!(
                "the target asked for {len} bytes at offset {offset} of a {}-byte write",
                out.len()
            ));
        }
        let mut w = self.writer.lock().await;
        // SAFETY: as in send_command.
        let data = unsafe { out.as_slice() };
        self.write_data_out(&mut w.w, itt, ttt, data, offset, len)
            .await
    }

    /// Data-Out PDUs of at most the target's segment size for `[offset, offset+len)`.
    async fn write_data_out(
        &self,
        w: &mut OwnedWriteHalf,
        itt: u32,
        ttt: u32,
        data: &[u8],
        offset: u32,
        len: u32,
    ) -> Result<(), String> {
        let seg = self.neg.max_send_segment;
        let mut done = 0u32;
        let mut data_sn = 0u32;
        while done < len {
            let n = seg.min(len - done);
            let at = offset + done;
            let mut b = Bhs::new(pdu::OP_DATA_OUT);
            b.set_flags(if done + n == len { pdu::F_FINAL } else { 0 });
            b.set_lun(self.lun);
            b.set_itt(itt);
            b.set_u32(20, ttt);
            b.set_u32(28, self.exp_stat_sn.load(Ordering::Acquire));
            b.set_u32(36, data_sn);
            b.set_u32(40, at);
            let part = &data[at as usize..(at + n) as usize];
            self.write_pdu(w, &mut b, part, self.neg.digests).await?;
            done += n;
            data_sn += 1;
        }
        Ok(())
    }

    async fn write_pdu(
        &self,
        w: &mut OwnedWriteHalf,
        b: &mut Bhs,
        data: &[u8],
        d: Digests,
    ) -> Result<(), String> {
        b.set_data_len(data.len() as u32);
        let (h, hn) = pdu::header_bytes(b, d);
        let (t, tn) = pdu::trailer(data, d);
        write_all_vectored(w, &[&h[..hn], data, &t[..tn]])
            .await
            .map_err(|e| {
                let why = format!("cannot send to the target: {e}");
                self.kill(&why);
                why
            })
    }

    async fn write_raw(&self, w: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        w.write_all(bytes).await.map_err(|e| {
            let why = format!("cannot send to the target: {e}");
            self.kill(&why);
            why
        })
    }

    /// A fresh task tag registered for a data-less answer (NOP-In, Logout Response) due by
    /// `deadline`; the receiver gets the answer, or Expired from the sweeper.
    fn expect_answer(&self, deadline: Instant) -> (u32, events::EventRx) {
        let itt = self.new_itt();
        let (tx, rx) = events::channel();
        self.lock_table()
            .insert(itt, Pending::new(deadline, None, tx));
        (itt, rx)
    }

    /// NOP-Out ping; Ok once the target's NOP-In answers it.
    pub async fn ping(&self, deadline: Instant) -> Result<(), String> {
        let (itt, mut rx) = self.expect_answer(deadline);
        let mut b = Bhs::new(pdu::OP_NOP_OUT);
        b.set_immediate();
        b.set_flags(pdu::F_FINAL);
        b.set_itt(itt);
        b.set_u32(20, RESERVED_TAG);
        // Not cut short by a timer (the queue's flusher must finish): past the deadline the
        // sweeper ends the connection, which ends this too.
        let r = match self.send_immediate(b).await {
            Err(e) => Err(e),
            Ok(()) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => Err("no NOP-In answered our NOP-Out in time".to_string()),
                Ok(None) => Err(self.death().unwrap_or_default()),
                Ok(Some(Event::Expired)) => Err("no NOP-In answered our NOP-Out in time".into()),
                Ok(Some(_)) => Ok(()),
            },
        };
        self.lock_table().remove(&itt);
        r
    }

    /// Send an immediate PDU (NOP-Out, Logout, Task Management): it carries the current CmdSN without
    /// taking it.
    async fn send_immediate(&self, mut b: Bhs) -> Result<(), String> {
        let lead = {
            let mut tx = self.lock_tx();
            if let Some(why) = self.death() {
                return Err(why);
            }
            b.set_u32(24, tx.cmd_sn);
            b.set_u32(28, self.exp_stat_sn.load(Ordering::Acquire));
            push_pdu(&mut tx.buf, &mut b, &[], self.neg.digests);
            !std::mem::replace(&mut tx.flushing, true)
        };
        if lead {
            self.flush().await?;
        }
        Ok(())
    }

    /// Send a Logout request now, without waiting, if nothing else is being written (a
    /// PDU must not land in the middle of another): for a member closing while the
    /// process may be about to exit. Returns whether it was sent.
    pub fn logout_now(&self) -> bool {
        use std::io::Write;
        if self.is_dead() {
            return false;
        }
        let Ok(_wire) = self.writer.try_lock() else {
            return false;
        };
        let tx = self.lock_tx();
        if tx.flushing || !tx.buf.is_empty() {
            return false;
        }
        let mut b = Bhs::new(pdu::OP_LOGOUT_REQ);
        b.set_immediate();
        b.set_flags(pdu::F_FINAL); // reason 0: close the session
        b.set_itt(self.new_itt());
        b.set_u32(24, tx.cmd_sn);
        b.set_u32(28, self.exp_stat_sn.load(Ordering::Acquire));
        let bytes = pdu::encode(&b, &[], self.neg.digests);
        // The socket is non-blocking: 48 bytes fit an idle send buffer, or we give up.
        matches!((&self.killer).write(&bytes), Ok(n) if n == bytes.len())
    }

    /// Log out (close the session) and end the connection, waiting at most until
    /// `deadline` for the target's answer.
    pub async fn logout(&self, deadline: Instant) {
        if self.is_dead() {
            return;
        }
        let (itt, mut rx) = self.expect_answer(deadline);
        let mut b = Bhs::new(pdu::OP_LOGOUT_REQ);
        b.set_immediate();
        b.set_flags(pdu::F_FINAL); // reason 0: close the session
        b.set_itt(itt);
        if self.send_immediate(b).await.is_ok() {
            let _ = tokio::time::timeout_at(deadline, rx.recv()).await;
        }
        self.kill("logged out");
        self.closed().await;
    }

    /// Every [`SWEEP_EVERY`], tell commands past their deadline so (their callers then
    /// abort them), and end the connection when one is still there past its deadline and
    /// grace (its abort went unanswered, or its caller is stuck writing to a target that
    /// stopped reading). Ends with the session.
    async fn sweep(me: Weak<Session>) {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let Some(s) = me.upgrade() else { return };
            if s.is_dead() {
                return;
            }
            let now = Instant::now();
            let mut overdue = 0;
            for p in s.lock_table().values_mut().filter(|p| p.deadline <= now) {
                if !p.expired {
                    p.expired = true;
                    p.events.send(Event::Expired);
                }
                // Two sweeps late, so that an abort's own wait ends first.
                if p.deadline + p.grace + 2 * SWEEP_EVERY <= now {
                    overdue += 1;
                }
            }
            if overdue > 0 {
                s.kill(&format!(
                    "{overdue} command(s) got no answer in time, nor did their aborts"
                ));
            }
        }
    }
}

/// Append one whole PDU (header, data, padding, digests) to a send queue.
fn push_pdu(buf: &mut Vec<u8>, b: &mut Bhs, data: &[u8], d: Digests) {
    b.set_data_len(data.len() as u32);
    let (h, hn) = pdu::header_bytes(b, d);
    let (t, tn) = pdu::trailer(data, d);
    buf.extend_from_slice(&h[..hn]);
    buf.extend_from_slice(data);
    buf.extend_from_slice(&t[..tn]);
}

/// `write_all` over several slices, in as few syscalls as the socket takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        if parts[idx].len() == off {
            idx += 1;
            off = 0;
            continue;
        }
        let mut slices = Vec::with_capacity(parts.len() - idx);
        slices.push(IoSlice::new(&parts[idx][off..]));
        slices.extend(parts[idx + 1..].iter().map(|p| IoSlice::new(p)));
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}
