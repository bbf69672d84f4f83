//! `cargo xtask test`: set up, lint, run every test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::packages::{self, have};
use crate::steps::Summary;

/// Nextest settings of ours, below the repository's own `.config/nextest.toml`: a hung
/// test is killed after 5 minutes instead of stalling CI.
const NEXTEST_TOOL_CONFIG: &str = r#"[profile.default]
slow-timeout = { period = "60s", terminate-after = 5 }
"#;

/// Two cores: more test threads only make peers and daemons fight for CPU.
const TEST_THREADS: &str = "2";

#[derive(Debug, Default)]
pub struct Opts {
    no_install: bool,
    skip_lint: bool,
    filters: Vec<String>,
}

pub fn parse(args: &[String]) -> Result<Opts> {
    let mut opts = Opts::default();
    let mut it = args.iter();
    for a in it.by_ref() {
        match a.as_str() {
            "--no-install" => opts.no_install = true,
            "--skip-lint" => opts.skip_lint = true,
            "--" => break,
            other => bail!("unknown option '{other}' (test filters go after --)"),
        }
    }
    opts.filters = it.cloned().collect();
    Ok(opts)
}

/// Runs every step; `Ok(false)` when any failed.
pub fn run(opts: &Opts) -> Result<bool> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    let mut summary = Summary::default();
    // Without the packages the build (libclang) and most tests cannot run: stop here.
    if !opts.no_install && !summary.step("install Debian packages", packages::ensure_installed) {
        summary.print();
        return Ok(false);
    }
    if !opts.skip_lint {
        lint(&mut summary);
    }
    tests(&mut summary, &root, &opts.filters)?;
    summary.print();
    Ok(summary.all_ok())
}

fn lint(summary: &mut Summary) {
    summary.step("rustfmt and clippy components", ensure_components);
    summary.command(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    );
    summary.command(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    );
}

fn tests(summary: &mut Summary, root: &Path, filters: &[String]) -> Result<()> {
    if nextest_available() {
        let config = nextest_tool_config(root)?;
        // Doctests first (nextest does not run them), so the log closes on the real run's
        // totals.
        let mut doc = cargo();
        doc.args(["test", "--workspace", "--doc", "--no-fail-fast", "--"])
            .args(filters);
        summary.command("cargo test --doc", &mut doc);
        let mut cmd = cargo();
        cmd.arg("nextest")
            .arg(format!("--tool-config-file=xtask:{}", config.display()))
            .args(["run", "--workspace", "--no-fail-fast", "--no-tests=warn"])
            .args(["--test-threads", TEST_THREADS])
            .args(filters);
        summary.command("cargo nextest run", &mut cmd);
    } else {
        println!("xtask: cargo-nextest not installed; using cargo test");
        let mut cmd = cargo();
        cmd.args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--test-threads",
            TEST_THREADS,
        ])
        .args(filters);
        summary.command("cargo test", &mut cmd);
    }
    Ok(())
}

/// A fresh rustup install with the minimal profile lacks rustfmt and clippy.
fn ensure_components() -> Result<()> {
    let present = |sub: &str| {
        cargo()
            .args([sub, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if present("fmt") && present("clippy") {
        return Ok(());
    }
    if !have("rustup") {
        bail!("cargo fmt or cargo clippy missing and no rustup to add them; install rustfmt and clippy");
    }
    let status = Command::new("rustup")
        .args(["component", "add", "rustfmt", "clippy"])
        .status()?;
    anyhow::ensure!(
        status.success(),
        "rustup component add rustfmt clippy failed ({status})"
    );
    Ok(())
}

fn nextest_available() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Writes our nextest settings under the target directory (nextest wants an absolute path).
fn nextest_tool_config(root: &Path) -> Result<PathBuf> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let dir = root.join(target).join("xtask");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("nextest.toml");
    std::fs::write(&path, NEXTEST_TOOL_CONFIG)?;
    Ok(path)
}

/// The cargo that ran us (cargo sets $CARGO), so the same toolchain runs every step.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// xtask lives one level below the workspace root.
fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
