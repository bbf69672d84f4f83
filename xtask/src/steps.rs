//! Named steps with timings, and the summary printed at the end.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

/// The outcome of each step run so far.
#[derive(Default)]
pub struct Summary {
    steps: Vec<(String, bool, Duration)>,
}

impl Summary {
    /// Runs `f` as step `name`, recording and announcing how it went. An `Err` is printed
    /// and counts as a failure; later steps still run so one CI log shows every problem.
    pub fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        println!("\n==> {name}");
        let start = Instant::now();
        let ok = match f() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("xtask: {name}: {e:#}");
                false
            }
        };
        self.steps.push((name.to_string(), ok, start.elapsed()));
        ok
    }

    /// Runs a command as a step; it inherits stdout/stderr so its output streams live.
    pub fn command(&mut self, name: &str, cmd: &mut Command) -> bool {
        self.step(name, || {
            let status = cmd.status()?;
            anyhow::ensure!(status.success(), "{cmd:?} failed ({status})");
            Ok(())
        })
    }

    pub fn all_ok(&self) -> bool {
        self.steps.iter().all(|(_, ok, _)| *ok)
    }

    pub fn print(&self) {
        println!("\n==> summary");
        for (name, ok, took) in &self.steps {
            let mark = if *ok { "ok  " } else { "FAIL" };
            println!("  {mark}  {name:<44} {:>7.1}s", took.as_secs_f64());
        }
        let failed = self.steps.iter().filter(|(_, ok, _)| !ok).count();
        match failed {
            0 => println!("result: all {} steps passed", self.steps.len()),
            n => println!("result: FAILED ({n} of {} steps)", self.steps.len()),
        }
    }
}
