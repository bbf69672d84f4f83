//! When, where and on what a run was measured: numbers mean little without it.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// UTC, RFC 3339: `2026-11-22T03:44:54Z`.
    pub date: String,
    /// The same instant for file names: `20261122T034454Z`.
    pub stamp: String,
    /// `git rev-parse --short HEAD`, or "unknown" outside a checkout.
    pub commit: String,
    /// Whether the tree had uncommitted changes (then `commit` is not all that ran).
    pub dirty: bool,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub fio_version: String,
}

impl RunInfo {
    pub fn collect() -> Result<Self> {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let (date, stamp) = utc(secs);
        Ok(Self {
            date,
            stamp,
            commit: output("git", &["rev-parse", "--short", "HEAD"])
                .unwrap_or_else(|| "unknown".into()),
            dirty: output("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()),
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model().unwrap_or_else(|| "unknown CPU".into()),
            kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
            fio_version: output("fio", &["--version"]).unwrap_or_else(|| "unknown fio".into()),
        })
    }
}

/// A command's trimmed stdout when it succeeds.
fn output(bin: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// (RFC 3339, compact) UTC forms of a Unix time, without a date crate.
fn utc(secs: u64) -> (String, String) {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    let (hh, mm, ss) = (t / 3600, t / 60 % 60, t % 60);
    (
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
        format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z"),
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_format_as_utc() {
        assert_eq!(utc(0).0, "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400).0, "2000-02-29T00:00:00Z");
        assert_eq!(
            utc(1_795_319_094),
            ("2026-11-22T03:44:54Z".into(), "20261122T034454Z".into())
        );
    }
}
