//! `clawtermd`: the node's session server.
//!
//! * [`settings`]: `clawtermd`'s options, layered from the command line, the environment and
//!   the config file, checked into a [`config::ServerConfig`].
//! * [`daemon`]: running a started server until a signal (reloads, health).
//! * [`shard`]: the per-core handler the `shards` runtime drives: it routes bytes between
//!   client connections, the sans-IO [`crate::session`] core and agent pod links.
//!
//! [`start`] starts the runtime and returns a [`Server`] handle.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod fdtable;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod quic;
pub mod settings;
pub mod shard;
pub mod sim;
pub mod tls;
pub mod watch;
pub mod ws;

pub use config::{Auth, ServerConfig};

use crate::auth::Tokens;
use crate::pods::{PodEvent, PodKey, Registry};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// State shared by every shard of the node.
pub struct Shared {
    pub cfg: ServerConfig,
    /// Set once a live upgrade handed everything to a new process: this one exits.
    pub upgraded: Arc<std::sync::atomic::AtomicBool>,
    /// Set with `upgraded` when the hand-over failed after the shards froze.
    pub upgrade_failed: Arc<std::sync::atomic::AtomicBool>,
    /// The tenant tokens in force (`None` with `--insecure-no-auth`).
    pub tokens: RwLock<Option<Arc<Tokens>>>,
    /// Sessions on the node, suspended ones included (for `--max-sessions`).
    pub sessions: AtomicUsize,
    /// The node's agent pods, kept current by inotify.
    pub registry: Arc<Registry>,
    /// Counters and gauges, one set per shard.
    pub metrics: Arc<metrics::Metrics>,
    /// TLS 1.3 on the TCP port (None with `--insecure-plaintext`).
    pub tls: Option<tls::Tls>,
    /// QUIC on the UDP port (None when off; it needs TLS).
    pub quic: Option<Arc<quic::QuicShared>>,
    /// ClawRoam: this node's part in a cluster (`--keeper`); `None` on a node of its own.
    pub cluster: Option<Arc<cluster::ClusterNode>>,
    /// The WebSocket port's page and rules (None when the port is off).
    pub ws: Option<ws::WsConfig>,
}

impl Shared {
    /// Reserves room for one more session; false when the node is at `--max-sessions`.
    pub fn reserve_session(&self) -> bool {
        let n = self.sessions.fetch_add(1, Ordering::Relaxed);
        if self.cfg.max_sessions.is_some_and(|max| n >= max) {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn release_session(&self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a pod for (tenant, agent) is registered (lock-free).
    pub fn pod_present(&self, tenant: u32, agent: u32) -> bool {
        self.registry.contains(PodKey { tenant, agent })
    }

    /// Whether `token` is accepted for (tenant, agent).
    pub fn check_token(&self, tenant: u32, agent: u32, token: &[u8; 32]) -> bool {
        let guard = match self.tokens.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match guard.as_ref() {
            None => true,
            Some(t) => t.check(tenant, agent, token),
        }
    }

    /// The one reload path, for SIGHUP (`changed` is `None`: everything) and for a watched
    /// file that changed on disk (`Some(path)`: what that file feeds). The tokens file is
    /// loaded whole and replaces the tokens in force only when valid; the TLS certificate and
    /// key are reloaded for new connections only when they load. Whatever does not load leaves
    /// the previous one in force, with an error in the log that says so. Returns what was
    /// reloaded.
    pub fn reload(&self, changed: Option<&std::path::Path>) -> Reloaded {
        let mut done = Reloaded::default();
        if changed.is_none() && matches!(self.cfg.auth, Auth::NoAuth) && self.tls.is_none() {
            tracing::info!("SIGHUP: no tokens file or TLS certificate to reload");
            return done;
        }
        let why = if changed.is_some() {
            "changed on disk"
        } else {
            "SIGHUP"
        };
        if let Auth::Tokens(p) = &self.cfg.auth {
            if changed.is_none_or(|c| c == p) {
                match Tokens::load(p) {
                    Ok(t) => {
                        tracing::info!(tokens = t.len(), why, "tokens file reloaded");
                        self.set_tokens(t);
                        done.tokens = true;
                    }
                    Err(e) => tracing::error!(
                        why,
                        "tokens file not reloaded, keeping the previous one: {e}"
                    ),
                }
            }
        }
        let tls_file = |c: &std::path::Path| {
            self.cfg
                .tls
                .as_ref()
                .is_some_and(|(cert, key)| c == cert || c == key)
        };
        if let Some(t) = &self.tls {
            if changed.is_none_or(tls_file) {
                match t.reload() {
                    Ok(()) => {
                        tracing::info!(why, "TLS certificate reloaded");
                        done.tls = true;
                    }
                    Err(e) => tracing::error!(
                        why,
                        "TLS certificate not reloaded, keeping the previous one: {e}"
                    ),
                }
            }
        }
        done
    }

    /// Replaces the tokens in force (a reload); an invalid file never gets here.
    pub fn set_tokens(&self, tokens: Tokens) {
        let mut guard = match self.tokens.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Some(Arc::new(tokens));
    }
}

/// What [`Shared::reload`] reloaded.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The tokens file was valid and is now in force.
    pub tokens: bool,
    /// The TLS certificate and key loaded and serve new connections.
    pub tls: bool,
}

/// A running server.
pub struct Server {
    /// The upgrade socket of the state dir (removed on drop).
    _upgrade: Option<crate::upgrade::old::Serving>,
    /// Held for the life of the server: its lock keeps other daemons out of the state dir.
    state: Option<crate::state::StateDir>,
    runtime: shards::Runtime<shard::ShardMsg>,
    shared: Arc<Shared>,
    admin: Option<admin::Admin>,
}

/// Why the server could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The tokens file could not be loaded.
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokensError),
    /// The TLS certificate or key is unusable.
    #[error("{0}")]
    Tls(String),
    /// The QUIC endpoint could not be set up.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The pod socket directory cannot be watched.
    #[error("pod socket directory {path}: {source}")]
    SocketDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The shards (their listeners, rings or threads) could not start.
    #[error("{0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Upgrade(#[from] crate::upgrade::take::TakeError),
    /// The cluster could not be joined (keeper, peer link).
    #[error("cluster: {0}")]
    Cluster(String),
    /// The browser terminal page could not be read.
    #[error("{0}")]
    Web(String),
    /// The admin endpoint could not listen (the message names the address).
    #[error("{source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl StartError {
    /// The underlying I/O error kind, where there is one (e.g. `AddrInUse`).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            StartError::SocketDir { source, .. }
            | StartError::Runtime(source)
            | StartError::Admin { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// Starts the shards and the listeners.
pub fn start(cfg: ServerConfig) -> Result<Server, StartError> {
    let tokens = match &cfg.auth {
        Auth::NoAuth => None,
        Auth::Tokens(path) => Some(Arc::new(Tokens::load(path)?)),
    };
    let quic_port = match (cfg.quic_port, &cfg.tls) {
        (Some(p), Some(_)) => Some(p),
        (Some(_), None) => {
            tracing::warn!(
                "QUIC needs TLS (--tls-cert/--tls-key); plaintext TCP only, UDP port not bound"
            );
            None
        }
        (None, _) => None,
    };
    let rt_cfg = shards::Config {
        shards: cfg.shards,
        cpus: cfg.cpus.clone(),
        io: cfg.io,
        listen: Some(SocketAddr::new(cfg.bind, cfg.port)),
        udp: quic_port.map(|p| SocketAddr::new(cfg.bind, p)),
        udp_steering: quic_port.map(|_| quic::steering_program(cfg.shards)),
        extra_listen: cfg
            .ws
            .iter()
            .map(|w| SocketAddr::new(cfg.bind, w.port))
            .collect(),
        ..shards::Config::default()
    };
    let ws = match &cfg.ws {
        Some(w) => Some(ws_config(w)?),
        None => None,
    };
    let quic = match quic_port {
        Some(_) => Some(Arc::new(
            quic::QuicShared::new(cfg.shards, cfg.session.idle_ms).map_err(StartError::Quic)?,
        )),
        None => None,
    };
    let cfg_shards = cfg.shards;
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(tls::Tls::load(cert, key).map_err(StartError::Tls)?),
        None => None,
    };
    let admin_addr = cfg.admin;
    // The state dir first: a daemon refused it must not have bound anything.
    let mut inherited = shards::Inherited::default();
    let mut taking: Option<crate::upgrade::take::Taking> = None;
    let (state, restores) = match &cfg.state_dir {
        None => (
            None,
            (0..cfg_shards).map(|_| shard::Restore::default()).collect(),
        ),
        Some(dir) => match crate::state::StateDir::open(dir) {
            Ok(sd) => {
                let r = sd.restore(
                    cfg_shards,
                    cfg.session.hard_ring_bytes(),
                    crate::state::mapped::WINDOW,
                )?;
                // Their clients come back all at once: room for their connections now, not
                // one doubling at a time with the shards running (see `fdtable`).
                if let Ok(d) = std::fs::File::open(dir) {
                    fdtable::reserve(&d, r.sessions + 1024);
                }
                tracing::info!(
                    dir = %dir.display(),
                    sessions = r.sessions,
                    files = r.files,
                    ring_bytes = r.ring_bytes,
                    generation = r.generation,
                    took_ms = r.took.as_millis() as u64,
                    "state dir opened"
                );
                let restores: Vec<shard::Restore> = r
                    .records
                    .into_iter()
                    .zip(r.journals)
                    .zip(r.held)
                    .map(|((records, j), held)| shard::Restore {
                        records,
                        journal: Some(j),
                        moved: None,
                        held,
                        awaiting: false,
                    })
                    .collect();
                (Some(sd), restores)
            }
            Err(crate::state::StateError::Held { pid, .. }) if cfg.upgrade => {
                tracing::info!(
                    dir = %dir.display(),
                    old_pid = ?pid,
                    "upgrade: taking over from the running clawtermd"
                );
                let mut t = crate::upgrade::take::connect(dir, cfg_shards)?;
                let lock = t.lock.take().ok_or_else(|| {
                    StartError::Runtime(std::io::Error::other("the hand-over gave no lock"))
                })?;
                let sd = match crate::state::StateDir::with_lock(dir, lock) {
                    Ok(sd) => sd,
                    Err(e) => {
                        t.fail(&e);
                        return Err(e.into());
                    }
                };
                // The shards start empty, accepting paused; the sessions come once they run.
                inherited = t.sockets.take().unwrap_or_default();
                taking = Some(t);
                (
                    Some(sd),
                    (0..cfg_shards)
                        .map(|_| shard::Restore {
                            awaiting: true,
                            ..Default::default()
                        })
                        .collect(),
                )
            }
            Err(e) => return Err(e.into()),
        },
    };
    let restores: Vec<std::sync::Mutex<Option<shard::Restore>>> = restores
        .into_iter()
        .map(|r| std::sync::Mutex::new(Some(r)))
        .collect();
    // ClawRoam: the node's ordinal (the top byte of its session ids) comes from the keeper
    // before any shard makes an id; a state dir remembers it for a restart while the keeper
    // is away.
    let cluster = match &cfg.cluster {
        None => None,
        Some(cc) => {
            let cached = cfg
                .state_dir
                .as_deref()
                .and_then(|d| read_ordinal(d, &cc.node_id));
            let node = cluster::ClusterNode::join(cc.clone(), cfg_shards, cfg.port, cached)
                .map_err(StartError::Cluster)?;
            if let Some(d) = cfg.state_dir.as_deref() {
                write_ordinal(d, &cc.node_id, node.keeper.ordinal());
            }
            Some(node)
        }
    };
    let registry = Registry::start_without_callback(&cfg.socket_dir).map_err(|source| {
        StartError::SocketDir {
            path: cfg.socket_dir.clone(),
            source,
        }
    })?;
    let shared = Arc::new(Shared {
        upgraded: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        upgrade_failed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        cfg,
        tokens: RwLock::new(tokens),
        sessions: AtomicUsize::new(0),
        registry,
        metrics: Arc::new(metrics::Metrics::new(cfg_shards)),
        tls,
        quic,
        cluster,
        ws,
    });
    let s2 = shared.clone();
    let runtime_at = std::time::Instant::now();
    let runtime = shards::Runtime::start_inherited(rt_cfg, inherited, move |i| {
        // On the shard's thread: liveness (`/healthz`) notices when the thread ends.
        s2.metrics.watch_shard_thread();
        let restore = restores
            .get(i)
            .and_then(|m| m.lock().ok().and_then(|mut r| r.take()))
            .unwrap_or_default();
        shard::ShardHandler::new(i, s2.clone(), restore)
    })
    .map_err(StartError::Runtime);
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            if let Some(t) = taking.as_mut() {
                t.fail(&e);
            }
            return Err(e);
        }
    };
    // Pod events reach every shard through its mailbox (links are per shard).
    let remote = runtime.remote();
    shared.registry.set_on_event(Box::new(move |ev| {
        for i in 0..remote.shards() {
            let msg = match &ev {
                PodEvent::Added(k) => shard::ShardMsg::PodAdded(k.tenant, k.agent),
                PodEvent::Removed(k) => shard::ShardMsg::PodRemoved(k.tenant, k.agent),
            };
            remote.send(i, msg);
        }
    }));
    let _ = shared.metrics.backend.set(runtime.backend().to_string());
    let runtime_started = runtime_at.elapsed();
    let upgraded = taking.is_some();
    if let (Some(mut t), Some(sd)) = (taking, state.as_ref()) {
        match take_sessions(&mut t, sd, &runtime, cfg_shards) {
            Ok((counts, received_ms)) => {
                // Every shard has its part in place: take connections again.
                let remote = runtime.remote();
                for i in 0..cfg_shards {
                    remote.send(i, shard::ShardMsg::Serve);
                }
                let took = t.started.elapsed();
                shared.metrics.note_upgrade(
                    counts.sessions as u64,
                    counts.conns as u64,
                    counts.links as u64,
                    counts.bytes,
                    took,
                );
                if let Err(e) = t.ready() {
                    tracing::warn!("upgrade: could not tell the old clawtermd we serve: {e}");
                }
                tracing::info!(
                    sessions = counts.sessions,
                    connections = counts.conns,
                    links = counts.links,
                    bytes = counts.bytes,
                    took_ms = took.as_millis() as u64,
                    received_ms,
                    runtime_start_ms = runtime_started.as_millis() as u64,
                    "upgrade: took over; serving"
                );
            }
            Err(e) => {
                t.fail(&e);
                runtime.shutdown();
                let _ = runtime.join();
                return Err(e);
            }
        }
    }
    if let Some(c) = &shared.cluster {
        // After a live upgrade the old process holds the peer port until it exits (moments
        // after READY): retried for up to 10 s then, like the admin port.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut started = c.start_peers(runtime.remote());
        while upgraded
            && started.as_ref().is_err_and(|e| e.contains("in use"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
            started = c.start_peers(runtime.remote());
        }
        match started {
            Ok(addr) => {
                let s3 = shared.clone();
                c.spawn_refresher(move || s3.sessions.load(Ordering::Relaxed) as u64);
                tracing::info!(
                    node = c.id(),
                    ordinal = c.keeper.ordinal(),
                    peer = %addr,
                    advertise = %c.client_addr(),
                    "joined the cluster"
                );
            }
            Err(e) => {
                runtime.shutdown();
                let _ = runtime.join();
                c.leave(false);
                return Err(StartError::Cluster(e));
            }
        }
    }
    let admin = match admin_addr {
        Some(a) => Some(start_admin(a, &shared, upgraded, runtime.remote())?),
        None => None,
    };
    let upgrade = match &state {
        Some(sd) => {
            let kept = runtime.listening_sockets().map_err(StartError::Runtime)?;
            let src = crate::upgrade::old::Source {
                remote: runtime.remote(),
                sockets: Box::new(move || {
                    let dup = |v: &[std::os::fd::OwnedFd]| {
                        v.iter()
                            .map(|f| f.try_clone())
                            .collect::<std::io::Result<Vec<_>>>()
                    };
                    Ok(shards::Inherited {
                        tcp: dup(&kept.tcp)?,
                        extra: kept
                            .extra
                            .iter()
                            .map(|v| dup(v))
                            .collect::<std::io::Result<Vec<_>>>()?,
                        udp: dup(&kept.udp)?,
                        udp_steered: kept.udp_steered,
                        paused: false,
                    })
                }),
                lock: sd.lock_fd().map_err(StartError::Runtime)?,
                shards: cfg_shards,
                metrics: shared.metrics.clone(),
                done: shared.upgraded.clone(),
                failed: shared.upgrade_failed.clone(),
            };
            Some(crate::upgrade::old::serve(sd.path(), src).map_err(StartError::Runtime)?)
        }
        None => None,
    };
    Ok(Server {
        _upgrade: upgrade,
        state,
        runtime,
        shared,
        admin,
    })
}

/// The new process of a live upgrade, its shards running (accepting paused): takes each
/// shard's part in as it arrives (a fresh journal, then the shard adopts it) and waits until
/// every shard has. Returns what moved and when the last part arrived (ms since HELLO).
fn take_sessions(
    t: &mut crate::upgrade::take::Taking,
    sd: &crate::state::StateDir,
    runtime: &shards::Runtime<shard::ShardMsg>,
    shards: usize,
) -> Result<(crate::upgrade::take::Counts, u64), StartError> {
    let generation = sd.next_generation()?;
    let remote = runtime.remote();
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let counts = t.receive(|i, part| {
        let journal = sd
            .install_shard(
                i,
                shards,
                generation,
                &part.records,
                &part.held,
                crate::state::mapped::WINDOW,
            )
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let restore = shard::Restore {
            records: part.records,
            journal: Some(journal),
            moved: Some(part.moved),
            held: part.held,
            awaiting: false,
        };
        if !remote.send(
            i,
            shard::ShardMsg::TakeOver(Box::new(restore), done_tx.clone()),
        ) {
            return Err(std::io::Error::other(format!("shard {i} is gone")));
        }
        // Once the shard serves its part, the old process freezes the next one.
        match done_rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(_) => Ok(()),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("shard {i} did not take its part of the hand-over in within 10 s"),
            )),
        }
    })?;
    let received_ms = t.started.elapsed().as_millis() as u64;
    Ok((counts, received_ms))
}

/// The node ordinal a state dir remembers for `node` (`DIR/cluster-ordinal`: `NODE ORDINAL`).
fn read_ordinal(dir: &std::path::Path, node: &str) -> Option<u8> {
    let text = std::fs::read_to_string(dir.join("cluster-ordinal")).ok()?;
    let (n, o) = text.trim().split_once(' ')?;
    (n == node).then(|| o.parse().ok()).flatten()
}

fn write_ordinal(dir: &std::path::Path, node: &str, ordinal: u8) {
    if let Err(e) = std::fs::write(dir.join("cluster-ordinal"), format!("{node} {ordinal}\n")) {
        tracing::warn!(dir = %dir.display(), "cannot remember the cluster ordinal: {e}");
    }
}

/// Starts the admin endpoint. After a live upgrade the old process may hold the port a moment
/// longer (it exits once we serve): retried for up to 10 s then.
fn start_admin(
    a: SocketAddr,
    shared: &Arc<Shared>,
    retry: bool,
    remote: shards::Remote<shard::ShardMsg>,
) -> Result<admin::Admin, StartError> {
    let ops = Arc::new(ops::Ops::new(shared.clone(), remote));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match admin::Admin::start_with_ops(
            a,
            shared.metrics.clone(),
            shared.registry.clone(),
            Some(ops.clone()),
        ) {
            Ok(x) => return Ok(x),
            Err(e)
                if retry
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => return Err(StartError::Admin { addr: a, source }),
        }
    }
}

/// The WebSocket port's page (read into memory now) and rules. A configured `--web-root`
/// that cannot be read stops the start; without one, the page built beside the binary (or
/// installed) is used, else a placeholder that says how to build it.
fn ws_config(w: &config::WsSettings) -> Result<ws::WsConfig, StartError> {
    let assets = match &w.web_root {
        Some(dir) => ws::assets::Assets::load(dir)
            .map_err(|e| StartError::Web(format!("--web-root: {e}")))?,
        None => match ws::assets::Assets::default_root() {
            Some(dir) => ws::assets::Assets::load(&dir).unwrap_or_else(|e| {
                tracing::warn!("browser terminal page: {e}; serving a placeholder");
                ws::assets::Assets::placeholder()
            }),
            None => ws::assets::Assets::placeholder(),
        },
    };
    match &assets.root {
        Some(r) => {
            tracing::debug!(root = %r.display(), files = assets.len(), "browser terminal page")
        }
        None => tracing::info!(
            "the browser terminal page is not built (scripts/build-web.sh): / serves a placeholder"
        ),
    }
    Ok(ws::WsConfig {
        assets,
        origins: ws::http::OriginPolicy {
            allowed: w.origins.clone(),
        },
        max_message: w.max_message,
    })
}

impl Server {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.runtime.local_addr()
    }
    /// The WebSocket port's address, when it is on.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.runtime.extra_local_addrs().first().copied()
    }
    /// The QUIC (UDP) address, when QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.runtime.udp_local_addr()
    }
    /// Whether QUIC datagrams are steered to their connection's shard by the kernel (the
    /// reuseport BPF program attached); otherwise shards forward them.
    pub fn quic_steered(&self) -> bool {
        self.runtime.udp_steered()
    }
    pub fn backend(&self) -> shards::Backend {
        self.runtime.backend()
    }
    /// Where the admin endpoint listens, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }
    /// The state dir this server holds (`--state-dir`), if any.
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.state.as_ref().map(|s| s.path())
    }
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    /// A handle that can stop the server from another thread.
    pub fn stopper(&self) -> shards::Remote<shard::ShardMsg> {
        self.runtime.remote()
    }
    pub fn shutdown(&self) {
        self.shared
            .metrics
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.registry.stop();
        if let Some(c) = &self.shared.cluster {
            c.leave(self.shared.upgraded.load(Ordering::Relaxed));
        }
        self.runtime.shutdown();
    }
    pub fn join(self) -> std::io::Result<()> {
        self.runtime.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path) -> ServerConfig {
        ServerConfig {
            bind: "127.0.0.1".parse().unwrap(),
            port: 0,
            socket_dir: dir.to_path_buf(),
            io: shards::IoMode::Epoll,
            ..ServerConfig::default()
        }
    }

    fn start_err(c: ServerConfig) -> StartError {
        match start(c) {
            Ok(s) => {
                s.shutdown();
                let _ = s.join();
                panic!("started")
            }
            Err(e) => e,
        }
    }

    /// Each start-up failure is its own variant and names what to fix.
    #[test]
    fn start_errors_are_typed_and_name_the_culprit() {
        let dir = std::env::temp_dir().join(format!("ct-start-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("no-such-tokens");
        let e = start_err(ServerConfig {
            auth: Auth::Tokens(missing.clone()),
            ..cfg(&dir)
        });
        assert!(matches!(e, StartError::Tokens(_)), "{e:?}");
        assert!(e.to_string().contains("no-such-tokens"), "{e}");

        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = busy.local_addr().unwrap();
        let e = start_err(ServerConfig {
            admin: Some(addr),
            ..cfg(&dir)
        });
        assert!(matches!(e, StartError::Admin { .. }), "{e:?}");
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::AddrInUse));
        assert!(e.to_string().contains(&addr.to_string()), "{e}");

        let e = start_err(ServerConfig {
            port: addr.port(),
            ..cfg(&dir)
        });
        assert!(matches!(e, StartError::Runtime(_)), "{e:?}");
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::AddrInUse));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
