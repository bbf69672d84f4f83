//! `uniblk member ...`: take members out of service, put them back and rebuild them.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use ublkd::layout::parse_size;
use ublkd::mgmt_api::request;
use ublkd::status::{MemberStatus, Status};

#[derive(clap::Subcommand, Debug)]
pub enum MemberCmd {
    /// Mark a member faulty: it takes no more I/O (mirrors carry on without it).
    Fail { array: String, member: String },
    /// Rebuild a faulty member with a full copy from its mirrors, then put it back in service.
    ReAdd {
        array: String,
        /// The member's index or address.
        member: String,
        #[command(flatten)]
        copy: CopyArgs,
    },
    /// Take a faulty member out of its slot (the slot waits for `member add`).
    Remove { array: String, member: String },
    /// Put a new member into an empty slot and rebuild it from the mirrors.
    Add {
        array: String,
        /// The slot index (see `uniblk status`).
        slot: usize,
        /// The new member's address, e.g. file:/var/lib/uniblk/c.img.
        address: String,
        #[command(flatten)]
        copy: CopyArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct CopyArgs {
    /// Cap the copy rate, e.g. 200MiB (per second).
    #[arg(long)]
    rate: Option<String>,
    /// Start the rebuild and return at once (progress shows in `uniblk status`).
    #[arg(long)]
    no_wait: bool,
}

pub async fn run(cmd: MemberCmd, socket: &Path) -> Result<()> {
    match cmd {
        MemberCmd::Fail { array, member } => {
            call(
                socket,
                json!({"cmd": "member_fail", "array": array, "member": member}),
            )
            .await?;
            println!("member {member} of array {array} marked faulty");
            Ok(())
        }
        MemberCmd::ReAdd {
            array,
            member,
            copy,
        } => {
            let rate = rate(&copy)?;
            let v = call(
                socket,
                json!({"cmd": "member_readd", "array": array, "member": member, "rate": rate}),
            )
            .await?;
            let index = v["index"]
                .as_u64()
                .context("daemon did not say which member")? as usize;
            follow(socket, &array, index, copy.no_wait).await
        }
        MemberCmd::Remove { array, member } => {
            let v = call(
                socket,
                json!({"cmd": "member_remove", "array": array, "member": member}),
            )
            .await?;
            println!(
                "removed {} from array {array}",
                v["address"].as_str().unwrap_or(&member)
            );
            Ok(())
        }
        MemberCmd::Add {
            array,
            slot,
            address,
            copy,
        } => {
            let rate = rate(&copy)?;
            call(
                socket,
                json!({"cmd": "member_add", "array": array, "slot": slot, "address": address}),
            )
            .await?;
            println!("{address} is member #{slot} of array {array}; rebuilding");
            call(socket, json!({"cmd": "member_readd", "array": array, "member": slot.to_string(), "rate": rate})).await?;
            follow(socket, &array, slot, copy.no_wait).await
        }
    }
}

fn rate(c: &CopyArgs) -> Result<Option<u64>> {
    c.rate
        .as_deref()
        .map(|r| parse_size(r).context("--rate"))
        .transpose()
}

async fn call(socket: &Path, req: Value) -> Result<Value> {
    request(socket, &req).await
}

async fn member_status(socket: &Path, array: &str, index: usize) -> Result<MemberStatus> {
    let v = call(socket, json!({"cmd": "status"})).await?;
    let st: Status = serde_json::from_value(v["status"].clone())?;
    st.arrays
        .into_iter()
        .find(|a| a.name == array)
        .and_then(|a| a.members.into_iter().nth(index))
        .with_context(|| format!("array {array} member #{index} vanished from status"))
}

/// Show the rebuild's progress until it ends; fail if the member ends faulty.
async fn follow(socket: &Path, array: &str, index: usize, no_wait: bool) -> Result<()> {
    if no_wait {
        println!(
            "rebuild of array {array} member #{index} started; follow it with `uniblk status`"
        );
        return Ok(());
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "rebuild {msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{array}#{index}"));
    loop {
        let m = member_status(socket, array, index).await?;
        match (m.state.as_str(), &m.rebuild) {
            ("rebuilding", Some(r)) => {
                bar.set_length(r.total);
                bar.set_position(r.done);
            }
            ("healthy", _) => {
                bar.finish_and_clear();
                println!(
                    "member {} of array {array} rebuilt and back in service",
                    m.address
                );
                return Ok(());
            }
            ("faulty", _) => {
                bar.abandon();
                bail!(
                    "rebuild of {} failed: {} (see the daemon's log)",
                    m.address,
                    m.fault.unwrap_or_default()
                );
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
