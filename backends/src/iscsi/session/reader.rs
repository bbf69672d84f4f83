//! The receiving side of a session: one reader task per connection reads every PDU
//! the target sends, routes Data-In straight into the waiting command's buffer,
//! completes commands on SCSI Response / final Data-In, forwards R2Ts to their command,
//! answers the target's NOP-In pings and ends the connection on anything it cannot
//! accept.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::BufReader;
use tokio::net::tcp::OwnedReadHalf;

use super::super::login::OUR_MAX_RECV;
use super::super::pdu::{self, Bhs, ReadError, RESERVED_TAG};
use super::super::scsi::Sense;
use super::{
    Completion, Event, Pending, Session, MAX_RESPONSE_DATA, TMF_FUNCTION_COMPLETE, TMF_NO_SUCH_TASK,
};

impl Session {
    /// The reader task: PDUs until the connection fails or is killed; then every
    /// command still registered is dropped (its caller sees Lost) and `closed()` fires.
    pub(super) async fn reader(self: Arc<Self>, mut r: BufReader<OwnedReadHalf>) {
        let why = loop {
            match self.read_one(&mut r).await {
                Ok(()) => {}
                Err(e) => break e.to_string(),
            }
        };
        self.kill(&why);
        // Dropping the entries closes every waiter's channel: they see Lost.
        let orphans: Vec<Pending> = self.lock_table().drain().map(|(_, p)| p).collect();
        drop(orphans);
        self.reader_done.send_replace(true);
        tracing::debug!(target_iqn = %self.peer.target, portal = %self.peer.portal, reason = %why, "iSCSI connection reader ended");
    }

    async fn read_one(&self, r: &mut BufReader<OwnedReadHalf>) -> Result<(), ReadError> {
        let d = self.neg.digests;
        let h = pdu::read_bhs(r, d).await?;
        self.note_window(&h);
        match h.opcode() {
            pdu::OP_DATA_IN => self.on_data_in(r, &h).await,
            pdu::OP_SCSI_RSP => {
                self.note_stat_sn(&h);
                let data = pdu::read_data(r, h.data_len(), MAX_RESPONSE_DATA, d).await?;
                self.on_response(&h, &data);
                Ok(())
            }
            pdu::OP_R2T => {
                pdu::skip_data(r, h.data_len(), d).await?;
                self.on_r2t(&h);
                Ok(())
            }
            pdu::OP_NOP_IN => {
                pdu::skip_data(r, h.data_len(), d).await?;
                self.on_nop_in(&h);
                Ok(())
            }
            pdu::OP_TMF_RSP => {
                self.note_stat_sn(&h);
                pdu::skip_data(r, h.data_len(), d).await?;
                self.on_tmf_response(&h);
                Ok(())
            }
            pdu::OP_LOGOUT_RSP | pdu::OP_TEXT_RSP => {
                self.note_stat_sn(&h);
                pdu::skip_data(r, h.data_len(), d).await?;
                self.complete(h.itt(), 0, None, 0);
                Ok(())
            }
            pdu::OP_REJECT => {
                self.note_stat_sn(&h);
                let data = pdu::read_data(r, h.data_len(), MAX_RESPONSE_DATA, d).await?;
                self.on_reject(&h, &data);
                Ok(())
            }
            pdu::OP_ASYNC => {
                self.note_stat_sn(&h);
                pdu::skip_data(r, h.data_len(), d).await?;
                self.on_async(&h)
            }
            op => Err(ReadError::Protocol(format!(
                "unexpected {} (opcode {op:#04x}) in the full-feature phase",
                pdu::opcode_name(op)
            ))),
        }
    }

    /// ExpCmdSN/MaxCmdSN, taken when newer and sane (RFC 7143 §4.2.2.1).
    fn note_window(&self, h: &Bhs) {
        let (exp, max) = (h.exp_cmd_sn(), h.max_cmd_sn());
        if pdu::sn_lt(max, exp.wrapping_sub(1)) {
            return;
        }
        self.window.send_if_modified(|w| {
            let mut changed = false;
            if pdu::sn_lt(w.exp_cmd_sn, exp) {
                w.exp_cmd_sn = exp;
                changed = true;
            }
            if pdu::sn_lt(w.max_cmd_sn, max) {
                w.max_cmd_sn = max;
                changed = true;
            }
            changed
        });
    }

    fn note_stat_sn(&self, h: &Bhs) {
        let next = h.stat_sn().wrapping_add(1);
        let _ = self
            .exp_stat_sn
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                pdu::sn_lt(cur, next).then_some(next)
            });
    }

    async fn on_data_in(&self, r: &mut BufReader<OwnedReadHalf>, h: &Bhs) -> Result<(), ReadError> {
        let d = self.neg.digests;
        let (len, offset, itt) = (h.data_len(), h.u32_at(40), h.itt());
        if len > OUR_MAX_RECV {
            return Err(ReadError::Protocol(format!(
                "a {len}-byte Data-In exceeds our MaxRecvDataSegmentLength {OUR_MAX_RECV}"
            )));
        }
        let buf = self.lock_table().get(&itt).map(|p| p.data_in);
        match buf {
            None => pdu::skip_data(r, len, d).await?,
            Some(None) => {
                return Err(ReadError::Protocol(format!(
                    "Data-In for task {itt:#x}, which expects no data"
                )))
            }
            Some(Some(buf)) => {
                let end = u64::from(offset) + u64::from(len);
                if end > buf.len() as u64 {
                    return Err(ReadError::Protocol(format!(
                        "Data-In of {len} bytes at offset {offset} overruns the {}-byte buffer of task {itt:#x}",
                        buf.len()
                    )));
                }
                // SAFETY: the command is registered, so its issuer is still waiting in
                // execute and keeps the buffer alive (see the module docs).
                let into = unsafe { &mut buf.as_mut_slice()[offset as usize..end as usize] };
                pdu::read_data_into(r, into, d).await?;
                if let Some(p) = self.lock_table().get_mut(&itt) {
                    p.received = p.received.max(end);
                }
            }
        }
        if h.flags() & pdu::F_STATUS != 0 {
            self.note_stat_sn(h);
            let residual = residual(h);
            self.complete(itt, h.byte(3), None, residual);
        }
        Ok(())
    }

    fn on_response(&self, h: &Bhs, data: &[u8]) {
        // Byte 2 is the iSCSI response: non-zero means the target failed the command
        // before SCSI status applied.
        if h.byte(2) != 0 {
            self.reject(
                h.itt(),
                format!("iSCSI response {:#04x} (target failure)", h.byte(2)),
            );
            return;
        }
        let sense = if data.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
            Sense::parse(&data[2..(2 + n).min(data.len())])
        } else {
            None
        };
        self.complete(h.itt(), h.byte(3), sense, residual(h));
    }

    /// The answer to an ABORT TASK. When it says the task is gone, the target has sent
    /// all it will for it: the task leaves the table here, before the next PDU is read,
    /// so nothing can be written into its buffer once its caller is told.
    fn on_tmf_response(&self, h: &Bhs) {
        let response = h.byte(2);
        {
            let mut table = self.lock_table();
            let aborted = table.get(&h.itt()).and_then(|p| p.aborts);
            if let Some(task) = aborted {
                if matches!(response, TMF_FUNCTION_COMPLETE | TMF_NO_SUCH_TASK) {
                    table.remove(&task);
                }
            }
        }
        self.complete(h.itt(), response, None, 0);
    }

    fn on_r2t(&self, h: &Bhs) {
        let ev = Event::R2t {
            ttt: h.ttt(),
            offset: h.u32_at(40),
            len: h.u32_at(44),
        };
        if let Some(p) = self.lock_table().get(&h.itt()) {
            p.events.send(ev);
        }
    }

    fn on_nop_in(&self, h: &Bhs) {
        if h.itt() != RESERVED_TAG {
            self.note_stat_sn(h);
            self.complete(h.itt(), 0, None, 0);
        }
        if h.ttt() != RESERVED_TAG {
            // The target pings us: answer with its transfer tag, as an immediate
            // NOP-Out, from a task so the reader never waits for the writer.
            let mut b = Bhs::new(pdu::OP_NOP_OUT);
            b.set_immediate();
            b.set_flags(pdu::F_FINAL);
            b.set_itt(RESERVED_TAG);
            b.set_u32(20, h.ttt());
            b.0[8..16].copy_from_slice(&h.0[8..16]);
            if let Some(me) = self.self_arc() {
                tokio::spawn(async move {
                    let _ = me.send_immediate(b).await;
                });
            }
        }
    }

    fn on_reject(&self, h: &Bhs, data: &[u8]) {
        let reason = h.byte(2);
        if data.len() >= pdu::BHS_LEN {
            let mut rejected = Bhs([0; pdu::BHS_LEN]);
            rejected.0.copy_from_slice(&data[..pdu::BHS_LEN]);
            self.reject(
                rejected.itt(),
                format!(
                    "the target rejected our {} (reason {reason:#04x})",
                    pdu::opcode_name(rejected.opcode())
                ),
            );
        }
    }

    /// Asynchronous messages: the ones that end the connection end it now (we reconnect
    /// at once instead of waiting for the target to drop us).
    fn on_async(&self, h: &Bhs) -> Result<(), ReadError> {
        match h.byte(36) {
            1 => Err(ReadError::Protocol("the target asked us to log out".into())),
            2 | 3 => Err(ReadError::Protocol(
                "the target is dropping the connection".into(),
            )),
            ev => {
                tracing::debug!(target_iqn = %self.peer.target, event = ev, "iSCSI asynchronous message");
                Ok(())
            }
        }
    }

    fn complete(&self, itt: u32, status: u8, sense: Option<Sense>, residual: i64) {
        if let Some(p) = self.lock_table().remove(&itt) {
            p.events.send(Event::Done(Completion {
                status,
                sense,
                residual,
            }));
        }
    }

    fn reject(&self, itt: u32, why: String) {
        if let Some(p) = self.lock_table().remove(&itt) {
            p.events.send(Event::Rejected(why));
        }
    }

    /// Sessions live in an Arc; the reader's answers to target pings need one.
    fn self_arc(&self) -> Option<Arc<Session>> {
        self.me.upgrade()
    }
}

fn residual(h: &Bhs) -> i64 {
    let n = i64::from(h.u32_at(44));
    if h.flags() & pdu::F_UNDERFLOW != 0 {
        n
    } else if h.flags() & pdu::F_OVERFLOW != 0 {
        -n
    } else {
        0
    }
}
