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
