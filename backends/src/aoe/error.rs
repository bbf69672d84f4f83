//! Why an AoE target could not be reached or used. Every message names the interface or
//! the target and says what to do.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AoeError {
    #[error("AoE on {iface} needs a raw packet socket, which needs CAP_NET_RAW: run ublkd as root or grant it (setcap cap_net_raw+ep $(which ublkd))")]
    NoPermission { iface: String },
    #[error("AoE: no network interface '{iface}' here (ip link lists them; in a network namespace, run ublkd inside it)")]
    NoInterface { iface: String },
    #[error("AoE on {iface}: {op} failed: {error}")]
    Socket {
        iface: String,
        op: &'static str,
        error: std::io::Error,
    },
    #[error("AoE on {iface}: the MTU of {mtu} bytes cannot carry one 512-byte sector per frame; raise it (ip link set {iface} mtu 1500)")]
    MtuTooSmall { iface: String, mtu: usize },
    #[error("AoE target e{shelf}.{slot} did not answer a Query Config on {iface} within {waited:?}; is the target (vblade {shelf} {slot} IFACE FILE) running and the link up?")]
    NotFound {
        iface: String,
        shelf: u16,
        slot: u8,
        waited: Duration,
    },
    #[error("AoE target e{shelf}.{slot} on {iface}: {why}")]
    Target {
        iface: String,
        shelf: u16,
        slot: u8,
        why: String,
    },
}

impl AoeError {
    pub fn errno(&self) -> i32 {
        match self {
            AoeError::NoPermission { .. } => libc::EPERM,
            AoeError::NoInterface { .. } => libc::ENODEV,
            AoeError::Socket { error, .. } => error.raw_os_error().unwrap_or(libc::EIO),
            AoeError::MtuTooSmall { .. } => libc::EINVAL,
            AoeError::NotFound { .. } => libc::EHOSTUNREACH,
            AoeError::Target { .. } => libc::EIO,
        }
    }
}
