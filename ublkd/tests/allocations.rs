//! The hot path makes no heap allocation per I/O: fio (a separate process) drives the NBD
//! server in this process over a null member, a mem member and raid1 of two local files,
//! while a counting global allocator sees every allocation this process makes.
//! Connection set-up allocates (negotiation, the connection's task and buffers); a
//! request must not.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use backends::local::LocalMember;
use backends::mem::MemMember;
use backends::null::NullMember;
use raidcore::{assemble, ArrayRef, ArraySpec, BufPool, LevelKind, Member, PoolConfig};
use ublkd::nbd_server::{Export, NbdServer};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers every call to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MEMBER_SIZE: u64 = 64 << 20;

fn have_fio() -> bool {
    Command::new("sh")
        .args(["-c", "command -v fio >/dev/null"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn array(name: &str, level: LevelKind, members: Vec<Arc<dyn Member>>) -> ArrayRef {
    let spec = ArraySpec {
        name: name.into(),
        level,
        chunk: 65536,
        queue_depth: 128,
        policy: "fifo".into(),
    };
    let pool = BufPool::new(&PoolConfig::default()).expect("buffer pool");
    let (array, _) = assemble(&spec, members, pool, false)
        .await
        .expect("assemble");
    Arc::new(array)
}

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(MEMBER_SIZE).expect("size image");
    path
}

/// Run fio's nbd engine for `ios` I/Os per job; the allocations made meanwhile and the
/// I/Os fio completed.
async fn count_during_fio(uri: &str, rw: &str, depth: u32, jobs: u32, ios: u64) -> (u64, u64) {
    let args: Vec<String> = [
        "--name=alloc",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        &format!("--iodepth={depth}"),
        &format!("--numjobs={jobs}"),
        "--size=60M",
        // The I/O to do per job, past `size` if need be (random offsets wrap).
        &format!("--io_size={}", ios * 4096),
        "--group_reporting",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("120")
            .arg("fio")
            .args(&args)
            .output()
            .expect("run fio")
    })
    .await
    .unwrap();
    COUNTING.store(false, Ordering::Relaxed);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "fio {rw}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = fio_total_ios(&text);
    assert!(
        done >= ios * u64::from(jobs),
        "fio did {done} I/Os:\n{text}"
    );
    (allocations, done)
}

/// The read and write I/O counts in fio's JSON report (its first job, group reporting).
fn fio_total_ios(text: &str) -> u64 {
    let json = &text[text.find('{').expect("fio JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let job = &v["jobs"][0];
    job["read"]["total_ios"].as_u64().unwrap_or(0) + job["write"]["total_ios"].as_u64().unwrap_or(0)
}

async fn assert_no_allocation_per_io(name: &str, array: ArrayRef) {
    let server = NbdServer::new(vec![Export {
        name: name.into(),
        description: String::new(),
        array,
    }]);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    server
        .listen_with_addr(&format!("unix:{}", sock.display()))
        .await
        .unwrap();
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    for (rw, depth, jobs, ios) in [
        ("randwrite", 32, 2, 20_000),
        ("randread", 32, 2, 20_000),
        ("randwrite", 1, 1, 5_000),
        ("randread", 1, 1, 5_000),
    ] {
        let (allocations, done) = count_during_fio(&uri, rw, depth, jobs, ios).await;
        eprintln!("{name} {rw} QD{depth}x{jobs}: {allocations} allocations in {done} I/Os");
        // Set-up costs some hundreds per connection; one per request would be `done`.
        assert!(
            allocations * 20 < done,
            "{name} {rw} QD{depth}x{jobs}: {allocations} allocations in {done} I/Os: \
             something on the request path allocates"
        );
    }
}

// One test, so that nothing else in this process allocates while it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_of_two_files_and_a_null_member_allocate_nothing_per_io() {
    if !have_fio() {
        eprintln!("skipping: fio is not installed (CI installs it)");
        return;
    }
    let m: Arc<dyn Member> = Arc::new(NullMember::new("null:64M", MEMBER_SIZE));
    assert_no_allocation_per_io("n0", array("n0", LevelKind::Linear, vec![m]).await).await;
    let m: Arc<dyn Member> = Arc::new(MemMember::new("mem:m0", MEMBER_SIZE));
    assert_no_allocation_per_io("m0", array("m0", LevelKind::Linear, vec![m]).await).await;

    let dir = tempfile::Builder::new()
        .prefix("uniblk-alloc-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let members: Vec<Arc<dyn Member>> = ["a.img", "b.img"]
        .iter()
        .map(|n| Arc::new(LocalMember::open(image(dir.path(), n)).expect("open")) as _)
        .collect();
    if members.iter().any(|m| m.info().engine != "io_uring") {
        eprintln!("skipping raid1: no io_uring here; the pread engine hands each I/O to a thread");
        return;
    }
    assert_no_allocation_per_io("r1", array("r1", LevelKind::Raid1, members).await).await;
}
