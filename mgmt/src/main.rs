//! `uniblk`: run, create and inspect uniblk arrays.

mod create;
mod member_cmd;
mod scan;
mod status_view;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "uniblk",
    version,
    about = "uniblk: one block device from local and network disks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon in the foreground (no --config: a raid1 of two 1 GiB files in ./uniblk-data).
    Up(ublkd::daemon::DaemonArgs),
    /// Add an array to a layout file and initialise its members.
    Create(create::CreateArgs),
    /// Show arrays, exports and members of the running daemon.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Management socket [default: $UNIBLK_SOCKET or /run/uniblk/ublkd.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// List what a server offers: `uniblk scan nbd://HOST[:PORT]` lists its exports and sizes,
    /// `uniblk scan iscsi://HOST[:PORT]` its targets, LUNs and sizes (SendTargets discovery),
    /// `uniblk scan aoe:IFACE` the AoE targets on an interface (shelf.slot, size, MAC).
    Scan {
        target: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Operate on one member of a running array.
    Member {
        #[command(subcommand)]
        cmd: member_cmd::MemberCmd,
        /// Management socket [default: $UNIBLK_SOCKET or /run/uniblk/ublkd.sock].
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
}

fn socket(s: Option<PathBuf>) -> PathBuf {
    s.unwrap_or_else(ublkd::mgmt_api::default_socket)
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Up(args) => {
            ublkd::daemon::init_logging(&args.log_level)?;
            ublkd::daemon::run(args).await
        }
        Cmd::Create(args) => create::run(args).await,
        Cmd::Status { json, socket: s } => {
            let v = ublkd::mgmt_api::request(&socket(s), &json!({"cmd": "status"})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v["status"])?);
            } else {
                let st: ublkd::status::Status = serde_json::from_value(v["status"].clone())?;
                print!("{}", status_view::render(&st));
            }
            Ok(())
        }
        Cmd::Scan { target, json } => scan::run(&target, json).await,
        Cmd::Member { cmd, socket: s } => member_cmd::run(cmd, &socket(s)).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match ublkd::daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uniblk: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uniblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
