//! The fio jobs every system runs, the fio command line for each, and what we read back
//! from fio's JSON report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One fio workload. The same jobs run against every system so ratios compare like with
/// like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub name: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    pub bs: u64,
    pub iodepth: u32,
    /// fio processes; with the nbd engine each opens its own connection.
    pub numjobs: u32,
    /// Run only by systems that name it in their `only` list (a job one comparison
    /// needs, kept out of every other group's run).
    pub opt_in: bool,
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The jobs of issue 5, in the order they run and print, and issue 6's opt-in one.
pub const JOBS: [Job; 7] = [
    Job::new("randread-4k-qd1", "randread", 4 * KIB, 1, 1),
    Job::new("randwrite-4k-qd1", "randwrite", 4 * KIB, 1, 1),
    Job::new("randread-4k-qd32x2", "randread", 4 * KIB, 32, 2),
    Job::new("randwrite-4k-qd32x2", "randwrite", 4 * KIB, 32, 2),
    Job::new("read-1m-qd8", "read", MIB, 8, 1),
    Job::new("write-1m-qd8", "write", MIB, 8, 1),
    // One initiator at queue depth 32: what iscsi-perf -m 32 does.
    Job::new("randread-4k-qd32", "randread", 4 * KIB, 32, 1).opt_in(),
];

impl Job {
    pub const fn new(
        name: &'static str,
        rw: &'static str,
        bs: u64,
        iodepth: u32,
        numjobs: u32,
    ) -> Self {
        Self {
            name,
            rw,
            bs,
            iodepth,
            numjobs,
            opt_in: false,
        }
    }

    const fn opt_in(mut self) -> Self {
        self.opt_in = true;
        self
    }

    /// Which section of fio's report holds the numbers.
    pub fn is_write(&self) -> bool {
        self.rw.contains("write")
    }

    /// Large blocks are judged by bandwidth, small ones by operations per second.
    pub fn by_bandwidth(&self) -> bool {
        self.bs >= MIB
    }

    pub fn unit(&self) -> &'static str {
        if self.by_bandwidth() {
            "MiB/s"
        } else {
            "IOPS"
        }
    }
}

/// Where fio sends I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// fio's nbd engine (libnbd) on an NBD URI.
    Nbd { uri: String },
    /// fio's io_uring engine with O_DIRECT on local files: the no-NBD ceiling. With more
    /// than one, each fio job spreads its requests over all of them, and the region is
    /// that of each file.
    Files { paths: Vec<PathBuf> },
    /// Not fio: libiscsi's iscsi-perf on an iSCSI LUN (see [`iscsi_perf`]).
    Iscsi { url: String },
}

impl Target {
    /// How many files fio spreads each job over (1 but for several local files).
    fn files(&self) -> u64 {
        match self {
            Target::Files { paths } => paths.len().max(1) as u64,
            _ => 1,
        }
    }
}

/// fio's `--filename` for several files: the paths joined by ':' (a ':' inside a path
/// is escaped as '\:', as fio reads it).
fn fio_file_list(paths: &[PathBuf]) -> String {
    let escaped: Vec<String> = paths
        .iter()
        .map(|p| p.display().to_string().replace(':', "\\:"))
        .collect();
    escaped.join(":")
}

/// The region every job works in: `size` bytes from `offset` of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub size: u64,
}

/// fio's arguments for `job` on `target` for `runtime` (time based). Everything but the
/// target and the runtime is the same for every system.
pub fn fio_args(job: &Job, target: &Target, region: Region, runtime: Duration) -> Vec<String> {
    let mut args = vec![
        format!("--name={}", job.name),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.iodepth),
        format!("--numjobs={}", job.numjobs),
        format!("--offset={}", region.offset),
        // fio divides a job's size among its files: give it the region of each.
        format!("--size={}", region.size * target.files()),
        // One report for all `numjobs` processes.
        "--group_reporting".into(),
        "--time_based".into(),
        format!("--runtime={}ms", runtime.as_millis().max(1)),
        // Random offsets without fio's bookkeeping of which blocks were touched: cheaper on
        // the client, which shares the two cores with the server.
        "--norandommap".into(),
    ];
    args.extend(target_args(target));
    args
}

fn target_args(target: &Target) -> Vec<String> {
    match target {
        Target::Nbd { uri } => vec!["--ioengine=nbd".into(), format!("--uri={uri}")],
        Target::Files { paths } => vec![
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--filename={}", fio_file_list(paths)),
        ],
        // Never reached by fio: measure() runs iscsi-perf for this target.
        Target::Iscsi { url } => vec![format!("--filename={url}")],
    }
}

/// libiscsi's iscsi-perf for `job` (random reads only) on `url` for `runtime` (whole
/// seconds, at least one), 512-byte blocks assumed. Only IOPS are reported; latency
/// figures stay zero.
pub fn iscsi_perf(job: &Job, url: &str, runtime: Duration) -> Result<Measured> {
    if job.rw != "randread" || job.numjobs != 1 {
        bail!(
            "iscsi-perf runs one random-read stream; job {} is not one",
            job.name
        );
    }
    let secs = runtime.as_secs_f64().round().max(1.0) as u64;
    let mut cmd = fixtures::command("iscsi-perf");
    cmd.args([
        "-m",
        &job.iodepth.to_string(),
        "-b",
        &(job.bs / 512).to_string(),
    ])
    .args(["-r", "-t", &secs.to_string(), url]);
    let out = fixtures::run_bounded(&mut cmd, runtime + Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "iscsi-perf failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let iops = parse_iscsi_perf(&text)
        .with_context(|| format!("no 'iops average' in iscsi-perf's output: {text}"))?;
    Ok(Measured {
        iops,
        bytes_per_sec: iops * job.bs as f64,
        clat_mean_us: 0.0,
        clat_p99_us: 0.0,
        ios: (iops * secs as f64) as u64,
    })
}

/// The last `iops average N` of iscsi-perf's progress lines (the final summary).
fn parse_iscsi_perf(text: &str) -> Option<f64> {
    let at = text.rfind("iops average ")? + "iops average ".len();
    let n: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    n.parse().ok()
}

/// A sequential 1 MiB write over the whole region, so later reads find real data (not
/// holes a server can answer without touching memory or disk).
pub fn prefill_args(target: &Target, region: Region) -> Vec<String> {
    let mut args = vec![
        "--name=prefill".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        format!("--offset={}", region.offset),
        // fio divides a job's size among its files: give it the region of each.
        format!("--size={}", region.size * target.files()),
    ];
    args.extend(target_args(target));
    args
}

/// What one measured fio run produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub clat_mean_us: f64,
    pub clat_p99_us: f64,
    /// I/Os completed in the measured window (all `numjobs` together).
    pub ios: u64,
}

impl Measured {
    /// The job's main figure: MiB/s for large blocks, IOPS otherwise.
    pub fn main(&self, job: &Job) -> f64 {
        if job.by_bandwidth() {
            self.bytes_per_sec / MIB as f64
        } else {
            self.iops
        }
    }
}

/// Reads a `--group_reporting` report: every job must report error 0 and I/O done.
pub fn parse_report(report: &Value, job: &Job) -> Result<Measured> {
    let jobs = report["jobs"]
        .as_array()
        .filter(|j| !j.is_empty())
        .context("fio report has no jobs")?;
    for j in jobs {
        let err = j["error"].as_i64().unwrap_or(-1);
        if err != 0 {
            bail!("fio job {} reported error {err}", j["jobname"]);
        }
    }
    let dir = &jobs[0][if job.is_write() { "write" } else { "read" }];
    let num = |v: &Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("fio report lacks {what}"))
    };
    let m = Measured {
        iops: num(&dir["iops"], "iops")?,
        bytes_per_sec: num(&dir["bw_bytes"], "bw_bytes")?,
        clat_mean_us: num(&dir["clat_ns"]["mean"], "clat_ns.mean")? / 1e3,
        clat_p99_us: num(&dir["clat_ns"]["percentile"]["99.000000"], "clat p99")? / 1e3,
        ios: dir["total_ios"]
            .as_u64()
            .context("fio report lacks total_ios")?,
    };
    if m.ios == 0 {
        bail!("fio completed no I/O");
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscsi_perf_summary_parses() {
        let t = "00:00:01 - lba 12, iops current 49123 (191 MB/s), iops average 47972 (187 MB/s), in_flight 32, busy 0  iops average 46039 (179 MB/s)  \n\nfinished.\n";
        assert_eq!(parse_iscsi_perf(t), Some(46039.0));
        assert_eq!(parse_iscsi_perf("nothing"), None);
    }
    use serde_json::json;

    fn report(error: i64, ios: u64) -> Value {
        json!({ "jobs": [{ "jobname": "j", "error": error, "write": {
            "iops": 1000.5, "bw_bytes": 4_098_048.0, "total_ios": ios,
            "clat_ns": { "mean": 1500.0, "percentile": { "99.000000": 9000 } } } }] })
    }

    #[test]
    fn report_numbers_are_read_in_the_right_units() {
        let job = JOBS[1];
        let m = parse_report(&report(0, 1000), &job).unwrap();
        assert_eq!(m.main(&job), 1000.5);
        assert_eq!((m.clat_mean_us, m.clat_p99_us, m.ios), (1.5, 9.0, 1000));
        let big = JOBS[5];
        assert!(
            (m.main(&big) - 3.908).abs() < 1e-3,
            "MiB/s for 1 MiB blocks"
        );
    }

    #[test]
    fn fio_errors_and_empty_runs_are_failures() {
        assert!(parse_report(&report(5, 1000), &JOBS[1]).is_err());
        assert!(parse_report(&report(0, 0), &JOBS[1]).is_err());
        assert!(parse_report(&json!({ "jobs": [] }), &JOBS[1]).is_err());
    }

    #[test]
    fn nbd_and_file_targets_get_their_engines() {
        let region = Region {
            offset: 1 << 20,
            size: 256 << 20,
        };
        let nbd = fio_args(
            &JOBS[2],
            &Target::Nbd {
                uri: "nbd://127.0.0.1:1/x".into(),
            },
            region,
            Duration::from_millis(1500),
        );
        assert!(nbd.contains(&"--ioengine=nbd".to_string()));
        assert!(nbd.contains(&"--runtime=1500ms".to_string()));
        assert!(nbd.contains(&"--numjobs=2".to_string()));
        let file = fio_args(
            &JOBS[0],
            &Target::Files {
                paths: vec!["/tmp/a".into()],
            },
            region,
            Duration::from_secs(1),
        );
        assert!(file.contains(&"--direct=1".to_string()));
        assert!(file.contains(&"--offset=1048576".to_string()));
        assert!(file.contains(&"--filename=/tmp/a".to_string()));
        let size = |args: &[String]| args.iter().find(|a| a.starts_with("--size=")).cloned();
        let both = fio_args(
            &JOBS[0],
            &Target::Files {
                paths: vec!["/tmp/a".into(), "/tmp/b:c".into()],
            },
            region,
            Duration::from_secs(1),
        );
        assert!(
            both.contains(&"--filename=/tmp/a:/tmp/b\\:c".to_string()),
            "{both:?}"
        );
        assert_eq!(
            size(&both),
            Some(format!("--size={}", 2 * region.size)),
            "fio divides a job's size among its files"
        );
        assert_eq!(size(&file), Some(format!("--size={}", region.size)));
    }
}
