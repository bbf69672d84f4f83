//! AoE members in the daemon, end to end (issue 7): the real `ublkd` runs, under `ip
//! netns exec`, in the initiator namespace of a veth pair whose other end has vblade
//! serving a file; fio's nbd engine with crc32c verification is the client, over the
//! daemon's unix-socket export (unix sockets cross namespaces: they are files). Arrays:
//! raid1(local file + AoE) and raid10(local file, AoE, nbdkit). Faults mid-run: vblade
//! killed, the link set down. Each asserts fio saw no error, which member went faulty
//! and why, that it comes back (the target answers again, `member_readd` rebuilds it)
//! and then holds the data alone. After a clean stop, vblade's backing file is compared
//! with the local mirror (md's layout).
//!
//! Needs root, vblade, ip, fio (and nbdkit for raid10); skips with a message otherwise
//! (fails under CI).

use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Result;
use fixtures::{log_tail, ArrayRig as Rig, NbdkitServer, NetnsPair, Tmp, Vblade};
use raidcore::superblock::{SbState, Superblock};
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DATA_OFFSET: u64 = MIB;
const SB_AT: usize = 4096;
const CHUNK: u64 = 64 * KIB;
const MEMBER_SIZE: u64 = 65 * MIB;
const MEMBER_DATA: u64 = MEMBER_SIZE - DATA_OFFSET;
const SHELF: u16 = 7;
const SLOT: u8 = 3;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ublkd"))
}

/// The daemon running one array, in the initiator's namespace.
fn rig(net: &Net, name: &str, level: &str, members: &[String], remote: &str) -> Rig {
    Rig::start_in(&net.pair.exec_prefix(), bin(), name, level, members, remote)
}

fn can_run(extra: &[&str]) -> bool {
    fixtures::require_root("AoE members in network namespaces")
        && fixtures::require_all(&["vblade", "ip", "fio", "nbdcopy"])
        && fixtures::require_all(extra)
}

/// A veth pair at `mtu`, vblade serving a MEMBER_SIZE file as e7.3, a local member file.
struct Net {
    vblade: Vblade,
    aoe_file: PathBuf,
    local: PathBuf,
    pair: NetnsPair,
    files: Tmp,
}

impl Net {
    fn new(mtu: u32) -> Net {
        let files = Tmp::new().unwrap();
        let aoe_file = files.join("aoe.img");
        let local = files.join("local.img");
        fixtures::sparse_file(&aoe_file, MEMBER_SIZE).unwrap();
        fixtures::sparse_file(&local, MEMBER_SIZE).unwrap();
        let pair = NetnsPair::new(mtu).unwrap();
        let vblade = Vblade::serve(&pair, SHELF, SLOT, &aoe_file).unwrap();
        Net {
            vblade,
            aoe_file,
            local,
            pair,
            files,
        }
    }

    fn aoe(&self) -> String {
        format!("aoe:{}/{SHELF}.{SLOT}", self.pair.initiator_if)
    }

    fn local(&self) -> String {
        format!("file:{}", self.local.display())
    }
}

// ---- fio ------------------------------------------------------------------------------

/// 2 jobs at QD32 on disjoint regions of `per_job` bytes: random writes, then crc32c
/// verification of every block (or only the verification).
fn fio_args(uri: &str, per_job: u64, verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=verify",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
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

fn fio_background(uri: &str, per_job: u64) -> JoinHandle<Result<(bool, Value)>> {
    let args = fio_args(uri, per_job, false);
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

// ---- Member images and md's layouts ---------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// One member: chunk c at c * CHUNK.
    Linear,
    Raid1,
    Raid10,
}

fn chunk_copies(level: Level, n: usize, c: u64) -> Vec<(usize, u64)> {
    let n64 = n as u64;
    match level {
        Level::Linear => vec![(0, c * CHUNK)],
        Level::Raid1 => (0..n).map(|m| (m, c * CHUNK)).collect(),
        Level::Raid10 => (0..2)
            .map(|k| {
                let pos = 2 * c + k;
                ((pos % n64) as usize, pos / n64 * CHUNK)
            })
            .collect(),
    }
}

/// Every member image carries a clean superblock with its role, and every chunk of
/// `array` (read through the export) is where md puts it, on every copy.
fn assert_members_match(level: Level, array: &[u8], images: &[Vec<u8>]) {
    for (i, img) in images.iter().enumerate() {
        assert!(
            img.len() as u64 >= MEMBER_SIZE,
            "member {i}: {} bytes",
            img.len()
        );
        let sb = Superblock::decode(&img[SB_AT..SB_AT + 4096])
            .unwrap_or_else(|e| panic!("member {i}: no valid superblock: {e}"));
        assert_eq!(sb.state, SbState::Clean, "member {i}");
        assert_eq!(sb.role as usize, i, "member {i}");
    }
    for c in 0..array.len() as u64 / CHUNK {
        let want = &array[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
        for (m, off) in chunk_copies(level, images.len(), c) {
            let at = (DATA_OFFSET + off) as usize;
            let got = &images[m][at..at + CHUNK as usize];
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "{level:?}: array byte {} should be {:#04x} on member {m} at data offset {} but is {:#04x}",
                    c * CHUNK + i as u64,
                    want[i],
                    off + i as u64,
                    got[i]
                );
            }
        }
    }
}

fn assert_written(image: &[u8], len: u64) {
    let empty = image[..len as usize]
        .chunks(4096)
        .position(|b| b.iter().all(|&x| x == 0));
    assert!(
        empty.is_none(),
        "block {empty:?} of the array reads as zeroes after fio wrote it"
    );
}

/// fio verify, a whole-array read through the export, a clean stop; then the member
/// images (vblade's file among them) against md's layout.
fn verify_round(rig: &mut Rig, level: Level, per_job: u64, images: impl Fn() -> Vec<Vec<u8>>) {
    assert_fio_clean(
        run_fio(&fio_args(&rig.uri(), per_job, false)),
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
    assert_members_match(level, &array, &images());
}

// ---- The tests --------------------------------------------------------------------------

#[test]
fn raid1_of_a_local_file_and_aoe_verifies_and_vblades_file_mirrors_it() {
    if !can_run(&[]) {
        return;
    }
    let net = Net::new(9000);
    let mut rig = rig(
        &net,
        "r1aoe",
        "raid1",
        &[net.local(), net.aoe()],
        "timeout = \"5s\"",
    );
    let st = rig.status();
    assert_eq!(st["size"], MEMBER_DATA, "{st:#}");
    let m = &st["members"][1];
    assert_eq!(
        (m["protocol"].as_str(), m["locality"].as_str()),
        (Some("aoe"), Some("remote")),
        "{st:#}"
    );
    assert_eq!(m["size"], MEMBER_SIZE, "{st:#}");
    // The AoE engine's view: the target's MAC, the window vblade granted, at MTU 9000
    // more than two sectors per frame, and the IDENTIFY already sent.
    let s = &m["session"];
    assert!(
        s["mac"].as_str().is_some_and(|mac| mac.len() == 17),
        "{st:#}"
    );
    assert!(s["window"].as_u64().unwrap() > 0, "{st:#}");
    assert!(s["sectors_per_frame"].as_u64().unwrap() > 2, "{st:#}");
    assert!(s["frames_sent"].as_u64().unwrap() > 0, "{st:#}");
    let files = [net.local.clone(), net.aoe_file.clone()];
    verify_round(&mut rig, Level::Raid1, MEMBER_DATA / 2, || {
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    });
}

#[test]
fn raid10_of_local_aoe_and_nbd_verifies_and_stripes() {
    if !can_run(&["nbdkit"]) {
        return;
    }
    let net = Net::new(9000);
    let kit = NbdkitServer::memory(MEMBER_SIZE).unwrap();
    let members = [net.local(), net.aoe(), kit.uri()];
    let mut rig = rig(&net, "r10aoe", "raid10", &members, "timeout = \"5s\"");
    let st = rig.status();
    // near-2 over 3 members: 3/2 of a member's data.
    assert_eq!(st["size"], MEMBER_DATA * 3 / 2, "{st:#}");
    let (local, aoe, uri) = (net.local.clone(), net.aoe_file.clone(), kit.uri());
    verify_round(&mut rig, Level::Raid10, 24 * MIB, || {
        vec![
            std::fs::read(&local).unwrap(),
            std::fs::read(&aoe).unwrap(),
            fixtures::nbd_image(&uri).unwrap(),
        ]
    });
}

/// 5% of AoE frames dropped at each end of the link (nftables): fio's crc32c
/// verification through a linear array of the AoE member alone passes, and
/// vblade's file holds the array's bytes in place.
#[test]
fn lossy_link_fio_verifies_through_an_aoe_member_alone() {
    if !can_run(&["nft"]) {
        return;
    }
    let net = Net::new(9000);
    net.pair.drop_aoe_frames(5).unwrap();
    let mut rig = rig(&net, "lossy", "linear", &[net.aoe()], "timeout = \"10s\"");
    let file = net.aoe_file.clone();
    verify_round(&mut rig, Level::Linear, 16 * MIB, || {
        vec![std::fs::read(&file).unwrap()]
    });
    let dropped = net.pair.dropped_frames().unwrap();
    assert!(
        dropped > 100,
        "the loss rules dropped only {dropped} frames"
    );
    eprintln!("lossy link: {dropped} AoE frames dropped, every byte verified");
}

/// The fault mid-run of a raid1(local + AoE) with `remote.timeout` 1 s: fio ends clean,
/// the AoE member is faulty with one of `reasons`. `heal` undoes the fault; the target
/// answers again (logged), `member_readd` rebuilds it, and with the local member failed
/// fio's blocks verify from the AoE member alone.
fn fault_mid_run(
    net: &mut Net,
    name: &str,
    inject: impl FnOnce(&mut Net),
    heal: impl FnOnce(&mut Net),
    reasons: &[&str],
) {
    let rig = rig(
        net,
        name,
        "raid1",
        &[net.local(), net.aoe()],
        "timeout = \"1s\"",
    );
    let uri = rig.uri();
    let per_job = 16 * MIB;
    let fio = fio_background(&uri, per_job);
    wait_written(&rig, 1, 2 * per_job / 3, &fio);
    inject(net);
    rig.wait_member(
        1,
        "faulty with the expected reason",
        Duration::from_secs(5),
        |m| m["state"] == "faulty" && m["fault"].as_str().is_some_and(|f| reasons.contains(&f)),
    );
    eprintln!(
        "{name}: the AoE member went faulty: {}",
        rig.member(1)["fault"]
    );
    let res = fio.join().unwrap();
    if !matches!(&res, Ok((true, _))) {
        eprintln!("daemon log tail:\n{}", log_tail(&rig.daemon.log(), 60));
    }
    assert_fio_clean(res, per_job, false);
    assert_eq!(rig.member(0)["state"], "healthy");

    let seen = rig.daemon.log().matches("AoE target answers again").count();
    heal(net);
    // vblade exits when a write to the network fails ("write to network: No buffer space
    // available": with our end down its replies had nowhere to go). That is vblade's
    // doing, not the daemon's: start it again, as an operator would, and expect the
    // daemon to find the target once it announces itself.
    if net.vblade.pid().is_some_and(|p| !fixtures::pid_alive(p)) {
        eprintln!(
            "{name}: vblade exited while the link was down: {}",
            log_tail(&net.vblade.log(), 2).trim()
        );
        net.vblade.restart().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while rig.daemon.log().matches("AoE target answers again").count() <= seen {
        // The AoE session's counters (frames, retransmits, send errors) say whether the
        // engine was still asking for the target when the link came back.
        assert!(
            Instant::now() < deadline,
            "no new 'AoE target answers again' in the log 15 s after the link came back; \
             vblade alive: {:?}, its log:\n{}\nthe member: {:#}\nthe log's AoE lines:\n{}",
            net.vblade.pid().map(fixtures::pid_alive),
            log_tail(&net.vblade.log(), 10),
            rig.member(1),
            rig.daemon
                .log()
                .lines()
                .filter(|l| l.contains("AoE") && !l.contains("member I/O failed"))
                .take(60)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = rig.daemon.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("answers again"))
        .unwrap_or("");
    eprintln!("{name}: {line}");
    let written = rig.counter(1, "bytes_written");
    let r = rig.request(json!({"cmd": "member_readd", "array": name, "member": "1"}));
    assert_eq!(r["ok"], true, "{r}");
    rig.wait_member(1, "rebuilt and healthy", Duration::from_secs(120), |m| {
        m["state"] == "healthy"
    });
    assert!(
        rig.counter(1, "bytes_written") - written >= MEMBER_DATA,
        "the rebuild did not copy the array onto the AoE member"
    );
    let r = rig.request(json!({"cmd": "member_fail", "array": name, "member": "0"}));
    assert_eq!(r["ok"], true, "{r}");
    let local_read = rig.counter(0, "bytes_read");
    assert_fio_clean(run_fio(&fio_args(&uri, per_job, true)), per_job, true);
    assert_eq!(
        rig.counter(0, "bytes_read"),
        local_read,
        "a failed member served reads"
    );
    assert!(rig.counter(1, "bytes_read") >= 2 * per_job);
}

#[test]
fn vblade_killed_mid_run_faults_the_member_and_it_returns_after_restart() {
    if !can_run(&[]) {
        return;
    }
    let mut net = Net::new(9000);
    fault_mid_run(
        &mut net,
        "r1kill",
        |n| n.vblade.kill9().unwrap(),
        |n| n.vblade.restart().unwrap(),
        &["timeout"],
    );
}

#[test]
fn link_down_mid_run_faults_the_member_and_it_returns_after_link_up() {
    if !can_run(&[]) {
        return;
    }
    let mut net = Net::new(1500);
    fault_mid_run(
        &mut net,
        "r1link",
        |n| n.pair.set_link(false).unwrap(),
        |n| n.pair.set_link(true).unwrap(),
        &["disconnected"],
    );
    let _ = &net.files;
}

// ---- Refused at start ------------------------------------------------------------------

/// Runs ublkd (under `prefix`) over a raid1 of a local file and `aoe`, expecting it to
/// exit non-zero soon; returns the last line of its stderr, which must name the member.
fn refused_at_start(net: &Net, prefix: &[&str], aoe: &str) -> String {
    let tmp = Tmp::new().unwrap();
    let config = tmp.join("layout.toml");
    let layout = format!(
        "[[array]]\nname = \"r1\"\nlevel = \"raid1\"\nmembers = [{:?}, {aoe:?}]\n\
         export.nbd = {{ listen = [\"unix:{}/r1.sock\"] }}\n",
        net.local(),
        tmp.path().display()
    );
    std::fs::write(&config, layout).unwrap();
    let mut argv: Vec<String> = net.pair.exec_prefix();
    argv.extend(prefix.iter().map(|s| s.to_string()));
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .arg(bin())
        .arg("--config")
        .arg(&config)
        .arg("--mgmt-socket")
        .arg(tmp.join("mgmt.sock"));
    let t = Instant::now();
    let out = fixtures::run_bounded(&mut cmd, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ublkd started with {aoe}:\n{stderr}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let last = stderr.lines().last().unwrap_or("").to_string();
    assert!(last.contains(aoe), "the error must name {aoe}:\n{stderr}");
    eprintln!("refused: {last}");
    last
}

/// No target at that shelf.slot, and a daemon without CAP_NET_RAW: ublkd refuses to
/// start, and says which member, why, and what to do.
#[test]
fn missing_target_and_missing_cap_net_raw_are_refused_at_start() {
    if !can_run(&["setpriv"]) {
        return;
    }
    let net = Net::new(1500);
    let absent = format!("aoe:{}/7.9", net.pair.initiator_if);
    let err = refused_at_start(&net, &[], &absent);
    assert!(
        err.contains("e7.9") && err.contains("did not answer") && err.contains("vblade"),
        "{err}"
    );
    // setpriv drops CAP_NET_RAW from the bounding set, so ublkd runs without it.
    let err = refused_at_start(&net, &["setpriv", "--bounding-set=-net_raw"], &net.aoe());
    assert!(
        err.contains("CAP_NET_RAW") && err.contains("setcap"),
        "{err}"
    );
}
