//! Data integrity of the `ublkd` daemon, end to end: the real binary runs arrays over local
//! member files (sparse images under /tmp) and real NBD clients (qemu-io, nbdinfo, fio,
//! nbdfuse + loop + ext4) read back what they wrote. Where it matters, the member files are
//! also checked directly against an independent model of md's layouts (linear concat,
//! raid0 zones, raid1 mirrors, raid10 near-2), so data that reads back through the daemon
//! but sits in the wrong place on disk is caught too.
//!
//! A test whose peer is missing skips with a message (CI installs everything, and there a
//! missing peer fails instead: see `fixtures::skip`).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fixtures::{Daemon, Tmp};
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Where array data starts on every member (the metadata area before it).
const DATA_OFFSET: u64 = MIB;
const CHUNK: u64 = 64 * KIB;
/// The superblock: 4 KiB at byte 4096 of every member.
const SB_AT: u64 = 4096;
/// Byte offset of `state` (u32 LE, 0 = clean) inside the superblock, from the encode order
/// in raidcore/src/superblock.rs: magic 8, version 4, features 4, array uuid 16, member
/// uuid 16, name 64, level 4, role 4, members 4.
const SB_STATE: usize = 8 + 4 + 4 + 16 + 16 + 64 + 4 + 4 + 4;
/// Then chunk, data_offset, data_size, events (u64 LE each).
const SB_DATA_OFFSET: usize = SB_STATE + 4 + 8;
const SB_DATA_SIZE: usize = SB_DATA_OFFSET + 8;
const SB_EVENTS: usize = SB_DATA_SIZE + 8;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ublkd"))
}

// ---- An independent model of md's layouts -------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Linear,
    Raid0,
    Raid1,
    Raid10,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Linear => "linear",
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Raid10 => "raid10",
        }
    }
}

/// The arrays the per-level tests run: member file sizes chosen so md's size rules matter
/// (unequal linear members, one not a whole number of 4 KiB blocks; raid0 zones with a
/// member that is not a whole number of chunks; raid1 using the smallest member; raid10
/// over 3 members with an odd number of chunk rows).
const LINEAR: (Level, &[u64]) = (Level::Linear, &[64 * MIB, 80 * MIB + 4096 + 1000, 48 * MIB]);
const RAID0: (Level, &[u64]) = (Level::Raid0, &[64 * MIB, 64 * MIB, 96 * MIB + 20 * KIB]);
const RAID1: (Level, &[u64]) = (Level::Raid1, &[64 * MIB, 72 * MIB]);
const RAID10_4: (Level, &[u64]) = (Level::Raid10, &[64 * MIB; 4]);
const RAID10_3: (Level, &[u64]) = (
    Level::Raid10,
    &[64 * MIB + CHUNK, 64 * MIB + CHUNK, 64 * MIB + CHUNK],
);
const ALL_LEVELS: [(Level, &[u64]); 5] = [LINEAR, RAID0, RAID1, RAID10_4, RAID10_3];

/// Where array bytes live on the members, computed from md's rules (not from raidcore).
#[derive(Debug, Clone)]
struct Geometry {
    level: Level,
    /// Each member's data area: file size minus the metadata area, in whole 4 KiB blocks.
    data: Vec<u64>,
}

impl Geometry {
    fn new(level: Level, file_sizes: &[u64]) -> Self {
        let data = file_sizes
            .iter()
            .map(|s| (s - DATA_OFFSET) / 4096 * 4096)
            .collect();
        Geometry { level, data }
    }

    fn n(&self) -> u64 {
        self.data.len() as u64
    }

    fn min(&self) -> u64 {
        *self.data.iter().min().unwrap()
    }

    /// raid0 zones: (array start, member offset start, members in the zone, zone length).
    fn zones(&self) -> Vec<(u64, u64, Vec<usize>, u64)> {
        let spans: Vec<u64> = self.data.iter().map(|d| d / CHUNK * CHUNK).collect();
        let mut levels = spans.clone();
        levels.sort_unstable();
        levels.dedup();
        let (mut zones, mut start, mut prev) = (Vec::new(), 0, 0);
        for lvl in levels {
            let members: Vec<usize> = (0..spans.len()).filter(|&i| spans[i] >= lvl).collect();
            let len = (lvl - prev) * members.len() as u64;
            zones.push((start, prev, members, len));
            start += len;
            prev = lvl;
        }
        zones
    }

    /// The array size md would give these members.
    fn size(&self) -> u64 {
        match self.level {
            Level::Linear => self.data.iter().sum(),
            Level::Raid0 => self.data.iter().map(|d| d / CHUNK * CHUNK).sum(),
            Level::Raid1 => self.min(),
            Level::Raid10 => (self.min() / CHUNK) * self.n() / 2 * CHUNK,
        }
    }

    /// Array offsets where consecutive array bytes move to another member region: linear
    /// member ends and raid0 zone ends.
    fn boundaries(&self) -> Vec<u64> {
        match self.level {
            Level::Linear => self
                .data
                .iter()
                .scan(0, |at, d| {
                    *at += d;
                    Some(*at)
                })
                .filter(|&b| b < self.size())
                .collect(),
            Level::Raid0 => self
                .zones()
                .iter()
                .map(|z| z.0 + z.3)
                .filter(|&b| b < self.size())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The copies of array byte `off` as (member, offset in that member's data area), and
    /// how many bytes from `off` stay contiguous on every copy.
    fn locate(&self, off: u64) -> (Vec<(usize, u64)>, u64) {
        assert!(off < self.size());
        match self.level {
            Level::Linear => {
                let mut start = 0;
                for (m, &d) in self.data.iter().enumerate() {
                    if off < start + d {
                        return (vec![(m, off - start)], start + d - off);
                    }
                    start += d;
                }
                unreachable!()
            }
            Level::Raid0 => {
                let zones = self.zones();
                let (zstart, dev_start, members, _) =
                    zones.iter().rev().find(|z| z.0 <= off).unwrap();
                let zoff = off - zstart;
                let (chunk_no, within) = (zoff / CHUNK, zoff % CHUNK);
                let n = members.len() as u64;
                let m = members[(chunk_no % n) as usize];
                (
                    vec![(m, dev_start + chunk_no / n * CHUNK + within)],
                    CHUNK - within,
                )
            }
            Level::Raid1 => (
                (0..self.data.len()).map(|m| (m, off)).collect(),
                self.size() - off,
            ),
            Level::Raid10 => {
                let (chunk_no, within) = (off / CHUNK, off % CHUNK);
                let copies = (0..2)
                    .map(|c| {
                        let pos = chunk_no * 2 + c;
                        ((pos % self.n()) as usize, pos / self.n() * CHUNK + within)
                    })
                    .collect();
                (copies, CHUNK - within)
            }
        }
    }
}

// ---- The daemon over member files ---------------------------------------------------

/// A daemon running one array over sparse member files. Fields drop in order: the daemon
/// stops before its member files go.
struct Rig {
    daemon: Daemon,
    geo: Geometry,
    name: String,
    port: u16,
    members: Vec<PathBuf>,
    files: Tmp,
}

impl Rig {
    /// Creates the member files and starts `ublkd` with a layout exporting the array on
    /// 127.0.0.1:PORT and on a unix socket in the daemon's scratch directory.
    fn start(level: Level, file_sizes: &[u64]) -> Rig {
        Self::start_with(level, file_sizes, "", &[])
    }

    /// [`Rig::start`] with `array_keys` (TOML lines) added to the array's table and `env`
    /// set for the daemon.
    fn start_with(level: Level, file_sizes: &[u64], array_keys: &str, env: &[(&str, &str)]) -> Rig {
        let files = Tmp::new().unwrap();
        let members: Vec<PathBuf> = (0..file_sizes.len())
            .map(|i| files.join(format!("m{i}.img")))
            .collect();
        for (p, &s) in members.iter().zip(file_sizes) {
            fixtures::sparse_file(p, s).unwrap();
        }
        let name = format!("{}x{}", level.name(), members.len());
        let port = fixtures::free_port().unwrap();
        let list = members
            .iter()
            .map(|p| format!("\"file:{}\"", p.display()))
            .collect::<Vec<_>>()
            .join(", ");
        let layout = format!(
            "[[array]]\nname = \"{name}\"\nlevel = \"{}\"\nchunk = \"64KiB\"\nmembers = [{list}]\n\
             export.nbd = {{ listen = [\"127.0.0.1:{port}\", \"unix:{}/{name}.sock\"] }}\n\
             {array_keys}",
            level.name(),
            fixtures::DIR_PLACEHOLDER,
        );
        let daemon = Daemon::start_with_env(bin(), &layout, &[], env)
            .unwrap_or_else(|e| panic!("ublkd did not start with\n{layout}\n{e:#}"));
        Rig {
            daemon,
            geo: Geometry::new(level, file_sizes),
            name,
            port,
            members,
            files,
        }
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, self.name)
    }

    fn unix_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}/{}.sock",
            self.name,
            self.daemon.dir().display(),
            self.name
        )
    }

    fn size(&self) -> u64 {
        self.geo.size()
    }

    /// SIGTERM; the daemon must exit 0 and log a clean stop of the array.
    fn stop_clean(&mut self) {
        let t0 = Instant::now();
        let status = self.daemon.stop().unwrap();
        let log = self.daemon.log();
        assert!(
            status.success(),
            "ublkd exited with {status} after SIGTERM; log:\n{log}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "stop took {:?}",
            t0.elapsed()
        );
        assert!(
            log.contains("array stopped clean"),
            "no clean stop in the log:\n{log}"
        );
    }

    fn restart(&mut self) {
        self.daemon
            .restart()
            .unwrap_or_else(|e| panic!("ublkd did not restart: {e:#}"));
    }

    fn status(&self) -> Value {
        let r = self.daemon.request(&json!({"cmd": "status"})).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        r["status"]["arrays"][0].clone()
    }

    /// NBD connections the daemon currently serves (all listeners).
    fn connections(&self) -> u64 {
        self.status()["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["connections"].as_u64().unwrap())
            .sum()
    }

    /// Every member healthy with no I/O errors counted.
    fn assert_members_healthy(&self) {
        let st = self.status();
        for m in st["members"].as_array().unwrap() {
            assert_eq!(m["state"], "healthy", "{st}");
            assert_eq!(m["errors"], 0, "{st}");
        }
    }

    /// Bytes `[off, off+len)` of member `m`'s data area, read from its file.
    fn member_bytes(&self, m: usize, off: u64, len: usize) -> Vec<u8> {
        let f = File::open(&self.members[m]).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, DATA_OFFSET + off).unwrap();
        b
    }

    /// Every copy, on the member files, of array range `[off, off+want.len())` holds `want`.
    fn assert_on_members(&self, off: u64, want: &[u8]) {
        let mut done = 0u64;
        while done < want.len() as u64 {
            let (copies, run) = self.geo.locate(off + done);
            let take = run.min(want.len() as u64 - done);
            let expect = &want[done as usize..(done + take) as usize];
            for (m, moff) in copies {
                let got = self.member_bytes(m, moff, take as usize);
                if let Some(i) = got.iter().zip(expect).position(|(a, b)| a != b) {
                    panic!(
                        "array byte {} should be {:#04x} on member {m} at data offset {} but is \
                         {:#04x} ({} level model)",
                        off + done + i as u64,
                        expect[i],
                        moff + i as u64,
                        got[i],
                        self.geo.level.name()
                    );
                }
            }
            done += take;
        }
    }

    /// The raw superblock block of member `m`.
    fn superblock(&self, m: usize) -> Vec<u8> {
        let f = File::open(&self.members[m]).unwrap();
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, SB_AT).unwrap();
        b
    }

    /// Every member carries a valid superblock in the clean state, all with the same event
    /// count and the data area the model expects.
    fn assert_superblocks_clean(&self) {
        let mut events = Vec::new();
        for m in 0..self.members.len() {
            let b = self.superblock(m);
            let at = |o: usize, n: usize| &b[o..o + n];
            let u32_at = |o| u32::from_le_bytes(at(o, 4).try_into().unwrap());
            let u64_at = |o| u64::from_le_bytes(at(o, 8).try_into().unwrap());
            assert_eq!(at(0, 8), b"UNIBLKSB", "member {m}: no superblock magic");
            assert_eq!(
                u32_at(SB_STATE),
                0,
                "member {m}: superblock state is not clean"
            );
            assert_eq!(
                u64_at(SB_DATA_OFFSET),
                DATA_OFFSET,
                "member {m}: data_offset"
            );
            assert_eq!(
                u64_at(SB_DATA_SIZE),
                self.geo.data[m],
                "member {m}: data_size"
            );
            // The checksum and every field must also decode.
            let sb = raidcore::superblock::Superblock::decode(&b)
                .unwrap_or_else(|e| panic!("member {m}: superblock does not decode: {e}"));
            assert_eq!(sb.state, raidcore::superblock::SbState::Clean);
            assert_eq!(sb.role as usize, m);
            events.push(u64_at(SB_EVENTS));
        }
        assert!(
            events.windows(2).all(|w| w[0] == w[1]),
            "members disagree on the event count: {events:?}"
        );
    }
}

// ---- Pattern ranges with qemu-io ----------------------------------------------------

/// What a range of the array is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// One byte everywhere (`qemu-io write -P`).
    Byte(u8),
    /// `fixtures::pattern(seed, ..)`: every 8-byte word depends on its absolute offset, so
    /// data shifted or pieces swapped inside the range are caught (`qemu-io write -s`).
    Addressed(u64),
}

/// One range of the array with its own content.
#[derive(Debug, Clone, Copy)]
struct Span {
    off: u64,
    len: u64,
    fill: Fill,
}

impl Span {
    fn bytes(&self) -> Vec<u8> {
        match self.fill {
            Fill::Byte(b) => vec![b; self.len as usize],
            Fill::Addressed(seed) => fixtures::pattern(seed, self.off, self.len as usize),
        }
    }

    /// The same range with other content (a distinct byte, or another seed).
    fn refilled(&self, i: usize) -> Span {
        let fill = match self.fill {
            Fill::Byte(_) => Fill::Byte(fill(i)),
            Fill::Addressed(seed) => Fill::Addressed(seed + 1000),
        };
        Span { fill, ..*self }
    }
}

/// A fill byte per index: distinct for the first 254 indices, never zero.
fn fill(i: usize) -> u8 {
    ((i * 29 + 0x21) % 254 + 1) as u8
}

/// Aligned, unaligned, chunk-crossing and multi-chunk ranges in the first 50 MiB, member or
/// zone boundaries, and the last bytes of the device. Non-overlapping (checked), many of
/// them adjacent so a read-modify-write that spills into a neighbour is caught. The large
/// multi-chunk ones and those across member boundaries carry offset-addressed data.
fn spans(geo: &Geometry, first_fill: usize) -> Vec<Span> {
    let size = geo.size();
    let a = |off, len| (off, len, true);
    let b = |off, len| (off, len, false);
    let mut r: Vec<(u64, u64, bool)> = vec![
        b(0, 511),
        b(511, 1),
        b(512, 488),
        b(1000, 70_000), // crosses the first chunk boundary, unaligned both ends
        b(128 * KIB, 4096),
        b(132 * KIB, 128 * KIB), // aligned, spans 3 chunks
        b(5 * CHUNK - 100, 200), // 100 bytes each side of a chunk boundary
        a(MIB + 3, 300_000),     // unaligned over 5 chunks
        b(4 * MIB, MIB),
        b(10 * MIB - 1, 2 * MIB + 2),
        b(20 * MIB + 4095, 4097), // misaligned start, aligned end
        b(20 * MIB + 8192, 513),
        b(30 * MIB + 1234, 7), // inside one sector
        a(33 * MIB + 5, 700_000),
        b(33 * MIB + 700_005, 4091), // ends 4 KiB aligned
        a(45 * MIB - 3, 3 * MIB + 7),
    ];
    for bd in geo.boundaries() {
        r.push(b(bd - 100_003 - 1000, 1000));
        r.push(a(bd - 100_003, 200_006));
        r.push(b(bd + 100_003, 777));
    }
    r.push(b(size - 70_001 - 8192, 8192));
    r.push(b(size - 70_001, 70_000));
    r.push(b(size - 1, 1));
    r.sort_unstable();
    for w in r.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "test ranges overlap: {w:?}");
    }
    assert!(r.last().map(|l| l.0 + l.1) == Some(size));
    r.into_iter()
        .enumerate()
        .map(|(i, (off, len, addressed))| Span {
            off,
            len,
            fill: if addressed {
                Fill::Addressed((first_fill + i) as u64)
            } else {
                Fill::Byte(fill(first_fill + i))
            },
        })
        .collect()
}

/// Up to 512 bytes either side of each span that no span covers: they must stay zero.
fn guards(spans: &[Span], size: u64) -> Vec<(u64, u64)> {
    let covered = |a: u64, b: u64| spans.iter().any(|s| a < s.off + s.len && s.off < b);
    let mut g = Vec::new();
    for s in spans {
        let before = (s.off.saturating_sub(512), s.off);
        let after = (s.off + s.len, (s.off + s.len + 512).min(size));
        for (a, b) in [before, after] {
            if a < b && !covered(a, b) && !g.contains(&(a, b - a)) {
                g.push((a, b - a));
            }
        }
    }
    g
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    fixtures::qemu_io_ok(uri, &cmds).unwrap_or_else(|e| panic!("{e:#}"))
}

/// qemu-io commands writing `spans`; offset-addressed data goes through source files in
/// `dir`. Every third byte-filled write is FUA.
fn write_cmds(spans: &[Span], dir: &Path) -> Vec<String> {
    spans
        .iter()
        .enumerate()
        .map(|(i, s)| match s.fill {
            Fill::Byte(b) => {
                let fua = if i % 3 == 0 { "-f " } else { "" };
                format!("write {fua}-P {b:#04x} {} {}", s.off, s.len)
            }
            Fill::Addressed(_) => {
                let src = dir.join(format!("src-{}-{}.bin", s.off, s.len));
                std::fs::write(&src, s.bytes()).unwrap();
                format!("write -s {} {} {}", src.display(), s.off, s.len)
            }
        })
        .collect()
}

fn zero_cmds(ranges: &[(u64, u64)]) -> Vec<String> {
    ranges
        .iter()
        .map(|(o, l)| format!("read -P 0 {o} {l}"))
        .collect()
}

impl Rig {
    /// Writes `spans` (plus `extra` commands after them) in one qemu-io run over TCP.
    fn write_spans(&self, spans: &[Span], extra: &[String]) {
        let mut cmds = write_cmds(spans, self.files.path());
        cmds.extend_from_slice(extra);
        qemu_io(&self.uri(), &cmds);
    }

    /// Reads every span back on fresh connections: byte fills with `qemu-io read -P` over
    /// the unix socket (plus `zeroes` ranges that must read as zero), offset-addressed data
    /// with a hand-written client over TCP.
    fn verify_spans(&self, spans: &[Span], zeroes: &[(u64, u64)]) {
        let mut cmds: Vec<String> = spans
            .iter()
            .filter_map(|s| match s.fill {
                Fill::Byte(b) => Some(format!("read -P {b:#04x} {} {}", s.off, s.len)),
                Fill::Addressed(_) => None,
            })
            .collect();
        cmds.extend(zero_cmds(zeroes));
        qemu_io(&self.unix_uri(), &cmds);
        let mut c = RawClient::handshake(self.port, &self.name);
        for s in spans {
            if let Fill::Addressed(seed) = s.fill {
                let got = c.read(s.off, s.len as u32);
                fixtures::verify_pattern(seed, s.off, &got).unwrap_or_else(|e| panic!("{e:#}"));
            }
        }
    }

    fn assert_spans_on_members(&self, spans: &[Span]) {
        for s in spans {
            self.assert_on_members(s.off, &s.bytes());
        }
    }
}

/// Test 1: pattern writes (plain, FUA, offset-addressed, write-zeroes over part of a
/// range) at many offsets, read back on fresh connections, then the member files checked
/// against md's layout.
fn pattern_round_trip(level: Level, file_sizes: &[u64]) {
    if !fixtures::require("qemu-io") {
        return;
    }
    pattern_round_trip_on(Rig::start(level, file_sizes));
}

/// [`pattern_round_trip`] on a rig already started.
fn pattern_round_trip_on(mut rig: Rig) {
    let mut spans = spans(&rig.geo, 0);
    let size = rig.size();
    // Write-zeroes (plain and may-unmap) and a discard punched unaligned into the middle of
    // FUA-written ranges: zeroes read back as zero, and nothing outside the punched range
    // changes (a discard's own range may read as anything).
    let mut guarded = guards(&spans, size);
    let written = spans.len();
    let mut cmds = Vec::new();
    for (i, (op, inner)) in [
        ("write -z", true),
        ("write -z -u", true),
        ("discard", false),
    ]
    .into_iter()
    .enumerate()
    {
        let (z, len, hole_at, hole) = (50 * MIB + 100 + i as u64 * MIB, 300_000, 4000, 200_000);
        let b = fill(200 + i);
        cmds.push(format!("write -f -P {b:#04x} {z} {len}"));
        cmds.push(format!("{op} {} {hole}", z + hole_at));
        let span = |off, len, fill| Span { off, len, fill };
        spans.push(span(z, hole_at, Fill::Byte(b)));
        if inner {
            spans.push(span(z + hole_at, hole, Fill::Byte(0)));
        }
        spans.push(span(
            z + hole_at + hole,
            len - hole_at - hole,
            Fill::Byte(b),
        ));
        guarded.extend([(z - 512, 512), (z + len, 512)]);
    }
    rig.write_spans(&spans[..written], &cmds);
    // Each range keeps its own content (no later write clobbered it), the bytes around
    // each stay zero.
    rig.verify_spans(&spans, &guarded);
    rig.assert_members_healthy();
    rig.stop_clean();
    rig.assert_spans_on_members(&spans);
    for (o, l) in guarded {
        rig.assert_on_members(o, &vec![0; l as usize]);
    }
}

#[test]
fn qemu_io_patterns_linear() {
    pattern_round_trip(LINEAR.0, LINEAR.1);
}

#[test]
fn qemu_io_patterns_raid0() {
    pattern_round_trip(RAID0.0, RAID0.1);
}

#[test]
fn qemu_io_patterns_raid1() {
    pattern_round_trip(RAID1.0, RAID1.1);
}

#[test]
fn qemu_io_patterns_raid10_four_members() {
    pattern_round_trip(RAID10_4.0, RAID10_4.1);
}

#[test]
fn qemu_io_patterns_raid10_three_members() {
    pattern_round_trip(RAID10_3.0, RAID10_3.1);
}

// ---- nbdinfo ------------------------------------------------------------------------

/// Test 2: what nbdinfo sees for each level: md's size, byte-granular requests, 4 KiB
/// preferred, every data-path capability, base:allocation.
#[test]
fn nbdinfo_reports_md_sizes_and_capabilities_for_every_level() {
    if !fixtures::require("nbdinfo") {
        return;
    }
    for (level, sizes) in ALL_LEVELS {
        let rig = Rig::start(level, sizes);
        for uri in [rig.uri(), rig.unix_uri()] {
            let v = fixtures::nbdinfo_json(&uri).unwrap();
            let e = &v["exports"][0];
            let what = format!("{} over {sizes:?} via {uri}: {v}", level.name());
            assert_eq!(e["export-name"], rig.name.as_str(), "{what}");
            assert_eq!(e["export-size"], rig.size(), "size of {what}");
            assert_eq!(e["block_size_minimum"], 1, "{what}");
            assert_eq!(e["block_size_preferred"], 4096, "{what}");
            for cap in [
                "can_flush",
                "can_fua",
                "can_trim",
                "can_zero",
                "can_multi_conn",
            ] {
                assert_eq!(e[cap], true, "{cap} for {what}");
            }
            assert_eq!(e["is_read_only"], false, "{what}");
            let contexts = e["contexts"].as_array().expect("contexts");
            assert!(
                contexts.iter().any(|c| c == "base:allocation"),
                "base:allocation missing for {what}"
            );
        }
        assert_eq!(rig.status()["size"], rig.size(), "status size");
    }
}

// ---- fio ----------------------------------------------------------------------------

/// fio's nbd engine, 2 jobs (one connection each) on disjoint regions of `per_job` bytes,
/// randwrite then crc32c verification of every block. Panics unless fio succeeded with no
/// errors and every job wrote and verified its whole region.
fn fio_verified(uri: &str, per_job: u64, bs: &str) -> Value {
    let uri_arg = format!("--uri={uri}");
    let size = format!("--size={per_job}");
    let incr = format!("--offset_increment={per_job}");
    let args = [
        "--name=verify",
        "--ioengine=nbd",
        &uri_arg,
        "--rw=randwrite",
        bs,
        "--iodepth=32",
        "--numjobs=2",
        &size,
        &incr,
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ];
    let (ok, report) = fixtures::fio(&args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(ok, "fio {args:?} failed:\n{report:#}");
    let jobs = report["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len(), 2, "{report:#}");
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job error: {j:#}");
        let written = j["write"]["io_bytes"].as_u64().unwrap();
        let verified = j["read"]["io_bytes"].as_u64().unwrap();
        assert!(written > 0, "fio wrote nothing: {j:#}");
        assert_eq!(
            written, per_job,
            "fio did not write its whole region: {j:#}"
        );
        assert_eq!(
            verified, per_job,
            "fio did not verify its whole region: {j:#}"
        );
    }
    report
}

fn fio_round(level: Level, file_sizes: &[u64]) {
    if !fixtures::require("fio") {
        return;
    }
    fio_round_on(Rig::start(level, file_sizes));
}

/// [`fio_round`] on a rig already started.
fn fio_round_on(mut rig: Rig) {
    assert!(rig.size() >= 128 * MIB);
    fio_verified(&rig.uri(), 32 * MIB, "--bs=4k");
    fio_verified(
        &rig.unix_uri(),
        64 * MIB,
        "--bssplit=4k/30:8k/10:16k/15:64k/20:100k/5:128k/20",
    );
    rig.assert_members_healthy();
    rig.stop_clean();
    rig.assert_superblocks_clean();
}

#[test]
fn fio_verified_multi_conn_raid0() {
    fio_round(Level::Raid0, &[80 * MIB; 2]);
}

#[test]
fn fio_verified_multi_conn_raid1() {
    fio_round(Level::Raid1, &[136 * MIB; 2]);
}

#[test]
fn fio_verified_multi_conn_raid10() {
    fio_round(Level::Raid10, &[72 * MIB; 4]);
}

// ---- Start-up choices: the local engine, the queue policy ----------------------------

/// `UNIBLK_NO_IO_URING=1`: the daemon logs that local members use the pread engine and
/// why, status names "pread" as every file member's engine, and the qemu-io pattern round
/// trip (plain, FUA, offset-addressed writes, write-zeroes, discard, then the member files
/// against md's layout) passes on raid1 through that engine.
#[test]
fn pread_engine_chosen_by_environment_serves_qemu_io_patterns_raid1() {
    if !fixtures::require("qemu-io") {
        return;
    }
    let rig = Rig::start_with(RAID1.0, RAID1.1, "", &[("UNIBLK_NO_IO_URING", "1")]);
    let log = rig.daemon.log();
    assert!(
        log.contains("local members use the pread engine: UNIBLK_NO_IO_URING=1 is set"),
        "the log does not say the pread engine was chosen for UNIBLK_NO_IO_URING=1:\n{log}"
    );
    let st = rig.status();
    let members = st["members"].as_array().unwrap();
    assert_eq!(members.len(), RAID1.1.len(), "{st:#}");
    for m in members {
        assert_eq!(m["protocol"], "file", "{st:#}");
        assert_eq!(m["engine"], "pread", "{st:#}");
    }
    pattern_round_trip_on(rig);
}

/// `policy = "lifo"` in the layout, with a queue shallower than fio's depth so I/Os wait
/// and the policy picks who goes next: status reports the policy and depth, and fio
/// verify (two connections, mixed sizes) passes on raid10.
#[test]
fn lifo_policy_from_layout_is_reported_and_fio_verifies_raid10() {
    if !fixtures::require("fio") {
        return;
    }
    let rig = Rig::start_with(
        Level::Raid10,
        &[72 * MIB; 4],
        "policy = \"lifo\"\nqueue_depth = 4\n",
        &[],
    );
    let st = rig.status();
    assert_eq!(st["queue"]["policy"], "lifo", "{st:#}");
    assert_eq!(st["queue"]["depth"], 4, "{st:#}");
    fio_round_on(rig);
}

// ---- A file system on top -----------------------------------------------------------

/// A small xorshift generator: deterministic file sizes and contents.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// ~200 files in nested directories, sizes up to 1 MiB (mostly small, some edge sizes).
fn tree_files() -> Vec<(PathBuf, usize, u64)> {
    let mut rng = Rng::new(42);
    (0..200u64)
        .map(|i| {
            let size = match i {
                0 => 0,
                1 => 1,
                2 => MIB as usize,
                3 => MIB as usize - 1,
                4 => 4097,
                _ => {
                    // Cubed uniform: mostly small files, a few large ones.
                    let u = (rng.next() % 1000) as f64 / 1000.0;
                    (u * u * u * MIB as f64) as usize + (rng.next() % 4096) as usize
                }
            };
            let path = PathBuf::from(format!("d{}/s{}/f{i:03}.bin", i % 10, i % 3));
            (path, size.min(MIB as usize), 1000 + i)
        })
        .collect()
}

fn write_tree(root: &Path) {
    for (rel, size, seed) in tree_files() {
        let p = root.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, Rng::new(seed).bytes(size)).unwrap();
    }
}

fn verify_tree(root: &Path) {
    for (rel, size, seed) in tree_files() {
        let p = root.join(&rel);
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(got.len(), size, "{} size", p.display());
        if got != Rng::new(seed).bytes(size) {
            panic!("{} content differs from what was copied", p.display());
        }
    }
}

/// Test 4: nbdfuse + loop → mkfs.ext4 → mount → copy a tree → umount → detach → stop and
/// restart the daemon → attach, mount, verify every byte → umount → fsck clean.
fn filesystem_round(level: Level, file_sizes: &[u64]) {
    if !fixtures::require_all(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
    ]) || !fixtures::require_root("loop devices and mount")
        || !fixtures::require_path(Path::new("/dev/fuse"), "FUSE")
        || !fixtures::require_path(Path::new("/dev/loop-control"), "loop devices")
    {
        return;
    }
    let mut rig = Rig::start(level, file_sizes);
    let scratch = Tmp::new().unwrap();
    let src = scratch.join("src");
    write_tree(&src);
    {
        let dev = fixtures::NbdFuseLoop::attach(&rig.uri()).unwrap();
        fixtures::mkfs_ext4(dev.device()).unwrap();
        let mnt = fixtures::mount(dev.device(), &scratch.join("mnt")).unwrap();
        fixtures::run_ok(
            fixtures::command("cp")
                .arg("-a")
                .arg(&src)
                .arg(mnt.dir().join("tree")),
        )
        .unwrap();
        fixtures::run_ok(&mut fixtures::command("sync")).unwrap();
        verify_tree(&mnt.dir().join("tree"));
        mnt.unmount().unwrap();
        dev.detach().unwrap();
    }
    // Everything the file system wrote must have reached the members: stop, start again,
    // and read it through a brand-new attachment (no page cache can help).
    rig.stop_clean();
    rig.assert_superblocks_clean();
    rig.restart();
    {
        let dev = fixtures::NbdFuseLoop::attach(&rig.uri()).unwrap();
        let mnt = fixtures::mount(dev.device(), &scratch.join("mnt2")).unwrap();
        verify_tree(&mnt.dir().join("tree"));
        mnt.unmount().unwrap();
        let report = fixtures::fsck_ext4_fn(dev.device()).unwrap();
        assert!(!report.contains("UNEXPECTED"), "{report}");
        dev.detach().unwrap();
    }
    rig.assert_members_healthy();
    rig.stop_clean();
    if level == Level::Raid1 {
        assert_members_identical(&rig);
    }
}

#[test]
fn ext4_on_raid1_survives_copy_remount_restart_and_fsck() {
    filesystem_round(Level::Raid1, &[160 * MIB; 2]);
}

#[test]
fn ext4_on_raid10_survives_copy_remount_restart_and_fsck() {
    filesystem_round(Level::Raid10, &[96 * MIB; 3]);
}

// ---- raid1 mirrors ------------------------------------------------------------------

/// Both members of a stopped raid1 hold the same data area, byte for byte.
fn assert_members_identical(rig: &Rig) {
    let (a, b) = (
        File::open(&rig.members[0]).unwrap(),
        File::open(&rig.members[1]).unwrap(),
    );
    let end = rig.size();
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let (mut at, mut nonzero) = (0u64, false);
    while at < end {
        let n = (end - at).min(MIB) as usize;
        a.read_exact_at(&mut ba[..n], DATA_OFFSET + at).unwrap();
        b.read_exact_at(&mut bb[..n], DATA_OFFSET + at).unwrap();
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            panic!(
                "raid1 members differ at array offset {} ({:#04x} vs {:#04x})",
                at + i as u64,
                ba[i],
                bb[i]
            );
        }
        nonzero |= ba[..n].iter().any(|&x| x != 0);
        at += n as u64;
    }
    assert!(
        nonzero,
        "the members hold no data at all: nothing was compared"
    );
}

/// Test 5: after random writes (fio, plus unaligned qemu-io writes) and a clean stop, the
/// two raid1 members are identical from 1 MiB to the end and both carry a superblock.
#[test]
fn raid1_members_identical_after_clean_stop() {
    if !fixtures::require_all(&["fio", "qemu-io"]) {
        return;
    }
    let mut rig = Rig::start(Level::Raid1, &[96 * MIB; 2]);
    let size = rig.size();
    let uri_arg = format!("--uri={}", rig.uri());
    let (ok, report) = fixtures::fio(&[
        "--name=random",
        "--ioengine=nbd",
        &uri_arg,
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--iodepth=32",
        "--numjobs=2",
        "--size=40M",
        "--offset_increment=40M",
    ])
    .unwrap();
    assert!(ok, "fio failed: {report:#}");
    let spans = spans(&rig.geo, 50);
    rig.write_spans(&spans, &[]);
    rig.stop_clean();
    assert_members_identical(&rig);
    rig.assert_spans_on_members(&spans);
    for m in 0..2 {
        assert_eq!(&rig.superblock(m)[..8], b"UNIBLKSB", "member {m}");
    }
    rig.assert_superblocks_clean();
    assert_eq!(size, 95 * MIB);
}

// ---- Restart persistence ------------------------------------------------------------

/// Test 6: patterns survive a clean stop and restart; flushed writes survive kill -9.
fn restart_round(level: Level, file_sizes: &[u64]) {
    if !fixtures::require("qemu-io") {
        return;
    }
    let mut rig = Rig::start(level, file_sizes);
    let first = spans(&rig.geo, 0);
    rig.write_spans(&first, &[]);
    rig.stop_clean();
    rig.assert_superblocks_clean();
    rig.restart();
    rig.verify_spans(&first, &[]);

    // Overwrite every other range and flush, then crash.
    let second: Vec<Span> = first
        .iter()
        .step_by(2)
        .enumerate()
        .map(|(i, s)| s.refilled(100 + i))
        .collect();
    rig.write_spans(&second, &["flush".into()]);
    let status = rig.daemon.kill9().unwrap();
    assert!(
        !status.success(),
        "kill -9 cannot be a clean exit: {status}"
    );
    let expect: Vec<Span> = first
        .iter()
        .enumerate()
        .map(|(i, s)| if i % 2 == 0 { second[i / 2] } else { *s })
        .collect();
    // Acknowledged and flushed: already on every copy, before any recovery runs.
    rig.assert_spans_on_members(&expect);
    rig.restart();
    rig.verify_spans(&expect, &[]);
    rig.assert_members_healthy();
    rig.stop_clean();
    rig.assert_superblocks_clean();
}

#[test]
fn raid0_data_survives_restart_and_kill9() {
    restart_round(RAID0.0, RAID0.1);
}

#[test]
fn raid10_data_survives_restart_and_kill9() {
    restart_round(RAID10_3.0, RAID10_3.1);
}

// ---- Misbehaving clients ------------------------------------------------------------

/// A hand-written NBD client over TCP, for sending exactly the bytes a test wants. Only
/// simple replies are negotiated.
struct RawClient {
    s: TcpStream,
}

impl RawClient {
    fn connect(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        RawClient { s }
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn greeting(&mut self) {
        let g = self.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
    }

    /// Fixed newstyle, no zeroes, then NBD_OPT_GO for `name`: ready for requests.
    fn handshake(port: u16, name: &str) -> RawClient {
        let mut c = RawClient::connect(port);
        c.greeting();
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        c.s.write_all(&opt).unwrap();
        loop {
            let h = c.read_n(20);
            assert_eq!(h[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            c.read_n(len as usize);
            assert_eq!(typ & (1 << 31), 0, "NBD_OPT_GO refused ({typ:#x})");
            if typ == 1 {
                return c;
            }
        }
    }

    fn request(&mut self, typ: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut q = 0x2560_9513u32.to_be_bytes().to_vec();
        q.extend_from_slice(&0u16.to_be_bytes());
        q.extend_from_slice(&typ.to_be_bytes());
        q.extend_from_slice(&handle.to_be_bytes());
        q.extend_from_slice(&offset.to_be_bytes());
        q.extend_from_slice(&len.to_be_bytes());
        q.extend_from_slice(payload);
        self.s.write_all(&q).unwrap();
    }

    /// A simple reply's (error, handle), or None when the server closed the connection.
    fn reply(&mut self) -> Option<(u32, u64)> {
        let mut h = [0u8; 16];
        match self.s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("no reply and no close within {IO_TIMEOUT:?}: {e}"),
        }
        assert_eq!(h[..4], 0x6744_6698u32.to_be_bytes(), "reply magic");
        Some((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// NBD_CMD_READ that must succeed; returns the data.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let handle = offset ^ 0x5eed;
        self.request(0, handle, offset, len, &[]);
        let reply = self.reply();
        assert_eq!(reply, Some((0, handle)), "read of {len} bytes at {offset}");
        self.read_n(len as usize)
    }

    /// Whether the server closes the connection (rather than staying silent) in time.
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue, // an error reply or option reply first is fine
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Test 7: garbage, oversized requests and a client vanishing mid-payload, all while a
/// good client runs verified fio: the daemon stays up, the good client never sees an
/// error, and the interrupted write changed nothing.
#[test]
fn misbehaving_clients_do_not_hurt_the_daemon_or_other_clients() {
    if !fixtures::require_all(&["fio", "qemu-io"]) {
        return;
    }
    let mut rig = Rig::start(Level::Raid1, &[96 * MIB; 2]);
    let port = rig.port;
    // The range the interrupted write targets: unaligned, far from fio's regions.
    let (target, target_len) = (80 * MIB + 333, MIB);
    qemu_io(
        &rig.uri(),
        &[format!("write -P 0x5a {target} {target_len}")],
    );

    // The good client: verified fio runs back to back until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (stop, uri) = (stop.clone(), rig.uri());
        thread::spawn(move || {
            let mut runs = 0;
            while runs == 0 || !stop.load(Ordering::Relaxed) {
                fio_verified(&uri, 16 * MIB, "--bsrange=4k-64k");
                runs += 1;
            }
            runs
        })
    };
    let deadline = Instant::now() + IO_TIMEOUT;
    while rig.connections() < 2 {
        assert!(Instant::now() < deadline, "fio never connected");
        thread::sleep(Duration::from_millis(20));
    }

    // Idle connections, before and during negotiation, held open throughout.
    let idle = [RawClient::connect(port), {
        let mut c = RawClient::connect(port);
        c.greeting();
        c
    }];
    // Garbage before the greeting is even read.
    {
        let mut c = RawClient::connect(port);
        let junk: Vec<u8> = Rng::new(7).bytes(64 * KIB as usize);
        let _ = c.s.write_all(&junk);
        assert!(c.closed_by_server(), "garbage client not disconnected");
    }
    // Unknown client flags.
    {
        let mut c = RawClient::connect(port);
        c.greeting();
        c.s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
        assert!(c.closed_by_server(), "bad client flags not refused");
    }
    // A wrong option magic.
    {
        let mut c = RawClient::connect(port);
        c.greeting();
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c.s.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").unwrap();
        assert!(c.closed_by_server(), "wrong option magic not refused");
    }
    // A wrong request magic after a valid handshake.
    {
        let mut c = RawClient::handshake(port, &rig.name);
        c.s.write_all(&[0xee; 28]).unwrap();
        assert!(c.closed_by_server(), "wrong request magic not refused");
    }
    // A WRITE announcing ~4 GiB of payload: refused (error or disconnect), never waited on.
    {
        let mut c = RawClient::handshake(port, &rig.name);
        c.request(1, 1, 0, 0xffff_f000, &[0xee; 4096]);
        if let Some((err, h)) = c.reply() {
            assert_eq!(h, 1);
            assert_ne!(err, 0, "a 4 GiB write was acknowledged");
        }
    }
    // A READ of ~4 GiB and requests past the end: errors, and the connection stays usable.
    {
        let mut c = RawClient::handshake(port, &rig.name);
        c.request(0, 2, 0, u32::MAX, &[]);
        match c.reply() {
            None => {} // disconnecting is allowed too
            Some((err, h)) => {
                assert_eq!(h, 2);
                assert_ne!(err, 0, "a 4 GiB read succeeded");
                c.request(0, 3, rig.size() - 512, 4096, &[]);
                let (err, h) = c.reply().expect("reply to a read past the end");
                assert_eq!(h, 3);
                assert_ne!(err, 0, "a read past the end succeeded");
                c.request(0, 4, u64::MAX - 4095, 4096, &[]);
                assert_ne!(c.reply().expect("reply to a wrapping read").0, 0);
                c.request(0, 5, target, 4096, &[]);
                assert_eq!(c.reply(), Some((0, 5)), "a good read after bad ones");
                assert_eq!(c.read_n(4096), vec![0x5a; 4096]);
            }
        }
    }
    // Half a WRITE payload, then the client goes away: nothing acknowledged or written.
    {
        let mut c = RawClient::handshake(port, &rig.name);
        c.request(
            1,
            9,
            target,
            target_len as u32,
            &vec![0xee; 300 * KIB as usize],
        );
        c.s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = c.s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "a half-sent write got a reply: {rest:?}");
    }
    drop(idle);

    assert!(
        fixtures::pid_alive(rig.daemon.pid().unwrap()),
        "ublkd died; log:\n{}",
        rig.daemon.log()
    );
    stop.store(true, Ordering::Relaxed);
    let runs = good
        .join()
        .expect("the good client's fio runs all verified");
    assert!(runs >= 1);
    // A fresh client works and the interrupted write's range is unchanged.
    qemu_io(
        &rig.unix_uri(),
        &[
            format!("read -P 0x5a {target} {target_len}"),
            format!("read -P 0 {} 333", target - 333),
            format!("read -P 0 {} 4096", target + target_len),
            "write -P 0x77 12345 6789".into(),
            "read -P 0x77 12345 6789".into(),
        ],
    );
    rig.assert_members_healthy();
    rig.stop_clean();
    rig.assert_on_members(target, &vec![0x5a; target_len as usize]);
}

// ---- Concurrent writes sharing blocks ---------------------------------------------

/// Two connections, each pipelining 2000 writes of 500 bytes without waiting for replies,
/// interleaved so every 4 KiB block (and most 512-byte sectors) is shared by writes from
/// both connections that are in flight at once. Every write must land: a
/// read-modify-write that is not serialised per block loses some of them. Two rounds, the
/// second over the first's data, so a stale read-modify-write shows too.
#[test]
fn concurrent_unaligned_writes_sharing_blocks_all_land() {
    const N: u64 = 2000;
    const PIECE: u64 = 500;
    if !fixtures::require("qemu-io") {
        return;
    }
    let mut rig = Rig::start(RAID10_3.0, RAID10_3.1);
    // Start just before a chunk boundary: the region crosses 31 chunks.
    let base = 7 * CHUNK - 1234;
    let region = 2 * N * PIECE;
    let piece = move |conn: u64, k: u64| base + (2 * k + conn) * PIECE;
    let seed = |round: u64, conn: u64| 7000 + 10 * round + conn;
    for round in 0..2 {
        let writers: Vec<_> = (0..2u64)
            .map(|conn| {
                let (port, name) = (rig.port, rig.name.clone());
                thread::spawn(move || {
                    let mut c = RawClient::handshake(port, &name);
                    for k in 0..N {
                        let off = piece(conn, k);
                        let data = fixtures::pattern(seed(round, conn), off, PIECE as usize);
                        c.request(1, k, off, PIECE as u32, &data);
                    }
                    let mut seen = vec![false; N as usize];
                    for _ in 0..N {
                        let (err, h) = c.reply().expect("server closed mid-run");
                        assert_eq!(err, 0, "write {h} of connection {conn} failed");
                        assert!(!std::mem::replace(&mut seen[h as usize], true));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("a writer failed");
        }
        let mut c = RawClient::handshake(rig.port, &rig.name);
        let got = c.read(base, region as u32);
        for k in 0..N {
            for conn in 0..2 {
                let off = piece(conn, k);
                let at = (off - base) as usize;
                fixtures::verify_pattern(seed(round, conn), off, &got[at..at + PIECE as usize])
                    .unwrap_or_else(|e| panic!("round {round}, connection {conn}: {e:#}"));
            }
        }
        // Untouched neighbours stay zero.
        qemu_io(
            &rig.uri(),
            &zero_cmds(&[(base - 4096, 4096), (base + region, 4096)]),
        );
    }
    rig.assert_members_healthy();
    rig.stop_clean();
    for k in 0..N {
        for conn in 0..2 {
            let off = piece(conn, k);
            rig.assert_on_members(off, &fixtures::pattern(seed(1, conn), off, PIECE as usize));
        }
    }
}

// ---- SIGTERM while busy -------------------------------------------------------------

/// Test 8: SIGTERM during a heavy fio write run: the daemon drains, exits 0 within 30 s,
/// logs the clean stop, and every member's superblock says clean; it then starts again
/// with every member healthy.
#[test]
fn sigterm_under_load_drains_and_marks_superblocks_clean() {
    if !fixtures::require("fio") {
        return;
    }
    let mut rig = Rig::start(Level::Raid10, &[96 * MIB; 4]);
    let uri_arg = format!("--uri={}", rig.uri());
    let load = thread::spawn(move || {
        let args = [
            "--name=load",
            "--ioengine=nbd",
            uri_arg.as_str(),
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=64M",
            "--offset_increment=64M",
            "--time_based",
            "--runtime=60",
        ];
        fixtures::fio(&args)
    });
    let deadline = Instant::now() + IO_TIMEOUT;
    while rig.connections() < 2 {
        assert!(Instant::now() < deadline, "fio never connected");
        thread::sleep(Duration::from_millis(20));
    }
    // Clients that hold connections without finishing anything must not hold up the stop:
    // one that never negotiates, one idle after negotiating, one stuck half-way through
    // a request header, one stuck half-way through a write payload.
    let mut idle = vec![RawClient::connect(rig.port)];
    idle.push(RawClient::handshake(rig.port, &rig.name));
    let mut c = RawClient::handshake(rig.port, &rig.name);
    c.s.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
    idle.push(c);
    let mut c = RawClient::handshake(rig.port, &rig.name);
    c.request(1, 1, 0, 65536, &[0xab; 1000]);
    idle.push(c);
    thread::sleep(Duration::from_secs(2));
    let busy = rig.status();
    let written: u64 = busy["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["bytes_written"].as_u64().unwrap())
        .sum();
    assert!(written > 0, "fio had not written anything yet: {busy}");

    rig.stop_clean();
    drop(idle);
    let log = rig.daemon.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    rig.assert_superblocks_clean();
    // fio loses its server; it must end (with an error) rather than hang.
    let _ = load.join().expect("fio thread");

    rig.restart();
    rig.assert_members_healthy();
    assert_eq!(rig.status()["state"], "optimal", "{}", rig.status());
    rig.stop_clean();
    rig.assert_superblocks_clean();
}

/// SIGTERM while a client pipelines unaligned writes: every write the daemon acknowledged
/// before it went away is on the members afterwards (the drain finishes what it accepted),
/// and the daemon still stops clean.
#[test]
fn sigterm_keeps_every_acknowledged_write() {
    const LEN: u64 = 4096;
    let mut rig = Rig::start(RAID0.0, RAID0.1);
    let off = |k: u64| 100 + k * LEN; // every write straddles two 4 KiB blocks
    let max = (rig.size() - 100) / LEN;
    let mut c = RawClient::handshake(rig.port, &rig.name);
    let mut replies = RawClient {
        s: c.s.try_clone().unwrap(),
    };
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let sent = sent.clone();
        thread::spawn(move || {
            for k in 0..max {
                let data = fixtures::pattern(99, off(k), LEN as usize);
                let mut q = Vec::with_capacity(28 + LEN as usize);
                q.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                q.extend_from_slice(&[0, 0, 0, 1]); // flags 0, NBD_CMD_WRITE
                q.extend_from_slice(&k.to_be_bytes());
                q.extend_from_slice(&off(k).to_be_bytes());
                q.extend_from_slice(&(LEN as u32).to_be_bytes());
                q.extend_from_slice(&data);
                if c.s.write_all(&q).is_err() {
                    break;
                }
                sent.store(k + 1, Ordering::Relaxed);
            }
        })
    };
    let acks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acker = {
        let acks = acks.clone();
        thread::spawn(move || {
            let mut acked = Vec::new();
            while let Some((err, h)) = replies.reply() {
                // NBD_ESHUTDOWN: refused because the server is stopping (not acknowledged).
                if err == 108 {
                    continue;
                }
                assert_eq!(err, 0, "write {h} failed");
                acked.push(h);
                acks.fetch_add(1, Ordering::Relaxed);
            }
            acked
        })
    };
    // SIGTERM with about a thousand writes acknowledged and many more in flight.
    let deadline = Instant::now() + IO_TIMEOUT;
    while acks.load(Ordering::Relaxed) < 1000 {
        assert!(Instant::now() < deadline, "the writer is stuck");
        thread::sleep(Duration::from_millis(5));
    }
    rig.stop_clean();
    let acked = acker.join().expect("every acknowledged write succeeded");
    writer.join().unwrap();
    assert!(
        acked.len() >= 1000,
        "only {} writes were acknowledged",
        acked.len()
    );
    rig.assert_superblocks_clean();
    for k in acked {
        rig.assert_on_members(off(k), &fixtures::pattern(99, off(k), LEN as usize));
    }
}
