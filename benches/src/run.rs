//! Runs the benchmark: for each selected system, start it, prefill, then per job a warm-up
//! and a measured fio run with the server's CPU time read around it; stop it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fixtures::{sparse_file, Tmp};
use serde_json::Value;

use crate::diskstat::{self, Disk, DiskFigures};
use crate::jobs::{
    fio_args, iscsi_perf, parse_report, prefill_args, Job, Measured, Region, Target, JOBS,
};
use crate::procstat::{
    cpu_seconds, ended_children_cpu_seconds, host_ticks, peak_rss_kib, steal_since,
};
use crate::report::percent;
use crate::systems::{self, Env, Running, System, DATA_OFFSET, SYSTEMS};

/// The shortest measured run of a rate-capped server in a quick pass.
const QUICK_CAPPED: Duration = Duration::from_secs(3);

/// How long things run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub quick: bool,
    /// The measured part of each job.
    pub runtime: Duration,
    /// An unmeasured run of the same job just before it: connections made, caches and
    /// pools warm, CPU frequency up.
    pub warmup: Duration,
    /// Bytes each job works on (and that are prefilled).
    pub size: u64,
}

impl Plan {
    /// Every job once, about 1.4 s each (each fio run also spends ~0.3 s starting and
    /// stopping, two runs per job; the remote group's two rate-capped ones measure for
    /// 3 s): the whole run, setup included, in under two minutes.
    pub fn quick() -> Self {
        Self {
            quick: true,
            runtime: Duration::from_millis(600),
            warmup: Duration::from_millis(200),
            size: 256 << 20,
        }
    }

    /// 54 jobs of about 10.5 s, three rounds of those of the target-carrying groups, and
    /// the remote group's: about 31 minutes in all, up to about 40 when steal makes
    /// rounds be measured again (see `STEAL_REDO`).
    pub fn full() -> Self {
        Self {
            quick: false,
            runtime: Duration::from_secs(8),
            warmup: Duration::from_secs(2),
            // All of a 1 GiB mem member's data area (1 GiB less the 1 MiB of metadata).
            size: (1 << 30) - DATA_OFFSET,
        }
    }
}

impl Plan {
    /// Measured runs of each of `sys`'s jobs: one in a quick run (a check that everything
    /// runs, whose sub-second figures a median would not make trustworthy), the system's
    /// own count in a full one.
    pub fn rounds(&self, sys: &System) -> u32 {
        if self.quick {
            1
        } else {
            sys.rounds
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.quick {
            "quick"
        } else {
            "full"
        }
    }
}

/// The figures of one measured job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub m: Measured,
    /// The server's CPU seconds during the measured run; `None` without a server.
    pub cpu_s: Option<f64>,
    /// The client's (fio's or iscsi-perf's) CPU seconds for the measured run, start-up
    /// and exit included: client and server share the machine's CPUs, so what the client
    /// spends per I/O bounds what the server can reach.
    pub client_cpu_s: Option<f64>,
    /// The disk under the member files during the measured run, for the systems that
    /// serve them; `None` elsewhere or when the disk did no I/O.
    pub disk: Option<DiskFigures>,
    /// The share of the machine's CPU time the hypervisor took during the measured run:
    /// the figures of a run with much steal say more about the neighbours than the
    /// system.
    pub steal: Option<f64>,
}

impl Figures {
    pub fn cpu_per_io_us(&self) -> Option<f64> {
        self.cpu_s.map(|c| c * 1e6 / self.m.ios as f64)
    }

    pub fn client_cpu_per_io_us(&self) -> Option<f64> {
        self.client_cpu_s.map(|c| c * 1e6 / self.m.ios as f64)
    }
}

/// One job on one system: its figures or why there are none.
#[derive(Debug, Clone)]
pub struct Sample {
    pub system: System,
    pub job: Job,
    pub outcome: Result<Figures, String>,
    /// The main figure of every measured round, in the order they ran (empty when one
    /// failed): the median is `outcome`, the spread shows how much this machine moved.
    pub rounds: Vec<f64>,
    /// The main figures of this system's measured runs that were set aside for an attempt
    /// at the same round with less steal (see `STEAL_REDO`), kept so that what was not
    /// counted can still be seen.
    pub set_aside: Vec<f64>,
}

impl Sample {
    /// How far the rounds lay apart: (highest - lowest) / median of the main figure, for
    /// a sample of more than one round.
    pub fn spread(&self) -> Option<f64> {
        if self.rounds.len() < 2 {
            return None;
        }
        let mut v = self.rounds.clone();
        v.sort_by(f64::total_cmp);
        let mid = v[v.len() / 2];
        (mid > 0.0).then(|| (v[v.len() - 1] - v[0]) / mid)
    }
}

/// What was seen of a system as a whole.
#[derive(Debug, Clone)]
pub struct SystemReport {
    pub system: System,
    /// Peak resident memory of the server (VmHWM) after all its jobs.
    pub peak_rss_kib: Option<u64>,
    /// A start, prefill or stop failure.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub plan: Plan,
    /// `--filter`: a partial run, said so wherever its results go.
    pub filter: Option<String>,
    pub samples: Vec<Sample>,
    pub systems: Vec<SystemReport>,
    pub elapsed: Duration,
    /// The steal share of the machine's CPU time over the whole run.
    pub steal: Option<f64>,
}

impl Results {
    pub fn failures(&self) -> usize {
        let jobs = self.samples.iter().filter(|s| s.outcome.is_err()).count();
        jobs + self.systems.iter().filter(|s| s.error.is_some()).count()
    }
}

/// The jobs of `sys` (all, or those it is limited to) whose `group/system/job` key
/// contains `filter`.
pub fn selected_jobs(sys: &System, filter: Option<&str>) -> Vec<Job> {
    JOBS.iter()
        .copied()
        .filter(|j| sys.runs(j.name) && (!j.opt_in || sys.only.is_some()))
        .filter(|j| {
            filter.is_none_or(|f| format!("{}/{}/{}", sys.group, sys.name, j.name).contains(f))
        })
        .collect()
}

/// Runs every selected job on every system that has one.
pub fn run(daemon_bin: &Path, plan: Plan, filter: Option<&str>) -> Result<Results> {
    let start = Instant::now();
    let host_start = host_ticks().ok();
    let mut out = Results {
        plan,
        filter: filter.map(String::from),
        samples: Vec::new(),
        systems: Vec::new(),
        elapsed: Duration::ZERO,
        steal: None,
    };
    let work: Vec<(System, Vec<Job>)> = SYSTEMS
        .iter()
        .map(|s| (*s, selected_jobs(s, filter)))
        .filter(|(_, jobs)| !jobs.is_empty())
        .collect();
    if work.is_empty() {
        bail!(
            "--filter {:?} matches no GROUP/SYSTEM/JOB (e.g. mem-unix/uniblk/randread-4k-qd1)",
            filter.unwrap_or("")
        );
    }
    for group in groups(&work) {
        let members: Vec<&(System, Vec<Job>)> =
            work.iter().filter(|(s, _)| s.group == group).collect();
        // Only the file-backed group needs the member files; they go when it is done.
        let files = if members.iter().any(|(s, _)| s.kind.uses_files()) {
            Some(MemberFiles::create(plan.size)?)
        } else {
            None
        };
        let env = Env {
            daemon_bin,
            files: files.as_ref().map(|f| &f.paths),
            size: plan.size,
        };
        bench_group(&members, &env, &plan, &mut out);
    }
    out.elapsed = start.elapsed();
    out.steal = steal_since(host_start);
    Ok(out)
}

/// The comparison groups of `work`, in order.
fn groups(work: &[(System, Vec<Job>)]) -> Vec<&'static str> {
    let mut g: Vec<&'static str> = work.iter().map(|(s, _)| s.group).collect();
    g.dedup();
    g
}

/// A round in which any system's measured run lost more than this share of the machine's
/// CPU time to the hypervisor compares systems under unlike conditions: it is measured
/// again, and the attempt with less steal counts.
pub const STEAL_REDO: f64 = 0.10;

/// Rounds measured again per job at most, which bounds a full run on a busy host to about
/// one extra round per job.
const MAX_STEAL_REDOS: u32 = 1;

/// Starts every system of a group, then runs job by job, every system in turn: uniblk and
/// its peers are measured seconds apart, so drift in the machine's load hits both sides
/// of a ratio alike. Then records each server's memory and stops it. Failures are
/// recorded, not returned, so one broken peer does not cost the rest of a long run.
fn bench_group(work: &[&(System, Vec<Job>)], env: &Env, plan: &Plan, out: &mut Results) {
    let group = work.first().map_or("", |w| w.0.group);
    let mut running = Vec::new();
    for (sys, jobs) in work.iter().map(|w| (&w.0, &w.1)) {
        eprintln!("bench: {}/{}: starting", sys.group, sys.name);
        match start_and_prefill(sys, env) {
            Ok(r) => running.push((*sys, jobs, r)),
            Err(e) => not_started(sys, jobs, &format!("{e:#}"), out),
        }
    }
    for job in &JOBS {
        let runs_it: Vec<_> = running
            .iter()
            .filter(|(_, jobs, _)| jobs.contains(job))
            .collect();
        let rounds = runs_it
            .iter()
            .map(|(s, ..)| plan.rounds(s))
            .max()
            .unwrap_or(1);
        let mut got: Vec<Vec<Result<Figures, String>>> = vec![Vec::new(); runs_it.len()];
        let mut set_aside: Vec<Vec<f64>> = vec![Vec::new(); runs_it.len()];
        let mut redos = 0;
        for round in 0..rounds {
            let mut this = measure_round(&runs_it, job, plan, round);
            let worst = worst_steal(&this);
            if should_redo(plan, redos, &this) {
                redos += 1;
                eprintln!(
                    "bench: {group}/{}: round {} lost {} of the CPU time to steal; measuring it again",
                    job.name,
                    round + 1,
                    percent(worst)
                );
                let mut other = measure_round(&runs_it, job, plan, round);
                // A failure in the second attempt is reported, not set aside.
                if has_failure(&other) || worst_steal(&other) < worst {
                    std::mem::swap(&mut this, &mut other);
                }
                for (aside, outcome) in set_aside.iter_mut().zip(other) {
                    aside.extend(outcome.and_then(|o| o.ok()).map(|f| f.m.main(job)));
                }
            }
            for (got, outcome) in got.iter_mut().zip(this) {
                got.extend(outcome);
            }
        }
        for (((sys, ..), got), set_aside) in runs_it.iter().zip(got).zip(set_aside) {
            out.samples.push(Sample {
                system: *sys,
                job: *job,
                rounds: round_figures(&got, job),
                outcome: median(got, job),
                set_aside,
            });
        }
    }
    for (sys, _, r) in running {
        out.systems.push(finish(sys, r));
    }
}

/// One round of `job`: a measured run on each system that has rounds left (`None` for
/// the others), in turn.
fn measure_round(
    runs_it: &[&(System, &Vec<Job>, Running)],
    job: &Job,
    plan: &Plan,
    round: u32,
) -> Vec<Option<Result<Figures, String>>> {
    runs_it
        .iter()
        .map(|(sys, _, r)| {
            (round < plan.rounds(sys)).then(|| {
                let outcome = measure(sys, r, job, plan).map_err(|e| format!("{e:#}"));
                log_sample(sys, job, &outcome);
                outcome
            })
        })
        .collect()
}

/// Whether `round` is measured again, `redos` rounds of the job having been redone
/// already: when some run in it lost more than `STEAL_REDO` to steal. Never in a quick
/// run (it must stay short, and its single sub-second rounds are a check that everything
/// runs, not figures), and never a round with a failed run, whose failure must be
/// reported rather than replaced by a second attempt that happened to work.
fn should_redo(plan: &Plan, redos: u32, round: &[Option<Result<Figures, String>>]) -> bool {
    !plan.quick && redos < MAX_STEAL_REDOS && !has_failure(round) && worst_steal(round) > STEAL_REDO
}

fn has_failure(round: &[Option<Result<Figures, String>>]) -> bool {
    round.iter().flatten().any(|r| r.is_err())
}

/// The highest steal share any measured run of a round saw (0 when none was read).
fn worst_steal(round: &[Option<Result<Figures, String>>]) -> f64 {
    round
        .iter()
        .flatten()
        .filter_map(|r| r.as_ref().ok()?.steal)
        .fold(0.0, f64::max)
}

/// The run with the median main figure (the first failure, if any run failed).
fn median(mut runs: Vec<Result<Figures, String>>, job: &Job) -> Result<Figures, String> {
    if let Some(i) = runs.iter().position(|r| r.is_err()) {
        return runs.swap_remove(i);
    }
    let mut ok: Vec<Figures> = runs.into_iter().map(|r| r.expect("no failures")).collect();
    ok.sort_by(|a, b| a.m.main(job).total_cmp(&b.m.main(job)));
    Ok(ok[ok.len() / 2])
}

/// Each round's main figure, or none if any round failed.
fn round_figures(runs: &[Result<Figures, String>], job: &Job) -> Vec<f64> {
    runs.iter()
        .map(|r| r.as_ref().ok().map(|f| f.m.main(job)))
        .collect::<Option<Vec<f64>>>()
        .unwrap_or_default()
}

/// Records a system that did not start: each of its jobs fails with the reason.
fn not_started(sys: &System, jobs: &[Job], msg: &str, out: &mut Results) {
    eprintln!("bench: {}/{}: {msg}", sys.group, sys.name);
    out.samples.extend(jobs.iter().map(|j| Sample {
        system: *sys,
        job: *j,
        outcome: Err(format!("not run: {msg}")),
        rounds: Vec::new(),
        set_aside: Vec::new(),
    }));
    out.systems.push(SystemReport {
        system: *sys,
        peak_rss_kib: None,
        error: Some(msg.to_string()),
    });
}

/// Reads the server's peak memory, then stops it.
fn finish(sys: System, r: Running) -> SystemReport {
    let peak_rss_kib = r.pid().and_then(|p| peak_rss_kib(p).ok());
    let error = r.stop().err().map(|e| format!("stop: {e:#}"));
    if let Some(e) = &error {
        eprintln!("bench: {}/{}: {e}", sys.group, sys.name);
    }
    SystemReport {
        system: sys,
        peak_rss_kib,
        error,
    }
}

fn start_and_prefill(sys: &System, env: &Env) -> Result<Running> {
    let running = systems::start(sys, env)?;
    if sys.kind.needs_prefill() {
        run_fio(&prefill_args(&running.target, running.region)).context("prefill")?;
    }
    Ok(running)
}

fn log_sample(sys: &System, job: &Job, outcome: &Result<Figures, String>) {
    match outcome {
        Ok(f) => eprintln!(
            "bench: {}/{}/{}: {:.0} {}",
            sys.group,
            sys.name,
            job.name,
            f.m.main(job),
            job.unit()
        ),
        Err(e) => eprintln!(
            "bench: {}/{}/{}: FAILED: {e}",
            sys.group, sys.name, job.name
        ),
    }
}

/// A warm-up run, then the measured run with the server's CPU time read either side. The
/// measured run lasts at least the system's minimum (rate-capped servers).
fn measure(sys: &System, running: &Running, job: &Job, plan: &Plan) -> Result<Figures> {
    let (target, region) = (&running.target, running.region);
    if let Target::Iscsi { url } = target {
        iscsi_perf(job, url, plan.warmup).context("warm-up")?;
        let before = host_ticks().ok();
        let client_before = ended_children_cpu_seconds().ok();
        let m = iscsi_perf(job, url, plan.runtime)?;
        let client_cpu_s = cpu_between(client_before, ended_children_cpu_seconds().ok());
        let steal = steal_since(before);
        return Ok(Figures {
            m,
            cpu_s: None,
            client_cpu_s,
            disk: None,
            steal,
        });
    }
    run_fio(&fio_args(job, target, region, plan.warmup)).context("warm-up")?;
    let cpu = || running.pid().map(cpu_seconds).transpose();
    let disk = || running.disk.as_ref().map(Disk::read).transpose();
    let before = cpu()?;
    let disk_before = disk()?;
    let host_before = host_ticks().ok();
    // A quick pass takes fewer of a rate-capped server's slow requests.
    let floor = match plan.quick {
        true => sys.kind.min_runtime().min(QUICK_CAPPED),
        false => sys.kind.min_runtime(),
    };
    let runtime = plan.runtime.max(floor);
    let client_before = ended_children_cpu_seconds().ok();
    let report = run_fio(&fio_args(job, target, region, runtime))?;
    let client_cpu_s = cpu_between(client_before, ended_children_cpu_seconds().ok());
    let after = cpu()?;
    let disk_after = disk()?;
    let steal = steal_since(host_before);
    let m = parse_report(&report, job)?;
    let cpu_s = cpu_between(before, after);
    let disk = disk_before
        .zip(disk_after)
        .and_then(|(b, a)| diskstat::between(&b, &a));
    Ok(Figures {
        m,
        cpu_s,
        client_cpu_s,
        disk,
        steal,
    })
}

/// CPU seconds between two readings, when both worked.
fn cpu_between(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    before.zip(after).map(|(b, a)| a - b)
}

/// fio with a JSON report; a non-zero exit or a job error is a failure.
fn run_fio(args: &[String]) -> Result<Value> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, report) = fixtures::fio(&argv)?;
    let errors: Vec<i64> = report["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["error"].as_i64())
        .filter(|&e| e != 0)
        .collect();
    if !ok || !errors.is_empty() {
        bail!("fio {} failed (job errors {errors:?})", args.join(" "));
    }
    Ok(report)
}

/// The two raid1 member files under /tmp (ext4: O_DIRECT reaches the disk; /dev/shm would
/// not). Their data areas are written once so reads hit real blocks, not holes; their
/// first MiB stays zero, so uniblk takes them as blank members and initialises them.
struct MemberFiles {
    paths: [PathBuf; 2],
    // Last: the files are removed with it.
    _tmp: Tmp,
}

impl MemberFiles {
    fn create(size: u64) -> Result<Self> {
        let tmp = Tmp::new()?;
        let paths = [tmp.join("member-a.img"), tmp.join("member-b.img")];
        let region = Region {
            offset: DATA_OFFSET,
            size,
        };
        for p in &paths {
            eprintln!("bench: writing {} MiB of {}", size >> 20, p.display());
            sparse_file(p, DATA_OFFSET + size)?;
            let target = Target::Files {
                paths: vec![p.clone()],
            };
            run_fio(&prefill_args(&target, region))
                .with_context(|| format!("prefill {}", p.display()))?;
        }
        Ok(Self { paths, _tmp: tmp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(iops: f64) -> Figures {
        Figures {
            m: Measured {
                iops,
                bytes_per_sec: iops * 4096.0,
                clat_mean_us: iops / 1000.0,
                clat_p99_us: 0.0,
                ios: 1,
            },
            cpu_s: Some(iops),
            client_cpu_s: None,
            disk: None,
            steal: None,
        }
    }

    #[test]
    fn rounds_report_the_median_run_whole_or_a_failure() {
        let job = JOBS
            .iter()
            .find(|j| j.name == "randwrite-4k-qd32x2")
            .unwrap();
        let runs = vec![Ok(figures(90.0)), Ok(figures(70.0)), Ok(figures(110.0))];
        let m = median(runs, job).unwrap();
        assert_eq!(m.m.iops, 90.0);
        assert_eq!(m.cpu_s, Some(90.0), "the median run's own CPU figure");
        assert_eq!(median(vec![Ok(figures(5.0))], job).unwrap().m.iops, 5.0);
        let failed = vec![Ok(figures(1.0)), Err("fio failed".to_string())];
        assert_eq!(median(failed, job).unwrap_err(), "fio failed");
    }

    #[test]
    fn spread_is_the_range_of_the_rounds_over_their_median() {
        let job = *JOBS
            .iter()
            .find(|j| j.name == "randread-4k-qd32x2")
            .unwrap();
        let runs = vec![Ok(figures(97.0)), Ok(figures(131.0)), Ok(figures(120.0))];
        let sample = |rounds| Sample {
            system: SYSTEMS[0],
            job,
            outcome: Ok(figures(120.0)),
            rounds,
            set_aside: Vec::new(),
        };
        let s = sample(round_figures(&runs, &job));
        assert_eq!(s.rounds, [97.0, 131.0, 120.0], "every round, in order");
        assert!((s.spread().unwrap() - 34.0 / 120.0).abs() < 1e-9);
        assert_eq!(
            sample(vec![120.0]).spread(),
            None,
            "one round has no spread"
        );
        let failed = vec![Ok(figures(1.0)), Err("fio failed".to_string())];
        assert!(round_figures(&failed, &job).is_empty());
    }

    #[test]
    fn a_round_with_heavy_steal_is_redone_once_per_job_in_full_runs_only() {
        let stolen = |steal| {
            let mut f = figures(1.0);
            f.steal = steal;
            Some(Ok(f))
        };
        let round = vec![stolen(Some(0.02)), None, stolen(Some(0.31)), stolen(None)];
        assert_eq!(worst_steal(&round), 0.31);
        assert_eq!(worst_steal(&[Some(Err("x".into())), None]), 0.0);
        let full = Plan::full();
        assert!(should_redo(&full, 0, &round));
        assert!(
            !should_redo(&full, 0, &[stolen(Some(0.05)), stolen(None)]),
            "little steal"
        );
        assert!(!should_redo(&full, MAX_STEAL_REDOS, &round), "budget spent");
        assert!(
            !should_redo(&Plan::quick(), 0, &round),
            "never in a quick run"
        );
        let mut failed = round.clone();
        failed.push(Some(Err("fio failed".into())));
        assert!(
            !should_redo(&full, 0, &failed),
            "a failure is reported, not redone"
        );
    }
}
