//! The `uniblk` command line end to end: `up` (layout errors, the built-in default array,
//! signals), `create`, `status` and `member fail`, against real daemons started with
//! `uniblk up`, real member files and qemu-io as the NBD client.
//!
//! Every error case asserts a non-zero exit and that stderr names the thing at fault and
//! what to do about it.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fixtures::{free_port, qemu_io_ok, run_bounded, sparse_file, Daemon, Foreground, Listen, Tmp};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Every member reserves its first MiB for metadata; array data starts there.
const DATA_OFFSET: u64 = MIB;
/// Byte offset of the superblock, and of the array name inside it.
const SB_OFFSET: u64 = 4096;
const SB_NAME_AT: u64 = SB_OFFSET + 48;
/// How long a refused `uniblk up` may take to exit: it must never hang.
const REFUSE_LIMIT: Duration = Duration::from_secs(20);
/// Upper bound for any one CLI invocation.
const CLI_LIMIT: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_uniblk"))
}

/// Runs `uniblk ARGS`, bounded in time.
fn uniblk(args: &[&str]) -> Output {
    run_bounded(Command::new(bin()).args(args), CLI_LIMIT)
        .unwrap_or_else(|e| panic!("uniblk {args:?}: {e:#}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts `uniblk ARGS` succeeded; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = uniblk(args);
    assert!(
        out.status.success(),
        "uniblk {args:?} failed ({}):\nstderr: {}\nstdout: {}",
        out.status,
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// Asserts `uniblk ARGS` failed (non-zero, no panic); returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = uniblk(args);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "uniblk {args:?} should have failed but exited {}:\nstdout: {}\nstderr: {err}",
        out.status,
        text(&out.stdout)
    );
    assert!(
        !err.contains("panicked"),
        "uniblk {args:?} panicked:\n{err}"
    );
    err
}

/// Asserts `haystack` contains every needle, quoting it on failure.
#[track_caller]
fn assert_has(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            haystack.contains(n),
            "expected {n:?} in the message:\n{haystack}"
        );
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A sparse member file of `size` bytes; returns its `file:` address.
fn member(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    sparse_file(&p, size).unwrap();
    format!("file:{}", p.display())
}

fn path_of(addr: &str) -> PathBuf {
    PathBuf::from(addr.strip_prefix("file:").expect("a file: address"))
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    b
}

/// Bytes 4096..4104: the superblock magic.
fn sb_magic(path: &Path) -> Vec<u8> {
    read_at(path, SB_OFFSET, 8)
}

/// The array name recorded in a member's superblock.
fn sb_array(path: &Path) -> String {
    assert_eq!(
        sb_magic(path),
        b"UNIBLKSB",
        "{} carries no superblock",
        path.display()
    );
    let raw = read_at(path, SB_NAME_AT, 64);
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The array UUID recorded in a member's superblock, as 32 lowercase hex digits.
fn sb_uuid_hex(path: &Path) -> String {
    read_at(path, SB_OFFSET + 16, 16)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex(uuid: &str) -> String {
    uuid.replace('-', "").to_ascii_lowercase()
}

/// A layout with one array and optional NBD listen addresses.
fn layout(name: &str, level: &str, members: &[&str], listen: &[&str]) -> String {
    let q = |v: &[&str]| {
        v.iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut t = format!(
        "[[array]]\nname = \"{name}\"\nlevel = \"{level}\"\nmembers = [{}]\n",
        q(members)
    );
    if !listen.is_empty() {
        t += &format!("export.nbd = {{ listen = [{}] }}\n", q(listen));
    }
    t
}

/// `uniblk up --config LAYOUT --mgmt-socket ...` as a fixture daemon.
fn start(layout_toml: &str, extra: &[&str]) -> Daemon {
    Daemon::start_with_prefix(bin(), &["up"], layout_toml, extra)
        .unwrap_or_else(|e| panic!("uniblk up did not come up: {e:#}"))
}

fn status_json(sock: &Path) -> Value {
    let out = ok(&["status", "--json", "--socket", &s(sock)]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

fn array<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["arrays"]
        .as_array()
        .expect("status has an arrays list")
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("array {name} missing from status:\n{st:#}"))
}

fn nbd_uri(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs `uniblk up --config LAYOUT` (LAYOUT written under `dir`) and asserts it is refused:
/// non-zero exit within [`REFUSE_LIMIT`], no panic, and no management socket left behind.
/// Returns stderr.
fn up_refused(dir: &Path, layout_toml: &str, extra: &[&str]) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let config = dir.join(format!("bad-{n}.toml"));
    fs::write(&config, layout_toml).unwrap();
    let sock = dir.join(format!("run-{n}/mgmt.sock"));
    let began = Instant::now();
    let out = run_bounded(
        Command::new(bin())
            .args(["up", "--config", &s(&config), "--mgmt-socket", &s(&sock)])
            .args(extra),
        REFUSE_LIMIT,
    )
    .unwrap_or_else(|e| panic!("uniblk up with a bad layout did not exit promptly: {e:#}"));
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "uniblk up should refuse this layout but exited {}:\n{layout_toml}\nstdout: {}\nstderr: {err}",
        out.status,
        text(&out.stdout)
    );
    assert!(!err.contains("panicked"), "uniblk up panicked:\n{err}");
    assert!(
        began.elapsed() < REFUSE_LIMIT,
        "refusal took {:?}",
        began.elapsed()
    );
    assert!(
        !sock.exists(),
        "a refused uniblk up left its management socket {} behind",
        sock.display()
    );
    err
}

fn has_qemu_io() -> bool {
    fixtures::require("qemu-io")
}

// ---------------------------------------------------------------------------------------
// 1. Layout errors at `uniblk up`
// ---------------------------------------------------------------------------------------

#[test]
fn up_refuses_missing_member_file() {
    let t = Tmp::new().unwrap();
    let present = member(t.path(), "present.img", 64 * MIB);
    let missing = t.join("missing.img");
    let missing_addr = format!("file:{}", missing.display());
    let err = up_refused(
        t.path(),
        &layout("d0", "raid1", &[&present, &missing_addr], &[]),
        &[],
    );
    assert_has(
        &err,
        &[&s(&missing), "No such file", "create it", "truncate -s"],
    );
    assert!(
        !missing.exists(),
        "up must not create a missing member itself"
    );
    assert_ne!(
        sb_magic(&path_of(&present)),
        b"UNIBLKSB",
        "a refused array must not initialise its other members"
    );
}

#[test]
fn up_refuses_member_too_small() {
    let t = Tmp::new().unwrap();
    let small = member(t.path(), "small.img", MIB);
    let big = member(t.path(), "big.img", 64 * MIB);
    let err = up_refused(t.path(), &layout("d0", "raid1", &[&small, &big], &[]), &[]);
    // Its size, the size it needs, and which array needs it.
    assert_has(
        &err,
        &[
            &small,
            "1048576 bytes",
            "at least 2097152 bytes",
            "array d0",
        ],
    );
}

#[test]
fn up_refuses_duplicate_member_same_path_and_via_symlink() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    let err = up_refused(t.path(), &layout("d0", "raid1", &[&a, &a], &[]), &[]);
    assert_has(&err, &[&a, "twice in array d0", "used once"]);

    // The same file through a symlink is the same member.
    let link = t.join("link.img");
    std::os::unix::fs::symlink(path_of(&a), &link).unwrap();
    let via_link = format!("file:{}", link.display());
    let err = up_refused(t.path(), &layout("d0", "raid1", &[&via_link, &a], &[]), &[]);
    assert_has(&err, &["twice in array d0", "used once"]);
    assert!(
        err.contains(&a) || err.contains(&via_link),
        "the message must name the duplicated member:\n{err}"
    );

    // ... and so is one file shared by two arrays.
    let b = member(t.path(), "b.img", 64 * MIB);
    let c = member(t.path(), "c.img", 64 * MIB);
    let two = format!(
        "{}{}",
        layout("d0", "raid1", &[&a, &b], &[]),
        layout("d1", "raid1", &[&c, &via_link], &[])
    );
    let err = up_refused(t.path(), &two, &[]);
    assert_has(&err, &["in arrays d0 and d1", "used once"]);
    assert_ne!(sb_magic(&path_of(&a)), b"UNIBLKSB");
}

#[test]
fn up_refuses_wrong_member_count_for_level() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    for level in ["raid1", "raid10", "raid0"] {
        let err = up_refused(t.path(), &layout("d0", level, &[&a], &[]), &[]);
        assert_has(
            &err,
            &[
                "array d0",
                &format!("{level} needs at least 2 members"),
                "the layout names 1",
            ],
        );
    }
    let err = up_refused(t.path(), &layout("d0", "linear", &[], &[]), &[]);
    assert_has(
        &err,
        &["array d0", "linear needs at least 1 members", "names 0"],
    );
}

#[test]
fn up_refuses_unknown_level_and_bad_chunk() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    let b = member(t.path(), "b.img", 64 * MIB);
    let err = up_refused(t.path(), &layout("d0", "raid7", &[&a, &b], &[]), &[]);
    assert_has(
        &err,
        &[
            "array d0",
            "unknown level 'raid7'",
            "linear, raid0, raid1 or raid10",
        ],
    );

    let chunked = |chunk: &str| {
        format!(
            "[[array]]\nname = \"d0\"\nlevel = \"raid0\"\nchunk = \"{chunk}\"\nmembers = [\"{a}\", \"{b}\"]\n"
        )
    };
    let err = up_refused(t.path(), &chunked("3KiB"), &[]);
    assert_has(
        &err,
        &["array d0", "chunk 3072 bytes", "power of two", "64KiB"],
    );
    let err = up_refused(t.path(), &chunked("2GiB"), &[]);
    assert_has(&err, &["array d0", "chunk", "from 4KiB to 1GiB"]);
    let err = up_refused(t.path(), &chunked("lots"), &[]);
    assert_has(&err, &["array d0", "chunk", "'lots'", "64KiB"]);
    assert_ne!(sb_magic(&path_of(&a)), b"UNIBLKSB");
}

#[test]
fn up_refuses_unknown_field_and_malformed_toml() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    let b = member(t.path(), "b.img", 64 * MIB);
    let typo =
        format!("[[array]]\nname = \"d0\"\nlevle = \"raid1\"\nmembers = [\"{a}\", \"{b}\"]\n");
    let err = up_refused(t.path(), &typo, &[]);
    // The file, the line, the misspelt key and the keys that are allowed.
    assert_has(
        &err,
        &[
            "layout file",
            ".toml",
            "line 3",
            "unknown field `levle`",
            "expected one of",
            "`level`",
        ],
    );

    let export_typo = format!(
        "{}export.nbd = {{ lisen = [\"127.0.0.1:1\"] }}\n",
        layout("d0", "raid1", &[&a, &b], &[])
    );
    let err = up_refused(t.path(), &export_typo, &[]);
    assert_has(&err, &["unknown field `lisen`", "`listen`"]);

    let err = up_refused(t.path(), "[[array]\nname = \"d0\"\n", &[]);
    assert_has(
        &err,
        &["layout file", ".toml", "TOML parse error", "line 1"],
    );

    let err = up_refused(t.path(), "", &[]);
    assert_has(&err, &["no arrays defined", "[[array]]"]);

    let err = up_refused(
        t.path(),
        &layout("d0", "raid1", &[&a, &b], &["nowhere"]),
        &[],
    );
    assert_has(&err, &["'nowhere'", "HOST:PORT", "unix:/path"]);
}

#[test]
fn up_refuses_foreign_superblock_unless_forced() {
    let t = Tmp::new().unwrap();
    let x = t.join("x.img");
    let y = t.join("y.img");
    let (xa, ya) = (
        format!("file:{}", x.display()),
        format!("file:{}", y.display()),
    );
    let la = t.join("a.toml");
    let created: Value = serde_json::from_str(&ok(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &xa,
        "-m",
        &ya,
        "--size",
        "64MiB",
        "--layout",
        &s(&la),
        "--json",
    ]))
    .unwrap();
    let a_uuid = created["uuid"].as_str().unwrap().to_string();
    assert_eq!(sb_array(&x), "A");

    let w = member(t.path(), "w.img", 64 * MIB);
    let lb = layout("B", "raid1", &[&xa, &w], &[]);
    let err = up_refused(t.path(), &lb, &[]);
    assert_has(
        &err,
        &[&xa, "carries array 'A'", &a_uuid, "array 'B'", "--force"],
    );
    assert_eq!(
        sb_array(&x),
        "A",
        "a refused start must leave X's superblock alone"
    );
    assert_ne!(
        sb_magic(&path_of(&w)),
        b"UNIBLKSB",
        "nor initialise the blank member"
    );

    // Forced: it starts, and X now carries B.
    if !has_qemu_io() {
        return;
    }
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut d = start(&layout("B", "raid1", &[&xa, &w], &[&listen]), &["--force"]);
    let st = status_json(d.mgmt_socket());
    let b = array(&st, "B");
    assert_eq!(b["state"], "optimal", "{b:#}");
    let b_uuid = b["uuid"].as_str().unwrap().to_string();
    assert_ne!(b_uuid, a_uuid);
    qemu_io_ok(
        &nbd_uri(port, "B"),
        &["write -P 0x3c 0 1M", "read -P 0x3c 0 1M"],
    )
    .unwrap();
    assert!(d.stop().unwrap().success(), "{}", d.log());
    for p in [&x, &path_of(&w)] {
        assert_eq!(sb_array(p), "B", "{} after --force", p.display());
        assert_eq!(sb_uuid_hex(p), hex(&b_uuid));
    }
    assert_eq!(sb_array(&y), "A", "the member not named in B is untouched");
}

#[test]
fn up_refuses_reordered_members() {
    let t = Tmp::new().unwrap();
    let x = format!("file:{}", t.join("x.img").display());
    let y = format!("file:{}", t.join("y.img").display());
    let created: Value = serde_json::from_str(&ok(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &x,
        "-m",
        &y,
        "--size",
        "64MiB",
        "--layout",
        &s(&t.join("a.toml")),
        "--json",
    ]))
    .unwrap();
    let uuid = created["uuid"].as_str().unwrap().to_string();

    let err = up_refused(t.path(), &layout("A", "raid1", &[&y, &x], &[]), &[]);
    assert_has(
        &err,
        &[
            &y,
            "carries array 'A'",
            "member #1",
            "the layout says",
            "member #0",
            "fix the layout",
        ],
    );

    // The refusal changed nothing: the right order still assembles the same array.
    let d = start(&layout("A", "raid1", &[&x, &y], &[]), &[]);
    let st = status_json(d.mgmt_socket());
    let a = array(&st, "A");
    assert_eq!(a["uuid"], uuid.as_str());
    assert_eq!(a["state"], "optimal");
}

#[test]
fn reordered_members_can_be_recreated_with_force() {
    let t = Tmp::new().unwrap();
    let x = format!("file:{}", t.join("x.img").display());
    let y = format!("file:{}", t.join("y.img").display());
    ok(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &x,
        "-m",
        &y,
        "--size",
        "64MiB",
        "--layout",
        &s(&t.join("a.toml")),
    ]);
    // The advice in the refusal: "re-create the array with --force, destroying its data".
    ok(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &y,
        "-m",
        &x,
        "--layout",
        &s(&t.join("b.toml")),
        "--force",
    ]);
}

#[test]
fn second_daemon_on_same_mgmt_socket_is_refused() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    let b = member(t.path(), "b.img", 64 * MIB);
    let d = start(&layout("one", "raid1", &[&a, &b], &[]), &[]);

    let c = member(t.path(), "c.img", 64 * MIB);
    let e = member(t.path(), "e.img", 64 * MIB);
    let port = free_port().unwrap();
    let config = t.join("two.toml");
    fs::write(
        &config,
        layout("two", "raid1", &[&c, &e], &[&format!("127.0.0.1:{port}")]),
    )
    .unwrap();
    let began = Instant::now();
    let out = run_bounded(
        Command::new(bin()).args([
            "up",
            "--config",
            &s(&config),
            "--mgmt-socket",
            &s(d.mgmt_socket()),
        ]),
        REFUSE_LIMIT,
    )
    .expect("the second daemon must exit promptly");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "second daemon started:\n{err}");
    assert!(began.elapsed() < REFUSE_LIMIT);
    assert_has(
        &err,
        &[
            &s(d.mgmt_socket()),
            "another ublkd is running",
            "--mgmt-socket",
        ],
    );
    // Refused before touching anything: its members stay blank, its port free, and the
    // first daemon keeps its socket.
    assert_ne!(sb_magic(&path_of(&c)), b"UNIBLKSB");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "the refused daemon's NBD port is still bound"
    );
    let st = status_json(d.mgmt_socket());
    assert_eq!(st["daemon"]["pid"], d.pid().unwrap());
    assert_eq!(array(&st, "one")["state"], "optimal");
}

// ---------------------------------------------------------------------------------------
// 2. uniblk create
// ---------------------------------------------------------------------------------------

#[test]
fn create_initialises_members_and_writes_a_runnable_layout() {
    if !has_qemu_io() {
        return;
    }
    let t = Tmp::new().unwrap();
    let dir = t.join("images"); // created by `create`
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let (aa, ba) = (
        format!("file:{}", a.display()),
        format!("file:{}", b.display()),
    );
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let l = t.join("L.toml");
    let out = ok(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &aa,
        "-m",
        &ba,
        "--size",
        "64MiB",
        "--listen",
        &listen,
        "--layout",
        &s(&l),
        "--json",
    ]);
    let j: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let uuid = j["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(uuid.len(), 36, "uuid {uuid}");
    assert_eq!(j["size"], 64 * MIB - DATA_OFFSET, "{j:#}");
    assert_eq!(j["name"], "A");
    assert_eq!(j["level"], "raid1");
    for p in [&a, &b] {
        let md = fs::metadata(p).unwrap_or_else(|e| panic!("{} not created: {e}", p.display()));
        assert_eq!(md.len(), 64 * MIB, "{}", p.display());
        assert!(md.blocks() * 512 < 8 * MIB, "{} is not sparse", p.display());
        assert_eq!(sb_magic(p), b"UNIBLKSB", "{}", p.display());
        assert_eq!(sb_array(p), "A");
        assert_eq!(sb_uuid_hex(p), hex(&uuid));
    }
    let text1 = fs::read_to_string(&l).unwrap();
    assert_has(&text1, &["name = \"A\"", "raid1", &aa, &ba, &listen]);

    // A second array appends to the same layout (human output this time).
    let (c, e) = (t.join("c.img"), t.join("e.img"));
    let (ca, ea) = (
        format!("file:{}", c.display()),
        format!("file:{}", e.display()),
    );
    let out = ok(&[
        "create",
        "B",
        "--level",
        "raid10",
        "--chunk",
        "128KiB",
        "-m",
        &ca,
        "-m",
        &ea,
        "--size",
        "64MiB",
        "--layout",
        &s(&l),
    ]);
    assert_has(
        &out,
        &["created array B", "raid10", &s(&l), "uniblk up --config"],
    );
    let text2 = fs::read_to_string(&l).unwrap();
    assert_has(&text2, &["name = \"A\"", "name = \"B\"", &aa, &ca, &listen]);
    assert_eq!(sb_array(&c), "B");

    // `uniblk up --config L.toml` runs both, assembling A from its superblocks.
    let d = start(&text2, &[]);
    let st = status_json(d.mgmt_socket());
    let sa = array(&st, "A");
    assert_eq!(
        sa["uuid"],
        uuid.as_str(),
        "A was re-initialised instead of assembled"
    );
    assert_eq!(sa["state"], "optimal");
    assert_eq!(sa["size"], 64 * MIB - DATA_OFFSET);
    let sb = array(&st, "B");
    assert_eq!(sb["level"], "raid10");
    assert_eq!(sb["chunk"], 128 << 10);
    assert_eq!(sb["uuid"].as_str().map(hex), Some(sb_uuid_hex(&c)));
    qemu_io_ok(
        &nbd_uri(port, "A"),
        &["write -P 0x11 0 2M", "read -P 0x11 0 2M"],
    )
    .unwrap();
    // The data lands after the metadata area of both mirrors.
    drop(d);
    for p in [&a, &b] {
        assert!(
            read_at(p, DATA_OFFSET, 2 * MIB as usize)
                .iter()
                .all(|&x| x == 0x11),
            "{} does not hold the data written through the export",
            p.display()
        );
    }
}

#[test]
fn create_refuses_duplicate_name_and_foreign_members() {
    let t = Tmp::new().unwrap();
    let l = t.join("L.toml");
    let a = format!("file:{}", t.join("a.img").display());
    let b = format!("file:{}", t.join("b.img").display());
    ok(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &a,
        "-m",
        &b,
        "--size",
        "64MiB",
        "--layout",
        &s(&l),
    ]);
    let before = fs::read_to_string(&l).unwrap();

    // The same name again, over new members.
    let c = t.join("c.img");
    let e = t.join("e.img");
    let ca = format!("file:{}", c.display());
    let ea = format!("file:{}", e.display());
    let err = fails(&[
        "create",
        "A",
        "--level",
        "raid1",
        "-m",
        &ca,
        "-m",
        &ea,
        "--size",
        "64MiB",
        "--layout",
        &s(&l),
    ]);
    assert_has(
        &err,
        &[
            &s(&l),
            "already has an array named 'A'",
            "pick another name",
        ],
    );
    assert!(
        !c.exists() && !e.exists(),
        "a refused create made member files"
    );
    assert_eq!(
        fs::read_to_string(&l).unwrap(),
        before,
        "a refused create changed the layout"
    );

    // Members that carry another array's superblock, in another layout file.
    let l2 = t.join("L2.toml");
    let err = fails(&[
        "create",
        "C",
        "--level",
        "raid1",
        "-m",
        &a,
        "-m",
        &ca,
        "--size",
        "64MiB",
        "--layout",
        &s(&l2),
    ]);
    assert_has(&err, &[&a, "carries array 'A'", "array 'C'", "--force"]);
    assert!(!l2.exists(), "a refused create wrote a layout");
    assert!(!c.exists(), "a refused create left the member file it made");
    assert_eq!(sb_array(&path_of(&a)), "A");

    // Forced, it takes the member over.
    ok(&[
        "create",
        "C",
        "--level",
        "raid1",
        "-m",
        &a,
        "-m",
        &ca,
        "--size",
        "64MiB",
        "--layout",
        &s(&l2),
        "--force",
    ]);
    assert_eq!(sb_array(&path_of(&a)), "C");
    assert_eq!(sb_array(&c), "C");
    assert_eq!(sb_uuid_hex(&path_of(&a)), sb_uuid_hex(&c));
}

// ---------------------------------------------------------------------------------------
// 3. uniblk status
// ---------------------------------------------------------------------------------------

#[test]
fn status_reports_arrays_exports_and_members() {
    if !has_qemu_io() {
        return;
    }
    let t = Tmp::new().unwrap();
    let x = member(t.path(), "x.img", 64 * MIB);
    let y = member(t.path(), "y.img", 64 * MIB);
    let v = member(t.path(), "v.img", 64 * MIB);
    let w = member(t.path(), "w.img", 64 * MIB);
    let (p1, p2) = (free_port().unwrap(), free_port().unwrap());
    let (l1, l2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let unix = "unix:@DIR@/A.sock";
    let toml = format!(
        "{}{}",
        layout("A", "raid1", &[&x, &y], &[&l1, unix]),
        format_args!(
            "[[array]]\nname = \"B\"\nlevel = \"raid10\"\nchunk = \"128KiB\"\nmembers = [\"{v}\", \"{w}\"]\nexport.nbd = {{ listen = [\"{l2}\"] }}\n"
        )
    );
    let d = start(&toml, &[]);
    let unix_path = d.dir().join("A.sock");

    let mode = fs::metadata(d.mgmt_socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "management socket mode is {mode:o}");

    let st0 = status_json(d.mgmt_socket());
    assert_eq!(st0["daemon"]["pid"], d.pid().unwrap());
    assert!(st0["daemon"]["version"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    assert_eq!(st0["arrays"].as_array().unwrap().len(), 2);
    for (name, level, chunk, members, listens) in [
        (
            "A",
            "raid1",
            0,
            [&x, &y],
            vec![l1.clone(), format!("unix:{}", unix_path.display())],
        ),
        ("B", "raid10", 128 << 10, [&v, &w], vec![l2.clone()]),
    ] {
        let a = array(&st0, name);
        assert_eq!(a["level"], level, "{a:#}");
        assert_eq!(a["chunk"], chunk, "{a:#}");
        assert_eq!(a["state"], "optimal", "{a:#}");
        let size = a["size"].as_u64().unwrap();
        assert!(size > 0 && size <= 64 * MIB - DATA_OFFSET, "{a:#}");
        let bs = a["block_size"].as_u64().unwrap();
        assert!(bs.is_power_of_two() && (512..=4096).contains(&bs), "{a:#}");
        assert_eq!(size % bs, 0);
        assert!(a["uuid"].as_str().is_some_and(|u| u.len() == 36), "{a:#}");
        assert_eq!(a["queue"]["policy"], "fifo", "{a:#}");
        assert_eq!(a["queue"]["depth"], 256, "{a:#}");
        let mut got: Vec<String> = a["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["kind"], "nbd", "{e:#}");
                assert_eq!(e["name"], name, "{e:#}");
                e["listen"].as_str().unwrap().to_string()
            })
            .collect();
        let mut want = listens.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{a:#}");
        let ms = a["members"].as_array().unwrap();
        assert_eq!(ms.len(), 2);
        for (i, (m, addr)) in ms.iter().zip(members).enumerate() {
            assert_eq!(m["index"], i, "{m:#}");
            assert_eq!(m["address"], addr.as_str(), "{m:#}");
            assert_eq!(m["locality"], "local", "{m:#}");
            assert_eq!(m["protocol"], "file", "{m:#}");
            assert!(
                matches!(m["engine"].as_str(), Some("io_uring" | "pread")),
                "{m:#}"
            );
            assert_eq!(m["size"], 64 * MIB, "{m:#}");
            assert_eq!(m["state"], "healthy", "{m:#}");
            assert!(m.get("fault").is_none_or(Value::is_null), "{m:#}");
            assert_eq!(m["errors"], 0, "{m:#}");
        }
    }
    assert_eq!(array(&st0, "A")["size"], 64 * MIB - DATA_OFFSET);

    // I/O through both of A's exports moves its members' counters.
    qemu_io_ok(
        &nbd_uri(p1, "A"),
        &["write -P 0x42 0 1M", "read -P 0x42 0 1M"],
    )
    .unwrap();
    qemu_io_ok(
        &format!("nbd+unix:///A?socket={}", unix_path.display()),
        &["read -P 0x42 0 1M", "write -P 0x43 1M 1M"],
    )
    .unwrap();
    let st1 = status_json(d.mgmt_socket());
    let (m0, m1) = (&array(&st0, "A")["members"], &array(&st1, "A")["members"]);
    for i in 0..2 {
        let c0 = m0[i]["completed"].as_u64().unwrap();
        let c1 = m1[i]["completed"].as_u64().unwrap();
        assert!(c1 > c0, "member {i}: completed {c0} -> {c1}");
        let w0 = m0[i]["bytes_written"].as_u64().unwrap();
        let w1 = m1[i]["bytes_written"].as_u64().unwrap();
        assert!(w1 >= w0 + 2 * MIB, "member {i}: bytes_written {w0} -> {w1}");
        assert_eq!(m1[i]["in_flight"], 0);
    }
    let reads: u64 = (0..2).map(|i| m1[i]["bytes_read"].as_u64().unwrap()).sum();
    assert!(reads >= 2 * MIB, "2 MiB read, members report {reads} bytes");

    // The human table names every array and member.
    let human = ok(&["status", "--socket", &s(d.mgmt_socket())]);
    assert_has(
        &human,
        &[
            "array A", "array B", "optimal", "raid1", "raid10", &x, &y, &v, &w, &l1, &l2, "healthy",
        ],
    );

    // $UNIBLK_SOCKET stands in for --socket.
    let out = run_bounded(
        Command::new(bin())
            .args(["status", "--json"])
            .env("UNIBLK_SOCKET", d.mgmt_socket()),
        CLI_LIMIT,
    )
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st2: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st2["daemon"]["pid"], d.pid().unwrap());
}

#[test]
fn status_without_daemon_says_how_to_start_it() {
    let t = Tmp::new().unwrap();
    let sock = t.join("ublkd.sock");
    let err = fails(&["status", "--socket", &s(&sock)]);
    assert_has(
        &err,
        &[
            "cannot reach ublkd",
            &s(&sock),
            "is it running",
            "uniblk up",
        ],
    );
    let err = fails(&["status", "--json", "--socket", &s(&sock)]);
    assert_has(&err, &["cannot reach ublkd", "uniblk up"]);

    // A stale socket file from a dead daemon: same answer, promptly.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let began = Instant::now();
    let err = fails(&["status", "--socket", &s(&sock)]);
    assert_has(&err, &["cannot reach ublkd", &s(&sock), "uniblk up"]);
    assert!(began.elapsed() < Duration::from_secs(10));

    // The default socket comes from $UNIBLK_SOCKET, and the message names it.
    let env_sock = t.join("env.sock");
    let out = run_bounded(
        Command::new(bin())
            .args(["member", "fail", "A", "0"])
            .env("UNIBLK_SOCKET", &env_sock),
        CLI_LIMIT,
    )
    .unwrap();
    assert!(!out.status.success());
    assert_has(
        &text(&out.stderr),
        &["cannot reach ublkd", &s(&env_sock), "uniblk up"],
    );
}

// ---------------------------------------------------------------------------------------
// 4. uniblk member fail
// ---------------------------------------------------------------------------------------

#[test]
fn member_fail_keeps_mirror_serving_and_is_stale_after_restart() {
    if !has_qemu_io() {
        return;
    }
    let t = Tmp::new().unwrap();
    let x = member(t.path(), "x.img", 64 * MIB);
    let y = member(t.path(), "y.img", 64 * MIB);
    let port = free_port().unwrap();
    let uri = nbd_uri(port, "A");
    let mut d = start(
        &layout("A", "raid1", &[&x, &y], &[&format!("127.0.0.1:{port}")]),
        &[],
    );
    let sock = s(d.mgmt_socket());
    qemu_io_ok(&uri, &["write -P 0x5a 0 1M"]).unwrap();

    let out = ok(&["member", "fail", "A", "1", "--socket", &sock]);
    assert_has(&out, &["member 1", "A", "faulty"]);
    let st = status_json(d.mgmt_socket());
    let a = array(&st, "A");
    assert_eq!(a["state"], "degraded", "{a:#}");
    assert_eq!(a["members"][0]["state"], "healthy", "{a:#}");
    assert_eq!(a["members"][1]["state"], "faulty", "{a:#}");
    let fault = a["members"][1]["fault"].as_str().unwrap_or_default();
    assert!(fault.contains("operator"), "fault reason: {fault:?}");
    let human = ok(&["status", "--socket", &sock]);
    assert_has(&human, &["faulty", "fault: failed by operator", &y]);

    // Failing it again is refused, by name.
    let err = fails(&["member", "fail", "A", "1", "--socket", &sock]);
    assert_has(&err, &["member 1", "array A", "already out of service"]);

    // The mirror carries on: new writes and old data both read back.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x5b 4M 1M",
            "read -P 0x5b 4M 1M",
            "read -P 0x5a 0 1M",
        ],
    )
    .unwrap();
    let (xp, yp) = (path_of(&x), path_of(&y));
    assert!(
        read_at(&xp, DATA_OFFSET + 4 * MIB, MIB as usize)
            .iter()
            .all(|&b| b == 0x5b),
        "the healthy member does not hold the data written while degraded"
    );
    assert!(
        read_at(&yp, DATA_OFFSET + 4 * MIB, MIB as usize)
            .iter()
            .all(|&b| b == 0),
        "the faulty member was written to"
    );
    assert!(
        read_at(&yp, DATA_OFFSET, MIB as usize)
            .iter()
            .all(|&b| b == 0x5a),
        "data written before the failure should be on both members"
    );

    // A clean stop and a new start: member 1 missed writes, so it stays out as stale.
    let status = d.stop().unwrap();
    assert!(status.success(), "SIGTERM exit {status}; log:\n{}", d.log());
    d.restart().unwrap();
    let st = status_json(d.mgmt_socket());
    let a = array(&st, "A");
    assert_eq!(a["state"], "degraded", "{a:#}");
    assert_eq!(a["members"][0]["state"], "healthy", "{a:#}");
    assert_eq!(a["members"][1]["state"], "faulty", "{a:#}");
    let fault = a["members"][1]["fault"].as_str().unwrap_or_default();
    assert!(
        fault.contains("stale"),
        "fault reason after restart: {fault:?}"
    );
    qemu_io_ok(&uri, &["read -P 0x5a 0 1M", "read -P 0x5b 4M 1M"]).unwrap();
    assert!(
        read_at(&yp, DATA_OFFSET + 4 * MIB, MIB as usize)
            .iter()
            .all(|&b| b == 0),
        "the stale member was written to after restart"
    );
}

#[test]
fn member_fail_of_unknown_array_or_member_is_a_clear_error() {
    let t = Tmp::new().unwrap();
    let x = member(t.path(), "x.img", 64 * MIB);
    let y = member(t.path(), "y.img", 64 * MIB);
    let d = start(&layout("A", "raid1", &[&x, &y], &[]), &[]);
    let sock = s(d.mgmt_socket());

    let err = fails(&["member", "fail", "nosuch", "0", "--socket", &sock]);
    // The unknown name, and the names that exist.
    assert_has(&err, &["no array named 'nosuch'", "arrays: A"]);
    let err = fails(&["member", "fail", "A", "7", "--socket", &sock]);
    assert_has(
        &err,
        &[
            "array A",
            "no member '7'",
            "index or address",
            "uniblk status",
        ],
    );
    let err = fails(&["member", "fail", "A", "file:/nope.img", "--socket", &sock]);
    assert_has(&err, &["array A", "'file:/nope.img'", "index or address"]);

    // None of that touched the array; a member named by address works.
    let st = status_json(d.mgmt_socket());
    assert_eq!(array(&st, "A")["state"], "optimal");
    ok(&["member", "fail", "A", &y, "--socket", &sock]);
    let st = status_json(d.mgmt_socket());
    assert_eq!(array(&st, "A")["members"][1]["state"], "faulty");
    assert_eq!(array(&st, "A")["members"][0]["state"], "healthy");
}

// ---------------------------------------------------------------------------------------
// 5. uniblk up with no layout
// ---------------------------------------------------------------------------------------

#[test]
fn up_without_config_runs_default_array() {
    if !has_qemu_io() {
        return;
    }
    // The built-in array listens on the well-known NBD port.
    match std::net::TcpListener::bind("127.0.0.1:10809") {
        Ok(l) => drop(l),
        Err(e) => {
            eprintln!("SKIP: up_without_config_runs_default_array: 127.0.0.1:10809 is busy ({e})");
            return;
        }
    }
    let cwd = Tmp::new().unwrap();
    let sock = cwd.join("run/ublkd.sock");
    let data = cwd.join("data");
    let nbd_sock = data.join("uniblk0.sock");
    let mut up = Foreground::start(
        bin(),
        &["up", "--data-dir", "data", "--mgmt-socket", &s(&sock)],
        cwd.path(),
        &[
            Listen::parse("127.0.0.1:10809").unwrap(),
            Listen::Unix(sock.clone()),
            Listen::Unix(nbd_sock.clone()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // The instructions are printed once the listeners are up: wait for their last line.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !up.log().contains("management socket:") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = up.log();
    assert_has(
        &log,
        &[
            "qemu-io",
            "nbdfuse",
            "nbd-client",
            "nbd://127.0.0.1:10809/uniblk0",
            "uniblk status",
        ],
    );
    // The data directory is relative to the working directory.
    for f in ["member-a.img", "member-b.img"] {
        let p = data.join(f);
        let md = fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}\n{log}", p.display()));
        assert_eq!(md.len(), 1 << 30, "{}", p.display());
        assert!(
            md.blocks() * 512 < 16 * MIB,
            "{} is not sparse",
            p.display()
        );
        assert_eq!(sb_array(&p), "uniblk0");
    }
    // The printed URI works.
    let uri = log
        .split_whitespace()
        .map(|w| w.trim_matches('\''))
        .find(|w| w.starts_with("nbd://"))
        .expect("a printed nbd:// URI")
        .to_string();
    qemu_io_ok(&uri, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]).unwrap();
    qemu_io_ok(
        &format!("nbd+unix:///uniblk0?socket={}", nbd_sock.display()),
        &["read -P 0xab 0 1M"],
    )
    .unwrap();
    let st = status_json(&sock);
    let a = array(&st, "uniblk0");
    assert_eq!(a["level"], "raid1");
    assert_eq!(a["state"], "optimal");

    // Ctrl-C: a clean stop, exit 0, sockets gone.
    let status = up
        .interrupt(Duration::from_secs(30))
        .unwrap()
        .unwrap_or_else(|| panic!("uniblk up ignored SIGINT for 30 s:\n{}", up.log()));
    assert!(
        status.success(),
        "exit {status} after SIGINT:\n{}",
        up.log()
    );
    assert!(!sock.exists(), "management socket left behind");
    assert!(!nbd_sock.exists(), "NBD unix socket left behind");
}

// ---------------------------------------------------------------------------------------
// 6. --log-level
// ---------------------------------------------------------------------------------------

#[test]
fn up_refuses_an_invalid_log_level() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    let b = member(t.path(), "b.img", 64 * MIB);
    for level in ["x=verbose", "warn,["] {
        let err = up_refused(
            t.path(),
            &layout("d0", "raid1", &[&a, &b], &[]),
            &["--log-level", level],
        );
        assert_has(
            &err,
            &["--log-level", level, "error, warn, info, debug, trace"],
        );
    }
    assert_ne!(
        sb_magic(&path_of(&a)),
        b"UNIBLKSB",
        "members touched despite the bad flag"
    );
}

#[test]
fn up_refuses_a_nonsense_log_level() {
    let t = Tmp::new().unwrap();
    let a = member(t.path(), "a.img", 64 * MIB);
    let b = member(t.path(), "b.img", 64 * MIB);
    let err = up_refused(
        t.path(),
        &layout("d0", "raid1", &[&a, &b], &[]),
        &["--log-level", "nonsense"],
    );
    assert_has(&err, &["--log-level", "nonsense"]);
}
