//! Project automation, run as `cargo xtask COMMAND` (alias in .cargo/config.toml).
//!
//! `cargo xtask test` takes a fresh Debian 12 machine with Rust to a full test run: it
//! installs the Debian packages the tests drive (real peers, see shared/PEERS.md), checks
//! formatting and lints, then runs every test. CI runs exactly this (`.ci/run`).

mod bench;
mod packages;
mod steps;
mod test;
mod vm;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask test [--no-install] [--skip-lint] [-- FILTER...]
       cargo xtask bench [--quick] [--filter SUBSTR] [--micro] [--no-install]
       cargo xtask vm-test [--no-install] [--release] [-- TEST...]

  test           install missing Debian packages, cargo fmt --check, clippy -D warnings,
                 then every test (cargo nextest if installed, else cargo test)
  --no-install   do not check or install Debian packages
  --skip-lint    skip cargo fmt and clippy
  -- FILTER...   passed to the test runner (test name filters)

  bench          build ublkd and benches in release, run the same fio jobs through uniblk,
                 nbdkit, qemu-nbd and fio on a file; print one table of ratios; write
                 target/bench/{latest.json,latest.md,latest.png,results-TIME.json}
  --quick        short runs: the whole benchmark in under two minutes (full: 31-40 minutes)
  --filter S     only jobs whose GROUP/SYSTEM/JOB contains S (e.g. mem-unix, qd32x2)
  --micro        run the micro-benchmarks instead (cargo bench -p benches --bench micro;
                 --filter is divan's name filter)
  --no-install   as for test

  vm-test        the tests that need the kernel's ublk and nbd drivers: build ublkd and
                 uniblk, boot a throw-away QEMU guest (bookworm-backports 6.12 kernel, TCG;
                 fetched into /var/cache/uniblk-vm on first use) and run
                 ublkd/tests/guest/run.sh there; exits with the guest's result
  --release      test the release build (slower to build, a little faster to run)
  -- TEST...     only these guest tests (fs, fs-raid1, fio_verify, crash_recovery, ...)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::parse(&args[1..]).and_then(|opts| test::run(&opts)),
        Some("bench") => bench::parse(&args[1..]).and_then(|opts| bench::run(&opts)),
        Some("vm-test") => vm::parse(&args[1..]).and_then(|opts| vm::run(&opts)),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(anyhow::anyhow!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
