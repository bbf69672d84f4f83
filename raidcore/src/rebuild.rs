//! Bringing a member back: `rebuild` refills a faulty member from its mirrors while the
//! array stays in service; `remove_member` and `add_member` let an operator swap the
//! member in a slot. The copy is level-agnostic: it walks the array's address space and,
//! for every piece with a copy on the target, reads a healthy sibling and writes the target.
//!
//! Consistency with concurrent writes: the target is switched to `Rebuilding` (so new
//! writes include it), the resync gate is taken once exclusively (so writes that chose
//! their targets before the switch finish first), and each stretch is copied under the
//! gate, so a front write to that stretch lands either before the copy reads it or after
//! the copy wrote it, and in both cases on the target too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use uuid::Uuid;

use crate::array::{sub, write_superblock, Array};
use crate::error::IoError;
use crate::io::{IoBuf, Op};
use crate::level::{Copy, Piece};
use crate::member::{FaultReason, Member, MemberState};
use crate::superblock::SbState;

/// Bytes copied per stretch: large enough to stream, small enough that writes held at the
/// gate wait only a few milliseconds.
const STEP: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum RebuildError {
    #[error("array {array} has no member #{index} (it has {count})")]
    NoSuchMember {
        array: String,
        index: usize,
        count: usize,
    },
    #[error("array {array} is {level}: it keeps one copy of each block, so there is nothing to rebuild member #{index} from")]
    NotRedundant {
        array: String,
        level: &'static str,
        index: usize,
    },
    #[error("array {array}: member #{index} is {state}; only a faulty member can be re-added (fail it first with `uniblk member fail`)")]
    NotFaulty {
        array: String,
        index: usize,
        state: String,
    },
    #[error("array {array}: slot #{index} is empty; put a member in it with `uniblk member add`")]
    Removed { array: String, index: usize },
    #[error("array {array}: some data has no healthy copy left to rebuild member #{index} from")]
    NoSource { array: String, index: usize },
    #[error("array {array} is already rebuilding a member; wait for it to finish")]
    Busy { array: String },
    #[error("array {array}: rebuild of member #{index} stopped at byte {at}: {reason}")]
    Aborted {
        array: String,
        index: usize,
        at: u64,
        reason: String,
    },
    #[error("array {array}: member #{index} must be faulty to be removed (fail it first with `uniblk member fail`)")]
    NotRemovable { array: String, index: usize },
    #[error("array {array}: slot #{index} is not empty; remove its member first with `uniblk member remove`")]
    Occupied { array: String, index: usize },
    #[error(
        "member {address} is {size} bytes; slot #{index} of array {array} needs at least {need}"
    )]
    TooSmall {
        address: String,
        array: String,
        index: usize,
        size: u64,
        need: u64,
    },
    #[error("member {address} has {got}-byte blocks; array {array} uses {want}-byte blocks")]
    BlockSize {
        address: String,
        array: String,
        got: u32,
        want: u32,
    },
    #[error("array {array}: {error}")]
    Io { array: String, error: IoError },
}

/// Clears the array's one-rebuild-at-a-time flag however the rebuild ends.
struct Running<'a>(&'a Array);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.rebuilding.store(false, Ordering::Release);
    }
}

impl Array {
    fn member_index(&self, index: usize) -> Result<(), RebuildError> {
        if index >= self.members.len() {
            return Err(RebuildError::NoSuchMember {
                array: self.name.clone(),
                index,
                count: self.members.len(),
            });
        }
        Ok(())
    }

    /// Refill faulty member `index` from its mirrors and put it back in service. `rate`
    /// caps the copy in bytes per second. Progress is visible in the slot's `rebuild`.
    pub async fn rebuild(&self, index: usize, rate: Option<u64>) -> Result<(), RebuildError> {
        self.member_index(index)?;
        let array = self.name.clone();
        self.check_rebuildable(index)?;
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return Err(RebuildError::Busy { array });
        }
        let _running = Running(self);
        let slot = &self.members[index];
        slot.rebuild.total.store(self.size(), Ordering::Relaxed);
        slot.rebuild.done.store(0, Ordering::Relaxed);
        slot.set_state(MemberState::Rebuilding);
        tracing::info!(array = %array, member = %slot.member().info().address, "rebuild started");
        // Give the target its identity first (with its old, stale event count), so health
        // probes during the copy recognise it and a crash mid-copy leaves it stale.
        let sb = self.superblocks.lock().await[index].clone();
        if let Err(e) = write_superblock(&self.pool, &*slot.member(), &sb).await {
            slot.fail(FaultReason::from_error(&e));
            return Err(RebuildError::Io { array, error: e });
        }
        // Let writes that chose their copies before the switch finish.
        drop(self.resync_gate.write().await);
        if let Err((at, reason)) = self.copy_all(index, rate).await {
            slot.fail(FaultReason::IoError(format!("rebuild stopped: {reason}")));
            return Err(RebuildError::Aborted {
                array,
                index,
                at,
                reason,
            });
        }
        slot.set_state(MemberState::Healthy);
        self.write_superblocks(SbState::Active)
            .await
            .map_err(|error| RebuildError::Io {
                array: array.clone(),
                error,
            })?;
        tracing::info!(array = %array, member = %slot.member().info().address, "rebuild complete");
        Ok(())
    }

    /// Whether `rebuild(index)` would start now (for callers that run it in the
    /// background and want to report refusals at once).
    pub fn check_rebuildable(&self, index: usize) -> Result<(), RebuildError> {
        self.member_index(index)?;
        let array = self.name.clone();
        if self.rebuilding.load(Ordering::Acquire) {
            return Err(RebuildError::Busy { array });
        }
        match self.members[index].state() {
            MemberState::Faulty(FaultReason::Removed) => {
                return Err(RebuildError::Removed { array, index })
            }
            MemberState::Faulty(_) => {}
            st => {
                return Err(RebuildError::NotFaulty {
                    array,
                    index,
                    state: format!("{st:?}").to_lowercase(),
                })
            }
        }
        if self.members.len() < 2 || !self.level.tolerates(&self.only(index)) {
            return Err(RebuildError::NotRedundant {
                array,
                level: self.level.kind().name(),
                index,
            });
        }
        let failed: Vec<bool> = self.members.iter().map(|m| !m.is_healthy()).collect();
        if !self.level.tolerates(&failed) {
            return Err(RebuildError::NoSource { array, index });
        }
        Ok(())
    }

    /// A failure set holding only `index`.
    fn only(&self, index: usize) -> Vec<bool> {
        (0..self.members.len()).map(|i| i == index).collect()
    }

    /// Copy every stretch; on failure, where it stopped and why.
    async fn copy_all(&self, index: usize, rate: Option<u64>) -> Result<(), (u64, String)> {
        let mut buf = self
            .pool
            .get(STEP as usize)
            .await
            .ok_or((0, "no buffer for the copy".to_string()))?;
        let (size, started) = (self.size(), Instant::now());
        let mut off = 0;
        while off < size {
            if self.members[index].state() != MemberState::Rebuilding {
                return Err((off, "the member failed during the rebuild".into()));
            }
            let len = STEP.min(size - off);
            let stretch = IoBuf::from_slice(&mut buf[..len as usize]);
            self.copy_stretch(index, off, stretch)
                .await
                .map_err(|e| (off, e))?;
            off += len;
            self.members[index]
                .rebuild
                .done
                .store(off, Ordering::Relaxed);
            pace(rate, off, started).await;
        }
        let flush = Copy {
            member: index,
            offset: 0,
        };
        self.member_io(flush, Op::Flush, IoBuf::empty(), false)
            .await
            .map_err(|e| (size, format!("flush: {e}")))
    }

    /// Copy one stretch of array space onto the target, under the gate.
    async fn copy_stretch(&self, index: usize, off: u64, buf: IoBuf) -> Result<(), String> {
        let _gate = self.resync_gate.write().await;
        for p in self.map(off, buf.len() as u64) {
            let Some(&target) = p.copies.iter().find(|c| c.member == index) else {
                continue;
            };
            let source = Piece {
                req_off: p.req_off,
                len: p.len,
                copies: p
                    .copies
                    .iter()
                    .copied()
                    .filter(|c| c.member != index)
                    .collect(),
            };
            let part = sub(buf, &p);
            self.read_piece(&source, part)
                .await
                .map_err(|e| format!("reading the mirror: {e}"))?;
            self.member_io(target, Op::Write, part, false)
                .await
                .map_err(|e| format!("writing the member: {e}"))?;
        }
        Ok(())
    }

    /// Take a faulty member out of its slot (closing it); the slot waits for `add_member`.
    pub async fn remove_member(&self, index: usize) -> Result<Arc<dyn Member>, RebuildError> {
        self.member_index(index)?;
        let slot = &self.members[index];
        match slot.state() {
            MemberState::Faulty(FaultReason::Removed) => {
                return Err(RebuildError::Removed {
                    array: self.name.clone(),
                    index,
                })
            }
            MemberState::Faulty(_) => {}
            _ => {
                return Err(RebuildError::NotRemovable {
                    array: self.name.clone(),
                    index,
                })
            }
        }
        slot.set_state(MemberState::Faulty(FaultReason::Removed));
        let m = slot.member();
        m.close();
        Ok(m)
    }

    /// Put a new member into an empty slot: check its size, write its superblock (with an
    /// old event count, so it counts as stale until rebuilt) and leave it faulty for
    /// `rebuild`.
    pub async fn add_member(&self, index: usize, m: Arc<dyn Member>) -> Result<(), RebuildError> {
        self.member_index(index)?;
        let array = self.name.clone();
        if self.members[index].state() != MemberState::Faulty(FaultReason::Removed) {
            return Err(RebuildError::Occupied { array, index });
        }
        let info = m.info().clone();
        let need = self.data_offset() + self.level.member_span(index);
        if info.size < need {
            return Err(RebuildError::TooSmall {
                address: info.address,
                array,
                index,
                size: info.size,
                need,
            });
        }
        if info.block_size > self.block_size() {
            return Err(RebuildError::BlockSize {
                address: info.address,
                array,
                got: info.block_size,
                want: self.block_size(),
            });
        }
        let mut sbs = self.superblocks.lock().await;
        let sb = &mut sbs[index];
        sb.member_uuid = Uuid::new_v4();
        sb.events = 0;
        sb.state = SbState::Active;
        write_superblock(&self.pool, &*m, sb)
            .await
            .map_err(|error| RebuildError::Io {
                array: array.clone(),
                error,
            })?;
        drop(sbs);
        self.members[index].replace(m);
        self.members[index].set_state(MemberState::Faulty(FaultReason::Stale));
        Ok(())
    }
}

/// Sleep as needed to keep the copy at or under `rate` bytes per second.
async fn pace(rate: Option<u64>, done: u64, started: Instant) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::time::sleep(wait).await;
    }
}
