//! `uniblk scan`: what a remote server offers, before it goes into a layout.

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::status_view::human;

pub async fn run(target: &str, as_json: bool) -> Result<()> {
    if target.starts_with("nbd://") || target.starts_with("nbd+unix://") {
        return nbd(target, as_json).await;
    }
    let scheme = target.split(':').next().unwrap_or(target);
    match scheme {
        "iscsi" => iscsi(target, as_json).await,
        "aoe" => bail!("scanning aoe targets is not supported yet in this build (only nbd://, nbd+unix:// and iscsi://)"),
        _ => bail!("cannot scan '{target}': give a server address like nbd://HOST[:PORT], nbd+unix:///?socket=/path or iscsi://HOST[:PORT]"),
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
