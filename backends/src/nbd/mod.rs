//! NBD: the wire codec shared by uniblk's NBD server frontend (in `ublkd`) and the NBD
//! member client. The protocol is the one in NetworkBlockDevice/nbd `doc/proto.md`:
//! fixed newstyle negotiation, simple and structured replies.

pub mod wire;
