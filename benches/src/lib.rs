//! uniblk's benchmark harness (issue 5): the same fio jobs through uniblk and through its
//! peers (nbdkit, qemu-nbd, fio straight on the file), in one run, reported as ratios
//! uniblk / peer with the servers' CPU time and memory. `cargo xtask bench` builds the
//! daemon and runs `uniblk-bench` (src/main.rs); micro-benchmarks live in benches/micro.rs.

pub mod chart;
pub mod diskstat;
pub mod jobs;
pub mod machine;
pub mod procstat;
pub mod report;
pub mod run;
pub mod systems;
