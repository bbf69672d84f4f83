//! `export.ublk` in the layout file: whether an array becomes /dev/ublkbN, under which
//! device id, with how many queues, how deep, and how large an I/O the kernel may send.
//!
//! ```toml
//! export.ublk = { id = "auto", queues = 2, depth = 128, max_io = "512KiB" }
//! export.ublk = { enabled = false }      # NBD only
//! ```
//! The export is on by default: an array without `export.ublk` gets the defaults.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::layout::SizeValue;

/// Default queue depth (requests in flight per queue).
pub const DEFAULT_DEPTH: u16 = 128;
/// Default largest I/O the kernel sends in one request.
pub const DEFAULT_MAX_IO: u32 = 512 << 10;
/// One queue per core, but no more than this by default: beyond four, queue threads
/// mostly compete with the tokio workers that do the array I/O.
pub const DEFAULT_MAX_QUEUES: usize = 4;
/// Upper bounds we accept (the kernel clamps queues to the CPU count on its own).
const MAX_QUEUES: u16 = 64;
const MAX_DEPTH: u16 = 4096;
/// libublk refuses I/O buffers over 32 MiB; the kernel wants whole pages.
const MAX_IO_LIMIT: u64 = 32 << 20;
const PAGE: u64 = 4096;
/// ublk device ids are minor numbers; the driver allows 2^20 of them.
const MAX_DEV_ID: i64 = (1 << 20) - 1;

/// `export.ublk` as written in the layout file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UblkLayout {
    /// `false` keeps the array off ublk (NBD only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `"auto"` (the driver picks) or a device number N for /dev/ublkbN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<DevIdValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_io: Option<SizeValue>,
}

/// `id = "auto"` or `id = 3`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DevIdValue {
    Number(i64),
    Text(String),
}

/// A validated ublk export, ready for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkPlan {
    /// None: the driver allocates an id.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Largest I/O in bytes (a multiple of 4 KiB).
    pub max_io: u32,
}

impl Default for UblkPlan {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        UblkPlan {
            id: None,
            queues: cores.min(DEFAULT_MAX_QUEUES) as u16,
            depth: DEFAULT_DEPTH,
            max_io: DEFAULT_MAX_IO,
        }
    }
}

/// The plan for an array's `export.ublk` (None when absent: the defaults); Ok(None)
/// when the layout turns the export off.
pub fn plan(array: &str, layout: Option<&UblkLayout>) -> Result<Option<UblkPlan>> {
    let Some(l) = layout else {
        return Ok(Some(UblkPlan::default()));
    };
    if l.enabled == Some(false) {
        return Ok(None);
    }
    let d = UblkPlan::default();
    Ok(Some(UblkPlan {
        id: dev_id(array, l.id.as_ref())?,
        queues: bounded(array, "queues", l.queues.unwrap_or(d.queues), MAX_QUEUES)?,
        depth: bounded(array, "depth", l.depth.unwrap_or(d.depth), MAX_DEPTH)?,
        max_io: max_io(array, l.max_io.as_ref())?.unwrap_or(d.max_io),
    }))
}

fn dev_id(array: &str, v: Option<&DevIdValue>) -> Result<Option<u32>> {
    match v {
        None => Ok(None),
        Some(DevIdValue::Text(t)) if t == "auto" => Ok(None),
        Some(DevIdValue::Number(n)) if (0..=MAX_DEV_ID).contains(n) => Ok(Some(*n as u32)),
        Some(other) => bail!(
            "array {array}: export.ublk.id {} is neither \"auto\" nor a device number from 0 to {MAX_DEV_ID} (id = 0 gives /dev/ublkb0)",
            match other {
                DevIdValue::Number(n) => n.to_string(),
                DevIdValue::Text(t) => format!("'{t}'"),
            }
        ),
    }
}

fn bounded(array: &str, field: &str, v: u16, max: u16) -> Result<u16> {
    if !(1..=max).contains(&v) {
        bail!("array {array}: export.ublk.{field} = {v} must be between 1 and {max}");
    }
    Ok(v)
}

fn max_io(array: &str, v: Option<&SizeValue>) -> Result<Option<u32>> {
    let Some(v) = v else { return Ok(None) };
    let bytes = v
        .bytes()
        .with_context(|| format!("array {array}: export.ublk.max_io"))?;
    if !(PAGE..=MAX_IO_LIMIT).contains(&bytes) || bytes % PAGE != 0 {
        bail!("array {array}: export.ublk.max_io of {bytes} bytes must be a multiple of 4KiB from 4KiB to 32MiB (e.g. max_io = \"512KiB\")");
    }
    Ok(Some(bytes as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<UblkPlan>> {
        let l: UblkLayout = toml::from_str(text)?;
        plan("a", Some(&l))
    }

    #[test]
    fn absent_means_on_with_defaults() {
        let p = plan("a", None).unwrap().unwrap();
        assert_eq!(p.id, None);
        assert_eq!(p.depth, 128);
        assert_eq!(p.max_io, 512 << 10);
        assert!((1..=4).contains(&p.queues));
    }

    #[test]
    fn options_parse() {
        let p = parse("id = 3\nqueues = 2\ndepth = 64\nmax_io = \"1MiB\"")
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            UblkPlan {
                id: Some(3),
                queues: 2,
                depth: 64,
                max_io: 1 << 20
            }
        );
        assert_eq!(parse("id = \"auto\"").unwrap().unwrap().id, None);
        assert_eq!(parse("enabled = false").unwrap(), None);
        assert!(parse("enabled = true").unwrap().is_some());
    }

    #[test]
    fn mistakes_get_clear_messages() {
        let e = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(e("id = \"first\"").contains("neither \"auto\" nor a device number"));
        assert!(e("id = -2").contains("neither"));
        assert!(e("queues = 0").contains("export.ublk.queues = 0 must be between 1 and 64"));
        assert!(e("depth = 5000").contains("between 1 and 4096"));
        assert!(e("max_io = \"6000\"").contains("multiple of 4KiB"));
        assert!(e("max_io = \"64MiB\"").contains("to 32MiB"));
        assert!(e("qeues = 2").contains("unknown field"));
    }
}
