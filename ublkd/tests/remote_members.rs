//! Remote (NBD) members in the daemon, end to end (issue 4): the real `ublkd` runs arrays
//! that mix local member files with real NBD servers (nbdkit, qemu-nbd, nbd-server) as
//! members, and real clients (fio's nbd engine with crc32c verification, qemu-io, nbdcopy)
//! check what reads back through the daemon's export. Faults are injected into the real
//! servers mid-run (nbdkit's error, pause and delay filters, SIGKILL) and every fault test
//! asserts both that the client saw no error and which member status reports faulty, why.
//! After a clean stop the members' data areas are compared with md's layout, read from the
//! files behind qemu-nbd and nbd-server and over NBD from nbdkit.
//!
//! A test whose peer is missing skips with a message (CI installs everything, and there a
//! missing peer fails instead: see `fixtures::skip`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Result;
use fixtures::{
    log_tail, ArrayRig as Rig, NbdServerPeer, Nbdkit, NbdkitRestartable, NbdkitServer,
    PauseControl, QemuNbd, Tmp,
};
use raidcore::superblock::{SbState, Superblock};
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Where array data starts on every member (the metadata area before it).
const DATA_OFFSET: u64 = MIB;
/// The superblock: 4 KiB at byte 4096 of every member.
const SB_AT: usize = 4096;
const CHUNK: u64 = 64 * KIB;
/// Every member here: 64 MiB of data after the metadata area.
const MEMBER_SIZE: u64 = 65 * MIB;
const MEMBER_DATA: u64 = MEMBER_SIZE - DATA_OFFSET;
/// How long a state change seen through status may take (probes run every 5 s).
const STATE_TIMEOUT: Duration = Duration::from_secs(20);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ublkd"))
}

fn rig(name: &str, level: &str, members: &[String], remote: &str) -> Rig {
    Rig::start(bin(), name, level, members, remote)
}

// ---- The daemon -----------------------------------------------------------------------

// ---- fio ------------------------------------------------------------------------------

/// fio's nbd engine: 2 jobs (a connection each) at queue depth 32 on disjoint regions of
/// `per_job` bytes from offset 0, random writes then crc32c verification of every block.
/// With `verify_only`, no writes: every block the same job wrote is read back and checked.
fn fio_args(uri: &str, per_job: u64, bs: &str, verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=verify",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--iodepth=32",
        "--numjobs=2",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ]
    .map(String::from)
    .into();
    a.extend([
        format!("--uri={uri}"),
        bs.to_string(),
        format!("--size={per_job}"),
        format!("--offset_increment={per_job}"),
    ]);
    if verify_only {
        a.push("--verify_only=1".into());
    }
    a
}

fn run_fio(args: &[String]) -> Result<(bool, Value)> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    fixtures::fio(&argv)
}

/// fio ended with success, no job error, and every job wrote (unless `verify_only`) and
/// read back its whole region.
fn assert_fio_clean(res: Result<(bool, Value)>, per_job: u64, verify_only: bool) {
    let (ok, report) = res.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(ok, "fio failed:\n{report:#}");
    let jobs = report["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len(), 2, "{report:#}");
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job error: {j:#}");
        if !verify_only {
            assert_eq!(
                j["write"]["io_bytes"].as_u64(),
                Some(per_job),
                "fio did not write its whole region: {j:#}"
            );
        }
        assert_eq!(
            j["read"]["io_bytes"].as_u64(),
            Some(per_job),
            "fio did not verify its whole region: {j:#}"
        );
    }
}

fn fio_verified(uri: &str, per_job: u64, bs: &str) {
    assert_fio_clean(run_fio(&fio_args(uri, per_job, bs, false)), per_job, false);
}

/// [`fio_verified`] on its own thread, so the test can break a member meanwhile.
fn fio_background(uri: &str, per_job: u64, bs: &str) -> JoinHandle<Result<(bool, Value)>> {
    let args = fio_args(uri, per_job, bs, false);
    thread::spawn(move || run_fio(&args))
}

/// Waits until member `m` has taken `bytes` of writes: fio is well into its write phase.
/// Panics if fio ends first (the fault could not be injected mid-run).
fn wait_written(rig: &Rig, m: usize, bytes: u64, fio: &JoinHandle<Result<(bool, Value)>>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if rig.counter(m, "bytes_written") >= bytes {
            return;
        }
        assert!(
            !fio.is_finished(),
            "fio ended before member {m} took {bytes} bytes of writes: the fault could not \
             be injected mid-run"
        );
        assert!(Instant::now() < deadline, "fio made no progress");
        thread::sleep(Duration::from_millis(10));
    }
}

// ---- Member images and md's layouts -----------------------------------------------------

/// Where the test can read a member's bytes after the daemon stopped.
enum Backing {
    /// A file (a local member, or the file behind qemu-nbd or nbd-server).
    File(PathBuf),
    /// Only over NBD (nbdkit memory): read with nbdcopy.
    Nbd(String),
}

impl Backing {
    /// The whole member, metadata area included.
    fn image(&self) -> Vec<u8> {
        match self {
            Backing::File(p) => std::fs::read(p).unwrap(),
            Backing::Nbd(uri) => fixtures::nbd_image(uri).unwrap_or_else(|e| panic!("{e:#}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Raid0,
    Raid1,
    Raid10,
}

/// The copies of array chunk `c` as (member, byte offset in the member's data area), from
/// md's rules for `n` equal members whose data areas are whole chunks.
fn chunk_copies(level: Level, n: usize, c: u64) -> Vec<(usize, u64)> {
    let n64 = n as u64;
    match level {
        Level::Raid1 => (0..n).map(|m| (m, c * CHUNK)).collect(),
        Level::Raid0 => vec![((c % n64) as usize, c / n64 * CHUNK)],
        // near-2: the two copies of chunk c sit at positions 2c and 2c+1, row-major.
        Level::Raid10 => (0..2)
            .map(|k| {
                let pos = 2 * c + k;
                ((pos % n64) as usize, pos / n64 * CHUNK)
            })
            .collect(),
    }
}

/// After a clean stop: every member carries a clean superblock with its role, and every
/// chunk of `array` (read through the export before the stop) is where md puts it, on
/// every copy.
fn assert_members_match(level: Level, array: &[u8], members: &[Backing]) {
    let images: Vec<Vec<u8>> = members.iter().map(Backing::image).collect();
    for (i, img) in images.iter().enumerate() {
        assert!(
            img.len() as u64 >= MEMBER_SIZE,
            "member {i} holds {} bytes",
            img.len()
        );
        let sb = Superblock::decode(&img[SB_AT..SB_AT + 4096])
            .unwrap_or_else(|e| panic!("member {i}: no valid superblock: {e}"));
        assert_eq!(sb.state, SbState::Clean, "member {i}: superblock not clean");
        assert_eq!(sb.role as usize, i, "member {i}: superblock role");
    }
    for c in 0..array.len() as u64 / CHUNK {
        let want = &array[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
        for (m, off) in chunk_copies(level, members.len(), c) {
            let at = (DATA_OFFSET + off) as usize;
            let got = &images[m][at..at + CHUNK as usize];
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "{level:?}: array byte {} should be {:#04x} on member {m} at data offset {} \
                     but is {:#04x}",
                    c * CHUNK + i as u64,
                    want[i],
                    off + i as u64,
                    got[i]
                );
            }
        }
    }
}

/// Every 4 KiB block of `[0, len)` of the image holds data (fio's verify blocks never are
/// all zeroes): the comparison compared something.
fn assert_written(image: &[u8], len: u64) {
    let empty = image[..len as usize]
        .chunks(4096)
        .position(|b| b.iter().all(|&x| x == 0));
    assert!(
        empty.is_none(),
        "block at {} of the array reads as zeroes after fio wrote it",
        empty.unwrap_or(0) * 4096
    );
}

fn member_file(dir: &Tmp, name: &str) -> PathBuf {
    let p = dir.join(name);
    fixtures::sparse_file(&p, MEMBER_SIZE).unwrap();
    p
}

fn file_addr(p: &Path) -> String {
    format!("file:{}", p.display())
}

// ---- 1. Each server as a member, every level ------------------------------------------

/// fio verify through the array, a read of the whole array through the export, a clean
/// stop, then the members' data areas against md's layout.
fn verify_round(rig: &mut Rig, level: Level, per_job: u64, bs: &str, members: &[Backing]) {
    fio_verified(&rig.uri(), per_job, bs);
    let st = rig.status();
    for (i, m) in st["members"].as_array().unwrap().iter().enumerate() {
        assert_eq!(m["state"], "healthy", "member {i}: {st:#}");
        assert_eq!(m["errors"], 0, "member {i}: {st:#}");
        assert!(
            m["bytes_written"].as_u64().unwrap() > 0,
            "member {i} took no writes: {st:#}"
        );
    }
    let array = fixtures::nbd_image(&rig.uri()).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(array.len() as u64, st["size"].as_u64().unwrap());
    assert_written(&array, 2 * per_job);
    rig.stop_clean();
    assert_members_match(level, &array, members);
}

#[test]
fn raid1_of_a_local_file_and_nbdkit_memory_verifies_and_mirrors() {
    if !fixtures::require_all(&["nbdkit", "fio", "nbdcopy"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let kit = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    let mut rig = rig(
        "r1",
        "raid1",
        &[file_addr(&local), kit.uri()],
        "timeout = \"2s\", connections = 2",
    );
    assert_eq!(rig.status()["size"], MEMBER_DATA);
    // The mirrors compare byte for byte (raid1: the same chunk on both).
    verify_round(
        &mut rig,
        Level::Raid1,
        MEMBER_DATA / 2,
        "--bs=4k",
        &[Backing::File(local), Backing::Nbd(kit.uri())],
    );
}

#[test]
fn raid0_of_nbdkit_and_qemu_nbd_verifies_and_stripes() {
    if !fixtures::require_all(&["nbdkit", "qemu-nbd", "fio", "nbdcopy"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let behind_qemu = member_file(&files, "qemu.img");
    let kit = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    let qemu = QemuNbd::serve(&behind_qemu).unwrap();
    let mut rig = rig("r0", "raid0", &[kit.uri(), qemu.uri()], "timeout = \"2s\"");
    assert_eq!(rig.status()["size"], 2 * MEMBER_DATA);
    // Mixed sizes up to two chunks: requests split across the two servers.
    verify_round(
        &mut rig,
        Level::Raid0,
        24 * MIB,
        "--bssplit=4k/40:64k/30:128k/30",
        &[Backing::Nbd(kit.uri()), Backing::File(behind_qemu)],
    );
}

#[test]
fn raid10_of_local_files_nbd_server_and_nbdkit_verifies_and_mirrors_stripes() {
    if !fixtures::require_all(&["nbdkit", "nbd-server", "fio", "nbdcopy"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let (l0, l2) = (member_file(&files, "l0.img"), member_file(&files, "l2.img"));
    let behind_nbd_server = member_file(&files, "nbd-server.img");
    let nbdsrv = NbdServerPeer::serve(&behind_nbd_server).unwrap();
    let kit = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    // nbd-server over TCP with simple replies only; nbdkit over a unix socket.
    let members = [file_addr(&l0), nbdsrv.uri(), file_addr(&l2), kit.uri()];
    let mut rig = rig("r10", "raid10", &members, "timeout = \"2s\"");
    assert_eq!(rig.status()["size"], 2 * MEMBER_DATA);
    verify_round(
        &mut rig,
        Level::Raid10,
        24 * MIB,
        "--bssplit=4k/40:64k/30:128k/30",
        &[
            Backing::File(l0),
            Backing::File(behind_nbd_server),
            Backing::File(l2),
            Backing::Nbd(kit.uri()),
        ],
    );
}

// ---- 2. Server errors switched on mid-run ---------------------------------------------

/// raid1(local file + nbdkit memory with the error filter, `error_args`); fio runs, and
/// when it is a third into its writes the server starts failing. fio must end clean, and
/// the nbdkit member faulty with an io error.
fn errors_mid_run(error_args: &[&str]) -> (Rig, NbdkitServer, Tmp) {
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let kit = Nbdkit::memory(MEMBER_SIZE)
        .error_filter(error_args)
        .start()
        .unwrap();
    let rig = rig(
        "r1err",
        "raid1",
        &[file_addr(&local), kit.uri()],
        "timeout = \"2s\"",
    );
    let per_job = 24 * MIB;
    let fio = fio_background(&rig.uri(), per_job, "--bs=4k");
    wait_written(&rig, 0, 2 * per_job / 3, &fio);
    kit.set_failing(true).unwrap();
    assert_fio_clean(fio.join().unwrap(), per_job, false);
    rig.assert_healthy(0);
    // Reads prefer the local copy, so read errors surface through the health probe
    // (every 5 s); write errors at the next write.
    rig.wait_faulty(1, STATE_TIMEOUT, |f| f.starts_with("io error"));
    let m = rig.member(1);
    assert_eq!(rig.status()["state"], "degraded", "{m}");
    // The fault sticks once the server is well again: the member missed writes.
    kit.set_failing(false).unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(rig.member(1)["state"], "faulty");
    (rig, kit, files)
}

/// raid0 has no second copy: while the remote member fails reads, a read of one of its
/// chunks gets EIO, reads of the local member's chunks still succeed with their data, and
/// a read spanning both fails as a whole. The array is not degraded by it (nothing to fall
/// back on), and once the server is well again the same chunks read back intact.
#[test]
fn raid0_member_errors_fail_only_that_members_chunks_with_eio() {
    if !fixtures::require_all(&["nbdkit", "qemu-io"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let kit = Nbdkit::memory(MEMBER_SIZE)
        .error_filter(&["error=EIO", "error-pread-rate=100%"])
        .start()
        .unwrap();
    let rig = rig("r0err", "raid0", &[file_addr(&local), kit.uri()], "");
    let uri = rig.uri();
    // Chunks 0 and 2 live on the local file (member 0), 1 and 3 on nbdkit (member 1).
    let c = CHUNK;
    let writes: Vec<String> = (0..4u64)
        .map(|k| format!("write -P {} {} {c}", 0x11 * (k + 1), k * c))
        .collect();
    let refs: Vec<&str> = writes.iter().map(|w| w.as_str()).collect();
    fixtures::qemu_io_ok(&uri, &refs).unwrap();
    kit.set_failing(true).unwrap();
    for k in [0u64, 2] {
        let cmd = format!("read -P {} {} {c}", 0x11 * (k + 1), k * c);
        fixtures::qemu_io_ok(&uri, &[&cmd])
            .unwrap_or_else(|e| panic!("chunk {k} is on the healthy local member: {e:#}"));
    }
    for (what, cmd) in [
        ("chunk 1", format!("read {c} {c}")),
        ("chunk 3", format!("read {} {c}", 3 * c)),
        ("chunks 0-1", format!("read 0 {}", 2 * c)),
    ] {
        let out = fixtures::qemu_io(&uri, &[&cmd]).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("Input/output error"),
            "{what} on the failing member must read as EIO: {text}"
        );
    }
    kit.set_failing(false).unwrap();
    for k in 0..4u64 {
        let cmd = format!("read -P {} {} {c}", 0x11 * (k + 1), k * c);
        fixtures::qemu_io_ok(&uri, &[&cmd]).unwrap();
    }
}

#[test]
fn read_errors_mid_run_fault_the_remote_member_and_fio_sees_none() {
    if !fixtures::require_all(&["nbdkit", "fio"]) {
        return;
    }
    let (rig, _kit, _files) = errors_mid_run(&["error=EIO", "error-pread-rate=100%"]);
    let m = rig.member(1);
    assert!(
        m["probes_failed"].as_u64().unwrap() >= 1,
        "a read fault on a mirror that serves no reads is found by the probe: {m}"
    );
}

#[test]
fn write_errors_mid_run_fault_the_remote_member_and_fio_sees_none() {
    if !fixtures::require_all(&["nbdkit", "fio"]) {
        return;
    }
    let (rig, _kit, _files) = errors_mid_run(&["error=EIO", "error-pwrite-rate=100%"]);
    let m = rig.member(1);
    assert!(m["errors"].as_u64().unwrap() >= 1, "{m}");
    assert!(
        m["fault"].as_str().unwrap().contains("WRITE"),
        "the fault names the failed write: {m}"
    );
}

// ---- 3. A server slower than the member timeout ----------------------------------------

/// nbdkit's pause filter holds every request for 3 s, mid-run, with `remote.timeout` 1 s:
/// the member goes faulty (timeout) while the server is still silent, the local member
/// keeps completing I/O meanwhile, and fio ends clean. (nbdkit's delay filter cannot be
/// switched on at run time; the pause filter is the same hung server, on demand.)
#[test]
fn server_stalled_past_the_timeout_mid_run_faults_member_with_timeout() {
    if !fixtures::require_all(&["nbdkit", "fio"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let ctl = Tmp::new().unwrap();
    let pause = PauseControl::new(ctl.join("pause.sock"));
    let kit = Nbdkit::memory(MEMBER_SIZE)
        .filter("pause", &[&pause.arg()])
        .start()
        .unwrap();
    let rig = rig(
        "r1slow",
        "raid1",
        &[file_addr(&local), kit.uri()],
        "timeout = \"1s\"",
    );
    let per_job = 24 * MIB;
    let fio = fio_background(&rig.uri(), per_job, "--bs=4k");
    wait_written(&rig, 0, 2 * per_job / 4, &fio);
    // Measured from before the command: requests sent after it hang.
    let stalled = Instant::now();
    pause.pause().unwrap();
    let done_before = rig.counter(0, "completed");
    // Faulty within the 1 s timeout (plus slack), while the server still says nothing.
    rig.wait_faulty(1, Duration::from_millis(2500), |f| f == "timeout");
    let waited = stalled.elapsed();
    thread::sleep(Duration::from_secs(3).saturating_sub(waited));
    let done_during = rig.counter(0, "completed") - done_before;
    pause.resume().unwrap();
    assert!(
        waited >= Duration::from_millis(900),
        "faulty after {waited:?}: before the 1 s timeout ran out?"
    );
    assert!(
        done_during >= 256,
        "the local member completed only {done_during} I/Os while the remote one hung"
    );
    assert_fio_clean(fio.join().unwrap(), per_job, false);
    rig.assert_healthy(0);
    thread::sleep(Duration::from_millis(300));
    let m = rig.member(1);
    assert_eq!(
        m["state"], "faulty",
        "answering again must not bring it back: {m}"
    );
    assert_eq!(m["fault"], "timeout", "{m}");
}

/// nbdkit's delay filter at 3 s on write-zeroes and trims only, `remote.timeout` 1 s: fio
/// runs (plain writes, undelayed) and mid-run a second client zeroes a range, which the
/// nbdkit member cannot finish in time. It goes faulty (timeout); the zeroing client and
/// fio see no error, and the range reads back as zeroes.
#[test]
fn delay_filter_past_the_timeout_faults_member_with_timeout() {
    if !fixtures::require_all(&["nbdkit", "fio", "qemu-io"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let kit = Nbdkit::memory(MEMBER_SIZE)
        .filter("delay", &["delay-zero=3", "delay-trim=3"])
        .start()
        .unwrap();
    let rig = rig(
        "r1delay",
        "raid1",
        &[file_addr(&local), kit.uri()],
        "timeout = \"1s\"",
    );
    let uri = rig.uri();
    let per_job = 24 * MIB;
    // A range beyond fio's regions, filled before and zeroed mid-run.
    let zeroed = format!("{} {}", 2 * per_job + MIB, 4 * MIB);
    fixtures::qemu_io_ok(&uri, &[&format!("write -P 0xa5 {zeroed}")]).unwrap();
    let fio = fio_background(&uri, per_job, "--bs=4k");
    wait_written(&rig, 0, 2 * per_job / 4 + 4 * MIB, &fio);
    let t = Instant::now();
    fixtures::qemu_io_ok(&uri, &[&format!("write -z {zeroed}")]).unwrap();
    let took = t.elapsed();
    rig.wait_faulty(1, Duration::from_secs(3), |f| f == "timeout");
    assert!(
        took < Duration::from_millis(2900),
        "the zeroing waited {took:?}: for the slow member instead of its 1 s timeout"
    );
    assert_fio_clean(fio.join().unwrap(), per_job, false);
    fixtures::qemu_io_ok(&uri, &[&format!("read -P 0 {zeroed}")]).unwrap();
    rig.assert_healthy(0);
}

// ---- 4. The server killed, started again, re-added -------------------------------------

/// raid1(local file + nbdkit memory on a unix socket), `remote.timeout` 1 s. nbdkit is
/// killed mid-run: the member goes faulty (disconnected or timeout) and fio ends clean. A
/// new, empty nbdkit on the same socket: the member reconnects, `member_readd` rebuilds
/// it, then the local member is failed and everything (fio's blocks and qemu-io patterns,
/// one written while the server was down) must read back from the remote member alone.
#[test]
fn killed_server_restarted_and_readded_holds_all_the_data_alone() {
    if !fixtures::require_all(&["nbdkit", "fio", "qemu-io"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let size_arg = format!("size={MEMBER_SIZE}");
    let mut kit = NbdkitRestartable::start(&["memory", &size_arg]).unwrap();
    let remote = kit.uri();
    let rig = rig(
        "r1kill",
        "raid1",
        &[file_addr(&local), remote.clone()],
        "timeout = \"1s\", connections = 2",
    );
    let uri = rig.uri();
    let per_job = 24 * MIB;
    let before = (2 * per_job + MIB, 2 * MIB);
    let while_down = (2 * per_job + 8 * MIB, 3 * MIB + 512);
    fixtures::qemu_io_ok(&uri, &[&format!("write -P 0x3c {} {}", before.0, before.1)]).unwrap();

    let fio = fio_background(&uri, per_job, "--bs=4k");
    wait_written(&rig, 0, 2 * per_job / 3 + 2 * MIB, &fio);
    kit.kill9().unwrap();
    rig.wait_faulty(1, Duration::from_secs(5), |f| {
        f == "disconnected" || f == "timeout"
    });
    fixtures::qemu_io_ok(
        &uri,
        &[&format!("write -P 0xc3 {} {}", while_down.0, while_down.1)],
    )
    .unwrap();
    let res = fio.join().unwrap();
    if !matches!(&res, Ok((true, _))) {
        eprintln!("daemon log tail:\n{}", log_tail(&rig.daemon.log(), 60));
    }
    assert_fio_clean(res, per_job, false);
    rig.assert_healthy(0);

    // A new, empty server on the same socket; the member reconnects in the background.
    let reconnects = || {
        rig.daemon
            .log()
            .matches("NBD connection re-established")
            .count()
    };
    let seen = reconnects();
    kit.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while reconnects() == seen {
        assert!(
            Instant::now() < deadline,
            "the member did not reconnect; log tail:\n{}",
            log_tail(&rig.daemon.log(), 30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let written = rig.counter(1, "bytes_written");
    let r = rig.request(json!({"cmd": "member_readd", "array": "r1kill", "member": "1"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["index"], 1, "{r}");
    rig.wait_member(1, "rebuilt and healthy", Duration::from_secs(60), |m| {
        m["state"] == "healthy"
    });
    let st = rig.status();
    assert_eq!(st["state"], "optimal", "{st:#}");
    assert!(
        rig.counter(1, "bytes_written") - written >= MEMBER_DATA,
        "the rebuild did not copy the whole array onto the member: {st:#}"
    );

    // The local copy out of service: every read now comes from the rebuilt remote member.
    let r = rig.request(json!({"cmd": "member_fail", "array": "r1kill", "member": "0"}));
    assert_eq!(r["ok"], true, "{r}");
    rig.wait_faulty(0, Duration::from_secs(2), |f| f.contains("operator"));
    let (local_read, remote_read) = (rig.counter(0, "bytes_read"), rig.counter(1, "bytes_read"));
    assert_fio_clean(
        run_fio(&fio_args(&uri, per_job, "--bs=4k", true)),
        per_job,
        true,
    );
    for (range, byte) in [(before, 0x3c), (while_down, 0xc3)] {
        let (off, len) = range;
        fixtures::qemu_io_ok(&uri, &[&format!("read -P {byte:#x} {off} {len}")]).unwrap();
        // And on the server itself, at the member's data offset.
        fixtures::qemu_io_ok(
            &remote,
            &[&format!("read -P {byte:#x} {} {len}", DATA_OFFSET + off)],
        )
        .unwrap();
    }
    assert_eq!(
        rig.counter(0, "bytes_read"),
        local_read,
        "a failed member served reads"
    );
    assert!(rig.counter(1, "bytes_read") - remote_read >= 2 * per_job);
    rig.assert_healthy(1);
    assert_eq!(rig.status()["state"], "degraded");
}

/// The operator's swap of a remote member: the nbdkit member is failed and removed from
/// its slot, a different nbdkit server is added in the slot by address and rebuilt, then
/// the local member is failed and the data must read back from the new server alone.
#[test]
fn remote_member_swapped_with_remove_and_add_is_rebuilt() {
    if !fixtures::require_all(&["nbdkit", "qemu-io"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let old = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    let mut rig = rig(
        "r1swap",
        "raid1",
        &[file_addr(&local), old.uri()],
        "timeout = \"2s\"",
    );
    let uri = rig.uri();
    let spans = [
        (0, 3 * MIB),
        (17 * MIB + 4096, 5 * MIB),
        (MEMBER_DATA - MIB, MIB),
    ];
    let fill = |i: usize| 0x41 + i as u8;
    for (i, (off, len)) in spans.iter().enumerate() {
        fixtures::qemu_io_ok(&uri, &[&format!("write -P {:#x} {off} {len}", fill(i))]).unwrap();
    }
    let call = |req: Value| {
        let r = rig.request(req.clone());
        assert_eq!(r["ok"], true, "{req} -> {r}");
        r
    };
    // A healthy member cannot be removed: fail it first.
    let r = rig.request(json!({"cmd": "member_remove", "array": "r1swap", "member": "1"}));
    assert_eq!(r["ok"], false, "{r}");
    call(json!({"cmd": "member_fail", "array": "r1swap", "member": old.uri()}));
    let r = call(json!({"cmd": "member_remove", "array": "r1swap", "member": "1"}));
    assert_eq!(r["address"], old.uri().as_str(), "{r}");
    let new = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    call(json!({"cmd": "member_add", "array": "r1swap", "slot": 1, "address": new.uri()}));
    call(json!({"cmd": "member_readd", "array": "r1swap", "member": "1"}));
    rig.wait_member(1, "rebuilt and healthy", Duration::from_secs(60), |m| {
        m["state"] == "healthy"
    });
    let m = rig.member(1);
    assert_eq!(m["address"], new.uri().as_str(), "{m}");
    assert_eq!(m["locality"], "remote", "{m}");
    drop(old);
    call(json!({"cmd": "member_fail", "array": "r1swap", "member": "0"}));
    let local_read = rig.counter(0, "bytes_read");
    for (i, (off, len)) in spans.iter().enumerate() {
        let byte = fill(i);
        fixtures::qemu_io_ok(&uri, &[&format!("read -P {byte:#x} {off} {len}")]).unwrap();
        fixtures::qemu_io_ok(
            &new.uri(),
            &[&format!("read -P {byte:#x} {} {len}", DATA_OFFSET + off)],
        )
        .unwrap();
    }
    assert_eq!(
        rig.counter(0, "bytes_read"),
        local_read,
        "the failed local member served reads"
    );
    // Before the servers go (they were started after the daemon, so they would drop first).
    rig.stop_clean();
}

// ---- 5. Refused at start ---------------------------------------------------------------

/// Runs `ublkd` over a raid1 of a local file and `remote` and expects it to exit non-zero
/// at start; returns its stderr. The local member must be left untouched.
fn refused_at_start(remote: &str) -> String {
    let tmp = Tmp::new().unwrap();
    let local = member_file(&tmp, "local.img");
    let config = tmp.join("layout.toml");
    let text = fixtures::one_array_layout(
        "r1",
        "raid1",
        &[file_addr(&local), remote.to_string()],
        "timeout = \"2s\"",
    )
    .replace(fixtures::DIR_PLACEHOLDER, &tmp.path().to_string_lossy());
    std::fs::write(&config, text).unwrap();
    let mgmt = tmp.join("mgmt.sock");
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(&config)
        .arg("--mgmt-socket")
        .arg(&mgmt);
    let t = Instant::now();
    let out = fixtures::run_bounded(&mut cmd, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "ublkd started with member {remote}:\n{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "ublkd took {:?} to refuse {remote}",
        t.elapsed()
    );
    assert!(!mgmt.exists(), "the management socket outlived the refusal");
    let mut head = vec![0u8; 2 * SB_AT];
    File::open(&local)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(
        head.iter().all(|&b| b == 0),
        "the refused array initialised its local member"
    );
    let last = stderr.lines().last().unwrap_or("").to_string();
    assert!(
        last.contains(remote),
        "the error must name the member {remote}:\n{stderr}"
    );
    last
}

#[test]
fn unknown_export_names_and_too_small_servers_are_refused_at_start() {
    if !fixtures::require_all(&["nbdkit", "qemu-nbd", "nbd-server"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let img = member_file(&files, "served.img");
    let qemu = QemuNbd::serve(&img).unwrap();
    let wrong = qemu.uri().replace("/disk?", "/nosuch?");
    let err = refused_at_start(&wrong);
    assert!(
        err.contains("no export 'nosuch'") && err.contains("disk"),
        "qemu-nbd: the error names the missing export and the ones there are: {err}"
    );
    drop(qemu);

    let nbdsrv = NbdServerPeer::serve(&img).unwrap();
    let err = refused_at_start(&nbdsrv.uri_for("nosuch"));
    assert!(
        err.contains("'nosuch'"),
        "nbd-server: the error names the missing export: {err}"
    );
    drop(nbdsrv);

    let tiny = NbdkitServer::memory(MIB).unwrap();
    let err = refused_at_start(&tiny.uri());
    assert!(
        err.contains("1048576 bytes") && err.contains("needs at least"),
        "too small: the error gives the size and the need: {err}"
    );
}

// ---- 6. Status of a remote member ------------------------------------------------------

#[test]
fn status_shows_remote_locality_protocol_engine_and_probe_round_trip() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    // Over TCP this time: nbd://127.0.0.1:PORT/.
    let kit = Nbdkit::memory(MEMBER_SIZE).tcp().start().unwrap();
    assert!(kit.uri().starts_with("nbd://127.0.0.1:"), "{}", kit.uri());
    let started = Instant::now();
    let rig = rig("r1st", "raid1", &[file_addr(&local), kit.uri()], "");
    rig.wait_member(1, "probed", Duration::from_secs(7), |m| {
        m["last_probe_us"].as_u64().is_some_and(|us| us > 0)
    });
    assert!(started.elapsed() < Duration::from_secs(8));
    let st = rig.status();
    let (l, r) = (&st["members"][0], &st["members"][1]);
    assert_eq!(r["address"], kit.uri().as_str(), "{st:#}");
    assert_eq!(r["locality"], "remote", "{st:#}");
    assert_eq!(r["protocol"], "nbd", "{st:#}");
    assert_eq!(r["engine"], "nbd", "{st:#}");
    assert_eq!(r["size"], MEMBER_SIZE, "{st:#}");
    assert_eq!(r["state"], "healthy", "{st:#}");
    assert_eq!(r["probes_failed"], 0, "{st:#}");
    assert!(
        r["last_probe_us"].as_u64().unwrap() < 5_000_000,
        "a loopback probe took over 5 s: {st:#}"
    );
    // The NBD client's own view: connections up, and what the server negotiated.
    let s = &r["session"];
    assert!(s["connected"].as_u64().unwrap() >= 1, "{st:#}");
    assert_eq!(s["connected"], s["connections"], "{st:#}");
    assert_eq!(s["structured_replies"], true, "nbdkit offers them: {st:#}");
    assert!(l.get("session").is_none(), "a file has no session: {st:#}");
    assert_eq!(l["locality"], "local", "{st:#}");
    assert_eq!(l["protocol"], "file", "{st:#}");
    assert_eq!(
        l["last_probe_us"], 0,
        "local members are not probed: {st:#}"
    );
}

/// A server that comes back with a blank disk at the same address must not be trusted:
/// the health probe reads the member's superblock, finds it gone, and takes the member
/// out of service, so the array keeps serving the real data from its healthy mirror.
#[test]
fn server_back_with_a_blank_disk_is_caught_by_the_identity_probe() {
    if !fixtures::require_all(&["nbdkit", "qemu-io"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let size_arg = format!("size={MEMBER_SIZE}");
    let mut kit = NbdkitRestartable::start(&["memory", &size_arg]).unwrap();
    let rig = rig(
        "r1blank",
        "raid1",
        &[file_addr(&local), kit.uri()],
        "timeout = \"1s\", connections = 1",
    );
    let uri = rig.uri();
    fixtures::qemu_io_ok(&uri, &["write -P 0x11 0 1M"]).unwrap();
    rig.wait_member(1, "probed", Duration::from_secs(8), |m| {
        m["last_probe_us"].as_u64().unwrap_or(0) > 0
    });
    rig.assert_healthy(1);

    // Same socket, empty memory: the member reconnects without any I/O failing.
    kit.kill9().unwrap();
    kit.restart().unwrap();
    rig.wait_faulty(1, Duration::from_secs(15), |f| f.contains("identity lost"));
    assert_eq!(rig.status()["state"], "degraded");
    fixtures::qemu_io_ok(&uri, &["read -P 0x11 0 1M"]).unwrap();
}

// ---- 7. A server that lacks flush, FUA, trim or write-zeroes -------------------------

/// What a server advertises (nbdinfo's `can_*` names).
#[derive(Debug, Clone, Copy)]
struct Advertised {
    flush: bool,
    fua: bool,
    trim: bool,
    zero: bool,
}

/// raid1(local file + `kit`, which serves `backing` and logs every request to `log`):
/// qemu-io through the export writes a pattern, write-zeroes (unaligned, and may-unmap)
/// into it, a FUA write, a discard and a flush. Every command succeeds, the zeroes read
/// back as zeroes, and after a clean stop both member files hold the same bytes at the
/// same places. The server must have been sent no request it does not advertise: zeroing
/// is done by writing, FUA by a flush after the write (or, with no flush either, plain).
fn limited_server_round(name: &str, kit: Nbdkit, backing: &Path, log: &Path, want: Advertised) {
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let kit = kit.start().unwrap();
    let info = fixtures::nbdinfo_json(&kit.uri()).unwrap_or_else(|e| panic!("{e:#}"));
    let export = &info["exports"][0];
    for (cap, on) in [
        ("can_flush", want.flush),
        ("can_fua", want.fua),
        ("can_trim", want.trim),
        ("can_zero", want.zero),
    ] {
        assert_eq!(export[cap], on, "the server's premise ({cap}): {info:#}");
    }
    let mut rig = rig(
        name,
        "raid1",
        &[file_addr(&local), kit.uri()],
        "timeout = \"10s\"",
    );
    // (offset, length, byte) as the array must read.
    let expect: &[(u64, u64, u8)] = &[
        (0, 1000, 0xab),
        (1000, 300_000, 0),
        (301_000, 2 * MIB - 301_000, 0xab),
        (2 * MIB, MIB, 0),
        (3 * MIB, MIB, 0xab),
        (5 * MIB, 64 * KIB, 0xcd),
    ];
    let mut cmds: Vec<String> = [
        "write -P 0xab 0 4M",
        "write -z 1000 300000",
        "write -z -u 2M 1M",
        "write -f -P 0xcd 5M 64K",
        "discard 6M 64K",
        "flush",
    ]
    .map(String::from)
    .into();
    cmds.extend(
        expect
            .iter()
            .map(|(o, l, b)| format!("read -P {b:#04x} {o} {l}")),
    );
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    fixtures::qemu_io_ok(&rig.uri(), &cmds).unwrap_or_else(|e| {
        panic!(
            "{e:#}\nnbdkit log tail:\n{}",
            log_tail(&std::fs::read_to_string(log).unwrap_or_default(), 30)
        )
    });
    rig.assert_healthy(0);
    rig.assert_healthy(1);
    rig.stop_clean();
    for (m, path) in [("local file", &local), ("nbdkit", &backing.to_path_buf())] {
        let f = File::open(path).unwrap();
        for &(o, l, b) in expect {
            let mut got = vec![0u8; l as usize];
            f.read_exact_at(&mut got, DATA_OFFSET + o).unwrap();
            if let Some(i) = got.iter().position(|&x| x != b) {
                panic!(
                    "{m} member: array byte {} is {:#04x}, should be {b:#04x}",
                    o + i as u64,
                    got[i]
                );
            }
        }
    }
    let requests = std::fs::read_to_string(log).unwrap();
    let lines: Vec<&str> = requests.lines().collect();
    let sent = |what: &str| lines.iter().any(|l| l.contains(&format!(" {what} id=")));
    let ctx = || log_tail(&requests, 40);
    assert!(
        !sent("Zero"),
        "write-zeroes sent to a server without it:\n{}",
        ctx()
    );
    assert!(
        !lines.iter().any(|l| l.contains(" fua=1")),
        "FUA sent to a server without it:\n{}",
        ctx()
    );
    if !want.flush {
        assert!(
            !sent("Flush"),
            "flush sent to a server without it:\n{}",
            ctx()
        );
    }
    if !want.trim {
        assert!(
            !sent("Trim"),
            "trim sent to a server without it:\n{}",
            ctx()
        );
    }
    // The zeroes reached the server as writes, the FUA write as a write (then a flush,
    // when the server has one).
    let write_at = |off: u64| {
        let at = " Write id=";
        let off = format!(" offset={:#x} ", DATA_OFFSET + off);
        lines
            .iter()
            .position(|l| l.contains(at) && l.contains(&off))
    };
    assert!(
        write_at(2 * MIB).is_some(),
        "write-zeroes at 2 MiB did not reach the server as a write:\n{}",
        ctx()
    );
    let fua_write = write_at(5 * MIB)
        .unwrap_or_else(|| panic!("the FUA write never reached the server:\n{}", ctx()));
    if want.flush {
        // Before the reply: qemu-io sends the discard (the next command) only after the
        // FUA write was answered, so the flush must come before that trim.
        let trim = " Trim id=";
        let trim_off = format!(" offset={:#x} ", DATA_OFFSET + 6 * MIB);
        let next = lines
            .iter()
            .position(|l| l.contains(trim) && l.contains(&trim_off))
            .unwrap_or_else(|| panic!("the discard never reached the server:\n{}", ctx()));
        assert!(
            lines[fua_write..next]
                .iter()
                .any(|l| l.contains(" Flush id=")),
            "no flush between the FUA write and the next command on a server without \
             FUA:\n{}",
            ctx()
        );
    }
}

/// nbdkit's file plugin behind the nozero (`zeromode=none`) and fua (default mode: FUA not
/// advertised) filters: flush and trim remain.
#[test]
fn server_without_write_zeroes_or_fua_gets_zeroes_written_and_fua_as_flush() {
    if !fixtures::require_all(&["nbdkit", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = Tmp::new().unwrap();
    let backing = member_file(&dir, "kit.img");
    let log = dir.join("requests.log");
    let kit = Nbdkit::file(&backing)
        .filter("log", &[&format!("logfile={}", log.display())])
        .filter("nozero", &["zeromode=none"])
        .filter("fua", &[]);
    let want = Advertised {
        flush: true,
        fua: false,
        trim: true,
        zero: false,
    };
    limited_server_round("r1nozero", kit, &backing, &log, want);
}

/// nbdkit's eval plugin with only get_size, pread and pwrite (dd on a file), behind the
/// nozero filter (nbdkit would otherwise emulate zeroing itself): no flush, no FUA, no
/// trim, no write-zeroes at all.
#[test]
fn server_without_flush_fua_trim_or_write_zeroes_still_serves_a_raid1_mirror() {
    if !fixtures::require_all(&["nbdkit", "qemu-io", "nbdinfo", "dd"]) {
        return;
    }
    let dir = Tmp::new().unwrap();
    let backing = member_file(&dir, "kit.img");
    let log = dir.join("requests.log");
    let f = backing.display();
    let kit = Nbdkit::plugin(
        "eval",
        &[
            &format!("get_size=stat -c %s {f}"),
            &format!(
                "pread=dd if={f} iflag=skip_bytes,count_bytes,fullblock skip=$4 count=$3 \
                 bs=64K status=none"
            ),
            &format!(
                "pwrite=dd of={f} oflag=seek_bytes conv=notrunc seek=$4 bs=64K \
                 iflag=fullblock status=none"
            ),
        ],
    )
    .filter("log", &[&format!("logfile={}", log.display())])
    .filter("nozero", &["zeromode=none"]);
    let want = Advertised {
        flush: false,
        fua: false,
        trim: false,
        zero: false,
    };
    limited_server_round("r1bare", kit, &backing, &log, want);
}
