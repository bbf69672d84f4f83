//! Project automation, run as `cargo xtask COMMAND` (alias in .cargo/config.toml).
//!
//! `cargo xtask test` takes a fresh Debian 12 machine with Rust to a full test run: it
//! installs the Debian packages the tests drive (real peers, see shared/PEERS.md), checks
//! formatting and lints, then runs every test. CI runs exactly this (`.ci/run`).

mod packages;
mod steps;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask test [--no-install] [--skip-lint] [-- FILTER...]

  test           install missing Debian packages, cargo fmt --check, clippy -D warnings,
                 then every test (cargo nextest if installed, else cargo test)
  --no-install   do not check or install Debian packages
  --skip-lint    skip cargo fmt and clippy
  -- FILTER...   passed to the test runner (test name filters)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::parse(&args[1..]).and_then(|opts| test::run(&opts)),
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
