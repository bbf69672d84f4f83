//! The NBD member against real servers: nbdkit (memory, file, and its error, delay,
//! log and blocksize-policy filters), qemu-nbd over a file, nbd-server over a file
//! (simple replies only). Data is verified through the member and, for file-backed
//! servers, in the backing file itself. Every test is bounded in time.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use backends::addr;
use backends::nbd::{list_exports, NbdError, NbdMember, NbdOptions};
use fixtures::{pattern, verify_pattern, NbdServerPeer, Nbdkit, NbdkitRestartable, QemuNbd, Tmp};
use raidcore::{Class, IoBuf, IoError, IoResult, Member, MemberIo, Op, Proto, Tag};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Fails the test if `f` takes longer than `secs`.
async fn bounded<F: Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test exceeded its bound of {secs} s"),
    }
}

fn options(timeout: Duration) -> NbdOptions {
    NbdOptions {
        timeout,
        connections: 2,
        reconnect_backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(5),
    }
}

async fn open(uri: &str) -> NbdMember {
    NbdMember::open(uri, options(Duration::from_secs(20)))
        .await
        .unwrap_or_else(|e| panic!("open {uri}: {e}"))
}

fn io(m: &NbdMember, op: Op, offset: u64, len: u64, fua: bool, buf: IoBuf) -> MemberIo {
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

async fn write(m: &NbdMember, offset: u64, data: &mut [u8], fua: bool) -> IoResult {
    let len = data.len() as u64;
    m.submit(io(m, Op::Write, offset, len, fua, IoBuf::from_slice(data)))
        .await
}

async fn read(m: &NbdMember, offset: u64, len: u64) -> IoResult<Vec<u8>> {
    let mut buf = vec![0xeeu8; len as usize];
    m.submit(io(
        m,
        Op::Read,
        offset,
        len,
        false,
        IoBuf::from_slice(&mut buf),
    ))
    .await?;
    Ok(buf)
}

async fn no_data(m: &NbdMember, op: Op, offset: u64, len: u64) -> IoResult {
    m.submit(io(m, op, offset, len, false, IoBuf::empty()))
        .await
}

async fn write_pattern(m: &NbdMember, seed: u64, offset: u64, len: u64, fua: bool) {
    let mut data = pattern(seed, offset, len as usize);
    write(m, offset, &mut data, fua)
        .await
        .unwrap_or_else(|e| panic!("write [{offset}, +{len}): {e}"));
}

async fn check_pattern(m: &NbdMember, seed: u64, offset: u64, len: u64) {
    let data = read(m, offset, len)
        .await
        .unwrap_or_else(|e| panic!("read [{offset}, +{len}): {e}"));
    verify_pattern(seed, offset, &data).unwrap();
}

/// (offset, length) pairs spread over a device of `size` bytes, all `bs`-aligned.
fn spots(size: u64, bs: u64) -> Vec<(u64, u64)> {
    let down = |x: u64| x / bs * bs;
    vec![
        (0, bs),
        (bs, 4 * KIB.max(bs)),
        (down(12 * KIB + 512), 64 * KIB),
        (down(MIB - bs), 2 * bs),
        (down(4 * MIB + 512), 3 * MIB + bs),
        (size - 64 * KIB, 64 * KIB),
    ]
}

/// Everything a member must do, checked through the member; returns the regions that
/// must hold each pattern seed, for a look at the backing file.
async fn exercise(m: &NbdMember) -> Vec<(u64, u64, u64)> {
    let (size, bs) = (m.info().size, u64::from(m.info().block_size));
    let mut expect = Vec::new();
    for (i, (off, len)) in spots(size, bs).into_iter().enumerate() {
        let seed = 100 + i as u64;
        write_pattern(m, seed, off, len, i % 2 == 1).await;
        check_pattern(m, seed, off, len).await;
        expect.push((seed, off, len));
    }
    // One request bigger than the server's largest: the member splits it.
    let big = u64::from(m.status().max_request) + MIB;
    assert!(size >= 16 * MIB + big + MIB, "the test device is too small");
    write_pattern(m, 99, 16 * MIB, big, false).await;
    check_pattern(m, 99, 16 * MIB, big).await;
    expect.push((99, 16 * MIB, big));
    no_data(m, Op::Flush, 0, 0).await.expect("flush");
    // Zeroes over data, then a trim (whose result is unspecified) elsewhere.
    let (zoff, zlen) = (8 * MIB, 256 * KIB);
    write_pattern(m, 7, zoff, zlen, false).await;
    no_data(m, Op::WriteZeroes, ZEROED.0, ZEROED.1)
        .await
        .expect("write zeroes");
    let got = read(m, zoff, zlen).await.expect("read zeroed range");
    verify_pattern(7, zoff, &got[..64 * KIB as usize]).unwrap();
    assert!(got[64 * KIB as usize..192 * KIB as usize]
        .iter()
        .all(|&b| b == 0));
    verify_pattern(7, zoff + 192 * KIB, &got[192 * KIB as usize..]).unwrap();
    expect.push((7, zoff, 64 * KIB));
    expect.push((7, zoff + 192 * KIB, 64 * KIB));
    no_data(m, Op::Trim, 10 * MIB, MIB).await.expect("trim");
    expect.extend(concurrent(m, 12 * MIB).await);
    no_data(m, Op::Flush, 0, 0).await.expect("flush");
    expect
}

/// 64 writes in flight at once, then 64 reads in flight at once, verified.
async fn concurrent(m: &NbdMember, base: u64) -> Vec<(u64, u64, u64)> {
    let len = 16 * KIB;
    let regions: Vec<(u64, u64, u64)> = (0..64u64)
        .map(|i| (1000 + i, base + i * 2 * len, len))
        .collect();
    let mut bufs: Vec<Vec<u8>> = regions
        .iter()
        .map(|&(seed, off, len)| pattern(seed, off, len as usize))
        .collect();
    let writes = regions
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(_, off, _), b)| write(m, off, b, false));
    for r in futures::future::join_all(writes).await {
        r.expect("concurrent write");
    }
    let reads = regions.iter().map(|&(_, off, len)| read(m, off, len));
    let got = futures::future::join_all(reads).await;
    for (r, &(seed, off, _)) in got.into_iter().zip(&regions) {
        verify_pattern(seed, off, &r.expect("concurrent read")).unwrap();
    }
    regions
}

/// The range `exercise` zeroed (after writing a pattern over it).
const ZEROED: (u64, u64) = (8 * MIB + 64 * KIB, 128 * KIB);

/// The backing file holds the member's patterns (seed, offset, length) and zeroes
/// (offset, length).
fn check_file(path: &Path, patterns: &[(u64, u64, u64)], zeroes: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    for &(seed, off, len) in patterns {
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, off).unwrap();
        verify_pattern(seed, off, &b).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for &(off, len) in zeroes {
        let mut z = vec![1u8; len as usize];
        f.read_exact_at(&mut z, off).unwrap();
        assert!(
            z.iter().all(|&b| b == 0),
            "[{off}, +{len}) is not zero in the file"
        );
    }
}

fn image(tmp: &Tmp, size: u64) -> std::path::PathBuf {
    let p = tmp.join("disk.img");
    fixtures::sparse_file(&p, size).unwrap();
    p
}

/// Requests started together under a plug (one batch of the NBD server) go to one
/// connection, in one write; a batch started while another is in flight goes to the
/// other connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugged_batch_stays_on_one_connection_and_batches_alternate() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let server = Nbdkit::memory(64 * MIB).start().unwrap();
    bounded(60, async {
        let m = open(&server.uri()).await;
        assert_eq!(m.status().connected, 2, "{:?}", m.status());
        let mut data: Vec<Vec<u8>> = (0..64u64)
            .map(|i| pattern(i / 16, i * 4096, 4096))
            .collect();
        let mut writes: Vec<_> = data
            .iter_mut()
            .enumerate()
            .map(|(i, d)| {
                let at = i as u64 * 4096;
                // Boxed to poll each in place (an IoFuture is not Unpin).
                Box::pin(m.submit(io(&m, Op::Write, at, 4096, false, IoBuf::from_slice(d))))
            })
            .collect();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut seen = m.status().requests_per_connection;
        let mut used = Vec::new();
        // Four batches of 16, each started before the previous ones are answered.
        for (batch, ws) in writes.chunks_mut(16).enumerate() {
            {
                let _plug = raidcore::plug::Plug::new();
                for w in ws {
                    let _ = w.as_mut().poll(&mut cx);
                }
            }
            let now = m.status().requests_per_connection;
            let grew: Vec<u64> = now.iter().zip(&seen).map(|(a, b)| a - b).collect();
            let on = grew.iter().position(|&g| g == 16);
            assert!(
                on.is_some() && grew.iter().sum::<u64>() == 16,
                "batch {batch}: one connection carries it all: {grew:?}"
            );
            used.push(on.unwrap());
            seen = now;
        }
        assert_eq!(
            used,
            [0, 1, 0, 1].map(|c| (c + used[0]) % 2),
            "batches alternate"
        );
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        for i in 0..64u64 {
            let back = read(&m, i * 4096, 4096).await.unwrap();
            verify_pattern(i / 16, i * 4096, &back).unwrap();
        }
        m.close();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_member_does_everything_over_several_connections() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let log = tmp.join("requests.log");
    let logarg = format!("logfile={}", log.display());
    let server = Nbdkit::memory(64 * MIB)
        .filter("log", &[&logarg])
        .start()
        .unwrap();
    bounded(60, async {
        let text = server.uri();
        let m = addr::open(&addr::parse(&text).unwrap(), &text)
            .await
            .unwrap();
        let info = m.info().clone();
        assert_eq!(info.address, text);
        assert_eq!(
            (info.class, info.proto, info.engine),
            (Class::Remote, Proto::Nbd, "nbd")
        );
        assert_eq!((info.size, info.block_size), (64 * MIB, 512));
        assert!(info.caps.flush && info.caps.fua && info.caps.discard && info.caps.write_zeroes);
        drop(m);
        let m = open(&text).await;
        exercise(&m).await;
        let st = m.status();
        assert!(st.multi_conn && st.structured_replies, "{st:?}");
        assert_eq!((st.connected, st.connections), (2, 2), "{st:?}");
        assert!(st.requests_per_connection.iter().all(|&n| n > 10), "{st:?}");
        m.close();
    })
    .await;
    // nbdkit saw both connections carry I/O, the FUA writes, flushes, trims and zeroes.
    let text = std::fs::read_to_string(&log).unwrap();
    let conns: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.contains(" Write ") || l.contains(" Read "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("connection=")))
        .collect();
    assert!(conns.len() >= 2, "I/O used connections {conns:?}");
    for want in ["fua=1", " Flush ", " Trim ", " Zero ", " Disconnect "] {
        assert!(text.contains(want), "nbdkit log lacks {want:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_file_member_round_trips_into_the_file() {
    if !fixtures::require("qemu-nbd") {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let img = image(&tmp, 64 * MIB);
    let mut server = QemuNbd::serve(&img).unwrap();
    let expect = bounded(60, async {
        let m = open(&server.uri()).await;
        assert_eq!(m.info().size, 64 * MIB);
        let expect = exercise(&m).await;
        let st = m.status();
        // qemu-nbd 10 offers multi-conn for a shared (-e 8) writable export.
        assert_eq!(st.connections, if st.multi_conn { 2 } else { 1 }, "{st:?}");
        assert_eq!(st.connected, st.connections, "{st:?}");
        assert!(st.structured_replies, "{st:?}");
        m.close();
        expect
    })
    .await;
    server.stop().unwrap();
    check_file(&img, &expect, &[ZEROED]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_server_member_works_with_simple_replies_only() {
    if !fixtures::require("nbd-server") {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let img = image(&tmp, 64 * MIB);
    let mut server = NbdServerPeer::serve(&img).unwrap();
    let expect = bounded(60, async {
        let m = open(&server.uri()).await;
        assert_eq!(m.info().size, 64 * MIB, "{}", server.log());
        let st = m.status();
        assert!(
            !st.structured_replies,
            "nbd-server 3.2x has no structured replies: {st:?}"
        );
        let expect = exercise(&m).await;
        m.close();
        expect
    })
    .await;
    server.stop().unwrap();
    check_file(&img, &expect, &[ZEROED]);
}

/// A server with a 4 KiB minimum and a 64 KiB maximum that fails any request outside
/// them: the member must use 4 KiB blocks and split big requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_limits_are_honoured_and_big_requests_split() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let server = Nbdkit::memory(16 * MIB)
        .filter(
            "blocksize-policy",
            &[
                "blocksize-minimum=4096",
                "blocksize-preferred=4096",
                "blocksize-maximum=65536",
                "blocksize-error-policy=error",
            ],
        )
        .start()
        .unwrap();
    bounded(60, async {
        let m = open(&server.uri()).await;
        assert_eq!(m.info().block_size, 4096);
        assert_eq!(m.status().max_request, 64 * 1024);
        for (seed, off, len) in [
            (1, 0, 4096),
            (2, 4096, 3 * MIB + 4096),
            (3, 9 * MIB, 64 * KIB + 4096),
        ] {
            write_pattern(&m, seed, off, len, true).await;
            check_pattern(&m, seed, off, len).await;
        }
        no_data(&m, Op::WriteZeroes, 4096, 2 * MIB)
            .await
            .expect("zeroes");
        assert!(read(&m, 4096, 2 * MIB)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        no_data(&m, Op::Trim, 0, 4 * MIB).await.expect("trim");
        // A misaligned request never reaches the server.
        let e = read(&m, 512, 512).await.unwrap_err();
        assert!(matches!(e, IoError::Invalid(_)), "{e:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_fail_io_only_while_injected() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let server = Nbdkit::memory(16 * MIB)
        .error_filter(&["error=EIO", "error-rate=100%"])
        .start()
        .unwrap();
    bounded(60, async {
        let m = open(&server.uri()).await;
        write_pattern(&m, 5, 0, 64 * KIB, false).await;
        server.set_failing(true).unwrap();
        let e = read(&m, 0, 64 * KIB).await.unwrap_err();
        assert!(matches!(e, IoError::Io(_)), "{e:?}");
        assert!(e.to_string().contains("READ"), "{e}");
        let mut data = pattern(6, 0, 4096);
        let e = write(&m, 0, &mut data, false).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e:?}");
        assert!(m.connected(), "a server error must not cost the connection");
        server.set_failing(false).unwrap();
        check_pattern(&m, 5, 0, 64 * KIB).await;
        write_pattern(&m, 6, 0, 4096, false).await;
        check_pattern(&m, 6, 0, 4096).await;
        assert_eq!(m.status().reconnects, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_slower_than_the_timeout_times_out() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let server = Nbdkit::memory(16 * MIB)
        .delay_filter(Duration::from_secs(3), Duration::ZERO)
        .start()
        .unwrap();
    bounded(60, async {
        let timeout = Duration::from_secs(1);
        let m = NbdMember::open(&server.uri(), options(timeout))
            .await
            .unwrap();
        let t = Instant::now();
        let e = read(&m, 0, 4096).await.unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e, IoError::Timeout(_)), "{e:?}");
        assert!(
            took >= timeout && took < timeout * 2,
            "timed out after {took:?}"
        );
        let e = m.probe().await.unwrap_err();
        assert!(matches!(e, IoError::Timeout(_)), "{e:?}");
        // Writes are not delayed: the connection still works, and the late read replies
        // are swallowed without disturbing it.
        write_pattern(&m, 9, 0, 64 * KIB, false).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        write_pattern(&m, 10, 64 * KIB, 64 * KIB, false).await;
        assert_eq!(m.status().reconnects, 0, "{:?}", m.status());
    })
    .await;
}

/// Writes land in a file through nbdkit; the server is killed while 32 writes are in
/// flight and restarted a moment later on the same socket. Every write must finish (it is
/// re-sent after the reconnect) and be in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_in_flight_requests_complete_after_restart() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let img = image(&tmp, 64 * MIB);
    let file_arg = format!("file={}", img.display());
    // The delay keeps requests in flight when the kill comes.
    let mut server =
        NbdkitRestartable::start(&["--filter=delay", "file", &file_arg, "wdelay=200ms"]).unwrap();
    let len = 64 * KIB;
    let expect: Vec<_> = (0..32u64).map(|i| (i, i * len, len)).collect();
    bounded(60, async {
        let m = NbdMember::open(&server.uri(), options(Duration::from_secs(8)))
            .await
            .unwrap();
        let mut bufs: Vec<Vec<u8>> = expect
            .iter()
            .map(|&(seed, off, len)| pattern(seed, off, len as usize))
            .collect();
        let writes = bufs
            .iter_mut()
            .zip(&expect)
            .map(|(b, &(_, off, _))| write(&m, off, b, false));
        let all = futures::future::join_all(writes);
        tokio::pin!(all);
        // Let the writes get onto the wire, then crash the server under them.
        let early = tokio::time::timeout(Duration::from_millis(100), &mut all).await;
        assert!(
            early.is_err(),
            "writes finished before the kill; the test proves nothing"
        );
        server.kill9().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!m.connected());
        server.restart().unwrap();
        for (i, r) in all.await.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("write {i} failed across the restart: {e}"));
        }
        assert!(m.connected());
        assert!(m.status().reconnects >= 1, "{:?}", m.status());
        for &(seed, off, len) in &expect {
            check_pattern(&m, seed, off, len).await;
        }
        no_data(&m, Op::Flush, 0, 0).await.unwrap();
        m.close();
    })
    .await;
    check_file(&img, &expect, &[]);
}

/// The server dies and stays down past the timeout: requests fail with Disconnected
/// within about the timeout, never hang; when it comes back the member reconnects on its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_past_the_deadline_fails_disconnected_then_recovers() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let mut server = NbdkitRestartable::start(&["memory", "size=16M"]).unwrap();
    let timeout = Duration::from_secs(2);
    bounded(60, async {
        let m = NbdMember::open(&server.uri(), options(timeout))
            .await
            .unwrap();
        assert!(m.probe().await.is_ok());
        server.kill9().unwrap();
        let t = Instant::now();
        let reads = (0..8).map(|i| read(&m, i * 4096, 4096));
        for r in futures::future::join_all(reads).await {
            let e = r.unwrap_err();
            assert!(matches!(e, IoError::Disconnected(_)), "{e:?}");
            assert!(e.to_string().contains("last error"), "{e}");
        }
        let took = t.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(!m.connected());
        let e = m.probe().await.unwrap_err();
        assert!(matches!(e, IoError::Disconnected(_)), "{e:?}");
        server.restart().unwrap();
        let t = Instant::now();
        while !m.connected() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "no reconnect: {:?}",
                m.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rtt = m.probe().await.unwrap();
        assert!(rtt < timeout, "{rtt:?}");
        write_pattern(&m, 3, 0, 64 * KIB, false).await;
        check_pattern(&m, 3, 0, 64 * KIB).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_export_name_lists_the_exports() {
    if !fixtures::require_all(&["qemu-nbd", "nbdkit"]) {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let img = image(&tmp, MIB);
    let qemu = QemuNbd::serve(&img).unwrap();
    let kit = Nbdkit::memory(MIB)
        .filter(
            "exportname",
            &[
                "exportname=a",
                "exportname=b",
                "exportname-list=explicit",
                "exportname-strict=true",
            ],
        )
        .start()
        .unwrap();
    bounded(30, async {
        let sock = qemu.socket().display().to_string();
        let uri = format!("nbd+unix:///nope?socket={sock}");
        let e = NbdMember::open(&uri, NbdOptions::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, NbdError::NoExport { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "server at unix:{sock} has no export 'nope' (its exports: disk"
            )),
            "{msg}"
        );
        let fixtures::Listen::Unix(ksock) = kit.listen() else {
            unreachable!()
        };
        let uri = format!("nbd+unix:///c?socket={}", ksock.display());
        let e = addr::open(&addr::parse(&uri).unwrap(), &uri)
            .await
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "member {uri}: server at unix:{} has no export 'c' (its exports: a, b",
                ksock.display()
            )),
            "{msg}"
        );
        assert_eq!(e.errno(), libc::ENOENT);
        // The right name works.
        let uri = format!("nbd+unix:///b?socket={}", ksock.display());
        assert!(open(&uri).await.probe().await.is_ok());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_listed_with_their_sizes() {
    if !fixtures::require_all(&["qemu-nbd", "nbdkit", "nbd-server"]) {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let img = image(&tmp, 3 * MIB);
    let qemu = QemuNbd::serve(&img).unwrap();
    let kit = Nbdkit::memory(5 * MIB)
        .filter(
            "exportname",
            &[
                "exportname=a",
                "exportname=b",
                "exportname-list=explicit",
                "exportdesc=fixed:demo disk",
            ],
        )
        .tcp()
        .start()
        .unwrap();
    let nbdsrv = NbdServerPeer::serve_exports(&[("one", &img), ("two", &img)]).unwrap();
    bounded(30, async {
        let list = list_exports(&qemu.uri()).await.unwrap();
        assert_eq!(
            list,
            vec![("disk".to_string(), String::new(), Some(3 * MIB))]
        );
        let fixtures::Listen::Tcp(a) = kit.listen() else {
            unreachable!()
        };
        for target in [kit.uri(), a.to_string()] {
            let list = list_exports(&target).await.unwrap();
            let names: Vec<_> = list
                .iter()
                .map(|(n, d, s)| (n.as_str(), d.as_str(), *s))
                .collect();
            assert_eq!(
                names,
                [
                    ("a", "demo disk", Some(5 * MIB)),
                    ("b", "demo disk", Some(5 * MIB))
                ],
                "{target}"
            );
        }
        let list = list_exports(&format!("nbd://127.0.0.1:{}", nbdsrv.port()))
            .await
            .unwrap();
        let names: Vec<_> = list.iter().map(|(n, _, s)| (n.as_str(), *s)).collect();
        assert_eq!(names, [("one", Some(3 * MIB)), ("two", Some(3 * MIB))]);
        let refused = list_exports(&format!("127.0.0.1:{}", fixtures::free_port().unwrap()))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("is the server running?"),
            "{refused}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_disconnects_and_is_idempotent() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let log = tmp.join("requests.log");
    let logarg = format!("logfile={}", log.display());
    let server = Nbdkit::memory(MIB)
        .filter("log", &[&logarg])
        .tcp()
        .start()
        .unwrap();
    bounded(30, async {
        let m = open(&server.uri()).await;
        assert!(m.connected());
        let rtt = m.probe().await.unwrap();
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");
        m.close();
        m.close();
        let e = read(&m, 0, 512).await.unwrap_err();
        assert_eq!(e, IoError::Shutdown);
        let t = Instant::now();
        while m.connected() {
            assert!(t.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Both connections said goodbye (nbdkit logs a clean disconnect with its count).
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches(" Disconnect ").count() >= 2 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Requests from many callers share each connection's writer (small ones are queued and
/// written together, large ones straight from their buffers). Tasks on both runtime
/// threads issue mixed sizes on both sides of that line, many in flight at once, with a
/// short timeout: a request left unwritten in the queue would time out, a torn or mixed-up
/// one would fail the pattern check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_mixing_small_and_large_writes_never_strand_a_request() {
    if !fixtures::require("nbdkit") {
        return;
    }
    let server = Nbdkit::memory(64 * MIB).start().unwrap();
    bounded(120, async {
        let m = std::sync::Arc::new(
            NbdMember::open(&server.uri(), options(Duration::from_secs(5)))
                .await
                .unwrap(),
        );
        let sizes = [
            4 * KIB,
            512,
            16 * KIB,
            16 * KIB + 512,
            64 * KIB,
            4 * KIB,
            512,
        ];
        let tasks = (0..32u64).map(|t| {
            let m = m.clone();
            tokio::spawn(async move {
                for round in 0..500u64 {
                    let len = sizes[((t + round) % sizes.len() as u64) as usize];
                    let (seed, off) = (t * 1000 + round, t * 2 * MIB + (round % 16) * 64 * KIB);
                    let mut b = pattern(seed, off, len as usize);
                    write(&m, off, &mut b, round % 7 == 0)
                        .await
                        .unwrap_or_else(|e| panic!("task {t} round {round}: write: {e}"));
                    let got = read(&m, off, len)
                        .await
                        .unwrap_or_else(|e| panic!("task {t} round {round}: read: {e}"));
                    verify_pattern(seed, off, &got).unwrap();
                }
            })
        });
        for r in futures::future::join_all(tasks).await {
            r.expect("a caller task panicked");
        }
        let st = m.status();
        assert_eq!(st.connected, 2, "{st:?}");
        m.close();
    })
    .await;
}
