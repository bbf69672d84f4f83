//! FLUSH and FUA through the real `Array` over real `mem:` and `null:` members: one front
//! FLUSH reaches every healthy member (and no faulty one) on raid1 and raid10, and a FUA
//! write on raid1 is durable on every mirror (native FUA, or write then flush where the
//! member has no FUA). A thin counting wrapper records what each member is asked to do; it
//! forwards every I/O to the real member underneath.

use std::sync::{Arc, Mutex};

use backends::mem::MemMember;
use backends::null::NullMember;
use raidcore::{
    assemble, Array, ArraySpec, BufPool, Flags, FrontIo, IoFuture, LevelKind, Member, MemberInfo,
    MemberIo, Op, PoolConfig,
};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const CHUNK: u64 = 64 * KIB;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What one member was asked to do: (op, fua) in submission order.
type OpLog = Arc<Mutex<Vec<(Op, bool)>>>;

/// A real member with every submitted I/O recorded. mem and null have no cache, so they
/// advertise no flush; the wrapper advertises flush (like a disk with a volatile cache)
/// and native FUA only when `fua` (without it the array must follow each FUA write with a
/// flush). mem and null accept both and do nothing more.
struct Counting {
    inner: Arc<dyn Member>,
    info: MemberInfo,
    log: OpLog,
}

impl Counting {
    fn wrap(inner: Arc<dyn Member>, fua: bool) -> (Arc<dyn Member>, OpLog) {
        let mut info = inner.info().clone();
        info.caps.flush = true;
        info.caps.fua = fua;
        let log = OpLog::default();
        let me = Counting {
            inner,
            info,
            log: log.clone(),
        };
        (Arc::new(me), log)
    }
}

impl Member for Counting {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        self.log.lock().unwrap().push((io.tag.op, io.tag.fua));
        self.inner.submit(io)
    }

    fn close(&self) {
        self.inner.close()
    }
}

/// mem and null members in turn, each wrapped; `native_fua[i]` for member i.
async fn counted_array(level: LevelKind, native_fua: &[bool]) -> (Array, Vec<OpLog>) {
    let (members, logs): (Vec<_>, Vec<_>) = native_fua
        .iter()
        .enumerate()
        .map(|(i, &fua)| {
            let inner: Arc<dyn Member> = if i % 2 == 0 {
                Arc::new(MemMember::new(&format!("mem:16MiB#{i}"), 16 * MIB))
            } else {
                Arc::new(NullMember::new(&format!("null:16MiB#{i}"), 16 * MIB))
            };
            Counting::wrap(inner, fua)
        })
        .unzip();
    let spec = ArraySpec {
        name: "flush".into(),
        level,
        chunk: CHUNK,
        queue_depth: 8,
        policy: "fifo".into(),
    };
    let pool = BufPool::new(&PoolConfig::default()).unwrap();
    (assemble(&spec, members, pool, false).await.unwrap().0, logs)
}

async fn write(a: &Array, off: u64, len: u64, fua: bool) {
    let mut b = a.buffer(off, len).await.unwrap();
    b.data_mut().fill(0x5a);
    let io = FrontIo {
        op: Op::Write,
        offset: off,
        len,
        flags: Flags {
            fua,
            ..Flags::default()
        },
    };
    a.submit(io, Some(&mut b)).await.unwrap();
}

async fn front_flush(a: &Array) {
    let io = FrontIo::new(Op::Flush, 0, 0);
    a.submit(io, None).await.unwrap();
}

/// Each member's log from `mark[i]` on.
fn since(logs: &[OpLog], mark: &[usize]) -> Vec<Vec<(Op, bool)>> {
    logs.iter()
        .zip(mark)
        .map(|(l, &m)| l.lock().unwrap()[m..].to_vec())
        .collect()
}

fn marks(logs: &[OpLog]) -> Vec<usize> {
    logs.iter().map(|l| l.lock().unwrap().len()).collect()
}

fn count(ops: &[(Op, bool)], op: Op) -> usize {
    ops.iter().filter(|(o, _)| *o == op).count()
}

/// Writes over every member (several chunk rows), then one front FLUSH: exactly one flush
/// per member. Then member 1 is failed: the next front FLUSH reaches every other member
/// once and the faulty one not at all.
fn flush_round(level: LevelKind, n: usize) {
    runtime().block_on(async {
        let (a, logs) = counted_array(level, &vec![true; n]).await;
        for row in 0..2 * n as u64 {
            write(&a, row * CHUNK + 4 * KIB, 8 * KIB, false).await;
        }
        let mark = marks(&logs);
        front_flush(&a).await;
        for (i, ops) in since(&logs, &mark).iter().enumerate() {
            assert_eq!(
                ops,
                &[(Op::Flush, false)],
                "{level:?} member {i}: one front FLUSH should be one member flush"
            );
        }
        // Every member took writes before, so each flush had something to make durable.
        for (i, l) in logs.iter().enumerate() {
            let l = l.lock().unwrap();
            assert!(
                count(&l[..mark[i]], Op::Write) > 0,
                "member {i} took no write"
            );
        }

        assert!(a.fail_member(1).await, "member 1 could not be failed");
        write(&a, 0, 2 * CHUNK * n as u64, false).await;
        let mark = marks(&logs);
        front_flush(&a).await;
        for (i, ops) in since(&logs, &mark).iter().enumerate() {
            let want: &[(Op, bool)] = if i == 1 { &[] } else { &[(Op::Flush, false)] };
            assert_eq!(
                ops, want,
                "{level:?} member {i} (member 1 faulty): flushes after one front FLUSH"
            );
        }
    });
}

#[test]
fn front_flush_reaches_every_healthy_raid1_member_and_not_a_faulty_one() {
    flush_round(LevelKind::Raid1, 3);
}

#[test]
fn front_flush_reaches_every_healthy_raid10_member_and_not_a_faulty_one() {
    flush_round(LevelKind::Raid10, 4);
}

/// raid1 of three: two members with native FUA, one without. A plain write is plain on
/// every mirror; a FUA write is a FUA write on the first two and a write followed by a
/// flush on the third.
#[test]
fn fua_write_on_raid1_is_durable_on_every_mirror() {
    runtime().block_on(async {
        let (a, logs) = counted_array(LevelKind::Raid1, &[true, true, false]).await;
        let mark = marks(&logs);
        write(&a, 0, CHUNK, false).await;
        for (i, ops) in since(&logs, &mark).iter().enumerate() {
            assert!(
                !ops.is_empty() && ops.iter().all(|&o| o == (Op::Write, false)),
                "member {i}: a plain write should be plain writes only: {ops:?}"
            );
        }
        let mark = marks(&logs);
        write(&a, CHUNK, 2 * CHUNK, true).await;
        let after = since(&logs, &mark);
        for (i, ops) in after.iter().enumerate().take(2) {
            assert!(
                !ops.is_empty() && ops.iter().all(|&o| o == (Op::Write, true)),
                "member {i} (native FUA): a FUA write should be FUA writes: {ops:?}"
            );
        }
        let ops = &after[2];
        let last_write = ops.iter().rposition(|(o, _)| *o == Op::Write);
        let last_flush = ops.iter().rposition(|(o, _)| *o == Op::Flush);
        assert!(
            matches!((last_write, last_flush), (Some(w), Some(f)) if f > w),
            "member 2 (no FUA): a FUA write should be a write then a flush: {ops:?}"
        );
        assert!(
            ops.iter().all(|(_, fua)| !fua),
            "member 2 has no FUA but was sent FUA: {ops:?}"
        );
    });
}
