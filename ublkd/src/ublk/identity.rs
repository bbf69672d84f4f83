//! Finding an array's existing ublk device after a restart.
//!
//! A device is stamped at creation with a 64-bit identity derived from the array's UUID,
//! stored by the kernel in the device's `ublksrv_flags` (a field the driver keeps for the
//! server and never interprets). The kernel holds it for the device's whole life, so it
//! survives the daemon being killed and needs no state file that could go stale: at start
//! the daemon scans /sys/class/ublk-char, asks the driver for each device's info, and
//! picks the one carrying its array's identity. (libublk's JSON under /run/ublksrvd also
//! records the array's name and UUID as target data, for people reading `ublk list`.)

use std::path::Path;

use libublk::ctrl::UblkCtrl;
use libublk::sys;
use uuid::Uuid;

/// The identity stamped on an array's device.
pub fn identity_of(uuid: &Uuid) -> u64 {
    let v = uuid.as_u128();
    // Fold both halves so every bit of the UUID counts; never 0 (the unset value).
    match (v >> 64) as u64 ^ v as u64 {
        0 => 1,
        x => x,
    }
}

/// What the scan found for one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No device carries it: create one.
    Nothing,
    /// Its server is gone (or going): recover it.
    Orphan { id: u32 },
    /// Created but never started, or already stopped: cannot be recovered.
    Dead { id: u32 },
    /// Another live process serves it.
    Served { id: u32, pid: i32 },
}

/// Look through every ublk device for `identity`.
pub fn find(identity: u64) -> Found {
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") {
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("ublkc"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    for id in ids {
        // A device may vanish between the listing and the query: skip it.
        let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
            continue;
        };
        let info = ctrl.dev_info();
        if info.ublksrv_flags == identity {
            return classify(id, info.state, info.ublksrv_pid);
        }
    }
    Found::Nothing
}

fn classify(id: u32, state: u16, pid: i32) -> Found {
    match u32::from(state) {
        sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => Found::Orphan { id },
        // Live but its server is dead: the driver has not finished noticing yet (recovery
        // waits for it).
        sys::UBLK_S_DEV_LIVE if !process_alive(pid) => Found::Orphan { id },
        sys::UBLK_S_DEV_LIVE => Found::Served { id, pid },
        _ => Found::Dead { id },
    }
}

/// Whether `pid` is a running process (a zombie is not: its descriptors are gone).
fn process_alive(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
    else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')' (comm may contain one).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x") | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_nonzero() {
        let u = Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(identity_of(&u), identity_of(&u));
        assert_ne!(identity_of(&u), identity_of(&Uuid::new_v4()));
        assert_eq!(identity_of(&Uuid::from_u128(0)), 1);
        assert_eq!(identity_of(&Uuid::from_u128((7u128 << 64) | 7)), 1);
    }

    #[test]
    fn states_classify() {
        let q = sys::UBLK_S_DEV_QUIESCED as u16;
        let live = sys::UBLK_S_DEV_LIVE as u16;
        let dead = sys::UBLK_S_DEV_DEAD as u16;
        assert_eq!(classify(3, q, 1), Found::Orphan { id: 3 });
        assert_eq!(classify(3, dead, 0), Found::Dead { id: 3 });
        // pid 1 is alive in any namespace we run in.
        assert_eq!(classify(3, live, 1), Found::Served { id: 3, pid: 1 });
        assert_eq!(classify(3, live, i32::MAX), Found::Orphan { id: 3 });
        assert_eq!(
            classify(3, live, std::process::id() as i32),
            Found::Orphan { id: 3 }
        );
    }
}
