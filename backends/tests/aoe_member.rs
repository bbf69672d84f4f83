//! The AoE member against vblade, the real AoE target, in two network namespaces joined
//! by a veth pair that each test creates and removes (fixtures::NetnsPair). The member
//! runs on a thread inside the initiator's namespace (packet sockets belong to the
//! namespace they are made in). Data written through the member is checked in vblade's
//! backing file and data put in the file is read back through the member; the link is
//! made lossy with nftables, cut, and vblade killed. Needs root; every test is bounded.

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use backends::aoe::{AoeError, AoeMember, AoeOptions};
use fixtures::{pattern, verify_pattern, NetnsPair, Tmp, Vblade};
use raidcore::{Class, IoBuf, IoError, IoResult, Member, MemberIo, Op, Proto, Tag};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const SHELF: u16 = 7;
const SLOT: u8 = 3;

/// root and vblade, ip, nft; otherwise SKIP (or fail under CI).
fn can_run() -> bool {
    fixtures::require_root("AoE over a veth pair in network namespaces")
        && fixtures::require_all(&["vblade", "ip", "nft"])
}

/// A veth pair at `mtu` with vblade serving a sparse file of SIZE bytes as e7.3.
struct Rig {
    vblade: Vblade,
    file: PathBuf,
    pair: NetnsPair,
    _tmp: Tmp,
}

impl Rig {
    fn new(mtu: u32) -> Rig {
        let tmp = Tmp::new().unwrap();
        let file = tmp.join("target.img");
        fixtures::sparse_file(&file, SIZE).unwrap();
        let pair = NetnsPair::new(mtu).unwrap();
        let vblade = Vblade::serve(&pair, SHELF, SLOT, &file).unwrap();
        Rig {
            vblade,
            file,
            pair,
            _tmp: tmp,
        }
    }

    fn address(&self) -> String {
        format!("aoe:{}/{SHELF}.{SLOT}", self.pair.initiator_if)
    }

    fn run<F, Fut>(&self, secs: u64, body: F)
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = ()>,
    {
        in_ns(&self.pair, secs, body)
    }
}

/// Run `body` in the initiator's namespace on its own runtime, bounded by `secs`.
fn in_ns<F, Fut>(pair: &NetnsPair, secs: u64, body: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    pair.in_initiator(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(secs), body())
                .await
                .unwrap_or_else(|_| panic!("test exceeded its bound of {secs} s"))
        })
    })
    .unwrap();
}

fn opts(timeout: Duration) -> AoeOptions {
    AoeOptions {
        timeout,
        discover_timeout: Duration::from_secs(3),
    }
}

async fn open(address: &str, iface: &str, timeout: Duration) -> AoeMember {
    AoeMember::open(address, iface, SHELF, SLOT, opts(timeout))
        .await
        .unwrap_or_else(|e| panic!("open {address}: {e}"))
}

fn io(m: &AoeMember, op: Op, offset: u64, len: u64, buf: IoBuf) -> MemberIo {
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
            fua: false,
        },
        buf,
    }
}

async fn write(m: &AoeMember, offset: u64, data: &mut [u8]) -> IoResult {
    let len = data.len() as u64;
    m.submit(io(m, Op::Write, offset, len, IoBuf::from_slice(data)))
        .await
}

async fn read(m: &AoeMember, offset: u64, len: u64) -> IoResult<Vec<u8>> {
    let mut buf = vec![0xeeu8; len as usize];
    m.submit(io(m, Op::Read, offset, len, IoBuf::from_slice(&mut buf)))
        .await?;
    Ok(buf)
}

async fn flush(m: &AoeMember) -> IoResult {
    m.submit(io(m, Op::Flush, 0, 0, IoBuf::empty())).await
}

fn file_bytes(file: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Spans that cut frames every way: one sector, a frame's worth and one more, odd
/// counts, a megabyte, the last sector of the target.
fn spans() -> Vec<(u64, u64)> {
    vec![
        (0, 512),
        (4096, 1024),
        (8 * KIB + 512, 1536),
        (MIB, 17 * 512),
        (2 * MIB, 18 * 512),
        (3 * MIB + 512, 35 * 512),
        (5 * MIB, 64 * KIB),
        (7 * MIB, MIB),
        (SIZE - 512, 512),
    ]
}

/// Write patterns through the member, read them back through it, find them in vblade's
/// file; then put a pattern in the file and read it through the member.
fn data_round_trip(mtu: u32, sectors_per_frame: u8) {
    let rig = Rig::new(mtu);
    let (address, iface, file) = (
        rig.address(),
        rig.pair.initiator_if.clone(),
        rig.file.clone(),
    );
    rig.run(60, || async move {
        let m = open(&address, &iface, Duration::from_secs(10)).await;
        let info = m.info();
        assert_eq!(info.size, SIZE);
        assert_eq!(
            (info.proto, info.class, info.block_size),
            (Proto::Aoe, Class::Remote, 512)
        );
        assert!(info.caps.flush, "vblade answers FLUSH CACHE");
        let st = m.status();
        assert_eq!(st.sectors_per_frame, sectors_per_frame, "{st:?}");
        assert_eq!(st.window, 16, "vblade's buffer count: {st:?}");
        for (i, &(off, len)) in spans().iter().enumerate() {
            let seed = 100 + i as u64;
            let mut data = pattern(seed, off, len as usize);
            write(&m, off, &mut data).await.unwrap();
            let back = read(&m, off, len).await.unwrap();
            verify_pattern(seed, off, &back)
                .unwrap_or_else(|e| panic!("read back {off}+{len}: {e}"));
        }
        flush(&m).await.unwrap();
        for (i, &(off, len)) in spans().iter().enumerate() {
            verify_pattern(100 + i as u64, off, &file_bytes(&file, off, len))
                .unwrap_or_else(|e| panic!("vblade's file at {off}+{len}: {e}"));
        }
        // The other way: bytes put in the file read back through the member.
        let (off, len) = (20 * MIB + 1536, 3 * MIB + 512);
        let data = pattern(9, off, len as usize);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .write_all_at(&data, off)
            .unwrap();
        verify_pattern(9, off, &read(&m, off, len).await.unwrap()).unwrap();
        // Many callers at once: 32 concurrent 64 KiB writes then reads.
        let m = &m;
        let jobs = (0..32u64).map(|k| async move {
            let off = 30 * MIB + k * 64 * KIB;
            let mut d = pattern(1000 + k, off, 64 * KIB as usize);
            write(m, off, &mut d).await.unwrap();
            verify_pattern(1000 + k, off, &read(m, off, 64 * KIB).await.unwrap()).unwrap();
        });
        futures::future::join_all(jobs).await;
        let st = m.status();
        assert_eq!(
            st.max_in_flight, 16,
            "32 callers must fill the window, and never pass vblade's buffer count: {st:?}"
        );
        for k in 0..32u64 {
            let off = 30 * MIB + k * 64 * KIB;
            verify_pattern(1000 + k, off, &file_bytes(&file, off, 64 * KIB)).unwrap();
        }
        // Out of range is refused before anything is sent.
        let e = read(m, SIZE - 512, 1024).await.unwrap_err();
        assert!(matches!(e, IoError::OutOfRange { .. }), "{e}");
        // Only a re-send can draw a second reply: without re-sends, nothing is late.
        let st = m.status();
        assert!(st.late_replies <= st.retransmits, "{st:?}");
        m.close();
    });
}

#[test]
fn data_through_the_member_is_vblades_file_at_mtu_1500() {
    if can_run() {
        data_round_trip(1500, 2);
    }
}

#[test]
fn data_through_the_member_is_vblades_file_at_mtu_9000() {
    if can_run() {
        data_round_trip(9000, 17);
    }
}

/// 10% of AoE frames dropped at each end of the link: every byte still arrives right,
/// and the re-sends that made it so are counted.
#[test]
fn lossy_link_retransmission_keeps_every_byte() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(9000);
    rig.pair.drop_aoe_frames(10).unwrap();
    let (address, iface, file) = (
        rig.address(),
        rig.pair.initiator_if.clone(),
        rig.file.clone(),
    );
    rig.run(120, || async move {
        let m = open(&address, &iface, Duration::from_secs(20)).await;
        let m = &m;
        let jobs = (0..16u64).map(|k| async move {
            let off = k * MIB;
            let mut d = pattern(50 + k, off, MIB as usize);
            write(m, off, &mut d).await.unwrap();
            let back = read(m, off, MIB).await.unwrap();
            verify_pattern(50 + k, off, &back).unwrap_or_else(|e| panic!("{e}"));
        });
        futures::future::join_all(jobs).await;
        flush(m).await.unwrap();
        for k in 0..16u64 {
            verify_pattern(50 + k, k * MIB, &file_bytes(&file, k * MIB, MIB))
                .unwrap_or_else(|e| panic!("vblade's file: {e}"));
        }
        let st = m.status();
        assert!(st.retransmits > 0, "no re-sends on a lossy link: {st:?}");
        eprintln!("lossy link: {st:?}");
    });
    let dropped = rig.pair.dropped_frames().unwrap();
    assert!(dropped > 50, "the loss rules dropped only {dropped} frames");
}

/// vblade killed: a request fails with Timeout at its deadline (not before, not much
/// after). vblade started again: the same member serves again, the data is there.
#[test]
fn vblade_killed_times_out_and_the_member_comes_back() {
    if !can_run() {
        return;
    }
    let Rig {
        mut vblade,
        pair,
        _tmp,
        ..
    } = Rig::new(1500);
    let address = format!("aoe:{}/{SHELF}.{SLOT}", pair.initiator_if);
    let iface = pair.initiator_if.clone();
    in_ns(&pair, 60, move || async move {
        let m = open(&address, &iface, Duration::from_secs(1)).await;
        let mut d = pattern(1, 0, 64 * KIB as usize);
        write(&m, 0, &mut d).await.unwrap();
        vblade.kill9().unwrap();
        let t0 = std::time::Instant::now();
        let e = read(&m, 0, 64 * KIB).await.unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, IoError::Timeout(_)), "{e}");
        assert!(e.to_string().contains(&address), "{e}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        vblade.restart().unwrap();
        let back = read(&m, 0, 64 * KIB).await.unwrap();
        verify_pattern(1, 0, &back).unwrap();
        let st = m.status();
        assert!(
            st.rediscovered >= 1,
            "the target was not looked for again: {st:?}"
        );
        m.close();
    });
}

/// The initiator's end of the link set down: requests fail with Disconnected (the link
/// refuses the frames). Up again: the member serves, data intact.
#[test]
fn link_down_disconnects_and_link_up_brings_the_member_back() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(1500);
    let (address, iface, pair) = (rig.address(), rig.pair.initiator_if.clone(), &rig.pair);
    rig.run(60, || async move {
        let m = open(&address, &iface, Duration::from_secs(1)).await;
        let mut d = pattern(2, MIB, 128 * KIB as usize);
        write(&m, MIB, &mut d).await.unwrap();
        pair.set_link(false).unwrap();
        let e = read(&m, MIB, 128 * KIB).await.unwrap_err();
        assert!(matches!(e, IoError::Disconnected(_)), "{e}");
        assert!(e.to_string().contains(&iface), "{e}");
        pair.set_link(true).unwrap();
        // The link takes a moment to carry frames again; the request's own re-sends
        // cover that.
        let back = read(&m, MIB, 128 * KIB).await.unwrap();
        verify_pattern(2, MIB, &back).unwrap();
        m.close();
    });
}

/// No target at that shelf.slot, no such interface, no CAP_NET_RAW: each says so.
#[test]
fn open_errors_name_the_target_and_the_fix() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(1500);
    let iface = rig.pair.initiator_if.clone();
    rig.run(30, || async move {
        let e = AoeMember::open("aoe:x/7.4", &iface, SHELF, 4, opts(Duration::from_secs(1)))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, AoeError::NotFound { .. }), "{e}");
        assert!(
            e.to_string().contains("e7.4") && e.to_string().contains(&iface),
            "{e}"
        );
        let e = AoeMember::open(
            "aoe:nosuch0/7.3",
            "nosuch0",
            SHELF,
            SLOT,
            opts(Duration::from_secs(1)),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, AoeError::NoInterface { .. }), "{e}");
        // Capabilities are per thread: drop CAP_NET_RAW from this one and open here.
        let e = tokio::task::block_in_place(|| {
            drop_cap_net_raw();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(AoeMember::open(
                "aoe:x/7.3",
                &iface,
                SHELF,
                SLOT,
                opts(Duration::from_secs(1)),
            ))
            .err()
            .unwrap()
        });
        assert!(matches!(e, AoeError::NoPermission { .. }), "{e}");
        assert!(e.to_string().contains("CAP_NET_RAW"), "{e}");
        assert_eq!(e.errno(), libc::EPERM);
    });
}

/// Clear CAP_NET_RAW from the calling thread's effective set (capset(2) is per thread).
fn drop_cap_net_raw() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and two data words, as documented.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
        d[0].effective &= !(1 << 13); // CAP_NET_RAW
        assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
    }
}

/// Sets the flag on drop, so the injector stops also when the I/O side panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Garbage on the wire while I/O runs: truncated frames, other versions, requests,
/// replies with tags of no frame in flight (some with the error flag, some far past the
/// window), config replies claiming e7.3 from another MAC with absurd limits, random
/// bytes. None may panic the member, stall it or change a byte of the data; they are
/// counted as bad, late or foreign.
#[test]
fn garbage_frames_from_the_wire_change_nothing() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(9000);
    let (address, iface, file) = (
        rig.address(),
        rig.pair.initiator_if.clone(),
        rig.file.clone(),
    );
    let stop = AtomicBool::new(false);
    let pair = &rig.pair;
    let sent = std::thread::scope(|s| {
        let injector = s.spawn(|| {
            pair.in_target(|| inject_garbage(&pair.target_if, &stop))
                .unwrap()
        });
        let _stop = StopOnDrop(&stop);
        rig.run(120, || async move {
            let m = open(&address, &iface, Duration::from_secs(20)).await;
            let m = &m;
            // Until the injector has been at it for a while.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let jobs = (0..8u64).map(|k| async move {
                for round in 0..4u64 {
                    let off = k * 2 * MIB;
                    let seed = 7000 + k * 10 + round;
                    let mut d = pattern(seed, off, 2 * MIB as usize);
                    write(m, off, &mut d).await.unwrap();
                    let back = read(m, off, 2 * MIB).await.unwrap();
                    verify_pattern(seed, off, &back).unwrap_or_else(|e| panic!("{e}"));
                }
            });
            futures::future::join_all(jobs).await;
            flush(m).await.unwrap();
            for k in 0..8u64 {
                let off = k * 2 * MIB;
                verify_pattern(7000 + k * 10 + 3, off, &file_bytes(&file, off, 2 * MIB))
                    .unwrap_or_else(|e| panic!("vblade's file: {e}"));
            }
            let st = m.status();
            eprintln!("under garbage: {st:?}");
            assert!(st.bad_frames > 0, "{st:?}");
            assert!(st.late_replies > 0, "{st:?}");
            assert!(st.foreign_configs > 0, "{st:?}");
            assert_eq!(st.window, 16, "a foreign config changed the window: {st:?}");
            m.close();
        });
        drop(_stop);
        injector.join().unwrap()
    });
    assert!(sent > 1000, "the injector sent only {sent} frames");
}

/// Send garbage AoE frames on `iface` (broadcast) until `stop`; returns how many went.
fn inject_garbage(iface: &str, stop: &AtomicBool) -> u64 {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::AsRawFd;
    let sock = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(0x88a2u16.to_be()))),
    )
    .unwrap();
    let name = std::ffi::CString::new(iface).unwrap();
    // SAFETY: plain C calls with valid arguments (a NUL-terminated name, a zeroed and
    // filled sockaddr_ll of the right size).
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0x88a2u16.to_be();
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        let r = libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        let f = garbage_frame(&mut next);
        if sock.send(&f).is_ok() {
            sent += 1;
        }
        if sent.is_multiple_of(16) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    sent
}

fn garbage_frame(next: &mut impl FnMut() -> u64) -> Vec<u8> {
    let r = next();
    let len = match r % 4 {
        0 => 14 + (next() % 20) as usize,
        1 => 24 + (next() % 40) as usize,
        _ => 14 + (next() % 1200) as usize,
    };
    let mut f: Vec<u8> = (0..len.max(32)).map(|_| next() as u8).collect();
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0xba, 0xd0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xa2]);
    let kind = (r >> 8) % 6;
    f[14] = match kind {
        0 => 0x28, // version 2
        1 => 0x10, // a request, not a response
        2 => 0x1c, // response with the error flag
        _ => 0x18, // response
    };
    // e7.3 most of the time, so the frames reach the member's checks.
    if kind != 5 {
        f[16..20].copy_from_slice(&[0, 7, 3, if kind == 4 { 1 } else { 0 }]);
    }
    if kind == 4 {
        // A config reply: tag of nobody's query, absurd limits.
        f[20] = 0x80;
        f[24..26].copy_from_slice(&[0xff, 0xff]);
        f[28] = (next() % 2) as u8 * 255;
    }
    f.truncate(len);
    f
}

/// The target's own failure reaches the caller as an error naming the member and the
/// ATA status: vblade's file shrunk under it, a read past the new end fails on the
/// target, a read inside still works.
#[test]
fn a_failed_ata_command_on_the_target_is_an_io_error() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(1500);
    let (address, iface, file) = (
        rig.address(),
        rig.pair.initiator_if.clone(),
        rig.file.clone(),
    );
    rig.run(30, || async move {
        let m = open(&address, &iface, Duration::from_secs(5)).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(MIB)
            .unwrap();
        let e = read(&m, 32 * MIB, 4 * KIB).await.unwrap_err();
        eprintln!("past the shrunk end: {e}");
        assert!(matches!(e, IoError::Io(_)), "{e}");
        assert!(
            e.to_string().contains(&address) && e.to_string().contains("ATA status"),
            "{e}"
        );
        read(&m, 0, 4 * KIB).await.unwrap();
        m.close();
    });
}
