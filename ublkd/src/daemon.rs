//! The daemon's life: load the layout, open members, assemble arrays, start the NBD
//! listeners, the ublk devices and the management API, wait for SIGINT/SIGTERM, then stop
//! in order: delete the ublk devices (the kernel drains them first), stop accepting, drain
//! in-flight I/O, flush members, mark superblocks clean, exit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use raidcore::{ArrayRef, ArraySpec, AssembleReport, BufPool, Member, MemberState, PoolConfig};

use crate::layout::{ArrayPlan, Layout, ListenAddr};
use crate::nbd_server::{Export, NbdServer};
use crate::status::*;

/// How long a stop waits for NBD clients' in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How often remote members are probed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Options shared by `ublkd` and `uniblk up`.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Layout file (TOML). Without one: a raid1 of two sparse 1 GiB files under --data-dir,
    /// exported as NBD `uniblk0` on 127.0.0.1:10809 and a unix socket.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Management socket [default: $UNIBLK_SOCKET or /run/uniblk/ublkd.sock].
    #[arg(long)]
    pub mgmt_socket: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Initialise members that carry another array's superblock (destroys their data).
    #[arg(long)]
    pub force: bool,
    /// Where the built-in default array keeps its member files.
    #[arg(long, default_value = "uniblk-data")]
    pub data_dir: PathBuf,
}

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

pub fn init_logging(level: &str) -> Result<()> {
    // A bare word is a level; tracing would otherwise read it as a module name and log
    // nothing, silently.
    for directive in level.split(',') {
        let d = directive.trim();
        if !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            bail!(
                "--log-level '{level}': '{d}' is not a level (use one of {}, or a filter like ublkd=debug,info)",
                LEVELS.join(", ")
            );
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(level).with_context(|| {
        format!("--log-level '{level}' is not a level (error, warn, info, debug, trace)")
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: escape codes in a log file break grepping fields.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
        .ok();
    Ok(())
}

/// The built-in array for `uniblk up` with no layout: creates the directory and sparse
/// member files when missing.
pub fn default_layout(data_dir: &Path) -> Result<Layout> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let dir = std::fs::canonicalize(data_dir)?;
    let mut members = Vec::new();
    for f in ["member-a.img", "member-b.img"] {
        let p = dir.join(f);
        if !p.exists() {
            let file = std::fs::File::create(&p)
                .with_context(|| format!("cannot create member file {}", p.display()))?;
            file.set_len(1 << 30)?;
        }
        members.push(format!("file:{}", p.display()));
    }
    let sock = dir.join("uniblk0.sock");
    let text = format!(
        "[[array]]\nname = \"uniblk0\"\nlevel = \"raid1\"\nmembers = [{}]\nexport.nbd = {{ listen = [\"127.0.0.1:10809\", \"unix:{}\"] }}\n",
        members.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", "),
        sock.display()
    );
    Layout::parse(&text)
}

/// Open every member of a plan, in layout order.
pub async fn open_members(plan: &ArrayPlan) -> Result<Vec<Arc<dyn Member>>> {
    let mut out = Vec::with_capacity(plan.members.len());
    for m in &plan.members {
        let addr = backends::addr::parse(m).with_context(|| format!("array {}", plan.name))?;
        let member = backends::addr::open_with(&addr, m, &plan.remote)
            .await
            .with_context(|| format!("array {}", plan.name))?;
        out.push(member);
    }
    Ok(out)
}

/// Open and assemble one array (initialising blank members).
pub async fn assemble_plan(
    plan: &ArrayPlan,
    pool: BufPool,
    force: bool,
) -> Result<(ArrayRef, AssembleReport)> {
    let members = open_members(plan).await?;
    let spec = ArraySpec {
        name: plan.name.clone(),
        level: plan.level,
        chunk: plan.chunk,
        queue_depth: plan.queue_depth,
        policy: plan.policy.clone(),
    };
    let (array, report) = raidcore::assemble(&spec, members, pool, force).await?;
    for m in &report.initialised {
        tracing::info!(array = %plan.name, member = %m, "initialised member superblock");
    }
    for m in &report.stale {
        tracing::warn!(array = %plan.name, member = %m, "member missed writes while out of service: kept faulty");
    }
    Ok((Arc::new(array), report))
}

struct Running {
    plan: ArrayPlan,
    array: ArrayRef,
    ublk: Option<crate::ublk::UblkExport>,
}

pub struct Daemon {
    arrays: Vec<Running>,
    servers: Vec<(ListenAddr, Arc<NbdServer>)>,
    pool: BufPool,
    started: Instant,
}

impl Daemon {
    /// Assemble every array and start its NBD listeners. On failure, arrays already
    /// assembled are shut down cleanly before the error is returned.
    pub async fn start(layout: &Layout, force: bool) -> Result<Daemon> {
        let plans = layout.plan()?;
        let pool = BufPool::new(&PoolConfig::default()).context("cannot map the buffer pool")?;
        let mut d = Daemon {
            arrays: Vec::new(),
            servers: Vec::new(),
            pool: pool.clone(),
            started: Instant::now(),
        };
        if let Err(e) = d.bring_up(plans, force).await {
            d.stop().await.ok();
            return Err(e);
        }
        Ok(d)
    }

    async fn bring_up(&mut self, plans: Vec<ArrayPlan>, force: bool) -> Result<()> {
        for plan in plans {
            let (array, _) = assemble_plan(&plan, self.pool.clone(), force).await?;
            tracing::info!(
                array = %plan.name,
                level = plan.level.name(),
                size = array.size(),
                state = ?array.state(),
                "array assembled"
            );
            self.arrays.push(Running {
                plan,
                array,
                ublk: None,
            });
        }
        // One NBD server per listen address, serving the exports that name it.
        let mut by_addr: BTreeMap<ListenAddr, Vec<Export>> = BTreeMap::new();
        for r in &self.arrays {
            for l in &r.plan.nbd_listen {
                by_addr.entry(l.clone()).or_default().push(Export {
                    name: r.plan.nbd_name.clone(),
                    description: r.plan.nbd_description.clone(),
                    array: r.array.clone(),
                });
            }
        }
        for (addr, exports) in by_addr {
            let server = NbdServer::new(exports);
            server
                .listen(&addr.to_string())
                .await
                .with_context(|| format!("NBD listener {addr}"))?;
            tracing::info!(listen = %addr, "NBD listener up");
            self.servers.push((addr, server));
        }
        self.start_ublk().await;
        Ok(())
    }

    /// Give every array that wants one its /dev/ublkbN. Without the driver, one line
    /// says so and the NBD exports carry on.
    async fn start_ublk(&mut self) {
        if !self.arrays.iter().any(|r| r.plan.ublk.is_some()) {
            return;
        }
        if !crate::ublk::control_present() {
            crate::ublk::log_absent();
            return;
        }
        for r in &mut self.arrays {
            if let Some(plan) = &r.plan.ublk {
                r.ublk = Some(crate::ublk::UblkExport::start(&r.array, plan).await);
            }
        }
    }

    /// Stop accepting, drain, flush, mark clean. Safe to call once per daemon.
    pub async fn stop(&self) -> Result<()> {
        for r in &self.arrays {
            if let Some(u) = &r.ublk {
                if let Err(e) = u.stop().await {
                    tracing::error!(array = %r.plan.name, error = %format!("{e:#}"), "ublk device stop failed");
                }
            }
        }
        for (_, s) in &self.servers {
            s.shutdown(DRAIN_TIMEOUT).await;
        }
        let mut first_err = None;
        for r in &self.arrays {
            match r.array.shutdown().await {
                Ok(()) => tracing::info!(array = %r.plan.name, "array stopped clean"),
                Err(e) => {
                    tracing::error!(array = %r.plan.name, error = %e, "array stop: flush failed");
                    first_err.get_or_insert(anyhow::anyhow!("array {}: {e}", r.plan.name));
                }
            }
        }
        for (addr, _) in &self.servers {
            if let ListenAddr::Unix(p) = addr {
                let _ = std::fs::remove_file(p);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Human instructions for attaching each export.
    pub fn attach_help(&self) -> String {
        let mut s = String::new();
        for r in &self.arrays {
            let name = &r.plan.nbd_name;
            if let Some(dev) = r.ublk.as_ref().and_then(|u| u.device_path()) {
                s += &format!("array {} is the block device {dev}\n", r.plan.name);
            }
            if r.plan.nbd_listen.is_empty() {
                s += &format!(
                    "array {} ({}, {} bytes) has no NBD listener (add export.nbd = {{ listen = [...] }} to the layout)\n",
                    r.plan.name,
                    r.plan.level.name(),
                    r.array.size()
                );
                continue;
            }
            s += &format!(
                "array {} ({}, {} bytes) is exported over NBD as '{name}':\n",
                r.plan.name,
                r.plan.level.name(),
                r.array.size()
            );
            for l in &r.plan.nbd_listen {
                let uri = match l {
                    ListenAddr::Tcp(a) => format!("nbd://{a}/{name}"),
                    ListenAddr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
                };
                s += &format!("  {uri}\n");
            }
            if let Some(uri) = r.plan.nbd_listen.first().map(|l| match l {
                ListenAddr::Tcp(a) => format!("nbd://{a}/{name}"),
                ListenAddr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            }) {
                s += &format!(
                    "  try:     qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{uri}'\n  mount:   mkdir -p /mnt/nbd && nbdfuse /mnt/nbd/{name} '{uri}' &  then  losetup -f --show /mnt/nbd/{name}/nbd\n"
                );
                if let Some(ListenAddr::Tcp(a)) = r
                    .plan
                    .nbd_listen
                    .iter()
                    .find(|l| matches!(l, ListenAddr::Tcp(_)))
                {
                    s += &format!(
                        "  kernel:  nbd-client {} {} /dev/nbd0 -N {name}\n",
                        a.ip(),
                        a.port()
                    );
                }
            }
        }
        s
    }

    pub fn status(&self) -> Status {
        Status {
            daemon: DaemonStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: self.started.elapsed().as_secs(),
                buffer_pool: self
                    .pool
                    .usage()
                    .into_iter()
                    .map(|(buffer_bytes, free, total)| PoolClass {
                        buffer_bytes,
                        free,
                        total,
                    })
                    .collect(),
            },
            arrays: self.arrays.iter().map(|r| self.array_status(r)).collect(),
        }
    }

    fn array_status(&self, r: &Running) -> ArrayStatus {
        let a = &r.array;
        let (in_flight, waiting) = a.queue().load();
        let mut exports = Vec::new();
        for (addr, server) in &self.servers {
            if r.plan.nbd_listen.contains(addr) {
                exports.push(ExportStatus {
                    kind: "nbd".into(),
                    name: r.plan.nbd_name.clone(),
                    listen: addr.to_string(),
                    connections: server.connections(),
                });
            }
        }
        ArrayStatus {
            name: r.plan.name.clone(),
            uuid: a.uuid.to_string(),
            level: r.plan.level.name().into(),
            chunk: if r.plan.level.uses_chunk() {
                r.plan.chunk
            } else {
                0
            },
            size: a.size(),
            block_size: a.block_size(),
            state: enum_text(&a.state()),
            queue: QueueStatus {
                policy: a.queue().policy_name().into(),
                depth: a.queue().depth(),
                in_flight,
                waiting,
            },
            exports,
            ublk: r.ublk.as_ref().map(|u| u.status()),
            members: a
                .members()
                .iter()
                .enumerate()
                .map(|(index, m)| member_status(index, m))
                .collect(),
        }
    }

    fn array(&self, array: &str) -> Result<&ArrayRef> {
        self.arrays
            .iter()
            .find(|r| r.plan.name == array)
            .map(|r| &r.array)
            .with_context(|| {
                let names: Vec<&str> = self.arrays.iter().map(|r| r.plan.name.as_str()).collect();
                format!("no array named '{array}' (arrays: {})", names.join(", "))
            })
    }

    /// A member by index or address.
    fn member_index(a: &ArrayRef, member: &str) -> Result<usize> {
        member
            .parse::<usize>()
            .ok()
            .filter(|&i| i < a.members().len())
            .or_else(|| a.members().iter().position(|m| m.member().info().address == member))
            .with_context(|| format!("array {} has no member '{member}' (give its index or address; see uniblk status)", a.name))
    }

    /// Mark a member faulty (operator request). `member` is an index or an address.
    pub async fn fail_member(&self, array: &str, member: &str) -> Result<()> {
        let a = self.array(array)?;
        let idx = Self::member_index(a, member)?;
        if !a.fail_member(idx).await {
            bail!("member {member} of array {array} is already out of service");
        }
        Ok(())
    }

    /// Start rebuilding a faulty member from its mirrors; returns once it has started.
    pub async fn readd_member(
        &self,
        array: &str,
        member: &str,
        rate: Option<u64>,
    ) -> Result<usize> {
        let a = self.array(array)?.clone();
        let idx = Self::member_index(&a, member)?;
        // Refusals are reported at once; the copy itself runs in the background and its
        // progress shows in status.
        a.check_rebuildable(idx)?;
        tokio::spawn(async move {
            if let Err(e) = a.rebuild(idx, rate).await {
                tracing::error!(error = %e, "rebuild failed");
            }
        });
        Ok(idx)
    }

    /// Take a faulty member out of its slot.
    pub async fn remove_member(&self, array: &str, member: &str) -> Result<String> {
        let a = self.array(array)?;
        let idx = Self::member_index(a, member)?;
        let m = a.remove_member(idx).await?;
        let address = m.info().address.clone();
        Ok(address)
    }

    /// Open `address` and put it into empty slot `slot`; then `re-add` rebuilds it.
    pub async fn add_member(&self, array: &str, slot: usize, address: &str) -> Result<()> {
        let a = self.array(array)?;
        if self.arrays.iter().any(|r| {
            r.array
                .members()
                .iter()
                .any(|m| m.member().info().address == address)
        }) {
            bail!("member {address} is already in use by a running array");
        }
        let parsed = backends::addr::parse(address)?;
        let plan = &self
            .arrays
            .iter()
            .find(|r| r.plan.name == array)
            .context("array vanished")?
            .plan;
        let m = backends::addr::open_with(&parsed, address, &plan.remote).await?;
        if let Err(e) = a.add_member(slot, m.clone()).await {
            m.close();
            return Err(e.into());
        }
        Ok(())
    }

    /// Probe remote members of every array periodically until the daemon stops.
    pub fn spawn_health(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let d = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                for r in &d.arrays {
                    if !r.array.is_closed() {
                        r.array.probe_members().await;
                    }
                }
            }
        })
    }
}

fn enum_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn member_status(index: usize, m: &raidcore::MemberSlot) -> MemberStatus {
    let member = m.member();
    let info = member.info();
    let st = m.stats.snapshot();
    let (state, fault, rebuild) = match m.state() {
        MemberState::Healthy => ("healthy".to_string(), None, None),
        MemberState::Faulty(r) => ("faulty".to_string(), Some(fault_text(&r)), None),
        MemberState::Rebuilding => (
            "rebuilding".to_string(),
            None,
            Some(RebuildStatus {
                done: m.rebuild.done.load(std::sync::atomic::Ordering::Relaxed),
                total: m.rebuild.total.load(std::sync::atomic::Ordering::Relaxed),
            }),
        ),
    };
    MemberStatus {
        index,
        address: info.address.clone(),
        locality: enum_text(&info.class),
        protocol: enum_text(&info.proto),
        engine: info.engine.to_string(),
        size: info.size,
        block_size: info.block_size,
        state,
        fault,
        in_flight: st.in_flight,
        completed: st.completed,
        errors: st.errors,
        bytes_read: st.bytes_read,
        bytes_written: st.bytes_written,
        last_probe_us: st.last_probe_us,
        probes_failed: st.probes_failed,
        rebuild,
        session: member.session(),
    }
}

fn fault_text(r: &raidcore::FaultReason) -> String {
    use raidcore::FaultReason::*;
    match r {
        IoError(e) => format!("io error: {e}"),
        Timeout => "timeout".into(),
        Disconnected => "disconnected".into(),
        TooSmall => "too small".into(),
        Stale => "stale (missed writes while out of service)".into(),
        IdentityLost(why) => {
            format!("identity lost: its superblock is gone ({why}); re-add it to rebuild")
        }
        Operator => "failed by operator".into(),
        Removed => "removed by operator (slot empty: uniblk member add)".into(),
    }
}

/// prctl option from linux/prctl.h (not in the libc crate).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// The daemon's tokio runtime. Its workers serve block I/O for our own devices, so they are
/// marked as I/O flushers (PR_SET_IO_FLUSHER): memory reclaim on them must not wait on
/// writeback to the very device they serve.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(mark_io_flusher)
        .build()
}

/// Mark the calling thread as an I/O flusher (see [`runtime`]). Best effort: needs
/// CAP_SYS_RESOURCE; without it the daemon still works.
pub fn mark_io_flusher() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
}

/// Run the daemon in the foreground until SIGINT or SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let layout = match &args.config {
        Some(p) => Layout::load(p)?,
        None => default_layout(&args.data_dir)?,
    };
    let socket = args
        .mgmt_socket
        .clone()
        .or_else(|| layout.daemon.as_ref().and_then(|d| d.mgmt_socket.clone()))
        .unwrap_or_else(crate::mgmt_api::default_socket);
    let listener = crate::mgmt_api::bind(&socket).await?;
    let daemon = match Daemon::start(&layout, args.force).await {
        Ok(d) => Arc::new(d),
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let api = crate::mgmt_api::serve(listener, daemon.clone());
    let health = daemon.spawn_health(HEALTH_INTERVAL);
    println!("{}", daemon.attach_help());
    println!(
        "management socket: {} (try: uniblk status --socket {0})",
        socket.display()
    );
    wait_for_signal().await?;
    tracing::info!("stopping: draining in-flight I/O");
    api.abort();
    health.abort();
    let r = daemon.stop().await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    r
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
