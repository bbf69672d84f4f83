//! raidcore: the common I/O stack of uniblk. Frontends hand an `Array` a `FrontIo`; the
//! array's RAID level maps it to pieces and copies; each member I/O gets a `Tag` and goes
//! through the array's queue to a `Member`. Data buffers come from one `BufPool`.

pub mod array;
pub mod assemble;
pub mod buf_pool;
pub mod counter;
pub mod error;
pub mod io;
pub mod join;
pub mod level;
pub mod member;
pub mod plug;
pub mod queue;
pub mod rebuild;
pub mod superblock;

pub use array::{Array, ArrayRef, ArrayState, FrontBuf};
pub use assemble::{assemble, ArraySpec, AssembleError, AssembleReport};
pub use buf_pool::{BufPool, PoolBuf, PoolConfig};
pub use error::{IoError, IoResult};
pub use io::{Class, Flags, FrontIo, IoBuf, MemberIo, Op, Proto, Tag};
pub use level::LevelKind;
pub use member::{
    check_request, io_future, io_future_boxed, Caps, FaultReason, IoFuture, Member, MemberInfo,
    MemberSlot, MemberState,
};
pub use rebuild::RebuildError;
