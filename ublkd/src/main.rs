//! `ublkd`: run the uniblk daemon in the foreground.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "ublkd",
    version,
    about = "uniblk daemon: RAID over local and network disks, exported as NBD"
)]
struct Cli {
    #[command(flatten)]
    daemon: ublkd::daemon::DaemonArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = ublkd::daemon::init_logging(&cli.daemon.log_level) {
        eprintln!("ublkd: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let rt = match ublkd::daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ublkd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    backends::local::set_reaper_runtime(rt.handle().clone());
    match rt.block_on(ublkd::daemon::run(cli.daemon)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublkd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
