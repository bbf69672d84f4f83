//! The iSCSI member against tgtd on 127.0.0.1: login without and with CHAP (one-way
//! and mutual, good and bad secrets), LUNs of 512- and 4096-byte blocks, pattern data
//! written through the member and read back through the member, from the LUN's backing
//! file and with libiscsi's tools; flush, FUA, UNMAP, WRITE SAME; many commands in
//! flight; a killed and restarted tgtd; discovery. Every test is bounded in time.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backends::iscsi::{discovery, IscsiError, IscsiMember, IscsiOptions, IscsiUrl, LoginOptions};
use fixtures::{pattern, sparse_file, verify_pattern, LunSpec, Tgtd, Tmp};
use raidcore::{IoBuf, IoError, IoResult, Member, MemberIo, Op, Proto, Tag};

const MIB: u64 = 1 << 20;
const IQN: &str = "iqn.2026-11.io.uniblk.test:disk";

async fn bounded<F: Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test exceeded its bound of {secs} s"),
    }
}

fn options() -> IscsiOptions {
    IscsiOptions {
        timeout: Duration::from_secs(20),
        login: LoginOptions {
            connect_timeout: Duration::from_secs(5),
            ..LoginOptions::default()
        },
        heartbeat: Duration::from_millis(500),
        reconnect_backoff_max: Duration::from_millis(200),
    }
}

/// tgtd with one target of one LUN over a fresh sparse file.
struct Lun {
    tmp: Tmp,
    tgtd: Tgtd,
}

impl Lun {
    fn start(size: u64, block_size: u32, thin: bool) -> Lun {
        let tmp = Tmp::new().unwrap();
        let img = tmp.join("lun.img");
        sparse_file(&img, size).unwrap();
        let mut tgtd = Tgtd::start().unwrap();
        let mut spec = LunSpec::file(&img, block_size);
        if thin {
            spec = spec.thin();
        }
        tgtd.add_target(1, IQN, &[spec]).unwrap();
        Lun { tmp, tgtd }
    }

    fn url(&self) -> String {
        self.tgtd.url(IQN, 1)
    }

    fn image(&self) -> std::path::PathBuf {
        self.tmp.join("lun.img")
    }
}

async fn open(url: &str) -> IscsiMember {
    IscsiMember::open(url, options())
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

fn io(m: &IscsiMember, op: Op, offset: u64, len: u64, fua: bool, buf: IoBuf) -> MemberIo {
    let info = m.info();
    MemberIo {
        tag: Tag {
            id: raidcore::io::next_tag_id(),
            class: info.class,
            member: 0,
            proto: info.proto,
            op,
            offset,
            len,
            fua,
        },
        buf,
    }
}

async fn write(m: &IscsiMember, offset: u64, data: &mut [u8], fua: bool) -> IoResult {
    let len = data.len() as u64;
    m.submit(io(m, Op::Write, offset, len, fua, IoBuf::from_slice(data)))
        .await
}

async fn read(m: &IscsiMember, offset: u64, len: u64) -> IoResult<Vec<u8>> {
    let mut buf = vec![0xeeu8; len as usize];
    let b = IoBuf::from_slice(&mut buf);
    m.submit(io(m, Op::Read, offset, len, false, b)).await?;
    Ok(buf)
}

async fn no_data(m: &IscsiMember, op: Op, offset: u64, len: u64) -> IoResult {
    m.submit(io(m, op, offset, len, false, IoBuf::empty()))
        .await
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// Pattern writes of several sizes and offsets, read back through the member and from
/// the backing file.
async fn write_read_back(m: &IscsiMember, image: &Path, seed: u64) {
    let bs = u64::from(m.info().block_size);
    for (offset, len) in [
        (0, bs),
        (bs * 3, bs * 5),
        (MIB, 64 << 10),
        (2 * MIB - bs, 3 * MIB + bs),
        (m.info().size - bs * 8, bs * 8),
    ] {
        let mut data = pattern(seed, offset, len as usize);
        write(m, offset, &mut data, false)
            .await
            .unwrap_or_else(|e| panic!("write {len} at {offset}: {e}"));
        let back = read(m, offset, len).await.unwrap();
        verify_pattern(seed, offset, &back).unwrap_or_else(|e| panic!("member read back: {e}"));
    }
    // The target flushed: the backing file holds what we wrote, where we wrote it.
    no_data(m, Op::Flush, 0, 0).await.unwrap();
    let back = file_bytes(image, 2 * MIB - bs, (3 * MIB + bs) as usize);
    verify_pattern(seed, 2 * MIB - bs, &back).unwrap_or_else(|e| panic!("backing file: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_without_chap_and_pattern_data_512() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = Lun::start(64 * MIB, 512, false);
    bounded(60, async {
        let m = open(&lun.url()).await;
        let info = m.info();
        assert_eq!(info.proto, Proto::Iscsi);
        assert_eq!(info.size, 64 * MIB);
        assert_eq!(info.block_size, 512);
        assert!(info.caps.flush && info.caps.fua);
        assert!(!info.caps.discard, "UNMAP without thin provisioning");
        let st = m.status();
        assert!(st.connected, "{st:?}");
        write_read_back(&m, &lun.image(), 7).await;
        // A FUA write lands in the file without a flush.
        let mut d = pattern(8, 5 * MIB, 4096);
        write(&m, 5 * MIB, &mut d, true).await.unwrap();
        verify_pattern(8, 5 * MIB, &file_bytes(&lun.image(), 5 * MIB, 4096)).unwrap();
        m.close();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lun_with_4096_byte_blocks_unmap_and_write_same() {
    if !fixtures::require_all(&["tgtd", "iscsi-readcapacity16"]) {
        return;
    }
    let lun = Lun::start(32 * MIB, 4096, true);
    // libiscsi's view of the same LUN: the oracle for size and block size.
    let rc = fixtures::run_ok(fixtures::command("iscsi-readcapacity16").arg(lun.url())).unwrap();
    assert!(rc.contains("LOGICAL BLOCK LENGTH IN BYTES:4096"), "{rc}");
    assert!(rc.contains("Total size:33554432"), "{rc}");
    bounded(60, async {
        let m = open(&lun.url()).await;
        let info = m.info();
        assert_eq!((info.size, info.block_size), (32 * MIB, 4096));
        assert!(
            info.caps.discard,
            "thin_provisioning=1 advertises UNMAP: {:?}",
            m.lun()
        );
        write_read_back(&m, &lun.image(), 11).await;

        // A 512-byte request on a 4096-byte LUN is refused before it leaves.
        let e = read(&m, 512, 512).await.unwrap_err();
        assert!(matches!(e, IoError::Invalid(_)), "{e}");

        // UNMAP: the range is deallocated in the backing file (tgtd punches a hole).
        let mut d = pattern(12, 4 * MIB, MIB as usize);
        write(&m, 4 * MIB, &mut d, false).await.unwrap();
        no_data(&m, Op::Trim, 4 * MIB, MIB).await.unwrap();
        no_data(&m, Op::Flush, 0, 0).await.unwrap();
        let after = file_bytes(&lun.image(), 4 * MIB, MIB as usize);
        assert!(
            after.iter().all(|&b| b == 0),
            "unmapped range still holds data"
        );

        // Write zeroes (WRITE SAME) where the LUN has it; reads back as zeroes.
        if info.caps.write_zeroes {
            let mut d = pattern(13, 8 * MIB, MIB as usize);
            write(&m, 8 * MIB, &mut d, false).await.unwrap();
            no_data(&m, Op::WriteZeroes, 8 * MIB, 512 << 10)
                .await
                .unwrap();
            let back = read(&m, 8 * MIB, MIB).await.unwrap();
            assert!(back[..512 << 10].iter().all(|&b| b == 0));
            verify_pattern(13, 8 * MIB + (512 << 10), &back[512 << 10..]).unwrap();
        } else {
            eprintln!(
                "note: this tgtd does not report WRITE SAME(16): {:?}",
                m.lun()
            );
        }
        m.close();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_commands_in_flight_stay_in_order_and_correct() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = Lun::start(64 * MIB, 512, false);
    bounded(120, async {
        let m = Arc::new(open(&lun.url()).await);
        // 64 tasks each writing then reading their own 4 KiB..256 KiB regions at once:
        // more than tgtd's command window, so CmdSN flow control is exercised too.
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let m = m.clone();
                tokio::spawn(async move {
                    let len = 4096 << (i % 7);
                    let offset = i * MIB;
                    for round in 0..4u64 {
                        let seed = i * 100 + round;
                        let mut d = pattern(seed, offset, len);
                        write(&m, offset, &mut d, round == 3).await.unwrap();
                        let back = read(&m, offset, len as u64).await.unwrap();
                        verify_pattern(seed, offset, &back)
                            .unwrap_or_else(|e| panic!("task {i} round {round}: {e}"));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        no_data(&m, Op::Flush, 0, 0).await.unwrap();
        for i in 0..64u64 {
            let len = 4096 << (i % 7);
            let b = file_bytes(&lun.image(), i * MIB, len);
            verify_pattern(i * 100 + 3, i * MIB, &b).unwrap();
        }
        m.close();
    })
    .await;
}

/// Commands started together under a plug (as the NBD server starts a batch) are queued
/// and go out when the plug is dropped, in one write or, when the socket takes only part,
/// the rest from a task: every one must reach tgtd whole and in CmdSN order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugged_batch_of_commands_reaches_the_target_whole() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = Lun::start(64 * MIB, 512, false);
    bounded(120, async {
        let m = open(&lun.url()).await;
        const N: u64 = 96;
        const LEN: usize = 16 << 10;
        let mut data: Vec<Vec<u8>> = (0..N)
            .map(|i| pattern(500 + i, i * LEN as u64, LEN))
            .collect();
        let mut writes: Vec<_> = data
            .iter_mut()
            .enumerate()
            .map(|(i, d)| {
                let buf = IoBuf::from_slice(d);
                // Boxed to poll each in place (an IoFuture is not Unpin).
                Box::pin(m.submit(io(
                    &m,
                    Op::Write,
                    i as u64 * LEN as u64,
                    LEN as u64,
                    false,
                    buf,
                )))
            })
            .collect();
        {
            let _plug = raidcore::plug::Plug::new();
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            for w in &mut writes {
                assert!(
                    w.as_mut().poll(&mut cx).is_pending(),
                    "answered before sent"
                );
            }
        }
        // Sent when the plug went, not by whatever writes next (the heartbeat's ping
        // would, but only after its interval and a timeout or two).
        let done = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(writes))
            .await
            .expect("the plug's doorbell sent the batch");
        for r in done {
            r.unwrap();
        }
        no_data(&m, Op::Flush, 0, 0).await.unwrap();
        for i in 0..N {
            let offset = i * LEN as u64;
            let back = read(&m, offset, LEN as u64).await.unwrap();
            verify_pattern(500 + i, offset, &back).unwrap_or_else(|e| panic!("write {i}: {e}"));
            let b = file_bytes(&lun.image(), offset, LEN);
            verify_pattern(500 + i, offset, &b).unwrap_or_else(|e| panic!("file {i}: {e}"));
        }
        m.close();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc32c_digests_when_offered() {
    if !fixtures::require("tgtd") {
        return;
    }
    let mut lun = Lun::start(16 * MIB, 512, false);
    // tgtd offers digests only when the target is configured for them.
    lun.tgtd
        .set_param(1, "HeaderDigest", "CRC32C,None")
        .unwrap();
    lun.tgtd.set_param(1, "DataDigest", "CRC32C,None").unwrap();
    bounded(60, async {
        let mut o = options();
        o.login.digests = true;
        let m = IscsiMember::open(&lun.url(), o).await.unwrap();
        let st = m.status();
        assert!(st.header_digest && st.data_digest, "{st:?}");
        write_read_back(&m, &lun.image(), 21).await;
        m.close();
    })
    .await;
}

fn chap_lun(outgoing: bool) -> Lun {
    let mut lun = Lun::start(16 * MIB, 512, false);
    lun.tgtd
        .add_chap(1, "alice", "alice-secret-12", false)
        .unwrap();
    if outgoing {
        lun.tgtd
            .add_chap(1, "tgt-side", "target-secret-12", true)
            .unwrap();
    }
    lun
}

fn with_auth(url: &str, auth: &str) -> String {
    url.replacen("iscsi://", &format!("iscsi://{auth}@"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_good_secret_logs_in_and_wrong_secret_says_so() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = chap_lun(false);
    bounded(60, async {
        let good = with_auth(&lun.url(), "alice%alice-secret-12");
        let m = open(&good).await;
        assert!(
            !m.info().address.contains("alice-secret-12"),
            "the secret must not show in the address: {}",
            m.info().address
        );
        write_read_back(&m, &lun.image(), 31).await;
        m.close();

        let bad = with_auth(&lun.url(), "alice%wrong-secret-1");
        let e = IscsiMember::open(&bad, options()).await.err().unwrap();
        let msg = e.to_string();
        assert_eq!(
            msg,
            format!(
                "iSCSI target {IQN} at {} refused login: authentication failed (check the CHAP user/secret)",
                lun.tgtd.portal()
            )
        );
        assert!(!msg.contains("wrong-secret-1"));
        assert_eq!(e.errno(), libc::EACCES);

        // No credentials at all for a target that wants CHAP.
        let e = IscsiMember::open(&lun.url(), options()).await.err().unwrap();
        assert!(matches!(e, IscsiError::LoginRefused { .. }), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_chap_checks_the_target() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = chap_lun(true);
    bounded(60, async {
        let url = with_auth(&lun.url(), "alice%alice-secret-12");
        let mutual = |user: &str, secret: &str| {
            let mut o = options();
            o.login.mutual = Some(backends::iscsi::Chap {
                user: user.into(),
                secret: secret.into(),
            });
            o
        };
        let m = IscsiMember::open(&url, mutual("tgt-side", "target-secret-12"))
            .await
            .unwrap();
        write_read_back(&m, &lun.image(), 41).await;
        m.close();
        // A target that does not know the secret we expect is refused.
        let e = IscsiMember::open(&url, mutual("tgt-side", "not-the-secret"))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, IscsiError::MutualAuth { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_target_comes_back_and_in_flight_io_completes() {
    if !fixtures::require("tgtd") {
        return;
    }
    let mut lun = Lun::start(16 * MIB, 512, false);
    let m = Arc::new(bounded(30, open(&lun.url())).await);
    bounded(30, write_read_back(&m, &lun.image(), 51)).await;
    lun.tgtd.kill().unwrap();
    // Requests issued while the target is down wait for the re-login and complete.
    let writer = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut d = pattern(52, 3 * MIB, 256 << 10);
            write(&m, 3 * MIB, &mut d, true).await
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!m.connected(), "the member noticed the target is gone");
    lun.tgtd.restart().unwrap();
    bounded(30, async {
        writer
            .await
            .unwrap()
            .expect("the write waits for the new session");
        let back = read(&m, 3 * MIB, 256 << 10).await.unwrap();
        verify_pattern(52, 3 * MIB, &back).unwrap();
        let st = m.status();
        assert!(st.connected && st.reconnects >= 1, "{st:?}");
        // What was written before the crash is still there.
        let back = read(&m, MIB, 64 << 10).await.unwrap();
        verify_pattern(51, MIB, &back).unwrap();
    })
    .await;
    m.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_for_longer_than_the_deadline_fails_with_disconnected() {
    if !fixtures::require("tgtd") {
        return;
    }
    let mut lun = Lun::start(16 * MIB, 512, false);
    let mut o = options();
    o.timeout = Duration::from_secs(2);
    let m = bounded(30, IscsiMember::open(&lun.url(), o)).await.unwrap();
    lun.tgtd.kill().unwrap();
    let e = bounded(20, read(&m, 0, 4096)).await.unwrap_err();
    assert!(
        matches!(e, IoError::Disconnected(_) | IoError::Timeout(_)),
        "{e}"
    );
    assert!(e.to_string().contains(IQN), "{e}");
    m.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_targets_luns_and_sizes() {
    if !fixtures::require_all(&["tgtd", "iscsi-ls"]) {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let (a, b) = (tmp.join("a.img"), tmp.join("b.img"));
    sparse_file(&a, 16 * MIB).unwrap();
    sparse_file(&b, 8 * MIB).unwrap();
    let mut tgtd = Tgtd::start().unwrap();
    let iqn2 = "iqn.2026-11.io.uniblk.test:two";
    tgtd.add_target(1, IQN, &[LunSpec::file(&a, 512)]).unwrap();
    tgtd.add_target(2, iqn2, &[LunSpec::file(&a, 512), LunSpec::file(&b, 4096)])
        .unwrap();
    // libiscsi's listing is the oracle.
    let ls = fixtures::run_ok(
        fixtures::command("iscsi-ls").args(["-s", &format!("iscsi://{}", tgtd.portal())]),
    )
    .unwrap();
    assert!(ls.contains(IQN) && ls.contains(iqn2), "{ls}");
    let portal = IscsiUrl::parse_any(&format!("iscsi://{}", tgtd.portal())).unwrap();
    let found = bounded(60, discovery::discover(&portal, &options().login))
        .await
        .unwrap();
    let names: Vec<&str> = found.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, [IQN, iqn2]);
    assert!(
        found[0].addresses[0].starts_with(&tgtd.portal()),
        "{found:?}"
    );
    let two = &found[1].luns;
    assert_eq!(two.len(), 2, "{found:?}");
    assert_eq!(
        (two[0].lun, two[0].size, two[0].block_size),
        (1, 16 * MIB, 512)
    );
    assert_eq!(
        (two[1].lun, two[1].size, two[1].block_size),
        (2, 8 * MIB, 4096)
    );
    assert_eq!(two[1].address, tgtd.url(iqn2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_nop_ins_are_answered() {
    if !fixtures::require("tgtd") {
        return;
    }
    let mut lun = Lun::start(16 * MIB, 512, false);
    // tgtd pings every second and drops a connection after 2 unanswered pings.
    lun.tgtd.set_param(1, "nop_interval", "1").unwrap();
    lun.tgtd.set_param(1, "nop_count", "2").unwrap();
    let mut o = options();
    o.heartbeat = Duration::from_secs(3600); // only the target's pings keep it alive
    let m = bounded(30, IscsiMember::open(&lun.url(), o)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = m.status();
    assert!(st.connected && st.reconnects == 0, "{st:?}");
    bounded(30, write_read_back(&m, &lun.image(), 61)).await;
    m.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_pings_the_target() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = Lun::start(16 * MIB, 512, false);
    let m = bounded(30, open(&lun.url())).await;
    let rtt = bounded(10, m.ping()).await.unwrap();
    assert!(rtt < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(m.status().heartbeats >= 2, "{:?}", m.status());
    m.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_open_with_chap_from_a_file_or_the_environment() {
    use backends::addr::{self, RemoteOptions};
    use backends::iscsi::{ChapSource, IscsiAuth, SecretSource};
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = chap_lun(true);
    let secret_file = lun.tmp.join("chap.secret");
    std::fs::write(&secret_file, "alice-secret-12\n").unwrap();
    std::env::set_var("UNIBLK_TEST_TARGET_SECRET", "target-secret-12");
    let remote = RemoteOptions {
        iscsi: IscsiAuth {
            chap: Some(ChapSource {
                user: "alice".into(),
                secret: SecretSource::File(secret_file.clone()),
            }),
            mutual: Some(ChapSource {
                user: "tgt-side".into(),
                secret: SecretSource::Env("UNIBLK_TEST_TARGET_SECRET".into()),
            }),
        },
        ..RemoteOptions::default()
    };
    let url = lun.url();
    bounded(60, async {
        let m = addr::open_with(&addr::parse(&url).unwrap(), &url, &remote)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.info().proto, Proto::Iscsi);
        let mut d = pattern(71, 0, 4096);
        let len = d.len() as u64;
        let tag = Tag {
            id: raidcore::io::next_tag_id(),
            class: m.info().class,
            member: 0,
            proto: m.info().proto,
            op: Op::Write,
            offset: 0,
            len,
            fua: true,
        };
        m.submit(MemberIo {
            tag,
            buf: IoBuf::from_slice(&mut d),
        })
        .await
        .unwrap();
        verify_pattern(71, 0, &file_bytes(&lun.image(), 0, 4096)).unwrap();
        m.close();

        // A wrong secret in the file: the error names the target and the fix, not the
        // secret.
        std::fs::write(&secret_file, "not-alices-secret\n").unwrap();
        let e = addr::open_with(&addr::parse(&url).unwrap(), &url, &remote)
            .await
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("authentication failed (check the CHAP user/secret)"),
            "{msg}"
        );
        assert!(!msg.contains("not-alices-secret"), "{msg}");
    })
    .await;
}

/// A portal that accepts and then says nothing, or says nonsense: the open ends within
/// its bound with an error naming the portal, never a hang or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_garbage_portals_fail_cleanly() {
    use std::io::Write;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (sp, gp) = (
        silent.local_addr().unwrap().port(),
        garbage.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(10));
        drop(held);
    });
    std::thread::spawn(move || {
        for mut c in garbage.incoming().take(2).flatten() {
            // A "Login Response" claiming a 16 MiB text segment.
            let mut b = [0xffu8; 48];
            b[0] = 0x23;
            b[4] = 0; // no AHS
            let _ = c.write_all(&b);
        }
    });
    let mut o = options();
    o.login.connect_timeout = Duration::from_secs(1);
    let url = format!("iscsi://127.0.0.1:{sp}/{IQN}/1");
    let e = bounded(10, IscsiMember::open(&url, o.clone()))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, IscsiError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{sp}")), "{e}");
    let url = format!("iscsi://127.0.0.1:{gp}/{IQN}/1");
    let e = bounded(10, IscsiMember::open(&url, o)).await.err().unwrap();
    assert!(matches!(e, IscsiError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("exceeds"), "{e}");
}

/// A target that keeps the connection but stops answering (SIGSTOP): the command fails
/// with Timeout once its deadline passed and its ABORT TASK went unanswered too (as long
/// again for a command given less than 2 s), and the connection is reset; once the
/// target runs again (SIGCONT) the member logs in anew and serves I/O.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_target_times_out_then_recovers() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = Lun::start(16 * MIB, 512, false);
    let mut o = options();
    o.timeout = Duration::from_secs(1);
    o.heartbeat = Duration::from_secs(3600);
    let m = bounded(30, IscsiMember::open(&lun.url(), o)).await.unwrap();
    let pid = lun.tgtd.pid().unwrap() as i32;
    // SAFETY: signalling the tgtd this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let start = std::time::Instant::now();
    let mut big = pattern(82, 4 * MIB, MIB as usize);
    let (r, w) = bounded(10, async {
        tokio::join!(read(&m, 0, 4096), write(&m, 4 * MIB, &mut big, false))
    })
    .await;
    let took = start.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let we = w.unwrap_err();
    assert!(matches!(we, IoError::Timeout(_)), "{we}");
    assert!(we.to_string().contains("WRITE(16)"), "{we}");
    let e = r.unwrap_err();
    assert!(matches!(e, IoError::Timeout(_)), "{e}");
    assert!(e.to_string().contains("READ(16)"), "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "timed out after {took:?} for a 1 s deadline"
    );
    bounded(30, write_read_back(&m, &lun.image(), 81)).await;
    assert!(m.status().reconnects >= 1, "{:?}", m.status());
    m.close();
}

/// A LUN whose reads take 1.5 s (tgtd over nbdfuse over nbdkit's delay filter) and a
/// member that gives each command 1 s: the read times out and is aborted (ABORT TASK);
/// tgtd finishes the read it already started, then answers the abort; the connection
/// stays up: no reconnect (before ABORT TASK the connection was reset at the deadline), a
/// write issued while the read is stuck and one issued after it both succeed, and the
/// status counts the abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_command_is_aborted_and_the_connection_stays() {
    if !fixtures::require_all(&["tgtd", "nbdkit", "nbdfuse"])
        || !fixtures::require_root("nbdfuse")
        || !fixtures::require_path(Path::new("/dev/fuse"), "FUSE")
    {
        return;
    }
    let slow = fixtures::Nbdkit::memory(16 * MIB)
        .delay_filter(Duration::from_millis(1500), Duration::ZERO)
        .start()
        .unwrap();
    let fuse = fixtures::NbdFuseLoop::attach(&slow.uri()).unwrap();
    let mut tgtd = Tgtd::start().unwrap();
    // O_DIRECT: tgtd's reads reach nbdkit, not the FUSE file's page cache.
    tgtd.add_target(1, IQN, &[LunSpec::file(fuse.file(), 512).direct()])
        .unwrap();
    let mut o = options();
    o.timeout = Duration::from_secs(1);
    o.heartbeat = Duration::from_secs(3600);
    let m = bounded(30, IscsiMember::open(&tgtd.url(IQN, 1), o))
        .await
        .unwrap();
    let mut first = pattern(91, 0, 4096);
    bounded(10, write(&m, 0, &mut first, false)).await.unwrap();
    let start = std::time::Instant::now();
    let mut during = pattern(92, MIB, 4096);
    let (r, w) = bounded(10, async {
        // A block never touched: not in the FUSE file's page cache, so read from nbdkit.
        tokio::join!(read(&m, 8 * MIB, 4096), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            write(&m, MIB, &mut during, false).await
        })
    })
    .await;
    let took = start.elapsed();
    match r {
        // tgtd lets a read already in its backing store finish, then answers the abort:
        // the late data is whole and correct, and returned.
        Ok(data) => {
            eprintln!("the target finished the read before the abort ({took:?})");
            assert!(
                data.iter().all(|&b| b == 0),
                "the late read returned wrong data"
            );
        }
        Err(e) => {
            eprintln!("the read was aborted ({took:?}): {e}");
            assert!(matches!(e, IoError::Timeout(_)), "{e}");
            assert!(e.to_string().contains("READ(16)"), "{e}");
        }
    }
    w.unwrap_or_else(|e| panic!("a write beside the stuck read failed: {e}"));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2800),
        "the timed-out read returned after {took:?} (1 s deadline, 1 s to abort)"
    );
    let st = m.status();
    assert!(st.connected, "{st:?}");
    assert_eq!((st.reconnects, st.aborts), (0, 1), "{st:?}");
    let mut after = pattern(93, 2 * MIB, 4096);
    bounded(10, write(&m, 2 * MIB, &mut after, false))
        .await
        .unwrap();
    let st = m.status();
    assert_eq!(st.reconnects, 0, "the abort cost the connection: {st:?}");
    assert_eq!(st.in_flight, 0, "{st:?}");
    m.close();
    drop(tgtd);
    fuse.detach().unwrap();
}

/// tgtd told to take unsolicited data (InitialR2T=No, a 128 KiB first burst, 64 KiB
/// segments) and to queue only 4 commands (a narrow CmdSN window): writes of every size
/// mix immediate data, unsolicited Data-Out and R2T-driven bursts, 32 tasks wait for
/// window room, and everything reads back, also from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_data_and_a_narrow_command_window() {
    if !fixtures::require("tgtd") {
        return;
    }
    let mut lun = Lun::start(64 * MIB, 512, false);
    for (k, v) in [
        ("InitialR2T", "No"),
        ("FirstBurstLength", "131072"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("MaxXmitDataSegmentLength", "65536"),
        ("MaxQueueCmd", "4"),
    ] {
        lun.tgtd.set_param(1, k, v).unwrap();
    }
    bounded(120, async {
        let m = Arc::new(open(&lun.url()).await);
        let st = m.status();
        assert!(!st.initial_r2t && st.immediate_data, "{st:?}");
        assert_eq!(
            (st.first_burst, st.max_send_segment),
            (131072, 65536),
            "{st:?}"
        );
        write_read_back(&m, &lun.image(), 91).await;
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let m = m.clone();
                tokio::spawn(async move {
                    // 512 B .. 1 MiB: under, at and over the first burst.
                    let len = 512usize << (i % 12);
                    let offset = i * 2 * MIB;
                    let mut d = pattern(900 + i, offset, len);
                    write(&m, offset, &mut d, false).await.unwrap();
                    let back = read(&m, offset, len as u64).await.unwrap();
                    verify_pattern(900 + i, offset, &back).unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        no_data(&m, Op::Flush, 0, 0).await.unwrap();
        for i in 0..32u64 {
            let len = 512usize << (i % 12);
            let b = file_bytes(&lun.image(), i * 2 * MIB, len);
            verify_pattern(900 + i, i * 2 * MIB, &b).unwrap();
        }
        m.close();
    })
    .await;
}

/// close() logs out: tgtd then lists no session (I_T nexus) for the target, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_logs_out() {
    if !fixtures::require("tgtd") {
        return;
    }
    let lun = Lun::start(16 * MIB, 512, false);
    let nexus = || {
        let show = lun.tgtd.adm(&["--op", "show", "--mode", "target"]).unwrap();
        show.matches("I_T nexus: ").count()
    };
    let m = bounded(30, open(&lun.url())).await;
    assert_eq!(nexus(), 1, "one session while open");
    m.close();
    // Within a second: the target ends the session on our Logout (only without one
    // would it wait for our 2 s fallback to drop the connection).
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while nexus() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session outlived close(); tgtd:\n{}\n{}",
            lun.tgtd.log(),
            lun.tgtd.adm(&["--op", "show", "--mode", "target"]).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
