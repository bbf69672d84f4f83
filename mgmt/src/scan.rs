//! `uniblk scan`: what a remote server offers, before it goes into a layout.
//! `nbd://...` lists a server's exports; `iscsi://HOST[:PORT]` runs SendTargets discovery
//! and lists each target's LUNs; `aoe:IFACE` broadcasts a Query Config on the
//! interface and lists every AoE target that answers (shelf.slot, size, MAC).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::status_view::human;

pub async fn run(target: &str, as_json: bool) -> Result<()> {
    if target.starts_with("nbd://") || target.starts_with("nbd+unix://") {
        return nbd(target, as_json).await;
    }
    let (scheme, rest) = target.split_once(':').unwrap_or((target, ""));
    match scheme {
        "iscsi" => iscsi(target, as_json).await,
        "aoe" => aoe(rest, as_json).await,
        _ => bail!("cannot scan '{target}': give a server address like nbd://HOST[:PORT], nbd+unix:///?socket=/path, iscsi://HOST[:PORT] or aoe:IFACE"),
    }
}

/// SendTargets discovery, then each target's disk LUNs and sizes. CHAP for the LUN
/// listing comes from the URL (`iscsi://user%secret@host`).
async fn iscsi(target: &str, as_json: bool) -> Result<()> {
    use backends::iscsi::{discovery, IscsiOptions, IscsiUrl};
    let shown = backends::iscsi::redact_text(target);
    let portal = IscsiUrl::parse_any(target)?;
    let mut login = IscsiOptions::default().login;
    login.chap = backends::iscsi::member::url_chap(&portal)?;
    let targets = discovery::discover(&portal, &login)
        .await
        .with_context(|| format!("scanning {shown}"))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&targets)?);
        return Ok(());
    }
    if targets.is_empty() {
        println!("{shown}: the portal lists no targets");
        return Ok(());
    }
    for t in &targets {
        println!("target {}  ({})", t.name, t.addresses.join(", "));
        if let Some(e) = &t.error {
            println!("  cannot list LUNs: {e}");
            continue;
        }
        if t.luns.is_empty() {
            println!("  no disk LUNs");
        }
        for l in &t.luns {
            println!(
                "  lun {:<4} {:>12}  {:>4}-byte blocks  {}{}  {}",
                l.lun,
                human(l.size),
                l.block_size,
                format!("{} {}", l.vendor, l.product).trim(),
                if l.unmap { ", unmap" } else { "" },
                l.address
            );
        }
    }
    Ok(())
}

/// How long targets have to answer the broadcast.
const AOE_WAIT: Duration = Duration::from_secs(1);

async fn aoe(iface: &str, as_json: bool) -> Result<()> {
    if iface.is_empty() || iface.contains('/') {
        bail!("cannot scan 'aoe:{iface}': give the interface alone, e.g. aoe:eth0");
    }
    let found = backends::aoe::scan(iface, AOE_WAIT)
        .await
        .with_context(|| format!("scanning aoe:{iface}"))?;
    if as_json {
        let v: Vec<_> = found
            .iter()
            .map(|(f, size)| {
                json!({
                    "address": format!("aoe:{iface}/{}.{}", f.shelf, f.slot),
                    "shelf": f.shelf, "slot": f.slot, "size": size,
                    "mac": f.mac.to_string(), "buffers": f.config.buffers,
                    "max_sectors": f.config.max_sectors,
                    "firmware": f.config.firmware,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if found.is_empty() {
        println!("aoe:{iface}: no AoE target answered within {AOE_WAIT:?}");
        return Ok(());
    }
    println!("{:<24} {:>12}  {:<17}  buffers", "target", "size", "mac");
    for (f, size) in &found {
        let addr = format!("aoe:{iface}/{}.{}", f.shelf, f.slot);
        let size = size.map(human).unwrap_or_else(|| "?".into());
        println!(
            "{addr:<24} {size:>12}  {:<17}  {}",
            f.mac.to_string(),
            f.config.buffers
        );
    }
    Ok(())
}

async fn nbd(target: &str, as_json: bool) -> Result<()> {
    let exports = backends::nbd::client::list_exports(target)
        .await
        .with_context(|| format!("scanning {target}"))?;
    if as_json {
        let v: Vec<_> = exports
            .iter()
            .map(|(name, description, size)| json!({"name": name, "description": description, "size": size}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if exports.is_empty() {
        println!("{target}: the server lists no exports");
        return Ok(());
    }
    println!("{:<32} {:>12}  description", "export", "size");
    for (name, description, size) in &exports {
        let size = size.map(human).unwrap_or_else(|| "?".into());
        let shown = if name.is_empty() {
            "(default)"
        } else {
            name.as_str()
        };
        println!("{shown:<32} {size:>12}  {description}");
    }
    Ok(())
}
