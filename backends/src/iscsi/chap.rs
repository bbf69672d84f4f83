//! CHAP (RFC 1994, MD5) in the iSCSI security stage (RFC 7143 §12.1.3): our response to
//! the target's challenge and, for mutual CHAP, our challenge and the check of the
//! target's answer. Secrets never leave this file except as MD5 digests.

use md5::{Digest as _, Md5};

use super::login::{random, Chap, Exchange, Peer, Reply, STAGE_OPERATIONAL, STAGE_SECURITY};
use super::pdu;
use super::IscsiError;

/// CHAP: A=5 (MD5), then our response (and our challenge for mutual CHAP), then the
/// target's response checked against the secret we expect from it.
pub(super) async fn chap_exchange(
    x: &mut Exchange<'_>,
    chap: &Chap,
    mutual: Option<&Chap>,
) -> Result<Reply, IscsiError> {
    let r = x
        .round(
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            false,
            &pdu::encode_text(&[("CHAP_A", "5")]),
        )
        .await?;
    let bad = |w: &str| x.peer.protocol("CHAP authentication", w.to_string());
    if r.get("CHAP_A") != Some("5") {
        return Err(bad("it did not choose CHAP_A=5 (MD5)"));
    }
    let id: u8 = r
        .get("CHAP_I")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("it sent no valid CHAP_I"))?;
    let challenge = r
        .get("CHAP_C")
        .and_then(decode_hex)
        .ok_or_else(|| bad("it sent no valid CHAP_C (hex)"))?;
    let response = chap_response(id, &chap.secret, &challenge);
    let our_id = random::<1>()[0];
    let our_challenge = random::<16>();
    let (n, rr, i, c) = (
        chap.user.clone(),
        encode_hex(&response),
        our_id.to_string(),
        encode_hex(&our_challenge),
    );
    let mut keys = vec![("CHAP_N", n.as_str()), ("CHAP_R", rr.as_str())];
    if mutual.is_some() {
        keys.push(("CHAP_I", &i));
        keys.push(("CHAP_C", &c));
    }
    let reply = x
        .round(
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            true,
            &pdu::encode_text(&keys),
        )
        .await?;
    if let Some(m) = mutual {
        verify_mutual(x.peer, &reply, m, our_id, &our_challenge)?;
    }
    Ok(reply)
}

fn verify_mutual(
    peer: &Peer,
    reply: &Reply,
    m: &Chap,
    id: u8,
    challenge: &[u8],
) -> Result<(), IscsiError> {
    let fail = |why: &str| IscsiError::MutualAuth {
        target: peer.target.clone(),
        portal: peer.portal.clone(),
        why: why.to_string(),
    };
    let name = reply
        .get("CHAP_N")
        .ok_or_else(|| fail("it sent no CHAP_N (no outgoing account bound to the target?)"))?;
    let got = reply
        .get("CHAP_R")
        .and_then(decode_hex)
        .ok_or_else(|| fail("it sent no valid CHAP_R"))?;
    if name != m.user {
        return Err(fail(&format!(
            "it calls itself '{name}', expected '{}'",
            m.user
        )));
    }
    if got != chap_response(id, &m.secret, challenge) {
        return Err(fail("its CHAP response does not match the expected secret"));
    }
    Ok(())
}

/// RFC 1994: MD5(identifier || secret || challenge).
pub fn chap_response(id: u8, secret: &str, challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret.as_bytes());
    h.update(challenge);
    h.finalize().into()
}

fn encode_hex(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// `0x...` hex (what targets send). At most 1024 bytes.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let h = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    // ASCII only: the slicing below must stay on character boundaries.
    if h.is_empty() || !h.is_ascii() || h.len() % 2 != 0 || h.len() > 2048 {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chap_md5_matches_rfc_1994_construction() {
        // MD5(0x01 || "secret" || 0x00..0x0f), computed independently with Python's
        // hashlib: hashlib.md5(b"\x01" + b"secret" + bytes(range(16))).hexdigest().
        let c: Vec<u8> = (0..16).collect();
        assert_eq!(
            encode_hex(&chap_response(1, "secret", &c)),
            "0x740e86463bda3a4d7017d6e0fba0699d"
        );
    }

    #[test]
    fn hex_round_trip_and_refusals() {
        assert_eq!(decode_hex("0x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex(&encode_hex(&[1, 2, 3])), Some(vec![1, 2, 3]));
        for bad in ["00ff", "0x0", "0x", "0xzz", "0xa\u{e9}b"] {
            assert_eq!(decode_hex(bad), None, "{bad}");
        }
    }
}
