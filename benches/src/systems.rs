//! The systems under test, grouped into comparisons: the first system of each group is
//! uniblk, the others are its peers, and every ratio is uniblk / peer within a group.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fixtures::{pid_alive, Nbdkit, NbdkitServer, QemuNbd, QuietDaemon, DIR_PLACEHOLDER};

use crate::jobs::{Region, Target};

/// Every array's data starts 1 MiB into each member (DESIGN.md, on-disk metadata).
pub const DATA_OFFSET: u64 = 1 << 20;
/// The size of nbdkit's memory and null disks, and of uniblk's `mem:` / `null:` members
/// (spelt [`DISK`] in a layout).
pub const DISK_SIZE: u64 = 1 << 30;
const DISK: &str = "1GiB";
/// The export name of every uniblk array here.
const ARRAY: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// How a system is started and reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// uniblk, a `linear` array of one `mem:1GiB` member.
    UniblkMem(Transport),
    /// `nbdkit memory 1G`.
    NbdkitMemory(Transport),
    /// uniblk `raid1` over the two member files.
    UniblkRaid1,
    /// `qemu-nbd -f raw --cache=none --aio=io_uring` on the first member file.
    QemuNbd,
    /// fio's io_uring engine, O_DIRECT, on the first member file: no server at all.
    FioDirect,
    /// uniblk, a `linear` array of one `null:1GiB` member.
    UniblkNull,
    /// `nbdkit null 1G`.
    NbdkitNull,
}

impl Kind {
    /// Memory disks start as holes; they are written once before reads are measured.
    pub fn needs_prefill(self) -> bool {
        matches!(self, Kind::UniblkMem(_) | Kind::NbdkitMemory(_))
    }

    /// Whether this system serves the two member files (made once per run).
    pub fn uses_files(self) -> bool {
        matches!(self, Kind::UniblkRaid1 | Kind::QemuNbd | Kind::FioDirect)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct System {
    pub group: &'static str,
    pub name: &'static str,
    pub kind: Kind,
}

impl System {
    const fn new(group: &'static str, name: &'static str, kind: Kind) -> Self {
        Self { group, name, kind }
    }

    pub fn is_uniblk(&self) -> bool {
        self.name == "uniblk"
    }
}

/// Every system, group by group, uniblk first in each group.
pub const SYSTEMS: [System; 9] = [
    System::new("mem-unix", "uniblk", Kind::UniblkMem(Transport::Unix)),
    System::new("mem-unix", "nbdkit", Kind::NbdkitMemory(Transport::Unix)),
    System::new("mem-tcp", "uniblk", Kind::UniblkMem(Transport::Tcp)),
    System::new("mem-tcp", "nbdkit", Kind::NbdkitMemory(Transport::Tcp)),
    System::new("raid1-file", "uniblk", Kind::UniblkRaid1),
    System::new("raid1-file", "qemu-nbd", Kind::QemuNbd),
    System::new("raid1-file", "fio-direct", Kind::FioDirect),
    System::new("null", "uniblk", Kind::UniblkNull),
    System::new("null", "nbdkit", Kind::NbdkitNull),
];

/// A running system: the server process (none for fio-direct) and how fio reaches it.
pub struct Running {
    server: Server,
    pub target: Target,
    /// Where the benchmark's bytes live on this target.
    pub region: Region,
}

enum Server {
    Uniblk(QuietDaemon),
    Nbdkit(NbdkitServer),
    QemuNbd(QemuNbd),
    None,
}

impl Running {
    /// The server's PID, for CPU time and memory; `None` when there is no server.
    pub fn pid(&self) -> Option<u32> {
        match &self.server {
            Server::Uniblk(d) => Some(d.pid()),
            Server::Nbdkit(s) => Some(s.pid()),
            Server::QemuNbd(q) => Some(q.pid()),
            Server::None => None,
        }
    }

    /// Stops the server and checks it is gone. A daemon that does not exit 0 on SIGTERM
    /// failed its clean shutdown, which is worth a failure here too.
    pub fn stop(mut self) -> Result<()> {
        let pid = self.pid();
        match &mut self.server {
            Server::Uniblk(d) => {
                let status = d.stop()?;
                if !status.success() {
                    bail!(
                        "uniblk daemon exited {status} on SIGTERM; its log:\n{}",
                        d.log()
                    );
                }
            }
            Server::Nbdkit(s) => s.stop()?,
            Server::QemuNbd(q) => q.stop()?,
            Server::None => {}
        }
        if let Some(pid) = pid.filter(|&p| pid_alive(p)) {
            bail!("server {pid} is still alive after stop");
        }
        Ok(())
    }
}

/// What starting a system needs from the run.
pub struct Env<'a> {
    pub daemon_bin: &'a Path,
    /// The two raid1 member files (already written), when a file system is started.
    pub files: Option<&'a [PathBuf; 2]>,
    /// Bytes each job works on.
    pub size: u64,
}

/// Starts `sys` and returns how to reach it.
pub fn start(sys: &System, env: &Env) -> Result<Running> {
    let nbd_region = Region {
        offset: 0,
        size: env.size,
    };
    // qemu-nbd and fio see the whole file: point them at the bytes uniblk stores data in.
    let file_region = Region {
        offset: DATA_OFFSET,
        size: env.size,
    };
    let (server, target) = match sys.kind {
        Kind::UniblkMem(t) => uniblk(env, "linear", &[format!("mem:{DISK}")], t)?,
        Kind::UniblkNull => uniblk(env, "linear", &[format!("null:{DISK}")], Transport::Unix)?,
        Kind::UniblkRaid1 => {
            let members: Vec<String> = files(env)?
                .iter()
                .map(|f| format!("file:{}", f.display()))
                .collect();
            uniblk(env, "raid1", &members, Transport::Unix)?
        }
        Kind::NbdkitMemory(t) => nbdkit("memory", t)?,
        Kind::NbdkitNull => nbdkit("null", Transport::Unix)?,
        Kind::QemuNbd => qemu_nbd(&files(env)?[0])?,
        Kind::FioDirect => {
            let path = files(env)?[0].clone();
            return Ok(Running {
                server: Server::None,
                target: Target::File { path },
                region: file_region,
            });
        }
    };
    let region = if sys.kind == Kind::QemuNbd {
        file_region
    } else {
        nbd_region
    };
    Ok(Running {
        server,
        target,
        region,
    })
}

fn files<'a>(env: &Env<'a>) -> Result<&'a [PathBuf; 2]> {
    env.files.context("member files were not prepared")
}

/// The daemon at `warn`: debug logging per request would be what we measure.
fn uniblk(env: &Env, level: &str, members: &[String], t: Transport) -> Result<(Server, Target)> {
    let listen = match t {
        Transport::Unix => format!("unix:{DIR_PLACEHOLDER}/{ARRAY}.sock"),
        Transport::Tcp => format!("127.0.0.1:{}", fixtures::free_port()?),
    };
    let layout = layout_toml(level, members, &listen);
    let d = QuietDaemon::start(env.daemon_bin, &layout, "warn")?;
    let uri = match t {
        Transport::Unix => format!(
            "nbd+unix:///{ARRAY}?socket={}/{ARRAY}.sock",
            d.dir().display()
        ),
        Transport::Tcp => format!("nbd://{}/{ARRAY}", &listen),
    };
    Ok((Server::Uniblk(d), Target::Nbd { uri }))
}

/// A one-array layout exported over NBD on `listen`.
pub fn layout_toml(level: &str, members: &[String], listen: &str) -> String {
    let members: Vec<String> = members.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[array]]\nname = \"{ARRAY}\"\nlevel = \"{level}\"\nmembers = [{}]\n\
         export.nbd = {{ listen = [\"{listen}\"] }}\n",
        members.join(", ")
    )
}

fn nbdkit(plugin: &str, t: Transport) -> Result<(Server, Target)> {
    let mut spec = Nbdkit::plugin(plugin, &[&format!("size={DISK_SIZE}")]);
    if t == Transport::Tcp {
        spec = spec.tcp();
    }
    let s = spec
        .start()
        .with_context(|| format!("starting nbdkit {plugin}"))?;
    let uri = s.uri();
    Ok((Server::Nbdkit(s), Target::Nbd { uri }))
}

fn qemu_nbd(file: &Path) -> Result<(Server, Target)> {
    let q = QemuNbd::serve_with(file, &["--cache=none", "--aio=io_uring"])
        .context("starting qemu-nbd")?;
    let uri = q.uri();
    Ok((Server::QemuNbd(q), Target::Nbd { uri }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_starts_with_uniblk_and_has_a_peer() {
        for (i, s) in SYSTEMS.iter().enumerate() {
            let first_of_group = i == 0 || SYSTEMS[i - 1].group != s.group;
            assert_eq!(first_of_group, s.is_uniblk(), "{s:?}");
            if first_of_group {
                assert!(SYSTEMS.get(i + 1).is_some_and(|n| n.group == s.group));
            }
        }
    }

    #[test]
    fn layout_names_members_and_listener() {
        let t = layout_toml(
            "raid1",
            &["file:/tmp/a".into(), "file:/tmp/b".into()],
            "unix:/x.sock",
        );
        assert!(
            t.contains("members = [\"file:/tmp/a\", \"file:/tmp/b\"]"),
            "{t}"
        );
        assert!(t.contains("listen = [\"unix:/x.sock\"]"), "{t}");
        assert!(t.contains("level = \"raid1\""), "{t}");
    }
}
