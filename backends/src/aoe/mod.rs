//! AoE (ATA over Ethernet, revision 1 of the r11 specification): an initiator in user
//! space on an AF_PACKET raw socket, for `aoe:IFACE/SHELF.SLOT` members.
//!
//! - [`frame`]: the frame codec (Ethernet, AoE header, ATA and Query Config arguments).
//! - [`socket`]: the raw socket, bound to one interface, with its MTU and MAC address.
//! - [`discover`]: Query Config broadcasts (one target, or all for `uniblk scan`),
//!   IDENTIFY DEVICE, the flush command the target takes.
//! - [`rtt`]: the adaptive retransmission timeout.
//! - [`engine`]: tags, the window, frames cut by the MTU, re-sends, rediscovery.
//! - [`member`]: [`AoeMember`], a target as an array member.

pub mod discover;
pub mod engine;
pub mod error;
pub mod frame;
pub mod member;
pub mod rtt;
pub mod socket;

pub use discover::Found;
pub use engine::AoeStatus;
pub use error::AoeError;
pub use member::{scan, AoeMember, AoeOptions};
