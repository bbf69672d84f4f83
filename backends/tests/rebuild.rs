//! Rebuild: a faulty mirror is refilled while writes continue, then serves every byte alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backends::mem::MemMember;
use raidcore::{
    assemble, Array, ArraySpec, BufPool, FrontIo, LevelKind, Member, MemberState, Op, PoolConfig,
    RebuildError,
};

const MIB: u64 = 1 << 20;

async fn array(level: LevelKind, n: usize) -> Arc<Array> {
    let members: Vec<Arc<dyn Member>> = (0..n)
        .map(|i| Arc::new(MemMember::new(&format!("mem:8MiB#{i}"), 8 * MIB)) as Arc<dyn Member>)
        .collect();
    let spec = ArraySpec {
        name: "r".into(),
        level,
        chunk: 64 << 10,
        queue_depth: 32,
        policy: "fifo".into(),
    };
    let pool = BufPool::new(&PoolConfig::default()).unwrap();
    Arc::new(assemble(&spec, members, pool, false).await.unwrap().0)
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

async fn write(a: &Array, off: u64, data: &[u8]) {
    let mut b = a.buffer(off, data.len() as u64).await.unwrap();
    b.data_mut().copy_from_slice(data);
    let io = FrontIo::new(Op::Write, off, data.len() as u64);
    a.submit(io, Some(&mut b)).await.unwrap();
}

async fn read(a: &Array, off: u64, len: u64) -> Vec<u8> {
    let mut b = a.buffer(off, len).await.unwrap();
    let io = FrontIo::new(Op::Read, off, len);
    a.submit(io, Some(&mut b)).await.unwrap();
    b.data().to_vec()
}

/// Model of the array's content, updated by every write.
struct Model(std::sync::Mutex<Vec<u8>>);

impl Model {
    async fn write(&self, a: &Array, off: u64, data: Vec<u8>) {
        write(a, off, &data).await;
        self.0.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
}

/// Fail `target`, write while it is out, rebuild it under concurrent writes, then fail
/// every other member that shares its data and read everything from what is left.
async fn rebuild_under_load(level: LevelKind, n: usize, target: usize, others: &[usize]) {
    let a = array(level, n).await;
    let size = a.size();
    let model = Arc::new(Model(std::sync::Mutex::new(vec![0; size as usize])));
    model.write(&a, 0, fill(1, 0, size)).await;
    assert!(a.fail_member(target).await);
    model.write(&a, 12345, fill(2, 12345, 3 * MIB)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, model, stop) = (a.clone(), model.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (i * 777_777) % (size - 70_000);
                model.write(&a, off, fill(i as u8, off, 70_000)).await;
                i += 1;
            }
            i
        })
    };
    a.rebuild(target, None).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 0, "writes ran during the rebuild");
    assert_eq!(a.members()[target].state(), MemberState::Healthy);

    for &o in others {
        assert!(a.fail_member(o).await);
    }
    let got = read(&a, 0, size).await;
    let want = model.0.lock().unwrap().clone();
    let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(first_bad, None, "rebuilt member differs from the model");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn raid1_member_rebuilds_under_writes_and_then_serves_alone() {
    rt().block_on(rebuild_under_load(LevelKind::Raid1, 2, 1, &[0]));
}

#[test]
fn raid10_member_rebuilds_under_writes_and_then_serves_alone() {
    // near-2 over 4: member 1 mirrors member 0.
    rt().block_on(rebuild_under_load(LevelKind::Raid10, 4, 1, &[0]));
}

#[test]
fn raid0_and_healthy_members_are_refused() {
    rt().block_on(async {
        let a = array(LevelKind::Raid0, 2).await;
        a.fail_member(1).await;
        assert!(matches!(
            a.rebuild(1, None).await,
            Err(RebuildError::NotRedundant { .. })
        ));
        let b = array(LevelKind::Raid1, 2).await;
        assert!(matches!(
            b.rebuild(0, None).await,
            Err(RebuildError::NotFaulty { .. })
        ));
        assert!(matches!(
            b.remove_member(0).await,
            Err(RebuildError::NotRemovable { .. })
        ));
    });
}

#[test]
fn removed_slot_takes_a_new_member_which_rebuilds() {
    rt().block_on(async {
        let a = array(LevelKind::Raid1, 2).await;
        let size = a.size();
        write(&a, 0, &fill(9, 0, size)).await;
        a.fail_member(1).await;
        a.remove_member(1).await.unwrap();
        let small = Arc::new(MemMember::new("mem:2MiB", 2 * MIB));
        assert!(matches!(
            a.add_member(1, small).await,
            Err(RebuildError::TooSmall { .. })
        ));
        a.add_member(1, Arc::new(MemMember::new("mem:new", 8 * MIB)))
            .await
            .unwrap();
        assert!(matches!(a.members()[1].state(), MemberState::Faulty(_)));
        a.rebuild(1, Some(64 * MIB)).await.unwrap();
        a.fail_member(0).await;
        assert_eq!(read(&a, 0, size).await, fill(9, 0, size));
        assert_eq!(a.members()[1].member().info().address, "mem:new");
    });
}
