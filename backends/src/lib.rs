//! Member protocols.
pub mod addr;
pub mod aoe;
pub mod iscsi;
pub mod local;
pub mod mem;
pub mod nbd;
pub mod null;
mod tcp;
