//! Assembly: turn opened members plus the layout's description of an array into a running
//! `Array`, reading and writing superblocks on the way. Blank members are initialised; a
//! member carrying another array's superblock is refused unless forced; a member that
//! missed writes while faulty (older event count) is kept out of service.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;
use uuid::Uuid;

use crate::array::{read_superblock_block, write_superblock, Array};
use crate::buf_pool::BufPool;
use crate::error::IoError;
use crate::level::{self, LevelError, LevelKind};
use crate::member::{FaultReason, Member, MemberSlot};
use crate::queue::{policy_by_name, IoQueue, POLICY_NAMES};
use crate::superblock::{SbError, SbState, Superblock, DEFAULT_DATA_OFFSET};

/// The smallest data area a member may have.
pub const MIN_DATA: u64 = 1 << 20;

/// What the layout says about one array.
#[derive(Debug, Clone)]
pub struct ArraySpec {
    pub name: String,
    pub level: LevelKind,
    pub chunk: u64,
    pub queue_depth: usize,
    pub policy: String,
}

#[derive(Debug, Error)]
pub enum AssembleError {
    #[error("array {array}: cannot map its read-modify-write buffers: {error}; free some memory and start again")]
    Memory {
        array: String,
        error: std::io::Error,
    },
    #[error("member {address} is {size} bytes; array {array} needs at least {need} bytes per member ({data_offset} of metadata + {min_data} of data)")]
    TooSmall {
        address: String,
        array: String,
        size: u64,
        need: u64,
        data_offset: u64,
        min_data: u64,
    },
    #[error("member {address} has a {block_size}-byte logical block; uniblk supports up to 4096")]
    BlockSize { address: String, block_size: u32 },
    #[error("member {address}: reading its superblock failed: {error}")]
    Read { address: String, error: IoError },
    #[error("member {address}: writing its superblock failed: {error}")]
    Write { address: String, error: IoError },
    #[error("member {address} carries array '{other}' ({uuid}) as member #{role}; refusing to overwrite it for array '{array}' (pass --force to reuse it, destroying that data)")]
    Foreign {
        address: String,
        other: String,
        uuid: Uuid,
        role: u32,
        array: String,
    },
    #[error("member {address} has {problem}, but the other members carry array '{array}' ({uuid}); pass --force to initialise it as a new member (its data is not copied from the mirrors yet)")]
    Unexpected {
        address: String,
        problem: String,
        array: String,
        uuid: Uuid,
    },
    #[error("member {address} carries array '{array}' with {found}, but the layout says {layout}; fix the layout to match (or re-create the array with --force, destroying its data)")]
    Mismatch {
        address: String,
        array: String,
        found: String,
        layout: String,
    },
    #[error("member {address} shrank: its superblock records {recorded} data bytes but only {available} are left")]
    Shrunk {
        address: String,
        recorded: u64,
        available: u64,
    },
    #[error("array {array}: {error}")]
    Level { array: String, error: LevelError },
    #[error("array {array}: unknown queue policy '{policy}' (choose one of: {choices})")]
    Policy {
        array: String,
        policy: String,
        choices: String,
    },
}

/// What assembly did, for the log and the CLI.
#[derive(Debug, Default)]
pub struct AssembleReport {
    pub initialised: Vec<String>,
    pub stale: Vec<String>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read what each member carries: Some(superblock), or None for blank/unreadable metadata
/// (with the reason).
async fn read_all(
    pool: &BufPool,
    members: &[Arc<dyn Member>],
) -> Result<Vec<Result<Superblock, SbError>>, AssembleError> {
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        let b = read_superblock_block(pool, &**m)
            .await
            .map_err(|error| AssembleError::Read {
                address: m.info().address.clone(),
                error,
            })?;
        out.push(Superblock::decode(&b));
    }
    Ok(out)
}

fn check_sizes(spec: &ArraySpec, members: &[Arc<dyn Member>]) -> Result<(), AssembleError> {
    for m in members {
        let info = m.info();
        if info.block_size > 4096 || !info.block_size.is_power_of_two() {
            return Err(AssembleError::BlockSize {
                address: info.address.clone(),
                block_size: info.block_size,
            });
        }
        let need = DEFAULT_DATA_OFFSET + MIN_DATA;
        if info.size < need {
            return Err(AssembleError::TooSmall {
                address: info.address.clone(),
                array: spec.name.clone(),
                size: info.size,
                need,
                data_offset: DEFAULT_DATA_OFFSET,
                min_data: MIN_DATA,
            });
        }
    }
    Ok(())
}

fn describe(sb: &Superblock) -> String {
    format!(
        "level {}, {} members, chunk {}, this one as member #{}",
        sb.level.name(),
        sb.members,
        sb.chunk,
        sb.role
    )
}

/// Assemble (and initialise where blank) an array from members given in layout order.
pub async fn assemble(
    spec: &ArraySpec,
    members: Vec<Arc<dyn Member>>,
    pool: BufPool,
    force: bool,
) -> Result<(Array, AssembleReport), AssembleError> {
    check_sizes(spec, &members)?;
    let policy = policy_by_name(&spec.policy).ok_or_else(|| AssembleError::Policy {
        array: spec.name.clone(),
        policy: spec.policy.clone(),
        choices: POLICY_NAMES.join(", "),
    })?;
    let found = read_all(&pool, &members).await?;
    let n = members.len();
    let chunk = if spec.level.uses_chunk() {
        spec.chunk
    } else {
        0
    };
    let layout_desc = |role: usize| {
        format!(
            "level {}, {} members, chunk {}, this one as member #{}",
            spec.level.name(),
            n,
            chunk,
            role
        )
    };

    // The array these members already belong to: the newest superblock naming our array.
    let reference = found
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|sb| sb.array_name == spec.name)
        .max_by_key(|sb| sb.events)
        .cloned();
    let array_uuid = reference
        .as_ref()
        .map(|r| r.array_uuid)
        .unwrap_or_else(Uuid::new_v4);

    let mut report = AssembleReport::default();
    let mut sbs = Vec::with_capacity(n);
    let mut stale = vec![false; n];
    for (i, (m, f)) in members.iter().zip(&found).enumerate() {
        let address = m.info().address.clone();
        let available = m.info().size - DEFAULT_DATA_OFFSET;
        let fresh = || Superblock {
            array_uuid,
            member_uuid: Uuid::new_v4(),
            array_name: spec.name.clone(),
            level: spec.level,
            role: i as u32,
            members: n as u32,
            chunk,
            data_offset: DEFAULT_DATA_OFFSET,
            data_size: available / 4096 * 4096,
            events: 0,
            state: SbState::Active,
            bitmap_offset: 0,
            bitmap_chunk: 0,
            created_unix: now_unix(),
        };
        let sb = match (f, &reference) {
            (Ok(sb), Some(r)) if sb.array_uuid == r.array_uuid => {
                let mismatch = sb.level != spec.level
                    || sb.members as usize != n
                    || sb.chunk != chunk
                    || sb.role as usize != i;
                if mismatch && force {
                    // The operator asked to re-create the array over these members.
                    report.initialised.push(address);
                    sbs.push(fresh());
                    continue;
                }
                if mismatch {
                    return Err(AssembleError::Mismatch {
                        address,
                        array: spec.name.clone(),
                        found: describe(sb),
                        layout: layout_desc(i),
                    });
                }
                if sb.data_offset + sb.data_size > m.info().size {
                    return Err(AssembleError::Shrunk {
                        address,
                        recorded: sb.data_size,
                        available: m.info().size.saturating_sub(sb.data_offset),
                    });
                }
                stale[i] = sb.events < r.events;
                sb.clone()
            }
            (Ok(sb), _) if !force => {
                return Err(AssembleError::Foreign {
                    address,
                    other: sb.array_name.clone(),
                    uuid: sb.array_uuid,
                    role: sb.role,
                    array: spec.name.clone(),
                });
            }
            (Err(e), Some(r)) if !force => {
                return Err(AssembleError::Unexpected {
                    address,
                    problem: e.to_string(),
                    array: spec.name.clone(),
                    uuid: r.array_uuid,
                });
            }
            // Blank members of a new array, or anything the operator forced.
            _ => {
                report.initialised.push(address);
                fresh()
            }
        };
        sbs.push(sb);
    }

    let sizes: Vec<u64> = sbs.iter().map(|s| s.data_size).collect();
    let lvl = level::build(spec.level, &sizes, chunk.max(4096)).map_err(|error| {
        AssembleError::Level {
            array: spec.name.clone(),
            error,
        }
    })?;
    let slots: Vec<MemberSlot> = members.iter().cloned().map(MemberSlot::new).collect();
    // A member that missed writes (older event count) must not serve reads. When the
    // level can spare it, it stays out of service; when it cannot (striped levels have
    // no other copy) it is used as it is, with a warning.
    if stale.iter().any(|&s| s) {
        if lvl.tolerates(&stale) {
            for (i, _) in stale.iter().enumerate().filter(|(_, &s)| s) {
                slots[i].fail(FaultReason::Stale);
                report.stale.push(members[i].info().address.clone());
            }
        } else {
            tracing::warn!(array = %spec.name, "members with older event counts are in use: no newer copy exists");
        }
    }
    // New members of a brand-new array start with the events everybody else will get.
    let events = sbs.iter().map(|s| s.events).max().unwrap_or(0) + 1;
    for (i, sb) in sbs.iter_mut().enumerate() {
        if !slots[i].is_healthy() {
            continue;
        }
        sb.events = events;
        sb.state = SbState::Active;
        write_superblock(&pool, &*members[i], sb)
            .await
            .map_err(|error| AssembleError::Write {
                address: members[i].info().address.clone(),
                error,
            })?;
    }
    let queue = IoQueue::new(spec.queue_depth, policy);
    let array = Array::new(spec.name.clone(), array_uuid, lvl, slots, queue, pool, sbs).map_err(
        |error| AssembleError::Memory {
            array: spec.name.clone(),
            error,
        },
    )?;
    Ok((array, report))
}
