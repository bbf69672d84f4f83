//! `cargo xtask vm-test`: the tests that need a kernel with ublk and nbd, run in a
//! throw-away QEMU guest.
//!
//! The host kernel here has neither driver and cannot load modules, so the guest runs
//! Debian bookworm-backports' 6.12 kernel under TCG (the host's /dev/kvm cannot boot a
//! stock kernel). The guest's root file system is the host's `/`, shared read-only over
//! 9p under a tmpfs overlay, and the workspace is shared read-write at the same path, so
//! host-built binaries and host-installed tools (fio, mkfs.ext4, nbd-client) run there
//! unchanged. A busybox initramfs sets that up, runs `ublkd/tests/guest/run.sh` and
//! writes its exit code to a shared directory; that exit code is ours.
//!
//! Everything the guest needs is fetched on first use into a cache directory (default
//! /var/cache/uniblk-vm): qemu-system-x86 (from bookworm-backports, matching the
//! preinstalled qemu-utils 10; bookworm's 7.2 would remove it), kmod, xz-utils and zstd
//! are installed with a separate apt configuration, so the system's sources stay as they
//! are; the kernel and busybox-static packages are only downloaded and unpacked.
//!
//! Environment: UNIBLK_VM_CACHE (cache directory), UNIBLK_VM_TIMEOUT (seconds, default
//! 900), UNIBLK_VM_MEM (default 3G), UNIBLK_VM_SMP (default 2), UNIBLK_VM_ACCEL (default
//! tcg; kvm where /dev/kvm can boot a stock kernel).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::packages::{self, have};
use crate::steps::Summary;

const DEFAULT_CACHE: &str = "/var/cache/uniblk-vm";
/// The guest-side test runner, relative to the workspace root.
const GUEST_RUNNER: &str = "ublkd/tests/guest/run.sh";
const DEFAULT_TIMEOUT_SECS: u64 = 900;
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// What the guest's PATH is (the host's own may hold shims that make no sense there).
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Host tools the harness runs, and the packages that bring them.
const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];
/// Kernel modules the initramfs loads to reach its root file system (9p, overlay).
const INIT_MODULES: &[&str] = &[
    "fs/netfs/netfs",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
];

/// The guest's /init. `vm_w` (workspace) and `vm_c` (cache) come from the kernel command
/// line. The host's root is mounted read-only under a tmpfs overlay; the workspace
/// read-write at its own path; the cache's kernel modules as /usr/lib/modules.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox o=trans=virtio,version=9p2000.L,msize=512000
$B mount -t proc p /proc
for m in netfs 9pnet 9pnet_virtio 9p overlay; do $B insmod /m/$m.ko; done
$B mount -t 9p -o ro,cache=loose,$o root /h; $B mount -t 9p -o $o io /io; $B mount -t tmpfs t /o
$B mkdir /o/u /o/w; $B mount -t overlay -o lowerdir=/h,upperdir=/o/u,workdir=/o/w o /r; cd /r
$B mkdir -p usr/lib/modules; $B mount --bind ".$vm_c/k/lib/modules" usr/lib/modules
$B mount -t sysfs s sys; $B mount -t proc p proc; $B mount -t devtmpfs d dev; $B mkdir -p dev/pts dev/shm
$B mount -t devpts p dev/pts; for d in dev/shm tmp run; do $B mount -t tmpfs t $d; done
$B ln -sf /proc/self/fd dev/fd; $B ln -sf /proc/self/fd/0 dev/stdin
$B ln -sf /proc/self/fd/1 dev/stdout; $B ln -sf /proc/self/fd/2 dev/stderr
$B mkdir -p ".$vm_w"; $B mount -t 9p -o $o,cache=mmap work ".$vm_w"; $B ip link set lo up; $B stty -onlcr
$B chroot /r /bin/bash -c "$($B cat /io/cmd)"; echo $? >/io/rc; echo 0 >/proc/sys/kernel/printk; $B poweroff -f
"#;

/// The kernel's request_module() runs /sbin/modprobe in the initramfs's view; the real one
/// lives in the overlay root.
const MODPROBE: &str = "#!/bin/busybox sh\nexec /bin/busybox chroot /r /sbin/modprobe \"$@\"\n";

#[derive(Debug, Default)]
pub struct Opts {
    no_install: bool,
    release: bool,
    filters: Vec<String>,
}

pub fn parse(args: &[String]) -> Result<Opts> {
    let mut opts = Opts::default();
    let mut it = args.iter();
    for a in it.by_ref() {
        match a.as_str() {
            "--no-install" => opts.no_install = true,
            "--release" => opts.release = true,
            "--" => break,
            other => bail!("unknown option '{other}' (guest test names go after --)"),
        }
    }
    opts.filters = it.cloned().collect();
    if let Some(bad) = opts.filters.iter().find(|f| {
        !f.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
    }) {
        bail!("guest test name '{bad}' may only hold letters, digits, '_' and '-'");
    }
    Ok(opts)
}

/// Runs every step; `Ok(false)` when any failed.
pub fn run(opts: &Opts) -> Result<bool> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    let cache = Cache::new()?;
    let mut summary = Summary::default();
    let mut guest = None;
    let ready = (opts.no_install
        || summary.step("install Debian packages", packages::ensure_installed))
        && summary.step("VM tools, guest kernel and initramfs", || {
            guest = Some(cache.prepare()?);
            Ok(())
        })
        && summary.command(
            build_step_name(opts.release),
            cargo_build(opts.release).current_dir(&root),
        );
    if let (true, Some(guest)) = (ready, guest) {
        let bin = bin_dir(&root, opts.release);
        summary.step("guest tests (QEMU)", || {
            let rc = guest.run(&root, &guest_command(&root, &bin, &opts.filters))?;
            anyhow::ensure!(rc == 0, "guest tests failed (exit code {rc})");
            Ok(())
        });
    }
    summary.print();
    Ok(summary.all_ok())
}

fn build_step_name(release: bool) -> &'static str {
    if release {
        "cargo build --release ublkd uniblk"
    } else {
        "cargo build ublkd uniblk"
    }
}

/// Debug by default. Measured on 2 cores: a release build makes the guest run about 20%
/// faster (fio-heavy tests twice as fast), but compiling it from scratch takes about three
/// minutes, while CI's `cargo xtask test` has already built the debug binaries.
fn cargo_build(release: bool) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args(["build", "-p", "ublkd", "-p", "mgmt", "--bins"]);
    if release {
        c.arg("--release");
    }
    c
}

fn bin_dir(root: &Path, release: bool) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    root.join(target)
        .join(if release { "release" } else { "debug" })
}

/// The shell command the guest runs (as root, in the workspace).
fn guest_command(root: &Path, bin: &Path, filters: &[String]) -> String {
    format!(
        "export PATH={GUEST_PATH} HOME=/root TERM=dumb UNIBLK_BIN='{}'\ncd '{}' || exit 125\nbash {GUEST_RUNNER} {}\n",
        bin.display(),
        root.display(),
        filters.join(" ")
    )
}

/// xtask lives one level below the workspace root.
fn workspace_root() -> Result<PathBuf> {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// The cache directory and the apt configuration that keeps its sources apart.
struct Cache {
    dir: PathBuf,
}

/// A bootable guest: kernel and initramfs.
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    cache: PathBuf,
}

impl Cache {
    fn new() -> Result<Cache> {
        let dir =
            std::env::var_os("UNIBLK_VM_CACHE").map_or_else(|| DEFAULT_CACHE.into(), PathBuf::from);
        fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the VM cache {} (run as root, or set UNIBLK_VM_CACHE)",
                dir.display()
            )
        })?;
        let dir = fs::canonicalize(&dir)?;
        check_path_chars(&dir)?;
        Ok(Cache { dir })
    }

    fn prepare(&self) -> Result<Guest> {
        let missing: Vec<&str> = VM_TOOLS
            .iter()
            .filter(|(bin, _)| !have(bin))
            .map(|(_, pkg)| *pkg)
            .collect();
        let kv = self.kernel_version();
        if !missing.is_empty() || kv.is_none() {
            self.apt(&["update"])?;
        }
        if !missing.is_empty() {
            println!(
                "xtask: installing {} from bookworm-backports",
                missing.join(" ")
            );
            self.apt(&[&["install", "-y", "--no-install-recommends"], &missing[..]].concat())?;
        }
        let kv = match kv {
            Some(kv) => kv,
            None => self.fetch_kernel()?,
        };
        let initrd = self.initramfs(&kv)?;
        Ok(Guest {
            kernel: self.kernel_image(&kv)?,
            initrd,
            cache: self.dir.clone(),
        })
    }

    /// The unpacked kernel's version, when the cache holds one.
    fn kernel_version(&self) -> Option<String> {
        let mut dirs = fs::read_dir(self.dir.join("k/lib/modules")).ok()?;
        let kv = dirs.next()?.ok()?.file_name().into_string().ok()?;
        let complete = self
            .dir
            .join("k/boot")
            .join(format!("vmlinuz-{kv}"))
            .exists()
            && self.dir.join("bb/bin/busybox").exists();
        complete.then_some(kv)
    }

    fn apt_opts(&self) -> Vec<String> {
        let d = self.dir.display();
        let mut v = vec!["-q".to_string()];
        for o in [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/apt"),
            "APT::Sandbox::User=root".into(),
            "DPkg::Lock::Timeout=300".into(),
        ] {
            v.push("-o".into());
            v.push(o);
        }
        v.extend(["-t".into(), "bookworm-backports".into()]);
        v
    }

    /// apt-get with the cache's own sources (bookworm, -updates, -backports, -security).
    fn apt(&self, args: &[&str]) -> Result<()> {
        let sources = "deb http://deb.debian.org/debian bookworm main\n\
                       deb http://deb.debian.org/debian bookworm-updates main\n\
                       deb http://deb.debian.org/debian bookworm-backports main\n\
                       deb http://deb.debian.org/debian-security bookworm-security main\n";
        fs::write(self.dir.join("sources.list"), sources)?;
        for d in ["lists/partial", "apt/archives/partial", "dl"] {
            fs::create_dir_all(self.dir.join(d))?;
        }
        sh(Command::new("apt-get")
            .args(self.apt_opts())
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .current_dir(self.dir.join("dl")))
    }

    /// Download and unpack the backports kernel and busybox-static; returns the version.
    fn fetch_kernel(&self) -> Result<String> {
        let out = Command::new("apt-cache")
            .args(self.apt_opts())
            .args(["depends", "linux-image-amd64"])
            .output()
            .context("cannot run apt-cache")?;
        let pkg = kernel_package(&String::from_utf8_lossy(&out.stdout))
            .context("apt-cache depends linux-image-amd64 names no kernel package")?;
        println!("xtask: downloading {pkg} and busybox-static");
        let dl = self.dir.join("dl");
        let _ = fs::remove_dir_all(&dl);
        self.apt(&["download", &pkg, "busybox-static"])?;
        for (prefix, into) in [(pkg.as_str(), "k"), ("busybox-static", "bb")] {
            let deb = find_deb(&dl, prefix)?;
            let target = self.dir.join(into);
            let _ = fs::remove_dir_all(&target);
            sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&target))?;
        }
        let _ = fs::remove_dir_all(&dl);
        let kv = self
            .kernel_version()
            .context("the kernel package holds no lib/modules/VERSION")?;
        sh(Command::new("depmod")
            .arg("-b")
            .arg(self.dir.join("k"))
            .arg(&kv))?;
        Ok(kv)
    }

    /// The uncompressed kernel (qboot boots it through its PVH entry, a second faster than
    /// the bzImage), extracted once; the bzImage when extraction is impossible.
    fn kernel_image(&self, kv: &str) -> Result<PathBuf> {
        let bz = self.dir.join("k/boot").join(format!("vmlinuz-{kv}"));
        let elf = self.dir.join(format!("vmlinux-{kv}"));
        if is_elf(&elf) {
            return Ok(elf);
        }
        let image = fs::read(&bz).with_context(|| format!("cannot read {}", bz.display()))?;
        if let Some(at) = find(&image, &[0x28, 0xb5, 0x2f, 0xfd]) {
            unzstd(&image[at..], &elf)?;
        }
        Ok(if is_elf(&elf) { elf } else { bz })
    }

    /// A newc cpio (uncompressed; the kernel takes it as is) with busybox, the 9p and
    /// overlay modules, a modprobe wrapper and /init. Rebuilt every run: it takes a
    /// moment, and the init script may have changed.
    fn initramfs(&self, kv: &str) -> Result<PathBuf> {
        let mut c = cpio::Writer::default();
        for d in ["bin", "sbin", "m", "proc", "h", "o", "r", "io", "dev"] {
            c.dir(d);
        }
        c.char_dev("dev/console", 5, 1);
        c.file(
            "bin/busybox",
            0o755,
            &fs::read(self.dir.join("bb/bin/busybox"))?,
        );
        c.file("sbin/modprobe", 0o755, MODPROBE.as_bytes());
        c.file("init", 0o755, INIT.as_bytes());
        let mods = self.dir.join("k/lib/modules").join(kv).join("kernel");
        for m in INIT_MODULES {
            let name = m.rsplit('/').next().unwrap_or(m);
            c.file(
                &format!("m/{name}.ko"),
                0o644,
                &unxz(&mods.join(format!("{m}.ko.xz")))?,
            );
        }
        let path = self.dir.join("initrd.cpio");
        let tmp = self.dir.join("initrd.cpio.tmp");
        fs::write(&tmp, c.finish())?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

impl Guest {
    /// Boot, run `cmd` in the guest, return its exit code.
    fn run(&self, root: &Path, cmd: &str) -> Result<i32> {
        check_path_chars(root)?;
        let io = std::env::temp_dir().join(format!("uniblk-vm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&io);
        fs::create_dir_all(&io)?;
        fs::write(io.join("cmd"), cmd)?;
        let r = self.boot(root, &io);
        let rc = fs::read_to_string(io.join("rc"));
        let _ = fs::remove_dir_all(&io);
        r?;
        let rc = rc.context("the guest stopped before its tests finished (no exit code); see the console output above")?;
        rc.trim()
            .parse()
            .with_context(|| format!("the guest wrote a strange exit code '{}'", rc.trim()))
    }

    fn boot(&self, root: &Path, io: &Path) -> Result<()> {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let timeout = Duration::from_secs(
            env("UNIBLK_VM_TIMEOUT", "")
                .parse()
                .unwrap_or(DEFAULT_TIMEOUT_SECS),
        );
        let append = format!(
            "console=ttyS0 panic=-1 quiet vm_w={} vm_c={}",
            root.display(),
            self.cache.display()
        );
        let share = |path: &Path, tag: &str, extra: &str| {
            format!(
                "local,path={},mount_tag={tag},security_model=none{extra}",
                path.display()
            )
        };
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", &env("UNIBLK_VM_ACCEL", "tcg"), "-cpu", "max"])
            .args([
                "-m",
                &env("UNIBLK_VM_MEM", "3G"),
                "-smp",
                &env("UNIBLK_VM_SMP", "2"),
            ])
            .args(["-nographic", "-no-reboot", "-nic", "none", "-bios", QBOOT])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &append])
            .args([
                "-virtfs",
                &share(Path::new("/"), "root", ",readonly=on,multidevs=remap"),
            ])
            .args(["-virtfs", &share(io, "io", "")])
            .args(["-virtfs", &share(root, "work", ",multidevs=remap")])
            .stdin(Stdio::null());
        println!("xtask: booting the guest (timeout {}s)", timeout.as_secs());
        wait_with_timeout(&mut qemu, timeout)
    }
}

/// Run a command to completion, killing it after `timeout`.
fn wait_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<()> {
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not finish within {}s and was killed (set UNIBLK_VM_TIMEOUT to allow longer)",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// 9p options are comma-separated and the kernel command line space-separated.
fn check_path_chars(p: &Path) -> Result<()> {
    let s = p.to_string_lossy();
    if s.contains([',', ' ', '\t', '\n', '\'']) {
        bail!(
            "path {s} holds a comma, quote or blank, which the VM's 9p shares and kernel command line cannot carry; move it"
        );
    }
    Ok(())
}

/// The versioned kernel package in `apt-cache depends linux-image-amd64` output.
fn kernel_package(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
}

fn find_deb(dir: &Path, prefix: &str) -> Result<PathBuf> {
    fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{prefix}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {prefix}_*.deb in {}",
                dir.display()
            )
        })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_elf(p: &Path) -> bool {
    let mut head = [0u8; 4];
    fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && head == *b"\x7fELF"
}

/// Decompress a zstd stream that is followed by other data (zstd then complains about
/// the tail, but the output is whole).
fn unzstd(data: &[u8], out: &Path) -> Result<()> {
    let file = fs::File::create(out)?;
    let mut child = Command::new("zstd")
        .args(["-dcq"])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run zstd")?;
    if let Some(mut stdin) = child.stdin.take() {
        // zstd stops reading at the end of its frame: a broken pipe here is expected.
        let _ = stdin.write_all(data);
    }
    let _ = child.wait();
    Ok(())
}

fn unxz(path: &Path) -> Result<Vec<u8>> {
    let out = Command::new("xz")
        .arg("-dc")
        .arg(path)
        .output()
        .context("cannot run xz")?;
    anyhow::ensure!(
        out.status.success(),
        "xz -dc {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Just enough of the cpio "newc" format for an initramfs.
mod cpio {
    #[derive(Default)]
    pub struct Writer {
        out: Vec<u8>,
        ino: u32,
    }

    impl Writer {
        pub fn dir(&mut self, name: &str) {
            self.entry(name, 0o040_755, 2, (0, 0), &[]);
        }

        pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
            self.entry(name, 0o100_000 | perm, 1, (0, 0), data);
        }

        pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
            self.entry(name, 0o020_600, 1, (major, minor), &[]);
        }

        pub fn finish(mut self) -> Vec<u8> {
            self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
            self.out
        }

        fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
            self.ino += 1;
            let fields = [
                self.ino,
                mode,
                0,
                0,
                nlink,
                0,
                data.len() as u32,
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() as u32 + 1,
                0,
            ];
            self.out.extend_from_slice(b"070701");
            for f in fields {
                self.out.extend_from_slice(format!("{f:08X}").as_bytes());
            }
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(0);
            self.pad();
            self.out.extend_from_slice(data);
            self.pad();
        }

        fn pad(&mut self) {
            while self.out.len() & 3 != 0 {
                self.out.push(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_is_found_in_apt_cache_output() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";
        assert_eq!(
            kernel_package(out).as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
        assert_eq!(kernel_package("linux-image-amd64\n"), None);
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = cpio::Writer::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert!(find(&out, b"TRAILER!!!\0").is_some());
        // The file's header: mode 0100755, size 10.
        let at = find(&out, b"init\0").unwrap() - 110;
        assert_eq!(&out[at + 14..at + 22], b"000081ED");
        assert_eq!(&out[at + 54..at + 62], b"0000000A");
    }

    #[test]
    fn options_parse() {
        let o = parse(&["--release".into(), "--".into(), "crash_recovery".into()]).unwrap();
        assert!(o.release);
        assert_eq!(o.filters, vec!["crash_recovery"]);
        assert!(parse(&["--".into(), "a;b".into()]).is_err());
        assert!(parse(&["--fast".into()]).is_err());
    }

    #[test]
    fn odd_paths_are_refused() {
        assert!(check_path_chars(Path::new("/work/main")).is_ok());
        assert!(check_path_chars(Path::new("/work/a,b")).is_err());
        assert!(check_path_chars(Path::new("/work/a b")).is_err());
    }
}
