//! One error type for every I/O failure in the stack. Frontends need an errno for each
//! (NBD replies and ublk completions carry one), so every variant maps to one.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IoError {
    #[error("I/O error on {0}")]
    Io(String),
    #[error("request out of range: offset {offset} length {len} on a device of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("no space left on {0}")]
    NoSpace(String),
    #[error("array is shutting down")]
    Shutdown,
    /// A remote member did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A remote member's connection is gone and could not be re-established in time.
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("{0}: errno {1}")]
    Errno(String, i32),
}

impl IoError {
    /// The errno a frontend reports for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::Io(_) => libc::EIO,
            IoError::OutOfRange { .. } | IoError::Invalid(_) => libc::EINVAL,
            IoError::NotSupported(_) => libc::EOPNOTSUPP,
            IoError::NoSpace(_) => libc::ENOSPC,
            IoError::Shutdown => libc::ESHUTDOWN,
            IoError::Timeout(_) => libc::ETIMEDOUT,
            IoError::Disconnected(_) => libc::ENOTCONN,
            IoError::Errno(_, e) => *e,
        }
    }

    /// The errno a block device reports to its users: a member that timed out or is
    /// disconnected is an I/O error of the range it holds (EIO), as for a failed disk;
    /// everything else keeps its errno.
    pub fn block_errno(&self) -> i32 {
        match self {
            IoError::Timeout(_) | IoError::Disconnected(_) => libc::EIO,
            other => other.errno(),
        }
    }

    /// Build from a raw errno reported by a member (a negative io_uring result, say).
    pub fn from_errno(what: &str, errno: i32) -> Self {
        match errno {
            libc::EIO => IoError::Io(what.to_string()),
            libc::ENOSPC => IoError::NoSpace(what.to_string()),
            libc::EOPNOTSUPP => IoError::NotSupported(what.to_string()),
            e => IoError::Errno(what.to_string(), e),
        }
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::from_errno(&e.to_string(), e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type IoResult<T = ()> = Result<T, IoError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_devices_report_lost_members_as_eio() {
        assert_eq!(IoError::Timeout("m".into()).block_errno(), libc::EIO);
        assert_eq!(IoError::Disconnected("m".into()).block_errno(), libc::EIO);
        assert_eq!(IoError::Timeout("m".into()).errno(), libc::ETIMEDOUT);
        assert_eq!(IoError::NoSpace("m".into()).block_errno(), libc::ENOSPC);
        assert_eq!(IoError::Invalid("m".into()).block_errno(), libc::EINVAL);
    }
}
