//! The NBD server against real clients (qemu-io, nbdinfo, fio) and hand-written malformed
//! ones over raw sockets. Arrays are built over in-memory members. A test whose peer
//! binary is missing skips with a message (CI installs them all).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::mem::MemMember;
use backends::nbd::wire::*;
use raidcore::{
    assemble, ArrayRef, ArraySpec, BufPool, IoError, IoFuture, LevelKind, Member, MemberInfo,
    MemberIo, Op, PoolConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ublkd::nbd_server::{Export, NbdServer};

const MEMBER_SIZE: u64 = 64 << 20;
const T: Duration = Duration::from_secs(20);

// ---- Arrays and members -------------------------------------------------------------

/// A mem member with knobs: slow or failing reads, and no native write-zeroes (so the
/// array cannot promise fast zeroing).
struct Knobbed {
    inner: MemMember,
    info: MemberInfo,
    fail_reads: AtomicBool,
    read_delay_ms: AtomicU64,
}

impl Knobbed {
    fn new(address: &str, write_zeroes: bool) -> Arc<Self> {
        let inner = MemMember::new(address, MEMBER_SIZE);
        let mut info = inner.info().clone();
        info.caps.write_zeroes = write_zeroes;
        Arc::new(Knobbed {
            inner,
            info,
            fail_reads: AtomicBool::new(false),
            read_delay_ms: AtomicU64::new(0),
        })
    }
}

impl Member for Knobbed {
    fn info(&self) -> &MemberInfo {
        &self.info
    }

    fn submit(&self, io: MemberIo) -> IoFuture<'_> {
        raidcore::io_future_boxed(async move {
            if io.tag.op == Op::Read {
                let d = self.read_delay_ms.load(Ordering::Relaxed);
                if d > 0 {
                    tokio::time::sleep(Duration::from_millis(d)).await;
                }
                if self.fail_reads.load(Ordering::Relaxed) {
                    return Err(IoError::Io(format!("{} (injected)", self.info.address)));
                }
            }
            self.inner.submit(io).await
        })
    }
}

async fn make_array(name: &str, level: LevelKind, members: Vec<Arc<dyn Member>>) -> ArrayRef {
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

async fn raid1(name: &str) -> ArrayRef {
    let members: Vec<Arc<dyn Member>> = (0..2)
        .map(|i| Arc::new(MemMember::new(&format!("mem:{name}{i}"), MEMBER_SIZE)) as _)
        .collect();
    make_array(name, LevelKind::Raid1, members).await
}

/// A one-member linear array over a `Knobbed` member.
async fn knobbed(name: &str, write_zeroes: bool) -> (ArrayRef, Arc<Knobbed>) {
    let m = Knobbed::new(&format!("mem:{name}"), write_zeroes);
    let a = make_array(name, LevelKind::Linear, vec![m.clone() as Arc<dyn Member>]).await;
    (a, m)
}

// ---- Server fixture -----------------------------------------------------------------

struct Fixture {
    server: Arc<NbdServer>,
    array: ArrayRef,
    sock: PathBuf,
    tcp: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(exports: Vec<Export>) -> Fixture {
        Fixture::start_with_stall(exports, ublkd::nbd_server::REPLY_STALL).await
    }

    async fn start_with_stall(exports: Vec<Export>, stall: Duration) -> Fixture {
        let array = exports[0].array.clone();
        let server = NbdServer::with_reply_stall(exports, stall);
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let unix = format!("unix:{}", sock.display());
        let (_, bound) = server.listen_with_addr(&unix).await.unwrap();
        assert_eq!(bound, unix);
        let (_, tcp) = server.listen_with_addr("127.0.0.1:0").await.unwrap();
        Fixture {
            server,
            array,
            sock,
            tcp,
            _dir: dir,
        }
    }

    async fn one(name: &str, array: ArrayRef) -> Fixture {
        Fixture::start(vec![Export {
            name: name.into(),
            description: format!("test export {name}"),
            array,
        }])
        .await
    }

    fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.tcp)
    }

    /// The advertised maximum block size.
    fn max_block(&self) -> u32 {
        (self.array.max_io() / 4096 * 4096) as u32
    }
}

// ---- Peer binaries ------------------------------------------------------------------

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin} >/dev/null")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

macro_rules! require {
    ($($bin:expr),+) => {
        $(if !have($bin) {
            eprintln!("skipping: {} is not installed (CI installs it)", $bin);
            return;
        })+
    };
}

struct Out {
    ok: bool,
    text: String,
}

/// Run a peer under `timeout`, off the runtime's threads.
async fn run(bin: &str, args: Vec<String>) -> Out {
    let peer = bin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("60")
            .arg(&peer)
            .args(&args)
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .output()
            .expect("run peer")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("NBD_TEST_VERBOSE").is_some() {
        eprintln!("--- {bin} -> {}\n{text}", out.status);
    }
    Out {
        ok: out.status.success(),
        text,
    }
}

/// qemu-io commands against `uri`; every command must succeed and every pattern match.
async fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(uri.to_string());
    let out = run("qemu-io", args).await;
    assert!(out.ok, "qemu-io {cmds:?} on {uri} failed:\n{}", out.text);
    assert!(
        !out.text.contains("failed") && !out.text.contains("error"),
        "qemu-io {cmds:?} on {uri}:\n{}",
        out.text
    );
    out.text
}

// ---- A raw client -------------------------------------------------------------------

/// A minimal NBD client over a unix socket, written from the spec, for sending exactly
/// the bytes a test wants (including wrong ones).
struct Raw {
    s: UnixStream,
    structured: bool,
    pending: HashMap<u64, (u16, u64, u32)>,
    next_handle: u64,
}

#[derive(Debug, Default)]
struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
    extents: Vec<(u32, u32)>,
    chunks: usize,
}

impl Raw {
    async fn hello(sock: &Path) -> Raw {
        Raw::hello_flags(sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await
    }

    async fn hello_flags(sock: &Path, cflags: u32) -> Raw {
        let mut s = UnixStream::connect(sock).await.expect("connect");
        let g = Greeting::read_from(&mut s).await.expect("greeting");
        assert_eq!(g.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&cflags.to_be_bytes()).await.unwrap();
        Raw {
            s,
            structured: false,
            pending: HashMap::new(),
            next_handle: 1,
        }
    }

    async fn send_opt(&mut self, option: u32, payload: &[u8]) {
        let h = OptionHeader {
            option,
            len: payload.len() as u32,
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    /// Replies up to and including the final one (ACK or an error).
    async fn opt_replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = tokio::time::timeout(T, OptionReply::read_from(&mut self.s))
                .await
                .expect("option reply in time")
                .expect("option reply");
            assert_eq!(r.option, option);
            let mut p = vec![0u8; r.len as usize];
            self.s.read_exact(&mut p).await.unwrap();
            let last = r.typ == REP_ACK || r.is_error();
            all.push((r.typ, p));
            if last {
                return all;
            }
        }
    }

    async fn opt(&mut self, option: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_opt(option, payload).await;
        self.opt_replies(option).await
    }

    fn info_payload(name: &str, wanted: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
        for w in wanted {
            p.extend_from_slice(&w.to_be_bytes());
        }
        p
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    /// Negotiate (optionally structured replies and base:allocation) and GO.
    /// Returns (size, transmission flags).
    async fn go(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        if structured {
            let r = self.opt(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(r.last().unwrap().0, REP_ACK);
            self.structured = true;
        }
        if meta {
            let r = self
                .opt(
                    OPT_SET_META_CONTEXT,
                    &Raw::meta_payload(name, &[META_BASE_ALLOCATION]),
                )
                .await;
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, REP_META_CONTEXT);
        }
        let r = self.opt(OPT_GO, &Raw::info_payload(name, &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK, "GO failed: {r:?}");
        let export = r
            .iter()
            .find(|(t, p)| *t == REP_INFO && p[0..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let p = &export.1;
        (
            u64::from_be_bytes(p[2..10].try_into().unwrap()),
            u16::from_be_bytes(p[10..12].try_into().unwrap()),
        )
    }

    async fn connect(sock: &Path, name: &str, structured: bool) -> Raw {
        let mut c = Raw::hello(sock).await;
        c.go(name, structured, structured).await;
        c
    }

    /// Send a request; returns its handle.
    async fn send(&mut self, typ: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let q = Request {
            flags,
            typ,
            handle,
            offset,
            len,
        };
        self.pending.insert(handle, (typ, offset, len));
        self.s.write_all(&q.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
        handle
    }

    /// The next complete reply (all chunks up to DONE when structured).
    async fn reply(&mut self) -> Reply {
        tokio::time::timeout(T, self.reply_inner())
            .await
            .expect("reply in time")
    }

    async fn reply_inner(&mut self) -> Reply {
        let mut rep = Reply::default();
        loop {
            match ReplyHeader::read_from(&mut self.s)
                .await
                .expect("reply header")
            {
                ReplyHeader::Simple(s) => {
                    assert!(
                        !self.structured || self.pending[&s.handle].0 != CMD_READ,
                        "simple reply to a structured READ"
                    );
                    let (typ, _, len) = self.pending.remove(&s.handle).expect("known handle");
                    rep.handle = s.handle;
                    rep.error = s.error;
                    if typ == CMD_READ && s.error == 0 {
                        rep.data = vec![0; len as usize];
                        self.s.read_exact(&mut rep.data).await.unwrap();
                    }
                    return rep;
                }
                ReplyHeader::Chunk(c) => {
                    assert!(self.structured, "structured chunk without negotiation");
                    rep.handle = c.handle;
                    rep.chunks += 1;
                    let mut p = vec![0u8; c.len as usize];
                    self.s.read_exact(&mut p).await.unwrap();
                    self.take_chunk(&c, &p, &mut rep);
                    if c.is_done() {
                        self.pending.remove(&c.handle).expect("known handle");
                        return rep;
                    }
                }
            }
        }
    }

    fn take_chunk(&self, c: &ChunkHeader, p: &[u8], rep: &mut Reply) {
        let (_, req_off, req_len) = self.pending[&c.handle];
        match c.typ {
            REPLY_TYPE_NONE => assert!(p.is_empty() && c.is_done()),
            REPLY_TYPE_OFFSET_DATA => {
                let off = u64::from_be_bytes(p[0..8].try_into().unwrap());
                let data = &p[8..];
                assert!(off >= req_off && off + data.len() as u64 <= req_off + req_len as u64);
                rep.data.resize(req_len as usize, 0);
                let at = (off - req_off) as usize;
                rep.data[at..at + data.len()].copy_from_slice(data);
            }
            REPLY_TYPE_BLOCK_STATUS => {
                assert_eq!(
                    u32::from_be_bytes(p[0..4].try_into().unwrap()),
                    1,
                    "context id"
                );
                for d in p[4..].chunks_exact(8) {
                    let len = u32::from_be_bytes(d[0..4].try_into().unwrap());
                    let flags = u32::from_be_bytes(d[4..8].try_into().unwrap());
                    rep.extents.push((len, flags));
                }
            }
            t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
                let (e, _msg) = decode_error_payload(p).expect("well-formed error chunk");
                assert_ne!(e, 0);
                rep.error = e;
            }
            t => panic!("unexpected chunk type {t}"),
        }
    }

    async fn call(&mut self, typ: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let h = self.send(typ, flags, offset, len, payload).await;
        let r = self.reply().await;
        assert_eq!(r.handle, h);
        r
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
            .await
            .error
    }

    async fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(CMD_READ, 0, offset, len, &[]).await;
        assert_eq!(r.error, 0, "read {offset}+{len}");
        r.data
    }

    /// True when the server closes the connection (without sending anything first).
    async fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match tokio::time::timeout(T, self.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => panic!("server sent data instead of closing"),
            Err(_) => false,
        }
    }
}

/// A client that keeps writing and verifying its own region while a test misbehaves
/// elsewhere. `stop` returns how many verified rounds it did.
struct GoodClient {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl GoodClient {
    async fn start(sock: &Path, name: &str) -> GoodClient {
        let mut c = Raw::connect(sock, name, true).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0u64;
            while !flag.load(Ordering::Relaxed) || rounds == 0 {
                let fill = (rounds % 251) as u8 + 1;
                let data = vec![fill; 65536 + 100];
                let off = (40 << 20) + 333;
                assert_eq!(c.write(off, &data).await, 0);
                assert_eq!(c.read(off, data.len() as u32).await, data, "round {rounds}");
                rounds += 1;
            }
            rounds
        });
        GoodClient { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(T, self.task)
            .await
            .expect("good client finishes")
            .expect("good client verified every round")
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---- Real clients -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_aligned_and_unaligned_over_unix_and_tcp() {
    require!("qemu-io");
    let f = Fixture::one("d0", raid1("d0").await).await;
    for uri in [f.unix_uri("d0"), f.tcp_uri("d0")] {
        qemu_io(
            &uri,
            &[
                "write -P 0xab 1000 70000",
                "read -P 0xab 1000 70000",
                "write -P 0x17 1048576 1048576",
                "read -P 0x17 1048576 1048576",
                "write -P 0x33 4095 3",
                "read -P 0xab 1000 3095",
                "read -P 0x33 4095 3",
                "read -P 0xab 4098 66902",
                "read -P 0 0 1000",
                "read -P 0 71000 977576",
                "flush",
                "write -f -P 0x44 8192 4096",
                "read -P 0x44 8192 4096",
            ],
        )
        .await;
    }
    // Both transports reach the same array, and qemu's writes landed where it said.
    let mut c = Raw::connect(&f.sock, "d0", true).await;
    assert!(c.read(1000, 3095).await.iter().all(|&b| b == 0xab));
    assert_eq!(c.read(4095, 3).await, [0x33; 3]);
    assert!(c.read(1 << 20, 1 << 20).await.iter().all(|&b| b == 0x17));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_zeroes_and_discard_read_back_as_zeroes() {
    require!("qemu-io");
    let f = Fixture::one("d0", raid1("d0").await).await;
    let uri = f.unix_uri("d0");
    qemu_io(
        &uri,
        &[
            "write -P 0xcd 0 2M",
            "write -z 4096 65536",
            "write -z 70001 999",
            "write -z -u 131072 131072",
            "discard 524288 524288",
            "read -P 0xcd 0 4096",
            "read -P 0 4096 65536",
            "read -P 0xcd 69632 369",
            "read -P 0 70001 999",
            "read -P 0xcd 71000 60072",
            "read -P 0 131072 131072",
            "read -P 0 524288 524288",
            "read -P 0xcd 1048576 1048576",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_limits_flags_and_contexts() {
    require!("nbdinfo");
    let f = Fixture::one("d0", raid1("d0").await).await;
    for uri in [f.unix_uri("d0"), f.tcp_uri("d0")] {
        let out = run("nbdinfo", vec!["--json".into(), uri.clone()]).await;
        assert!(out.ok, "nbdinfo: {}", out.text);
        let v: serde_json::Value = serde_json::from_str(&out.text).expect(&out.text);
        assert_eq!(v["protocol"], "newstyle-fixed");
        assert_eq!(v["structured"], true);
        let e = &v["exports"][0];
        assert_eq!(e["export-name"], "d0");
        assert_eq!(e["description"], "test export d0");
        assert_eq!(e["export-size"], f.array.size());
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], f.max_block());
        for cap in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_multi_conn",
            "can_df",
        ] {
            assert_eq!(e[cap], true, "{cap} in {}", out.text);
        }
        assert_eq!(e["is_read_only"], false);
        assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_and_map() {
    require!("nbdinfo");
    let (a, b) = (raid1("a").await, raid1("b").await);
    let f = Fixture::start(vec![
        Export {
            name: "alpha".into(),
            description: "first array".into(),
            array: a,
        },
        Export {
            name: "beta".into(),
            description: "second array".into(),
            array: b,
        },
    ])
    .await;
    let out = run(
        "nbdinfo",
        vec!["--list".into(), "--json".into(), f.unix_uri("")],
    )
    .await;
    assert!(out.ok, "nbdinfo --list: {}", out.text);
    let v: serde_json::Value = serde_json::from_str(&out.text).expect(&out.text);
    let names: Vec<_> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].clone())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(v["exports"][1]["description"], "second array");
    // The empty name is the first export.
    let out = run("nbdinfo", vec!["--size".into(), f.unix_uri("")]).await;
    assert_eq!(out.text.trim(), f.array.size().to_string());
    let out = run(
        "nbdinfo",
        vec!["--map".into(), "--json".into(), f.unix_uri("beta")],
    )
    .await;
    assert!(out.ok, "nbdinfo --map: {}", out.text);
    let v: serde_json::Value = serde_json::from_str(&out.text).expect(&out.text);
    assert_eq!(v[0]["offset"], 0);
    assert_eq!(v[0]["length"], f.array.size());
    assert_eq!(v[0]["type"], 0, "all allocated data");
    // An unknown export is refused (ERR_UNKNOWN), not hung.
    let out = run("nbdinfo", vec!["--size".into(), f.unix_uri("nope")]).await;
    assert!(!out.ok && out.text.contains("nope"), "{}", out.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verified_random_writes_over_unix_and_tcp() {
    require!("fio");
    let f = Fixture::one("d0", raid1("d0").await).await;
    for uri in [f.unix_uri("d0"), f.tcp_uri("d0")] {
        let args = [
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify-state file left in the crate directory.
            "--verify_state_save=0",
        ];
        let out = run("fio", args.iter().map(|s| s.to_string()).collect()).await;
        assert!(
            out.ok && !out.text.contains("verify: bad"),
            "fio on {uri}:\n{}",
            out.text
        );
    }
}

// ---- Negotiation --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_honours_no_zeroes() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let size = f.array.size();
    for (cflags, reply_len) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        (FLAG_C_FIXED_NEWSTYLE, 134),
    ] {
        let mut c = Raw::hello_flags(&f.sock, cflags).await;
        c.send_opt(OPT_EXPORT_NAME, b"d0").await;
        let mut b = vec![0u8; reply_len];
        c.s.read_exact(&mut b).await.unwrap();
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), size);
        let tflags = u16::from_be_bytes(b[8..10].try_into().unwrap());
        assert_ne!(tflags & FLAG_HAS_FLAGS, 0);
        assert_eq!(tflags & FLAG_SEND_DF, 0, "DF needs structured replies");
        assert!(b[10..].iter().all(|&z| z == 0));
        // Transmission follows immediately, with simple replies.
        assert_eq!(c.write(512, &[7; 512]).await, 0);
        assert_eq!(c.read(512, 512).await, [7; 512]);
    }
    // An unknown name cannot be answered with an error: the session ends.
    let mut c = Raw::hello(&f.sock).await;
    c.send_opt(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed_by_server().await);
    // Unknown client flags end the session too.
    let mut c = Raw::hello_flags(&f.sock, FLAG_C_FIXED_NEWSTYLE | 0x80).await;
    assert!(c.closed_by_server().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_are_refused_and_negotiation_continues() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let good = GoodClient::start(&f.sock, "d0").await;
    let mut c = Raw::hello(&f.sock).await;
    let r = c.opt(0x1234, b"some data").await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_UNSUP);
    assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].0, REP_ERR_UNSUP);
    assert_eq!(c.opt(OPT_EXTENDED_HEADERS, &[]).await[0].0, REP_ERR_UNSUP);
    assert_eq!(c.opt(OPT_LIST, b"x").await[0].0, REP_ERR_INVALID);
    assert_eq!(
        c.opt(OPT_STRUCTURED_REPLY, b"x").await[0].0,
        REP_ERR_INVALID
    );
    // SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
    let meta = Raw::meta_payload("d0", &[META_BASE_ALLOCATION]);
    assert_eq!(
        c.opt(OPT_SET_META_CONTEXT, &meta).await[0].0,
        REP_ERR_INVALID
    );
    // Malformed INFO (the name length runs past the payload).
    let mut bad = Raw::info_payload("d0", &[]);
    bad[3] = 200;
    assert_eq!(c.opt(OPT_INFO, &bad).await[0].0, REP_ERR_INVALID);
    let r = c.opt(OPT_GO, &Raw::info_payload("missing", &[])).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    // INFO answers what was asked for, and the connection stays in negotiation.
    let r = c
        .opt(
            OPT_INFO,
            &Raw::info_payload("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        )
        .await;
    let info = |kind: u16| {
        r.iter()
            .find(|(t, p)| *t == REP_INFO && p[0..2] == kind.to_be_bytes())
            .map(|(_, p)| p[2..].to_vec())
            .unwrap_or_else(|| panic!("info {kind} in {r:?}"))
    };
    assert_eq!(info(INFO_NAME), b"d0");
    assert_eq!(info(INFO_DESCRIPTION), b"test export d0");
    let bs = info(INFO_BLOCK_SIZE);
    assert_eq!(bs[0..4], 1u32.to_be_bytes());
    assert_eq!(bs[4..8], 4096u32.to_be_bytes());
    assert_eq!(bs[8..12], f.max_block().to_be_bytes());
    // LIST_META_CONTEXT: no query lists base:allocation; a foreign namespace lists nothing.
    c.opt(OPT_STRUCTURED_REPLY, &[]).await;
    let r = c
        .opt(OPT_LIST_META_CONTEXT, &Raw::meta_payload("d0", &[]))
        .await;
    assert_eq!(r[0].0, REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], META_BASE_ALLOCATION.as_bytes());
    let r = c
        .opt(
            OPT_LIST_META_CONTEXT,
            &Raw::meta_payload("d0", &["qemu:dirty-bitmap:x"]),
        )
        .await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ACK);
    // Then a good GO on the same connection, and I/O works.
    let (size, tflags) = c.go("d0", true, true).await;
    assert_eq!(size, f.array.size());
    let all = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_DF
        | FLAG_CAN_MULTI_CONN
        | FLAG_SEND_FAST_ZERO;
    assert_eq!(tflags, all);
    assert_eq!(c.write(10, b"hello").await, 0);
    assert_eq!(c.read(10, 5).await, b"hello");
    assert!(good.stop().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_options() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let good = GoodClient::start(&f.sock, "d0").await;
    // 100 KiB: skipped and refused, negotiation goes on.
    let mut c = Raw::hello(&f.sock).await;
    let r = c.opt(OPT_INFO, &vec![0u8; 100 << 10]).await;
    assert_eq!(r[0].0, REP_ERR_TOO_BIG);
    c.go("d0", false, false).await;
    assert_eq!(c.read(0, 512).await.len(), 512);
    // A 512 MiB claim: disconnected without the server reading (or allocating) it.
    let mut c = Raw::hello(&f.sock).await;
    let h = OptionHeader {
        option: OPT_GO,
        len: 512 << 20,
    };
    c.s.write_all(&h.encode()).await.unwrap();
    assert!(c.closed_by_server().await);
    // Wrong option magic: disconnected.
    let mut c = Raw::hello(&f.sock).await;
    c.s.write_all(b"NOTIHAVEOPTxxxxx").await.unwrap();
    assert!(c.closed_by_server().await);
    // ABORT is acknowledged, then the server closes.
    let mut c = Raw::hello(&f.sock).await;
    assert_eq!(c.opt(OPT_ABORT, &[]).await[0].0, REP_ACK);
    assert!(c.closed_by_server().await);
    assert!(good.stop().await > 0);
}

// ---- Transmission errors ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_spec_errors_and_the_connection_stays_in_step() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let good = GoodClient::start(&f.sock, "d0").await;
    let size = f.array.size();
    let max = f.max_block();
    for structured in [false, true] {
        // Structured replies but no meta context: BLOCK_STATUS must be refused.
        let mut c = Raw::hello(&f.sock).await;
        c.go("d0", structured, false).await;
        let check = |r: Reply, e: u32, what: &str| {
            assert_eq!(r.error, e, "{what} (structured {structured})");
            assert!(r.data.is_empty(), "{what}: no data with an error");
        };
        check(
            c.call(99, 0, 0, 0, &[]).await,
            NBD_EINVAL,
            "unknown command",
        );
        check(
            c.call(CMD_READ, 0, 0, max + 4096, &[]).await,
            NBD_EINVAL,
            "over-long read",
        );
        check(
            c.call(CMD_READ, 0, size - 100, 512, &[]).await,
            NBD_EINVAL,
            "read past end",
        );
        check(
            c.call(CMD_READ, 0, u64::MAX - 10, 512, &[]).await,
            NBD_EINVAL,
            "offset overflow",
        );
        check(
            c.call(CMD_TRIM, 0, size, 4096, &[]).await,
            NBD_EINVAL,
            "trim past end",
        );
        check(
            c.call(CMD_CACHE, 0, size, 4096, &[]).await,
            NBD_EINVAL,
            "cache past end",
        );
        check(
            c.call(CMD_WRITE_ZEROES, 0, size - 4096, 8192, &[]).await,
            NBD_ENOSPC,
            "zeroes past end",
        );
        check(
            c.call(CMD_WRITE, 0, size - 4, 8, &[1; 8]).await,
            NBD_ENOSPC,
            "write past end",
        );
        check(
            c.call(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512, &[]).await,
            NBD_EINVAL,
            "flag not for READ",
        );
        check(
            c.call(CMD_WRITE, 0x40, 0, 4, &[9; 4]).await,
            NBD_EINVAL,
            "unknown flag on WRITE",
        );
        if !structured {
            check(
                c.call(CMD_READ, CMD_FLAG_DF, 0, 512, &[]).await,
                NBD_EINVAL,
                "DF without structured",
            );
        }
        check(
            c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).await,
            NBD_EINVAL,
            "block status unnegotiated",
        );
        // An over-long WRITE's payload is read and dropped: the next request is parsed.
        let big = vec![0x5a; max as usize + 4096];
        check(
            c.call(CMD_WRITE, 0, 0, big.len() as u32, &big).await,
            NBD_EINVAL,
            "over-long write",
        );
        assert_eq!(c.read(0, 4).await, [0; 4], "refused writes changed nothing");
        assert_eq!(c.read(size - 4, 3).await, [0; 3]);
        // Zero-length requests do not hurt.
        assert_eq!(c.call(CMD_READ, 0, 0, 0, &[]).await.error, 0);
        assert_eq!(c.call(CMD_WRITE, 0, 0, 0, &[]).await.error, 0);
        // The last byte is still reachable.
        assert_eq!(c.write(size - 1, &[0xee]).await, 0);
        assert_eq!(c.read(size - 1, 1).await, [0xee]);
        // FLUSH ignores offset/length; CACHE inside the export is a no-op success.
        assert_eq!(c.call(CMD_FLUSH, CMD_FLAG_FUA, 0, 0, &[]).await.error, 0);
        assert_eq!(c.call(CMD_CACHE, 0, 0, 4096, &[]).await.error, 0);
    }
    assert!(good.stop().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_disconnect_only_the_offender() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let good = GoodClient::start(&f.sock, "d0").await;
    // Wrong request magic.
    let mut c = Raw::connect(&f.sock, "d0", true).await;
    let mut q = Request {
        flags: 0,
        typ: CMD_READ,
        handle: 1,
        offset: 0,
        len: 512,
    }
    .encode();
    q[0] = 0;
    c.s.write_all(&q).await.unwrap();
    assert!(c.closed_by_server().await);
    // A refused WRITE too long to skip (100 MiB): disconnected without reading it.
    let mut c = Raw::connect(&f.sock, "d0", true).await;
    c.send(CMD_WRITE, 0, 0, 100 << 20, &[]).await;
    assert!(c.closed_by_server().await);
    // An unknown command that (wrongly) carried a payload: the payload is parsed as the
    // next header, whose magic is wrong, so that client is dropped.
    let mut c = Raw::connect(&f.sock, "d0", true).await;
    let h = c.send(42, 0, 0, 64, &[0xff; 64]).await;
    let r = c.reply().await;
    assert_eq!((r.handle, r.error), (h, NBD_EINVAL));
    assert!(c.closed_by_server().await);
    assert!(good.stop().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_write_changes_nothing() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let good = GoodClient::start(&f.sock, "d0").await;
    let off = 3 << 20;
    let before = pattern(1 << 20, 7);
    let mut a = Raw::connect(&f.sock, "d0", true).await;
    assert_eq!(a.write(off, &before).await, 0);
    let conns = f.server.connections();
    // Half a payload, then the client goes away (half-close first, to see no reply).
    let mut c = Raw::connect(&f.sock, "d0", true).await;
    c.send(CMD_WRITE, CMD_FLAG_FUA, off, 1 << 20, &[0xee; 512 << 10])
        .await;
    c.s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, c.s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        rest.is_empty(),
        "nothing may be acknowledged: got {} bytes",
        rest.len()
    );
    drop(c);
    // Another client sees the old bytes.
    let mut b = Raw::connect(&f.sock, "d0", false).await;
    assert_eq!(b.read(off, 1 << 20).await, before);
    // And the dead connection was cleaned up.
    let deadline = Instant::now() + T;
    while f.server.connections() != conns + 1 {
        assert!(
            Instant::now() < deadline,
            "connections stuck at {}",
            f.server.connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(good.stop().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_errors_reach_the_client_as_eio() {
    let (array, member) = knobbed("k", true).await;
    let f = Fixture::one("k", array).await;
    for structured in [false, true] {
        let mut c = Raw::connect(&f.sock, "k", structured).await;
        assert_eq!(c.write(4096, &[3; 4096]).await, 0);
        member.fail_reads.store(true, Ordering::Relaxed);
        let r = c.call(CMD_READ, 0, 4096, 4096, &[]).await;
        member.fail_reads.store(false, Ordering::Relaxed);
        assert_eq!(r.error, NBD_EIO);
        assert!(r.data.is_empty());
        // The simple error reply carried no payload: the stream is still in step.
        assert_eq!(c.read(4096, 4096).await, [3; 4096]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_is_refused_when_members_cannot_zero_natively() {
    let (array, _m) = knobbed("slowzero", false).await;
    let f = Fixture::one("slowzero", array).await;
    let mut c = Raw::connect(&f.sock, "slowzero", true).await;
    assert_eq!(c.write(0, &[9; 8192]).await, 0);
    let r = c
        .call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 8192, &[])
        .await;
    assert_eq!(r.error, NBD_ENOTSUP);
    assert_eq!(
        c.read(0, 8192).await,
        [9; 8192],
        "a refused fast zero changes nothing"
    );
    // Without FAST_ZERO it is done the slow way; NO_HOLE and FUA are accepted.
    let flags = CMD_FLAG_NO_HOLE | CMD_FLAG_FUA;
    assert_eq!(c.call(CMD_WRITE_ZEROES, flags, 0, 8192, &[]).await.error, 0);
    assert_eq!(c.read(0, 8192).await, [0; 8192]);
    // On members with native zeroing, fast zero succeeds.
    let g = Fixture::one("d0", raid1("d0").await).await;
    let mut c = Raw::connect(&g.sock, "d0", true).await;
    assert_eq!(c.write(0, &[9; 8192]).await, 0);
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 8192, &[])
            .await
            .error,
        0
    );
    assert_eq!(c.read(0, 8192).await, [0; 8192]);
}

// ---- Structured replies, block status, pipelining -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_and_structured_reads() {
    let f = Fixture::one("d0", raid1("d0").await).await;
    let size = f.array.size();
    let mut c = Raw::connect(&f.sock, "d0", true).await;
    let r = c.call(CMD_BLOCK_STATUS, 0, 4096, 1 << 20, &[]).await;
    assert_eq!((r.error, r.extents.clone()), (0, vec![(1 << 20, 0)]));
    let r = c
        .call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 100, 12345, &[])
        .await;
    assert_eq!(r.extents, [(12345, 0)]);
    let r = c.call(CMD_BLOCK_STATUS, 0, size - 512, 512, &[]).await;
    assert_eq!(r.extents, [(512, 0)]);
    let r = c.call(CMD_BLOCK_STATUS, 0, size - 512, 1024, &[]).await;
    assert_eq!(r.error, NBD_EINVAL, "past the end");
    // Reads come back as one data chunk marked DONE, DF or not.
    let data = pattern(70000, 3);
    assert_eq!(c.write(1000, &data).await, 0);
    for flags in [0, CMD_FLAG_DF] {
        let r = c.call(CMD_READ, flags, 1000, 70000, &[]).await;
        assert_eq!((r.error, r.chunks), (0, 1));
        assert_eq!(r.data, data);
    }
    let r = c.call(CMD_READ, 0, 0, 0, &[]).await;
    assert_eq!(
        (r.error, r.chunks, r.data.len()),
        (0, 1, 0),
        "zero-length read: a NONE chunk"
    );
    // Meta context selected for another export does not carry over.
    let mut c = Raw::hello(&f.sock).await;
    c.opt(OPT_STRUCTURED_REPLY, &[]).await;
    c.structured = true;
    let r = c
        .opt(
            OPT_SET_META_CONTEXT,
            &Raw::meta_payload("nope", &[META_BASE_ALLOCATION]),
        )
        .await;
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    c.go("d0", false, false).await;
    assert_eq!(
        c.call(CMD_BLOCK_STATUS, 0, 0, 512, &[]).await.error,
        NBD_EINVAL
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_get_out_of_order_replies() {
    let (array, member) = knobbed("k", true).await;
    let f = Fixture::one("k", array).await;
    let mut c = Raw::connect(&f.sock, "k", true).await;
    // 64 writes and reads of distinct blocks, all sent before any reply is read.
    let mut expect = HashMap::new();
    for i in 0..32u64 {
        let d = pattern(4096 + i as usize, i as u8);
        let h = c.send(CMD_WRITE, 0, i * 8192, d.len() as u32, &d).await;
        expect.insert(h, None);
    }
    let mut seen = HashMap::new();
    for _ in 0..32 {
        let r = c.reply().await;
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.handle, ()).is_none(), "handle answered twice");
    }
    for i in 0..32u64 {
        let h = c.send(CMD_READ, 0, i * 8192, 4096 + i as u32, &[]).await;
        expect.insert(h, Some(pattern(4096 + i as usize, i as u8)));
    }
    for _ in 0..32 {
        let r = c.reply().await;
        assert_eq!(Some(&Some(r.data)), expect.get(&r.handle));
    }
    // A slow read sent first is overtaken by a flush sent after it.
    member.read_delay_ms.store(300, Ordering::Relaxed);
    let slow = c.send(CMD_READ, 0, 0, 4096, &[]).await;
    let fast = c.send(CMD_FLUSH, 0, 0, 0, &[]).await;
    assert_eq!(c.reply().await.handle, fast);
    let r = c.reply().await;
    assert_eq!(r.handle, slow);
    assert_eq!(r.data, pattern(4096, 0));
}

// ---- Disconnect and shutdown --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_finishes_in_flight_requests_first() {
    let (array, member) = knobbed("k", true).await;
    let f = Fixture::one("k", array).await;
    let mut c = Raw::connect(&f.sock, "k", true).await;
    assert_eq!(c.write(0, &[0x42; 4096]).await, 0);
    member.read_delay_ms.store(300, Ordering::Relaxed);
    let h = c.send(CMD_READ, 0, 0, 4096, &[]).await;
    let w = c.send(CMD_WRITE, 0, 8192, 512, &[0x43; 512]).await;
    c.send(CMD_DISC, 0, 0, 0, &[]).await;
    c.pending.retain(|k, _| *k == h || *k == w);
    let mut got = [c.reply().await, c.reply().await];
    got.sort_by_key(|r| r.handle);
    assert_eq!(got[0].data, [0x42; 4096]);
    assert_eq!(got[1].error, 0);
    assert!(c.closed_by_server().await);
    member.read_delay_ms.store(0, Ordering::Relaxed);
    let mut d = Raw::connect(&f.sock, "k", false).await;
    assert_eq!(d.read(8192, 512).await, [0x43; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_closes() {
    let (array, member) = knobbed("k", true).await;
    let f = Fixture::one("k", array).await;
    let mut c = Raw::connect(&f.sock, "k", true).await;
    assert_eq!(c.write(0, &[0x61; 4096]).await, 0);
    let mut idle = Raw::hello(&f.sock).await; // still negotiating
    assert_eq!(f.server.connections(), 2);
    member.read_delay_ms.store(400, Ordering::Relaxed);
    let h = c.send(CMD_READ, 0, 0, 4096, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    f.server.shutdown(Duration::from_secs(10)).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "drained promptly");
    assert_eq!(f.server.connections(), 0);
    let r = c.reply().await;
    assert_eq!(
        (r.handle, r.data),
        (h, vec![0x61; 4096]),
        "the in-flight read was answered"
    );
    assert!(c.closed_by_server().await);
    assert!(idle.closed_by_server().await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!f.sock.exists(), "the accept loop removed its socket");
    assert!(UnixStream::connect(&f.sock).await.is_err());
    assert!(tokio::net::TcpStream::connect(&f.tcp).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_forces_stuck_connections_closed() {
    let (array, member) = knobbed("k", true).await;
    let f = Fixture::one("k", array).await;
    let mut c = Raw::connect(&f.sock, "k", true).await;
    member.read_delay_ms.store(3000, Ordering::Relaxed);
    c.send(CMD_READ, 0, 0, 4096, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    f.server.shutdown(Duration::from_millis(200)).await;
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "bounded by the timeout"
    );
    assert_eq!(f.server.connections(), 0);
    assert!(c.closed_by_server().await);
}

// ---- Listeners ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_errors_and_stale_sockets() {
    let array = raid1("d0").await;
    let export = || {
        vec![Export {
            name: "d0".into(),
            description: String::new(),
            array: array.clone(),
        }]
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let addr = format!("unix:{}", sock.display());
    // A stale socket file (nothing listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let a = NbdServer::new(export());
    a.listen(&addr).await.expect("stale socket replaced");
    let mut c = Raw::connect(&sock, "d0", false).await;
    assert_eq!(c.read(0, 512).await.len(), 512);
    // A live one is not.
    let b = NbdServer::new(export());
    let e = b.listen(&addr).await.unwrap_err().to_string();
    assert!(e.contains("address in use") && e.contains(&addr), "{e}");
    // Nor is a file that is not a socket.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let e = b
        .listen(&format!("unix:{}", file.display()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert!(file.exists());
    // TCP port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = b
        .listen(&format!("127.0.0.1:{port}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("address in use") && e.contains(&port.to_string()),
        "{e}"
    );
    // Nonsense.
    let e = b.listen("localhost-ish").await.unwrap_err().to_string();
    assert!(e.contains("neither HOST:PORT"), "{e}");
    // IPv6 loopback, where available.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let (_, bound) = b.listen_with_addr("[::1]:0").await.unwrap();
        assert!(bound.starts_with("[::1]:"), "{bound}");
    }
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

/// The 1 MiB buffer class of the array's pool: (free, total).
fn mib_class(a: &ArrayRef) -> (usize, usize) {
    let (_, free, total) = a
        .pool()
        .usage()
        .into_iter()
        .find(|&(cap, _, _)| cap >= 1 << 20)
        .expect("a class for 1 MiB requests");
    (free, total)
}

/// A client that pipelines 1 MiB reads and never reads a reply holds at most its share of
/// the pool's 1 MiB buffers: another client's 1 MiB writes and reads go on meanwhile.
/// (Without the share, the stuck client's replies held every such buffer and the other
/// client waited for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_starves_no_other_client() {
    let f = Fixture::one("h0", raid1("h0").await).await;
    let (_, total) = mib_class(&f.array);
    let mut hog = Raw::connect(&f.sock, "h0", true).await;
    for i in 0..(2 * total as u64) {
        hog.send(CMD_READ, 0, (i % 48) << 20, 1 << 20, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (free, _) = mib_class(&f.array);
    assert!(
        free >= total - total / 4,
        "the stuck client holds {} of {total} 1 MiB buffers",
        total - free
    );
    let mut good = Raw::connect(&f.sock, "h0", true).await;
    let work = async {
        for k in 0..8u64 {
            let data = pattern(1 << 20, k as u8);
            assert_eq!(good.write((50 + k) << 20, &data).await, 0);
            assert_eq!(good.read((50 + k) << 20, 1 << 20).await, data);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("another client's 1 MiB I/O waited behind a client that does not read");
    drop(hog);
}

/// A client that reads none of its replies for the stall limit is disconnected and every
/// buffer its replies held goes back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_off_and_its_buffers_return() {
    let exports = vec![Export {
        name: "h1".into(),
        description: "stall test".into(),
        array: raid1("h1").await,
    }];
    let f = Fixture::start_with_stall(exports, Duration::from_secs(1)).await;
    let (_, total) = mib_class(&f.array);
    let mut hog = Raw::connect(&f.sock, "h1", true).await;
    let sent = 40u64;
    for i in 0..sent {
        hog.send(CMD_READ, 0, i << 20, 1 << 20, &[]).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Drain: whatever was written before the stall, then end of stream.
    let mut got = 0u64;
    let mut chunk = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(T, async {
        loop {
            match hog.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n as u64,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection was never closed");
    assert!(
        got < sent << 20,
        "all {sent} replies arrived ({got} bytes): the connection was not cut off"
    );
    let t0 = std::time::Instant::now();
    while mib_class(&f.array).0 != total {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "1 MiB buffers still held after the cut-off: {:?}",
            mib_class(&f.array)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
