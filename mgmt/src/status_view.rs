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
            if let Some(session) = &m.session {
                for line in session_lines(session, 96) {
                    let _ = writeln!(s, "     {}: {line}", m.protocol);
                }
            }
        }
    }
    s
}

/// A member's session object as `key=value` pairs (unset ones left out), packed into
/// lines of at most `width` characters.
fn session_lines(session: &serde_json::Value, width: usize) -> Vec<String> {
    let Some(fields) = session.as_object() else {
        return vec![session.to_string()];
    };
    let mut lines = Vec::new();
    let mut line = String::new();
    for (k, v) in fields {
        let v = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::String(t) if t.contains(' ') => format!("{t:?}"),
            serde_json::Value::String(t) => t.clone(),
            other => other.to_string(),
        };
        let pair = format!("{k}={v}");
        if !line.is_empty() && line.len() + 1 + pair.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&pair);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_fields_pack_into_lines_without_unset_ones() {
        let v = serde_json::json!({
            "connected": true,
            "target": "iqn.2026-12.test:a",
            "alias": null,
            "last_error": "connection reset by peer",
            "requests_per_connection": [3, 4],
        });
        let lines = session_lines(&v, 40);
        let all = lines.join("\n");
        assert!(lines.iter().all(|l| l.len() <= 40), "{all}");
        assert!(all.contains("connected=true"), "{all}");
        assert!(all.contains("target=iqn.2026-12.test:a"), "{all}");
        assert!(
            all.contains("last_error=\"connection reset by peer\""),
            "{all}"
        );
        assert!(all.contains("requests_per_connection=[3,4]"), "{all}");
        assert!(!all.contains("alias"), "unset fields are left out: {all}");
    }
}
