//! The local member against real files in /tmp (never /dev/shm: tmpfs accepts
//! misaligned O_DIRECT and would hide bugs) and, when losetup works, a loop device.
//! Every data test runs on both engines; data is checked against a model and against
//! the file as read back by ordinary buffered I/O.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use backends::addr::{self, OpenError};
use backends::local::{Engine, LocalMember};
use raidcore::{
    BufPool, Class, IoBuf, IoError, IoResult, Member, MemberIo, Op, PoolBuf, PoolConfig, Proto, Tag,
};
use tempfile::TempDir;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn tmpdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("uniblk-local-")
        .tempdir_in("/tmp")
        .expect("tempdir in /tmp")
}

fn image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let path = dir.path().join(name);
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(size).expect("size image");
    path
}

fn pool() -> BufPool {
    BufPool::new(&PoolConfig {
        classes: vec![(64 << 10, 160), (1 << 20, 4)],
    })
    .expect("buffer pool")
}

/// Open with `engine`, or None (printed) when this kernel has no io_uring.
fn open(path: &Path, engine: Engine) -> Option<LocalMember> {
    match LocalMember::open_with(path, engine) {
        Ok(m) => Some(m),
        Err(e @ OpenError::Engine { .. }) => {
            eprintln!("skipping the {engine:?} engine: {e}");
            None
        }
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

const ENGINES: [Engine; 2] = [Engine::IoUring, Engine::Pread];

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|p| ((p.wrapping_mul(2_654_435_761) >> 11) as u8) ^ seed)
        .collect()
}

async fn submit(m: &dyn Member, op: Op, offset: u64, len: u64, fua: bool, buf: IoBuf) -> IoResult {
    let tag = Tag {
        id: raidcore::io::next_tag_id(),
        class: Class::Local,
        member: 0,
        proto: m.info().proto,
        op,
        offset,
        len,
        fua,
    };
    // A lost wake-up shows up as a hang; make it a failure instead.
    match tokio::time::timeout(Duration::from_secs(30), m.submit(MemberIo { tag, buf })).await {
        Ok(r) => r,
        Err(_) => panic!("{op:?} at {offset} did not complete within 30 s (lost wake-up?)"),
    }
}

async fn write(m: &dyn Member, pool: &BufPool, offset: u64, data: &[u8], fua: bool) -> IoResult {
    let mut b = pool.get(data.len()).await.expect("pool buffer");
    b.copy_from_slice(data);
    submit(
        m,
        Op::Write,
        offset,
        data.len() as u64,
        fua,
        IoBuf::from_slice(&mut b),
    )
    .await
}

async fn read(m: &dyn Member, pool: &BufPool, offset: u64, len: u64) -> IoResult<PoolBuf> {
    let mut b = pool.get(len as usize).await.expect("pool buffer");
    b.fill(0xEE); // so a read that moved nothing cannot pass by accident
    submit(m, Op::Read, offset, len, false, IoBuf::from_slice(&mut b)).await?;
    Ok(b)
}

async fn op(m: &dyn Member, op: Op, offset: u64, len: u64, fua: bool) -> IoResult {
    submit(m, op, offset, len, fua, IoBuf::empty()).await
}

/// A small deterministic generator, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn opens_files_with_the_expected_info() {
    let dir = tmpdir();
    let path = image(&dir, "a.img", 8 * MIB + 100); // the partial tail block is left out
    for engine in ENGINES {
        let Some(m) = open(&path, engine) else {
            continue;
        };
        let info = m.info();
        assert_eq!(info.address, format!("file:{}", path.display()));
        assert_eq!((info.class, info.proto), (Class::Local, Proto::File));
        assert_eq!(
            info.block_size, 512,
            "ext4 on a 512e disk takes 512-byte O_DIRECT"
        );
        assert_eq!(info.size, 8 * MIB);
        assert!(info.caps.flush && info.caps.fua && info.caps.discard && info.caps.write_zeroes);
        let name = if engine == Engine::IoUring {
            "io_uring"
        } else {
            "pread"
        };
        assert_eq!(info.engine, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_at_many_offsets_read_back_on_both_engines() {
    for engine in ENGINES {
        let dir = tmpdir();
        let size = 8 * MIB;
        let path = image(&dir, "a.img", size);
        let Some(m) = open(&path, engine) else {
            continue;
        };
        let pool = pool();
        let bs = u64::from(m.info().block_size);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        // Edges first (first block, last block, one large write), then random ones.
        let mut plan = vec![(0, bs), (size - bs, bs), (MIB, MIB), (bs, 64 * KIB - bs)];
        for _ in 0..300 {
            let len = bs * (1 + rng.below(128));
            plan.push((bs * rng.below((size - len) / bs + 1), len));
        }
        for (i, &(off, len)) in plan.iter().enumerate() {
            let data = pattern(i as u8, off, len);
            write(&m, &pool, off, &data, i % 7 == 0)
                .await
                .expect("write");
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            // Read back a random range that overlaps what was just written.
            let rlen = bs * (1 + rng.below(128)).min((size - off) / bs);
            let got = read(&m, &pool, off, rlen).await.expect("read");
            assert!(
                got[..] == model[off as usize..(off + rlen) as usize],
                "{engine:?} #{i} at {off}+{rlen}"
            );
        }
        op(&m, Op::Flush, 0, 0, false).await.expect("flush");
        for off in (0..size).step_by(MIB as usize) {
            let got = read(&m, &pool, off, MIB).await.expect("read");
            assert!(
                got[..] == model[off as usize..(off + MIB) as usize],
                "{engine:?} MiB at {off}"
            );
        }
        m.close();
        let on_disk = std::fs::read(&path).expect("buffered read of the image");
        assert!(
            on_disk == model,
            "{engine:?}: the file does not hold what was written"
        );
    }
}

#[tokio::test]
async fn fua_writes_survive_close_and_reopen() {
    for engine in ENGINES {
        let dir = tmpdir();
        let path = image(&dir, "a.img", 4 * MIB);
        let pool = pool();
        let data = pattern(0x42, 3 * MIB, 64 * KIB);
        {
            let Some(m) = open(&path, engine) else {
                continue;
            };
            write(&m, &pool, 3 * MIB, &data, true)
                .await
                .expect("FUA write");
            // dropped here: the ring thread is stopped and joined
        }
        let other = if engine == Engine::IoUring {
            Engine::Pread
        } else {
            Engine::IoUring
        };
        let m = open(&path, other)
            .or_else(|| open(&path, engine))
            .expect("reopen");
        let got = read(&m, &pool, 3 * MIB, 64 * KIB).await.expect("read");
        assert!(got[..] == data[..], "{engine:?}");
    }
}

#[tokio::test]
async fn write_zeroes_and_trim_keep_the_size_and_the_neighbours() {
    for engine in ENGINES {
        let dir = tmpdir();
        let size = 2 * MIB;
        let path = image(&dir, "a.img", size);
        let Some(m) = open(&path, engine) else {
            continue;
        };
        let pool = pool();
        let data = pattern(7, 0, MIB);
        write(&m, &pool, 0, &data, false).await.expect("write");
        write(&m, &pool, MIB, &data, false).await.expect("write");

        for fua in [false, true] {
            let at = if fua { 640 * KIB } else { 64 * KIB };
            op(&m, Op::WriteZeroes, at, 192 * KIB, fua)
                .await
                .expect("write zeroes");
            let got = read(&m, &pool, 0, MIB).await.expect("read");
            let (lo, hi) = (at as usize, (at + 192 * KIB) as usize);
            assert!(
                got[lo..hi].iter().all(|&b| b == 0),
                "{engine:?}: zeroed range not zero"
            );
            assert!(
                got[..64 * KIB as usize] == data[..64 * KIB as usize],
                "{engine:?}: before"
            );
            assert!(
                got[hi..(hi + 4096)] == data[hi..(hi + 4096)],
                "{engine:?}: after"
            );
        }
        // Trim promises nothing about the trimmed range; check everything else.
        op(&m, Op::Trim, MIB + 256 * KIB, 128 * KIB, false)
            .await
            .expect("trim");
        let got = read(&m, &pool, MIB, MIB).await.expect("read");
        assert!(
            got[..256 * KIB as usize] == data[..256 * KIB as usize],
            "{engine:?}: before trim"
        );
        assert!(
            got[384 * KIB as usize..] == data[384 * KIB as usize..],
            "{engine:?}: after trim"
        );
        op(&m, Op::Flush, 0, 0, false).await.expect("flush");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            size,
            "{engine:?}: size changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_ios_in_flight() {
    for engine in ENGINES {
        let dir = tmpdir();
        let path = image(&dir, "a.img", 8 * MIB);
        let Some(m) = open(&path, engine) else {
            continue;
        };
        let m = Arc::new(m);
        let pool = pool();
        let len = 64 * KIB;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let (m, pool) = (Arc::clone(&m), pool.clone());
            tasks.spawn(async move {
                let off = i * 2 * len; // every other slot: gaps must stay zero
                write(&*m, &pool, off, &pattern(i as u8, off, len), false).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task").expect("write");
        }
        for i in 0..128u64 {
            let (m, pool) = (Arc::clone(&m), pool.clone());
            tasks.spawn(async move {
                let off = i * len;
                let got = read(&*m, &pool, off, len).await.expect("read");
                let want = if i % 2 == 0 {
                    pattern((i / 2) as u8, off, len)
                } else {
                    vec![0; len as usize]
                };
                assert!(got[..] == want[..], "{engine:?}: block {i}");
                Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task").expect("read");
        }
    }
}

/// Many short, mostly sequential I/Os from a few tasks: the ring thread falls asleep
/// between most of them, so every one depends on the doorbell protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doorbell_wakes_the_ring_every_time() {
    let dir = tmpdir();
    let path = image(&dir, "a.img", MIB);
    let Some(m) = open(&path, Engine::IoUring) else {
        return;
    };
    let m = Arc::new(m);
    let pool = pool();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4u64 {
        let (m, pool) = (Arc::clone(&m), pool.clone());
        tasks.spawn(async move {
            for i in 0..1500u64 {
                let off = ((t * 1500 + i) % 2048) * 512;
                read(&*m, &pool, off, 512).await.expect("read");
                if i % 3 == 0 {
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
}

#[tokio::test]
async fn reading_past_the_end_is_an_error() {
    for engine in ENGINES {
        let dir = tmpdir();
        let size = 2 * MIB;
        let path = image(&dir, "a.img", size);
        let Some(m) = open(&path, engine) else {
            continue;
        };
        let pool = pool();
        for (off, len) in [(size, 512), (size - 512, 1024), (u64::MAX - 511, 512)] {
            let e = read(&m, &pool, off, len).await.err().expect("past the end");
            assert!(matches!(e, IoError::OutOfRange { .. }), "{engine:?}: {e}");
        }
        // The file shrinks under us: the kernel returns a short read, then 0 bytes. That
        // must be EIO, never a short success.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(MIB / 2))
            .expect("shrink");
        let e = read(&m, &pool, 0, MIB)
            .await
            .err()
            .expect("read across the new end");
        assert_eq!(e.errno(), libc::EIO, "{engine:?}: {e}");
        assert!(e.to_string().contains("Read at 0"), "{engine:?}: {e}");
    }
}

#[tokio::test]
async fn close_is_idempotent_and_later_io_fails_with_shutdown() {
    for engine in ENGINES {
        let dir = tmpdir();
        let path = image(&dir, "a.img", MIB);
        let Some(m) = open(&path, engine) else {
            continue;
        };
        let pool = pool();
        write(&m, &pool, 0, &pattern(1, 0, 4096), false)
            .await
            .expect("write");
        m.close();
        m.close();
        let e = read(&m, &pool, 0, 4096).await.err().expect("closed");
        assert_eq!(e, IoError::Shutdown, "{engine:?}");
    }
}

#[tokio::test]
async fn open_errors_name_the_member_and_the_fix() {
    let dir = tmpdir();
    let empty = image(&dir, "empty.img", 100);
    let e = LocalMember::open_with(&empty, Engine::Pread)
        .err()
        .expect("empty");
    let msg = e.to_string();
    assert!(
        msg.contains("holds no complete 512-byte block") && msg.contains("truncate -s"),
        "{msg}"
    );
    let e = LocalMember::open_with(dir.path(), Engine::Pread)
        .err()
        .expect("dir");
    assert!(e.to_string().contains("is a directory"), "{e}");
}

#[tokio::test]
async fn a_file_named_as_dev_is_served_as_a_file() {
    let dir = tmpdir();
    let path = image(&dir, "a.img", MIB);
    let text = format!("dev:{}", path.display());
    let m = addr::open(&addr::parse(&text).expect("parse"), &text)
        .await
        .expect("open");
    assert_eq!(m.info().proto, Proto::File);
    assert_eq!(m.info().address, text);
    let pool = pool();
    write(&*m, &pool, 4096, &pattern(3, 4096, 4096), true)
        .await
        .expect("write");
    m.close();
}

/// A loop device over a file in /tmp, detached on drop whatever happens.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() {
            return Err("losetup printed no device".into());
        }
        Ok(Loop(dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_device_via_a_loop_device() {
    let dir = tmpdir();
    let size = 16 * MIB;
    let backing = image(&dir, "loop.img", size);
    let lo = match Loop::attach(&backing) {
        Ok(lo) => lo,
        Err(why) => {
            eprintln!("skipping the block device test: {why}");
            return;
        }
    };
    let pool = pool();
    let data = pattern(9, 0, MIB);
    // dev: through addr::open (start-up engine); file: naming a device, on the pread
    // engine, must find the device too.
    for (scheme, engine) in [("dev", Engine::Auto), ("file", Engine::Pread)] {
        let text = format!("{scheme}:{}", lo.0);
        let m: Arc<dyn Member> = if engine == Engine::Auto {
            addr::open(&addr::parse(&text).expect("parse"), &text)
                .await
                .expect("open loop")
        } else {
            Arc::new(LocalMember::open_as(&text, Path::new(&lo.0), engine).expect("open loop"))
        };
        let info = m.info();
        assert_eq!(
            (info.proto, info.size, info.block_size),
            (Proto::Blockdev, size, 512),
            "{text}"
        );
        for off in [0, 5 * MIB, size - MIB] {
            write(&*m, &pool, off, &data, off == 0)
                .await
                .expect("write");
            let got = read(&*m, &pool, off, MIB).await.expect("read");
            assert!(got[..] == data[..], "{text} at {off}");
        }
        op(&*m, Op::WriteZeroes, 5 * MIB + 4096, 64 * KIB, false)
            .await
            .expect("BLKZEROOUT");
        let got = read(&*m, &pool, 5 * MIB, MIB).await.expect("read");
        assert!(
            got[4096..4096 + 64 * KIB as usize].iter().all(|&b| b == 0),
            "{text}: zeroed"
        );
        assert!(got[..4096] == data[..4096], "{text}: before zeroes");
        match op(&*m, Op::Trim, size - MIB, 64 * KIB, false).await {
            Ok(()) | Err(IoError::NotSupported(_)) => {}
            Err(e) => panic!("{text}: BLKDISCARD: {e}"),
        }
        op(&*m, Op::Flush, 0, 0, false).await.expect("flush");
        m.close();
    }
}
