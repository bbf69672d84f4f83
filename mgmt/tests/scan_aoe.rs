//! `uniblk scan aoe:IFACE` against two real vblade targets in a network namespace: the
//! table and the JSON list each target's shelf.slot, size and MAC address.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use fixtures::{run_bounded, NetnsPair, Tmp, Vblade};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_uniblk"))
}

/// `uniblk ARGS` inside the initiator's namespace.
fn uniblk_in(pair: &NetnsPair, args: &[&str]) -> Output {
    let prefix = pair.exec_prefix();
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..]).arg(bin()).args(args);
    run_bounded(&mut cmd, Duration::from_secs(30)).unwrap()
}

/// The MAC address of the target's end of the link.
fn target_mac(pair: &NetnsPair) -> String {
    let out = fixtures::run_ok(Command::new("ip").args([
        "-n",
        &pair.target_ns,
        "-br",
        "link",
        "show",
        &pair.target_if,
    ]))
    .unwrap();
    out.split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn scan_aoe_lists_every_target_with_size_and_mac() {
    if !fixtures::require_root("AoE scan in network namespaces")
        || !fixtures::require_all(&["vblade", "ip"])
    {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let (a, b) = (tmp.join("a.img"), tmp.join("b.img"));
    fixtures::sparse_file(&a, 64 * MIB).unwrap();
    fixtures::sparse_file(&b, 3 * MIB).unwrap();
    let pair = NetnsPair::new(9000).unwrap();
    let _va = Vblade::serve(&pair, 7, 3, &a).unwrap();
    let _vb = Vblade::serve(&pair, 12, 0, &b).unwrap();
    let mac = target_mac(&pair);
    let iface = pair.initiator_if.clone();

    let out = uniblk_in(&pair, &["scan", &format!("aoe:{iface}"), "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v:#}");
    assert_eq!(list[0]["address"], format!("aoe:{iface}/7.3"), "{v:#}");
    assert_eq!(list[0]["size"], 64 * MIB, "{v:#}");
    assert_eq!(list[0]["mac"], mac.as_str(), "{v:#}");
    assert_eq!(
        (list[1]["shelf"].as_u64(), list[1]["slot"].as_u64()),
        (Some(12), Some(0))
    );
    assert_eq!(list[1]["size"], 3 * MIB, "{v:#}");
    assert_eq!(list[1]["max_sectors"], 17, "{v:#}");

    let out = uniblk_in(&pair, &["scan", &format!("aoe:{iface}")]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("aoe:{iface}/7.3 ")))
        .unwrap_or_else(|| panic!("no row for 7.3:\n{table}"));
    assert!(row.contains("64") && row.contains(&mac), "{row}");
    assert!(table.contains(&format!("aoe:{iface}/12.0 ")), "{table}");

    // No such interface: the error says so.
    let out = uniblk_in(&pair, &["scan", "aoe:nosuch0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no network interface 'nosuch0'"), "{err}");
}
