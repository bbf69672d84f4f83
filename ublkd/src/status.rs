//! What `uniblk status` shows: the daemon's view of every array, export and member. The
//! same types serialise in the daemon and deserialise in the CLI.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub daemon: DaemonStatus,
    pub arrays: Vec<ArrayStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub uptime_secs: u64,
    pub buffer_pool: Vec<PoolClass>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolClass {
    pub buffer_bytes: usize,
    pub free: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArrayStatus {
    pub name: String,
    pub uuid: String,
    pub level: String,
    pub chunk: u64,
    pub size: u64,
    pub block_size: u32,
    /// optimal | degraded | failed
    pub state: String,
    pub queue: QueueStatus,
    pub exports: Vec<ExportStatus>,
    /// The kernel block device, when the layout enables `export.ublk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ublk: Option<UblkStatus>,
    pub members: Vec<MemberStatus>,
}

/// An array's /dev/ublkbN.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UblkStatus {
    /// e.g. "/dev/ublkb0"; absent when the device could not be set up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Largest request in bytes.
    pub max_io: u32,
    /// live | stopped | failed
    pub state: String,
    /// Re-attached to the device a previous daemon left behind.
    #[serde(default)]
    pub recovered: bool,
    /// Why there is no device (state "failed").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueStatus {
    pub policy: String,
    pub depth: usize,
    pub in_flight: usize,
    pub waiting: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportStatus {
    /// "nbd" (the ublk device is `ArrayStatus::ublk`)
    pub kind: String,
    pub name: String,
    pub listen: String,
    pub connections: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub index: usize,
    pub address: String,
    /// local | remote
    pub locality: String,
    pub protocol: String,
    pub engine: String,
    pub size: u64,
    pub block_size: u32,
    /// healthy | faulty
    pub state: String,
    /// Why it is faulty, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    pub in_flight: u64,
    pub completed: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Round trip of the last health probe in microseconds (remote members; 0: none yet).
    #[serde(default)]
    pub last_probe_us: u64,
    #[serde(default)]
    pub probes_failed: u64,
    /// While rebuilding: bytes of array space copied so far, and the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
    /// Remote members: their protocol's view of the connection (iSCSI session and
    /// negotiated parameters, NBD connections, AoE target and retransmissions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub done: u64,
    pub total: u64,
}
