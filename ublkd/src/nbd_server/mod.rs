//! The NBD frontend: serves arrays as NBD exports on TCP and unix-socket listeners.
//!
//! Protocol (NetworkBlockDevice/nbd `doc/proto.md`): fixed newstyle negotiation with
//! NO_ZEROES; options EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST/SET_META_CONTEXT (`base:allocation`); STARTTLS and anything else get
//! NBD_REP_ERR_UNSUP. Transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS,
//! CACHE (a range-checked no-op), DISC; simple or structured replies.
//!
//! Per connection, one task: negotiation here, then transmission (`transmission.rs`),
//! where requests run inside the connection's task (`in_flight.rs`) and replies go out
//! many per vectored write (`replies.rs`). The task stays on one connection thread
//! (`conn_threads.rs`) for the connection's life.

mod conn_threads;
mod in_flight;
mod replies;
mod transmission;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backends::nbd::wire::{self, Greeting, OptionHeader, OptionReply, META_BASE_ALLOCATION};
use raidcore::ArrayRef;
use replies::BASE_ALLOCATION_ID;

use crate::stall::StallWriter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Option payloads larger than this are refused: the largest legitimate one (GO with a
/// 4096-byte name, or a meta-context query list) is far smaller.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// An oversized option payload up to this size is skipped and refused with ERR_TOO_BIG;
/// beyond it the client is treated as hostile and disconnected.
const MAX_OPTION_SKIP: u32 = 1 << 20;
const READ_BUF: usize = 64 << 10;
const WRITE_BUF: usize = 256 << 10;
/// How long `shutdown` waits, after forcing connections closed, for their tasks to notice.
const FORCE_GRACE: Duration = Duration::from_secs(1);
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
                Ok((socket, peer)) => self.spawn_connection(socket, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listen = %listener.describe(), error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        listener.cleanup();
    }

    /// Serve an accepted connection on a connection thread (conn_threads.rs), or here
    /// when there are none.
    fn spawn_connection(self: &Arc<Self>, socket: Accepted, peer: String) {
        let guard = ConnGuard::new(self.clone());
        // Where requests too large to run inside the connection's task go.
        let big = tokio::runtime::Handle::current();
        let conn = async move {
            tracing::debug!(%peer, "NBD connection opened");
            let served = match socket.register() {
                Ok((r, w)) => guard.0.serve(r, w, &peer, big).await,
                Err(e) => Err(e),
            };
            match served {
                Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
                Err(e) => tracing::debug!(%peer, error = %e, "NBD connection ended"),
            }
            drop(guard);
        };
        match conn_threads::ConnThreads::get() {
            Some(threads) => threads.spawn(conn),
            None => drop(tokio::spawn(conn)),
        }
    }

    /// One connection: handshake, then transmission until DISC, EOF, a protocol
    /// violation or shutdown.
    async fn serve(
        self: &Arc<Self>,
        r: BoxRead,
        w: BoxWrite,
        peer: &str,
        big: tokio::runtime::Handle,
    ) -> io::Result<()> {
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
        self.transmission(r, w, peer, session, big).await
    }

    /// Hand the negotiated connection to the transmission engine, with whatever the
    /// client already sent past its last option.
    async fn transmission(
        &self,
        r: Rd,
        w: Wr,
        peer: &str,
        s: Session,
        big: tokio::runtime::Handle,
    ) -> io::Result<()> {
        let pending = r.buffer().to_vec();
        let r = r.into_inner();
        // Negotiation flushes after every option: nothing is left in the BufWriter.
        let w = w.into_inner();
        let session = transmission::Session {
            array: self.exports[s.export].array.clone(),
            peer: peer.to_string(),
            structured: s.structured,
            base_alloc: s.base_alloc,
        };
        tracing::debug!(%peer, export = %self.exports[s.export].name, structured = s.structured, "NBD transmission");
        let (stop, force) = (self.stopping.subscribe(), self.force.subscribe());
        transmission::run(session, r, w, &pending, stop, force, big).await
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

    async fn accept(&self) -> io::Result<(Accepted, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // The spec asks both ends to disable Nagle: replies are small and latency
                // bound.
                let _ = s.set_nodelay(true);
                widen_send_buffer(&s);
                Ok((Accepted::Tcp(s.into_std()?), peer.to_string()))
            }
            Listener::Unix(l, p, _) => {
                let (s, _) = l.accept().await?;
                widen_send_buffer(&s);
                let peer = format!("unix:{} #{}", p.display(), next_conn_id());
                Ok((Accepted::Unix(s.into_std()?), peer))
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
/// An accepted socket not yet registered with any runtime: it is registered on the
/// thread that serves it, so its readiness wakes that thread and no other.
enum Accepted {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    /// Register with the current runtime and split.
    fn register(self) -> io::Result<(BoxRead, BoxWrite)> {
        Ok(match self {
            Accepted::Tcp(s) => {
                let (r, w) = tokio::net::TcpStream::from_std(s)?.into_split();
                (Box::new(r), Box::new(w))
            }
            Accepted::Unix(s) => {
                let (r, w) = UnixStream::from_std(s)?.into_split();
                (Box::new(r), Box::new(w))
            }
        })
    }
}

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
