//! ublkd: the uniblk daemon. Frontends (NBD, ublk) over arrays from raidcore,
//! members from backends, a management API for the `uniblk` CLI.

pub mod daemon;
pub mod layout;
pub mod mgmt_api;
pub mod nbd_server;
pub mod stall;
pub mod status;
pub mod ublk;
