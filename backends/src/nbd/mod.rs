//! NBD: the wire codec shared by uniblk's NBD server frontend (in `ublkd`) and the NBD
//! member client. The protocol is the one in NetworkBlockDevice/nbd `doc/proto.md`:
//! fixed newstyle negotiation, simple and structured replies.
//!
//! - [`wire`]: constants and fixed-size messages, both sides.
//! - [`client`]: URIs, connecting, the handshake, one connection's transmission phase,
//!   and [`list_exports`] for `uniblk scan`.
//! - [`member`]: [`NbdMember`], an export as an array member: several connections,
//!   timeouts, reconnects and re-sends.

pub mod client;
pub mod member;
pub mod wire;

pub use client::{list_exports, ExportListing, NbdError, NbdUri};
pub use member::{NbdMember, NbdOptions, NbdStatus};
