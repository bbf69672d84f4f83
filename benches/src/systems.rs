//! The systems under test, grouped into comparisons: the first system of each group is
//! uniblk, the others are its peers, and every ratio is uniblk / peer within a group.
//!
//! The `remote` group (issue 4) compares arrays with their own members instead: it has no
//! system named `uniblk`, each of its systems runs only the job its comparison needs, and
//! [`comparisons`] names what is divided by what.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fixtures::{
    pid_alive, LunSpec, Nbdkit, NbdkitServer, NetnsPair, QemuNbd, QuietDaemon, Tgtd, Vblade,
    DIR_PLACEHOLDER,
};

use crate::diskstat::Disk;
use crate::jobs::{Region, Target};

/// Every array's data starts 1 MiB into each member (DESIGN.md, on-disk metadata).
pub const DATA_OFFSET: u64 = 1 << 20;
/// The size of nbdkit's memory and null disks, and of uniblk's `mem:` / `null:` members
/// (spelt [`DISK`] in a layout).
pub const DISK_SIZE: u64 = 1 << 30;
const DISK: &str = "1GiB";
/// The export name of every uniblk array here.
const ARRAY: &str = "bench";
/// nbdkit's rate filter on each rate-capped member: 50 megabits per second in total over
/// all of a server's connections (nbdkit counts bits).
pub const RATE_CAP: &str = "rate=50M";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// How a system is started and reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// uniblk, a `linear` array of one `mem:1GiB` member.
    UniblkMem(Transport),
    /// `nbdkit memory 1G`.
    NbdkitMemory(Transport),
    /// uniblk `raid1` over the two member files.
    UniblkRaid1,
    /// `qemu-nbd -f raw --cache=none --aio=io_uring` on the first member file.
    QemuNbd,
    /// fio's io_uring engine, O_DIRECT, on the first member file: no server at all.
    FioDirect,
    /// The same on both member files at once, each fio job spreading its requests over
    /// the two: what the disk gives a reader of both files, as raid1 reads them.
    FioDirectBoth,
    /// uniblk, a `linear` array of one `null:1GiB` member.
    UniblkNull,
    /// `nbdkit null 1G`.
    NbdkitNull,
    /// uniblk `raid1` of the first member file and `nbdkit memory 1G` on a unix socket.
    UniblkRaid1FileNbdkit,
    /// uniblk, a `linear` array of the second member file alone (the local member of
    /// [`Kind::UniblkRaid1FileNbdkit`] on its own, through the same daemon and export).
    UniblkLinearFile,
    /// uniblk `raid0` of two `nbdkit memory 1G` members, each capped with [`RATE_CAP`].
    UniblkRaid0Capped,
    /// One `nbdkit memory 1G` capped with [`RATE_CAP`], read by fio directly.
    NbdkitCapped,
    /// uniblk, a `linear` array of one iSCSI LUN: tgtd serving the first member file.
    UniblkIscsi,
    /// libiscsi's iscsi-perf straight on such a LUN (its own tgtd, the same file).
    IscsiPerf,
    /// uniblk, a `linear` array of one AoE member: vblade serving a 1 GiB file in
    /// /dev/shm over a veth pair at MTU [`AOE_MTU`], the daemon in the initiator's
    /// network namespace (issue 7).
    UniblkAoe,
}

/// The AoE group's link: jumbo frames, 17 sectors per frame.
pub const AOE_MTU: u32 = 9000;

impl Kind {
    /// Memory disks start as holes; they are written once before reads are measured (and
    /// before writes, where the memory member would otherwise allocate on first touch
    /// while nbdkit alone does not). Rate-capped members are not: reading holes through
    /// the cap costs the same, and filling them at 6 MB/s would take minutes.
    pub fn needs_prefill(self) -> bool {
        matches!(
            self,
            Kind::UniblkMem(_)
                | Kind::NbdkitMemory(_)
                | Kind::UniblkRaid1FileNbdkit
                | Kind::UniblkAoe
        )
    }

    /// Whether this system serves the two member files (made once per run).
    pub fn uses_files(self) -> bool {
        matches!(
            self,
            Kind::UniblkRaid1
                | Kind::QemuNbd
                | Kind::FioDirect
                | Kind::FioDirectBoth
                | Kind::UniblkRaid1FileNbdkit
                | Kind::UniblkLinearFile
                | Kind::UniblkIscsi
                | Kind::IscsiPerf
        )
    }

    /// The shortest measured run that gives a steady figure. A rate-capped server moves
    /// only a few MiB per second: a short run would count a handful of 1 MiB requests.
    pub fn min_runtime(self) -> std::time::Duration {
        match self {
            Kind::UniblkRaid0Capped | Kind::NbdkitCapped => std::time::Duration::from_secs(5),
            _ => std::time::Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct System {
    pub group: &'static str,
    pub name: &'static str,
    pub kind: Kind,
    /// The only jobs this system runs (by name); `None`: every job.
    pub only: Option<&'static [&'static str]>,
    /// Measured runs of each job, interleaved with the group's other systems; the median
    /// is reported. More than one where a disk's speed moves from minute to minute.
    pub rounds: u32,
}

impl System {
    const fn new(group: &'static str, name: &'static str, kind: Kind) -> Self {
        Self {
            group,
            name,
            kind,
            only: None,
            rounds: 1,
        }
    }

    /// Each job measured `n` times, interleaved with the group's other systems.
    const fn rounds(mut self, n: u32) -> Self {
        self.rounds = n;
        self
    }

    /// This system runs only `jobs`.
    const fn only(mut self, jobs: &'static [&'static str]) -> Self {
        self.only = Some(jobs);
        self
    }

    pub fn is_uniblk(&self) -> bool {
        self.name == "uniblk"
    }

    /// Whether this system runs the job named `job`.
    pub fn runs(&self, job: &str) -> bool {
        self.only.is_none_or(|o| o.contains(&job))
    }
}

/// A group without a system named `uniblk` compares by [`comparisons`] only.
pub fn has_uniblk(group: &str) -> bool {
    SYSTEMS.iter().any(|s| s.group == group && s.is_uniblk())
}

/// One explicit ratio, for `job` within `group`, with the ratio the issue asks for as its
/// `target` (met when the ratio reaches it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub group: &'static str,
    /// Says what is divided by what.
    pub label: &'static str,
    pub job: &'static str,
    pub system: &'static str,
    pub baseline: &'static [&'static str],
    pub metric: Metric,
    pub target: f64,
}

/// What a comparison divides, always so that above 1.0 `system` does better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `system`'s main figure (IOPS or MiB/s) over the slowest baseline's.
    Main,
    /// The hungriest baseline's server CPU per I/O over `system`'s: above 1.0 `system`
    /// spends less CPU on each I/O.
    CpuPerIo,
}

impl Comparison {
    /// A throughput target: `system` over the slowest of `baseline`.
    const fn main(
        group: &'static str,
        label: &'static str,
        job: &'static str,
        system: &'static str,
        baseline: &'static [&'static str],
        target: f64,
    ) -> Self {
        Comparison {
            group,
            label,
            job,
            system,
            baseline,
            metric: Metric::Main,
            target,
        }
    }

    /// Issue 5's "server CPU seconds per I/O below nbdkit's", for `job` in `group`.
    const fn cpu_below_nbdkit(group: &'static str, job: &'static str) -> Self {
        Comparison {
            group,
            label: "nbdkit's server CPU per I/O / uniblk's",
            job,
            system: "uniblk",
            baseline: &["nbdkit"],
            metric: Metric::CpuPerIo,
            target: 1.0,
        }
    }
}

const RANDWRITE_QD32: &str = "randwrite-4k-qd32x2";
/// Issue 6: one initiator at QD32, uniblk over one iSCSI member vs iscsi-perf.
const RANDREAD_QD32_ONE: &str = "randread-4k-qd32";
/// The target every benchmark LUN is served under.
const BENCH_IQN: &str = "iqn.2026-11.io.uniblk.bench:lun";
const SEQREAD_1M: &str = "read-1m-qd8";
const AOE_JOBS: &[&str] = &[
    SEQREAD_1M,
    "write-1m-qd8",
    "randread-4k-qd32x2",
    RANDWRITE_QD32,
];

/// A figure measured once outside this harness, standing in for a peer that cannot run
/// under fio: the group, the name comparisons use, the job and its main figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    pub group: &'static str,
    pub name: &'static str,
    pub job: &'static str,
    pub value: f64,
}

/// Issue 7: a plain Python AF_PACKET AoE initiator reached 444 MiB/s with 8 KiB requests
/// at QD8-16 on these machines (MTU 9000, vblade).
pub const REFERENCES: [Reference; 1] = [Reference {
    group: "aoe",
    name: "python-aoe-initiator",
    job: SEQREAD_1M,
    value: 444.0,
}];

/// The reference figure for `name` in `group` and `job`, if there is one.
pub fn reference(group: &str, name: &str, job: &str) -> Option<f64> {
    REFERENCES
        .iter()
        .find(|r| (r.group, r.name, r.job) == (group, name, job))
        .map(|r| r.value)
}

/// The jobs every group of nbdkit and uniblk runs, whose server CPU issue 5 compares.
const CPU_JOBS: [&str; 6] = [
    "randread-4k-qd1",
    "randwrite-4k-qd1",
    "randread-4k-qd32x2",
    RANDWRITE_QD32,
    SEQREAD_1M,
    "write-1m-qd8",
];

/// Every target the issues set, checked in each run that has its systems: issue 5's
/// throughput and CPU targets, issue 6's iSCSI ratio, issue 4's array-over-member ratios
/// and issue 7's AoE figure.
pub fn comparisons() -> Vec<Comparison> {
    use Comparison as C;
    let mem = |job, target| {
        let label = "uniblk / nbdkit memory";
        C::main("mem-unix", label, job, "uniblk", &["nbdkit"], target)
    };
    let file = |job, target| {
        let label = "uniblk raid1 / qemu-nbd on one file";
        C::main("raid1-file", label, job, "uniblk", &["qemu-nbd"], target)
    };
    let mut out = vec![
        mem("randread-4k-qd32x2", 1.5),
        mem(RANDWRITE_QD32, 1.5),
        mem(SEQREAD_1M, 1.2),
        mem("write-1m-qd8", 1.2),
        file("randread-4k-qd32x2", 1.3),
        file(RANDWRITE_QD32, 0.9),
    ];
    for group in ["mem-unix", "mem-tcp", "null"] {
        out.extend(CPU_JOBS.iter().map(|job| C::cpu_below_nbdkit(group, job)));
    }
    out.extend([
        C::main(
            "iscsi",
            "uniblk over one iSCSI member / iscsi-perf on the same LUN",
            RANDREAD_QD32_ONE,
            "uniblk",
            &["iscsi-perf"],
            0.9,
        ),
        C::main(
            "remote",
            "raid1(file + nbdkit memory) / slower member alone",
            RANDWRITE_QD32,
            "uniblk-raid1",
            &["file-alone", "nbdkit-alone"],
            0.8,
        ),
        C::main(
            "remote",
            "raid0(2 x nbdkit rate=50M) / one such member alone",
            SEQREAD_1M,
            "uniblk-raid0",
            &["capped-alone"],
            1.8,
        ),
        C::main(
            "aoe",
            "uniblk over one AoE member (MTU 9000) / the Python AF_PACKET initiator's 444 MiB/s",
            SEQREAD_1M,
            "uniblk-aoe",
            &["python-aoe-initiator"],
            1.5,
        ),
    ]);
    out
}

/// Every system, group by group, uniblk first in each group (the `remote` group: the
/// arrays first, then their members alone).
pub const SYSTEMS: [System; 18] = [
    // The groups that carry issue 5's and 6's targets (throughput, and server CPU per
    // I/O in mem-tcp and null) report the median of three interleaved rounds: on these
    // shared 2-vCPU machines one run of a system moves by more than the targets' margins
    // from one minute to the next (null 4k writes at QD1: 16.0k IOPS in one run, 33-38k
    // in the next ones).
    System::new("mem-unix", "uniblk", Kind::UniblkMem(Transport::Unix)).rounds(3),
    System::new("mem-unix", "nbdkit", Kind::NbdkitMemory(Transport::Unix)).rounds(3),
    System::new("mem-tcp", "uniblk", Kind::UniblkMem(Transport::Tcp)).rounds(3),
    System::new("mem-tcp", "nbdkit", Kind::NbdkitMemory(Transport::Tcp)).rounds(3),
    System::new("raid1-file", "uniblk", Kind::UniblkRaid1).rounds(3),
    System::new("raid1-file", "qemu-nbd", Kind::QemuNbd).rounds(3),
    System::new("raid1-file", "fio-direct", Kind::FioDirect),
    System::new("raid1-file", "fio-direct-both", Kind::FioDirectBoth),
    System::new("null", "uniblk", Kind::UniblkNull).rounds(3),
    System::new("null", "nbdkit", Kind::NbdkitNull).rounds(3),
    // The file lives on the machine's disk, whose speed drifts by a third within minutes
    // here: the raid1/file-alone ratio is the median of three interleaved rounds.
    System::new("remote", "uniblk-raid1", Kind::UniblkRaid1FileNbdkit)
        .only(&[RANDWRITE_QD32])
        .rounds(3),
    System::new("remote", "file-alone", Kind::UniblkLinearFile)
        .only(&[RANDWRITE_QD32])
        .rounds(3),
    System::new(
        "remote",
        "nbdkit-alone",
        Kind::NbdkitMemory(Transport::Unix),
    )
    .only(&[RANDWRITE_QD32]),
    System::new("remote", "uniblk-raid0", Kind::UniblkRaid0Capped).only(&[SEQREAD_1M]),
    System::new("remote", "capped-alone", Kind::NbdkitCapped).only(&[SEQREAD_1M]),
    System::new("iscsi", "uniblk", Kind::UniblkIscsi)
        .only(&[RANDREAD_QD32_ONE])
        .rounds(3),
    System::new("iscsi", "iscsi-perf", Kind::IscsiPerf)
        .only(&[RANDREAD_QD32_ONE])
        .rounds(3),
    System::new("aoe", "uniblk-aoe", Kind::UniblkAoe).only(AOE_JOBS),
];

/// A running system: the server process (none for fio-direct) and how fio reaches it.
pub struct Running {
    server: Server,
    pub target: Target,
    /// Where the benchmark's bytes live on this target.
    pub region: Region,
    /// The disk under the member files, for the systems that serve them.
    pub disk: Option<Disk>,
}

enum Server {
    Uniblk(QuietDaemon),
    /// A daemon and the nbdkit servers that are its members (stopped after it).
    UniblkOver(QuietDaemon, Vec<NbdkitServer>),
    Nbdkit(NbdkitServer),
    QemuNbd(QemuNbd),
    /// A daemon over an iSCSI LUN, and the tgtd serving it (stopped after it).
    UniblkOverTgtd(QuietDaemon, Tgtd),
    /// tgtd alone, read by iscsi-perf (no server CPU is measured: iscsi-perf is the
    /// initiator, tgtd the target on both sides of the ratio).
    Tgtd(Tgtd),
    UniblkAoe(Box<AoeServer>),
    None,
}

/// The daemon, then the target, then the link, then the target's file: dropped in that
/// order (struct fields drop as declared).
struct AoeServer {
    daemon: QuietDaemon,
    vblade: Vblade,
    _link: NetnsPair,
    _file: fixtures::Tmp,
}

impl Running {
    /// The server's PID, for CPU time and memory; `None` when there is no server.
    pub fn pid(&self) -> Option<u32> {
        match &self.server {
            Server::Uniblk(d) | Server::UniblkOver(d, _) | Server::UniblkOverTgtd(d, _) => {
                Some(d.pid())
            }
            Server::UniblkAoe(a) => Some(a.daemon.pid()),
            Server::Nbdkit(s) => Some(s.pid()),
            Server::QemuNbd(q) => Some(q.pid()),
            Server::Tgtd(_) | Server::None => None,
        }
    }

    /// Stops the server and checks it is gone. A daemon that does not exit 0 on SIGTERM
    /// failed its clean shutdown, which is worth a failure here too.
    pub fn stop(mut self) -> Result<()> {
        let pid = self.pid();
        match &mut self.server {
            Server::Uniblk(d) => stop_daemon(d)?,
            Server::UniblkOver(d, members) => {
                stop_daemon(d)?;
                for m in members {
                    m.stop()?;
                }
            }
            Server::Nbdkit(s) => s.stop()?,
            Server::QemuNbd(q) => q.stop()?,
            Server::UniblkOverTgtd(d, t) => {
                stop_daemon(d)?;
                t.stop()?;
            }
            Server::Tgtd(t) => t.stop()?,
            Server::UniblkAoe(a) => {
                stop_daemon(&mut a.daemon)?;
                a.vblade.kill9()?;
            }
            Server::None => {}
        }
        if let Some(pid) = pid.filter(|&p| pid_alive(p)) {
            bail!("server {pid} is still alive after stop");
        }
        Ok(())
    }
}

fn stop_daemon(d: &mut QuietDaemon) -> Result<()> {
    let status = d.stop()?;
    if !status.success() {
        bail!(
            "uniblk daemon exited {status} on SIGTERM; its log:\n{}",
            d.log()
        );
    }
    Ok(())
}

/// What starting a system needs from the run.
pub struct Env<'a> {
    pub daemon_bin: &'a Path,
    /// The two raid1 member files (already written), when a file system is started.
    pub files: Option<&'a [PathBuf; 2]>,
    /// Bytes each job works on.
    pub size: u64,
}

/// Starts `sys` and returns how to reach it.
pub fn start(sys: &System, env: &Env) -> Result<Running> {
    let nbd_region = Region {
        offset: 0,
        size: env.size,
    };
    // qemu-nbd and fio see the whole file: point them at the bytes uniblk stores data in.
    let file_region = Region {
        offset: DATA_OFFSET,
        size: env.size,
    };
    let (server, target) = match sys.kind {
        Kind::UniblkMem(t) => uniblk(env, "linear", &[format!("mem:{DISK}")], t)?,
        Kind::UniblkNull => uniblk(env, "linear", &[format!("null:{DISK}")], Transport::Unix)?,
        Kind::UniblkRaid1 => {
            let members: Vec<String> = files(env)?
                .iter()
                .map(|f| format!("file:{}", f.display()))
                .collect();
            uniblk(env, "raid1", &members, Transport::Unix)?
        }
        Kind::NbdkitMemory(t) => nbdkit("memory", t)?,
        Kind::NbdkitNull => nbdkit("null", Transport::Unix)?,
        Kind::QemuNbd => qemu_nbd(&files(env)?[0])?,
        Kind::UniblkRaid1FileNbdkit => {
            let kit = memory_member(&[])?;
            let members = [file_member(&files(env)?[0]), kit.uri()];
            uniblk_over(env, "raid1", &members, vec![kit])?
        }
        Kind::UniblkLinearFile => uniblk(
            env,
            "linear",
            &[file_member(&files(env)?[1])],
            Transport::Unix,
        )?,
        Kind::UniblkRaid0Capped => {
            let kits = vec![memory_member(&[RATE_CAP])?, memory_member(&[RATE_CAP])?];
            let members: Vec<String> = kits.iter().map(NbdkitServer::uri).collect();
            uniblk_over(env, "raid0", &members, kits)?
        }
        Kind::NbdkitCapped => {
            let s = memory_member(&[RATE_CAP])?;
            let uri = s.uri();
            (Server::Nbdkit(s), Target::Nbd { uri })
        }
        Kind::UniblkIscsi => {
            let t = tgtd_over(&files(env)?[0])?;
            let (server, target) = uniblk(env, "linear", &[t.url(BENCH_IQN, 1)], Transport::Unix)?;
            let Server::Uniblk(d) = server else {
                unreachable!("uniblk() starts a daemon")
            };
            (Server::UniblkOverTgtd(d, t), target)
        }
        Kind::IscsiPerf => {
            let t = tgtd_over(&files(env)?[0])?;
            let url = t.url(BENCH_IQN, 1);
            (Server::Tgtd(t), Target::Iscsi { url })
        }
        Kind::UniblkAoe => uniblk_aoe(env)?,
        Kind::FioDirect | Kind::FioDirectBoth => {
            let all = files(env)?;
            let paths = match sys.kind {
                Kind::FioDirect => vec![all[0].clone()],
                _ => all.to_vec(),
            };
            return Ok(Running {
                server: Server::None,
                target: Target::Files { paths },
                region: file_region,
                disk: member_disk(sys, env),
            });
        }
    };
    let region = if sys.kind == Kind::QemuNbd {
        file_region
    } else {
        nbd_region
    };
    Ok(Running {
        server,
        target,
        region,
        disk: member_disk(sys, env),
    })
}

/// The disk under the member files, when `sys` serves them.
fn member_disk(sys: &System, env: &Env) -> Option<Disk> {
    let files = env.files.filter(|_| sys.kind.uses_files())?;
    Disk::of(&files[0])
}

fn files<'a>(env: &Env<'a>) -> Result<&'a [PathBuf; 2]> {
    env.files.context("member files were not prepared")
}

/// The daemon at `warn`: debug logging per request would be what we measure.
fn uniblk(env: &Env, level: &str, members: &[String], t: Transport) -> Result<(Server, Target)> {
    let listen = match t {
        Transport::Unix => format!("unix:{DIR_PLACEHOLDER}/{ARRAY}.sock"),
        Transport::Tcp => format!("127.0.0.1:{}", fixtures::free_port()?),
    };
    let layout = layout_toml(level, members, &listen);
    let d = QuietDaemon::start(env.daemon_bin, &layout, "warn")?;
    let uri = match t {
        Transport::Unix => format!(
            "nbd+unix:///{ARRAY}?socket={}/{ARRAY}.sock",
            d.dir().display()
        ),
        Transport::Tcp => format!("nbd://{}/{ARRAY}", &listen),
    };
    Ok((Server::Uniblk(d), Target::Nbd { uri }))
}

/// vblade on a 1 GiB file in /dev/shm (memory speed: the link and the initiators are
/// measured, not a disk) over a veth pair, and the daemon in the initiator's namespace.
fn uniblk_aoe(env: &Env) -> Result<(Server, Target)> {
    if !fixtures::which("vblade").is_some_and(|_| is_root()) {
        bail!("the AoE system needs root and vblade (apt-get install vblade)");
    }
    let dir = fixtures::Tmp::new_in("/dev/shm")?;
    let file = dir.join("aoe-target.img");
    fixtures::sparse_file(&file, DISK_SIZE)?;
    let pair = NetnsPair::new(AOE_MTU)?;
    let vblade = Vblade::serve(&pair, 7, 3, &file)?;
    let members = [format!("aoe:{}/7.3", pair.initiator_if)];
    let listen = format!("unix:{DIR_PLACEHOLDER}/{ARRAY}.sock");
    let layout = layout_toml("linear", &members, &listen);
    let d = QuietDaemon::start_in(&pair.exec_prefix(), env.daemon_bin, &layout, "warn")?;
    let uri = format!(
        "nbd+unix:///{ARRAY}?socket={}/{ARRAY}.sock",
        d.dir().display()
    );
    let server = AoeServer {
        daemon: d,
        vblade,
        _link: pair,
        _file: dir,
    };
    Ok((Server::UniblkAoe(Box::new(server)), Target::Nbd { uri }))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `nbdkit memory 1G` on a unix socket, behind the rate filter when `rate` is given.
fn memory_member(rate: &[&str]) -> Result<NbdkitServer> {
    let mut spec = Nbdkit::memory(DISK_SIZE);
    if !rate.is_empty() {
        spec = spec.filter("rate", rate);
    }
    spec.start().context("starting nbdkit memory as a member")
}

fn file_member(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// [`uniblk`] over members that are servers of their own (unix socket export), which stop
/// after the daemon.
fn uniblk_over(
    env: &Env,
    level: &str,
    members: &[String],
    servers: Vec<NbdkitServer>,
) -> Result<(Server, Target)> {
    let (server, target) = uniblk(env, level, members, Transport::Unix)?;
    let Server::Uniblk(d) = server else {
        unreachable!("uniblk() starts a daemon")
    };
    Ok((Server::UniblkOver(d, servers), target))
}

/// A one-array layout exported over NBD on `listen`.
pub fn layout_toml(level: &str, members: &[String], listen: &str) -> String {
    let members: Vec<String> = members.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[array]]\nname = \"{ARRAY}\"\nlevel = \"{level}\"\nmembers = [{}]\n\
         export.nbd = {{ listen = [\"{listen}\"] }}\n",
        members.join(", ")
    )
}

fn nbdkit(plugin: &str, t: Transport) -> Result<(Server, Target)> {
    let mut spec = Nbdkit::plugin(plugin, &[&format!("size={DISK_SIZE}")]);
    if t == Transport::Tcp {
        spec = spec.tcp();
    }
    let s = spec
        .start()
        .with_context(|| format!("starting nbdkit {plugin}"))?;
    let uri = s.uri();
    Ok((Server::Nbdkit(s), Target::Nbd { uri }))
}

/// tgtd on 127.0.0.1 serving `file` as LUN 1 of [`BENCH_IQN`] (512-byte blocks,
/// through the page cache as tgtd's default backing store does).
fn tgtd_over(file: &Path) -> Result<Tgtd> {
    warm_page_cache(file)?;
    let mut t = Tgtd::start().context("starting tgtd")?;
    t.add_target(1, BENCH_IQN, &[LunSpec::file(file, 512)])?;
    Ok(t)
}

/// Reads all of `file` through the page cache. The member files are written with
/// O_DIRECT, so without this tgtd's buffered reads would come from the disk for
/// whichever system runs first and from memory for the one after it: the iSCSI group
/// would measure the disk and the order, not the initiators.
fn warm_page_cache(file: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while f
        .read(&mut buf)
        .with_context(|| format!("reading {}", file.display()))?
        > 0
    {}
    Ok(())
}

fn qemu_nbd(file: &Path) -> Result<(Server, Target)> {
    let q = QemuNbd::serve_with(file, &["--cache=none", "--aio=io_uring"])
        .context("starting qemu-nbd")?;
    let uri = q.uri();
    Ok((Server::QemuNbd(q), Target::Nbd { uri }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_starts_with_uniblk_and_has_a_peer() {
        for (i, s) in SYSTEMS.iter().enumerate() {
            if !has_uniblk(s.group) {
                continue;
            }
            let first_of_group = i == 0 || SYSTEMS[i - 1].group != s.group;
            assert_eq!(first_of_group, s.is_uniblk(), "{s:?}");
            if first_of_group {
                assert!(SYSTEMS.get(i + 1).is_some_and(|n| n.group == s.group));
            }
        }
    }

    #[test]
    fn comparisons_name_systems_of_their_group_that_run_their_job() {
        for c in &comparisons() {
            for name in std::iter::once(&c.system).chain(c.baseline) {
                if reference(c.group, name, c.job).is_some() {
                    continue;
                }
                let sys = SYSTEMS
                    .iter()
                    .find(|s| s.group == c.group && s.name == *name)
                    .unwrap_or_else(|| panic!("{c:?}: no system {name} in group {}", c.group));
                assert!(sys.runs(c.job), "{name} does not run {}", c.job);
                assert!(crate::jobs::JOBS.iter().any(|j| j.name == c.job));
            }
        }
        // Every system of a comparison-only group is in some comparison.
        for s in SYSTEMS.iter().filter(|s| !has_uniblk(s.group)) {
            assert!(
                comparisons()
                    .iter()
                    .any(|c| c.system == s.name || c.baseline.contains(&s.name)),
                "{s:?}"
            );
        }
    }

    #[test]
    fn layout_names_members_and_listener() {
        let t = layout_toml(
            "raid1",
            &["file:/tmp/a".into(), "file:/tmp/b".into()],
            "unix:/x.sock",
        );
        assert!(
            t.contains("members = [\"file:/tmp/a\", \"file:/tmp/b\"]"),
            "{t}"
        );
        assert!(t.contains("listen = [\"unix:/x.sock\"]"), "{t}");
        assert!(t.contains("level = \"raid1\""), "{t}");
    }
}
