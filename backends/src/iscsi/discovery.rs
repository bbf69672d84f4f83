//! SendTargets discovery (RFC 7143 §13.19 / appendix C) and LUN listing, for
//! `uniblk scan iscsi://host[:port]`: a discovery session lists the targets, then a
//! normal session per target asks REPORT LUNS and each LUN its capacity.

use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::login::{self, LoginOptions, Peer, SessionType};
use super::lun;
use super::pdu::{self, Bhs, RESERVED_TAG};
use super::session::Session;
use super::{IscsiError, IscsiUrl};

/// SendTargets text beyond this is refused (thousands of targets would fit).
const MAX_TEXT: usize = 1 << 20;

/// One target as discovery found it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetListing {
    pub name: String,
    /// `TargetAddress` values: `host:port,portal-group`.
    pub addresses: Vec<String>,
    pub luns: Vec<LunListing>,
    /// Why the target's LUNs could not be listed (e.g. it wants CHAP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One disk LUN of a target.
#[derive(Debug, Clone, Serialize)]
pub struct LunListing {
    pub lun: u16,
    pub size: u64,
    pub block_size: u32,
    pub vendor: String,
    pub product: String,
    pub unmap: bool,
    /// The member address to put in a layout.
    pub address: String,
}

/// The targets a portal reports to SendTargets=All, with their addresses.
pub async fn send_targets(
    url: &IscsiUrl,
    opts: &LoginOptions,
) -> Result<Vec<(String, Vec<String>)>, IscsiError> {
    let peer = Peer::of(url);
    let l = login::connect_and_login(url, opts, SessionType::Discovery).await?;
    let work = text_exchange(l, &peer);
    let text = match tokio::time::timeout(opts.connect_timeout, work).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(IscsiError::Timeout {
                target: peer.target,
                portal: peer.portal,
                during: "SendTargets",
                timeout: opts.connect_timeout,
            })
        }
    };
    let keys = pdu::decode_text(&text).map_err(|why| protocol(&peer, why))?;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in keys {
        match (k.as_str(), out.last_mut()) {
            ("TargetName", _) => out.push((v, Vec::new())),
            ("TargetAddress", Some(t)) => t.1.push(v),
            _ => {}
        }
    }
    Ok(out)
}

fn protocol(peer: &Peer, why: String) -> IscsiError {
    IscsiError::Protocol {
        target: peer.target.clone(),
        portal: peer.portal.clone(),
        during: "SendTargets",
        why,
    }
}

/// Text Request SendTargets=All, gathering continued responses, then Logout.
async fn text_exchange(l: login::LoggedIn, peer: &Peer) -> Result<Vec<u8>, IscsiError> {
    let mut s = l.stream;
    let d = l.neg.digests;
    let (mut exp_stat_sn, cmd_sn) = (l.neg.exp_stat_sn, l.neg.cmd_sn);
    let io = |e: std::io::Error| protocol(peer, format!("cannot send: {e}"));
    let rd = |e: pdu::ReadError| protocol(peer, e.to_string());
    let mut ttt = RESERVED_TAG;
    let mut body = pdu::encode_text(&[("SendTargets", "All")]);
    let mut text = Vec::new();
    loop {
        let mut b = Bhs::new(pdu::OP_TEXT_REQ);
        b.set_immediate();
        b.set_flags(pdu::F_FINAL);
        b.set_itt(1);
        b.set_u32(20, ttt);
        b.set_u32(24, cmd_sn);
        b.set_u32(28, exp_stat_sn);
        s.write_all(&pdu::encode(&b, &body, d)).await.map_err(io)?;
        let h = pdu::read_bhs(&mut s, d).await.map_err(rd)?;
        let part = pdu::read_data(&mut s, h.data_len(), login::OUR_MAX_RECV, d)
            .await
            .map_err(rd)?;
        if h.opcode() != pdu::OP_TEXT_RSP {
            return Err(protocol(
                peer,
                format!("it answered with a {}", pdu::opcode_name(h.opcode())),
            ));
        }
        exp_stat_sn = h.stat_sn().wrapping_add(1);
        text.extend_from_slice(&part);
        if text.len() > MAX_TEXT {
            return Err(protocol(peer, "its target list is too long".into()));
        }
        if h.flags() & pdu::F_CONTINUE == 0 {
            break;
        }
        // More to come: an empty request with the target's transfer tag asks for it.
        ttt = h.ttt();
        body.clear();
    }
    let mut b = Bhs::new(pdu::OP_LOGOUT_REQ);
    b.set_immediate();
    b.set_flags(pdu::F_FINAL);
    b.set_itt(2);
    b.set_u32(24, cmd_sn);
    b.set_u32(28, exp_stat_sn);
    // Best effort: the list is what matters.
    if s.write_all(&pdu::encode(&b, &[], d)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), pdu::read_bhs(&mut s, d)).await;
    }
    Ok(text)
}

/// Discovery, then each target's disk LUNs with sizes.
pub async fn discover(
    portal: &IscsiUrl,
    opts: &LoginOptions,
) -> Result<Vec<TargetListing>, IscsiError> {
    let mut out = Vec::new();
    for (name, addresses) in send_targets(portal, opts).await? {
        let mut t = TargetListing {
            name,
            addresses,
            luns: Vec::new(),
            error: None,
        };
        match list_luns(portal, &t.name, opts).await {
            Ok(luns) => t.luns = luns,
            Err(e) => t.error = Some(e),
        }
        out.push(t);
    }
    Ok(out)
}

fn at_lun(portal: &IscsiUrl, target: &str, lun: u16) -> IscsiUrl {
    IscsiUrl {
        target: target.to_string(),
        lun,
        ..portal.clone()
    }
}

async fn list_luns(
    portal: &IscsiUrl,
    target: &str,
    opts: &LoginOptions,
) -> Result<Vec<LunListing>, String> {
    let deadline = || Instant::now() + opts.connect_timeout;
    let luns = {
        let s = open(&at_lun(portal, target, 0), opts).await?;
        let r = lun::report_luns(&s, deadline()).await;
        s.logout(Instant::now() + Duration::from_secs(2)).await;
        r?
    };
    let mut out = Vec::new();
    for n in luns {
        let url = at_lun(portal, target, n);
        let s = open(&url, opts).await?;
        let probed = lun::probe(&s, deadline()).await;
        s.logout(Instant::now() + Duration::from_secs(2)).await;
        // Controllers and other non-disk LUNs (tgtd's LUN 0) are not members.
        if let Ok(l) = probed {
            out.push(LunListing {
                lun: n,
                size: l.capacity.bytes(),
                block_size: l.capacity.block_size,
                vendor: l.inquiry.vendor,
                product: l.inquiry.product,
                unmap: l.unmap,
                address: IscsiUrl {
                    user: None,
                    password: None,
                    ..url
                }
                .redacted(),
            });
        }
    }
    Ok(out)
}

async fn open(url: &IscsiUrl, opts: &LoginOptions) -> Result<std::sync::Arc<Session>, String> {
    let l = login::connect_and_login(url, opts, SessionType::Normal)
        .await
        .map_err(|e| e.to_string())?;
    Session::start(l, Peer::of(url), url.lun).map_err(|e| e.to_string())
}
