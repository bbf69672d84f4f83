//! The ublk frontend: each array whose layout enables `export.ublk` (the default) becomes
//! /dev/ublkbN through the kernel's ublk driver, via libublk.
//!
//! Threads: per device, one control thread (device.rs) and one libublk queue thread per
//! queue (queue.rs). A queue thread runs one task per tag; each request crosses to the
//! daemon's tokio runtime as one spawned task (the array's I/O futures live there), and
//! its result comes back through the queue's eventfd doorbell, kept armed as a poll on the
//! queue's io_uring (doorbell.rs). Data is copied once between the tag's ublk buffer and
//! an array pool buffer (request.rs explains why).
//!
//! Recovery: devices carry UBLK_F_USER_RECOVERY(+_REISSUE) and are stamped with the
//! array's identity (identity.rs). If the daemon is killed, the device stays, quiesced;
//! the next start with the same layout finds it and re-attaches; a clean stop deletes it.

mod config;
mod device;
mod doorbell;
mod identity;
mod params;
mod queue;
mod request;

use std::path::Path;

use raidcore::ArrayRef;
use tokio::sync::Mutex;

pub use config::{plan, DevIdValue, UblkLayout, UblkPlan};
pub use device::DeviceInfo;

use crate::status::UblkStatus;

const CONTROL: &str = "/dev/ublk-control";

/// Whether the kernel's ublk driver is there to talk to.
pub fn control_present() -> bool {
    Path::new(CONTROL).exists()
}

/// Say once, clearly, why no array gets a ublk device on this machine.
pub fn log_absent() {
    tracing::warn!(
        "ublk: {CONTROL} is absent (kernel without the ublk driver, or ublk_drv not loaded: modprobe ublk_drv); arrays are exported over NBD only"
    );
}

/// One array's ublk export: a running device, or why there is none.
pub struct UblkExport {
    plan: UblkPlan,
    info: Option<DeviceInfo>,
    error: Option<String>,
    device: Mutex<Option<device::Device>>,
}

impl UblkExport {
    /// Create (or recover) the array's device. A failure is logged and kept for status:
    /// the array's other exports carry on.
    pub async fn start(array: &ArrayRef, plan: &UblkPlan) -> UblkExport {
        match device::start(array.clone(), plan.clone()).await {
            Ok(d) => UblkExport {
                plan: plan.clone(),
                info: Some(d.info.clone()),
                error: None,
                device: Mutex::new(Some(d)),
            },
            Err(e) => {
                tracing::error!(array = %array.name, error = %format!("{e:#}"), "no ublk device for this array");
                UblkExport {
                    plan: plan.clone(),
                    info: None,
                    error: Some(format!("{e:#}")),
                    device: Mutex::new(None),
                }
            }
        }
    }

    /// The block device's path, when it is up.
    pub fn device_path(&self) -> Option<String> {
        self.info.as_ref().map(DeviceInfo::path)
    }

    /// Stop and delete the device (waits for in-flight I/O). Later calls do nothing.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let Some(d) = self.device.lock().await.take() else {
            return Ok(());
        };
        d.stop().await
    }

    pub fn status(&self) -> UblkStatus {
        let stopped = self.device.try_lock().map(|d| d.is_none()).unwrap_or(false);
        let state = match (&self.info, stopped) {
            (None, _) => "failed",
            (Some(_), true) => "stopped",
            (Some(_), false) => "live",
        };
        UblkStatus {
            device: self.device_path(),
            dev_id: self.info.as_ref().map(|i| i.dev_id),
            queues: self.info.as_ref().map_or(self.plan.queues, |i| i.queues),
            depth: self.info.as_ref().map_or(self.plan.depth, |i| i.depth),
            max_io: self.info.as_ref().map_or(self.plan.max_io, |i| i.max_io),
            state: state.into(),
            recovered: self.info.as_ref().is_some_and(|i| i.recovered),
            error: self.error.clone(),
        }
    }
}
