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
        "iscsi" | "aoe" => bail!("scanning {scheme} targets is not supported yet in this build (only nbd:// and nbd+unix://)"),
        _ => bail!("cannot scan '{target}': give a server address like nbd://HOST[:PORT] or nbd+unix:///?socket=/path"),
    }
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
