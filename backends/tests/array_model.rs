//! Every RAID level against a flat in-memory model: random reads, writes, trims and
//! write-zeroes, aligned and not, through the real `Array` over real `mem:` members.

use std::sync::Arc;

use backends::mem::MemMember;
use proptest::prelude::*;
use raidcore::{
    assemble, Array, ArraySpec, BufPool, Flags, FrontIo, LevelKind, Member, Op, PoolConfig,
};

const MIB: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn mem_array(level: LevelKind, sizes_mib: &[u64], chunk: u64) -> Array {
    let members: Vec<Arc<dyn Member>> = sizes_mib
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Arc::new(MemMember::new(&format!("mem:{s}MiB#{i}"), s * MIB)) as Arc<dyn Member>
        })
        .collect();
    let spec = ArraySpec {
        name: "model".into(),
        level,
        chunk,
        queue_depth: 8,
        policy: "fifo".into(),
    };
    let pool = BufPool::new(&PoolConfig::default()).unwrap();
    assemble(&spec, members, pool, false).await.unwrap().0
}

/// The model: bytes, with None where a trim left the content unspecified.
struct Model(Vec<Option<u8>>);

#[derive(Debug, Clone)]
enum Cmd {
    Write { off: u64, len: u64, seed: u8 },
    Read { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
    Zero { off: u64, len: u64, fua: bool },
    Flush,
}

fn data(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

async fn apply(a: &Array, m: &mut Model, cmd: &Cmd) {
    match *cmd {
        Cmd::Write { off, len, seed } => {
            let mut b = a.buffer(off, len).await.unwrap();
            b.data_mut().copy_from_slice(&data(seed, off, len));
            let io = FrontIo::new(Op::Write, off, len);
            a.submit(io, Some(&mut b)).await.unwrap();
            for (i, v) in data(seed, off, len).into_iter().enumerate() {
                m.0[off as usize + i] = Some(v);
            }
        }
        Cmd::Read { off, len } => {
            let mut b = a.buffer(off, len).await.unwrap();
            let io = FrontIo::new(Op::Read, off, len);
            a.submit(io, Some(&mut b)).await.unwrap();
            for (i, got) in b.data().iter().enumerate() {
                if let Some(want) = m.0[off as usize + i] {
                    assert_eq!(
                        *got,
                        want,
                        "byte {} differs after {cmd:?}",
                        off as usize + i
                    );
                }
            }
        }
        Cmd::Trim { off, len } => {
            let io = FrontIo::new(Op::Trim, off, len);
            a.submit(io, None).await.unwrap();
            // Only whole blocks are discarded; their content is unspecified afterwards.
            let bs = a.block_size() as u64;
            let (s, e) = (off.div_ceil(bs) * bs, (off + len) / bs * bs);
            for i in s..e.max(s) {
                m.0[i as usize] = None;
            }
        }
        Cmd::Zero { off, len, fua } => {
            let flags = Flags {
                fua,
                ..Flags::default()
            };
            a.submit(
                FrontIo {
                    op: Op::WriteZeroes,
                    offset: off,
                    len,
                    flags,
                },
                None,
            )
            .await
            .unwrap();
            for i in off..off + len {
                m.0[i as usize] = Some(0);
            }
        }
        Cmd::Flush => {
            let io = FrontIo::new(Op::Flush, 0, 0);
            a.submit(io, None).await.unwrap();
        }
    }
}

fn range(size: u64) -> impl Strategy<Value = (u64, u64)> {
    // Mix block-aligned and arbitrary ranges, small and up to a few chunks.
    (0..size, 1u64..300_000, any::<bool>()).prop_map(move |(off, len, aligned)| {
        let (off, len) = if aligned {
            (off / 512 * 512, (len / 512).max(1) * 512)
        } else {
            (off, len)
        };
        let off = off.min(size - 1);
        (off, len.min(size - off))
    })
}

fn cmd(size: u64) -> impl Strategy<Value = Cmd> {
    prop_oneof![
        4 => (range(size), any::<u8>()).prop_map(|((off, len), seed)| Cmd::Write { off, len, seed }),
        4 => range(size).prop_map(|(off, len)| Cmd::Read { off, len }),
        1 => range(size).prop_map(|(off, len)| Cmd::Trim { off, len }),
        1 => (range(size), any::<bool>()).prop_map(|((off, len), fua)| Cmd::Zero { off, len, fua }),
        1 => Just(Cmd::Flush),
    ]
}

fn run_model(level: LevelKind, sizes: &[u64], cmds: Vec<Cmd>) {
    runtime().block_on(async {
        let a = mem_array(level, sizes, 64 << 10).await;
        let mut m = Model(vec![Some(0); a.size() as usize]);
        for c in &cmds {
            apply(&a, &mut m, c).await;
        }
        // Finally read everything back.
        let size = a.size();
        let mut off = 0;
        while off < size {
            let len = (size - off).min(4 * MIB);
            apply(&a, &mut m, &Cmd::Read { off, len }).await;
            off += len;
        }
    });
}

// Array sizes are known up front so strategies stay inside them: each member has 1 MiB of
// metadata, the rest is data.
proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn linear_matches_model(cmds in prop::collection::vec(cmd(5 * MIB), 1..40)) {
        run_model(LevelKind::Linear, &[4, 3], cmds);
    }

    #[test]
    fn raid0_matches_model(cmds in prop::collection::vec(cmd(11 * MIB), 1..40)) {
        run_model(LevelKind::Raid0, &[4, 4, 6], cmds);
    }

    #[test]
    fn raid1_matches_model(cmds in prop::collection::vec(cmd(3 * MIB), 1..40)) {
        run_model(LevelKind::Raid1, &[4, 4, 5], cmds);
    }

    #[test]
    fn raid10_matches_model(cmds in prop::collection::vec(cmd(3 * 3 * MIB / 2), 1..40)) {
        run_model(LevelKind::Raid10, &[4, 4, 4], cmds);
    }
}

#[test]
fn level_sizes_used_by_the_model_strategies_are_right() {
    runtime().block_on(async {
        assert_eq!(
            mem_array(LevelKind::Linear, &[4, 3], 65536).await.size(),
            5 * MIB
        );
        assert_eq!(
            mem_array(LevelKind::Raid0, &[4, 4, 6], 65536).await.size(),
            11 * MIB
        );
        assert_eq!(
            mem_array(LevelKind::Raid1, &[4, 4, 5], 65536).await.size(),
            3 * MIB
        );
        assert_eq!(
            mem_array(LevelKind::Raid10, &[4, 4, 4], 65536).await.size(),
            9 * MIB / 2
        );
    });
}

/// Many unaligned writes into disjoint bytes of the same few blocks, all at once: the
/// read-modify-write locks must keep every one of them.
#[test]
fn concurrent_unaligned_writes_to_one_block_all_survive() {
    runtime().block_on(async {
        let a = Arc::new(mem_array(LevelKind::Raid1, &[4, 4], 65536).await);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                // 64 writes of 100 bytes each, packed into bytes 0..6400 (13 blocks).
                let (off, len) = (i * 100, 100);
                let mut b = a.buffer(off, len).await.unwrap();
                b.data_mut().fill(i as u8 + 1);
                let io = FrontIo::new(Op::Write, off, len);
                a.submit(io, Some(&mut b)).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut b = a.buffer(0, 6400).await.unwrap();
        let io = FrontIo::new(Op::Read, 0, 6400);
        a.submit(io, Some(&mut b)).await.unwrap();
        for i in 0..64usize {
            assert!(
                b.data()[i * 100..i * 100 + 100]
                    .iter()
                    .all(|&x| x == i as u8 + 1),
                "write {i} was lost by a racing read-modify-write"
            );
        }
    });
}

/// Unaligned writes that between them hold every buffer of the pool's only class: each
/// read-modify-write still gets its edge block (from the array's own edge buffers, not the
/// exhausted pool) and completes. Before the edge buffers existed this waited for ever.
#[test]
fn unaligned_writes_holding_every_pool_buffer_still_complete() {
    runtime().block_on(async {
        let members: Vec<Arc<dyn Member>> = (0..2)
            .map(|i| Arc::new(MemMember::new(&format!("mem:4MiB#{i}"), 4 * MIB)) as Arc<dyn Member>)
            .collect();
        let spec = ArraySpec {
            name: "tight".into(),
            level: LevelKind::Raid1,
            chunk: 65536,
            queue_depth: 8,
            policy: "fifo".into(),
        };
        const BUFFERS: usize = 8;
        let pool = BufPool::new(&PoolConfig {
            classes: vec![(4096, BUFFERS)],
        })
        .unwrap();
        let a = Arc::new(assemble(&spec, members, pool, false).await.unwrap().0);
        // Take every buffer first, then submit: no write can finish before all are held.
        let mut held = Vec::new();
        for i in 0..BUFFERS as u64 {
            let (off, len) = (i * 4096 + 100, 300);
            let mut b = a.buffer(off, len).await.unwrap();
            b.data_mut().fill(i as u8 + 1);
            held.push((off, len, b));
        }
        let writes = held.into_iter().map(|(off, len, mut b)| {
            let a = a.clone();
            async move {
                let io = FrontIo::new(Op::Write, off, len);
                a.submit(io, Some(&mut b)).await.unwrap();
            }
        });
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::future::join_all(writes),
        )
        .await
        .expect("unaligned writes holding the whole pool never finished (edge-block deadlock)");
        for i in 0..BUFFERS as u64 {
            let (off, len) = (i * 4096 + 100, 300);
            let mut b = a.buffer(off, len).await.unwrap();
            let io = FrontIo::new(Op::Read, off, len);
            a.submit(io, Some(&mut b)).await.unwrap();
            assert!(b.data().iter().all(|&x| x == i as u8 + 1), "write {i} lost");
        }
    });
}

#[test]
fn out_of_range_and_oversized_requests_are_refused() {
    runtime().block_on(async {
        let a = mem_array(LevelKind::Raid0, &[4, 4], 65536).await;
        let size = a.size();
        let io = FrontIo::new(Op::Trim, size - 512, 1024);
        assert_eq!(a.submit(io, None).await.unwrap_err().errno(), libc_einval());
        let io = FrontIo::new(Op::Trim, u64::MAX - 10, 100);
        assert!(
            a.submit(io, None).await.is_err(),
            "offset+len overflow is caught"
        );
        assert!(a.buffer(0, a.max_io() + 1).await.is_err());
    });
}

fn libc_einval() -> i32 {
    22
}

/// In-place I/O (the ublk frontend's path): aligned reads and writes straight in the
/// caller's buffer agree with the pool-buffer path; anything unaligned is refused.
#[test]
fn in_place_io_matches_the_buffered_path_and_refuses_unaligned() {
    runtime().block_on(async {
        let a = mem_array(LevelKind::Raid10, &[4, 4, 4], 65536).await;
        let mut page = vec![0u8; (256 << 10) + 4096];
        let at = page.as_ptr().align_offset(4096);
        let buf = &mut page[at..at + (256 << 10)];
        buf.copy_from_slice(&data(7, 61440, 256 << 10));
        let io = |op, offset, len| FrontIo::new(op, offset, len);
        let w = raidcore::IoBuf::from_slice(buf);
        a.submit_in_place(io(Op::Write, 61440, 256 << 10), w)
            .await
            .unwrap();
        let mut b = a.buffer(61440, 256 << 10).await.unwrap();
        a.submit(io(Op::Read, 61440, 256 << 10), Some(&mut b))
            .await
            .unwrap();
        assert_eq!(b.data(), &data(7, 61440, 256 << 10)[..]);
        buf.fill(0);
        let r = raidcore::IoBuf::from_slice(buf);
        a.submit_in_place(io(Op::Read, 61440, 256 << 10), r)
            .await
            .unwrap();
        assert_eq!(&buf[..], &data(7, 61440, 256 << 10)[..]);
        let odd = raidcore::IoBuf::from_slice(&mut buf[..1000]);
        assert!(a
            .submit_in_place(io(Op::Read, 100, 1000), odd)
            .await
            .is_err());
        let shifted = raidcore::IoBuf::from_slice(&mut buf[1..513]);
        assert!(a
            .submit_in_place(io(Op::Read, 512, 512), shifted)
            .await
            .is_err());
    });
}

/// Memory members lend their own bytes for whole-block requests that land on one copy
/// (linear, raid0 inside a chunk), so a frontend reads and writes them with no copy; every
/// other request gets a pool buffer. Data goes both ways between the two kinds of buffer.
#[test]
fn mem_members_lend_their_bytes_for_single_copy_whole_block_requests() {
    async fn lent(a: &Array, off: u64, len: u64) -> bool {
        a.buffer(off, len).await.unwrap().is_lent()
    }
    runtime().block_on(async {
        let linear = mem_array(LevelKind::Linear, &[4, 4], 65536).await;
        assert!(lent(&linear, 4096, 1 << 20).await, "aligned linear request");
        assert!(!lent(&linear, 100, 300).await, "unaligned request");
        let first_end = linear.level().member_span(0);
        assert!(
            !lent(&linear, first_end - 4096, 8192).await,
            "a request across two members"
        );
        assert!(lent(&linear, first_end, 8192).await, "the second member");
        let raid0 = mem_array(LevelKind::Raid0, &[4, 4], 65536).await;
        assert!(lent(&raid0, 65536, 65536).await, "one raid0 chunk");
        assert!(!lent(&raid0, 61440, 8192).await, "across two chunks");
        let raid1 = mem_array(LevelKind::Raid1, &[4, 4], 65536).await;
        assert!(!lent(&raid1, 0, 4096).await, "a mirror writes every copy");

        // Written through lent bytes, read back through a pool buffer, and back again.
        let (off, len) = (8192u64, 256u64 << 10);
        let mut b = linear.buffer(off, len).await.unwrap();
        assert!(b.is_lent());
        b.data_mut().copy_from_slice(&data(3, off, len));
        let w = FrontIo::new(Op::Write, off, len);
        linear.submit(w, Some(&mut b)).await.unwrap();
        drop(b);
        let mut p = linear.buffer(off - 100, len + 200).await.unwrap();
        assert!(!p.is_lent());
        let r = FrontIo::new(Op::Read, off - 100, len + 200);
        linear.submit(r, Some(&mut p)).await.unwrap();
        assert_eq!(&p.data()[100..100 + len as usize], &data(3, off, len)[..]);
        p.data_mut().copy_from_slice(&data(9, off - 100, len + 200));
        let w = FrontIo::new(Op::Write, off - 100, len + 200);
        linear.submit(w, Some(&mut p)).await.unwrap();
        let mut b = linear.buffer(off, len).await.unwrap();
        assert!(b.is_lent());
        linear
            .submit(FrontIo::new(Op::Read, off, len), Some(&mut b))
            .await
            .unwrap();
        assert_eq!(
            b.data(),
            &data(9, off - 100, len + 200)[100..100 + len as usize]
        );

        // A buffer is for the request it was taken for: a lent one submitted for another
        // offset would read the member's bytes onto others. Refused, nothing moved.
        let other = FrontIo::new(Op::Read, off + len, len);
        let e = linear.submit(other, Some(&mut b)).await.unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let mut check = linear.buffer(off - 100, len + 200).await.unwrap();
        let r = FrontIo::new(Op::Read, off - 100, len + 200);
        linear.submit(r, Some(&mut check)).await.unwrap();
        assert_eq!(check.data(), &data(9, off - 100, len + 200)[..]);
    });
}
