//! `uniblk-bench [--quick] [--filter SUBSTR] [--daemon PATH] [--out DIR]`: runs every fio
//! job on every system, prints one table, writes JSON, markdown and a PNG chart to DIR.
//! Usually run through `cargo xtask bench`, which builds the daemon in release first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use benches::chart;
use benches::machine::RunInfo;
use benches::report::{self, Row};
use benches::run::{run, Plan, Results};

const USAGE: &str = "\
usage: uniblk-bench [--quick] [--filter SUBSTR] [--daemon PATH] [--out DIR]

  --quick          short runs: the whole benchmark in about two minutes
  --filter SUBSTR  only jobs whose GROUP/SYSTEM/JOB contains SUBSTR,
                   e.g. mem-unix, randread-4k-qd32x2, raid1-file/qemu-nbd, remote
  --daemon PATH    the ublkd binary [default: target/release/ublkd]
  --out DIR        where results go [default: target/bench]";

struct Args {
    quick: bool,
    filter: Option<String>,
    daemon: PathBuf,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        quick: false,
        filter: None,
        daemon: "target/release/ublkd".into(),
        out: "target/bench".into(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--filter" => a.filter = Some(value()?),
            "--daemon" => a.daemon = value()?.into(),
            "--out" => a.out = value()?.into(),
            other => bail!("unknown option '{other}'\n{USAGE}"),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match parse(&args).and_then(|a| bench(&a)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("uniblk-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs, reports, writes; `Ok(false)` when any job or server failed.
fn bench(a: &Args) -> Result<bool> {
    if fixtures::which("fio").is_none() {
        bail!("fio is not installed (apt-get install fio nbdkit qemu-utils)");
    }
    let info = RunInfo::collect()?;
    let plan = if a.quick { Plan::quick() } else { Plan::full() };
    let results = run(&a.daemon, plan, a.filter.as_deref())?;
    let rows = report::rows(&results);
    println!("{}", report::text_table(&rows));
    let comparisons = report::comparisons(&results);
    if !comparisons.is_empty() {
        println!("{}", report::comparison_table(&comparisons));
    }
    let disk = report::disk_table(&results);
    if !disk.is_empty() {
        println!("{disk}");
    }
    write_outputs(&a.out, &info, &results, &rows)?;
    let failures = results.failures();
    println!(
        "{} jobs in {:.0} s{}{}{}",
        results.samples.len(),
        results.elapsed.as_secs_f64(),
        results.steal.map_or(String::new(), |v| format!(
            ", {} of the machine's CPU time stolen by the hypervisor",
            report::percent(v)
        )),
        match report::redone_jobs(&results) {
            0 => String::new(),
            n => format!(" ({n} jobs had a round measured again for it)"),
        },
        match failures {
            0 => String::new(),
            n => format!(", {n} FAILED"),
        }
    );
    Ok(failures == 0)
}

/// results-<stamp>.json, latest.json, latest.md, latest.png under `dir`.
fn write_outputs(dir: &Path, info: &RunInfo, results: &Results, rows: &[Row]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&report::json(info, results, rows))? + "\n";
    let stamped = dir.join(format!("results-{}.json", info.stamp));
    let markdown = report::markdown(info, results, rows);
    for (name, text) in [
        (&stamped, &json),
        (&dir.join("latest.json"), &json),
        (&dir.join("latest.md"), &markdown),
    ] {
        std::fs::write(name, text).with_context(|| format!("cannot write {}", name.display()))?;
    }
    let chart = write_chart(&dir.join("latest.png"), info, results, rows);
    println!(
        "wrote {}, latest.json, latest.md{} in {}",
        stamped.display(),
        if chart { ", latest.png" } else { "" },
        dir.display()
    );
    Ok(())
}

/// Whether the chart was drawn: a missing font costs the chart, not the results.
fn write_chart(png: &Path, info: &RunInfo, results: &Results, rows: &[Row]) -> bool {
    let mode = match &results.filter {
        Some(f) => format!("{} (only '{f}')", results.plan.mode()),
        None => results.plan.mode().to_string(),
    };
    match chart::draw(png, info, &mode, rows, &report::comparisons(results)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("uniblk-bench: no chart: {e:#}");
            false
        }
    }
}
