//! A server's CPU time and peak memory, the client's CPU time, and the time the hypervisor took from this
//! machine (steal), from /proc.

use anyhow::{Context, Result};

/// User + system CPU seconds `pid` has used so far, all its threads together.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (did the server exit?)"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("/proc/{pid}/stat: {stat}"))?;
    Ok(ticks as f64 / clock_ticks_per_sec())
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command name in
/// parentheses may hold spaces, so fields are counted after its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11); // field 3 (state) is index 0
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The machine's CPU time so far, all CPUs together, in clock ticks: how much of it the
/// hypervisor gave to others (steal), and the total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostTicks {
    pub steal: u64,
    pub total: u64,
}

pub fn host_ticks() -> Result<HostTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    parse_host_ticks(&stat).with_context(|| "no 'cpu' line with a steal field in /proc/stat")
}

/// The steal share since `before` (a reading that may have failed), if both readings
/// worked and any time passed.
pub fn steal_since(before: Option<HostTicks>) -> Option<f64> {
    steal_share(before?, host_ticks().ok()?)
}

/// The steal share of the CPU time between two readings, if any time passed.
pub fn steal_share(before: HostTicks, after: HostTicks) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let steal = after.steal.checked_sub(before.steal)?;
    (total > 0).then(|| steal as f64 / total as f64)
}

/// The first line of /proc/stat: `cpu user nice system idle iowait irq softirq steal ...`
/// (guest time is already inside user and nice, so it is not added again).
fn parse_host_ticks(stat: &str) -> Option<HostTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() == 8).then(|| HostTicks {
        steal: v[7],
        total: v.iter().sum(),
    })
}

/// User + system CPU seconds of this process's children that have ended and been waited
/// for: read around a client run (fio, iscsi-perf) that is the only child to end in
/// between, the difference is that client's CPU time, its forked job processes included.
pub fn ended_children_cpu_seconds() -> Result<f64> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_CHILDREN)");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(u.ru_utime) + secs(u.ru_stime))
}

/// Peak resident memory (VmHWM) of `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_vm_hwm(&status).with_context(|| format!("no VmHWM in /proc/{pid}/status"))
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 3 4 20 0 9";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let status = "Name:\tublkd\nVmPeak:\t  99999 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(12345));
    }

    #[test]
    fn steal_is_the_eighth_field_of_the_cpu_line() {
        let stat =
            "cpu  1514568 0 493429 11084791 39518 0 23987 75564 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let t = parse_host_ticks(stat).unwrap();
        assert_eq!(t.steal, 75564);
        assert_eq!(t.total, 1514568 + 493429 + 11084791 + 39518 + 23987 + 75564);
        let later = HostTicks {
            steal: t.steal + 25,
            total: t.total + 100,
        };
        assert_eq!(steal_share(t, later), Some(0.25));
        assert_eq!(steal_share(t, t), None, "no time passed");
        assert_eq!(
            parse_host_ticks("cpu 1 2 3\n"),
            None,
            "a kernel without steal"
        );
    }

    #[test]
    fn our_own_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(peak_rss_kib(me).unwrap() > 0);
    }

    #[test]
    fn an_ended_childs_cpu_time_is_counted() {
        let before = ended_children_cpu_seconds().unwrap();
        // A child that spins for about 0.2 s of CPU time.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let used = ended_children_cpu_seconds().unwrap() - before;
        assert!(
            used > 0.01,
            "the child's {used} s of CPU time were not counted"
        );
    }
}
