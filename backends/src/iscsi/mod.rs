//! `iscsi://[user[%password]@]host[:port]/target-iqn/lun`: an iSCSI LUN as an array
//! member, through our own initiator (RFC 7143 subset) on tokio.
//!
//! | file | holds |
//! |---|---|
//! | [`pdu`] | the 48-byte BHS, opcodes, text keys, padding, CRC32C digests |
//! | [`login`] | connect, security stage and operational negotiation |
//! | `chap` | CHAP and mutual CHAP responses and checks (MD5) |
//! | [`scsi`] | CDBs, sense decoding, INQUIRY/VPD and READ CAPACITY parsing |
//! | [`lun`] | what a LUN is and can do, asked after each login |
//! | [`session`] | one logged-in connection: send queue, task tags, CmdSN window, R2T, deadlines; its `reader` routes what the target sends |
//! | [`member`] | [`IscsiMember`]: deadlines, reconnect + re-login, retries |
//! | [`discovery`] | SendTargets discovery and LUN listing, for `uniblk scan` |
//! | [`secret`] | CHAP secrets from the layout, a file or the environment |
//!
//! One session of one connection per member, ErrorRecoveryLevel 0: any connection
//! failure ends the session, the member logs in again (reinstating the session with the
//! same ISID) and re-sends what was in flight.

mod chap;
pub mod discovery;
pub mod login;
pub mod lun;
pub mod member;
pub mod pdu;
pub mod scsi;
pub mod secret;
pub mod session;
mod url;

pub use login::{Chap, LoginOptions};
pub use member::{IscsiMember, IscsiOptions, IscsiStatus};
pub use secret::{ChapSource, IscsiAuth, SecretSource};
pub use url::{redact_text, IscsiUrl};

use thiserror::Error;

/// The iSCSI well-known port.
pub const DEFAULT_PORT: u16 = 3260;

/// Why an iSCSI member could not be opened or a session could not be set up. Every
/// message names the target and the fix. Never carries a secret.
#[derive(Debug, Error)]
pub enum IscsiError {
    #[error("'{url}' is not an iSCSI URL: {why}; write iscsi://[user[%password]@]host[:port]/target-iqn/lun")]
    BadUrl { url: String, why: String },
    #[error("cannot connect to iSCSI portal {portal}: {reason}; {hint}")]
    Connect {
        portal: String,
        reason: String,
        hint: String,
        errno: i32,
    },
    #[error("iSCSI target {target} at {portal} refused login: {reason} ({hint})")]
    LoginRefused {
        target: String,
        portal: String,
        reason: String,
        hint: String,
        errno: i32,
    },
    #[error("iSCSI target {target} at {portal} failed mutual CHAP: {why} (check the target's outgoing CHAP user/secret)")]
    MutualAuth {
        target: String,
        portal: String,
        why: String,
    },
    #[error("iSCSI target {target} at {portal} broke the protocol during {during}: {why}")]
    Protocol {
        target: String,
        portal: String,
        during: &'static str,
        why: String,
    },
    #[error("iSCSI target {target} at {portal} did not answer {during} within {timeout:?}; is it an iSCSI target, and is it overloaded?")]
    Timeout {
        target: String,
        portal: String,
        during: &'static str,
        timeout: std::time::Duration,
    },
    #[error("iSCSI target {target} at {portal}: LUN {lun} {why}")]
    Lun {
        target: String,
        portal: String,
        lun: u16,
        why: String,
    },
    #[error("cannot read the CHAP secret: {0}")]
    Secret(String),
}

impl IscsiError {
    /// The errno the management API reports for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            IscsiError::BadUrl { .. } => libc::EINVAL,
            IscsiError::Connect { errno, .. } | IscsiError::LoginRefused { errno, .. } => *errno,
            IscsiError::MutualAuth { .. } => libc::EACCES,
            IscsiError::Protocol { .. } => libc::EPROTO,
            IscsiError::Timeout { .. } => libc::ETIMEDOUT,
            IscsiError::Lun { .. } => libc::ENXIO,
            IscsiError::Secret(_) => libc::EACCES,
        }
    }
}
