//! The management API: line-delimited JSON over a unix socket that only root (the
//! socket's owner) may use. One request object per line, one response object per line:
//! `{"cmd":"status"}` -> `{"ok":true,"status":{...}}`; failures -> `{"ok":false,"error":"..."}`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::daemon::Daemon;

/// Longest request line accepted: requests are tiny, so anything longer is an error.
const MAX_LINE: usize = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    Ping,
    Status,
    /// Mark a member faulty (`member` is its index or its address).
    MemberFail {
        array: String,
        member: String,
    },
    /// Rebuild a faulty member from its mirrors (`rate`: bytes per second).
    MemberReadd {
        array: String,
        member: String,
        #[serde(default)]
        rate: Option<u64>,
    },
    MemberRemove {
        array: String,
        member: String,
    },
    MemberAdd {
        array: String,
        slot: usize,
        address: String,
    },
}

/// Bind the socket (refusing if another daemon answers on it) with mode 0600.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create directory {} for the management socket",
                dir.display()
            )
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "management socket {} answers: another ublkd is running (stop it, or pass --mgmt-socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale management socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind management socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict permissions of {}", path.display()))?;
    Ok(l)
}

pub fn serve(listener: UnixListener, daemon: Arc<Daemon>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let d = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client(s, d).await {
                            tracing::debug!(error = %e, "management client ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "management accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn client(s: UnixStream, daemon: Arc<Daemon>) -> Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            handle(&line, &daemon).await
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        w.write_all(&out).await?;
        if line.len() > MAX_LINE {
            return Ok(());
        }
    }
}

use tokio::io::AsyncReadExt;

async fn handle(line: &[u8], daemon: &Daemon) -> Value {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return json!({"ok": false, "error": format!("bad request: {e} (send e.g. {{\"cmd\":\"status\"}})")})
        }
    };
    match req {
        Request::Ping => json!({"ok": true}),
        Request::Status => json!({"ok": true, "status": daemon.status()}),
        Request::MemberFail { array, member } => reply(daemon.fail_member(&array, &member).await),
        Request::MemberReadd {
            array,
            member,
            rate,
        } => match daemon.readd_member(&array, &member, rate).await {
            Ok(index) => json!({"ok": true, "index": index}),
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        },
        Request::MemberRemove { array, member } => {
            match daemon.remove_member(&array, &member).await {
                Ok(address) => json!({"ok": true, "address": address}),
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            }
        }
        Request::MemberAdd {
            array,
            slot,
            address,
        } => reply(daemon.add_member(&array, slot, &address).await),
    }
}

fn reply(r: Result<()>) -> Value {
    match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
    }
}

/// The default socket path: `$UNIBLK_SOCKET`, else /run/uniblk/ublkd.sock.
pub fn default_socket() -> PathBuf {
    std::env::var_os("UNIBLK_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/uniblk/ublkd.sock"))
}

/// How long a client waits for the daemon's answer.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Client side: send one request, read one reply (bounded in time).
pub async fn request(socket: &Path, req: &Value) -> Result<Value> {
    tokio::time::timeout(CLIENT_TIMEOUT, exchange(socket, req))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "ublkd at {} did not answer within {}s (it may still be assembling its arrays; try again)",
                socket.display(),
                CLIENT_TIMEOUT.as_secs()
            )
        })?
}

async fn exchange(socket: &Path, req: &Value) -> Result<Value> {
    let s = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach ublkd at {}: is it running? (start it with `uniblk up`, or pass --socket)",
            socket.display()
        )
    })?;
    let (r, mut w) = s.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(r)
        .take(64 << 20)
        .read_line(&mut line)
        .await?;
    let v: Value = serde_json::from_str(&line).context("ublkd sent a malformed reply")?;
    if v["ok"] != json!(true) {
        bail!("ublkd: {}", v["error"].as_str().unwrap_or("unknown error"));
    }
    Ok(v)
}
