//! `uniblk scan iscsi://HOST:PORT` against tgtd: SendTargets discovery lists every
//! target, its disk LUNs and their sizes, as a table and as JSON; errors name the portal.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fixtures::{run_bounded, sparse_file, LunSpec, Tgtd, Tmp};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn uniblk(args: &[&str]) -> std::process::Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_uniblk"));
    run_bounded(Command::new(bin).args(args), Duration::from_secs(60)).unwrap()
}

#[test]
fn scan_lists_targets_luns_and_sizes() {
    if !fixtures::require("tgtd") {
        return;
    }
    let tmp = Tmp::new().unwrap();
    let (a, b) = (tmp.join("a.img"), tmp.join("b.img"));
    sparse_file(&a, 64 * MIB).unwrap();
    sparse_file(&b, 32 * MIB).unwrap();
    let mut tgtd = Tgtd::start().unwrap();
    tgtd.add_target(
        1,
        "iqn.2026-11.io.uniblk.test:one",
        &[LunSpec::file(&a, 512)],
    )
    .unwrap();
    tgtd.add_target(
        2,
        "iqn.2026-11.io.uniblk.test:two",
        &[LunSpec::file(&b, 4096).thin()],
    )
    .unwrap();
    let portal = format!("iscsi://{}", tgtd.portal());

    let out = uniblk(&["scan", &portal]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("target iqn.2026-11.io.uniblk.test:one"),
        "{table}"
    );
    assert!(
        table.contains("64.0 MiB") || table.contains("64 MiB"),
        "{table}"
    );
    assert!(
        table.contains(&tgtd.url("iqn.2026-11.io.uniblk.test:two", 1)),
        "{table}"
    );
    assert!(
        table.contains("4096-byte blocks") && table.contains("unmap"),
        "{table}"
    );

    let out = uniblk(&["scan", "--json", &portal]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "iqn.2026-11.io.uniblk.test:one");
    assert_eq!(v[0]["luns"][0]["size"], 64 * MIB);
    assert_eq!(v[0]["luns"][0]["block_size"], 512);
    assert_eq!(v[1]["luns"][0]["size"], 32 * MIB);
    assert_eq!(v[1]["luns"][0]["block_size"], 4096);
    assert_eq!(v[1]["luns"][0]["unmap"], true);
    assert_eq!(
        v[1]["luns"].as_array().unwrap().len(),
        1,
        "tgtd's controller LUN 0 is not listed"
    );

    // Nothing listening: a clear error naming the portal.
    drop(tgtd);
    let out = uniblk(&["scan", &portal]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot connect to iSCSI portal")
            && err.contains("is the iSCSI target (tgtd) running?"),
        "{err}"
    );
}
