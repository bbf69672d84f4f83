//! What a LUN is and can do, asked once per login: TEST UNIT READY, INQUIRY (standard
//! and the VPD pages for block limits and provisioning), READ CAPACITY(16), and whether
//! WRITE SAME(16) is supported.

use raidcore::IoBuf;
use tokio::time::Instant;

use super::scsi::{self, BlockLimits, Capacity, Cdb, Inquiry, Sense};
use super::session::{Command, Completion, Outcome, Session};

/// Unit attentions (a reset, a new login) may queue up; more than this many in a row
/// means something else is wrong.
pub const MAX_ATTENTIONS: usize = 8;

/// The facts about a LUN this initiator uses.
#[derive(Debug, Clone)]
pub struct LunInfo {
    pub capacity: Capacity,
    pub inquiry: Inquiry,
    pub limits: BlockLimits,
    /// UNMAP is advertised (Logical Block Provisioning VPD: LBPU, and LBPME set).
    pub unmap: bool,
    /// WRITE SAME(16) is supported (REPORT SUPPORTED OPERATION CODES).
    pub write_same: bool,
    /// WRITE SAME(16) may unmap (LBPWS).
    pub write_same_unmap: bool,
}

/// Why a control command failed, as text for an error message.
pub fn failure_text(cdb: &Cdb, c: &Completion) -> String {
    let name = scsi::command_name(cdb);
    match c.sense {
        Some(s) => format!("{name} failed: {}", s.describe()),
        None => format!("{name} ended with status {}", scsi::status_name(c.status)),
    }
}

/// Run a command that moves at most a few KiB into `into`, retrying unit attentions.
/// Returns the completion (GOOD or not) and how many bytes arrived.
pub async fn control(
    s: &Session,
    cdb: Cdb,
    into: &mut [u8],
    deadline: Instant,
) -> Result<(Completion, usize), String> {
    for _ in 0..MAX_ATTENTIONS {
        let cmd = Command {
            cdb,
            data_in: (!into.is_empty()).then(|| IoBuf::from_slice(into)),
            data_out: None,
        };
        match s.execute(&cmd, deadline).await {
            Outcome::Done(c) if c.sense.is_some_and(|x| x.retryable()) => continue,
            Outcome::Done(c) => {
                let got = (into.len() as i64 - c.residual.max(0)).clamp(0, into.len() as i64);
                return Ok((c, got as usize));
            }
            Outcome::Lost(why) => return Err(format!("the connection died: {why}")),
            Outcome::TimedOut => {
                return Err(format!(
                    "{} got no answer in time",
                    scsi::command_name(&cdb)
                ))
            }
            Outcome::Failed(why) => return Err(why),
        }
    }
    Err(format!(
        "{} kept reporting UNIT ATTENTION",
        scsi::command_name(&cdb)
    ))
}

/// [`control`] that must end GOOD.
async fn good(s: &Session, cdb: Cdb, into: &mut [u8], deadline: Instant) -> Result<usize, String> {
    let (c, n) = control(s, cdb, into, deadline).await?;
    if c.status != scsi::STATUS_GOOD {
        return Err(failure_text(&cdb, &c));
    }
    Ok(n)
}

/// One VPD page, or None when the LUN does not have it.
async fn vpd(s: &Session, page: u8, deadline: Instant) -> Result<Option<Vec<u8>>, String> {
    let mut b = vec![0u8; 255];
    let (c, n) = control(s, scsi::inquiry(Some(page), 255), &mut b, deadline).await?;
    if c.status != scsi::STATUS_GOOD || n < 4 || b[1] != page {
        return Ok(None);
    }
    b.truncate(n);
    Ok(Some(b))
}

/// Ask the LUN everything [`LunInfo`] holds.
pub async fn probe(s: &Session, deadline: Instant) -> Result<LunInfo, String> {
    let (c, _) = control(s, scsi::test_unit_ready(), &mut [], deadline).await?;
    if c.status != scsi::STATUS_GOOD {
        return Err(failure_text(&scsi::test_unit_ready(), &c));
    }
    let mut std_inq = [0u8; 96];
    let n = good(s, scsi::inquiry(None, 96), &mut std_inq, deadline).await?;
    let inquiry = Inquiry::parse(&std_inq[..n]).ok_or("its INQUIRY data is too short")?;
    if inquiry.device_type != 0 {
        return Err(format!(
            "it is not a disk (SCSI peripheral device type {:#04x}, {} {})",
            inquiry.device_type, inquiry.vendor, inquiry.product
        ));
    }
    let mut cap = [0u8; 32];
    let n = good(s, scsi::read_capacity16(), &mut cap, deadline).await?;
    let capacity = Capacity::parse(&cap[..n]).ok_or("its READ CAPACITY(16) data is invalid")?;
    let pages = vpd(s, scsi::VPD_SUPPORTED, deadline)
        .await?
        .map(|p| scsi::vpd_pages(&p))
        .unwrap_or_default();
    let limits = match pages.contains(&scsi::VPD_BLOCK_LIMITS) {
        true => vpd(s, scsi::VPD_BLOCK_LIMITS, deadline)
            .await?
            .map(|p| BlockLimits::parse(&p))
            .unwrap_or_default(),
        false => BlockLimits::default(),
    };
    let (lbpu, lbpws) = match pages.contains(&scsi::VPD_LB_PROVISIONING) {
        true => vpd(s, scsi::VPD_LB_PROVISIONING, deadline)
            .await?
            .map(|p| scsi::lb_provisioning(&p))
            .unwrap_or_default(),
        false => (false, false),
    };
    let write_same = supports(s, scsi::OP_WRITE_SAME_16, deadline).await?;
    Ok(LunInfo {
        capacity,
        inquiry,
        limits,
        unmap: lbpu && capacity.lbpme,
        write_same,
        write_same_unmap: write_same && lbpws && capacity.lbpme,
    })
}

/// Whether the LUN reports `op` as supported; a target without REPORT SUPPORTED
/// OPERATION CODES is taken to lack it.
async fn supports(s: &Session, op: u8, deadline: Instant) -> Result<bool, String> {
    let mut b = [0u8; 64];
    let (c, n) = control(s, scsi::report_opcode(op), &mut b, deadline).await?;
    Ok(c.status == scsi::STATUS_GOOD && scsi::opcode_supported(&b[..n]))
}

/// The LUNs a target exports (REPORT LUNS), for discovery.
pub async fn report_luns(s: &Session, deadline: Instant) -> Result<Vec<u16>, String> {
    let mut b = vec![0u8; 16 + 8 * 256];
    let n = good(s, scsi::report_luns(b.len() as u32), &mut b, deadline).await?;
    Ok(scsi::report_luns_list(&b[..n]))
}

/// Sense that makes a command worth sending again unchanged.
pub fn retryable(c: &Completion) -> bool {
    c.sense.is_some_and(|s: Sense| s.retryable())
        || matches!(
            c.status,
            scsi::STATUS_BUSY | scsi::STATUS_TASK_SET_FULL | scsi::STATUS_TASK_ABORTED
        )
}
