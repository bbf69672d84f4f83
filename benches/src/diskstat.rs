//! What the disk under the member files did during a run, from its block-layer counters
//! (/sys/block/DEV/stat): requests completed, their mean time in the block layer and
//! driver, and how many were outstanding on average while it had any. The last two are
//! per request and per busy millisecond, so the seconds fio spends starting up and
//! connecting inside the measured window do not dilute them.
//!
//! Why: the file-backed systems share one disk whose speed depends on how many requests
//! it is given at once. Two servers fed the same fio queue depth can keep very different
//! numbers of requests at the disk; these figures show which side of a ratio is the
//! server and which is the disk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The block device holding a file (the whole disk when the file is on a partition).
#[derive(Debug, Clone)]
pub struct Disk {
    pub name: String,
    stat: PathBuf,
}

/// One reading of a disk's counters.
#[derive(Debug, Clone, Copy)]
pub struct Counters {
    /// Reads and writes completed.
    ios: u64,
    /// Milliseconds those requests spent in the block layer and driver, summed.
    ticks_ms: u64,
    /// Milliseconds with at least one request outstanding ("io_ticks").
    busy_ms: u64,
    /// Milliseconds weighted by the requests outstanding ("time in queue").
    queue_ms: u64,
}

/// The disk between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskFigures {
    /// Requests the disk completed (reads and writes).
    pub ios: u64,
    /// Mean time a request spent below the file system.
    pub lat_us: f64,
    /// Mean requests outstanding at the disk while it had any.
    pub depth: f64,
}

impl Disk {
    /// The disk under `path`, if the file is on one (not on tmpfs, say).
    pub fn of(path: &Path) -> Option<Disk> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let node = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
        // A partition's counters are its own; the disk's are in the parent directory,
        // and they are what every file on it shares.
        let disk = if node.join("partition").exists() {
            node.parent()?.to_path_buf()
        } else {
            node
        };
        let stat = disk.join("stat");
        let name = disk.file_name()?.to_string_lossy().into_owned();
        stat.exists().then_some(Disk { name, stat })
    }

    pub fn read(&self) -> Result<Counters> {
        let text = std::fs::read_to_string(&self.stat)
            .with_context(|| format!("reading {}", self.stat.display()))?;
        parse(&text)
            .map(|(ios, ticks_ms, busy_ms, queue_ms)| Counters {
                ios,
                ticks_ms,
                busy_ms,
                queue_ms,
            })
            .with_context(|| format!("{}: unexpected contents {text:?}", self.stat.display()))
    }
}

/// (reads + writes, their ticks, busy time, time in queue) from a stat line: fields 1, 4,
/// 5, 8, 10 and 11 of Documentation/block/stat.rst.
fn parse(text: &str) -> Option<(u64, u64, u64, u64)> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 11 {
        return None;
    }
    Some((f[0] + f[4], f[3] + f[7], f[9], f[10]))
}

/// The disk's figures from `a` to `b`; `None` when it completed nothing in between.
pub fn between(a: &Counters, b: &Counters) -> Option<DiskFigures> {
    let ios = b.ios.checked_sub(a.ios).filter(|&n| n > 0)?;
    let ticks = b.ticks_ms.saturating_sub(a.ticks_ms) as f64;
    let busy = b.busy_ms.saturating_sub(a.busy_ms).max(1) as f64;
    let queue = b.queue_ms.saturating_sub(a.queue_ms) as f64;
    Some(DiskFigures {
        ios,
        lat_us: ticks * 1e3 / ios as f64,
        depth: queue / busy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_counters(line: &str) -> Counters {
        let (ios, ticks_ms, busy_ms, queue_ms) = parse(line).expect("a stat line");
        Counters {
            ios,
            ticks_ms,
            busy_ms,
            queue_ms,
        }
    }

    #[test]
    fn parses_a_stat_line_and_derives_rate_latency_and_depth() {
        // 2000 reads over 1400 ms of ticks, 500 writes over 100 ms, busy 500 ms, 3000 ms
        // in queue.
        let line = "    2000 0 16000 1400  500 0 4000 100  0 500 3000 0 0 0 0 0 0\n";
        assert_eq!(parse(line), Some((2500, 1500, 500, 3000)));
        let a = parse_counters("0 0 0 0 0 0 0 0 0 0 0");
        let b = parse_counters(line);
        let f = between(&a, &b).expect("the disk did work");
        assert_eq!(f.ios, 2500);
        assert_eq!(f.lat_us, 600.0);
        assert_eq!(f.depth, 6.0);
        assert_eq!(between(&b, &b), None, "no requests, no figures");
        assert_eq!(parse("1 2 3"), None, "too few fields");
    }

    #[test]
    fn finds_the_disk_under_a_file_on_disk_and_none_under_proc() {
        assert!(Disk::of(Path::new("/proc/self/stat")).is_none());
        // Where the root file system is on a block device (these machines: /dev/vda),
        // that device is found by its name under /sys/block and its counters read.
        if let Some(d) = Disk::of(Path::new("/")) {
            assert!(Path::new("/sys/block").join(&d.name).is_dir(), "{d:?}");
            d.read().expect("its counters read");
        }
    }
}
