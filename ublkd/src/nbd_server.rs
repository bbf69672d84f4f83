//! The NBD frontend: serves arrays as NBD exports on TCP and unix-socket listeners.
//!
//! Protocol (NetworkBlockDevice/nbd `doc/proto.md`): fixed newstyle negotiation with
//! NO_ZEROES; options EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST/SET_META_CONTEXT (`base:allocation`); STARTTLS and anything else get
//! NBD_REP_ERR_UNSUP. Transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS,
//! CACHE (a range-checked no-op), DISC; simple or structured replies.
//!
//! Per connection, one reader loop parses requests and spawns one task per request, so
//! requests run concurrently and replies go out in completion order. Tasks are never
//! aborted: member futures must run to completion (raidcore `IoBuf`). Replies travel over
//! a channel to one writer task that owns the socket's write half, batches replies in a
//! `BufWriter` and flushes whenever the channel is momentarily empty. A read reply carries
//! its pool buffer to the writer, so data goes from the array's buffer to the socket with
//! no copy. A per-connection semaphore bounds requests in flight (and so the pool buffers
//! one client can hold); the reader stops reading while it is exhausted.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backends::nbd::wire::{self, ChunkHeader, Greeting, OptionHeader, OptionReply, Request};
use backends::nbd::wire::{SimpleReply, META_BASE_ALLOCATION};
use raidcore::{ArrayRef, Flags, FrontBuf, FrontIo, IoError, Op};

use crate::stall::StallWriter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Option payloads larger than this are refused: the largest legitimate one (GO with a
/// 4096-byte name, or a meta-context query list) is far smaller.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// An oversized option payload up to this size is skipped and refused with ERR_TOO_BIG;
/// beyond it the client is treated as hostile and disconnected.
const MAX_OPTION_SKIP: u32 = 1 << 20;
/// A refused WRITE's payload up to this size is read and discarded so the connection stays
/// in step; beyond it the client is disconnected.
const MAX_WRITE_SKIP: u32 = 64 << 20;
/// Requests in flight per connection (spawned tasks plus replies waiting to be written).
const MAX_IN_FLIGHT: usize = 256;
const READ_BUF: usize = 64 << 10;
const WRITE_BUF: usize = 256 << 10;
/// The id `base:allocation` gets from NBD_OPT_SET_META_CONTEXT.
const BASE_ALLOCATION_ID: u32 = 1;
/// How long `shutdown` waits, after forcing connections closed, for their tasks to notice.
const FORCE_GRACE: Duration = Duration::from_secs(1);
/// One connection holds at most 1/SHARE_DIVISOR of each pool class's buffers, so a client
/// that stops reading its replies (they keep their buffers until written) cannot starve
/// the other clients on its own.
const SHARE_DIVISOR: usize = 4;
/// A connection whose peer accepts no byte of its replies for this long is ended and its
/// replies' buffers go back to the pool (see `stall.rs`).
pub const REPLY_STALL: Duration = Duration::from_secs(60);

/// One array offered under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub array: ArrayRef,
}

/// An NBD server: a set of exports, any number of listeners, and their connections.
pub struct NbdServer {
    exports: Vec<Export>,
    /// Set once by `shutdown`: stop accepting, stop reading requests, drain.
    stopping: watch::Sender<bool>,
    /// Set when the drain timed out: writers drop their sockets at once.
    force: watch::Sender<bool>,
    /// Open connections (handshake or transmission).
    conns: watch::Sender<usize>,
    /// See [`REPLY_STALL`].
    reply_stall: Duration,
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

impl NbdServer {
    pub fn new(exports: Vec<Export>) -> Arc<Self> {
        Self::with_reply_stall(exports, REPLY_STALL)
    }

    /// `new`, ending connections whose peer reads nothing of its replies for `stall`.
    pub fn with_reply_stall(exports: Vec<Export>, stall: Duration) -> Arc<Self> {
        Arc::new(NbdServer {
            exports,
            stopping: watch::channel(false).0,
            force: watch::channel(false).0,
            conns: watch::channel(0).0,
            reply_stall: stall,
        })
    }

    /// Serve on a listener until `shutdown()` is called. `addr` is "127.0.0.1:10809",
    /// "[::1]:10809" or "unix:/path/sock". Returns the accept loop's task.
    pub async fn listen(self: &Arc<Self>, addr: &str) -> Result<JoinHandle<()>> {
        Ok(self.listen_with_addr(addr).await?.0)
    }

    /// `listen`, also returning the address actually bound in the same syntax (the real
    /// port when `addr` asked for port 0).
    pub async fn listen_with_addr(
        self: &Arc<Self>,
        addr: &str,
    ) -> Result<(JoinHandle<()>, String)> {
        let listener = Listener::bind(addr).await?;
        let bound = listener.describe();
        let me = self.clone();
        Ok((tokio::spawn(me.accept_loop(listener)), bound))
    }

    /// Stop accepting, let in-flight requests finish and reply, close connections. Returns
    /// when every connection has ended, or after `timeout` (plus a short grace once the
    /// stragglers' sockets are closed; their member I/O still runs to completion).
    pub async fn shutdown(&self, timeout: Duration) {
        self.stopping.send_replace(true);
        let mut conns = self.conns.subscribe();
        if tokio::time::timeout(timeout, conns.wait_for(|n| *n == 0))
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!(
            connections = self.connections(),
            ?timeout,
            "NBD shutdown: connections still busy; closing them"
        );
        self.force.send_replace(true);
        let _ = tokio::time::timeout(FORCE_GRACE, conns.wait_for(|n| *n == 0)).await;
    }

    pub fn connections(&self) -> usize {
        *self.conns.borrow()
    }

    async fn accept_loop(self: Arc<Self>, listener: Listener) {
        let mut stop = self.stopping.subscribe();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = flagged(&mut stop) => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((r, w, peer)) => self.spawn_connection(r, w, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listen = %listener.describe(), error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        listener.cleanup();
    }

    fn spawn_connection(self: &Arc<Self>, r: BoxRead, w: BoxWrite, peer: String) {
        let guard = ConnGuard::new(self.clone());
        tokio::spawn(async move {
            tracing::debug!(%peer, "NBD connection opened");
            match guard.0.serve(r, w, &peer).await {
                Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
                Err(e) => tracing::debug!(%peer, error = %e, "NBD connection ended"),
            }
            drop(guard);
        });
    }

    /// One connection: handshake, then transmission until DISC, EOF, a protocol
    /// violation or shutdown.
    async fn serve(self: &Arc<Self>, r: BoxRead, w: BoxWrite, peer: &str) -> io::Result<()> {
        let mut r = BufReader::with_capacity(READ_BUF, r);
        let w: BoxWrite = Box::new(StallWriter::new(w, self.reply_stall));
        let mut w = BufWriter::with_capacity(WRITE_BUF, w);
        let mut stop = self.stopping.subscribe();
        let session = tokio::select! {
            biased;
            _ = flagged(&mut stop) => return Ok(()),
            s = self.negotiate(&mut r, &mut w, peer) => s?,
        };
        let Some(session) = session else {
            return Ok(());
        };
        self.transmission(r, w, peer, session).await
    }

    fn find_export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    /// Transmission flags. DF only with structured replies, as the spec requires.
    fn tflags(&self, structured: bool) -> u16 {
        let mut f = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_FUA
            | wire::FLAG_SEND_TRIM
            | wire::FLAG_SEND_WRITE_ZEROES
            | wire::FLAG_SEND_FAST_ZERO
            // Every connection to an export reaches the same Array, whose flush covers
            // all of them: multi-conn is safe.
            | wire::FLAG_CAN_MULTI_CONN;
        if structured {
            // Reads are always answered with a single data chunk, so DF costs nothing.
            f |= wire::FLAG_SEND_DF;
        }
        f
    }
}

/// Counts a connection for `connections()` and `shutdown()` while it lives.
struct ConnGuard(Arc<NbdServer>);

impl ConnGuard {
    fn new(server: Arc<NbdServer>) -> Self {
        server.conns.send_modify(|n| *n += 1);
        ConnGuard(server)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.conns.send_modify(|n| *n -= 1);
    }
}

/// Resolves once the flag is true; never, if its sender is gone.
async fn flagged(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---- Listeners ----------------------------------------------------------------------

enum Listener {
    Tcp(TcpListener),
    /// The path, and the (device, inode) of the socket we created there, so cleanup never
    /// removes a socket some later server put at the same path.
    Unix(UnixListener, PathBuf, Option<(u64, u64)>),
}

impl Listener {
    async fn bind(addr: &str) -> Result<Self> {
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                bail!(
                    "listen address '{addr}' names no socket path (write unix:/run/uniblk/x.sock)"
                );
            }
            return bind_unix(Path::new(path), addr).await;
        }
        let sa: std::net::SocketAddr = addr.parse().map_err(|_| {
            anyhow!("listen address '{addr}' is neither HOST:PORT (e.g. 127.0.0.1:10809, [::1]:10809) nor unix:/path")
        })?;
        let l = TcpListener::bind(sa)
            .await
            .map_err(|e| bind_error(addr, e))?;
        Ok(Listener::Tcp(l))
    }

    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, p, _) => format!("unix:{}", p.display()),
        }
    }

    async fn accept(&self) -> io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // The spec asks both ends to disable Nagle: replies are small and latency
                // bound.
                let _ = s.set_nodelay(true);
                widen_send_buffer(&s);
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), peer.to_string()))
            }
            Listener::Unix(l, p, _) => {
                let (s, _) = l.accept().await?;
                widen_send_buffer(&s);
                let (r, w) = s.into_split();
                let peer = format!("unix:{} #{}", p.display(), next_conn_id());
                Ok((Box::new(r), Box::new(w), peer))
            }
        }
    }

    fn cleanup(&self) {
        if let Listener::Unix(_, p, Some(id)) = self {
            let ours = std::fs::symlink_metadata(p)
                .map(|m| (m.dev(), m.ino()) == *id)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Unix sockets have no peer address worth printing; number the connections instead.
fn next_conn_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Bind a unix socket, first removing a stale socket file (one nothing answers on).
async fn bind_unix(path: &Path, addr: &str) -> Result<Listener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => bail!(
            "cannot listen on {addr}: {} exists and is not a socket; remove it or choose another path",
            path.display()
        ),
        Ok(_) => remove_stale_socket(path, addr).await?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot listen on {addr}: cannot inspect {}: {e}", path.display()),
    }
    let l = UnixListener::bind(path).map_err(|e| bind_error(addr, e))?;
    let id = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Ok(Listener::Unix(l, path.to_path_buf(), id))
}

async fn remove_stale_socket(path: &Path, addr: &str) -> Result<()> {
    let probe = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await;
    match probe {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing stale NBD socket (nothing answers on it)");
            std::fs::remove_file(path)
                .with_context(|| format!("cannot listen on {addr}: removing stale socket {}", path.display()))
        }
        Ok(Ok(_)) | Err(_) => bail!(
            "cannot listen on {addr}: address in use: a server answers on {} (is another ublkd running?)",
            path.display()
        ),
        Ok(Err(e)) => bail!(
            "cannot listen on {addr}: {} exists and probing it failed: {e}",
            path.display()
        ),
    }
}

fn bind_error(addr: &str, e: io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => "address in use: is another ublkd running? ",
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need root; a socket's directory must be writable): "
        }
        io::ErrorKind::AddrNotAvailable => "no local interface has this address: ",
        io::ErrorKind::NotFound => "the socket's directory does not exist: ",
        _ => "",
    };
    anyhow!("cannot listen on {addr}: {hint}{e}")
}

// ---- Handshake ----------------------------------------------------------------------

/// Send buffer asked for on every connection. With the default (about 200 KiB) a 1 MiB
/// read reply goes out in five or more partial writes, each a wake-up of the writer task
/// after the client drained some; with room for a whole reply it is one system call. The
/// kernel caps the request at net.core.wmem_max; a refusal only costs speed.
const SEND_BUF: usize = 4 << 20;

fn widen_send_buffer(s: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(s).set_send_buffer_size(SEND_BUF);
}

type Rd = BufReader<BoxRead>;
type Wr = BufWriter<BoxWrite>;

/// What option haggling has agreed so far.
#[derive(Default)]
struct Nego {
    no_zeroes: bool,
    structured: bool,
    /// The export `base:allocation` was selected for by the last SET_META_CONTEXT.
    meta: Option<usize>,
}

/// What transmission runs with.
struct Session {
    export: usize,
    structured: bool,
    base_alloc: bool,
}

enum Next {
    Continue,
    Close,
    Go(Session),
}

/// An option's payload, or why there is none.
enum Payload {
    Got(Vec<u8>),
    /// Too large: skipped and answered with ERR_TOO_BIG.
    Refused,
    /// Too large to even skip: disconnect.
    Hostile,
}

impl NbdServer {
    /// Option haggling. Ok(None): the session ends (ABORT, or a violation already logged).
    async fn negotiate(&self, r: &mut Rd, w: &mut Wr, peer: &str) -> io::Result<Option<Session>> {
        let flags = wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES;
        w.write_all(&Greeting { flags }.encode()).await?;
        w.flush().await?;
        let cflags = r.read_u32().await?;
        let known = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
        if cflags & !known != 0 {
            tracing::warn!(%peer, cflags, "NBD client set unknown handshake flags; disconnecting");
            return Ok(None);
        }
        let mut st = Nego {
            no_zeroes: cflags & wire::FLAG_C_NO_ZEROES != 0,
            ..Nego::default()
        };
        loop {
            let mut hb = [0u8; wire::OPTION_HEADER_LEN];
            r.read_exact(&mut hb).await?;
            let Ok(h) = OptionHeader::decode(&hb) else {
                tracing::warn!(%peer, "NBD option with bad magic; disconnecting");
                return Ok(None);
            };
            let next = match self.option_payload(r, w, h, peer).await? {
                Payload::Got(p) => self.handle_option(w, &mut st, h.option, &p, peer).await?,
                Payload::Refused => Next::Continue,
                Payload::Hostile => Next::Close,
            };
            w.flush().await?;
            match next {
                Next::Continue => {}
                Next::Close => return Ok(None),
                Next::Go(s) => return Ok(Some(s)),
            }
        }
    }

    /// Read an option's payload, within the bound.
    async fn option_payload(
        &self,
        r: &mut Rd,
        w: &mut Wr,
        h: OptionHeader,
        peer: &str,
    ) -> io::Result<Payload> {
        if h.len <= MAX_OPTION_LEN {
            let mut p = vec![0u8; h.len as usize];
            r.read_exact(&mut p).await?;
            return Ok(Payload::Got(p));
        }
        // EXPORT_NAME cannot be answered with an error, and a huge payload is an attack.
        if h.option == wire::OPT_EXPORT_NAME || h.len > MAX_OPTION_SKIP {
            tracing::warn!(%peer, option = h.option, len = h.len, "NBD option payload too large; disconnecting");
            return Ok(Payload::Hostile);
        }
        tracing::warn!(%peer, option = h.option, len = h.len, "NBD option payload too large; refused");
        skip(r, h.len as u64).await?;
        let msg = format!("option payload of {} bytes exceeds {MAX_OPTION_LEN}", h.len);
        opt_reply(w, h.option, wire::REP_ERR_TOO_BIG, msg.as_bytes()).await?;
        Ok(Payload::Refused)
    }

    async fn handle_option(
        &self,
        w: &mut Wr,
        st: &mut Nego,
        option: u32,
        p: &[u8],
        peer: &str,
    ) -> io::Result<Next> {
        match option {
            wire::OPT_EXPORT_NAME => self.opt_export_name(w, st, p, peer).await,
            wire::OPT_ABORT => {
                // The spec asks servers to ignore any data sent with ABORT.
                opt_reply(w, option, wire::REP_ACK, &[]).await?;
                Ok(Next::Close)
            }
            wire::OPT_LIST => self.opt_list(w, p).await,
            wire::OPT_INFO | wire::OPT_GO => self.opt_info_go(w, st, option, p).await,
            wire::OPT_STRUCTURED_REPLY => {
                if !p.is_empty() {
                    return opt_error(
                        w,
                        option,
                        wire::REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )
                    .await;
                }
                st.structured = true;
                opt_reply(w, option, wire::REP_ACK, &[]).await?;
                Ok(Next::Continue)
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.opt_meta_context(w, st, option, p).await
            }
            wire::OPT_STARTTLS => {
                opt_error(
                    w,
                    option,
                    wire::REP_ERR_UNSUP,
                    "this server does not support TLS",
                )
                .await
            }
            _ => {
                tracing::debug!(%peer, option, "unsupported NBD option");
                let msg = format!("option {option} is not supported by this server");
                opt_error(w, option, wire::REP_ERR_UNSUP, &msg).await
            }
        }
    }

    async fn opt_export_name(
        &self,
        w: &mut Wr,
        st: &Nego,
        name: &[u8],
        peer: &str,
    ) -> io::Result<Next> {
        let Some(ix) = self.find_export(name) else {
            // EXPORT_NAME cannot carry an error: the spec says terminate the session.
            tracing::warn!(%peer, export = %String::from_utf8_lossy(name), "NBD client asked for an unknown export");
            return Ok(Next::Close);
        };
        let size = self.exports[ix].array.size();
        let reply = wire::encode_export_name_reply(size, self.tflags(st.structured), !st.no_zeroes);
        w.write_all(&reply).await?;
        Ok(Next::Go(self.session(st, ix)))
    }

    fn session(&self, st: &Nego, export: usize) -> Session {
        Session {
            export,
            structured: st.structured,
            base_alloc: st.structured && st.meta == Some(export),
        }
    }

    async fn opt_list(&self, w: &mut Wr, p: &[u8]) -> io::Result<Next> {
        if !p.is_empty() {
            return opt_error(
                w,
                wire::OPT_LIST,
                wire::REP_ERR_INVALID,
                "LIST takes no data",
            )
            .await;
        }
        for e in &self.exports {
            let item = wire::encode_rep_server(&e.name, &e.description);
            opt_reply(w, wire::OPT_LIST, wire::REP_SERVER, &item).await?;
        }
        opt_reply(w, wire::OPT_LIST, wire::REP_ACK, &[]).await?;
        Ok(Next::Continue)
    }

    async fn opt_info_go(&self, w: &mut Wr, st: &Nego, option: u32, p: &[u8]) -> io::Result<Next> {
        let Some((name, wanted)) = parse_info_request(p) else {
            return opt_error(
                w,
                option,
                wire::REP_ERR_INVALID,
                "malformed INFO/GO request",
            )
            .await;
        };
        let Some(ix) = self.find_export(name) else {
            let msg = unknown_export(name);
            return opt_error(w, option, wire::REP_ERR_UNKNOWN, &msg).await;
        };
        let e = &self.exports[ix];
        let export = wire::encode_info_export(e.array.size(), self.tflags(st.structured));
        opt_reply(w, option, wire::REP_INFO, &export).await?;
        if wanted.contains(&wire::INFO_NAME) {
            let info = wire::encode_info_string(wire::INFO_NAME, &e.name);
            opt_reply(w, option, wire::REP_INFO, &info).await?;
        }
        if wanted.contains(&wire::INFO_DESCRIPTION) {
            let info = wire::encode_info_string(wire::INFO_DESCRIPTION, &e.description);
            opt_reply(w, option, wire::REP_INFO, &info).await?;
        }
        // Sent even unasked: our limits are the defaults' (minimum 1), so a client that
        // ignores them loses nothing, and one that reads them learns the maximum.
        let (min, pref, max) = block_sizes(&e.array);
        let bs = wire::encode_info_block_size(min, pref, max);
        opt_reply(w, option, wire::REP_INFO, &bs).await?;
        opt_reply(w, option, wire::REP_ACK, &[]).await?;
        if option == wire::OPT_GO {
            return Ok(Next::Go(self.session(st, ix)));
        }
        Ok(Next::Continue)
    }

    async fn opt_meta_context(
        &self,
        w: &mut Wr,
        st: &mut Nego,
        option: u32,
        p: &[u8],
    ) -> io::Result<Next> {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            st.meta = None;
            if !st.structured {
                let msg = "SET_META_CONTEXT needs STRUCTURED_REPLY first";
                return opt_error(w, option, wire::REP_ERR_INVALID, msg).await;
            }
        }
        let Some((name, queries)) = parse_meta_request(p) else {
            return opt_error(
                w,
                option,
                wire::REP_ERR_INVALID,
                "malformed meta context request",
            )
            .await;
        };
        let Some(ix) = self.find_export(name) else {
            let msg = unknown_export(name);
            return opt_error(w, option, wire::REP_ERR_UNKNOWN, &msg).await;
        };
        let matches = |q: &[u8]| q == META_BASE_ALLOCATION.as_bytes() || (!set && q == b"base:");
        // LIST with no query lists everything; SET with none selects nothing.
        let hit = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| matches(q))
        };
        if hit {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let item = wire::encode_rep_meta_context(id, META_BASE_ALLOCATION);
            opt_reply(w, option, wire::REP_META_CONTEXT, &item).await?;
            if set {
                st.meta = Some(ix);
            }
        }
        opt_reply(w, option, wire::REP_ACK, &[]).await?;
        Ok(Next::Continue)
    }
}

fn unknown_export(name: &[u8]) -> String {
    if name.is_empty() {
        return "this server has no default export".into();
    }
    format!("no export named '{}'", String::from_utf8_lossy(name))
}

/// (minimum, preferred, maximum) block sizes. Minimum 1: the array does read-modify-write,
/// so any alignment is served; preferred is where that stops; maximum is what one pool
/// buffer holds, in whole preferred blocks.
fn block_sizes(array: &ArrayRef) -> (u32, u32, u32) {
    let pref = array.block_size().max(4096).next_power_of_two();
    let max_io = array.max_io().min(u32::MAX as u64);
    let rounded = max_io / pref as u64 * pref as u64;
    let max = if rounded == 0 { max_io } else { rounded };
    (1, pref, max as u32)
}

/// INFO/GO data: name length, name, count of info requests, the requests. The lengths
/// must add up exactly.
fn parse_info_request(p: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = u32::from_be_bytes(p.get(0..4)?.try_into().ok()?) as usize;
    let name = p.get(4..4usize.checked_add(nlen)?)?;
    let rest = &p[4 + nlen..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = &rest[2..];
    if list.len() != 2 * n {
        return None;
    }
    let wanted = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, wanted))
}

/// LIST/SET_META_CONTEXT data: name length, name, query count, then each query as
/// length + string. Every length is checked against what is left.
fn parse_meta_request(p: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut cur = p;
    let name = take_string(&mut cur)?;
    let count = take_u32(&mut cur)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(take_string(&mut cur)?);
    }
    cur.is_empty().then_some((name, queries))
}

fn take_u32(cur: &mut &[u8]) -> Option<u32> {
    let v = u32::from_be_bytes(cur.get(0..4)?.try_into().ok()?);
    *cur = &cur[4..];
    Some(v)
}

fn take_string<'a>(cur: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take_u32(cur)? as usize;
    let s = cur.get(..len)?;
    *cur = &cur[len..];
    Some(s)
}

async fn opt_reply(w: &mut Wr, option: u32, typ: u32, payload: &[u8]) -> io::Result<()> {
    let h = OptionReply {
        option,
        typ,
        len: payload.len() as u32,
    };
    w.write_all(&h.encode()).await?;
    w.write_all(payload).await
}

async fn opt_error(w: &mut Wr, option: u32, typ: u32, msg: &str) -> io::Result<Next> {
    let msg = wire::truncate_str(msg, wire::MAX_STRING_LEN);
    opt_reply(w, option, typ, msg.as_bytes()).await?;
    Ok(Next::Continue)
}

/// Read and drop `len` bytes in bounded steps.
async fn skip(r: &mut Rd, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

// ---- Transmission -------------------------------------------------------------------

/// What a finished request sends back.
enum Body {
    /// Success without data: a simple reply (allowed for everything but READ).
    Ok,
    /// Success of a zero-length READ: a NONE chunk when structured.
    Done,
    /// READ data, in the request's pool buffer.
    Data {
        offset: u64,
        buf: FrontBuf,
    },
    Err {
        error: u32,
        msg: String,
    },
    /// One `base:allocation` extent.
    Extent {
        len: u32,
        flags: u32,
    },
}

/// A reply on its way to the writer. The permit is the request's in-flight slot: it is
/// released only once the reply has been written (or dropped).
struct Outgoing {
    handle: u64,
    body: Body,
    _held: Held,
}

/// What a request holds until its reply is written: its place among the connection's
/// requests in flight and, for reads and writes, its share of the pool class its buffer
/// comes from.
struct Held {
    _slot: OwnedSemaphorePermit,
    _share: Option<OwnedSemaphorePermit>,
}

/// One connection in transmission, shared by its reader loop and request tasks.
struct Conn {
    array: ArrayRef,
    peer: String,
    structured: bool,
    base_alloc: bool,
    size: u64,
    max_len: u64,
    tx: mpsc::Sender<Outgoing>,
    slots: Arc<Semaphore>,
    /// Per pool class: the buffers this connection may hold at once.
    shares: Vec<Arc<Semaphore>>,
}

enum Flow {
    Continue,
    Stop,
}

impl NbdServer {
    async fn transmission(&self, mut r: Rd, w: Wr, peer: &str, s: Session) -> io::Result<()> {
        let array = self.exports[s.export].array.clone();
        // Capacity equals the slot count, so a task holding a slot never waits to send.
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        let writer = tokio::spawn(write_replies(
            w,
            rx,
            s.structured,
            self.force.subscribe(),
            peer.to_string(),
        ));
        let conn = Arc::new(Conn {
            size: array.size(),
            max_len: block_sizes(&array).2 as u64,
            shares: array_shares(&array),
            array,
            peer: peer.to_string(),
            structured: s.structured,
            base_alloc: s.base_alloc,
            tx,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        });
        tracing::debug!(%peer, export = %self.exports[s.export].name, structured = s.structured, "NBD transmission");
        let mut stop = self.stopping.subscribe();
        let res = loop {
            let step = tokio::select! {
                biased;
                _ = flagged(&mut stop) => break Ok(()),
                step = conn.next_request(&mut r) => step,
            };
            match step {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        // The writer ends once every task has sent its reply (the last sender is gone),
        // or at once when shutdown forces connections closed.
        drop(conn);
        let _ = writer.await;
        match res {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            other => other,
        }
    }
}

impl Conn {
    /// Read one request (and a WRITE's payload) and start it.
    async fn next_request(self: &Arc<Self>, r: &mut Rd) -> io::Result<Flow> {
        let mut hb = [0u8; wire::REQUEST_LEN];
        r.read_exact(&mut hb).await?;
        let Ok(q) = Request::decode(&hb) else {
            tracing::warn!(peer = %self.peer, "NBD request with bad magic; disconnecting");
            return Ok(Flow::Stop);
        };
        if q.typ == wire::CMD_DISC {
            return Ok(Flow::Stop);
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("slots never close");
        let slot = Held {
            _slot: permit,
            _share: None,
        };
        if q.typ == wire::CMD_WRITE {
            return self.start_write(r, q, slot).await;
        }
        match self.validate(&q) {
            Ok(()) => {
                let mut slot = slot;
                self.take_share(&mut slot, &q).await;
                tokio::spawn(self.clone().execute(q, None, slot));
            }
            Err(e) => self.refuse(q, e, slot).await,
        }
        Ok(Flow::Continue)
    }

    /// A WRITE: its payload goes straight into a pool buffer. When refused, the payload is
    /// still read (and dropped) so the stream stays in step.
    async fn start_write(
        self: &Arc<Self>,
        r: &mut Rd,
        q: Request,
        mut slot: Held,
    ) -> io::Result<Flow> {
        let refusal = match self.validate(&q) {
            Ok(()) => {
                self.take_share(&mut slot, &q).await;
                match self.array.buffer(q.offset, q.len as u64).await {
                    Ok(mut buf) => {
                        // A client vanishing here leaves nothing written and nothing
                        // acknowledged: the buffer is dropped with the error.
                        r.read_exact(buf.data_mut()).await?;
                        tokio::spawn(self.clone().execute(q, Some(buf), slot));
                        return Ok(Flow::Continue);
                    }
                    Err(e) => Refusal::from_io(&e),
                }
            }
            Err(refusal) => refusal,
        };
        if q.len > MAX_WRITE_SKIP {
            tracing::warn!(peer = %self.peer, len = q.len, "NBD write refused and too long to skip; disconnecting");
            return Ok(Flow::Stop);
        }
        skip(r, q.len as u64).await?;
        self.refuse(q, refusal, slot).await;
        Ok(Flow::Continue)
    }

    /// A READ or WRITE waits for this connection's share of the pool class its buffer
    /// comes from (see [`SHARE_DIVISOR`]); other commands take no buffer.
    async fn take_share(&self, held: &mut Held, q: &Request) {
        if !matches!(q.typ, wire::CMD_READ | wire::CMD_WRITE) {
            return;
        }
        let span = self.array.buffer_len(q.offset, q.len as u64);
        if let Some(class) = self.array.pool().class_index(span) {
            held._share = self.shares[class].clone().acquire_owned().await.ok();
        }
    }

    /// Check a request against the spec's rules before anything runs.
    fn validate(&self, q: &Request) -> Result<(), Refusal> {
        use wire::*;
        let allowed = match q.typ {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            t => return Err(Refusal::einval(format!("unknown command {t}"))),
        };
        if q.flags & !allowed != 0 {
            let msg = format!("flags {:#x} are not valid for command {}", q.flags, q.typ);
            return Err(Refusal::einval(msg));
        }
        if q.typ == CMD_FLUSH {
            return Ok(());
        }
        let len = q.len as u64;
        if matches!(q.typ, CMD_READ | CMD_WRITE | CMD_CACHE) && len > self.max_len {
            let msg = format!(
                "length {len} exceeds the maximum block size {}",
                self.max_len
            );
            return Err(Refusal::einval(msg));
        }
        let past_end = match q.offset.checked_add(len) {
            Some(end) => end > self.size,
            None => true,
        };
        if past_end {
            // The spec: ENOSPC for writes past the end, EINVAL for everything else.
            let error = match q.typ {
                CMD_WRITE | CMD_WRITE_ZEROES => NBD_ENOSPC,
                _ => NBD_EINVAL,
            };
            let msg = format!(
                "range {}+{len} is past the end of the export ({} bytes)",
                q.offset, self.size
            );
            return Err(Refusal { error, msg });
        }
        if q.typ == CMD_BLOCK_STATUS {
            if !self.base_alloc {
                let msg = "BLOCK_STATUS needs structured replies and base:allocation selected";
                return Err(Refusal::einval(msg.into()));
            }
            if len == 0 {
                return Err(Refusal::einval("BLOCK_STATUS of length 0".into()));
            }
        }
        Ok(())
    }

    async fn refuse(&self, q: Request, e: Refusal, slot: Held) {
        tracing::debug!(peer = %self.peer, cmd = q.typ, offset = q.offset, len = q.len, error = e.error, msg = %e.msg, "NBD request refused");
        self.send(q.handle, e.into_body(), slot).await;
    }

    async fn send(&self, handle: u64, body: Body, slot: Held) {
        let out = Outgoing {
            handle,
            body,
            _held: slot,
        };
        // Fails only when the writer gave up (forced close): the reply is dropped.
        let _ = self.tx.send(out).await;
    }

    /// Run one validated request to completion and queue its reply. Spawned; never
    /// aborted.
    async fn execute(self: Arc<Self>, q: Request, buf: Option<FrontBuf>, slot: Held) {
        let body = match q.typ {
            wire::CMD_READ => self.read(&q).await,
            wire::CMD_WRITE => match buf {
                Some(mut b) => status(self.submit(&q, Op::Write, Some(&mut b)).await),
                None => Refusal::einval("write without payload".into()).into_body(),
            },
            wire::CMD_FLUSH => status(self.submit(&q, Op::Flush, None).await),
            wire::CMD_TRIM => status(self.trim(&q).await),
            wire::CMD_WRITE_ZEROES => status(self.submit(&q, Op::WriteZeroes, None).await),
            // CACHE is advisory; the range was checked, there is nothing to warm.
            wire::CMD_CACHE => Body::Ok,
            wire::CMD_BLOCK_STATUS => Body::Extent {
                len: q.len,
                flags: 0,
            },
            t => Refusal::einval(format!("unknown command {t}")).into_body(),
        };
        self.send(q.handle, body, slot).await;
    }

    async fn submit(&self, q: &Request, op: Op, buf: Option<&mut FrontBuf>) -> Result<(), IoError> {
        let (offset, len) = if op == Op::Flush {
            (0, 0)
        } else {
            (q.offset, q.len as u64)
        };
        let flags = Flags {
            fua: q.flags & wire::CMD_FLAG_FUA != 0,
            no_hole: q.flags & wire::CMD_FLAG_NO_HOLE != 0,
            fast_zero: q.flags & wire::CMD_FLAG_FAST_ZERO != 0,
        };
        self.array
            .submit(
                FrontIo {
                    op,
                    offset,
                    len,
                    flags,
                },
                buf,
            )
            .await
    }

    async fn read(&self, q: &Request) -> Body {
        let mut buf = match self.array.buffer(q.offset, q.len as u64).await {
            Ok(b) => b,
            Err(e) => return Refusal::from_io(&e).into_body(),
        };
        match self.submit(q, Op::Read, Some(&mut buf)).await {
            Ok(()) if q.len == 0 => Body::Done,
            Ok(()) => Body::Data {
                offset: q.offset,
                buf,
            },
            Err(e) => Refusal::from_io(&e).into_body(),
        }
    }

    /// The array treats trim as advisory and ignores FUA on it; a client asking for FUA
    /// gets a flush so whatever was discarded is durable before the reply.
    async fn trim(&self, q: &Request) -> Result<(), IoError> {
        self.submit(q, Op::Trim, None).await?;
        if q.flags & wire::CMD_FLAG_FUA != 0 {
            self.submit(q, Op::Flush, None).await?;
        }
        Ok(())
    }
}

/// A request answered with an error.
struct Refusal {
    error: u32,
    msg: String,
}

impl Refusal {
    fn einval(msg: String) -> Self {
        Refusal {
            error: wire::NBD_EINVAL,
            msg,
        }
    }

    fn from_io(e: &IoError) -> Self {
        Refusal {
            error: wire::errno_to_nbd(e.errno()),
            msg: e.to_string(),
        }
    }

    fn into_body(self) -> Body {
        Body::Err {
            error: self.error,
            msg: self.msg,
        }
    }
}

/// One semaphore per pool class, with 1/SHARE_DIVISOR of the class's buffers.
fn array_shares(array: &ArrayRef) -> Vec<Arc<Semaphore>> {
    array
        .pool()
        .usage()
        .iter()
        .map(|&(_, _, total)| Arc::new(Semaphore::new((total / SHARE_DIVISOR).max(1))))
        .collect()
}

fn status(r: Result<(), IoError>) -> Body {
    match r {
        Ok(()) => Body::Ok,
        Err(e) => Refusal::from_io(&e).into_body(),
    }
}

// ---- Reply writer -------------------------------------------------------------------

/// Own the write half: write replies as they come, batching whatever is queued and
/// flushing when the queue is momentarily empty. After a write error it keeps draining
/// (dropping replies) so it ends only when every request task has finished; when
/// shutdown forces connections closed it ends at once.
async fn write_replies(
    w: Wr,
    mut rx: mpsc::Receiver<Outgoing>,
    structured: bool,
    mut force: watch::Receiver<bool>,
    peer: String,
) {
    let mut w = Some(w);
    loop {
        let next = tokio::select! {
            biased;
            _ = flagged(&mut force) => return,
            next = rx.recv() => next,
        };
        let Some(first) = next else { break };
        let Some(out) = w.as_mut() else { continue };
        let written = tokio::select! {
            biased;
            // Forced: drop the socket without flushing (the peer may not be reading).
            _ = flagged(&mut force) => return,
            r = write_batch(out, first, &mut rx, structured) => r,
        };
        if let Err(e) = written {
            tracing::debug!(%peer, error = %e, "NBD reply write failed; dropping further replies");
            w = None;
        }
    }
    if let Some(mut out) = w {
        let _ = out.shutdown().await;
    }
}

async fn write_batch(
    w: &mut Wr,
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
    structured: bool,
) -> io::Result<()> {
    write_reply(w, &first, structured).await?;
    drop(first);
    while let Ok(next) = rx.try_recv() {
        write_reply(w, &next, structured).await?;
    }
    w.flush().await
}

/// Payloads at least this large skip the BufWriter: copying them into it would cost a
/// full extra copy (tokio's BufWriter copies whatever part of a write fits its buffer,
/// which includes the tail of every large partial write).
const DIRECT_PAYLOAD: usize = 32 << 10;

/// A reply header and its data: small ones batch in the BufWriter; large ones flush what
/// is queued, then go to the socket straight from the pool buffer with vectored writes.
async fn write_payload(w: &mut Wr, head: &[u8], data: &[u8]) -> io::Result<()> {
    if data.len() < DIRECT_PAYLOAD {
        w.write_all(head).await?;
        return w.write_all(data).await;
    }
    w.flush().await?;
    let sock = w.get_mut();
    let (mut h, mut d) = (head, data);
    while !h.is_empty() {
        let n = sock
            .write_vectored(&[io::IoSlice::new(h), io::IoSlice::new(d)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_h = n.min(h.len());
        h = &h[from_h..];
        d = &d[n - from_h..];
    }
    sock.write_all(d).await
}

async fn write_reply(w: &mut Wr, o: &Outgoing, structured: bool) -> io::Result<()> {
    let handle = o.handle;
    let simple = |error| SimpleReply { error, handle }.encode();
    let chunk = |typ, len| {
        ChunkHeader {
            flags: wire::REPLY_FLAG_DONE,
            typ,
            handle,
            len,
        }
        .encode()
    };
    match &o.body {
        Body::Ok => w.write_all(&simple(0)).await,
        Body::Done if structured => w.write_all(&chunk(wire::REPLY_TYPE_NONE, 0)).await,
        Body::Done => w.write_all(&simple(0)).await,
        Body::Data { offset, buf } => {
            let data = buf.data();
            let mut head = [0u8; 28];
            let head = if structured {
                // One chunk, flagged DONE: all data is in hand, so no later error is
                // possible, and it satisfies DF.
                head[..20]
                    .copy_from_slice(&chunk(wire::REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32));
                head[20..28].copy_from_slice(&offset.to_be_bytes());
                &head[..28]
            } else {
                let h = simple(0);
                head[..h.len()].copy_from_slice(&h);
                &head[..h.len()]
            };
            write_payload(w, head, data).await
        }
        Body::Err { error, msg } if structured => {
            let p = wire::encode_error_payload(*error, msg);
            w.write_all(&chunk(wire::REPLY_TYPE_ERROR, p.len() as u32))
                .await?;
            w.write_all(&p).await
        }
        Body::Err { error, .. } => w.write_all(&simple(*error)).await,
        Body::Extent { len, flags } => {
            let p = wire::encode_block_status_payload(BASE_ALLOCATION_ID, &[(*len, *flags)]);
            w.write_all(&chunk(wire::REPLY_TYPE_BLOCK_STATUS, p.len() as u32))
                .await?;
            w.write_all(&p).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_req(name: &[u8], wanted: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name);
        p.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
        for w in wanted {
            p.extend_from_slice(&w.to_be_bytes());
        }
        p
    }

    #[test]
    fn info_requests_parse_exactly() {
        let p = info_req(b"d0", &[wire::INFO_NAME, wire::INFO_BLOCK_SIZE]);
        let (name, wanted) = parse_info_request(&p).unwrap();
        assert_eq!(name, b"d0");
        assert_eq!(wanted, [wire::INFO_NAME, wire::INFO_BLOCK_SIZE]);
        assert!(
            parse_info_request(&p[..p.len() - 1]).is_none(),
            "short list"
        );
        let mut long = p.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_none(), "trailing byte");
        let mut lying = p;
        lying[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            parse_info_request(&lying).is_none(),
            "name length past the end"
        );
    }

    #[test]
    fn meta_requests_parse_with_checked_lengths() {
        let mut p = 2u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"d0");
        p.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q);
        }
        let (name, qs) = parse_meta_request(&p).unwrap();
        assert_eq!(name, b"d0");
        assert_eq!(qs, [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]);
        assert!(parse_meta_request(&p[..p.len() - 1]).is_none());
        // A huge query count with no data must fail, not allocate.
        let mut bomb = 0u32.to_be_bytes().to_vec();
        bomb.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&bomb).is_none());
    }
}
