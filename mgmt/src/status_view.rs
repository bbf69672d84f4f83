//! The human-readable `uniblk status` table.

use std::fmt::Write;

use ublkd::status::Status;

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let (mut v, mut u) = (bytes as f64, 0);
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn render(st: &Status) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ublkd pid {} version {} up {}s",
        st.daemon.pid, st.daemon.version, st.daemon.uptime_secs
    );
    for a in &st.arrays {
        let chunk = if a.chunk > 0 {
            format!(" chunk {}", human(a.chunk))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "\narray {} [{}] {} {}{chunk}, block {} B, uuid {}",
            a.name,
            a.state,
            a.level,
            human(a.size),
            a.block_size,
            a.uuid
        );
        let _ = writeln!(
            s,
            "  queue: {} depth {}, {} in flight, {} waiting",
            a.queue.policy, a.queue.depth, a.queue.in_flight, a.queue.waiting
        );
        if let Some(u) = &a.ublk {
            match &u.device {
                Some(d) => {
                    let rec = if u.recovered { " (recovered)" } else { "" };
                    let _ = writeln!(
                        s,
                        "  ublk {d}: {} queues, depth {}, max io {}{rec}",
                        u.queues,
                        u.depth,
                        human(u.max_io as u64)
                    );
                }
                None => {
                    let _ = writeln!(s, "  ublk: {}", u.error.as_deref().unwrap_or("not set up"));
                }
            }
        }
        for e in &a.exports {
            let _ = writeln!(
                s,
                "  export {} '{}' on {} ({} connections)",
                e.kind, e.name, e.listen, e.connections
            );
        }
        let _ = writeln!(
            s,
            "  {:>2} {:<44} {:<7} {:<9} {:<8} {:>10} {:<8} {:>6} {:>10} {:>6}",
            "#",
            "member",
            "class",
            "protocol",
            "engine",
            "size",
            "state",
            "inflt",
            "completed",
            "errors"
        );
        for m in &a.members {
            let _ = writeln!(
                s,
                "  {:>2} {:<44} {:<7} {:<9} {:<8} {:>10} {:<8} {:>6} {:>10} {:>6}",
                m.index,
                m.address,
                m.locality,
                m.protocol,
                m.engine,
                human(m.size),
                m.state,
                m.in_flight,
                m.completed,
                m.errors
            );
            if let Some(f) = &m.fault {
                let _ = writeln!(s, "     fault: {f}");
            }
        }
    }
    s
}
