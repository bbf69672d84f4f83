//! `cargo xtask bench`: build the daemon and the harness in release, then run the harness
//! (benches/src/main.rs), or with `--micro` the micro-benchmarks. Benchmarks are not tests:
//! `cargo xtask test` never runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

#[derive(Debug, Default)]
pub struct Opts {
    quick: bool,
    micro: bool,
    no_install: bool,
    filter: Option<String>,
}

pub fn parse(args: &[String]) -> Result<Opts> {
    let mut opts = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--micro" => opts.micro = true,
            "--no-install" => opts.no_install = true,
            "--filter" => {
                opts.filter = Some(it.next().cloned().context("--filter needs a value")?);
            }
            other => bail!("unknown option '{other}' for bench"),
        }
    }
    Ok(opts)
}

/// `Ok(false)` when a build failed or any benchmark job failed.
pub fn run(opts: &Opts) -> Result<bool> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    // The peers (fio, nbdkit, qemu-nbd) and the build's libclang are the tests' packages.
    if !opts.no_install {
        crate::packages::ensure_installed()?;
    }
    if opts.micro {
        return micro(opts);
    }
    // Two builds, so the daemon is built exactly as `cargo build --release -p ublkd` builds
    // it (no features unified in from the harness's dependencies).
    for pkg in ["ublkd", "benches"] {
        if !status(cargo().args(["build", "--release", "-p", pkg]))? {
            return Ok(false);
        }
    }
    let release = target_dir(&root).join("release");
    let mut cmd = Command::new(release.join("uniblk-bench"));
    cmd.arg("--daemon")
        .arg(release.join("ublkd"))
        .arg("--out")
        .arg(target_dir(&root).join("bench"));
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(f) = &opts.filter {
        cmd.args(["--filter", f]);
    }
    status(&mut cmd)
}

/// `cargo bench -p benches --bench micro [-- FILTER]`; `--quick` samples less.
fn micro(opts: &Opts) -> Result<bool> {
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "benches", "--bench", "micro", "--"]);
    if opts.quick {
        cmd.args(["--sample-count", "20"]);
    }
    cmd.args(&opts.filter);
    status(&mut cmd)
}

/// Runs a command with inherited output; whether it succeeded.
fn status(cmd: &mut Command) -> Result<bool> {
    let s = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !s.success() {
        eprintln!("xtask: {cmd:?} failed ({s})");
    }
    Ok(s.success())
}

/// The cargo that ran us, so the same toolchain builds everything.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `$CARGO_TARGET_DIR` (relative to the root) or `target`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

/// xtask lives one level below the workspace root.
fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
