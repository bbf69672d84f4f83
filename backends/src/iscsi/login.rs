//! Connecting and logging in (RFC 7143 §6, §12): the security stage with AuthMethod
//! None or CHAP (MD5, RFC 1994), optionally mutual, then the operational stage that
//! fixes segment and burst sizes, R2T/immediate-data policy and digests.

use std::io;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::pdu::{self, Bhs, Digests};
use super::{IscsiError, IscsiUrl};

/// What we accept in one data segment: also what we declare as our
/// MaxRecvDataSegmentLength, so a Data-In never exceeds it.
pub const OUR_MAX_RECV: u32 = 256 << 10;
/// Login and text responses larger than this are a protocol violation here.
const MAX_LOGIN_DATA: u32 = 64 << 10;
/// Bounds the negotiation's round trips (a target that keeps asking is broken).
const MAX_ROUNDS: usize = 16;
/// We ask for the largest burst the protocol allows; the target lowers it.
const OUR_MAX_BURST: u32 = 16 * 1024 * 1024 - 512;
const OUR_FIRST_BURST: u32 = 256 << 10;

/// A CHAP name and secret. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chap({}, ***)", self.user)
    }
}

/// How to log in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub initiator_name: String,
    /// Kept across re-logins so the target reinstates our session instead of keeping a
    /// stale one beside it.
    pub isid: [u8; 6],
    /// Our CHAP credentials, when the target wants CHAP.
    pub chap: Option<Chap>,
    /// The target's expected name and secret: set for mutual CHAP.
    pub mutual: Option<Chap>,
    /// Offer CRC32C header and data digests first (the target chooses).
    pub digests: bool,
    pub connect_timeout: Duration,
    /// TCP_USER_TIMEOUT: unacknowledged data older than this kills the connection.
    pub user_timeout: Duration,
}

impl Default for LoginOptions {
    fn default() -> Self {
        LoginOptions {
            initiator_name: default_initiator_name(),
            isid: new_isid(),
            chap: None,
            mutual: None,
            digests: false,
            connect_timeout: Duration::from_secs(10),
            user_timeout: Duration::from_secs(30),
        }
    }
}

/// `iqn.2026-11.io.uniblk:HOSTNAME`.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2026-11.io.uniblk:{host}")
}

/// A random ISID of the "random" type (RFC 7143 §11.12.5: T = 10b).
pub fn new_isid() -> [u8; 6] {
    let mut r = random::<6>();
    r[0] = 0x80 | (r[0] & 0x3f);
    r
}

pub(super) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: getrandom writes at most N bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    if n != N as isize {
        // Not a secret (ISIDs, CHAP identifiers): time-derived bytes are good enough.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8;
        }
    }
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// The outcome of a login: the parameters the full-feature phase runs with.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// The target's MaxRecvDataSegmentLength: the most we may send in one PDU.
    pub max_send_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub digests: Digests,
    pub tsih: u16,
    /// The next CmdSN to use, and the window the target last gave.
    pub cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// The next StatSN we expect.
    pub exp_stat_sn: u32,
}

/// A logged-in connection.
pub struct LoggedIn {
    pub stream: TcpStream,
    pub neg: Negotiated,
    /// What the target reported about itself (TargetAlias), for status.
    pub alias: Option<String>,
}

/// Who we talk to, for messages.
#[derive(Debug, Clone)]
pub struct Peer {
    pub target: String,
    pub portal: String,
}

impl Peer {
    pub fn of(url: &IscsiUrl) -> Self {
        Peer {
            target: if url.target.is_empty() {
                "(discovery)".into()
            } else {
                url.target.clone()
            },
            portal: url.portal(),
        }
    }

    pub(super) fn protocol(&self, during: &'static str, why: impl Into<String>) -> IscsiError {
        IscsiError::Protocol {
            target: self.target.clone(),
            portal: self.portal.clone(),
            during,
            why: why.into(),
        }
    }

    fn refused(&self, reason: impl Into<String>, hint: &str, errno: i32) -> IscsiError {
        IscsiError::LoginRefused {
            target: self.target.clone(),
            portal: self.portal.clone(),
            reason: reason.into(),
            hint: hint.to_string(),
            errno,
        }
    }
}

/// Connect to the URL's portal and log in (a normal session for its target, or a
/// discovery session), all within `opts.connect_timeout` for the connect and again for
/// the login exchange.
pub async fn connect_and_login(
    url: &IscsiUrl,
    opts: &LoginOptions,
    kind: SessionType,
) -> Result<LoggedIn, IscsiError> {
    let peer = Peer::of(url);
    let stream = connect(url, opts).await?;
    match tokio::time::timeout(opts.connect_timeout, login(stream, url, opts, kind, &peer)).await {
        Ok(r) => r,
        Err(_) => Err(IscsiError::Timeout {
            target: peer.target,
            portal: peer.portal,
            during: "login",
            timeout: opts.connect_timeout,
        }),
    }
}

async fn connect(url: &IscsiUrl, opts: &LoginOptions) -> Result<TcpStream, IscsiError> {
    let portal = url.portal();
    let fail = |reason: String, hint: &str, errno: i32| IscsiError::Connect {
        portal: portal.clone(),
        reason,
        hint: hint.to_string(),
        errno,
    };
    let attempt = TcpStream::connect((url.host.as_str(), url.port));
    let s = match tokio::time::timeout(opts.connect_timeout, attempt).await {
        Err(_) => {
            return Err(fail(
                format!("no answer within {:?}", opts.connect_timeout),
                "check the address and the network",
                libc::ETIMEDOUT,
            ))
        }
        Ok(Err(e)) => {
            let hint = match e.kind() {
                io::ErrorKind::ConnectionRefused => "is the iSCSI target (tgtd) running?",
                _ => "check the host and port",
            };
            let errno = e.raw_os_error().unwrap_or(libc::EHOSTUNREACH);
            return Err(fail(os_reason(&e), hint, errno));
        }
        Ok(Ok(s)) => s,
    };
    crate::tcp::tune(&s, opts.user_timeout, "iSCSI");
    Ok(s)
}

fn os_reason(e: &io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

pub(super) const STAGE_SECURITY: u8 = 0;
pub(super) const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL: u8 = 3;

/// One login exchange's state: sequence numbers and the connection.
pub(super) struct Exchange<'a> {
    stream: TcpStream,
    pub(super) peer: &'a Peer,
    isid: [u8; 6],
    tsih: u16,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
}

/// A login response, decoded.
pub(super) struct Reply {
    transit: bool,
    nsg: u8,
    keys: Vec<(String, String)>,
}

impl Reply {
    pub(super) fn get(&self, k: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

impl Exchange<'_> {
    /// Send one Login Request and read its response (continuations of the response's
    /// text are gathered, RFC 7143 §11.13.3).
    pub(super) async fn round(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[u8],
    ) -> Result<Reply, IscsiError> {
        let mut b = Bhs::new(pdu::OP_LOGIN_REQ);
        b.set_immediate();
        let t = if transit { pdu::F_TRANSIT } else { 0 };
        b.set_flags(t | (csg << 2) | if transit { nsg } else { 0 });
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_u16(14, self.tsih);
        b.set_itt(0);
        b.set_u32(24, self.cmd_sn);
        b.set_u32(28, self.exp_stat_sn);
        let mut data = Vec::new();
        let mut send = keys.to_vec();
        loop {
            self.write(&b, &send).await?;
            let (h, part) = self.read_response().await?;
            data.extend_from_slice(&part);
            if data.len() > MAX_LOGIN_DATA as usize {
                return Err(self
                    .peer
                    .protocol("login", "its login response text is too long"));
            }
            if h.flags() & pdu::F_CONTINUE == 0 {
                let keys = pdu::decode_text(&data).map_err(|w| self.peer.protocol("login", w))?;
                return Ok(Reply {
                    transit: h.flags() & pdu::F_TRANSIT != 0,
                    nsg: h.flags() & 3,
                    keys,
                });
            }
            // The target has more text: ask for it with an empty, non-transit request.
            b.set_flags(csg << 2);
            send.clear();
        }
    }

    async fn write(&mut self, b: &Bhs, data: &[u8]) -> Result<(), IscsiError> {
        let wire = pdu::encode(b, data, Digests::default());
        self.stream
            .write_all(&wire)
            .await
            .map_err(|e| self.peer.protocol("login", format!("cannot send: {e}")))
    }

    async fn read_response(&mut self) -> Result<(Bhs, Vec<u8>), IscsiError> {
        let d = Digests::default();
        let err = |e: pdu::ReadError| self.peer.protocol("login", e.to_string());
        let h = pdu::read_bhs(&mut self.stream, d).await.map_err(err)?;
        let data = pdu::read_data(&mut self.stream, h.data_len(), MAX_LOGIN_DATA, d)
            .await
            .map_err(err)?;
        if h.opcode() != pdu::OP_LOGIN_RSP {
            return Err(self.peer.protocol(
                "login",
                format!(
                    "it sent a {} instead of a Login Response",
                    pdu::opcode_name(h.opcode())
                ),
            ));
        }
        check_status(self.peer, h.byte(36), h.byte(37), &data)?;
        self.exp_stat_sn = h.stat_sn().wrapping_add(1);
        self.max_cmd_sn = h.max_cmd_sn();
        self.tsih = h.u16_at(14);
        Ok((h, data))
    }
}

async fn login(
    stream: TcpStream,
    url: &IscsiUrl,
    opts: &LoginOptions,
    kind: SessionType,
    peer: &Peer,
) -> Result<LoggedIn, IscsiError> {
    let mut x = Exchange {
        stream,
        peer,
        isid: opts.isid,
        tsih: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        max_cmd_sn: 1,
    };
    let mut alias = None;
    security(&mut x, url, opts, kind, &mut alias).await?;
    let neg = operational(&mut x, opts, kind, &mut alias).await?;
    Ok(LoggedIn {
        stream: x.stream,
        neg,
        alias,
    })
}

/// The security stage, until the target agrees to move to the operational stage.
async fn security(
    x: &mut Exchange<'_>,
    url: &IscsiUrl,
    opts: &LoginOptions,
    kind: SessionType,
    alias: &mut Option<String>,
) -> Result<(), IscsiError> {
    let mut keys: Vec<(&str, &str)> = vec![("InitiatorName", &opts.initiator_name)];
    match kind {
        SessionType::Normal => {
            keys.push(("SessionType", "Normal"));
            keys.push(("TargetName", &url.target));
        }
        SessionType::Discovery => keys.push(("SessionType", "Discovery")),
    }
    let auth = if opts.chap.is_some() {
        "CHAP,None"
    } else {
        "None"
    };
    keys.push(("AuthMethod", auth));
    let mut reply = x
        .round(
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            opts.chap.is_none(),
            &pdu::encode_text(&keys),
        )
        .await?;
    note_alias(&reply, alias);
    match reply.get("AuthMethod") {
        Some("CHAP") => {
            let chap = opts.chap.as_ref().ok_or_else(|| {
                x.peer.refused(
                    "the target requires CHAP",
                    "give the CHAP user and secret in the URL (iscsi://user%secret@...) or the layout",
                    libc::EACCES,
                )
            })?;
            reply = super::chap::chap_exchange(x, chap, opts.mutual.as_ref()).await?;
        }
        Some("None") | None => {
            if opts.mutual.is_some() {
                return Err(IscsiError::MutualAuth {
                    target: x.peer.target.clone(),
                    portal: x.peer.portal.clone(),
                    why: "the target did not authenticate itself (it chose AuthMethod=None)".into(),
                });
            }
        }
        Some(other) => {
            return Err(x.peer.refused(
                format!("it offers only AuthMethod {other}"),
                "uniblk speaks CHAP and None",
                libc::EPROTONOSUPPORT,
            ))
        }
    }
    // Ask to move on until the target agrees (it may want another empty round).
    for _ in 0..MAX_ROUNDS {
        if reply.transit && reply.nsg >= STAGE_OPERATIONAL {
            return Ok(());
        }
        reply = x
            .round(STAGE_SECURITY, STAGE_OPERATIONAL, true, &[])
            .await?;
    }
    Err(x.peer.protocol("login", "it never left the security stage"))
}

fn note_alias(r: &Reply, alias: &mut Option<String>) {
    if let Some(a) = r.get("TargetAlias") {
        *alias = Some(a.chars().take(255).collect());
    }
}

/// The operational stage: propose our values, read the target's, answer anything it
/// proposes on its own, until it moves to the full-feature phase.
async fn operational(
    x: &mut Exchange<'_>,
    opts: &LoginOptions,
    kind: SessionType,
    alias: &mut Option<String>,
) -> Result<Negotiated, IscsiError> {
    let digest = if opts.digests { "CRC32C,None" } else { "None" };
    let (mrdsl, burst, first) = (
        OUR_MAX_RECV.to_string(),
        OUR_MAX_BURST.to_string(),
        OUR_FIRST_BURST.to_string(),
    );
    let mut ours: Vec<(&str, &str)> = vec![
        ("HeaderDigest", digest),
        ("DataDigest", digest),
        ("MaxRecvDataSegmentLength", &mrdsl),
    ];
    if kind == SessionType::Normal {
        ours.extend([
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", burst.as_str()),
            ("FirstBurstLength", first.as_str()),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
        ]);
    }
    let mut neg = Negotiated {
        max_send_segment: 8192,
        max_burst: 262_144,
        first_burst: 65_536,
        initial_r2t: true,
        immediate_data: true,
        max_outstanding_r2t: 1,
        digests: Digests::default(),
        tsih: 0,
        cmd_sn: 0,
        max_cmd_sn: 0,
        exp_stat_sn: 0,
    };
    let mut send = pdu::encode_text(&ours);
    for _ in 0..MAX_ROUNDS {
        let reply = x.round(STAGE_OPERATIONAL, STAGE_FULL, true, &send).await?;
        note_alias(&reply, alias);
        let mut answers = Vec::new();
        for (k, v) in &reply.keys {
            apply_key(&mut neg, x.peer, k, v)?;
            if !ours.iter().any(|(ok, _)| ok == k) && needs_answer(k) {
                answers.push((k.clone(), v.clone()));
            }
        }
        if reply.transit && reply.nsg == STAGE_FULL {
            neg.tsih = x.tsih;
            neg.cmd_sn = x.cmd_sn;
            neg.max_cmd_sn = x.max_cmd_sn;
            neg.exp_stat_sn = x.exp_stat_sn;
            return Ok(neg);
        }
        // Keys the target proposed itself are accepted as proposed.
        let pairs: Vec<(&str, &str)> = answers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        send = pdu::encode_text(&pairs);
        ours.clear();
    }
    Err(x
        .peer
        .protocol("login", "it never reached the full-feature phase"))
}

/// Declarative keys need no answer.
fn needs_answer(k: &str) -> bool {
    !matches!(
        k,
        "MaxRecvDataSegmentLength" | "TargetAlias" | "TargetPortalGroupTag" | "TargetAddress"
    )
}

fn apply_key(neg: &mut Negotiated, peer: &Peer, k: &str, v: &str) -> Result<(), IscsiError> {
    let num = || -> Result<u32, IscsiError> {
        v.parse()
            .map_err(|_| peer.protocol("login", format!("{k}={v} is not a number")))
    };
    let yes = v.eq_ignore_ascii_case("Yes");
    match k {
        "MaxRecvDataSegmentLength" => {
            neg.max_send_segment = num()?.clamp(512, pdu::MAX_DATA_SEGMENT)
        }
        "MaxBurstLength" => neg.max_burst = num()?.clamp(512, OUR_MAX_BURST),
        "FirstBurstLength" => neg.first_burst = num()?.clamp(512, OUR_MAX_BURST),
        "MaxOutstandingR2T" => neg.max_outstanding_r2t = num()?.max(1),
        "InitialR2T" => neg.initial_r2t = yes,
        "ImmediateData" => neg.immediate_data = yes,
        "HeaderDigest" => neg.digests.header = v == "CRC32C",
        "DataDigest" => neg.digests.data = v == "CRC32C",
        "ErrorRecoveryLevel" if v != "0" => {
            return Err(peer.protocol("login", format!("it insists on ErrorRecoveryLevel={v}")))
        }
        _ => {}
    }
    Ok(())
}

/// Turn a non-zero login status into an error that names the cause and the fix.
fn check_status(peer: &Peer, class: u8, detail: u8, data: &[u8]) -> Result<(), IscsiError> {
    use libc::{EACCES, EAGAIN, EIO, ENOENT, EPROTO};
    let (reason, hint, errno): (String, &str, i32) = match (class, detail) {
        (0, _) => return Ok(()),
        (1, _) => {
            let to = pdu::decode_text(data)
                .ok()
                .and_then(|k| k.into_iter().find(|(k, _)| k == "TargetAddress"))
                .map_or_else(|| "elsewhere".to_string(), |(_, v)| v);
            (
                format!("redirected to {to}"),
                "use that portal in the address",
                EAGAIN,
            )
        }
        (2, 1) => (
            "authentication failed".into(),
            "check the CHAP user/secret",
            EACCES,
        ),
        (2, 2) => (
            "this initiator is not authorized".into(),
            "bind the initiator to the target (tgtadm --op bind -I ALL or our initiator name)",
            EACCES,
        ),
        (2, 3) | (2, 4) => (
            "no such target".into(),
            "check the target IQN (uniblk scan iscsi://HOST lists them)",
            ENOENT,
        ),
        (2, 5) => (
            "unsupported iSCSI version".into(),
            "the target is too old",
            EPROTO,
        ),
        (2, 6) => (
            "too many connections".into(),
            "log other initiators out",
            EAGAIN,
        ),
        (2, 7) => (
            "a login parameter is missing".into(),
            "a bug in uniblk",
            EPROTO,
        ),
        (2, d) => (
            format!("initiator error 0x02{d:02x}"),
            "see the target's log",
            EPROTO,
        ),
        (3, 1) => ("service unavailable".into(), "retry later", EAGAIN),
        (3, 2) => ("out of resources".into(), "retry later", EAGAIN),
        (3, d) => (
            format!("target error 0x03{d:02x}"),
            "see the target's log",
            EIO,
        ),
        (c, d) => (
            format!("status 0x{c:02x}{d:02x}"),
            "see the target's log",
            EPROTO,
        ),
    };
    Err(peer.refused(reason, hint, errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_name_the_fix() {
        let p = Peer {
            target: "iqn.t".into(),
            portal: "127.0.0.1:3260".into(),
        };
        let e = check_status(&p, 2, 1, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "iSCSI target iqn.t at 127.0.0.1:3260 refused login: authentication failed (check the CHAP user/secret)"
        );
        assert_eq!(e.errno(), libc::EACCES);
        let e = check_status(&p, 2, 3, &[]).unwrap_err();
        assert!(e.to_string().contains("no such target"), "{e}");
        let e = check_status(&p, 1, 1, b"TargetAddress=10.0.0.9:3260,1\0").unwrap_err();
        assert!(
            e.to_string().contains("redirected to 10.0.0.9:3260,1"),
            "{e}"
        );
        assert!(check_status(&p, 0, 0, &[]).is_ok());
    }

    #[test]
    fn isids_are_random_type() {
        let a = new_isid();
        assert_eq!(a[0] & 0xc0, 0x80);
        assert_ne!(a, new_isid());
    }
}
