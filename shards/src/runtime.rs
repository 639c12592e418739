//! Starting, addressing and stopping the shards: [`Runtime`] and its [`Remote`] handle, and
//! each shard thread's main loop.

use crate::reactor::{self, Core, Envelope, Shared};
use crate::{epoll, probe_uring, sys, udp, uring, Backend, Config, Handler, IoMode};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Clonable, `Send` handle to post messages to shards or stop the runtime from any thread.
pub struct Remote<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for Remote<M> {
    fn clone(&self) -> Self {
        Remote {
            shared: self.shared.clone(),
        }
    }
}

impl<M: Send + 'static> Remote<M> {
    /// Deliver `msg` to `shard`'s `on_message`. `false` if the shard does not exist or ended.
    pub fn send(&self, shard: usize, msg: M) -> bool {
        self.shared.send(shard, Envelope::Msg(msg))
    }
    /// Request stop of all shards.
    pub fn stop(&self) {
        self.shared.request_stop();
    }
    pub fn shards(&self) -> usize {
        self.shared.senders.len()
    }
}

/// Handle to the running shards.
pub struct Runtime<M: Send + 'static> {
    /// Copies of the shards' listening sockets (see [`Runtime::listening_sockets`]).
    kept: Vec<std::os::fd::OwnedFd>,
    /// Per extra listener, its shards' sockets.
    kept_extra: Vec<Vec<std::os::fd::OwnedFd>>,
    kept_udp: Vec<std::os::fd::OwnedFd>,
    shared: Arc<Shared<M>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    backend: Backend,
    local_addr: Option<SocketAddr>,
    extra_local_addrs: Vec<SocketAddr>,
    udp_local_addr: Option<SocketAddr>,
    udp_steered: bool,
}

/// Listening sockets a runtime takes over instead of binding its own (a live upgrade).
#[derive(Debug, Default)]
pub struct Inherited {
    /// One TCP listener per shard, in shard order.
    pub tcp: Vec<std::os::fd::OwnedFd>,
    /// Per extra listener ([`Config::extra_listen`], in order), one socket per shard. An
    /// extra listener inherited here is used instead of binding its address; one missing is
    /// bound.
    pub extra: Vec<Vec<std::os::fd::OwnedFd>>,
    /// One UDP socket per shard, in shard order (QUIC).
    pub udp: Vec<std::os::fd::OwnedFd>,
    /// Whether a steering program is attached to the UDP sockets' reuseport group.
    pub udp_steered: bool,
    /// Start with accepting paused: the shards take neither connections nor datagrams until
    /// each calls [`Context::start_accepting`](crate::Context::start_accepting) (a live upgrade
    /// starts the new shards before the sessions arrive; what the kernel queues meanwhile
    /// waits, it is not refused).
    pub paused: bool,
}

impl<M: Send + 'static> Runtime<M> {
    /// Start `cfg.shards` threads named `shard-{i}`; `factory(i)` builds shard i's handler on
    /// its own thread.
    pub fn start<H, F>(cfg: Config, factory: F) -> io::Result<Runtime<M>>
    where
        H: Handler<Msg = M>,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        Runtime::start_inherited(cfg, Inherited::default(), factory)
    }

    /// [`Runtime::start`], taking over listening sockets another process bound (a live
    /// upgrade) instead of binding: one TCP listener (and one UDP socket, with QUIC) per shard,
    /// in shard order, as [`Runtime::listening_sockets`] gave them.
    pub fn start_inherited<H, F>(
        cfg: Config,
        inherited: Inherited,
        factory: F,
    ) -> io::Result<Runtime<M>>
    where
        H: Handler<Msg = M>,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        cfg.validate()?;
        let extra_counts: Vec<usize> = inherited.extra.iter().map(Vec::len).collect();
        for (what, n) in [
            ("TCP listeners", inherited.tcp.len()),
            ("UDP sockets", inherited.udp.len()),
        ]
        .into_iter()
        .chain(extra_counts.into_iter().map(|n| ("extra TCP listeners", n)))
        {
            if n != 0 && n != cfg.shards {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{n} inherited {what} for {} shards", cfg.shards),
                ));
            }
        }
        let backend = match cfg.io {
            IoMode::Epoll => Backend::Epoll,
            IoMode::Uring => match probe_uring() {
                Ok(()) => Backend::Uring,
                Err(reason) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("io_uring requested but unavailable: {reason}"),
                    ))
                }
            },
            IoMode::Auto => match probe_uring() {
                Ok(()) => Backend::Uring,
                Err(reason) => {
                    tracing::warn!(
                        "io_uring unavailable ({reason}); falling back to the epoll backend"
                    );
                    Backend::Epoll
                }
            },
        };

        let paused = inherited.paused;
        // Listeners: bound here so that errors surface from start() and port 0 resolves once.
        let mut listeners = Vec::new();
        let mut local_addr = None;
        if !inherited.tcp.is_empty() {
            for fd in inherited.tcp {
                sys::set_nonblocking(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    backend == Backend::Epoll,
                )?;
                if local_addr.is_none() {
                    local_addr = Some(sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(&fd))?);
                }
                listeners.push(Some(fd));
            }
        } else if let Some(addr) = cfg.listen {
            let mut bind_addr = addr;
            for _ in 0..cfg.shards {
                let fd = sys::tcp_listener(&bind_addr, cfg.backlog, backend == Backend::Epoll)?;
                if local_addr.is_none() {
                    let a = sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
                    bind_addr = a;
                    local_addr = Some(a);
                }
                listeners.push(Some(fd));
            }
        } else {
            listeners.resize_with(cfg.shards, || None);
        }
        // Extra listeners: per shard, the sockets of every extra listener, in order.
        let mut extra: Vec<Vec<std::os::fd::OwnedFd>> = Vec::new();
        let mut extra_local_addrs = Vec::new();
        let mut inherited_extra = inherited.extra.into_iter();
        for addr in &cfg.extra_listen {
            let socks = match inherited_extra.next() {
                Some(fds) if !fds.is_empty() => {
                    for fd in &fds {
                        sys::set_nonblocking(
                            std::os::fd::AsRawFd::as_raw_fd(fd),
                            backend == Backend::Epoll,
                        )?;
                    }
                    fds
                }
                _ => {
                    let mut fds = Vec::with_capacity(cfg.shards);
                    let mut bind_addr = *addr;
                    for _ in 0..cfg.shards {
                        let fd =
                            sys::tcp_listener(&bind_addr, cfg.backlog, backend == Backend::Epoll)?;
                        if fds.is_empty() {
                            bind_addr = sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
                        }
                        fds.push(fd);
                    }
                    fds
                }
            };
            if let Some(first) = socks.first() {
                extra_local_addrs.push(sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(first))?);
            }
            extra.push(socks);
        }
        let mut udp_socks = Vec::new();
        let mut udp_local_addr = None;
        let mut udp_steered = false;
        if !inherited.udp.is_empty() {
            for fd in inherited.udp {
                if udp_local_addr.is_none() {
                    udp_local_addr = Some(sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(&fd))?);
                }
                udp_socks.push(Some(fd));
            }
            // The steering program stays attached to the group the sockets belong to.
            udp_steered = inherited.udp_steered;
        } else if let Some(addr) = cfg.udp {
            let mut bind_addr = addr;
            for _ in 0..cfg.shards {
                let fd = udp::udp_socket(&bind_addr)?;
                if udp_local_addr.is_none() {
                    let a = sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
                    bind_addr = a;
                    udp_local_addr = Some(a);
                }
                udp_socks.push(Some(fd));
            }
            if let (Some(prog), Some(Some(first))) = (&cfg.udp_steering, udp_socks.first()) {
                // The group's sockets joined in shard order, so index i is shard i's socket.
                match udp::attach_reuseport_cbpf(std::os::fd::AsRawFd::as_raw_fd(first), prog) {
                    Ok(()) => udp_steered = true,
                    Err(e) => tracing::warn!(
                        "cannot attach the UDP steering program ({e}); datagrams are spread \
                         by the kernel's hash and must be forwarded between shards"
                    ),
                }
            }
        } else {
            udp_socks.resize_with(cfg.shards, || None);
        }

        // Copies of the listening sockets, for handing them to another process (a live
        // upgrade) while the shards own theirs.
        let mut kept = Vec::new();
        for l in listeners.iter().flatten() {
            kept.push(l.try_clone()?);
        }
        let mut kept_extra = Vec::new();
        for socks in &extra {
            kept_extra.push(
                socks
                    .iter()
                    .map(|f| f.try_clone())
                    .collect::<io::Result<Vec<_>>>()?,
            );
        }
        // Per shard: listener 0 (`listen`), then one socket of each extra listener.
        let mut per_shard: Vec<Vec<Option<std::os::fd::OwnedFd>>> =
            listeners.into_iter().map(|l| vec![l]).collect();
        for socks in extra {
            for (i, fd) in socks.into_iter().enumerate() {
                if let Some(v) = per_shard.get_mut(i) {
                    v.push(Some(fd));
                }
            }
        }
        let mut kept_udp = Vec::new();
        for u in udp_socks.iter().flatten() {
            kept_udp.push(u.try_clone()?);
        }
        let mut senders = Vec::with_capacity(cfg.shards);
        let mut receivers = Vec::with_capacity(cfg.shards);
        let mut wakers = Vec::with_capacity(cfg.shards);
        for _ in 0..cfg.shards {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            receivers.push(rx);
            wakers.push(reactor::Waker::new(backend == Backend::Epoll)?);
        }
        let shared = Arc::new(Shared::new(senders, wakers));
        let factory = Arc::new(factory);
        let cfg = Arc::new(cfg);
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<io::Result<()>>();

        let mut threads = Vec::with_capacity(cfg.shards);
        for (i, ((rx, listener), udp_sock)) in receivers
            .into_iter()
            .zip(per_shard)
            .zip(udp_socks)
            .enumerate()
        {
            let shared2 = shared.clone();
            let factory = factory.clone();
            let cfg2 = cfg.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    // Everything this thread logs carries its shard index.
                    let _span = tracing::info_span!("shard", shard = i).entered();
                    let _guard = reactor::PanicGuard(shared2.clone());
                    shard_main(
                        i, backend, cfg2, shared2, rx, listener, udp_sock, paused, factory, ready,
                    )
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.request_stop();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        let mut first_err = None;
        for _ in 0..cfg.shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(io::Error::other("shard thread died during startup"));
                    break;
                }
            }
        }
        let rt = Runtime {
            kept,
            kept_extra,
            kept_udp,
            shared,
            threads,
            backend,
            local_addr,
            extra_local_addrs,
            udp_local_addr,
            udp_steered,
        };
        if let Some(e) = first_err {
            rt.shutdown();
            let _ = rt.join();
            return Err(e);
        }
        tracing::debug!(shards = cfg.shards, %backend, "shards runtime started");
        Ok(rt)
    }

    /// New descriptors of the listening sockets, in shard order (TCP, then UDP): what a live
    /// upgrade hands to the next process, which starts with [`Runtime::start_inherited`].
    pub fn listening_sockets(&self) -> io::Result<Inherited> {
        Ok(Inherited {
            tcp: self
                .kept
                .iter()
                .map(|f| f.try_clone())
                .collect::<io::Result<_>>()?,
            extra: self
                .kept_extra
                .iter()
                .map(|v| v.iter().map(|f| f.try_clone()).collect::<io::Result<_>>())
                .collect::<io::Result<_>>()?,
            udp: self
                .kept_udp
                .iter()
                .map(|f| f.try_clone())
                .collect::<io::Result<_>>()?,
            udp_steered: self.udp_steered,
            paused: false,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Actual bound listen address (port 0 resolved).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Actual bound addresses of the extra listeners, in [`Config::extra_listen`]'s order
    /// (port 0 resolved).
    pub fn extra_local_addrs(&self) -> &[SocketAddr] {
        &self.extra_local_addrs
    }

    /// Actual bound UDP address (port 0 resolved).
    pub fn udp_local_addr(&self) -> Option<SocketAddr> {
        self.udp_local_addr
    }

    /// Whether the UDP steering program ([`Config::udp_steering`]) is attached.
    pub fn udp_steered(&self) -> bool {
        self.udp_steered
    }

    pub fn remote(&self) -> Remote<M> {
        Remote {
            shared: self.shared.clone(),
        }
    }

    /// Request stop (callable from any thread).
    pub fn shutdown(&self) {
        self.shared.request_stop();
    }

    /// Wait for all shard threads. A shard that panicked or failed yields `Err`.
    pub fn join(mut self) -> io::Result<()> {
        self.join_all()
    }

    fn join_all(&mut self) -> io::Result<()> {
        let mut res = Ok(());
        for (i, t) in std::mem::take(&mut self.threads).into_iter().enumerate() {
            let r = match t.join() {
                Ok(r) => r,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic payload".into());
                    Err(io::Error::other(format!("shard {i} panicked: {msg}")))
                }
            };
            if let Err(e) = r {
                if res.is_ok() {
                    res = Err(e);
                }
            }
        }
        res
    }
}

impl<M: Send + 'static> Drop for Runtime<M> {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.request_stop();
            let _ = self.join_all();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn shard_main<H, F>(
    i: usize,
    backend: Backend,
    cfg: Arc<Config>,
    shared: Arc<Shared<H::Msg>>,
    rx: crossbeam_channel::Receiver<Envelope<H::Msg>>,
    listeners: Vec<Option<std::os::fd::OwnedFd>>,
    udp_sock: Option<std::os::fd::OwnedFd>,
    paused: bool,
    factory: Arc<F>,
    ready: crossbeam_channel::Sender<io::Result<()>>,
) -> io::Result<()>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    if let Some(Some(cpu)) = cfg.cpus.get(i) {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: *cpu }) {
            tracing::warn!(cpu, "could not pin shard thread to CPU");
        }
    }
    // On unwind the core (conn slots, output queues that in-flight sends may reference) is
    // leaked on purpose; see uring.rs.
    let mut core = std::mem::ManuallyDrop::new(Core::new(i, cfg.shards, backend, &cfg, shared));
    core.udp = udp_sock;
    core.accept_paused = paused;
    match backend {
        Backend::Uring => {
            drive::<uring::UringShard, H, F>(i, core, &cfg, listeners, &rx, &*factory, ready)
        }
        Backend::Epoll => {
            drive::<epoll::EpollShard, H, F>(i, core, &cfg, listeners, &rx, &*factory, ready)
        }
    }
}

/// What a shard's I/O backend does (io_uring or epoll): set itself up around the shard's
/// listener, mailbox eventfd and UDP socket, then run the event loop on the shard's core until
/// the shard stops. One trait, so a shard's life is written once ([`drive`]).
pub(crate) trait Driver: Sized {
    fn new(
        cfg: &Config,
        listeners: Vec<Option<std::os::fd::OwnedFd>>,
        wake_fd: std::os::fd::RawFd,
        udp_fd: Option<std::os::fd::RawFd>,
    ) -> io::Result<Self>;
    fn run<H: Handler>(
        &mut self,
        core: &mut Core<H::Msg>,
        rx: &crossbeam_channel::Receiver<Envelope<H::Msg>>,
        h: &mut H,
    ) -> io::Result<()>;
    /// Whether the kernel may still reference the core's memory after `run` (then the core is
    /// leaked rather than freed; see uring.rs).
    fn leaked(&self) -> bool {
        false
    }
}

/// One shard's life on backend `D`: set up (reporting the outcome on `ready`), make the
/// handler on this thread, run until the shard stops, then free the core unless the backend
/// says the kernel may still reference it.
fn drive<D: Driver, H: Handler, F: Fn(usize) -> H>(
    i: usize,
    mut core: std::mem::ManuallyDrop<Core<H::Msg>>,
    cfg: &Config,
    listeners: Vec<Option<std::os::fd::OwnedFd>>,
    rx: &crossbeam_channel::Receiver<Envelope<H::Msg>>,
    factory: &F,
    ready: crossbeam_channel::Sender<io::Result<()>>,
) -> io::Result<()> {
    let udp_fd = core.udp.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let mut be = match D::new(cfg, listeners, core.wake_fd(), udp_fd) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    let mut h = factory(i);
    let r = be.run(&mut core, rx, &mut h);
    let leaked = be.leaked();
    drop(be);
    if !leaked {
        drop(std::mem::ManuallyDrop::into_inner(core));
    }
    r
}
