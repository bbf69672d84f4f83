//! `uniblk create`: add an array to a layout file and initialise its members' superblocks,
//! so `uniblk up --config FILE` assembles it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use raidcore::{BufPool, PoolConfig};
use ublkd::layout::{parse_size, ArrayLayout, ExportSection, Layout, NbdExport, SizeValue};

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Array name (letters, digits, '.', '_', '-').
    name: String,
    /// linear, raid0, raid1 or raid10.
    #[arg(long)]
    level: String,
    /// Member address, in array order (repeat): file:/path, dev:/dev/x, mem:1G, null:1G.
    #[arg(long = "member", short = 'm', required = true)]
    members: Vec<String>,
    /// Stripe chunk for raid0/raid10, e.g. 64KiB.
    #[arg(long)]
    chunk: Option<String>,
    /// Create missing file members as sparse files of this size (e.g. 1GiB).
    #[arg(long)]
    size: Option<String>,
    /// NBD listen address (repeat): 127.0.0.1:10809 or unix:/path.
    #[arg(long)]
    listen: Vec<String>,
    /// Layout file to add the array to (created if missing).
    #[arg(long, default_value = "uniblk.toml")]
    layout: PathBuf,
    /// Reuse members that carry another array's superblock (destroys their data).
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn create_missing_files(members: &[String], size: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    for m in members {
        let Some(p) = m.strip_prefix("file:") else {
            continue;
        };
        let p = Path::new(p);
        if p.exists() {
            continue;
        }
        let Some(size) = size else { continue };
        let bytes = parse_size(size).context("--size")?;
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let f = std::fs::File::create(p)
            .with_context(|| format!("cannot create member file {}", p.display()))?;
        f.set_len(bytes)?;
        created.push(p.to_path_buf());
    }
    Ok(created)
}

pub async fn run(a: CreateArgs) -> Result<()> {
    let mut layout = if a.layout.exists() {
        Layout::load(&a.layout)?
    } else {
        Layout::default()
    };
    if layout.array.iter().any(|x| x.name == a.name) {
        bail!(
            "layout {} already has an array named '{}'; pick another name or edit the file",
            a.layout.display(),
            a.name
        );
    }
    layout.array.push(ArrayLayout {
        name: a.name.clone(),
        level: a.level.clone(),
        chunk: a.chunk.clone().map(SizeValue::Text),
        members: a.members.clone(),
        queue_depth: None,
        policy: None,
        remote: None,
        export: ExportSection {
            nbd: (!a.listen.is_empty()).then(|| NbdExport {
                listen: a.listen.clone(),
                name: None,
                description: None,
            }),
            ublk: None,
        },
    });
    // Validate everything before touching a disk.
    let plans = layout.plan()?;
    let plan = plans
        .iter()
        .find(|p| p.name == a.name)
        .context("new array missing from plan")?;
    let created = create_missing_files(&a.members, a.size.as_deref())?;
    let pool = BufPool::new(&PoolConfig {
        classes: vec![(4096, 64), (1 << 20, 4)],
    })?;
    let result = ublkd::daemon::assemble_plan(plan, pool, a.force).await;
    let (array, report) = match result {
        Ok(x) => x,
        Err(e) => {
            for p in created {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    array
        .shutdown()
        .await
        .context("flushing the new array's metadata")?;
    write_atomically(&a.layout, &layout.to_toml()?)?;
    if a.json {
        let v = serde_json::json!({
            "name": a.name, "uuid": array.uuid.to_string(), "level": plan.level.name(),
            "size": array.size(), "members": a.members, "initialised": report.initialised,
            "layout": a.layout,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "created array {} ({}, {} members, {} bytes, uuid {})\nlayout written to {}\nstart it with: uniblk up --config {}",
            a.name,
            plan.level.name(),
            a.members.len(),
            array.size(),
            array.uuid,
            a.layout.display(),
            a.layout.display()
        );
    }
    Ok(())
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
