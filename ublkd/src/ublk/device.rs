//! One array's ublk device, run on a dedicated control thread.
//!
//! libublk's control commands go through a thread-local io_uring and block, so each device
//! gets its own thread: it creates the device (or recovers the one a killed daemon left
//! behind), lets libublk spawn the queue threads and start the device, reports back, then
//! waits for the daemon to ask it to stop. A stop deletes the device; a daemon killed
//! with SIGKILL leaves it quiesced (UBLK_F_USER_RECOVERY) for the next start to recover,
//! and the driver reissues what was in flight (UBLK_F_USER_RECOVERY_REISSUE).

use std::sync::{mpsc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};
use raidcore::ArrayRef;
use tokio::sync::oneshot;

use super::config::UblkPlan;
use super::identity::{self, Found};
use super::params::{device_params, Geometry};
use super::queue::{self, QueueCtx};

/// What a running device looks like, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub dev_id: u32,
    pub queues: u16,
    pub depth: u16,
    pub max_io: u32,
    /// Re-attached to a device a previous daemon left behind.
    pub recovered: bool,
}

impl DeviceInfo {
    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }
}

/// The daemon's handle on a device thread.
pub struct Device {
    pub info: DeviceInfo,
    stop: mpsc::Sender<()>,
    done: oneshot::Receiver<Result<()>>,
}

/// Create or recover the device for `array` and start serving it.
pub async fn start(array: ArrayRef, plan: UblkPlan) -> Result<Device> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let ctx = QueueCtx {
        array,
        rt: tokio::runtime::Handle::current(),
        ended: stop_tx.clone(),
    };
    std::thread::Builder::new()
        .name(format!("ublk-{}", ctx.array.name))
        .spawn(move || {
            let r = run(ctx, plan, ready_tx, stop_rx);
            let _ = done_tx.send(r);
        })
        .context("cannot start the ublk control thread")?;
    match ready_rx.await {
        Ok(info) => Ok(Device {
            info,
            stop: stop_tx,
            done: done_rx,
        }),
        // The thread gave up before the device was up: its result says why.
        Err(_) => match done_rx.await {
            Ok(Err(e)) => Err(e),
            _ => Err(anyhow!(
                "the ublk control thread ended without starting the device"
            )),
        },
    }
}

impl Device {
    /// Stop the device (the kernel drains in-flight I/O first) and delete it.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.done
            .await
            .unwrap_or_else(|_| Err(anyhow!("the ublk control thread died")))
    }
}

/// How the device comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Recover(u32),
}

/// The control thread's body.
fn run(
    ctx: QueueCtx,
    plan: UblkPlan,
    ready: oneshot::Sender<DeviceInfo>,
    stop: mpsc::Receiver<()>,
) -> Result<()> {
    let name = ctx.array.name.clone();
    let ident = identity::identity_of(&ctx.array.uuid);
    let geo = geometry(&ctx.array, &plan)?;
    let mode = prepare(&name, ident, &geo)?;
    let ctrl = build_ctrl(&plan, mode, ident).map_err(|e| create_error(&name, &plan, e))?;
    let tgt_init = |dev: &mut UblkDev| init_target(dev, &geo, &ctx.array);
    let q_ctx = ctx.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue::serve(qid, dev, q_ctx.clone());
    let (ready, stop) = (Mutex::new(Some(ready)), Mutex::new(stop));
    let array = name.clone();
    // Runs once the device is started, on this thread; the queues serve meanwhile.
    let on_started = move |c: &UblkCtrl| {
        let info = device_info(c, mode);
        announce(&array, &info, &plan);
        if let Some(tx) = ready.lock().ok().and_then(|mut r| r.take()) {
            let _ = tx.send(info);
        }
        wait_then_stop(&array, c, &stop);
    };
    ctrl.run_target(tgt_init, q_fn, on_started)
        .map_err(|e| ublk_error(&name, "start", e))?;
    ctrl.del_dev().map_err(|e| ublk_error(&name, "delete", e))?;
    tracing::info!(array = %name, "ublk device deleted");
    Ok(())
}

fn device_info(c: &UblkCtrl, mode: Mode) -> DeviceInfo {
    let i = c.dev_info();
    DeviceInfo {
        dev_id: i.dev_id,
        queues: i.nr_hw_queues,
        depth: i.queue_depth,
        max_io: i.max_io_buf_bytes,
        recovered: mode != Mode::Create,
    }
}

fn announce(array: &str, info: &DeviceInfo, plan: &UblkPlan) {
    tracing::info!(array = %array, device = %info.path(), queues = info.queues, depth = info.depth, recovered = info.recovered, "ublk device up");
    if info.recovered && !matches_plan(info, plan) {
        tracing::warn!(array = %array, device = %info.path(), "the recovered device keeps the id, queues, depth and max_io it was created with; export.ublk now asks for others, which apply once it is stopped and created again");
    }
}

/// Block until the daemon asks (or a queue thread ends early), then stop the device.
fn wait_then_stop(array: &str, c: &UblkCtrl, stop: &Mutex<mpsc::Receiver<()>>) {
    if let Ok(rx) = stop.lock() {
        let _ = rx.recv();
    }
    // STOP_DEV: the kernel deletes the disk once in-flight I/O has drained, then aborts the
    // queues' fetch commands, which ends the queue threads.
    if let Err(e) = c.kill_dev() {
        tracing::warn!(array = %array, error = %e, "ublk stop failed");
    }
}

/// Whether a device has what the layout asks for (a device keeps its settings for life).
fn matches_plan(info: &DeviceInfo, plan: &UblkPlan) -> bool {
    plan.id.is_none_or(|id| id == info.dev_id)
        && info.queues <= plan.queues
        && info.depth == plan.depth
        && info.max_io == plan.max_io
}

fn geometry(array: &ArrayRef, plan: &UblkPlan) -> Result<Geometry> {
    if u64::from(plan.max_io) > array.max_io() {
        bail!(
            "array {}: export.ublk.max_io {} exceeds the array's largest request of {} bytes",
            array.name,
            plan.max_io,
            array.max_io()
        );
    }
    Ok(Geometry {
        size: array.size(),
        block_size: array.block_size(),
        max_io: plan.max_io,
        // The array's request limit, in whole MiB (it includes a little block padding).
        max_zero: array.max_io() & !((1 << 20) - 1),
    })
}

/// Look for this array's device from an earlier run and decide what to do with it.
fn prepare(name: &str, ident: u64, geo: &Geometry) -> Result<Mode> {
    match identity::find(ident) {
        Found::Nothing => Ok(Mode::Create),
        Found::Served { id, pid } => bail!(
            "array {name}: its ublk device /dev/ublkb{id} is served by another live process (pid {pid}); stop that daemon first"
        ),
        Found::Dead { id } => {
            tracing::warn!(array = %name, device = %format!("/dev/ublkb{id}"), "removing this array's ublk device left over from an interrupted start");
            let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error(name, "open", e))?;
            ctrl.del_dev().map_err(|e| ublk_error(name, "delete stale", e))?;
            Ok(Mode::Create)
        }
        Found::Orphan { id } => {
            let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error(name, "open", e))?;
            check_recoverable(name, id, &ctrl, geo)?;
            tracing::info!(array = %name, device = %format!("/dev/ublkb{id}"), "recovering the ublk device a previous daemon left behind");
            // Waits (up to 30 s) while the driver is still tearing down the old server.
            ctrl.start_user_recover()
                .map_err(|e| ublk_error(name, "start recovery of", e))?;
            Ok(Mode::Recover(id))
        }
    }
}

/// Refuse to serve an old device whose size or block size no longer match the array: a
/// file system on it would see different data.
fn check_recoverable(name: &str, id: u32, ctrl: &UblkCtrl, geo: &Geometry) -> Result<()> {
    let mut p = sys::ublk_params::default();
    ctrl.get_params(&mut p)
        .map_err(|e| ublk_error(name, "read parameters of", e))?;
    let (old_size, old_shift) = (p.basic.dev_sectors << 9, p.basic.logical_bs_shift);
    if old_size != geo.dev_bytes() || old_shift != geo.logical_shift() {
        bail!(
            "array {name}: /dev/ublkb{id} from an earlier run has {old_size} bytes in {}-byte blocks, but the array now gives {} bytes in {}-byte blocks; not re-attaching. Restore the old layout, or unmount and delete the device (ublk del -n {id}) to get a new one",
            1u32 << old_shift,
            geo.dev_bytes(),
            1u32 << geo.logical_shift()
        );
    }
    Ok(())
}

fn build_ctrl(plan: &UblkPlan, mode: Mode, ident: u64) -> Result<UblkCtrl, UblkError> {
    let (id, dev_flags) = match mode {
        Mode::Create => (
            plan.id.map_or(-1, |i| i as i32),
            UblkFlags::UBLK_DEV_F_ADD_DEV,
        ),
        Mode::Recover(id) => (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV),
    };
    UblkCtrlBuilder::default()
        .name("uniblk")
        .id(id)
        .nr_queues(plan.queues)
        .depth(plan.depth)
        .io_buf_bytes(plan.max_io)
        .ctrl_flags(ctrl_flags())
        .ctrl_target_flags(ident)
        .dev_flags(dev_flags)
        .build()
}

/// Recovery with reissue of in-flight I/O, plus ioctl-encoded commands where offered.
fn ctrl_flags() -> u64 {
    let features = UblkCtrl::get_features().unwrap_or(0);
    let mut flags = u64::from(sys::UBLK_F_USER_RECOVERY);
    for optional in [
        sys::UBLK_F_USER_RECOVERY_REISSUE,
        sys::UBLK_F_CMD_IOCTL_ENCODE,
    ] {
        if features & u64::from(optional) != 0 {
            flags |= u64::from(optional);
        }
    }
    if flags & u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE) == 0 {
        tracing::warn!("ublk driver lacks UBLK_F_USER_RECOVERY_REISSUE: I/O in flight when the daemon dies will fail instead of being reissued");
    }
    flags
}

/// Device parameters and ring sizes, and the array's name in libublk's JSON.
fn init_target(dev: &mut UblkDev, geo: &Geometry, array: &ArrayRef) -> Result<(), UblkError> {
    let geo = Geometry {
        max_io: dev.dev_info.max_io_buf_bytes,
        ..*geo
    };
    let depth = dev.dev_info.queue_depth;
    dev.tgt.dev_size = geo.dev_bytes();
    dev.tgt.params = device_params(&geo);
    // One extra slot for the doorbell's poll; a roomy completion queue.
    dev.tgt.sq_depth = depth.saturating_add(1);
    dev.tgt.cq_depth = depth.saturating_mul(2).max(4);
    dev.set_target_json(serde_json::json!({
        "uniblk": { "array": array.name, "uuid": array.uuid.to_string() }
    }));
    Ok(())
}

/// A taken device id is the likely mistake: say so.
fn create_error(array: &str, plan: &UblkPlan, e: UblkError) -> anyhow::Error {
    let err = ublk_error(array, "create", e);
    match plan.id {
        Some(id) if format!("{err}").contains("File exists") => err.context(format!(
            "/dev/ublkb{id} is taken by another device: give export.ublk another id, or id = \"auto\""
        )),
        _ => err,
    }
}

fn ublk_error(array: &str, what: &str, e: UblkError) -> anyhow::Error {
    let detail = match &e {
        UblkError::UringIOError(r) | UblkError::OtherError(r) => {
            format!("{e}: {}", std::io::Error::from_raw_os_error(-r))
        }
        other => other.to_string(),
    };
    anyhow!("array {array}: cannot {what} the ublk device: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_match_devices() {
        let plan = UblkPlan {
            id: None,
            queues: 4,
            depth: 128,
            max_io: 512 << 10,
        };
        let info = DeviceInfo {
            dev_id: 3,
            queues: 2, // the kernel caps queues at the CPU count
            depth: 128,
            max_io: 512 << 10,
            recovered: true,
        };
        assert!(matches_plan(&info, &plan));
        assert!(!matches_plan(
            &info,
            &UblkPlan {
                id: Some(1),
                ..plan.clone()
            }
        ));
        assert!(!matches_plan(
            &info,
            &UblkPlan {
                depth: 64,
                ..plan.clone()
            }
        ));
    }

    #[test]
    fn taken_ids_get_a_hint() {
        let plan = UblkPlan {
            id: Some(7),
            queues: 1,
            depth: 64,
            max_io: 4096,
        };
        let e = create_error("r1", &plan, UblkError::UringIOError(-libc::EEXIST));
        assert!(format!("{e:#}").contains("/dev/ublkb7 is taken"), "{e:#}");
    }

    #[test]
    fn errors_name_the_array_and_the_errno() {
        let e = ublk_error("r1", "create", UblkError::UringIOError(-libc::EEXIST));
        let s = e.to_string();
        assert!(s.contains("array r1: cannot create the ublk device"), "{s}");
        assert!(s.contains("File exists"), "{s}");
    }
}
