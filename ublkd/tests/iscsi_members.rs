//! iSCSI members in the daemon, end to end (issue 6): the real `ublkd` runs arrays with
//! LUNs of a real tgtd on 127.0.0.1 as members, beside local files and NBD servers, and
//! fio's nbd engine (crc32c verification) checks what reads back through the daemon's
//! export. After a clean stop the members' data areas are compared with md's layout,
//! read from the LUNs' backing files. Faults: tgtd killed mid-run and started again, and
//! a LUN whose backing store (nbdfuse over nbdkit's error filter) fails reads with
//! medium errors.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Result;
use fixtures::{log_tail, ArrayRig as Rig, LunSpec, NbdFuseLoop, Nbdkit, NbdkitServer, Tgtd, Tmp};
use raidcore::superblock::{SbState, Superblock};
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DATA_OFFSET: u64 = MIB;
const SB_AT: usize = 4096;
const CHUNK: u64 = 64 * KIB;
const MEMBER_SIZE: u64 = 65 * MIB;
const MEMBER_DATA: u64 = MEMBER_SIZE - DATA_OFFSET;
const IQN: &str = "iqn.2026-11.io.uniblk.test:member";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ublkd"))
}

fn rig(name: &str, level: &str, members: &[String], remote: &str) -> Rig {
    Rig::start(bin(), name, level, members, remote)
}

/// fio's nbd engine: 2 jobs at QD32 on disjoint regions, random writes then crc32c
/// verification of every block (or, with `verify_only`, only the verification).
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

fn assert_fio_clean(res: Result<(bool, Value)>, per_job: u64, verify_only: bool) {
    let (ok, report) = res.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(ok, "fio failed:\n{report:#}");
    let jobs = report["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len(), 2, "{report:#}");
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job error: {j:#}");
        if !verify_only {
            assert_eq!(j["write"]["io_bytes"].as_u64(), Some(per_job), "{j:#}");
        }
        assert_eq!(j["read"]["io_bytes"].as_u64(), Some(per_job), "{j:#}");
    }
}

fn fio_background(uri: &str, per_job: u64, bs: &str) -> JoinHandle<Result<(bool, Value)>> {
    let args = fio_args(uri, per_job, bs, false);
    thread::spawn(move || run_fio(&args))
}

fn wait_written(rig: &Rig, m: usize, bytes: u64, fio: &JoinHandle<Result<(bool, Value)>>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while rig.counter(m, "bytes_written") < bytes {
        assert!(
            !fio.is_finished(),
            "fio ended before the fault could be injected"
        );
        assert!(Instant::now() < deadline, "fio made no progress");
        thread::sleep(Duration::from_millis(10));
    }
}

fn member_file(dir: &Tmp, name: &str) -> PathBuf {
    let p = dir.join(name);
    fixtures::sparse_file(&p, MEMBER_SIZE).unwrap();
    p
}

fn file_addr(p: &Path) -> String {
    format!("file:{}", p.display())
}

/// tgtd serving `files` as LUNs 1.. of one target.
fn tgtd_with(files: &[(PathBuf, u32)]) -> Tgtd {
    let mut t = Tgtd::start().unwrap();
    let specs: Vec<LunSpec> = files.iter().map(|(p, bs)| LunSpec::file(p, *bs)).collect();
    t.add_target(1, IQN, &specs).unwrap();
    t
}

enum Backing {
    File(PathBuf),
    Nbd(String),
}

impl Backing {
    fn image(&self) -> Vec<u8> {
        match self {
            Backing::File(p) => std::fs::read(p).unwrap(),
            Backing::Nbd(uri) => fixtures::nbd_image(uri).unwrap_or_else(|e| panic!("{e:#}")),
        }
    }
}

/// After a clean stop: clean superblocks with their roles, and every chunk of `array`
/// where md puts it (raid1: on every member; raid0: round robin).
fn assert_members_match(raid1: bool, array: &[u8], members: &[Backing]) {
    let images: Vec<Vec<u8>> = members.iter().map(Backing::image).collect();
    for (i, img) in images.iter().enumerate() {
        let sb = Superblock::decode(&img[SB_AT..SB_AT + 4096])
            .unwrap_or_else(|e| panic!("member {i}: no valid superblock: {e}"));
        assert_eq!(sb.state, SbState::Clean, "member {i}");
        assert_eq!(sb.role as usize, i, "member {i}");
    }
    let n = members.len() as u64;
    for c in 0..array.len() as u64 / CHUNK {
        let want = &array[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
        let copies: Vec<(usize, u64)> = if raid1 {
            (0..members.len()).map(|m| (m, c * CHUNK)).collect()
        } else {
            vec![((c % n) as usize, c / n * CHUNK)]
        };
        for (m, off) in copies {
            let at = (DATA_OFFSET + off) as usize;
            let got = &images[m][at..at + CHUNK as usize];
            assert!(
                got == want,
                "array chunk {c} differs on member {m} at data offset {off}"
            );
        }
    }
}

fn assert_written(image: &[u8], len: u64) {
    let empty = image[..len as usize]
        .chunks(4096)
        .position(|b| b.iter().all(|&x| x == 0));
    assert!(
        empty.is_none(),
        "block {empty:?} reads as zeroes after fio wrote it"
    );
}

fn verify_round(rig: &mut Rig, raid1: bool, per_job: u64, bs: &str, members: &[Backing]) {
    assert_fio_clean(
        run_fio(&fio_args(&rig.uri(), per_job, bs, false)),
        per_job,
        false,
    );
    let st = rig.status();
    for (i, m) in st["members"].as_array().unwrap().iter().enumerate() {
        assert_eq!(m["state"], "healthy", "member {i}: {st:#}");
        assert_eq!(m["errors"], 0, "member {i}: {st:#}");
        assert!(
            m["bytes_written"].as_u64().unwrap() > 0,
            "member {i}: {st:#}"
        );
    }
    let array = fixtures::nbd_image(&rig.uri()).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(array.len() as u64, st["size"].as_u64().unwrap());
    assert_written(&array, 2 * per_job);
    rig.stop_clean();
    assert_members_match(raid1, &array, members);
}

#[test]
fn raid1_of_a_local_file_and_an_iscsi_lun_verifies_and_mirrors() {
    if !fixtures::require_all(&["tgtd", "fio", "nbdcopy"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let behind_lun = member_file(&files, "lun.img");
    let tgtd = tgtd_with(&[(behind_lun.clone(), 512)]);
    let mut rig = rig(
        "r1",
        "raid1",
        &[file_addr(&local), tgtd.url(IQN, 1)],
        "timeout = \"5s\"",
    );
    let st = rig.status();
    assert_eq!(st["size"], MEMBER_DATA);
    let m = &st["members"][1];
    assert_eq!(m["protocol"], "iscsi", "{m}");
    assert_eq!(m["locality"], "remote", "{m}");
    // The session as the initiator sees it (what `uniblk status` prints under it).
    let s = &m["session"];
    assert_eq!(s["connected"], true, "{m}");
    assert_eq!(s["target"], IQN, "{m}");
    assert!(s["max_burst"].as_u64().unwrap() > 0, "{m}");
    assert!(
        s["commands"].as_u64().unwrap() > 0,
        "login probes the LUN: {m}"
    );
    assert!(
        st["members"][0].get("session").is_none(),
        "a file member has no session: {st}"
    );
    verify_round(
        &mut rig,
        true,
        MEMBER_DATA / 2,
        "--bs=4k",
        &[Backing::File(local), Backing::File(behind_lun)],
    );
}

#[test]
fn raid0_of_an_iscsi_lun_with_4k_blocks_and_nbdkit_verifies_and_stripes() {
    if !fixtures::require_all(&["tgtd", "nbdkit", "fio", "nbdcopy"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let behind_lun = member_file(&files, "lun.img");
    let tgtd = tgtd_with(&[(behind_lun.clone(), 4096)]);
    let kit = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    let mut rig = rig(
        "r0",
        "raid0",
        &[tgtd.url(IQN, 1), kit.uri()],
        "timeout = \"5s\"",
    );
    assert_eq!(rig.status()["size"], 2 * MEMBER_DATA);
    verify_round(
        &mut rig,
        false,
        24 * MIB,
        "--bssplit=4k/40:64k/30:128k/30",
        &[Backing::File(behind_lun), Backing::Nbd(kit.uri())],
    );
}

/// raid1(local file + iSCSI LUN), `remote.timeout` 1 s. tgtd is killed mid-run: the
/// member goes faulty (disconnected or timeout) and fio ends clean. tgtd back on the
/// same port: the member logs in again, `member_readd` rebuilds it, then the local member
/// is failed and every block fio wrote must verify from the iSCSI member alone.
#[test]
fn killed_tgtd_faults_the_member_fio_sees_no_error_and_the_member_comes_back() {
    if !fixtures::require_all(&["tgtd", "fio"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let behind_lun = member_file(&files, "lun.img");
    let mut tgtd = tgtd_with(&[(behind_lun.clone(), 512)]);
    let rig = rig(
        "r1kill",
        "raid1",
        &[file_addr(&local), tgtd.url(IQN, 1)],
        "timeout = \"1s\"",
    );
    let per_job = 24 * MIB;
    let fio = fio_background(&rig.uri(), per_job, "--bs=4k");
    wait_written(&rig, 1, 2 * per_job / 3, &fio);
    tgtd.kill().unwrap();
    rig.wait_faulty(1, Duration::from_secs(5), |f| {
        f == "disconnected" || f == "timeout"
    });
    let res = fio.join().unwrap();
    if !matches!(&res, Ok((true, _))) {
        eprintln!("daemon log tail:\n{}", log_tail(&rig.daemon.log(), 60));
    }
    assert_fio_clean(res, per_job, false);
    assert_eq!(rig.member(0)["state"], "healthy");

    let relogins = || {
        rig.daemon
            .log()
            .matches("iSCSI session re-established")
            .count()
    };
    let seen = relogins();
    tgtd.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while relogins() == seen {
        assert!(
            Instant::now() < deadline,
            "the member did not log in again; log tail:\n{}",
            log_tail(&rig.daemon.log(), 30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let r = rig.request(json!({"cmd": "member_readd", "array": "r1kill", "member": "1"}));
    assert_eq!(r["ok"], true, "{r}");
    rig.wait_member(1, "rebuilt and healthy", Duration::from_secs(90), |m| {
        m["state"] == "healthy"
    });
    let r = rig.request(json!({"cmd": "member_fail", "array": "r1kill", "member": "0"}));
    assert_eq!(r["ok"], true, "{r}");
    let before = rig.counter(1, "bytes_read");
    assert_fio_clean(
        run_fio(&fio_args(&rig.uri(), per_job, "--bs=4k", true)),
        per_job,
        true,
    );
    assert!(rig.counter(1, "bytes_read") - before >= 2 * per_job);
    // And the LUN's backing file holds fio's blocks at the member's data offset.
    let f = std::fs::File::open(&behind_lun).unwrap();
    let mut b = vec![0u8; MIB as usize];
    f.read_exact_at(&mut b, DATA_OFFSET).unwrap();
    assert_written(&b, MIB);
}

/// raid1(iSCSI LUN whose backing store fails reads on demand, nbdkit memory). With the
/// faults on, reads that go to the LUN get MEDIUM ERROR sense; the array redirects them
/// to the mirror, the client gets its data, and the LUN's member goes faulty naming the
/// medium error.
#[test]
fn medium_errors_on_the_lun_redirect_reads_to_the_mirror() {
    if !fixtures::require_all(&["tgtd", "nbdkit", "nbdfuse", "qemu-io"])
        || !fixtures::require_root("nbdfuse")
        || !fixtures::require_path(Path::new("/dev/fuse"), "FUSE")
    {
        return;
    }
    let faulty = Nbdkit::memory(MEMBER_SIZE)
        .error_filter(&["error=EIO", "error-pread-rate=100%"])
        .start()
        .unwrap();
    let fuse = NbdFuseLoop::attach(&faulty.uri()).unwrap();
    // O_DIRECT, so tgtd's reads reach nbdkit rather than the FUSE file's page cache.
    let mut tgtd = Tgtd::start().unwrap();
    tgtd.add_target(1, IQN, &[LunSpec::file(fuse.file(), 512).direct()])
        .unwrap();
    let mirror = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    let rig = rig(
        "r1med",
        "raid1",
        &[tgtd.url(IQN, 1), mirror.uri()],
        "timeout = \"5s\"",
    );
    let uri = rig.uri();
    fixtures::qemu_io_ok(&uri, &["write -P 0x5a 0 8M"]).unwrap();
    faulty.set_failing(true).unwrap();
    // Sequential reads: an idle array sends each to member 0 (the LUN) first.
    fixtures::qemu_io_ok(&uri, &["read -P 0x5a 0 8M"]).unwrap();
    rig.wait_faulty(0, Duration::from_secs(10), |f| f.contains("MEDIUM ERROR"));
    let m = rig.member(0);
    eprintln!("the LUN's member: {} ({})", m["state"], m["fault"]);
    assert!(m["errors"].as_u64().unwrap() >= 1, "{m}");
    assert_eq!(rig.member(1)["state"], "healthy");
    fixtures::qemu_io_ok(&uri, &["read -P 0x5a 0 8M"]).unwrap();
    faulty.set_failing(false).unwrap();
}

/// CHAP secrets from the layout's `remote.iscsi` table, one from a file it names and the
/// target's (mutual CHAP) from ublkd's environment: the array assembles and serves data,
/// and neither secret appears in the layout's echo, the status or the daemon's log.
#[test]
fn chap_secrets_from_a_file_and_the_environment_stay_out_of_status_and_logs() {
    if !fixtures::require_all(&["tgtd", "qemu-io"]) {
        return;
    }
    let files = Tmp::new().unwrap();
    let local = member_file(&files, "local.img");
    let behind_lun = member_file(&files, "lun.img");
    let mut tgtd = tgtd_with(&[(behind_lun.clone(), 512)]);
    tgtd.add_chap(1, "ublkd-host", "secret-in-a-file-1", false)
        .unwrap();
    tgtd.add_chap(1, "the-target", "secret-in-the-env-2", true)
        .unwrap();
    let secret_file = files.join("chap.secret");
    std::fs::write(&secret_file, "secret-in-a-file-1\n").unwrap();
    // The daemon inherits the test's environment.
    std::env::set_var("UNIBLK_TEST_ISCSI_TARGET_SECRET", "secret-in-the-env-2");
    let remote = format!(
        "timeout = \"5s\", iscsi = {{ chap_user = \"ublkd-host\", chap_secret_file = \"{}\", \
         mutual_user = \"the-target\", mutual_secret_env = \"UNIBLK_TEST_ISCSI_TARGET_SECRET\" }}",
        secret_file.display()
    );
    let mut rig = rig(
        "r1chap",
        "raid1",
        &[file_addr(&local), tgtd.url(IQN, 1)],
        &remote,
    );
    let uri = rig.uri();
    fixtures::qemu_io_ok(&uri, &["write -P 0x77 0 4M"]).unwrap();
    let r = rig.request(json!({"cmd": "member_fail", "array": "r1chap", "member": "0"}));
    assert_eq!(r["ok"], true, "{r}");
    // Served by the CHAP-authenticated member alone now.
    fixtures::qemu_io_ok(&uri, &["read -P 0x77 0 4M"]).unwrap();
    let st = rig.request(json!({"cmd": "status"})).to_string();
    let log = rig.daemon.log();
    for secret in ["secret-in-a-file-1", "secret-in-the-env-2"] {
        assert!(!st.contains(secret), "status shows a CHAP secret: {st}");
        assert!(!log.contains(secret), "the log shows a CHAP secret:\n{log}");
    }
    assert!(st.contains("iscsi://127.0.0.1"), "{st}");
    rig.stop_clean();
    let f = std::fs::File::open(&behind_lun).unwrap();
    let mut b = vec![0u8; 4 * MIB as usize];
    f.read_exact_at(&mut b, DATA_OFFSET).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x77),
        "the LUN's backing file lacks the data"
    );
}
