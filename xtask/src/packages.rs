//! Debian packages the tests need, installed with apt when missing.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Every Debian package a test or the build needs. Add to this list when a test starts
/// driving a new peer; `cargo xtask test` installs whatever is missing.
pub const PACKAGES: &[&str] = &[
    "nbdkit",            // NBD member server, error/delay filters
    "libnbd-bin",        // nbdinfo, nbdcopy, nbdsh: NBD client oracles
    "nbdfuse",           // NBD export as a file, for loop devices (bookworm: in libnbd-bin)
    "fio",               // load and verification (nbd engine built in)
    "nbd-server",        // NBD server without structured replies
    "fuse3",             // fusermount3, for nbdfuse
    "e2fsprogs",         // mkfs.ext4, fsck.ext4
    "qemu-utils",        // qemu-nbd, qemu-io, qemu-img
    "util-linux",        // losetup, mount
    "libclang1-14",      // bindgen for libublk at build time
    "iproute2",          // ip netns, tc: AoE tests
    "vblade",            // AoE target for the AoE member tests
    "nftables",          // nft: dropping a fraction of AoE frames (lossy-link test)
    "kmod",              // modprobe
    "fonts-dejavu-core", // the benchmark chart's font
    "nbd-client",        // the kernel NBD client, in the guest tests (cargo xtask vm-test)
    "tgt",               // tgtd/tgtadm: the iSCSI target the iSCSI member tests log in to
    "libiscsi-bin",      // iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-perf: iSCSI oracles
];

/// Installs the packages in [`PACKAGES`] that are missing. Without root it prints the
/// command to run and fails.
pub fn ensure_installed() -> Result<()> {
    if !have("dpkg-query") {
        println!("xtask: dpkg-query not found (not Debian?): cannot check packages; tests whose peers are missing will skip, or fail under CI");
        return Ok(());
    }
    let missing = missing()?;
    if missing.is_empty() {
        println!("xtask: all {} Debian packages present", PACKAGES.len());
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root()? {
        bail!(
            "missing Debian packages: {list}\ninstall them with:\n  \
             sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {list}\n\
             or run with --no-install to test without them"
        );
    }
    println!("xtask: installing {list}");
    apt(&["update"])?;
    apt(&[&["install", "-y"], &missing[..]].concat())?;
    let still = self::missing()?;
    if !still.is_empty() {
        bail!(
            "apt-get succeeded but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// The packages of [`PACKAGES`] neither installed nor provided by an installed package
/// (bookworm's `nbdfuse` is a virtual package that `libnbd-bin` provides). One
/// `dpkg-query -W` over all packages answers both questions.
fn missing() -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}|${Package}|${Provides}\n"])
        .stderr(Stdio::null())
        .output()
        .context("cannot run dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let present: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.split_once('|'))
        // "install ok installed"; not "deinstall ok config-files" and the like.
        .filter(|(status, _)| status.ends_with(" installed"))
        .flat_map(|(_, names)| names.split(['|', ',']))
        // A Provides entry may carry a version: "nbdfuse (= 1.14.2-1)".
        .filter_map(|n| n.split_whitespace().next())
        .collect();
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| !present.contains(p))
        .collect())
}

/// apt-get, non-interactive (CI has no stdin), waiting for a lock held by a boot-time
/// unattended-upgrades run instead of failing at once.
fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(["-q", "-o", "DPkg::Lock::Timeout=300"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn is_root() -> Result<bool> {
    // The owner of /proc/self is our effective UID: no libc needed.
    Ok(std::fs::metadata("/proc/self")
        .context("cannot read /proc/self")?
        .uid()
        == 0)
}

/// Whether `bin` runs at all.
pub fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
