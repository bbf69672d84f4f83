//! One ublk queue thread (libublk spawns one per queue): a single-threaded executor runs
//! one task per tag plus the doorbell task, all driven by the queue's io_uring.
//!
//! A tag's task fetches a request, hands it to the tokio runtime (one spawned task per
//! request: the array's futures must run to completion there, see `raidcore::IoBuf`),
//! waits in its [`Slots`] mailbox for the result, commits it and fetches the next one.
//! Results come back through the queue's [`Doorbell`].

use std::rc::Rc;
use std::sync::Arc;

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError};
use raidcore::ArrayRef;

use super::doorbell::{Doorbell, Slots};
use super::request::{self, TagBuf};

/// Seconds without I/O after which libublk marks a queue idle.
const IDLE_SECS: u64 = 20;
/// Consecutive doorbell poll failures after which the doorbell gives up (never seen; it
/// keeps a broken ring from spinning).
const MAX_POLL_FAILURES: u32 = 16;

/// What every queue thread of a device shares.
#[derive(Clone)]
pub struct QueueCtx {
    pub array: ArrayRef,
    pub rt: tokio::runtime::Handle,
    /// Told when a queue thread ends. After a stop that is expected; at any other time a
    /// queue has failed, and the control thread stops the device rather than leave its
    /// I/O hanging with nobody to serve it.
    pub ended: std::sync::mpsc::Sender<()>,
}

/// One queue thread's own state.
struct Queue<'a> {
    q: UblkQueue<'a>,
    ctx: QueueCtx,
    bell: Arc<Doorbell>,
    slots: Slots,
}

/// The body of queue thread `qid`; returns when the device stops.
pub fn serve(qid: u16, dev: &UblkDev, ctx: QueueCtx) {
    let name = ctx.array.name.clone();
    let queue = match open(qid, dev, ctx) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(array = %name, queue = qid, error = %e, "ublk queue setup failed");
            // The device start waits until every queue has registered its buffers, and
            // libublk offers no public "this queue failed" notice: reporting a failed
            // registration makes the start fail (EPERM) instead of waiting forever.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let exe = smol::LocalExecutor::new();
    let tags: Vec<_> = queue
        .q
        .tags()
        .map(|tag| {
            let queue = queue.clone();
            exe.spawn(async move { queue.serve_tag(tag).await })
        })
        .collect();
    let bell = queue.clone();
    let _doorbell = exe.spawn(async move { bell.doorbell().await });
    let run_ops = || while exe.try_tick() {};
    let done = || tags.iter().all(|t| t.is_finished());
    let r = smol::block_on(libublk::wait_and_handle_io_events(
        &queue.q,
        Some(IDLE_SECS),
        run_ops,
        done,
    ));
    if let Err(e) = r {
        tracing::error!(array = %name, queue = qid, error = %e, "ublk queue loop failed");
    }
    tracing::debug!(array = %name, queue = qid, "ublk queue stopped");
    let _ = queue.ctx.ended.send(());
}

fn open<'a>(qid: u16, dev: &'a UblkDev, ctx: QueueCtx) -> Result<Queue<'a>, UblkError> {
    let q = UblkQueue::new(qid, dev)?;
    let bell = Arc::new(Doorbell::new()?);
    let slots = Slots::new(dev.dev_info.queue_depth as usize);
    Ok(Queue {
        q,
        ctx,
        bell,
        slots,
    })
}

impl Queue<'_> {
    /// Fetch, serve, commit, for one tag, until the device goes away.
    async fn serve_tag(&self, tag: u16) {
        match self.tag_loop(tag).await {
            Ok(()) | Err(UblkError::QueueIsDown) => {}
            Err(e) => {
                tracing::error!(array = %self.ctx.array.name, queue = self.q.get_qid(), tag, error = %e, "ublk tag task failed")
            }
        }
    }

    async fn tag_loop(&self, tag: u16) -> Result<(), UblkError> {
        let size = self.q.dev.dev_info.max_io_buf_bytes as usize;
        let buf = Arc::new(IoBuf::<u8>::new(size));
        self.q
            .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
            .await?;
        loop {
            let res = self.handle(tag, &buf).await;
            self.q
                .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
                .await?;
        }
    }

    /// Serve the request the kernel just handed to `tag`; returns the ublk result.
    async fn handle(&self, tag: u16, buf: &Arc<IoBuf<u8>>) -> i32 {
        let iod = *self.q.get_iod(tag);
        let io = match request::decode(&iod, buf.len()) {
            Ok(io) => io,
            Err(errno) => return -errno,
        };
        let reply = Reply {
            bell: self.bell.clone(),
            tag,
            sent: false,
        };
        let array = self.ctx.array.clone();
        let data = TagBuf(buf.clone());
        self.ctx.rt.spawn(async move {
            let res = request::execute(&array, io, &data).await;
            reply.send(res);
        });
        self.slots.wait(tag).await
    }

    /// Keep a poll for the doorbell armed on this queue's ring; deliver what it brings.
    async fn doorbell(&self) {
        let mut failures = 0;
        loop {
            let poll = opcode::PollAdd::new(types::Fd(self.bell.fd()), libc::POLLIN as u32);
            let res = self.q.ublk_submit_sqe(poll.build()).await;
            if res < 0 {
                failures += 1;
                tracing::error!(array = %self.ctx.array.name, queue = self.q.get_qid(), error = %std::io::Error::from_raw_os_error(-res), "ublk doorbell poll failed");
                if failures >= MAX_POLL_FAILURES {
                    return;
                }
            } else {
                failures = 0;
            }
            self.bell.drain(|tag, r| self.slots.complete(tag, r));
        }
    }
}

/// Rings the doorbell with the request's result exactly once: with -EIO if the tokio
/// task ends without a result (a panic, or the runtime shutting down), so the tag is
/// never left waiting forever.
struct Reply {
    bell: Arc<Doorbell>,
    tag: u16,
    sent: bool,
}

impl Reply {
    fn send(mut self, res: i32) {
        self.sent = true;
        self.bell.ring(self.tag, res);
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            self.bell.ring(self.tag, -libc::EIO);
        }
    }
}
