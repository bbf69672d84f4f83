//! Ratios, and the results as a text table, a markdown table and JSON.

use serde_json::{json, Value};

use crate::jobs::{Job, JOBS};
use crate::machine::RunInfo;
use crate::run::{Figures, Results, Sample};
use crate::systems::{self, Comparison, Metric, System, SYSTEMS};

/// One line of the table: a job on a system, and for a peer how uniblk compares to it.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub sample: &'a Sample,
    pub peak_rss_kib: Option<u64>,
    /// uniblk's main figure / this peer's (higher is better for uniblk).
    pub ratio: Option<f64>,
    /// uniblk's server CPU per I/O / this peer's (lower is better for uniblk).
    pub cpu_ratio: Option<f64>,
}

/// Rows grouped by comparison, then by job, uniblk first: each peer's line sits right
/// under the uniblk line it is compared with.
pub fn rows(r: &Results) -> Vec<Row<'_>> {
    let mut out = Vec::new();
    for group in groups() {
        for job in &JOBS {
            let in_group = SYSTEMS.iter().filter(|s| s.group == group);
            let uniblk = find(r, group, "uniblk", job).and_then(ok);
            for sys in in_group {
                let Some(sample) = find(r, group, sys.name, job) else {
                    continue;
                };
                let (ratio, cpu_ratio) = match (sys.is_uniblk(), uniblk, ok(sample)) {
                    (false, Some(u), Some(p)) => ratios(job, u, p),
                    _ => (None, None),
                };
                out.push(Row {
                    sample,
                    peak_rss_kib: peak_rss(r, sys),
                    ratio,
                    cpu_ratio,
                });
            }
        }
    }
    out
}

/// Comparison groups in run order.
fn groups() -> Vec<&'static str> {
    let mut g: Vec<&'static str> = SYSTEMS.iter().map(|s| s.group).collect();
    g.dedup();
    g
}

fn find<'a>(r: &'a Results, group: &str, name: &str, job: &Job) -> Option<&'a Sample> {
    r.samples
        .iter()
        .find(|s| s.system.group == group && s.system.name == name && s.job.name == job.name)
}

fn ok(s: &Sample) -> Option<&Figures> {
    s.outcome.as_ref().ok()
}

fn peak_rss(r: &Results, sys: &System) -> Option<u64> {
    r.systems.iter().find(|s| s.system == *sys)?.peak_rss_kib
}

/// (uniblk / peer main figure, uniblk / peer CPU per I/O).
pub fn ratios(job: &Job, uniblk: &Figures, peer: &Figures) -> (Option<f64>, Option<f64>) {
    let main = Some(uniblk.m.main(job) / peer.m.main(job)).filter(|r| r.is_finite());
    let cpu = uniblk
        .cpu_per_io_us()
        .zip(peer.cpu_per_io_us())
        .map(|(u, p)| u / p)
        .filter(|r| r.is_finite());
    (main, cpu)
}

const HEADER: [&str; 14] = [
    "group",
    "system",
    "job",
    "result",
    "spread",
    "steal",
    "lat mean",
    "lat p99",
    "CPU s",
    "CPU/IO",
    "client CPU/IO",
    "peak RSS",
    "uniblk/peer",
    "CPU/IO u/p",
];

/// The cells of one row, as text.
fn cells(row: &Row) -> Vec<String> {
    let s = row.sample;
    let mut c = vec![
        s.system.group.to_string(),
        s.system.name.to_string(),
        s.job.name.to_string(),
    ];
    match &s.outcome {
        Ok(f) => c.extend([
            main_text(&s.job, f),
            s.spread().map_or("".into(), percent),
            f.steal.map_or("-".into(), percent),
            micros(f.m.clat_mean_us),
            micros(f.m.clat_p99_us),
            f.cpu_s.map_or("-".into(), |v| format!("{v:.2}")),
            f.cpu_per_io_us().map_or("-".into(), micros),
            f.client_cpu_per_io_us().map_or("-".into(), micros),
        ]),
        Err(e) => c.extend([
            format!("FAILED: {}", first_line(e)),
            "".into(),
            "".into(),
            "".into(),
            "".into(),
            "".into(),
            "".into(),
            "".into(),
        ]),
    }
    c.push(
        row.peak_rss_kib
            .map_or("-".into(), |k| format!("{} MiB", k.div_ceil(1024))),
    );
    c.push(row.ratio.map_or("".into(), |r| format!("{r:.2}x")));
    c.push(row.cpu_ratio.map_or("".into(), |r| format!("{r:.2}x")));
    c
}

/// A share as a whole percentage.
pub fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn main_text(job: &Job, f: &Figures) -> String {
    value_text(job, f.m.main(job))
}

/// A main figure in the job's unit.
fn value_text(job: &Job, v: f64) -> String {
    if job.by_bandwidth() {
        format!("{v:.0} MiB/s")
    } else if v >= 1e4 {
        format!("{:.1}k IOPS", v / 1e3)
    } else {
        format!("{v:.0} IOPS")
    }
}

/// Microseconds, switching to milliseconds where that reads better.
fn micros(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{us:.1} us")
    }
}

/// An error's first line, cut short enough for a table cell.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(100).collect()
}

/// The table for a terminal: aligned columns, numbers right-aligned.
pub fn text_table(rows: &[Row]) -> String {
    let mut all: Vec<Vec<String>> = vec![HEADER.map(String::from).to_vec()];
    all.extend(rows.iter().map(cells));
    let mut out = String::new();
    for (n, line) in aligned(&all, |i| i >= 3).iter().enumerate() {
        // A blank line between comparison groups.
        if n > 1 && all[n - 1][0] != all[n][0] {
            out.push('\n');
        }
        out += line;
        out.push('\n');
    }
    out
}

/// Rows as text lines: columns padded to their widest cell and two spaces apart, the
/// columns `right` picks right-aligned (numbers), the others left-aligned.
fn aligned(all: &[Vec<String>], right: impl Fn(usize) -> bool) -> Vec<String> {
    let columns = all.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            let width = |r: &Vec<String>| r.get(i).map_or(0, |c| c.chars().count());
            all.iter().map(width).max().unwrap_or(0)
        })
        .collect();
    all.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| match right(i) {
                    true => format!("{c:>w$}"),
                    false => format!("{c:<w$}"),
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// A markdown table: the header, then one line per row (a '|' in a cell, as in an
/// error message, escaped so it does not end the cell); `right` picks the columns
/// aligned right.
fn markdown_table(header: &[&str], rows: &[Vec<String>], right: impl Fn(usize) -> bool) -> String {
    let mut out = format!("| {} |\n|", header.join(" | "));
    for i in 0..header.len() {
        out += if right(i) { "---:|" } else { "---|" };
    }
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

/// One explicit comparison (see [`systems::comparisons`]) as measured.
#[derive(Debug, Clone)]
pub struct ComparisonRow {
    pub comparison: Comparison,
    pub job: Job,
    /// The system's figure (main figure or CPU per I/O, as the metric says).
    pub value: Option<f64>,
    /// The weakest baseline system and its figure: the ratio's other side.
    pub baseline: Option<(&'static str, f64)>,
    /// Above 1.0 the system does better than the weakest baseline.
    pub ratio: Option<f64>,
    /// Why there is no ratio.
    pub missing: Option<String>,
}

impl ComparisonRow {
    /// Whether the ratio reaches the target; `None` without a ratio.
    pub fn met(&self) -> Option<bool> {
        self.ratio.map(|r| r >= self.comparison.target)
    }

    fn figure_text(&self, v: Option<f64>) -> String {
        match (v, self.comparison.metric) {
            (None, _) => "-".into(),
            (Some(v), Metric::Main) => value_text(&self.job, v),
            (Some(v), Metric::CpuPerIo) => format!("{} CPU/IO", micros(v)),
        }
    }
}

/// A sample's figure for `metric`.
fn metric_figure(f: &Figures, job: &Job, metric: Metric) -> Option<f64> {
    match metric {
        Metric::Main => Some(f.m.main(job)),
        Metric::CpuPerIo => f.cpu_per_io_us(),
    }
}

/// The comparisons with at least one of their systems in this run (a `--filter` run may
/// have none), each with its ratio, or why it has none.
pub fn comparisons(r: &Results) -> Vec<ComparisonRow> {
    let mut out = Vec::new();
    for c in systems::comparisons() {
        let Some(job) = JOBS.iter().find(|j| j.name == c.job) else {
            continue;
        };
        let sample = |name: &str| find(r, c.group, name, job);
        let names = std::iter::once(&c.system).chain(c.baseline);
        if names.clone().all(|n| sample(n).is_none()) {
            continue;
        }
        let figure = |name: &'static str| -> Result<f64, String> {
            if let Some(v) = crate::systems::reference(c.group, name, c.job) {
                return Ok(v);
            }
            match sample(name) {
                None => Err(format!("{name} was not run")),
                Some(s) => match &s.outcome {
                    Ok(f) => metric_figure(f, job, c.metric)
                        .ok_or_else(|| format!("{name} has no CPU figure")),
                    Err(_) => Err(format!("{name} failed")),
                },
            }
        };
        let value = figure(c.system);
        let baselines: Result<Vec<(&'static str, f64)>, String> = c
            .baseline
            .iter()
            .map(|&n| figure(n).map(|v| (n, v)))
            .collect();
        // The weakest baseline: the slowest, or the one spending the most CPU per I/O.
        let baseline = baselines.as_ref().ok().and_then(|b| {
            let it = b.iter().copied();
            match c.metric {
                Metric::Main => it.min_by(|x, y| x.1.total_cmp(&y.1)),
                Metric::CpuPerIo => it.max_by(|x, y| x.1.total_cmp(&y.1)),
            }
        });
        let ratio = value
            .as_ref()
            .ok()
            .zip(baseline)
            .map(|(&v, (_, b))| match c.metric {
                Metric::Main => v / b,
                Metric::CpuPerIo => b / v,
            })
            .filter(|x| x.is_finite());
        let missing = match (&value, &baselines) {
            (Err(e), _) | (_, Err(e)) => Some(e.clone()),
            _ if ratio.is_none() => Some("a figure is zero".into()),
            _ => None,
        };
        out.push(ComparisonRow {
            comparison: c,
            job: *job,
            value: value.ok(),
            baseline,
            ratio,
            missing,
        });
    }
    out
}

const COMPARISON_HEADER: [&str; 8] = [
    "comparison",
    "job",
    "system",
    "result",
    "against (weakest)",
    "result",
    "ratio",
    "target",
];

fn comparison_cells(row: &ComparisonRow) -> Vec<String> {
    let c = &row.comparison;
    let fig = |v: Option<f64>| row.figure_text(v);
    vec![
        format!("{}: {}", c.group, c.label),
        c.job.to_string(),
        c.system.to_string(),
        fig(row.value),
        row.baseline
            .map_or(c.baseline.join(", "), |b| b.0.to_string()),
        fig(row.baseline.map(|b| b.1)),
        match (row.ratio, &row.missing) {
            (Some(r), _) => format!("{r:.2}x"),
            (None, Some(why)) => format!("none: {why}"),
            (None, None) => "none".into(),
        },
        format!(
            ">= {:.2}x{}",
            c.target,
            match row.met() {
                Some(true) => " met",
                Some(false) => " MISSED",
                None => "",
            }
        ),
    ]
}

/// The explicit comparisons for a terminal (empty when there are none).
pub fn comparison_table(rows: &[ComparisonRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut all: Vec<Vec<String>> = vec![COMPARISON_HEADER.map(String::from).to_vec()];
    all.extend(rows.iter().map(comparison_cells));
    let mut out = String::from(
        "targets (above 1.0 the system does better than the weakest it is set against):\n",
    );
    for line in aligned(&all, |_| false) {
        out += &line;
        out.push('\n');
    }
    out
}

const DISK_HEADER: [&str; 6] = [
    "group",
    "system",
    "job",
    "disk requests/IO",
    "at the disk",
    "disk latency",
];

/// The samples that carry figures of the disk under the member files, as table cells.
fn disk_rows(r: &Results) -> Vec<Vec<String>> {
    r.samples
        .iter()
        .filter_map(|s| {
            let f = s.outcome.as_ref().ok()?;
            let d = f.disk?;
            Some(vec![
                s.system.group.to_string(),
                s.system.name.to_string(),
                s.job.name.to_string(),
                format!("{:.2}", d.ios as f64 / f.m.ios.max(1) as f64),
                format!("{:.1}", d.depth),
                micros(d.lat_us),
            ])
        })
        .collect()
}

const DISK_NOTE: &str = "the disk under the member files, from its block-layer counters over \
    each measured run: requests it completed per client I/O, how many it held on average \
    while it held any, and their mean time below the file system";

/// The disk figures for a terminal (empty when no sample has them).
pub fn disk_table(r: &Results) -> String {
    let rows = disk_rows(r);
    if rows.is_empty() {
        return String::new();
    }
    let mut all: Vec<Vec<String>> = vec![DISK_HEADER.map(String::from).to_vec()];
    all.extend(rows);
    let mut out = format!("{DISK_NOTE}:\n");
    for line in aligned(&all, |i| i >= 3) {
        out += &line;
        out.push('\n');
    }
    out
}

fn disk_markdown(r: &Results) -> String {
    let rows = disk_rows(r);
    if rows.is_empty() {
        return String::new();
    }
    format!("\nDisk: {DISK_NOTE}.\n\n") + &markdown_table(&DISK_HEADER, &rows, |i| i >= 3)
}

fn comparisons_markdown(rows: &[ComparisonRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let out = String::from(
        "\nTargets: each ratio is the system's result over the slowest of the systems it is \
         set against (for CPU per I/O: theirs over the system's, so that above 1.0 the system \
         spends less), with the target the issue asks for.\n\n",
    );
    let cells: Vec<Vec<String>> = rows.iter().map(comparison_cells).collect();
    // The system's result, the baseline's, the ratio and the target are numbers.
    out + &markdown_table(&COMPARISON_HEADER, &cells, |i| matches!(i, 3 | 5 | 6 | 7))
}

fn comparison_json(row: &ComparisonRow) -> Value {
    let c = &row.comparison;
    json!({
        "group": c.group,
        "comparison": c.label,
        "job": c.job,
        "metric": match c.metric {
            Metric::Main => "main",
            Metric::CpuPerIo => "server_cpu_us_per_io",
        },
        "unit": match c.metric {
            Metric::Main => row.job.unit(),
            Metric::CpuPerIo => "us",
        },
        "system": c.system,
        "value": row.value,
        "against": c.baseline,
        "weakest": row.baseline.map(|b| b.0),
        "weakest_value": row.baseline.map(|b| b.1),
        "ratio": row.ratio,
        "target": c.target,
        "met": row.met(),
        "missing": row.missing,
    })
}

/// How many jobs had a round measured again for steal (once per job, whichever of its
/// systems had a run set aside).
pub fn redone_jobs(results: &Results) -> usize {
    let mut jobs: Vec<(&str, &str)> = results
        .samples
        .iter()
        .filter(|s| !s.set_aside.is_empty())
        .map(|s| (s.system.group, s.job.name))
        .collect();
    jobs.sort();
    jobs.dedup();
    jobs.len()
}

/// The table as markdown, headed by when, where and what it measured.
pub fn markdown(info: &RunInfo, results: &Results, rows: &[Row]) -> String {
    let mut out = format!(
        "Measured {} on {} ({} cores, Linux {}), commit `{}`{}, {}, a {} run \
         ({} ms per job after a {} ms warm-up, {} MiB working set). \
         Ratios are uniblk / peer: above 1.0 uniblk is faster; for CPU/IO below 1.0 it uses \
         less server CPU per I/O; client CPU/IO is fio's (or iscsi-perf's) CPU time per \
         I/O, start-up included, which shares the machine's cores with the server. A \
         system measured in several interleaved rounds shows \
         the median round; spread is (highest - lowest) / median of its rounds; \
         steal is the share of the machine's CPU time the hypervisor gave to other guests \
         during the (median) measured run{}; in a full run, a round in which any system \
         lost more than {} of the CPU time to steal is measured once more (once per job at \
         most) and the attempt with less steal counts (the other's figures are in the JSON, \
         set_aside_for_steal; a failed attempt is always reported){}.{}\n\n",
        info.date,
        info.cpu_model,
        info.nproc,
        info.kernel,
        info.commit,
        if info.dirty {
            " (with uncommitted changes)"
        } else {
            ""
        },
        info.fio_version,
        results.plan.mode(),
        results.plan.runtime.as_millis(),
        results.plan.warmup.as_millis(),
        results.plan.size >> 20,
        results.steal.map_or(String::new(), |v| format!(
            ", {} over the whole run",
            percent(v)
        )),
        percent(crate::run::STEAL_REDO),
        match redone_jobs(results) {
            0 => String::new(),
            n => format!(" ({n} jobs had a round measured again)"),
        },
        results
            .filter
            .as_ref()
            .map_or(String::new(), |f| format!(" Only jobs matching '{f}'.")),
    );
    let main: Vec<Vec<String>> = rows.iter().map(cells).collect();
    out += &markdown_table(&HEADER, &main, |i| i >= 3);
    out += &comparisons_markdown(&comparisons(results));
    out += &disk_markdown(results);
    out
}

/// Everything, for tools and for later comparison of runs.
pub fn json(info: &RunInfo, results: &Results, rows: &[Row]) -> Value {
    json!({
        "date": info.date,
        "commit": info.commit,
        "dirty": info.dirty,
        "machine": { "nproc": info.nproc, "cpu_model": info.cpu_model, "kernel": info.kernel },
        "fio_version": info.fio_version,
        "mode": results.plan.mode(),
        "filter": results.filter,
        "runtime_s": results.plan.runtime.as_secs_f64(),
        "warmup_s": results.plan.warmup.as_secs_f64(),
        "working_set_bytes": results.plan.size,
        "elapsed_s": results.elapsed.as_secs_f64(),
        "steal": results.steal,
        "systems": results.systems.iter().map(|s| json!({
            "group": s.system.group,
            "system": s.system.name,
            "peak_rss_kib": s.peak_rss_kib,
            "error": s.error,
        })).collect::<Vec<_>>(),
        "results": rows.iter().map(row_json).collect::<Vec<_>>(),
        "comparisons": comparisons(results).iter().map(comparison_json).collect::<Vec<_>>(),
    })
}

fn row_json(row: &Row) -> Value {
    let s = row.sample;
    let mut v = json!({
        "group": s.system.group,
        "system": s.system.name,
        "job": s.job.name,
        "rw": s.job.rw,
        "bs": s.job.bs,
        "iodepth": s.job.iodepth,
        "numjobs": s.job.numjobs,
        "unit": s.job.unit(),
        "uniblk_over_peer": row.ratio,
        "cpu_per_io_uniblk_over_peer": row.cpu_ratio,
    });
    match &s.outcome {
        Ok(f) => {
            v["value"] = json!(f.m.main(&s.job));
            v["rounds"] = json!(s.rounds);
            v["set_aside_for_steal"] = json!(s.set_aside);
            v["spread"] = json!(s.spread());
            v["steal"] = json!(f.steal);
            v["iops"] = json!(f.m.iops);
            v["mib_s"] = json!(f.m.bytes_per_sec / (1u64 << 20) as f64);
            v["clat_mean_us"] = json!(f.m.clat_mean_us);
            v["clat_p99_us"] = json!(f.m.clat_p99_us);
            v["ios"] = json!(f.m.ios);
            v["server_cpu_s"] = json!(f.cpu_s);
            v["server_cpu_us_per_io"] = json!(f.cpu_per_io_us());
            v["client_cpu_s"] = json!(f.client_cpu_s);
            v["client_cpu_us_per_io"] = json!(f.client_cpu_per_io_us());
            if let Some(d) = f.disk {
                v["disk"] = json!({
                    "requests": d.ios,
                    "outstanding": d.depth,
                    "lat_us": d.lat_us,
                });
            }
        }
        Err(e) => v["error"] = json!(e),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Measured;

    fn figures(iops: f64, mib_s: f64, cpu_s: f64, ios: u64) -> Figures {
        Figures {
            m: Measured {
                iops,
                bytes_per_sec: mib_s * (1 << 20) as f64,
                clat_mean_us: 10.0,
                clat_p99_us: 20.0,
                ios,
            },
            cpu_s: Some(cpu_s),
            client_cpu_s: None,
            disk: None,
            steal: None,
        }
    }

    #[test]
    fn ratios_are_uniblk_over_peer_of_the_main_figure() {
        let u = figures(30_000.0, 117.0, 1.0, 30_000);
        let p = figures(20_000.0, 78.0, 1.0, 20_000);
        let (main, cpu) = ratios(&JOBS[2], &u, &p);
        assert!((main.unwrap() - 1.5).abs() < 1e-9);
        // uniblk: 33.3 us/IO, peer: 50 us/IO.
        assert!((cpu.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        let (bw, _) = ratios(
            &JOBS[4],
            &figures(1.0, 2000.0, 1.0, 1),
            &figures(1.0, 1000.0, 1.0, 1),
        );
        assert!((bw.unwrap() - 2.0).abs() < 1e-9, "1 MiB jobs compare MiB/s");
    }

    #[test]
    fn ratio_is_absent_without_a_server_or_a_figure() {
        let u = figures(1.0, 1.0, 1.0, 1);
        let mut p = figures(0.0, 0.0, 1.0, 1);
        p.cpu_s = None;
        assert_eq!(ratios(&JOBS[0], &u, &p), (None, None));
    }

    /// A result of `fig` for system `name` of `group` on the job named `job`.
    fn sample(group: &str, name: &str, job: &str, fig: Result<Figures, String>) -> Sample {
        let system = *SYSTEMS
            .iter()
            .find(|s| s.group == group && s.name == name)
            .unwrap();
        let job = *JOBS.iter().find(|j| j.name == job).unwrap();
        Sample {
            system,
            job,
            outcome: fig,
            rounds: Vec::new(),
            set_aside: Vec::new(),
        }
    }

    fn results(samples: Vec<Sample>) -> Results {
        Results {
            plan: crate::run::Plan::quick(),
            filter: None,
            samples,
            systems: Vec::new(),
            elapsed: std::time::Duration::ZERO,
            steal: None,
        }
    }

    #[test]
    fn the_disk_table_lists_only_samples_with_disk_figures() {
        let job = "randread-4k-qd32x2";
        let mut with_disk = figures(57_000.0, 222.0, 1.0, 57_000);
        with_disk.disk = Some(crate::diskstat::DiskFigures {
            ios: 114_000,
            lat_us: 699.0,
            depth: 40.04,
        });
        let r = results(vec![
            sample("raid1-file", "uniblk", job, Ok(with_disk)),
            sample("mem-unix", "uniblk", job, Ok(figures(1.0, 1.0, 1.0, 1))),
        ]);
        let text = disk_table(&r);
        assert!(text.contains("2.00"), "two disk requests per I/O: {text}");
        assert!(text.contains("40.0"), "{text}");
        assert!(text.contains("699.0 us"), "{text}");
        assert!(!text.contains("mem-unix"), "no disk, no row: {text}");
        let md = disk_markdown(&r);
        assert!(
            md.contains("| raid1-file | uniblk | randread-4k-qd32x2 | 2.00 | 40.0 | 699.0 us |"),
            "{md}"
        );
        assert!(disk_table(&results(vec![])).is_empty());
    }

    #[test]
    fn comparisons_divide_by_the_slowest_baseline() {
        let w = "randwrite-4k-qd32x2";
        let r = results(vec![
            sample(
                "remote",
                "uniblk-raid1",
                w,
                Ok(figures(18_000.0, 0.0, 1.0, 1)),
            ),
            sample(
                "remote",
                "file-alone",
                w,
                Ok(figures(30_000.0, 0.0, 1.0, 1)),
            ),
            sample(
                "remote",
                "nbdkit-alone",
                w,
                Ok(figures(20_000.0, 0.0, 1.0, 1)),
            ),
            sample(
                "remote",
                "uniblk-raid0",
                "read-1m-qd8",
                Ok(figures(1.0, 11.0, 1.0, 1)),
            ),
            sample("remote", "capped-alone", "read-1m-qd8", Err("boom".into())),
        ]);
        let c = comparisons(&r);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].baseline, Some(("nbdkit-alone", 20_000.0)));
        assert!((c[0].ratio.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(c[0].met(), Some(true));
        assert_eq!(c[1].ratio, None);
        assert_eq!(c[1].missing.as_deref(), Some("capped-alone failed"));
        let table = comparison_table(&c);
        assert!(
            table.contains("0.90x") && table.contains(">= 0.80x met"),
            "{table}"
        );
        assert!(table.contains("none: capped-alone failed"), "{table}");
        // Groups with uniblk / peer ratios give none to the comparison-only group.
        assert!(rows(&r).iter().all(|row| row.ratio.is_none()));
    }

    #[test]
    fn cpu_targets_divide_the_peers_cpu_per_io_by_uniblks() {
        // uniblk and nbdkit at QD1: IOPS and server CPU seconds over 100k I/Os each.
        let run = |u: (f64, f64), n: (f64, f64)| {
            let q1 = "randread-4k-qd1";
            let s = |name, (iops, cpu)| {
                sample("mem-unix", name, q1, Ok(figures(iops, 0.0, cpu, 100_000)))
            };
            let c = comparisons(&results(vec![s("uniblk", u), s("nbdkit", n)]));
            let cpu: Vec<_> = c
                .into_iter()
                .filter(|c| c.comparison.metric == Metric::CpuPerIo)
                .collect();
            assert_eq!(cpu.len(), 1, "{cpu:?}");
            cpu
        };
        // uniblk: 2 s over 100k I/Os = 20 us each; nbdkit: 2.5 s = 25 us.
        let cpu = run((10_000.0, 2.0), (20_000.0, 2.5));
        assert!((cpu[0].ratio.unwrap() - 1.25).abs() < 1e-9, "{:?}", cpu[0]);
        assert_eq!(cpu[0].met(), Some(true));
        // Twice as fast but hungrier: the CPU target is missed.
        let c = run((40_000.0, 3.0), (20_000.0, 2.5));
        assert_eq!(c[0].met(), Some(false));
        let table = comparison_table(&c);
        assert!(
            table.contains("30.0 us CPU/IO") && table.contains("MISSED"),
            "{table}"
        );
    }

    #[test]
    fn comparisons_absent_from_a_run_are_left_out() {
        let r = results(vec![sample(
            "remote",
            "uniblk-raid0",
            "read-1m-qd8",
            Ok(figures(1.0, 11.0, 1.0, 1)),
        )]);
        let c = comparisons(&r);
        assert_eq!(
            c.len(),
            1,
            "only the raid0 comparison has a system in this run"
        );
        assert_eq!(c[0].missing.as_deref(), Some("capped-alone was not run"));
        assert!(comparisons(&results(Vec::new())).is_empty());
    }

    #[test]
    fn units_read_naturally() {
        assert_eq!(micros(45.26), "45.3 us");
        assert_eq!(micros(12_500.0), "12.5 ms");
        assert_eq!(
            main_text(&JOBS[0], &figures(25_100.0, 0.0, 0.0, 1)),
            "25.1k IOPS"
        );
        assert_eq!(
            main_text(&JOBS[5], &figures(0.0, 1234.4, 0.0, 1)),
            "1234 MiB/s"
        );
    }
}
